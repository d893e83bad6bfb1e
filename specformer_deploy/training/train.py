"""The training loop: standard or PGD adversarial training, with or without MSVP.

Reproducibility is by construction: every epoch reseeds torch, numpy (timm's Mixup) and
Python from ``(seed, epoch)``, the LR schedule is a function of the global step, and the
checkpoint written at the end of each epoch holds the model, optimizer and power-iteration
state. So a run resumed after a kill replays exactly the epochs it lost.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import save_file
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from specformer_deploy import __version__
from specformer_deploy.robustness.attacks import check_budget, pgd
from specformer_deploy.training.checkpoint import CheckpointError, RunFiles, atomic_write, atomic_write_text, read_metrics
from specformer_deploy.training.data import load_dataset
from specformer_deploy.model.heads import UnsupportedAttentionError
from specformer_deploy.training.distributed import (DistContext, agree, all_reduce_sums, broadcast_object, elastic_restart_count,
                          init_distributed, per_rank_batch, resolve_device, shutdown, sync_from_rank0)
from specformer_deploy.model.factory import DEFAULT_MODEL, ModelConfig, build_model, load_pretrained, resolve_model_config
from specformer_deploy.model.mlp import activation_sparsity
from specformer_deploy.training.msvp import MSVP, MSVPConfig, exact_spectral_norms

__all__ = ["TrainConfig", "train", "resolve_device", "evaluate_accuracy", "load_run_model", "FORMAT_VERSION"]

FORMAT_VERSION = 1


@dataclass
class TrainConfig:
    """All options of a training run; stored in config.json so the run can be repeated."""

    model: str = DEFAULT_MODEL
    dataset: str = "digits"
    data_dir: str | None = None
    img_size: int | None = None
    patch_size: int | None = None
    epochs: int = 50
    batch_size: int = 32
    lr: float = 0.1
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_epochs: int = 2
    min_lr: float = 1e-5
    mixup: bool | None = None  # None: on for standard training, off for adversarial training
    mixup_alpha: float = 0.2
    cutmix_alpha: float = 0.2
    label_smoothing: float = 0.1
    msvp: bool = True
    lambda_q: float = 1e-4
    lambda_k: float = 1e-4
    lambda_v: float = 1e-4
    n_power_iterations: int = 1
    adversarial: bool = False
    adv_eps: float = 8 / 255
    adv_step: float = 2 / 255
    adv_steps: int = 10
    seed: int = 0
    device: str = "auto"
    pretrained: str | None = None
    mlp_act: str = "gelu"
    sparsity_weight: float = 0.0
    attention: str = "dot"
    compile: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def use_mixup(self) -> bool:
        enabled = (not self.adversarial) if self.mixup is None else self.mixup
        return enabled and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2 or (self.use_mixup and self.batch_size % 2):
            raise ValueError(f"--batch-size must be >= 2 (and even with mixup), got {self.batch_size}")
        if not (self.lr > 0):
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.adversarial:
            check_budget(self.adv_eps, self.adv_step, self.adv_steps)
        MSVPConfig(self.lambda_q, self.lambda_k, self.lambda_v, self.n_power_iterations)
        if not (self.sparsity_weight >= 0):
            raise ValueError(f"--sparsity-weight must be >= 0, got {self.sparsity_weight}")
        if self.sparsity_weight > 0 and self.mlp_act == "gelu":
            raise ValueError("--sparsity-weight needs --mlp-act relu or clipped-relu (units that can be constant)")

    @property
    def msvp_config(self) -> MSVPConfig:
        return MSVPConfig(self.lambda_q, self.lambda_k, self.lambda_v, self.n_power_iterations)


def _seed(seed: int, epoch: int = -1, rank: int = 0) -> int:
    """Seed every generator from (seed, epoch, rank); rank 0 of any world draws what a single
    process draws, the other ranks draw their own Mixup/CutMix and PGD noise."""
    value = (seed * 100_003 + epoch + 1 + rank * 1_000_003) % (2**31)
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)
    return value


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sparsity(model: nn.Module, weight: float) -> contextlib.AbstractContextManager:
    if weight > 0:
        return activation_sparsity(model)
    return contextlib.nullcontext([])


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, dataset, device: torch.device, batch_size: int = 256,
                      ctx: DistContext | None = None) -> float:
    """Clean top-1 accuracy in eval mode; under torchrun each rank scores every world_size-th
    image and the counts are summed, so the figure is the whole test set's."""
    ctx = ctx or DistContext(device=device)
    was_training = model.training
    model.eval()
    correct = total = 0
    if ctx.distributed:
        dataset = Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x, y = x.to(device), y.to(device)
        with _autocast(device):
            pred = model(x).argmax(dim=1)
        correct += int((pred == y).sum())
        total += int(y.numel())
    model.train(was_training)
    correct, total = all_reduce_sums(ctx, [correct, total])
    return correct / max(total, 1)


def _sigma_summary(sigmas: torch.Tensor) -> dict[str, list[float]]:
    """Per-layer max over heads of sigma for Q, K, V (and O when present)."""
    names = ["q", "k", "v", "o"][: sigmas.shape[1]]
    return {n: [round(float(s), 6) for s in sigmas[:, i].amax(dim=1)] for i, n in enumerate(names)}


def _save_epoch(files: RunFiles, model: nn.Module, msvp: MSVP | None, optimizer: torch.optim.Optimizer,
                epoch: int, step: int, metrics: list[dict[str, Any]]) -> None:
    """Metrics first, checkpoint last: the checkpoint's epoch is the commit point."""
    atomic_write_text(files.metrics, "".join(json.dumps(m) + "\n" for m in metrics))
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(files.weights, lambda tmp: save_file(weights, str(tmp), metadata={"epoch": str(epoch)}))
    if msvp is not None:
        vectors = {k: v.detach().cpu().contiguous() for k, v in msvp.state_dict().items()}
        atomic_write(files.vectors, lambda tmp: save_file(vectors, str(tmp)))
    state = {"epoch": epoch, "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "msvp": msvp.state_dict() if msvp is not None else {}}
    atomic_write(files.checkpoint, lambda tmp: torch.save(state, tmp))


EpochCallback = Callable[[dict[str, Any]], None]


def _plan_run(files: RunFiles, cfg: TrainConfig, resume: bool) -> dict[str, Any]:
    """Rank 0's decision: a fresh run, or a resume (asked for, or implied by a torchrun
    restart after a worker died) with the stored config and checkpoint."""
    restarted = elastic_restart_count() > 0
    if restarted and not resume and files.checkpoint.exists():
        resume = True  # torchrun --max-restarts brought us back: continue where the group died
    if resume:
        stored = files.read_config()
        return {"train": stored["train"], "checkpoint": files.load_checkpoint(), "restarted": restarted,
                "world_size": (stored.get("distributed") or {}).get("world_size", 1)}
    if files.checkpoint.exists() or (files.config.exists() and not restarted):
        raise CheckpointError(f"{files.root} already holds a run; pass --resume to continue it or choose another --out")
    return {"train": asdict(cfg), "checkpoint": None, "restarted": restarted}


def _run_options(cfg: TrainConfig, out: Path, resume: bool) -> dict[str, Any]:
    """What every rank must agree on: the options, the run directory and the library versions
    (a node with another torch or timm would silently compute something else)."""
    import timm

    return {**asdict(cfg), "out": str(out), "resume": resume, "torch": torch.__version__, "timm": timm.__version__,
            "specformer_deploy": __version__}


def _drift_metrics(ctx: DistContext, model: nn.Module, msvp: MSVP | None) -> dict[str, Any]:
    """How far each replica strayed from rank 0 this epoch (0.0 means identical). The MSVP
    vectors are then reset to rank 0's, so they stay identical even on mixed hardware."""
    weights = sync_from_rank0(ctx, model, parameters=True, copy=False)
    vectors = sync_from_rank0(ctx, msvp) if msvp is not None else 0.0
    return {"world_size": ctx.world_size, "max_weight_drift": weights, "max_vector_drift": vectors}


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, console: Console | None = None,
          show_progress: bool = True, on_epoch_end: EpochCallback | None = None) -> dict[str, Any]:
    """Train (or resume) a run in ``out``; returns the run summary.

    Under ``torchrun`` every rank calls this: the model is wrapped in DistributedDataParallel,
    each rank reads its share of every global batch (``DistributedSampler``), and rank 0 alone
    writes the run directory and shows progress.
    """
    device_name = cfg.device
    if resume:  # a resumed run keeps its device unless config.json is unreadable (reported below)
        with contextlib.suppress(Exception):
            device_name = RunFiles(out).read_config()["train"]["device"]
    ctx = init_distributed(device_name)
    try:
        return _train(ctx, cfg, Path(out), resume, console or Console(stderr=True), show_progress and ctx.is_main,
                      on_epoch_end)
    finally:
        shutdown(ctx)


def _train(ctx: DistContext, cfg: TrainConfig, out: Path, resume: bool, console: Console, show_progress: bool,
           on_epoch_end: EpochCallback | None) -> dict[str, Any]:
    files = RunFiles(out)
    error = None
    try:
        if not resume:  # a resumed run's options come from its config.json, checked below
            cfg.validate()
            per_rank_batch(cfg.batch_size, ctx.world_size, cfg.use_mixup)
    except ValueError as err:
        error = str(err)
    agree(ctx, _run_options(cfg, out, resume), error)

    plan: dict[str, Any] | str = ""
    if ctx.is_main:
        try:
            plan = _plan_run(files, cfg, resume)
        except CheckpointError as err:
            plan = str(err)
    plan = broadcast_object(ctx, plan)
    if isinstance(plan, str):
        raise CheckpointError(plan)
    cfg = TrainConfig(**plan["train"])
    checkpoint = plan["checkpoint"]
    cfg.validate()
    device = ctx.device
    local_batch = per_rank_batch(cfg.batch_size, ctx.world_size, cfg.use_mixup)

    bundle = model = model_cfg = None
    try:
        _seed(cfg.seed)
        probe = resolve_model_config(cfg.model, num_classes=2, img_size=cfg.img_size, patch_size=cfg.patch_size,
                                     mlp_act=cfg.mlp_act, attention=cfg.attention)
        bundle = load_dataset(cfg.dataset, probe.img_size, cfg.data_dir)
        model_cfg = resolve_model_config(cfg.model, bundle.num_classes, cfg.img_size, cfg.patch_size, cfg.mlp_act,
                                         cfg.attention)
        _seed(cfg.seed)
        model = build_model(model_cfg)
        if cfg.pretrained and checkpoint is None:
            load_pretrained(model, cfg.pretrained)
        error = None
    except Exception as err:  # noqa: BLE001 - reported on every rank below, then re-raised here
        if not ctx.distributed:
            raise
        error = str(err) if isinstance(err, (ValueError, OSError, UnsupportedAttentionError)) else f"{type(err).__name__}: {err}"
    agree(ctx, {}, error)
    assert bundle is not None and model is not None and model_cfg is not None
    model.to(device)
    msvp = None
    if cfg.msvp:
        msvp = MSVP(model, cfg.msvp_config, generator=torch.Generator().manual_seed(cfg.seed)).to(device)

    run_config = {"format_version": FORMAT_VERSION, "package_version": __version__, "train": asdict(cfg),
                  "model": model_cfg.to_dict(), "data": {"dataset": bundle.name, "class_names": bundle.class_names,
                                                         "train_size": len(bundle.train), "test_size": len(bundle.test)},
                  # Mixup/CutMix and PGD noise are drawn per process: part of what repeats a run.
                  "distributed": {"world_size": ctx.world_size, "backend": ctx.backend}}
    if checkpoint is None and ctx.is_main:
        atomic_write_text(files.config, json.dumps(run_config, indent=2) + "\n")

    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    # Every step takes a full global batch (the incomplete last one is dropped, as timm's loaders
    # do): so N processes see exactly the batches one process sees, whatever N.
    steps_per_epoch = len(bundle.train) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"the training set ({len(bundle.train)} images) is smaller than one batch ({cfg.batch_size})")
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=cfg.min_lr,
                                  warmup_t=min(cfg.warmup_epochs * steps_per_epoch, total_steps // 2),
                                  warmup_lr_init=cfg.lr * 0.01, t_in_epochs=False)
    mixup = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, label_smoothing=cfg.label_smoothing,
                  num_classes=bundle.num_classes) if cfg.use_mixup else None
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    if mixup is not None:
        criterion = SoftTargetCrossEntropy()
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing if not cfg.adversarial else 0.0)

    start_epoch, step = 0, 0
    metrics: list[dict[str, Any]] = []
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if msvp is not None:
            msvp.load_state_dict(checkpoint["msvp"])
        start_epoch, step = int(checkpoint["epoch"]), int(checkpoint["step"])
        metrics = broadcast_object(ctx, read_metrics(files.metrics)[:start_epoch] if ctx.is_main else None)
        why = " after a torchrun restart" if plan["restarted"] else ""
        if ctx.is_main and start_epoch >= cfg.epochs:
            console.print(f"{files.root} has already finished its {cfg.epochs} epochs; nothing to train")
        elif ctx.is_main:
            console.print(f"resuming {files.root} at epoch {start_epoch + 1}/{cfg.epochs}{why}")
            if plan["world_size"] != ctx.world_size:
                console.print(f"note: the run started with {plan['world_size']} process(es) and resumes with "
                              f"{ctx.world_size}; the global batches are the same, the per-process Mixup/CutMix "
                              "and PGD noise are not, so it will not repeat an uninterrupted run exactly")
    scheduler.step_update(step)

    # What runs the forward passes: the model itself, compiled by torch.compile on request,
    # wrapped in DDP when there are several ranks. Attacks and evaluation use the undistributed
    # module (same weights), so their backward passes trigger no gradient all-reduce.
    forward_model: nn.Module = torch.compile(model) if cfg.compile else model
    attack_model = forward_model
    if ctx.distributed:
        forward_model = DistributedDataParallel(forward_model, device_ids=[device.index] if device.type == "cuda"
                                                else None)
    if ctx.is_main and ctx.distributed:
        console.print(f"distributed: {ctx.world_size} processes ({ctx.backend}), {local_batch} images per process "
                      f"per step, global batch {cfg.batch_size}")

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, disable=not show_progress, transient=False)
    with progress:
        task = progress.add_task("train", total=total_steps, completed=step, info="")
        for epoch in range(start_epoch, cfg.epochs):
            epoch_seed = _seed(cfg.seed, epoch)
            sampler = DistributedSampler(bundle.train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                         seed=epoch_seed)
            loader = DataLoader(bundle.train, batch_size=local_batch, sampler=sampler, drop_last=True)
            _seed(cfg.seed, epoch, ctx.rank)
            model.train()
            if msvp is not None:
                msvp.train()
            started = time.perf_counter()
            loss_sum = penalty_sum = 0.0
            batches = 0
            for x, y in itertools.islice(loader, steps_per_epoch):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if cfg.adversarial:
                    model.eval()
                    with _autocast(device):
                        x = pgd(attack_model, x, y, cfg.adv_eps, cfg.adv_step, cfg.adv_steps)
                    model.train()
                target = y
                if mixup is not None:
                    x, target = mixup(x, y)
                with _autocast(device), _sparsity(model, cfg.sparsity_weight) as activations:
                    loss = criterion(forward_model(x), target)
                # The penalty reads the same parameters outside DDP's forward; its gradient joins
                # the loss's before DDP averages, and is equal on every rank (equal weights).
                penalty = msvp.penalty() if msvp is not None else torch.zeros((), device=device)
                if activations:
                    penalty = penalty + cfg.sparsity_weight * torch.stack(activations).sum().float()
                optimizer.zero_grad(set_to_none=True)
                (loss + penalty).backward()
                optimizer.step()
                step += 1
                scheduler.step_update(step)
                loss_sum += float(loss.detach())
                penalty_sum += float(penalty.detach())
                batches += 1
                progress.update(task, advance=1, description=f"epoch {epoch + 1}/{cfg.epochs}",
                                info=f"loss {loss_sum / batches:.4f}")
            train_time = time.perf_counter() - started
            loss_sum, penalty_sum, batches = all_reduce_sums(ctx, [loss_sum, penalty_sum, batches])
            accuracy = evaluate_accuracy(model, bundle.test, device, ctx=ctx)
            record: dict[str, Any] = {
                "epoch": epoch + 1, "step": step, "loss": loss_sum / max(batches, 1),
                "penalty": penalty_sum / max(batches, 1), "lr": optimizer.param_groups[0]["lr"],
                "test_accuracy": accuracy, "time_s": round(train_time, 3),
                "max_sigma": _sigma_summary(exact_spectral_norms(model)),
            }
            if ctx.distributed:
                record["replicas"] = _drift_metrics(ctx, model, msvp)
            if msvp is not None:
                record["max_sigma_power_iteration"] = _sigma_summary(msvp.sigmas(update=False).detach())
            metrics.append(record)
            if ctx.is_main:
                _save_epoch(files, model, msvp, optimizer, epoch + 1, step, metrics)
                progress.console.print(f"epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f} "
                                       f"test acc {accuracy:.4f} max sigma q/k/v "
                                       f"{max(record['max_sigma']['q']):.3f}/{max(record['max_sigma']['k']):.3f}/"
                                       f"{max(record['max_sigma']['v']):.3f} ({train_time:.1f}s)")
            if on_epoch_end is not None:
                on_epoch_end(record)

    last = metrics[-1]
    return {"out": str(files.root), "model": model_cfg.name, "dataset": bundle.name, "epochs": cfg.epochs,
            "device": str(device), "world_size": ctx.world_size, "msvp": cfg.msvp, "adversarial": cfg.adversarial,
            "test_accuracy": last["test_accuracy"], "loss": last["loss"],
            "max_sigma": {k: max(v) for k, v in last["max_sigma"].items()},
            "train_time_s": round(sum(m["time_s"] for m in metrics), 3),
            "files": {"config": str(files.config), "weights": str(files.weights), "checkpoint": str(files.checkpoint),
                      "metrics": str(files.metrics),
                      "msvp_vectors": str(files.vectors) if cfg.msvp else None}}


def load_run_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained model from its run directory (eval mode) and return it with the config."""
    files = RunFiles(run_dir)
    config = files.read_config()
    if "model" not in config or "train" not in config:
        raise CheckpointError(f"{files.config} lacks the 'model'/'train' sections of a specformer-deploy run")
    model = build_model(ModelConfig.from_dict(config["model"]))
    state = files.load_weights()
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{files.weights} does not match the model in {files.config.name}: {err}") from err
    return model.to(device).eval(), config

