"""The `specformer-deploy` command line (typer). A front door only: the work is in the library."""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from specformer_deploy import __version__

app = typer.Typer(help="Train ViTs with MSVP (SpecFormer), export, audit, certify and serve them.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
err_console = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = 2, quiet: bool = False) -> None:
    if not quiet:
        err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """specformer-deploy: robust ViTs from training to a served endpoint with certificates."""


def _with_train_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` one keyword option per ``TrainConfig`` field that has help text (typer
    reads ``__signature__``), so a field added to the dataclass is a ``train`` option too. The
    options arrive in ``command``'s ``**options``."""
    from specformer_deploy.training.config import command_line_fields

    own = inspect.signature(command, eval_str=True)
    generated = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                   default=typer.Option(f.default, *f.metadata["flags"], help=f.metadata["help"],
                                                        **f.metadata["click"]))
                 for f, annotation in command_line_fields()]
    first, *rest = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in rest]
    command.__signature__ = own.replace(parameters=[first, *generated, *rest])  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}  # type: ignore[attr-defined]
    return command


def _command_line_options(ctx: typer.Context, options: dict[str, Any]) -> dict[str, Any]:
    """The options the user gave (on the command line or through the environment), not typer's
    defaults. Sources are compared by name: typer ships its own copy of click's enum."""
    given = {name for name in options if getattr(ctx.get_parameter_source(name), "name", "DEFAULT")
             not in ("DEFAULT", "DEFAULT_MAP")}
    return {name: options[name] for name in given}


@app.command()
@_with_train_options
def train(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, "--config", metavar="FILE", help="YAML (or JSON) file of options, "
                                          "or a run's config.json to repeat that run; options given on the "
                                          "command line override it."),
    out: Path = typer.Option(Path("runs/latest"), help="Run directory to write."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout at the end."),
    **options: Any,
) -> None:
    """Train a ViT (MSVP on by default) and write a run directory.

    The directory holds model.safetensors, checkpoint.pt, msvp_vectors.safetensors,
    config.json and metrics.jsonl. With --resume every other option is read from config.json.

    Repeat a run: specformer-deploy train --config runs/a/config.json --out runs/b (the
    other sections of config.json, versions and world size, are derived or descriptive and
    are not checked; under torchrun the per-process Mixup/CutMix and PGD noise follow the
    new world size).

    Several processes: torchrun --nproc-per-node N -m specformer_deploy train ... (DDP; gloo on
    CPU, nccl on GPUs; rank 0 writes the run; with torchrun --max-restarts the restarted
    processes resume from the last checkpoint by themselves).
    """
    from specformer_deploy.model.factory import ModelError
    from specformer_deploy.model.heads import UnsupportedAttentionError
    from specformer_deploy.training.checkpoint import CheckpointError
    from specformer_deploy.training.config import ConfigFileError, TrainConfig, read_options_file
    from specformer_deploy.training.data import DataError
    from specformer_deploy.training.recipes import recipe_note
    from specformer_deploy.training.train import train as run_training

    # Under torchrun one process per node reports errors (every rank raises the same one).
    reports = os.environ.get("LOCAL_RANK", "0") == "0"
    if config is not None and resume:
        _fail("--config starts a new run and --resume continues the one in --out (from its own config.json); "
              "pass one of them", quiet=not reports)
    try:
        from_file = read_options_file(config) if config is not None else {}
        cfg = TrainConfig(**{**from_file, **_command_line_options(ctx, options)})
        note = recipe_note(cfg.attention, cfg.optimizer)
        if note and reports:
            err_console.print(f"[yellow]note[/]: {note}")
        summary = run_training(cfg, out, resume=resume, console=err_console)
    except (ConfigFileError, CheckpointError, DataError, ModelError, UnsupportedAttentionError, ValueError) as err:
        _fail(str(err) if reports else "", quiet=not reports)
    except KeyboardInterrupt:
        _fail(f"interrupted; continue with: specformer-deploy train --resume --out {out}", code=130, quiet=not reports)
    if os.environ.get("RANK", "0") != "0":
        return
    if json_output:
        typer.echo(_strict_json(summary, indent=2))
    else:
        err_console.print(f"[green]done[/]: test accuracy {summary['test_accuracy']:.4f}, run in {summary['out']}")


@app.command()
def export(
    run_dir: Path | None = typer.Argument(None, help="A run directory written by `train` (or give --checkpoint)."),
    out: Path = typer.Option(..., "--out", help="The .onnx file to write; model.pt2 is written beside it."),
    checkpoint: Path | None = typer.Option(None, metavar="FILE", help="Instead of a run: weights trained "
                                           "elsewhere, a timm checkpoint (model_best.pth.tar, checkpoint-N.pth.tar "
                                           "from timm's train.py), a .safetensors file or a torch.save'd state "
                                           "dict. Needs --model, --num-classes and --img-size."),
    model: str | None = typer.Option(None, metavar="NAME", help="--checkpoint: the timm model name it was "
                                     "trained as (vit_small_patch16_224, deit_tiny_patch16_224, convit_tiny, ...)."),
    num_classes: int | None = typer.Option(None, help="--checkpoint: the classifier's number of classes."),
    img_size: int | None = typer.Option(None, help="--checkpoint: the square image size it was trained at."),
    in_chans: int = typer.Option(3, help="--checkpoint: input channels, 3 (colour) or 1 (grey)."),
    mean: str | None = typer.Option(None, metavar="M1,M2,M3", help="--checkpoint: normalization mean per channel, "
                                    "comma-separated (default: timm's pretrained_cfg for --model). Folded into the "
                                    "graph: the export takes pixels in [0, 1]."),
    std: str | None = typer.Option(None, metavar="S1,S2,S3", help="--checkpoint: normalization std per channel "
                                   "(default: timm's pretrained_cfg for --model)."),
    ema: bool = typer.Option(False, "--ema", help="--checkpoint: export the EMA weights (state_dict_ema) instead "
                             "of the trained ones; an error when the checkpoint has none."),
    class_names: Path | None = typer.Option(None, metavar="FILE", help="--checkpoint: class names, one per line "
                                            "(or a JSON list); default 0..K-1."),
    parity_images: Path | None = typer.Option(None, metavar="DIR", help="--checkpoint: check ONNX Runtime parity on "
                                              "up to 64 of these images (decoded as the server decodes them); "
                                              "default: 64 seeded random images. The metadata says which."),
    opset: int | None = typer.Option(None, help="ONNX opset (default: the exporter's)."),
    sign_key: Path | None = typer.Option(None, help="Ed25519 private key (PEM, see `keygen`): also write model.sig, "
                                         "a signature of model.onnx and model.pt2 that workers packaged with "
                                         "--verify-key check at load."),
    smoothing_sampler: str = typer.Option("auto", help="The graph randomized smoothing samples with: int8 (also "
                                          "write NAME.sampler-int8.onnx, a statically quantized copy calibrated on "
                                          "training images under the run's training noise; its SHA-256 is in the "
                                          "metadata and checked at load; see docs/RESULTS.md), fp32 (the export "
                                          "itself), or auto: int8 for a run trained with noise when its labels "
                                          "under that noise agree with fp32's on >= 95% of the parity images, "
                                          "else fp32 (always fp32 for --checkpoint)."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Export a run, or a checkpoint trained elsewhere, to ONNX (pixels -> logits, attn_input_norms) with
    spectral metadata, plus model.pt2.

    Parity with PyTorch is checked (max |logit diff| <= 1e-4 and equal predictions) or the export
    fails: on the run's own test images, or for --checkpoint on --parity-images or seeded random
    pixels. With --smoothing-sampler int8, the quantized sampler's label agreement with the float32
    graph under noise is recorded (not enforced).

    Bring your own model: specformer-deploy export --checkpoint model_best.pth.tar --model
    deit_tiny_patch16_224 --num-classes 10 --img-size 224 --out export/model.onnx
    """
    import contextlib
    import io

    from specformer_deploy.artifact.export import ExportError, export_model, export_run
    from specformer_deploy.training.checkpoint import CheckpointError

    checkpoint_options = {"--model": model, "--num-classes": num_classes, "--img-size": img_size, "--mean": mean,
                          "--std": std, "--class-names": class_names, "--parity-images": parity_images,
                          "--ema": ema or None, "--in-chans": None if in_chans == 3 else in_chans}
    if (run_dir is None) == (checkpoint is None):
        _fail("give a run directory or --checkpoint FILE (one of them)")
    if checkpoint is None and any(v is not None for v in checkpoint_options.values()):
        given = ", ".join(k for k, v in checkpoint_options.items() if v is not None)
        _fail(f"{given} describe a --checkpoint; a run directory records them itself")
    if checkpoint is not None:
        lacking = [k for k in ("--model", "--num-classes", "--img-size") if checkpoint_options[k] is None]
        if lacking:
            _fail(f"--checkpoint needs {', '.join(lacking)}: the checkpoint's tensors do not say them")
    exporter_chatter = io.StringIO()
    try:
        with err_console.status("exporting") as status, contextlib.redirect_stdout(exporter_chatter):
            if checkpoint is None:
                summary = export_run(run_dir, out, opset=opset, step=lambda m: status.update(m),
                                     smoothing_sampler=smoothing_sampler)
            else:
                from specformer_deploy.artifact.checkpoint_source import checkpoint_source

                status.update(f"loading {checkpoint.name}")
                source = checkpoint_source(checkpoint, model, num_classes, img_size, in_chans=in_chans,
                                           mean=_floats(mean, "--mean"), std=_floats(std, "--std"), ema=ema,
                                           class_names=class_names, parity_images=parity_images)
                summary = export_model(source, out, opset=opset, step=lambda m: status.update(m),
                                       smoothing_sampler=smoothing_sampler)
    except (CheckpointError, ExportError, ValueError) as err:
        _fail(str(err))
    if sign_key is not None:
        from specformer_deploy.artifact.signing import SigningError, sign_export

        try:
            summary["signature"] = str(sign_export(summary["onnx"], sign_key))
        except SigningError as err:
            _fail(str(err))
    if json_output:
        typer.echo(_strict_json(summary, indent=2))
    else:
        parity = summary["parity"]
        err_console.print(f"[green]exported[/] {summary['onnx']} and {summary['pt2']}: parity on {parity['source']} "
                          f"({parity['images']} images), max |logit diff| {parity['max_abs_logit_diff']:.2e}, "
                          f"predictions equal; sha256 {summary['weights_sha256'][:16]}...")
        sampler = summary.get("smoothing_sampler")
        if summary.get("smoothing_sampler_note"):
            err_console.print(f"[yellow]note:[/] {summary['smoothing_sampler_note']}")
        if sampler:
            agreement = sampler["label_agreement_with_fp32"]
            err_console.print(f"smoothing sampler: {sampler['file']} ({sampler['precision']}), labels equal to the "
                              f"float32 graph's on {agreement['fraction']:.1%} of {agreement['images']} test images "
                              f"under noise {agreement['noise_sd']:g}")


def _floats(text: str | None, option: str) -> list[float] | None:
    """``"0.485,0.456,0.406"`` -> floats; a clear error for anything else."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        _fail(f"{option} takes comma-separated numbers, one per channel, e.g. 0.485,0.456,0.406; got {text!r}")
    return None


def _print_audit(report, console: Console) -> None:
    from rich.table import Table

    shape = report.model.get("input_shape")
    takes = f", input {'x'.join(map(str, shape))} (channels x height x width, pixels in [0, 1])" if shape else ""
    title = f"{report.path}: {report.model.get('layers', len(report.layers))} layers{takes}"
    table = Table(title=title, show_lines=False)
    table.add_column("layer", justify="right")
    for name in ("Q", "K", "V", "O"):
        table.add_column(f"{name} max/mean", justify="right")
    table.add_column("Thm 4.3 factor", justify="right")
    table.add_column("metadata", justify="center")
    for row in report.layers:
        cells = [f"{row[n]['max']:.3f}/{row[n]['mean']:.3f}" for n in ("q", "k", "v", "o")]
        status = "-" if "mismatch" not in row else ("[red]MISMATCH[/]" if row["mismatch"] else "[green]equal[/]")
        table.add_row(str(row["layer"]), *cells, f"{row['weight_factor_max']:.4f}", status)
    if report.layers:
        console.print(table)
        console.print("Thm 4.3 factor: max over heads of ||W_V|| (||W_Q|| ||W_K|| + 1); metadata: stored sigmas "
                      "vs recomputed by SVD")
    for note in report.notes:
        console.print(f"note: {note}")
    for problem in report.problems:
        console.print(f"[red]problem:[/] {problem}")
    colour = {"consistent": "green", "inconsistent": "red"}.get(report.verdict, "yellow")
    console.print(f"verdict: [bold {colour}]{report.verdict}[/] (exit {report.exit_code})")


@app.command()
def keygen(
    private_key: Path = typer.Argument(..., help="Where to write the Ed25519 private key (PEM, mode 600)."),
    public_key: Path = typer.Argument(..., help="Where to write its public key (PEM)."),
) -> None:
    """Make a key pair for signed exports: `export --sign-key PRIVATE`, `package --verify-key PUBLIC`,
    `audit --verify-key PUBLIC`. Keep the private key away from the servers."""
    from specformer_deploy.artifact.signing import generate_keys

    for path in (private_key, public_key):
        if path.exists():
            _fail(f"{path} exists: keygen does not overwrite a key")
    generate_keys(private_key, public_key)
    err_console.print(f"[green]wrote[/] {private_key} (private: keep it off the servers) and {public_key}")


@app.command()
def audit(
    model: Path = typer.Argument(..., help="An ONNX file (ideally written by `export`)."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    plot: Path | None = typer.Option(None, help="Write the max-sigma-per-layer figure (paper Fig. 2a) here."),
    compare: Path | None = typer.Option(None, help="A second ONNX file drawn beside the first in --plot."),
    heads: int | None = typer.Option(None, help="Heads per layer for files without metadata."),
    verify_key: Path | None = typer.Option(None, help="Ed25519 public key (PEM): also check model.sig, the "
                                           "export's signature (a failure is exit 1)."),
) -> None:
    """Recompute every head's spectral norm and the weights' SHA-256 and compare them with the metadata.

    Exit 0: consistent. Exit 1: a weight or metadata value changed after export. Exit 2: unreadable,
    truncated, or not an export of this tool (sigmas are still reported when the weights are found).
    Needs onnx and numpy only.
    """
    from specformer_deploy.artifact.audit import audit_file

    report = audit_file(model, heads=heads, verify_key=verify_key)
    reports = [report]
    if compare is not None:
        reports.append(audit_file(compare, heads=heads))
    console = Console(stderr=json_output)
    console = Console(stderr=json_output, width=max(110, console.width))
    for item in reports:
        _print_audit(item, console)
    if plot is not None:
        drawable = [r for r in reports if r.sigmas]
        if drawable:
            from specformer_deploy.artifact.plots import plot_sigma_per_layer

            def label(r) -> str:
                msvp = (r.model.get("msvp") or {}).get("enabled")
                name = Path(r.path)
                stem = f"{name.parent.name}/{name.stem}" if name.stem == "model" else name.stem
                return stem + ("" if msvp is None else (" (MSVP)" if msvp else " (vanilla)"))

            plot_sigma_per_layer([(label(r), r.sigmas) for r in drawable], plot)
            console.print(f"plot written to {plot}")
        else:
            console.print("[yellow]no sigmas to plot[/]")
    if json_output:
        payload = report.to_dict()
        if compare is not None:
            payload["compare"] = reports[1].to_dict()
        typer.echo(_strict_json(payload, indent=2))
    raise typer.Exit(report.exit_code)


@app.command()
def evaluate(
    model: Path = typer.Argument(..., help="A run directory, or an exported .onnx with model.pt2 beside it "
                                           "(--smoothing: the exported .onnx)."),
    dataset: str | None = typer.Option(None, help="Dataset (default: the one the model was trained on)."),
    data_dir: Path | None = typer.Option(None, help="Directory for cifar10/cifar100/imagefolder."),
    protocol: str = typer.Option("standard", help="standard: clean, FGSM 2/255, PGD-2 2/255; adversarial: clean, "
                                                  "CW-20, PGD-20, PGD-100 at 8/255 (the paper's protocols)."),
    attack: list[str] | None = typer.Option(None, help="NAME:EPS[:STEPS[:RESTARTS]] instead of the protocol, "
                                                          "repeatable: fgsm, pgd, pgd-l2, cw, autoattack, "
                                                          "autoattack-l2; EPS like 8/255."),
    smoothing: float | None = typer.Option(None, metavar="SIGMA", help="Instead of attacks: certified accuracy of "
                                           "the randomized-smoothing classifier at noise std SIGMA (pixels in [0, 1]; "
                                           "use the sigma the model was trained with, see `audit`), per L2 radius."),
    n: int = typer.Option(10_000, "--n", "--num-samples", min=1, help="--smoothing: estimation samples per image "
                          "(CERTIFY and PREDICT); under torchrun write --num-samples (torchrun reads --n as an "
                          "abbreviation of its own options)."),
    n0: int = typer.Option(100, "--n0", min=1, help="--smoothing: selection samples per image (CERTIFY)."),
    alpha: float = typer.Option(0.001, help="--smoothing: failure probability of each certificate."),
    radii: str = typer.Option("0,0.25,0.5,0.75,1.0", help="--smoothing: the table's L2 radii, comma-separated."),
    plot: Path | None = typer.Option(None, help="--smoothing: draw certified accuracy against radius here."),
    limit: int | None = typer.Option(None, help="Evaluate the first N test images only."),
    batch_size: int | None = typer.Option(None, min=1, help="Attack batch size (128), or noise samples per ONNX "
                                                            "Runtime call with --smoothing (1000)."),
    seed: int = typer.Option(0, help="Seed of random starts (attacks) or of the noise (--smoothing)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    threads: int | None = typer.Option(None, min=1, help="--smoothing: parallel sampling streams (default: every "
                                       "core, shared among the processes under torchrun)."),
    sampler: str = typer.Option("auto", help="--smoothing: the graph that samples, auto (the export's "
                                "--smoothing-sampler graph when it has one) or fp32 (the export itself)."),
    split: str = typer.Option("test", help="--smoothing: test (the images a report states), or val (the training "
                              "images the run held out with train --val-images: choose sigma and recipe there)."),
    json_output: bool = typer.Option(False, "--json", help='Print {"clean": acc, "<attack>": acc, ...} (or the '
                                                           'certified-accuracy table) on stdout.'),
) -> None:
    """Accuracy under attack, in the layout of the paper's Tables 1/2 (accuracies in [0, 1]); with
    --smoothing, certified accuracy per L2 radius in the layout of Cohen et al.'s tables (abstentions
    count as wrong). Under torchrun, --smoothing shards the test images over the processes."""
    from rich.progress import Progress

    if smoothing is not None:
        if attack:
            _fail("--attack and --smoothing are different evaluations: pass one of them")
        _evaluate_smoothing(model, smoothing, n=n, n0=n0, alpha=alpha, radii=radii, plot=plot, limit=limit,
                            batch_size=batch_size or 1_000, seed=seed, device=device, json_output=json_output,
                            dataset=dataset, data_dir=data_dir, threads=threads, sampler=sampler, split=split)
        return
    batch_size = batch_size or 128

    from specformer_deploy.robustness.evaluate import PROTOCOLS, evaluate_model, load_attack_model
    from specformer_deploy.training.checkpoint import CheckpointError
    from specformer_deploy.training.data import DataError
    from specformer_deploy.training.train import resolve_device

    if protocol not in PROTOCOLS:
        _fail(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    specs = list(attack) if attack else PROTOCOLS[protocol]
    try:
        target = resolve_device(device)
        net, info = load_attack_model(model, target)
        with Progress(console=err_console, transient=True) as progress:
            tasks: dict[str, int] = {}

            def update(key: str, done: int, total: int) -> None:
                if key not in tasks:
                    tasks[key] = progress.add_task(key, total=total)
                progress.update(tasks[key], completed=done)

            results = evaluate_model(net, info, specs, dataset=dataset, data_dir=str(data_dir) if data_dir else None,
                                     limit=limit, batch_size=batch_size, seed=seed, device=target,
                                     on_progress=update)
    except (CheckpointError, DataError, ValueError) as err:
        _fail(str(err))
    if json_output:
        typer.echo(_strict_json(results, indent=2))
        return
    from rich.table import Table

    details = results["details"]
    table = Table(title=f"{model} on {details['dataset']} ({details['images']} test images; {details['source']})")
    table.add_column("Model")
    keys = [k for k in results if k != "details"]
    for key in keys:
        table.add_column(details["attacks"][key]["label"], justify="right")
    table.add_row(str(model), *[f"{100 * results[k]:.2f}" for k in keys])
    Console(width=max(120, Console().width)).print(table)


def _evaluate_smoothing(model: Path, sigma: float, *, n: int, n0: int, alpha: float, radii: str, plot: Path | None,
                        limit: int | None, batch_size: int, seed: int, device: str, json_output: bool,
                        dataset: str | None, data_dir: Path | None, threads: int | None = None,
                        sampler: str = "auto", split: str = "test") -> None:
    """`evaluate --smoothing`: certify the test images (sharded under torchrun), print one table on rank 0."""
    from rich.progress import Progress

    from specformer_deploy.robustness.smoothing_eval import (
        SmoothingEvalOptions,
        certified_radii,
        evaluate_smoothing,
        parse_radii,
        plot_certified_accuracy,
    )
    from specformer_deploy.serving.runtime import IntegrityError, cuda_usable
    from specformer_deploy.training.data import DataError
    from specformer_deploy.training.distributed import DistributedConfigError, init_distributed, shutdown

    if device not in ("auto", "cpu", "cuda"):
        _fail(f"--device must be auto, cpu or cuda, got {device!r}")
    on_gpu = device == "cuda" or (device == "auto" and cuda_usable())
    ctx = None
    try:
        options = SmoothingEvalOptions(sigma=sigma, n=n, n0=n0, alpha=alpha, radii=parse_radii(radii), limit=limit,
                                       seed=seed, batch_size=batch_size, dataset=dataset,
                                       data_dir=str(data_dir) if data_dir else None, sampler=sampler, split=split)
        options.params(seed)
        ctx = init_distributed("cuda" if on_gpu else "cpu")
        with Progress(console=err_console, transient=True, disable=not ctx.is_main) as progress:
            task = progress.add_task(f"certifying (rank 0 of {ctx.world_size})", total=None)
            results = evaluate_smoothing(model, options, ctx, device_id=ctx.local_rank if on_gpu else None,
                                         on_progress=lambda done, total: progress.update(task, completed=done,
                                                                                         total=total),
                                         threads=threads)
    except (DataError, IntegrityError, DistributedConfigError, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    finally:
        if ctx is not None:
            shutdown(ctx)
    if not ctx.is_main:
        return
    trained = results["trained_sigma"]
    if trained != sigma:
        why = "was trained without noise" if trained is None else f"was trained with noise sigma {trained}"
        err_console.print(f"[yellow]note:[/] the model {why}; its smoothed classifier at sigma {sigma} is not the "
                          "one it learned")
    if plot is not None:
        plot_certified_accuracy([(f"sigma {sigma}", certified_radii(results["per_image"]))], plot, options.radii)
        err_console.print(f"plot written to {plot}")
    if json_output:
        typer.echo(_strict_json(results, indent=2))
        return
    _print_certified_accuracy(model, results)


def _strict_json(value: Any, indent: int | None = 2) -> str:
    """JSON that strict parsers accept: a NaN or an infinity is a bug to report, never printed."""
    return json.dumps(value, indent=indent, allow_nan=False)


def _print_certified_accuracy(model: Path, results: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"{model} on {results['dataset']}: randomized smoothing, sigma {results['sigma']}, "
                        f"n {results['n']}, n0 {results['n0']}, alpha {results['alpha']} ({results['images']} "
                        f"{results.get('split', 'test images')}; certified accuracy in %, L2 radius in the "
                        f"{results['space']})")
    table.add_column("Model")
    for radius in results["radii"]:
        table.add_column(f"r = {radius:g}", justify="right")
    table.add_column("smoothed clean", justify="right")
    table.add_column("s / image", justify="right")
    clean = results["smoothed_clean_accuracy"]
    table.add_row(str(model), *[f"{100 * a:.1f}" for a in results["certified_accuracy"]],
                  "skipped" if clean is None else f"{100 * clean:.1f}", f"{results['seconds_per_image']:.2f}")
    source = results.get("source")
    if source:  # the same certificates about the data set's own images (radius / ||A||_2)
        table.add_row(f"same, radius in {source['space']} (/ {source['decode_norm']:.4g})",
                      *[f"{100 * a:.1f}" for a in source["certified_accuracy"]], "", "")
    console = Console(width=max(120, Console().width))
    console.print(table)
    console.print(f"abstentions count as wrong ({results['abstained']} abstained); base model clean accuracy "
                  f"{100 * results['base_clean_accuracy']:.1f}%; no radius above {results['max_radius_for_n']:.3f} "
                  f"is certifiable with n = {results['n']}; {results['interval']}: "
                  + ", ".join(f"r {r:g}: [{100 * lo:.1f}, {100 * hi:.1f}]"
                              for r, (lo, hi) in zip(results["radii"], results["certified_interval"])))


@app.command()
def package(
    model: Path = typer.Argument(..., help="An exported .onnx file (model.pt2 beside it)."),
    name: str = typer.Option(..., help="Model name: predictions at /predictions/NAME, probes at "
                                       "/predictions/NAME-probe (archives STORE/NAME.mar, STORE/NAME-probe.mar)."),
    store: Path = typer.Option(Path("model_store"), help="Model store directory; gets TorchServe's "
                                                          "config.properties when it has none."),
    workers: int | None = typer.Option(None, min=1, help="Workers of NAME (minWorkers = maxWorkers); "
                                          "default 1, or one per GPU with --device-ids."),
    probe_workers: int | None = typer.Option(None, min=0, help="Workers of NAME-probe; default 1, or one per "
                                                "GPU with --device-ids. 0: no NAME-probe, NAME serves probes "
                                                "itself (cheap requests then wait behind running probes)."),
    device_ids: str | None = typer.Option(None, help="Serve on these GPUs, e.g. 0,1 (deviceType gpu, deviceIds): "
                                             "TorchServe assigns workers to them round-robin. A worker on a host "
                                             "without a usable CUDA provider serves on CPU. Default: CPU only."),
    batch_size: int = typer.Option(8, min=1, help="TorchServe batch size (both models)."),
    max_batch_delay: int = typer.Option(5, min=0, help="Milliseconds to wait for a batch to fill (both models)."),
    response_timeout: int | None = typer.Option(None, min=1, help="Seconds TorchServe gives NAME's worker for one "
                                                                  "batch (default 60; sized for smoothing when NAME "
                                                                  "serves it, --probe-workers 0)."),
    probe_response_timeout: int | None = typer.Option(None, min=1, help="Seconds TorchServe gives NAME-probe's "
                                                      "worker for one batch (default 120, raised so that half of it "
                                                      "holds --max-smoothing-samples at the rate measured now; a "
                                                      "value given here is kept and caps smoothing instead)."),
    verify_key: Path | None = typer.Option(None, help="Ed25519 public key (PEM): the workers serve the export only "
                                           "if its model.sig (export --sign-key) verifies against it; else 503."),
    queue_size: int = typer.Option(512, min=1, help="Requests NAME queues (jobQueueSize); beyond it TorchServe "
                                                    "answers 503."),
    probe_queue_size: int = typer.Option(64, min=1, help="Probe requests NAME-probe queues (jobQueueSize)."),
    max_probe_cost: int | None = typer.Option(None, min=1, help="Largest probe served, steps x restarts per "
                                                 "image (default: the handler's, 100)."),
    max_top_k: int | None = typer.Option(None, min=1, help="Largest top_k a request may ask for (default: the "
                                            "handler's, 100)."),
    max_image_pixels: int | None = typer.Option(None, min=1, help="Largest decoded image, against decompression "
                                                   "bombs (default: the handler's, 40,000,000)."),
    max_request_bytes: int | None = typer.Option(None, min=1, help="Largest request body the handler reads "
                                                    "(default: the handler's, 8 MiB)."),
    threads_per_worker: int | None = typer.Option(None, min=1, help="ONNX Runtime and torch threads of each "
                                                     "worker (default 1)."),
    max_smoothing_samples: int | None = typer.Option(None, min=0, help="Most randomized-smoothing samples "
                                                     "(n0 + n) per image (default: the handler's, 10,100; 0: none)."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Build the TorchServe archives (torch-model-archiver) and the store's config.properties.

    Two models by default: NAME (predictions and per-layer certificates; refuses probes and
    randomized smoothing and names NAME-probe) and NAME-probe (probes and smoothing, with its own
    workers and queue), so that work costing seconds per image never delays cheap requests.
    Every cap is written into the archives' model-config.yaml (handler:), where a deployer can edit it.
    """
    from specformer_deploy.serving.package import PackageError, package_deployment, parse_device_ids

    given = {"max_image_pixels": max_image_pixels, "max_request_bytes": max_request_bytes, "max_top_k": max_top_k,
             "max_probe_cost": max_probe_cost, "threads_per_worker": threads_per_worker,
             "max_smoothing_samples": max_smoothing_samples}
    caps = {key: value for key, value in given.items() if value is not None}
    shared = {"batchSize": batch_size, "maxBatchDelay": max_batch_delay}
    main_config = {**shared, "jobQueueSize": queue_size, "handler": caps}
    probe_config = {**shared, "jobQueueSize": probe_queue_size, "handler": dict(caps)}
    if response_timeout is not None:
        main_config["responseTimeout"] = response_timeout
    if probe_response_timeout is not None:
        probe_config["responseTimeout"] = probe_response_timeout
    if probe_workers != 0:
        main_config["handler"] = {key: value for key, value in caps.items()
                                  if key not in ("max_probe_cost", "max_smoothing_samples")}
    if workers is not None:
        main_config.update(minWorkers=workers, maxWorkers=workers)
    try:
        ids = parse_device_ids(device_ids) if device_ids is not None else None
        deployment = package_deployment(model, name, store, model_config=main_config, probe_model_config=probe_config,
                                        probe_workers=probe_workers, device_ids=ids, verify_key=verify_key)
    except PackageError as err:
        _fail(str(err))
    written = deployment.model_configs[name]
    if json_output:
        probe_name = next((m for m in deployment.archives if m != name), None)
        typer.echo(_strict_json({
            "archive": str(deployment.archives[name]), "name": name, "device_type": written["deviceType"],
            "device_ids": written.get("deviceIds"), "workers": written["maxWorkers"], "model_config": written,
            "probe_name": probe_name,
            "probe_archive": str(deployment.archives[probe_name]) if probe_name else None,
            "probe_model_config": deployment.model_configs.get(probe_name),
            "config_properties": str(deployment.config_properties),
            "config_properties_written": deployment.config_properties_written,
            "serve_command": deployment.serve_command()}))
    else:
        for archive in deployment.archives.values():
            err_console.print(f"[green]packaged[/] {archive}")
        kept = "written" if deployment.config_properties_written else "kept as it was"
        err_console.print(f"{deployment.config_properties}: {kept}")
        err_console.print(f"serve it with: {deployment.serve_command()}")


@app.command()
def certify(
    model: Path = typer.Argument(..., help="An exported .onnx file (model.pt2 beside it for probes)."),
    images: list[Path] = typer.Argument(..., help="PNG/JPEG files; resized to the model's input size."),
    delta0: float = typer.Option(0.01, help="Radius of the Frobenius ball around each attention layer's input."),
    top_k: int = typer.Option(5, help="How many classes to list."),
    probe: str | None = typer.Option(None, help="Also run a real attack: pgd or fgsm (gradients from model.pt2)."),
    eps: str = typer.Option("2/255", help="Probe radius in pixel space: a number or a fraction like 8/255."),
    steps: int = typer.Option(10, help="Probe steps (PGD), at most 100."),
    restarts: int = typer.Option(1, help="PGD random restarts (the strongest is kept), at most 100."),
    norm: str = typer.Option("linf", help="Probe norm: linf or l2."),
    smoothing: bool = typer.Option(False, "--smoothing", help="Also certify an L2 radius in pixel space by "
                                   "randomized smoothing (Cohen et al. 2019), holding with probability 1 - alpha."),
    sigma: float | None = typer.Option(None, help="Smoothing noise std in pixels [0, 1] (default: the noise the "
                                       "model was trained with, from its export)."),
    n: int = typer.Option(10_000, help="Smoothing estimation samples (with --radius: the most the test may use)."),
    n0: int = typer.Option(100, help="Smoothing selection samples (which class to certify)."),
    alpha: float = typer.Option(0.001, help="Smoothing failure probability: the radius holds with prob. 1 - alpha."),
    radius: float | None = typer.Option(None, help="Only decide whether the smoothed prediction is robust at this "
                                        "L2 radius (a sequential test that stops early), instead of estimating one."),
    seed: int = typer.Option(0, help="Seed of the smoothing noise (the server answers the same for the same seed)."),
    threads: int | None = typer.Option(None, min=1, help="Smoothing: parallel sampling streams (default: every "
                                       "core)."),
    sampler: str = typer.Option("auto", help="Smoothing: the graph that samples, auto (the export's "
                                "--smoothing-sampler graph when it has one) or fp32 (the export itself)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON answer per image on stdout."),
) -> None:
    """Predict and certify images offline: the same answer the server gives (same runtime code).

    Each answer has the prediction (top-k) and per-layer local Lipschitz constants of the attention
    layers (each in its own layer's input space: not a statement about the image). --smoothing adds
    randomized smoothing's certified L2 radius in pixel space; --probe a real attack whose
    adversarial image is classified by the ONNX model (empirical, no guarantee).
    """
    from specformer_deploy.budgets import BudgetError, parse_epsilon
    from specformer_deploy.serving.images import ImageError, read_image
    from specformer_deploy.serving.runtime import IntegrityError, ProbeRequest, RequestError, SpecformerRuntime
    from specformer_deploy.serving.smoothing import SamplingError, SmoothingError, SmoothingParams

    try:
        eps_value = parse_epsilon(eps, "--eps")
    except BudgetError as err:
        _fail(str(err))

    try:
        runtime = SpecformerRuntime(model, threads=threads, sampler=sampler)
    except (FileNotFoundError, IntegrityError, ValueError) as err:
        _fail(str(err))
    params = None
    if smoothing:
        sigma = sigma if sigma is not None else runtime.smoothing_sigma
        if sigma is None:
            _fail(f"{model} was not trained with noise here (its export records no specformer.smoothing.sigma): "
                  "give --sigma, the noise it was trained under. A model trained without Gaussian noise certifies "
                  "little: fine-tune it for smoothing with `train --pretrained FILE --noise-sd SIGMA`")
        try:
            params = SmoothingParams(sigma=sigma, n0=n0, n=n, alpha=alpha, radius=radius, seed=seed).validate()
        except SmoothingError as err:
            _fail(f"--{err}")
    decoded = []
    for path in images:
        try:
            decoded.append(read_image(path.read_bytes(), runtime.image_size, runtime.channels))
        except FileNotFoundError:
            _fail(f"image {path} does not exist")
        except ImageError as err:
            _fail(f"{path}: {err}")
    request = ProbeRequest(probe, eps_value, steps, norm, restarts) if probe else None
    try:
        import numpy as np

        answers = runtime.answer(np.stack([d.pixels for d in decoded]), delta0=delta0, top_k=top_k, probe=request,
                                 smoothing=params, decodes=[d.decode for d in decoded])
    except (RequestError, FileNotFoundError, IntegrityError, SamplingError) as err:  # IntegrityError: model.pt2
        _fail(str(err))
    for path, answer in zip(images, answers):
        answer["image"] = str(path)
    if json_output:
        typer.echo(_strict_json(answers if len(answers) > 1 else answers[0], indent=2))
        return
    _print_answers(answers)


def _print_answers(answers: list[dict]) -> None:
    from rich.table import Table

    console = Console()
    console = Console(width=max(110, console.width))
    for answer in answers:
        pred, cert = answer["prediction"], answer["attention_lipschitz"]
        console.print(f"[bold]{answer['image']}[/]: class {pred['class']!r} (label {pred['label']}, "
                      f"p={pred['probability']:.3f})")
        table = Table(show_header=True, title=f"{cert['certificate']}: {cert['space']} (delta0 = {cert['delta0']:g})")
        for column in ("layer", "N", "||X0||_F", "bound (always valid)", "paper bound", "paper valid"):
            table.add_column(column, justify="right")
        for layer in cert["layers"]:
            if not layer["applicable"]:
                table.add_row(str(layer["layer"]), str(layer["tokens"]), f"{layer['input_norm']:.3f}",
                              "not applicable", "", layer["reason"])
                continue
            table.add_row(str(layer["layer"]), str(layer["tokens"]), f"{layer['input_norm']:.3f}",
                          f"{layer['bound']:.4g}", f"{layer['paper_bound']:.4g}",
                          "yes" if layer["paper_bound_valid"] else "[red]NO[/]")
        console.print(table)
        console.print("per-layer constants: they do not add up to a radius for the image", style="dim")
        if "smoothing" in answer:
            _print_smoothing(console, answer["smoothing"], Path(answer["image"]).name)
        if "probe" in answer:
            p = answer["probe"]
            verdict = "[red]label flipped[/]" if p["flipped"] else "[green]label held[/]"
            console.print(f"probe {p['attack']} {p['norm']} eps={p['eps']:.4g} steps={p['steps']} ({p['space']}; "
                          f"{p['kind']}): {verdict} (adversarial class {p['adversarial_class']!r}, "
                          f"margin {p['margin']:.3f})")


def _print_smoothing(console: Console, block: dict, image: str) -> None:
    """The randomized-smoothing block as a few readable lines: the verdict, what it promises, and
    the one plain sentence about the image that was sent."""
    from specformer_deploy.serving.smoothing import statement

    settings = (f"sigma={block['sigma']:g}, n0={block['n0']}, n={block['n']}, alpha={block['alpha']:g}, "
                f"seed={block['seed']}, samples used {block['samples_used']}")
    if "radius_asked" in block:
        verdict = {True: "[green]robust[/]", False: "[red]not robust[/]", None: "[yellow]undecided[/] (budget spent)"}
        label = "abstain" if block["label"] is None else f"label {block['label']}"
        console.print(f"smoothing ({block['space']}): {label}, {verdict[block['robust']]} at L2 radius "
                      f"{block['radius_asked']:g}")
    elif block["abstain"]:
        console.print(f"smoothing ({block['space']}): [yellow]abstain[/] (p_lower {block['p_lower']:.4f} <= 1/2: "
                      "no class is certified)")
    else:
        console.print(f"smoothing ({block['space']}): label {block['label']}, certified L2 radius "
                      f"[bold]{block['radius']:.4f}[/] (p_lower {block['p_lower']:.4f}, count {block['count']})")
        if "radius_in_sent_image" in block:
            console.print(f"  in {block['sent_image_space']}: radius {block['radius_in_sent_image']:.4f} "
                          f"(= {block['radius']:.4f} / ||A||_2 {block['decode_norm']:.4g}, the decode's exact norm)")
    console.print(f"  {block['guarantee']}")
    console.print(f"  {settings}; the largest radius n samples can certify: {block['max_radius_for_n']:.4f}")
    console.print(statement(block, image), style="bold", markup=False)


if __name__ == "__main__":  # pragma: no cover
    app()
