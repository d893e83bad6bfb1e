"""Cost of robustness evidence at serving time, measured in one run.

1. Certificate cost relative to a plain ONNX prediction: ``runtime.answer`` with the per-layer
   certificates (computed from the ONNX outputs and the metadata) vs the same call answering the
   prediction alone (softmax, top-k), on the same session and images. Target <= 1.05x.
2. Probe cost in units of one forward+backward of ``model.pt2`` on the same image: a PGD probe
   of S steps should cost about S units plus the ONNX classification of the adversarial image.

Repetitions are interleaved (plain, certified, plain, ...) and medians reported, because the
machines are shared and noisy. Without ``--onnx`` a built-in model is trained for one epoch on
digits and exported to a temporary directory first.

    python tools/bench/certify.py [--onnx runs/demo/export/model.onnx] [--reps 200] [--json]
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from common import load_average, machine, set_torch_threads, timed_calls


def _call_times(fn: Callable[[], Any], reps: int) -> list[float]:
    """Wall seconds of each of ``reps`` single calls."""
    return [timed_calls(fn)[0] for _ in range(reps)]


def _prepare(onnx_path: str | None, workdir: Path, model: str) -> Path:
    if onnx_path:
        return Path(onnx_path)
    from specformer_deploy.artifact.export import export_run
    from specformer_deploy.training.train import TrainConfig, train

    run = workdir / "run"
    train(TrainConfig(model=model, epochs=1, warmup_epochs=0), run, show_progress=False)
    return Path(export_run(run, run / "export" / "model.onnx")["onnx"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", help="an exported model (default: train and export the built-in one)")
    parser.add_argument("--model", default="specformer-tiny",
                        help="model to train for one epoch on digits when --onnx is not given (deit_tiny_patch16_224 "
                             "trains at 224 px: several minutes on 2 CPU cores)")
    parser.add_argument("--reps", type=int, default=200, help="interleaved repetitions per batch size")
    parser.add_argument("--batches", default="1,32", help="batch sizes, comma-separated")
    parser.add_argument("--probe-steps", type=int, default=10, help="PGD steps of the probe")
    parser.add_argument("--probe-reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime and torch threads")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    import torch

    from specformer_deploy.serving.runtime import ProbeRequest, SpecformerRuntime
    from specformer_deploy.training.data import load_dataset

    set_torch_threads(args.threads)
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        path = _prepare(args.onnx, Path(tmp), args.model)
        runtime = SpecformerRuntime(path, threads=args.threads)
        test = load_dataset(runtime.meta["training"]["dataset"] or "digits", runtime.image_size,
                            channels=runtime.input_shape[0]).test
        results: dict = {"model": str(path), "certificate": [], "probe": {}}
        for batch in [int(b) for b in args.batches.split(",")]:
            pixels = np.stack([test[i % len(test)][0].numpy() for i in range(batch)])
            plain = lambda pixels=pixels: runtime.answer(pixels, certificate=False)  # noqa: E731
            certified = lambda pixels=pixels: runtime.answer(pixels, delta0=0.01)  # noqa: E731
            for _ in range(10):
                plain(), certified()
            t_plain, t_cert = [], []
            for _ in range(args.reps):
                t_plain += _call_times(plain, 1)
                t_cert += _call_times(certified, 1)
            mp, mc = statistics.median(t_plain), statistics.median(t_cert)
            results["certificate"].append({"batch": batch, "plain_ms": mp * 1e3, "certified_ms": mc * 1e3,
                                           "ratio": mc / mp, "target": 1.05})

        # probe cost in units of one forward+backward of model.pt2 on the same image
        model = runtime.prober.logits_model()
        x = torch.from_numpy(np.stack([test[0][0].numpy()]))
        y = torch.tensor([int(runtime.infer(x.numpy())[0].argmax())])

        def forward_backward() -> None:
            xr = x.clone().requires_grad_(True)
            torch.nn.functional.cross_entropy(model(xr), y).backward()

        request = ProbeRequest("pgd", eps=8 / 255, steps=args.probe_steps)
        probe = lambda: runtime.probe(x.numpy(), y.numpy(), request)  # noqa: E731
        for _ in range(3):
            forward_backward(), probe()
        t_fb, t_probe = [], []
        for _ in range(args.probe_reps):
            t_fb += _call_times(forward_backward, 5)
            t_probe += _call_times(probe, 1)
        fb, pr = statistics.median(t_fb), statistics.median(t_probe)
        results["probe"] = {"steps": args.probe_steps, "forward_backward_ms": fb * 1e3, "probe_ms": pr * 1e3,
                            "units_of_forward_backward": pr / fb}
        results["threads"] = torch.get_num_threads()
    results["environment"] = machine()
    results["load_average_1m"] = {"before": load_before, "after": load_average()}

    if args.json:
        print(json.dumps(results, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"certificate cost vs plain ONNX prediction ({results['model']})")
    for column in ("batch", "plain (ms)", "prediction + certificate (ms)", "ratio", "target"):
        table.add_column(column, justify="right")
    for row in results["certificate"]:
        verdict = "met" if row["ratio"] <= row["target"] else "not met"
        table.add_row(str(row["batch"]), f"{row['plain_ms']:.3f}", f"{row['certified_ms']:.3f}",
                      f"{row['ratio']:.3f}", f"<= {row['target']} ({verdict})")
    console = Console()
    console.print(table)
    p = results["probe"]
    console.print(f"PGD-{p['steps']} probe: {p['probe_ms']:.1f} ms = {p['units_of_forward_backward']:.1f} x one "
                  f"forward+backward of model.pt2 ({p['forward_backward_ms']:.2f} ms)")


if __name__ == "__main__":
    sys.exit(main())
