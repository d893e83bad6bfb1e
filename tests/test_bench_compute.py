"""tools/bench/compute.py: FLOPs counted from ONNX graphs, one-core matmul peaks, ORT op time shares."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "bench"))
import compute  # noqa: E402


def _init(name: str, shape: list[int], dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(0).standard_normal(shape).astype(dtype), name)


def _save(tmp_path: Path, nodes, inputs, outputs, inits, name: str = "g.onnx", opsets=None) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=opsets or [helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _conv_matmul_gemm(tmp_path: Path, batch: int | str) -> Path:
    """X[b,1,8,8] -Conv(4x1x2x2, stride 2)-> [b,4,4,4] -Reshape(-1,16)-> [4b,16] -MatMul(16x10)-> [4b,10]
    -Reshape(-1,40)-> [b,40] -Gemm(B=[3,40], transB)-> [b,3]."""
    nodes = [
        helper.make_node("Conv", ["X", "Wc"], ["c"], strides=[2, 2], name="conv"),
        helper.make_node("Reshape", ["c", "s16"], ["r"], name="reshape16"),
        helper.make_node("MatMul", ["r", "Wm"], ["m"], name="matmul"),
        helper.make_node("Reshape", ["m", "s40"], ["f"], name="reshape40"),
        helper.make_node("Gemm", ["f", "Wg", "bg"], ["Y"], transB=1, name="gemm"),
    ]
    inits = [_init("Wc", [4, 1, 2, 2]), _init("Wm", [16, 10]), _init("Wg", [3, 40]), _init("bg", [3]),
             numpy_helper.from_array(np.array([-1, 16], np.int64), "s16"),
             numpy_helper.from_array(np.array([-1, 40], np.int64), "s40")]
    return _save(tmp_path, nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, 1, 8, 8])],
                 [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, 3])], inits)


@pytest.mark.parametrize("batch", [1, "N", 8])
def test_flops_hand_built_graph(tmp_path, batch):
    conv = (4 * 4 * 4) * (1 * 2 * 2)  # output [1,4,4,4] x (C_in/group=1) x (2*2 kernel) = 256
    matmul = (4 * 10) * 16  # output [4,10] x K=16 = 640
    gemm = (1 * 3) * 40  # output [1,3] x K=40 = 120
    got = compute.flops_per_sample(_conv_matmul_gemm(tmp_path, batch))
    assert got["by_op"] == {"Conv": conv, "MatMul": matmul, "Gemm": gemm}
    assert got["macs"] == conv + matmul + gemm == 1016
    assert got["flops"] == 2 * 1016
    assert got["nodes_counted"] == 3 and got["nodes_unknown"] == []


def test_flops_grouped_conv_and_trans_a(tmp_path):
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["c"], group=2, pads=[1, 1, 1, 1], name="gconv"),  # [1,6,5,5]
        helper.make_node("Reshape", ["c", "s"], ["r"]),  # [6,25]
        helper.make_node("Gemm", ["r", "B"], ["Y"], transA=1, name="gemm_ta"),  # A^T [25,6] @ [6,2] -> [25,2]
    ]
    inits = [_init("W", [6, 2, 3, 3]), _init("B", [6, 2]), numpy_helper.from_array(np.array([6, 25], np.int64), "s")]
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4, 5, 5])],
                 [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [25, 2])], inits)
    got = compute.flops_per_sample(path)
    assert got["by_op"] == {"Conv": (6 * 5 * 5) * (4 // 2) * (3 * 3), "Gemm": (25 * 2) * 6}


def test_flops_lists_nodes_with_unknown_shapes(tmp_path):
    """A MatMul fed by an op shape inference does not know is reported, not counted as 0 in silence."""
    nodes = [helper.make_node("Mystery", ["X"], ["t"], domain="custom.ops", name="mystery"),
             helper.make_node("MatMul", ["t", "W"], ["Y"], name="mm_after_custom")]
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 16])],
                 [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], [_init("W", [16, 4])],
                 opsets=[helper.make_opsetid("", 17), helper.make_opsetid("custom.ops", 1)])
    got = compute.flops_per_sample(path)
    assert got["nodes_unknown"] == ["mm_after_custom"]
    assert got["nodes_counted"] == 0 and got["macs"] == 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("dynamic", [True, False])
def test_flops_torch_exported_linear(tmp_path, dynamic):
    """Per image whether the batch is symbolic or fixed at 3 in the file (the output then says [3,7])."""
    import torch
    model = torch.nn.Sequential(torch.nn.Linear(12, 7)).eval()
    path = tmp_path / "linear.onnx"
    axes = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic else None
    torch.onnx.export(model, (torch.zeros(3, 12),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes=axes)
    got = compute.flops_per_sample(path)
    assert got["macs"] == 12 * 7 and got["flops"] == 2 * 12 * 7
    assert got["nodes_unknown"] == []


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_matmul_peak_ort(precision):
    got = compute.matmul_peak(precision, size=128, reps=2)
    assert got["available"] and got["precision"] == precision and got["size"] == 128 and got["threads"] == 1
    assert math.isfinite(got["gflops"]) and got["gflops"] > 0
    assert math.isfinite(got["gflops_median"]) and 0 < got["gflops_median"] <= got["gflops"]
    assert got["engine"] == {"fp32": "onnxruntime MatMul", "int8": "onnxruntime MatMulInteger"}[precision]


def test_matmul_peak_bf16_reports_either_way():
    import torch
    before = torch.get_num_threads()
    got = compute.matmul_peak("bf16", size=128, reps=2)
    assert torch.get_num_threads() == before  # the thread count is restored
    if got["available"]:
        assert math.isfinite(got["gflops"]) and got["gflops"] > 0
    else:
        assert got["why"]


def test_matmul_peak_rejects_unknown_precision():
    with pytest.raises(ValueError):
        compute.matmul_peak("fp64", size=8, reps=1)


def test_cpu_features_subset():
    feats = compute.cpu_features()
    assert set(feats) <= set(compute._FEATURES) and len(feats) == len(set(feats))


def test_op_time_shares(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a profile file left behind would show up here
    nodes = [helper.make_node("MatMul", ["X", "W"], ["m"]), helper.make_node("Relu", ["m"], ["r"]),
             helper.make_node("Softmax", ["r"], ["Y"], axis=-1)]
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [64, 64])],
                 [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [64, 64])], [_init("W", [64, 64])])
    feed = {"X": np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)}
    got = compute.op_time_shares(path, feed, runs=3)
    shares = dict(got["by_op"])
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
    assert [s for _, s in got["by_op"]] == sorted(shares.values(), reverse=True)
    assert 0.0 <= got["matmul_share"] <= 1.0
    assert got["other_share"] == pytest.approx(1.0 - got["matmul_share"])
    assert "MatMul" in shares and got["kernel_ms_per_call"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx"]
