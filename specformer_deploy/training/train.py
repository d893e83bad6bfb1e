"""The training loop: standard or PGD adversarial training, with or without MSVP, and with
Gaussian noise for randomized smoothing (plain, consistency-regularized or SmoothAdv).

The loop reads as timm's ``train.py``: ``setup_run`` builds everything a process needs (the
options all ranks agree on, data, model, MSVP, optimizer, schedule, DDP, resume state), then
every epoch is ``train_one_epoch``, ``evaluate_accuracy``, ``save_checkpoint`` and ``log_epoch``.

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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
from specformer_deploy.attacks import pgd
from specformer_deploy.model.factory import ModelConfig, build_model, load_pretrained, resolve_model_config
from specformer_deploy.model.heads import UnsupportedAttentionError
from specformer_deploy.model.mlp import activation_sparsity
from specformer_deploy.training.augment import augment_seed, shift_and_rotate
from specformer_deploy.training.checkpoint import (
    CheckpointError,
    RunFiles,
    atomic_write,
    atomic_write_text,
    read_metrics,
)
from specformer_deploy.training.config import ATTACKING_OBJECTIVES, CONSISTENCY_OBJECTIVES, FORMAT_VERSION, TrainConfig
from specformer_deploy.training.data import DatasetBundle, load_dataset
from specformer_deploy.training.distributed import (
    DistContext,
    agree,
    all_reduce_sums,
    broadcast_object,
    elastic_restart_count,
    init_distributed,
    per_rank_batch,
    resolve_device,
    shutdown,
    sync_from_rank0,
)
from specformer_deploy.training.msvp import MSVP, exact_spectral_norms
from specformer_deploy.training.smoothing_objectives import (
    consistency_regularizer,
    gaussian_noise,
    noisy_copies,
    repeat_target,
    smoothadv_attack,
    warmed_up_eps,
)

__all__ = ["TrainConfig", "RunState", "train", "setup_run", "train_one_epoch", "training_batch", "add_gaussian_noise",
           "noise_seed", "evaluate_accuracy", "save_checkpoint", "log_epoch", "resolve_device", "load_run_model",
           "FORMAT_VERSION"]

EpochCallback = Callable[[dict[str, Any]], None]
Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class RunState:
    """Everything one process of a run holds between epochs: built by ``setup_run``, advanced
    by ``train_one_epoch``. ``forward_model`` runs the training forward passes (compiled and/or
    DDP-wrapped); ``attack_model`` is the same weights without DDP, so PGD's backward passes
    trigger no gradient all-reduce."""

    ctx: DistContext
    cfg: TrainConfig
    files: RunFiles
    bundle: DatasetBundle
    model_cfg: ModelConfig
    model: nn.Module
    forward_model: nn.Module
    attack_model: nn.Module
    msvp: MSVP | None
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    mixup: Mixup | None
    criterion: Criterion
    local_batch: int
    steps_per_epoch: int
    ema: Any | None = None  # timm's ModelEmaV3 of ``model`` (train --ema-decay), or None
    start_epoch: int = 0
    step: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs


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


# ---------------------------------------------------------------------------------------------
# The run: setup, then the epochs
# ---------------------------------------------------------------------------------------------

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
        console = console or Console(stderr=True)
        state = setup_run(ctx, cfg, Path(out), resume, console)
        return _run_epochs(state, console, show_progress and ctx.is_main, on_epoch_end)
    finally:
        shutdown(ctx)


def _run_epochs(state: RunState, console: Console, show_progress: bool,
                on_epoch_end: EpochCallback | None) -> dict[str, Any]:
    """The loop: train an epoch, evaluate, and (rank 0) save and log it."""
    progress = _progress_bar(console, show_progress)
    with progress:
        task = progress.add_task("train", total=state.total_steps, completed=state.step, info="")
        for epoch in range(state.start_epoch, state.cfg.epochs):
            description = f"epoch {epoch + 1}/{state.cfg.epochs}"

            def show_step(loss: float, description: str = description) -> None:
                progress.update(task, advance=1, description=description, info=f"loss {loss:.4f}")

            totals = train_one_epoch(state, epoch, show_step)
            evaluated = evaluated_model(state)
            accuracy = evaluate_accuracy(evaluated, state.bundle.test, state.device, ctx=state.ctx)
            record = _epoch_record(state, epoch, totals, accuracy)
            if state.bundle.validation is not None:
                record["val_accuracy"] = evaluate_accuracy(evaluated, state.bundle.validation, state.device,
                                                           ctx=state.ctx)
            if state.ema is not None:  # the raw weights beside their average
                record["raw_test_accuracy"] = evaluate_accuracy(state.model, state.bundle.test, state.device,
                                                                ctx=state.ctx)
            state.metrics.append(record)
            if state.ctx.is_main:
                save_checkpoint(state, epoch + 1)
                log_epoch(progress.console, state.cfg, record)
            if on_epoch_end is not None:
                on_epoch_end(record)
    return _run_summary(state)


def setup_run(ctx: DistContext, cfg: TrainConfig, out: Path, resume: bool, console: Console) -> RunState:
    """Everything before the first step: the options every rank agrees on (a resumed run's come
    from its config.json), data and model, config.json, optimizer and schedule, the resume
    state, and the compiled/DDP forward model."""
    files = RunFiles(out)
    cfg, plan = _agree_on_plan(ctx, cfg, files, out, resume)
    checkpoint = plan["checkpoint"]
    local_batch = per_rank_batch(cfg.batch_size, ctx.world_size, cfg.use_mixup)
    bundle, model_cfg, model = _build_data_and_model(ctx, cfg, load_weights=checkpoint is None)
    model.to(ctx.device)
    msvp = None
    if cfg.msvp:
        msvp = MSVP(model, cfg.msvp_config, generator=torch.Generator().manual_seed(cfg.seed)).to(ctx.device)
    if checkpoint is None and ctx.is_main:
        _write_run_config(files, ctx, cfg, model_cfg, bundle)
    optimizer, scheduler, steps_per_epoch = _optimization(cfg, model, len(bundle.train))
    mixup = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, label_smoothing=cfg.label_smoothing,
                  num_classes=bundle.num_classes) if cfg.use_mixup else None
    state = RunState(ctx=ctx, cfg=cfg, files=files, bundle=bundle, model_cfg=model_cfg, model=model,
                     forward_model=model, attack_model=model, msvp=msvp, optimizer=optimizer, scheduler=scheduler,
                     mixup=mixup, criterion=_criterion(cfg, mixup), local_batch=local_batch,
                     steps_per_epoch=steps_per_epoch, ema=_weight_average(cfg, model))
    if checkpoint is not None:
        _restore(state, checkpoint, plan, console)
    scheduler.step_update(state.step)
    _wrap_forward_model(state, console)
    return state


def _weight_average(cfg: TrainConfig, model: nn.Module):
    """timm's ``ModelEmaV3`` of ``model`` under ``--ema-decay`` (with its warm-up, so the average
    is not dominated by the initial weights in short runs), else ``None``."""
    if cfg.ema_decay <= 0:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)


def evaluated_model(state: RunState) -> nn.Module:
    """The weights a run evaluates, saves and exports: the moving average when there is one."""
    return state.ema.module if state.ema is not None else state.model


def train_one_epoch(state: RunState, epoch: int, on_step: Callable[[float], None] | None = None) -> dict[str, float]:
    """One epoch of full global batches; returns the loss, penalty and batch sums over all ranks
    and this epoch's training seconds."""
    cfg, ctx, device = state.cfg, state.ctx, state.device
    epoch_seed = _seed(cfg.seed, epoch)
    sampler = DistributedSampler(state.bundle.train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=epoch_seed)
    loader = DataLoader(state.bundle.train, batch_size=state.local_batch, sampler=sampler, drop_last=True)
    _seed(cfg.seed, epoch, ctx.rank)
    state.model.train()
    if state.msvp is not None:
        state.msvp.train()
    started = time.perf_counter()
    loss_sum = penalty_sum = 0.0
    batches = 0
    for x, y in itertools.islice(loader, state.steps_per_epoch):
        loss, penalty = _train_step(state, x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        loss_sum += loss
        penalty_sum += penalty
        batches += 1
        if on_step is not None:
            on_step(loss_sum / batches)
    seconds = time.perf_counter() - started
    loss_sum, penalty_sum, batches = all_reduce_sums(ctx, [loss_sum, penalty_sum, batches])
    return {"loss_sum": loss_sum, "penalty_sum": penalty_sum, "batches": batches, "seconds": seconds}


def training_batch(state: RunState, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the loss sees: PGD adversarial examples (in eval mode, as attacks run) under PGD-AT
    or SmoothAdv (alone or with consistency), then Mixup/CutMix when on (the target is then a
    soft label), then Gaussian noise when ``noise_sd > 0``: ``m = cfg.copies`` noisy copies of every image, concatenated
    copy-major into one batch of ``m * B`` (one forward call, which DDP sees as one). The target
    is the ``B`` images'; ``_objective_loss`` repeats it per copy.

    Noise comes last so that every image the model trains on carries exactly the
    ``N(0, sigma^2 I)`` that the smoothed classifier adds at certification: noise added before
    Mixup would be shrunk by the mixing (std ``sigma * sqrt(lam^2 + (1 - lam)^2)``, down to
    ``sigma / sqrt(2)``) and CutMix would splice two noise fields. After PGD, as Salman et al.
    (2019) train smoothed classifiers adversarially, PGD attacks the clean image and the noise
    is drawn around the adversarial point; SmoothAdv's attack uses the very noise the copies get."""
    cfg = state.cfg
    if cfg.translate or cfg.rotate:  # on the clean images, so the noise below stays N(0, sigma^2 I)
        x = shift_and_rotate(x, cfg.translate, cfg.rotate, augment_seed(cfg.seed, state.step, state.ctx.rank))
    noise = None
    if cfg.noise_sd > 0:
        noise = gaussian_noise(x.shape, cfg.noise_sd, cfg.copies, noise_seed(cfg.seed, state.step, state.ctx.rank),
                               device=x.device, dtype=x.dtype)
    if cfg.adversarial:
        x = _in_eval_mode(state, lambda: pgd(state.attack_model, x, y, cfg.adv_eps, cfg.adv_step, cfg.adv_steps))
    if cfg.smoothing_objective in ATTACKING_OBJECTIVES:
        eps = warmed_up_eps(cfg.smoothadv_eps, state.step // state.steps_per_epoch, cfg.smoothadv_warmup_epochs)
        x = _in_eval_mode(state, lambda: smoothadv_attack(state.attack_model, x, y, noise, eps, cfg.smoothadv_steps))
    target = y
    if state.mixup is not None:
        x, target = state.mixup(x, y)
    if noise is not None:
        x = noisy_copies(x, noise)
    return x, target


def _in_eval_mode(state: RunState, attack: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run an attack as attacks run: the model in eval mode (no dropout), autocast as in training."""
    state.model.eval()
    try:
        with _autocast(state.device):
            return attack()
    finally:
        state.model.train()


_NOISE_STREAM = 0x5300_15E  # separates the noise stream from any other use of the same (seed, step, rank)


def noise_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one step's noise on one rank: a function of the run's seed and the global step
    (saved in the checkpoint), so a resumed run draws the noise the uninterrupted one drew, and
    every rank draws its own (``SeedSequence`` keeps the streams independent)."""
    return int(np.random.SeedSequence([seed, step, rank, _NOISE_STREAM]).generate_state(1, dtype=np.uint64)[0] >> 1)


def add_gaussian_noise(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """``x + N(0, sigma^2 I)`` in pixel space, unclipped (Cohen et al. train and certify without
    clipping), drawn on ``x``'s device from a generator of its own: the noise training's one copy."""
    return x + gaussian_noise(x.shape, sigma, 1, seed, device=x.device, dtype=x.dtype)[0]


def _objective_loss(state: RunState, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean criterion over the noisy copies (each copy shares its image's target, hard or
    Mixup's soft), plus the consistency regularizer under ``--smoothing-objective consistency`` or
    ``smoothadv-consistency``."""
    cfg = state.cfg
    copies = cfg.copies if cfg.noise_sd > 0 else 1
    loss = state.criterion(logits, repeat_target(target, copies))
    if cfg.smoothing_objective in CONSISTENCY_OBJECTIVES:
        loss = loss + consistency_regularizer(logits, copies, cfg.consistency_lambda, cfg.consistency_eta)
    return loss


def _train_step(state: RunState, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    x, target = training_batch(state, x, y)
    with _autocast(state.device), _sparsity(state.model, state.cfg.sparsity_weight) as activations:
        loss = _objective_loss(state, state.forward_model(x), target)
    # The penalty reads the same parameters outside DDP's forward; its gradient joins the
    # loss's before DDP averages, and is equal on every rank (equal weights).
    penalty = state.msvp.penalty() if state.msvp is not None else torch.zeros((), device=state.device)
    if activations:
        penalty = penalty + state.cfg.sparsity_weight * torch.stack(activations).sum().float()
    state.optimizer.zero_grad(set_to_none=True)
    (loss + penalty).backward()
    state.optimizer.step()
    state.step += 1
    state.scheduler.step_update(state.step)
    if state.ema is not None:
        state.ema.update(state.model, step=state.step)
    return float(loss.detach()), float(penalty.detach())


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


def save_checkpoint(state: RunState, epoch: int) -> None:
    """Metrics first, checkpoint last: the checkpoint's epoch is the commit point."""
    files, model, msvp = state.files, state.model, state.msvp
    atomic_write_text(files.metrics, "".join(json.dumps(m) + "\n" for m in state.metrics))
    weights = {k: v.detach().cpu().contiguous() for k, v in evaluated_model(state).state_dict().items()}
    atomic_write(files.weights, lambda tmp: save_file(weights, str(tmp), metadata={"epoch": str(epoch)}))
    if msvp is not None:
        vectors = {k: v.detach().cpu().contiguous() for k, v in msvp.state_dict().items()}
        atomic_write(files.vectors, lambda tmp: save_file(vectors, str(tmp)))
    checkpoint = {"epoch": epoch, "step": state.step, "model": model.state_dict(),
                  "optimizer": state.optimizer.state_dict(), "msvp": msvp.state_dict() if msvp is not None else {},
                  "ema": state.ema.module.state_dict() if state.ema is not None else None}
    atomic_write(files.checkpoint, lambda tmp: torch.save(checkpoint, tmp))


def log_epoch(console: Console, cfg: TrainConfig, record: dict[str, Any]) -> None:
    sigma = record["max_sigma"]
    val = f"val acc {record['val_accuracy']:.4f} " if "val_accuracy" in record else ""
    console.print(f"epoch {record['epoch']}/{cfg.epochs}: loss {record['loss']:.4f} {val}"
                  f"test acc {record['test_accuracy']:.4f} max sigma q/k/v "
                  f"{max(sigma['q']):.3f}/{max(sigma['k']):.3f}/{max(sigma['v']):.3f} ({record['time_s']:.1f}s)")


# ---------------------------------------------------------------------------------------------
# The steps of setup_run
# ---------------------------------------------------------------------------------------------

def _agree_on_plan(ctx: DistContext, cfg: TrainConfig, files: RunFiles, out: Path,
                   resume: bool) -> tuple[TrainConfig, dict[str, Any]]:
    """Every rank checks its options, the ranks agree on them, and rank 0's plan (fresh run or
    resume, with the stored options) becomes every rank's."""
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
    cfg.validate()
    return cfg, plan


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


def _build_data_and_model(ctx: DistContext, cfg: TrainConfig,
                          load_weights: bool) -> tuple[DatasetBundle, ModelConfig, nn.Module]:
    """Data, model config and model, seeded so every rank builds the same initial weights; a
    failure on any rank is reported on every rank instead of hanging the others."""
    bundle = model = model_cfg = None
    error = None
    try:
        _seed(cfg.seed)
        probe = resolve_model_config(cfg.model, num_classes=2, img_size=cfg.img_size, patch_size=cfg.patch_size,
                                     mlp_act=cfg.mlp_act, attention=cfg.attention)
        bundle = load_dataset(cfg.dataset, probe.img_size, cfg.data_dir, cfg.in_chans, cfg.val_images,
                              cfg.train_images)
        model_cfg = resolve_model_config(cfg.model, bundle.num_classes, cfg.img_size, cfg.patch_size, cfg.mlp_act,
                                         cfg.attention, in_chans=bundle.channels)
        _seed(cfg.seed)
        model = build_model(model_cfg)
        if cfg.pretrained and load_weights:
            load_pretrained(model, cfg.pretrained)
    except Exception as err:  # reported on every rank below, then re-raised here
        if not ctx.distributed:
            raise
        known = isinstance(err, (ValueError, OSError, UnsupportedAttentionError))
        error = str(err) if known else f"{type(err).__name__}: {err}"
    agree(ctx, {}, error)
    assert bundle is not None and model is not None and model_cfg is not None
    return bundle, model_cfg, model


def _write_run_config(files: RunFiles, ctx: DistContext, cfg: TrainConfig, model_cfg: ModelConfig,
                      bundle: DatasetBundle) -> None:
    data = {"dataset": bundle.name, "class_names": bundle.class_names, "train_size": len(bundle.train),
            "test_size": len(bundle.test),
            "val_size": 0 if bundle.validation is None else len(bundle.validation)}
    run_config = {"format_version": FORMAT_VERSION, "package_version": __version__, "train": asdict(cfg),
                  "model": model_cfg.to_dict(), "data": data,
                  # Mixup/CutMix and PGD noise are drawn per process: part of what repeats a run.
                  "distributed": {"world_size": ctx.world_size, "backend": ctx.backend}}
    atomic_write_text(files.config, json.dumps(run_config, indent=2) + "\n")


def _optimization(cfg: TrainConfig, model: nn.Module,
                  train_size: int) -> tuple[torch.optim.Optimizer, CosineLRScheduler, int]:
    """SGD (or AdamW) with warm-up then cosine, stepped per optimizer step.

    Every step takes a full global batch (the incomplete last one is dropped, as timm's loaders
    do): so N processes see exactly the batches one process sees, whatever N.
    """
    if cfg.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr,
                                                             weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
    steps_per_epoch = train_size // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"the training set ({train_size} images) is smaller than one batch ({cfg.batch_size})")
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=cfg.min_lr,
                                  warmup_t=min(cfg.warmup_epochs * steps_per_epoch, total_steps // 2),
                                  warmup_lr_init=cfg.lr * 0.01, t_in_epochs=False)
    return optimizer, scheduler, steps_per_epoch


def _criterion(cfg: TrainConfig, mixup: Mixup | None) -> Criterion:
    """Soft-target cross-entropy for Mixup's soft labels; label smoothing in standard training
    only (PGD-AT and SmoothAdv train on hard labels, as Madry et al. and Salman et al.)."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=0.0 if cfg.hard_labels else cfg.label_smoothing)


def _restore(state: RunState, checkpoint: dict[str, Any], plan: dict[str, Any], console: Console) -> None:
    """Load the checkpoint's model, optimizer and power-iteration state, and the metrics of the
    epochs it holds; say where the run resumes and what a different world size changes."""
    ctx, cfg, files = state.ctx, state.cfg, state.files
    state.model.load_state_dict(checkpoint["model"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    if state.msvp is not None:
        state.msvp.load_state_dict(checkpoint["msvp"])
    if state.ema is not None:
        if checkpoint.get("ema") is None:
            raise CheckpointError(f"{files.checkpoint} holds no weight average; it was not trained with --ema-decay")
        state.ema.module.load_state_dict(checkpoint["ema"])
    state.start_epoch, state.step = int(checkpoint["epoch"]), int(checkpoint["step"])
    state.metrics = broadcast_object(ctx, read_metrics(files.metrics)[:state.start_epoch] if ctx.is_main else None)
    if not ctx.is_main:
        return
    why = " after a torchrun restart" if plan["restarted"] else ""
    if state.start_epoch >= cfg.epochs:
        console.print(f"{files.root} has already finished its {cfg.epochs} epochs; nothing to train")
        return
    console.print(f"resuming {files.root} at epoch {state.start_epoch + 1}/{cfg.epochs}{why}")
    if plan["world_size"] != ctx.world_size:
        console.print(f"note: the run started with {plan['world_size']} process(es) and resumes with "
                      f"{ctx.world_size}; the global batches are the same, the per-process Mixup/CutMix "
                      "and PGD noise are not, so it will not repeat an uninterrupted run exactly")


def _wrap_forward_model(state: RunState, console: Console) -> None:
    """The training forward passes run the model compiled by torch.compile on request, wrapped
    in DDP when there are several ranks; attacks and evaluation use the module without DDP."""
    ctx, device = state.ctx, state.device
    state.forward_model = torch.compile(state.model) if state.cfg.compile else state.model
    state.attack_model = state.forward_model
    if ctx.distributed:
        state.forward_model = DistributedDataParallel(state.forward_model,
                                                      device_ids=[device.index] if device.type == "cuda" else None)
    if ctx.is_main and ctx.distributed:
        console.print(f"distributed: {ctx.world_size} processes ({ctx.backend}), {state.local_batch} images per "
                      f"process per step, global batch {state.cfg.batch_size}")


# ---------------------------------------------------------------------------------------------
# What an epoch and a run report
# ---------------------------------------------------------------------------------------------

def _progress_bar(console: Console, show: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, disable=not show, transient=False)


def _sigma_summary(sigmas: torch.Tensor) -> dict[str, list[float]]:
    """Per-layer max over heads of sigma for Q, K, V (and O when present)."""
    names = ["q", "k", "v", "o"][: sigmas.shape[1]]
    return {n: [round(float(s), 6) for s in sigmas[:, i].amax(dim=1)] for i, n in enumerate(names)}


def _drift_metrics(ctx: DistContext, model: nn.Module, msvp: MSVP | None) -> dict[str, Any]:
    """How far each replica strayed from rank 0 this epoch (0.0 means identical). The MSVP
    vectors are then reset to rank 0's, so they stay identical even on mixed hardware."""
    weights = sync_from_rank0(ctx, model, parameters=True, copy=False)
    vectors = sync_from_rank0(ctx, msvp) if msvp is not None else 0.0
    return {"world_size": ctx.world_size, "max_weight_drift": weights, "max_vector_drift": vectors}


def _epoch_record(state: RunState, epoch: int, totals: dict[str, float], accuracy: float) -> dict[str, Any]:
    """One line of metrics.jsonl."""
    batches = max(totals["batches"], 1)
    record: dict[str, Any] = {
        "epoch": epoch + 1, "step": state.step, "loss": totals["loss_sum"] / batches,
        "penalty": totals["penalty_sum"] / batches, "lr": state.optimizer.param_groups[0]["lr"],
        "test_accuracy": accuracy, "time_s": round(totals["seconds"], 3),
        "max_sigma": _sigma_summary(exact_spectral_norms(state.model)),
    }
    if state.ctx.distributed:
        record["replicas"] = _drift_metrics(state.ctx, state.model, state.msvp)
    if state.msvp is not None:
        record["max_sigma_power_iteration"] = _sigma_summary(state.msvp.sigmas(update=False).detach())
    return record


def _run_summary(state: RunState) -> dict[str, Any]:
    cfg, files, metrics = state.cfg, state.files, state.metrics
    last = metrics[-1]
    return {"out": str(files.root), "model": state.model_cfg.name, "dataset": state.bundle.name, "epochs": cfg.epochs,
            "device": str(state.device), "world_size": state.ctx.world_size, "msvp": cfg.msvp,
            "adversarial": cfg.adversarial, "noise_sd": cfg.noise_sd, "smoothing_objective": cfg.smoothing_objective,
            "noise_copies": cfg.copies if cfg.noise_sd > 0 else 0, "test_accuracy": last["test_accuracy"],
            "loss": last["loss"],
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
