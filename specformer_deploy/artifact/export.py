"""Export a model to one self-contained ONNX file with spectral metadata, plus ``model.pt2``.

Exporter choice: the graph is captured once with ``torch.export`` and that same
``ExportedProgram`` is (a) saved as ``model.pt2`` (the gradient path for probes, since ONNX
Runtime has none) and (b) translated by the dynamo-based ``torch.onnx.export``. One trace for
both files means the ONNX model and the ``.pt2`` cannot drift apart. ONNX-level optimization
is turned off (``optimize=False``) so every weight keeps its PyTorch name and ``[out, in]``
layout (``net.blocks.3.attn.qkv.weight``): `audit` and a person reading the file find the
attention weights by name. ONNX Runtime folds the remaining transposes when it loads the file.

The model comes from an :class:`~specformer_deploy.artifact.source.ExportSource`: a run of ours
(:func:`run_source`) or a checkpoint trained elsewhere
(:func:`~specformer_deploy.artifact.checkpoint_source.checkpoint_source`); the export is the same.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from specformer_deploy import __version__
from specformer_deploy.artifact.onnx_meta import (
    FORMAT_VERSION,
    graph_digest,
    initializer_arrays,
    metadata_digests,
    tensor_digests,
    weights_digest,
    write_metadata,
)
from specformer_deploy.artifact.pt2 import ExportedLogits, load_exported_logits  # noqa: F401 - re-exported
from specformer_deploy.artifact.sampler import CALIBRATION_IMAGES, SAMPLER_KEY, build_sampler, sampler_path
from specformer_deploy.artifact.sampler import PRECISIONS as SAMPLER_PRECISIONS
from specformer_deploy.artifact.source import ExportSource
from specformer_deploy.model.heads import attention_applicability, attention_layers, layer_heads, query_bias
from specformer_deploy.training.checkpoint import CheckpointError, RunFiles
from specformer_deploy.training.data import load_dataset
from specformer_deploy.training.msvp import MSVP, MSVPConfig, exact_spectral_norms
from specformer_deploy.training.train import load_run_model

__all__ = ["CertifiableModel", "ExportError", "ExportSource", "export_run", "export_model", "run_source",
           "export_metadata", "write_graph_files",
           "load_exported_logits", "PARITY_TOLERANCE"]

PARITY_TOLERANCE = 1e-4
# ``--smoothing-sampler auto`` keeps the int8 sampler only when its labels under the training noise
# equal the float32 graph's on at least this share of the parity images (measured on MNIST: the
# two samplers' certified accuracies agreed within their intervals at every radius, docs/RESULTS.md).
AUTO_MIN_AGREEMENT = 0.95
PARITY_IMAGES = 64
_MAX_SINGLE_FILE_BYTES = 1_900_000_000


class ExportError(RuntimeError):
    """Export could not produce a faithful file (parity failed, weights not found, too large)."""


class CertifiableModel(nn.Module):
    """Pixels -> ``(logits, attn_input_norms[, mlp_inputs])``.

    ``attn_input_norms[b, l]`` is the Frobenius norm of image ``b``'s tokens at the input of
    attention layer ``l`` (the output of that block's first LayerNorm): the ``||X0||_F`` that
    the certificates need, computed inside the graph so serving needs no torch for it. With
    ``mlp_inputs=True`` (ReLU-family MLPs), the tokens at each MLP's input ``[b, l, N, d]`` are
    returned too: the local MLP bound needs the pre-activation intervals, not just a norm.
    """

    def __init__(self, model: nn.Module, mlp_inputs: bool = False) -> None:
        super().__init__()
        self.model = model
        self.mlp_inputs = mlp_inputs
        self._taps: list[torch.Tensor] = []
        self._mlp_taps: list[torch.Tensor] = []
        net = getattr(model, "net", model)
        for index, block in enumerate(net.blocks):
            norm = getattr(block, "norm1", None)
            if norm is None:
                raise ExportError(f"block {index} ({type(block).__name__}) has no norm1 before its attention")
            norm.register_forward_hook(self._record)
            if mlp_inputs:
                block.norm2.register_forward_hook(self._record_mlp)

    def _record(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self._taps.append(output)

    def _record_mlp(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self._mlp_taps.append(output)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._taps.clear()
        self._mlp_taps.clear()
        logits = self.model(pixels)
        norms = torch.stack([tap.flatten(1).norm(dim=1) for tap in self._taps], dim=1)
        outputs: tuple[torch.Tensor, ...] = (logits, norms)
        if self.mlp_inputs:
            outputs = outputs + (torch.stack(self._mlp_taps, dim=1),)
        self._taps.clear()
        self._mlp_taps.clear()
        return outputs


def tokens_per_layer(model: nn.Module, pixels: torch.Tensor) -> list[int]:
    """``N`` (tokens at each attention layer's input), read off one forward pass."""
    shapes: list[int] = []
    net = getattr(model, "net", model)
    handles = [b.norm1.register_forward_hook(lambda m, a, o: shapes.append(int(o.shape[1]))) for b in net.blocks]
    try:
        with torch.no_grad():
            model(pixels[:1])
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _find_initializer(arrays: dict[str, np.ndarray], name: str, value: np.ndarray) -> dict[str, Any]:
    """The initializer holding ``value`` (by name first, then by content), and its orientation."""
    candidates = [name] + [n for n in arrays if n != name]
    for candidate in candidates:
        array = arrays.get(candidate)
        if array is None:
            continue
        if array.shape == value.shape and np.array_equal(array, value):
            return {"initializer": candidate, "transposed": False}
        if array.shape == value.T.shape and np.array_equal(array, value.T):
            return {"initializer": candidate, "transposed": True}
    raise ExportError(f"the weight {name} was not found among the ONNX initializers")


def _weight_references(model: nn.Module, arrays: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    module_names = {id(m): n for n, m in model.named_modules()}
    params = dict(model.named_parameters())
    layers = []
    reasons = attention_applicability(model)
    for index, attn in enumerate(attention_layers(model)):
        heads = layer_heads(attn)
        prefix = module_names[id(attn)]
        entry: dict[str, Any] = {"layer": index, "module": prefix, "attention": heads.kind,
                                 "certified": heads.certified, "applicable": reasons[index] is None,
                                 "reason": reasons[index]}
        for key, (param, start, stop) in heads.slices().items():
            full = f"{prefix}.{param}"
            ref = _find_initializer(arrays, full, params[full].detach().cpu().numpy())
            ref["cols" if key == "o" else "rows"] = [start, stop]
            entry[key] = ref
        q_param, q_start, q_stop = heads.slices()["q"]
        bias_name = f"{prefix}.{q_param.removesuffix('weight')}bias"
        entry["q_bias"] = None
        if bias_name in params:
            found = _find_initializer(arrays, bias_name, params[bias_name].detach().cpu().numpy())
            entry["q_bias"] = {"initializer": found["initializer"], "range": [q_start, q_stop]}
        layers.append(entry)
    return layers


def _mlp_references(model: nn.Module, arrays: dict[str, np.ndarray], activation: str,
                    exported_inputs: bool) -> dict[str, Any]:
    """Where each MLP's weights live, for local MLP bounds computed from the ONNX file alone."""
    from specformer_deploy.model.mlp import mlp_modules

    if activation == "gelu":
        return {"activation": activation, "local_bounds": False}
    if not exported_inputs:
        return {"activation": activation, "local_bounds": False,
                "reason": "layers have different token counts, so MLP inputs are not exported"}
    names = {id(m): n for n, m in model.named_modules()}
    layers = []
    for mlp in mlp_modules(model):
        prefix = names[id(mlp)]
        entry: dict[str, Any] = {}
        for key, param in (("fc1", mlp.fc1.weight), ("fc2", mlp.fc2.weight)):
            entry[key] = _find_initializer(arrays, f"{prefix}.{key}.weight", param.detach().cpu().numpy())
        bias = mlp.fc1.bias
        entry["fc1_bias"] = (_find_initializer(arrays, f"{prefix}.fc1.bias", bias.detach().cpu().numpy())["initializer"]
                             if bias is not None else None)
        threshold = getattr(mlp.act, "threshold", None)
        entry["threshold"] = (_find_initializer(arrays, f"{prefix}.act.threshold",
                                                threshold.detach().cpu().numpy())["initializer"]
                              if threshold is not None else None)
        layers.append(entry)
    return {"activation": activation, "local_bounds": True, "layers": layers}


def _sigma_table(sigmas: torch.Tensor, names: str) -> dict[str, list[list[float]]]:
    return {f"sigma_{n}": [[float(x) for x in row] for row in sigmas[:, i].tolist()] for i, n in enumerate(names)}


@torch.no_grad()
def _full_output_norms(model: nn.Module) -> list[float]:
    """``||W_O||`` of each layer's whole output projection (the layer bound's factor)."""
    return [float(torch.linalg.matrix_norm(attn.proj.weight.double(), ord=2)) for attn in attention_layers(model)]


@torch.no_grad()
def _query_bias_norms(model: nn.Module) -> list[list[float]]:
    """``||b_q||`` per layer and head (zeros without a query bias); the always-valid bound uses it."""
    out = []
    for attn in attention_layers(model):
        heads = layer_heads(attn)
        bias = query_bias(attn, heads)
        out.append([0.0] * heads.num_heads if bias is None else [float(b) for b in bias.double().norm(dim=1)])
    return out


def _power_estimates(model: nn.Module, files: RunFiles, config: dict[str, Any]) -> dict[str, Any] | None:
    if not files.vectors.is_file() or not config["train"].get("msvp"):
        return None
    from safetensors.torch import load_file

    msvp = MSVP(model, MSVPConfig(), init_iterations=1)
    msvp.load_state_dict(load_file(str(files.vectors)))
    return _sigma_table(msvp.sigmas(update=False).detach(), "qkv")


def _check_parity(onnx_path: Path, wrapper: CertifiableModel, pixels: torch.Tensor, source: str) -> dict[str, Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    logits_ort, norms_ort = session.run(["logits", "attn_input_norms"], {"pixels": pixels.numpy()})[:2]
    with torch.no_grad():
        logits, norms = (t.numpy() for t in wrapper(pixels)[:2])
    report = {"images": int(pixels.shape[0]), "source": source,
              "max_abs_logit_diff": float(np.abs(logits_ort - logits).max()),
              "max_abs_norm_diff": float(np.abs(norms_ort - norms).max()),
              "predictions_equal": bool((logits_ort.argmax(1) == logits.argmax(1)).all()),
              "tolerance": PARITY_TOLERANCE}
    if (report["max_abs_logit_diff"] > PARITY_TOLERANCE or not report["predictions_equal"]
            or report["max_abs_norm_diff"] > PARITY_TOLERANCE * max(1.0, float(np.abs(norms).max()))):
        raise ExportError(f"ONNX Runtime disagrees with PyTorch: {json.dumps(report)}")
    return report


Step = Callable[[str], None]


def write_graph_files(wrapper: nn.Module, example: torch.Tensor, onnx_out: Path, pt2_out: Path | None = None,
                      outputs: list[str] | None = None, opset: int | None = None) -> None:
    """Trace ``wrapper`` once (dynamic batch), save the program as ``.pt2`` and translate it to ONNX.

    One trace for both files, ONNX-level optimisation off (names and layouts kept), one file
    without external data; see the module docstring for why.
    """
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        program = torch.export.export(wrapper, (example[:2],), dynamic_shapes=({0: batch},), strict=False)
    if pt2_out is not None:
        torch.export.save(program, str(pt2_out))
    kwargs: dict[str, Any] = {"opset_version": opset} if opset is not None else {}
    torch.onnx.export(program, (example[:2],), str(onnx_out), input_names=["pixels"],
                      output_names=outputs or ["logits", "attn_input_norms"], external_data=False, optimize=False,
                      verbose=False, **kwargs)


def export_run(run_dir: str | Path, out: str | Path, opset: int | None = None,
               step: Step | None = None, smoothing_sampler: str = "auto") -> dict[str, Any]:
    """Export ``run_dir`` (a run written by `train`) to ``out`` (.onnx) and ``out.with_suffix('.pt2')``.

    Parity is checked on the run's own test images; ``smoothing_sampler`` as in :func:`export_model`.
    """
    step = step or (lambda message: None)
    if Path(out).suffix != ".onnx":
        raise ExportError(f"--out must name a .onnx file, got {out}")
    step("loading the run")
    return export_model(run_source(run_dir), out, opset=opset, step=step, smoothing_sampler=smoothing_sampler)


def export_model(source: ExportSource, out: str | Path, opset: int | None = None,
                 step: Step | None = None, smoothing_sampler: str = "auto") -> dict[str, Any]:
    """Export ``source.model`` to ``out`` (.onnx) and ``out.with_suffix('.pt2')``; returns a summary.

    Both files are written in a temporary directory beside ``out`` and renamed into place only
    after parity and the ONNX checker pass, so a failed export leaves no half-written file.
    ``smoothing_sampler="int8"`` also writes the reduced-precision graph smoothing samples with
    (:mod:`specformer_deploy.artifact.sampler`), calibrated under the training noise;
    ``"auto"`` (the default) does so for a model trained with noise, unless the int8 graph's labels
    under that noise agree with the float32 graph's on fewer than ``AUTO_MIN_AGREEMENT`` of the
    parity images (then, and for models trained without noise, the export samples itself).
    """
    if smoothing_sampler not in ("auto", *SAMPLER_PRECISIONS):
        raise ExportError(f"--smoothing-sampler must be one of auto, {', '.join(SAMPLER_PRECISIONS)}, "
                          f"got {smoothing_sampler!r}")
    step = step or (lambda message: None)
    out = Path(out)
    if out.suffix != ".onnx":
        raise ExportError(f"--out must name a .onnx file, got {out}")
    model, pixels, noise = source.model, source.parity_pixels, source.noise_sd
    if sum(p.numel() * p.element_size() for p in model.parameters()) > _MAX_SINGLE_FILE_BYTES:
        raise ExportError("the model's weights exceed 1.9 GB: a single-file ONNX export is not possible")
    automatic, note = smoothing_sampler == "auto", None
    if automatic:
        smoothing_sampler = "int8" if noise > 0 and source.calibration is not None else "fp32"
    if smoothing_sampler != "fp32" and source.calibration is None:
        raise ExportError(f"--smoothing-sampler {smoothing_sampler} calibrates the sampler on training images under "
                          "the training noise, and neither is known for a checkpoint trained elsewhere: export it "
                          "with the default fp32 sampler")
    if smoothing_sampler != "fp32" and noise <= 0:
        raise ExportError(f"--smoothing-sampler {smoothing_sampler} calibrates the sampler under the run's training "
                          "noise, and this run was trained without noise (train --noise-sd): smoothing it "
                          "certifies little; export it with the default fp32 sampler")
    tokens = tokens_per_layer(model, pixels)
    wrapper = _certifiable_wrapper(model, source.model_config, tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    pt2 = out.with_suffix(".pt2")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp_dir:
        tmp_onnx, tmp_pt2 = Path(tmp_dir) / "model.onnx", Path(tmp_dir) / "model.pt2"
        step("tracing with torch.export and translating to ONNX")
        write_graph_files(wrapper, pixels, tmp_onnx, tmp_pt2, _output_names(wrapper), opset)
        step("checking ONNX Runtime parity")
        parity = _check_parity(tmp_onnx, wrapper, pixels, source.parity_source)
        step("writing spectral metadata")
        proto = onnx.load(str(tmp_onnx))
        sampler = None
        if smoothing_sampler != "fp32":
            step(f"quantizing the smoothing sampler ({smoothing_sampler}, calibrated on training images)")
            images, dataset = source.calibration()
            sampler = build_sampler(proto, Path(tmp_dir) / out.name, smoothing_sampler, images, noise, dataset,
                                    pixels.numpy(), seed=source.seed)
            agreement = sampler["label_agreement_with_fp32"]["fraction"]
            if automatic and agreement < AUTO_MIN_AGREEMENT:
                note = (f"no int8 smoothing sampler: its labels under noise {noise:g} agreed with the float32 "
                        f"graph's on {agreement:.1%} of the parity images (auto keeps it at "
                        f">= {AUTO_MIN_AGREEMENT:.0%}); smoothing samples with the export itself")
                (Path(tmp_dir) / sampler["file"]).unlink()
                sampler = None
        metadata = export_metadata(source, proto, tokens, parity, wrapper.mlp_inputs, sampler)
        _save_checked(proto, metadata, tmp_onnx)
        os.replace(tmp_pt2, pt2)
        stale = [sampler_path(out, p) for p in SAMPLER_PRECISIONS[1:]]
        if sampler is not None:
            os.replace(Path(tmp_dir) / sampler["file"], sampler_path(out, sampler["precision"]))
        for path in stale:  # a sampler left by an earlier export of the same name no longer belongs to it
            if sampler is None or path.name != sampler["file"]:
                path.unlink(missing_ok=True)
        os.replace(tmp_onnx, out)
    return {**_summary(out, pt2, metadata), **({"smoothing_sampler_note": note} if note else {})}


def run_source(run_dir: str | Path) -> ExportSource:
    """A run written by `train`: its model, its own test images for parity, its training noise and
    calibration images for the sampler, and what it records about its training."""
    files = RunFiles(run_dir)
    model, config = load_run_model(files.root)
    if "data" not in config:
        raise CheckpointError(f"{files.config} lacks the 'data' section of a specformer-deploy run")
    train_cfg, model_cfg = config["train"], config["model"]
    try:
        bundle = load_dataset(train_cfg["dataset"], model_cfg["img_size"], train_cfg.get("data_dir"),
                              model_cfg.get("in_chans", 3))
    except Exception as err:  # any failure to load the data is the same user problem
        raise ExportError(f"parity is checked on the run's own test data, which could not be loaded: {err}") from err
    count = min(PARITY_IMAGES, len(bundle.test))
    pixels = torch.stack([bundle.test[i][0] for i in range(count)])
    sections = {"source": {"kind": "run"}, **_training_section(config, files),
                "spectral_power_iteration": _power_estimates(model, files, config),
                **_smoothing_section(config)}
    return ExportSource(model=model, model_config=model_cfg, class_names=list(config["data"]["class_names"]),
                        parity_pixels=pixels, parity_source="run test set", sections=sections,
                        noise_sd=float(train_cfg.get("noise_sd") or 0.0),
                        calibration=lambda: _calibration_images(config), seed=int(train_cfg.get("seed") or 0))


def _calibration_images(config: dict[str, Any]) -> tuple[np.ndarray, str | None]:
    """The first ``CALIBRATION_IMAGES`` training images of the run's data set (never test images)."""
    train_cfg, model_cfg = config["train"], config["model"]
    bundle = load_dataset(train_cfg["dataset"], model_cfg["img_size"], train_cfg.get("data_dir"),
                          model_cfg.get("in_chans", 3))
    count = min(CALIBRATION_IMAGES, len(bundle.train))
    return np.stack([bundle.train[i][0].numpy() for i in range(count)]).astype(np.float32), train_cfg["dataset"]


def _certifiable_wrapper(model: nn.Module, model_cfg: dict[str, Any], tokens: list[int]) -> CertifiableModel:
    """MLP inputs are exported only for ReLU-family MLPs (local bounds) and one token count for all layers
    (the output is one stacked tensor)."""
    mlp_act = model_cfg.get("mlp_act", "gelu")
    return CertifiableModel(model, mlp_inputs=mlp_act != "gelu" and len(set(tokens)) == 1).eval()


def _output_names(wrapper: CertifiableModel) -> list[str]:
    return ["logits", "attn_input_norms"] + (["mlp_inputs"] if wrapper.mlp_inputs else [])


def export_metadata(source: ExportSource, proto: onnx.ModelProto, tokens: list[int], parity: dict[str, Any],
                    mlp_inputs: bool, sampler: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every ``specformer.*`` entry of the export (prefix stripped), the integrity digests last
    because they cover the weights, the graph and every other entry. What only the weights' origin
    knows (a run's training, or a checkpoint's file and digest) comes from ``source.sections``."""
    model, model_cfg = source.model, source.model_config
    arrays = initializer_arrays(proto)
    exact = exact_spectral_norms(model)
    metadata: dict[str, Any] = {
        **_format_section(proto),
        **_model_section(model, source, exact, tokens),
        **source.sections,
        **_spectral_section(model, exact),
        "attention_weights": _weight_references(model, arrays),
        "mlp": _mlp_references(model, arrays, model_cfg.get("mlp_act", "gelu"), mlp_inputs),
        "parity": parity,
        **({SAMPLER_KEY: sampler} if sampler else {}),
    }
    metadata["integrity"] = _integrity_section(arrays, proto, metadata)
    return metadata


def _format_section(proto: onnx.ModelProto) -> dict[str, Any]:
    """Which version of this tool and of the exporter wrote the file."""
    return {"format_version": FORMAT_VERSION, "package_version": __version__,
            "exporter": {"name": "torch.export + torch.onnx.export(dynamo=True, optimize=False)",
                         "torch": torch.__version__, "onnx_opset": int(proto.opset_import[0].version)}}


def _model_section(model: nn.Module, source: ExportSource, exact: torch.Tensor,
                   tokens: list[int]) -> dict[str, Any]:
    """What a client and the certificates need to know about the network: its config, inputs,
    classes, and the shapes (layers, heads, head dim, tokens) the bounds are computed for."""
    model_cfg = source.model_config
    channels = int(model_cfg.get("in_chans", 3))
    heads = layer_heads(next(iter(attention_layers(model))))
    return {
        "model": model_cfg,
        "image_size": model_cfg["img_size"],
        "input_shape": [channels, model_cfg["img_size"], model_cfg["img_size"]],
        "num_classes": model_cfg["num_classes"],
        "class_names": list(source.class_names),
        "normalization": {"mean": model_cfg["mean"], "std": model_cfg["std"], "inside_graph": True,
                          **({"from": source.normalization_from} if source.normalization_from else {})},
        "io": {"pixels": f"[batch, {channels}, H, W] float32 in [0, 1]", "logits": "[batch, classes]",
               "attn_input_norms": "[batch, layers] Frobenius norm of each attention layer's input"},
        "layers": int(exact.shape[0]),
        "heads": heads.num_heads,
        "head_dim": heads.head_dim,
        "embed_dim": int(heads.qkv.shape[-1]),
        "tokens": tokens,
    }


def _training_section(config: dict[str, Any], files: RunFiles) -> dict[str, Any]:
    """How the weights were trained (MSVP lambdas, data, seed) and the last epoch's test accuracy."""
    train_cfg = config["train"]
    metrics = files.root / "metrics.jsonl"
    last = json.loads(metrics.read_text().splitlines()[-1]) if metrics.is_file() else {}
    return {
        "msvp": {"enabled": bool(train_cfg.get("msvp")), "lambda_q": train_cfg.get("lambda_q"),
                 "lambda_k": train_cfg.get("lambda_k"), "lambda_v": train_cfg.get("lambda_v"),
                 "n_power_iterations": train_cfg.get("n_power_iterations")},
        "training": {"dataset": config["data"].get("dataset"), "clean_accuracy": last.get("test_accuracy"),
                     "epochs": last.get("epoch"), "adversarial": bool(train_cfg.get("adversarial")),
                     "adv_eps": train_cfg.get("adv_eps") if train_cfg.get("adversarial") else None,
                     "seed": train_cfg.get("seed"),
                     # the held-out split settings were chosen on (rebuilt by `evaluate --split val`)
                     "val_images": int(train_cfg.get("val_images") or 0),
                     "train_images": int(train_cfg.get("train_images") or 0) or None,  # None: all of them
                     "val_accuracy": last.get("val_accuracy")},
    }


def _spectral_section(model: nn.Module, exact: torch.Tensor) -> dict[str, Any]:
    """The certificates' weight factors: exact per-head sigmas, whole ``||W_O||`` and ``||b_q||``."""
    return {
        "spectral": {"method": "exact SVD (float64) at export", **_sigma_table(exact, "qkvo"),
                     "sigma_o_full": _full_output_norms(model)},
        "bias_q_norm": _query_bias_norms(model),
    }


def _smoothing_section(config: dict[str, Any]) -> dict[str, Any]:
    """The noise level a noise-trained run learned to classify under (``train --noise-sd``): the
    sigma at which randomized smoothing certifies it, and the objective that trained it (plain
    noise, consistency or SmoothAdv, with the hyper-parameters that shape its certified radii).
    Absent for runs trained without noise, whose smoothed classifier is not what they were trained for."""
    from specformer_deploy.training.config import DEFAULT_NOISE_COPIES

    train_cfg = config["train"]
    sigma = float(train_cfg.get("noise_sd") or 0.0)
    if sigma <= 0:
        return {}
    objective = train_cfg.get("smoothing_objective") or "gaussian"
    copies = train_cfg.get("noise_copies") or DEFAULT_NOISE_COPIES.get(objective, 1)
    block: dict[str, Any] = {"sigma": sigma, "objective": objective, "noise_copies": int(copies)}
    for key in _OBJECTIVE_PARAMETERS.get(objective, ()):
        block[key] = train_cfg[key]
    return {"smoothing": block}


_OBJECTIVE_PARAMETERS = {
    "consistency": ("consistency_lambda", "consistency_eta"),
    "smoothadv": ("smoothadv_eps", "smoothadv_steps", "smoothadv_warmup_epochs"),
    "smoothadv-consistency": ("smoothadv_eps", "smoothadv_steps", "smoothadv_warmup_epochs", "consistency_lambda",
                              "consistency_eta"),
}


def _integrity_section(arrays: dict[str, np.ndarray], proto: onnx.ModelProto,
                       metadata: dict[str, Any]) -> dict[str, Any]:
    """Digests that let `audit` and the serving worker tell a file changed after export."""
    return {"weights_sha256": weights_digest(arrays), "tensor_sha256": tensor_digests(arrays),
            "graph_sha256": graph_digest(proto), "metadata_sha256": metadata_digests(metadata)}


def _save_checked(proto: onnx.ModelProto, metadata: dict[str, Any], path: Path) -> None:
    write_metadata(proto, metadata)
    onnx.save(proto, str(path), save_as_external_data=False)
    onnx.checker.check_model(str(path))


def _summary(out: Path, pt2: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    spectral = metadata["spectral"]
    return {"onnx": str(out), "pt2": str(pt2), "bytes": out.stat().st_size,
            "smoothing_sampler": metadata.get(SAMPLER_KEY),
            "opset": metadata["exporter"]["onnx_opset"], "parity": metadata["parity"],
            "weights_sha256": metadata["integrity"]["weights_sha256"],
            "layers": metadata["layers"], "heads": metadata["heads"],
            "max_sigma": {n: max(max(row) for row in spectral[f"sigma_{n}"]) for n in "qkvo"}}
