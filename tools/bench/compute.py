"""Compute-side yardsticks for the benchmarks: measured one-core matmul peaks, FLOPs counted from an
ONNX graph, and ONNX Runtime's own per-op time shares.

Why: an images/s number alone does not say whether a backend is close to what the core can do. With
the FLOPs per image and the matmul peak of the same precision, a throughput turns into a fraction of
peak; the op time shares say how much of the time is spent outside the matrix products at all.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

_FEATURES = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "avx2", "fma")
_MATMUL_OPS = {"MatMul", "QLinearMatMul", "MatMulInteger"}
_CONV_WEIGHT_INPUT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}


def cpu_features() -> list[str]:
    """The matrix-relevant ISA flags of /proc/cpuinfo: they explain which int8/bf16 kernels can run."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return [f for f in _FEATURES if f in flags]


def _time_best(call: Any, reps: int) -> tuple[float, float]:
    """Best and median seconds per call; small problems are batched so one timed block lasts >= 20 ms."""
    t0 = time.perf_counter()
    call()  # warm-up: packs weights, allocates, spins up the thread pool
    warm = max(time.perf_counter() - t0, 1e-6)
    calls = max(1, math.ceil(0.02 / warm))
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - t0) / calls)
    return min(times), statistics.median(times)


def _ort_matmul(precision: str, threads: int, size: int) -> tuple[Any, str]:
    """A one-node ONNX Runtime session (MatMul or MatMulInteger) with the weight as an initializer."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if precision == "fp32":
        a = rng.standard_normal((size, size), dtype=np.float32)
        w = rng.standard_normal((size, size), dtype=np.float32)
        op, a_type, y_type = "MatMul", TensorProto.FLOAT, TensorProto.FLOAT
    else:
        a = rng.integers(0, 256, (size, size), dtype=np.uint8)
        w = rng.integers(-128, 128, (size, size), dtype=np.int8)
        op, a_type, y_type = "MatMulInteger", TensorProto.UINT8, TensorProto.INT32
    graph = helper.make_graph(
        [helper.make_node(op, ["A", "W"], ["Y"])], "matmul_peak",
        [helper.make_tensor_value_info("A", a_type, [size, size])],
        [helper.make_tensor_value_info("Y", y_type, [size, size])],
        initializer=[numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return (lambda: sess.run(None, {"A": a})), f"onnxruntime {op}"


def matmul_peak(precision: str, threads: int = 1, size: int = 1024, reps: int = 7) -> dict:
    """Measured [size x size] @ [size x size] throughput in GFLOP/s (int8: GOP/s; a multiply-add = 2 ops).

    fp32/int8 go through ONNX Runtime (MLAS, the kernels that serve the exported model); bf16 through
    torch/oneDNN, since ORT's CPU provider has no bf16 MatMul.
    """
    if precision in ("fp32", "int8"):
        call, engine = _ort_matmul(precision, threads, size)
        best, median = _time_best(call, reps)
    elif precision == "bf16":
        try:
            import torch
        except ImportError as exc:
            return {"precision": precision, "available": False, "why": f"torch missing: {exc}"}
        engine, previous = "torch bfloat16 matmul", torch.get_num_threads()
        try:
            torch.set_num_threads(threads)
            gen = torch.Generator().manual_seed(0)
            a = torch.randn(size, size, generator=gen).to(torch.bfloat16)
            b = torch.randn(size, size, generator=gen).to(torch.bfloat16)
            with torch.inference_mode():
                best, median = _time_best(lambda: a @ b, reps)
        except Exception as exc:  # noqa: BLE001 - any failure means "no bf16 matmul here"
            return {"precision": precision, "engine": engine, "available": False, "why": repr(exc)}
        finally:
            torch.set_num_threads(previous)
    else:
        raise ValueError(f"precision must be fp32, int8 or bf16, not {precision!r}")
    ops = 2.0 * size**3
    return {"precision": precision, "engine": engine, "size": size, "threads": threads,
            "gflops": ops / best / 1e9, "gflops_median": ops / median / 1e9, "available": True}


def flops_per_sample(onnx_path: str | Path) -> dict:
    """Multiply-adds of MatMul/Gemm/Conv nodes (plain, integer and QLinear) for ONE image.

    Shapes come from ONNX shape inference with the batch pinned to 1; dims still symbolic afterwards
    are taken as 1. Nodes whose shapes stay unknown are listed, never silently counted as zero.
    """
    import onnx

    def _shapes(infos: Any) -> dict[str, list[int]]:
        return {vi.name: [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
                for vi in infos if vi.type.tensor_type.HasField("shape")}

    model = onnx.load(str(onnx_path))
    # Shapes stored in the file may hold a fixed batch > 1: drop them and let inference redo them at
    # batch 1; they are only a fallback for tensors inference cannot shape.
    stored = _shapes([*model.graph.value_info, *model.graph.output])
    del model.graph.value_info[:]
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims):
        dims[0].ClearField("dim_param")
        dims[0].dim_value = 1
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {**stored, **_shapes([*model.graph.value_info, *model.graph.input, *model.graph.output])}
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)

    by_op: dict[str, int] = {}
    unknown: list[str] = []
    counted = 0
    for node in model.graph.node:
        op = node.op_type
        if op not in _MATMUL_OPS and op != "Gemm" and op not in _CONV_WEIGHT_INPUT:
            continue
        out = shapes.get(node.output[0])
        if op in _CONV_WEIGHT_INPUT:
            operand = shapes.get(node.input[_CONV_WEIGHT_INPUT[op]])  # [M, C/group, k...]
        else:
            operand = shapes.get(node.input[0])  # A (input 0 for QLinearMatMul too)
        if out is None or not operand or (op in _CONV_WEIGHT_INPUT and len(operand) < 2):
            unknown.append(node.name or f"{op}:{node.output[0]}")
            continue
        if op in _CONV_WEIGHT_INPUT:
            k = math.prod(operand[1:])  # C_in/group * prod(kernel)
        elif op == "Gemm":
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            k = operand[0] if trans_a else operand[-1]
        else:
            k = operand[-1]
        macs = math.prod(out) * k
        by_op[op] = by_op.get(op, 0) + macs
        counted += 1
    total = sum(by_op.values())
    return {"flops": 2 * total, "macs": total, "by_op": by_op, "nodes_counted": counted,
            "nodes_unknown": unknown}


def _is_matmul_like(op: str) -> bool:
    return any(key in op for key in ("MatMul", "Gemm", "Conv"))


def op_time_shares(session_path: str | Path, feed: dict[str, np.ndarray], runs: int = 3, threads: int = 1) -> dict:
    """Share of kernel time per op type, from ONNX Runtime's profiler (the warm-up call excluded).

    Why: says whether a model is bound by its matrix products (so the matmul peak is the ceiling) or by
    the glue around them (LayerNorm, Softmax, transposes, ...).
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "ort_profile")
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(session_path), so, providers=["CPUExecutionProvider"])
        for _ in range(1 + runs):
            sess.run(None, feed)
        profile = Path(sess.end_profiling())
        events = json.loads(profile.read_text())
        profile.unlink(missing_ok=True)

    run_starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    t_min = run_starts[1] if len(run_starts) > 1 else 0  # skip the warm-up run's kernels
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= t_min:
            op = e.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + float(e.get("dur", 0))
    total = sum(per_op.values())
    if total <= 0:
        return {"by_op": [], "matmul_share": 0.0, "other_share": 1.0, "kernel_ms_per_call": 0.0}
    by_op = sorted(((op, us / total) for op, us in per_op.items()), key=lambda x: -x[1])
    matmul = sum(share for op, share in by_op if _is_matmul_like(op))
    return {"by_op": by_op, "matmul_share": matmul, "other_share": 1.0 - matmul,
            "kernel_ms_per_call": total / max(1, runs) / 1000.0}
