"""`train` under torchrun: 2 CPU processes (gloo) against 1 process, kills, and disagreements.

Every run here is started the way a user starts it (``torchrun ... -m specformer_deploy train``)
on the built-in digits. Tolerances: float32 sums taken in another order (a mean of two
per-rank means and an all-reduce instead of one mean over the batch) differ by about 1e-7 per
step, so after 3 epochs (132 steps) weights agree to 1e-5 and losses to 1e-6 relative.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specformer_deploy.training.distributed import DistributedConfigError, per_rank_batch
from specformer_deploy.training.train import TrainConfig, train

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# Standard training without Mixup: the run is then a deterministic function of the data order,
# which DistributedSampler splits without changing the global batches.
OPTIONS = {"epochs": 3, "batch_size": 32, "mixup": False, "warmup_epochs": 0, "lr": 0.05}
CLI_OPTIONS = ["--epochs", "3", "--batch-size", "32", "--no-mixup", "--warmup-epochs", "0", "--lr", "0.05"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun(args: list[str], out: Path, *, nproc: int = 2, extra: list[str] = (),
              log: Path | None = None) -> subprocess.Popen:
    """Start torchrun; its output goes to a log file (a pipe nobody reads would fill and block it)."""
    command = [*TORCHRUN, *args, f"--nproc-per-node={nproc}", "-m", "specformer_deploy", "train", *CLI_OPTIONS,
               *extra, "--out", str(out)]
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(log or out.with_suffix(".log"), "w")  # closed by _finish
    process = subprocess.Popen(command, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    process.log = log  # type: ignore[attr-defined]
    return process


def _finish(process: subprocess.Popen, timeout: float = 300) -> str:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    process.log.close()  # type: ignore[attr-defined]
    output = Path(process.log.name).read_text()  # type: ignore[attr-defined]
    if process.returncode is None or process.returncode == -signal.SIGKILL:
        pytest.fail(f"torchrun did not finish in {timeout}s:\n{output[-4000:]}")
    return output


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "one"
    train(TrainConfig(**OPTIONS), out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """Two torchrun 'nodes' of one process each, joined by the c10d rendezvous (the multi-node
    command of the README, on one host)."""
    root = tmp_path_factory.mktemp("ddp")
    out = root / "two"
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [_torchrun(["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=equivalence"],
                       out, nproc=1, log=root / f"node{node}.log") for node in range(2)]
    outputs = [_finish(node) for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-4000:]
    assert "distributed: 2 processes (gloo), 16 images per process per step, global batch 32" in "".join(outputs)
    return out


def test_global_batch_is_split_evenly_or_refused() -> None:
    assert per_rank_batch(32, 2, even=True) == 16
    assert per_rank_batch(30, 3, even=False) == 10
    with pytest.raises(DistributedConfigError, match="must divide evenly over 4 processes"):
        per_rank_batch(30, 4, even=False)
    with pytest.raises(DistributedConfigError, match="even number per process"):
        per_rank_batch(30, 2, even=True)


def test_two_processes_train_what_one_process_trains(one_process: Path, two_processes: Path) -> None:
    single, double = _metrics(one_process), _metrics(two_processes)
    assert [m["step"] for m in single] == [m["step"] for m in double] == [44, 88, 132]
    assert single[-1]["loss"] < single[0]["loss"]  # the weights move: two idle runs would agree trivially
    for a, b in zip(single, double):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["penalty"] == pytest.approx(a["penalty"], rel=1e-5)
        assert b["test_accuracy"] == a["test_accuracy"]
        for name in ("q", "k", "v", "o"):
            assert b["max_sigma"][name] == pytest.approx(a["max_sigma"][name], abs=1e-5)
        # Rank 1's weights and power-iteration vectors equal rank 0's at every epoch end.
        assert b["replicas"] == {"world_size": 2, "max_weight_drift": 0.0, "max_vector_drift": 0.0}
        assert "replicas" not in a
    assert _max_diff(load_file(str(one_process / "model.safetensors")),
                     load_file(str(two_processes / "model.safetensors"))) < 1e-5
    assert _max_diff(load_file(str(one_process / "msvp_vectors.safetensors")),
                     load_file(str(two_processes / "msvp_vectors.safetensors"))) < 1e-4
    def recorded(run: Path) -> dict:
        return json.loads((run / "config.json").read_text())["distributed"]

    assert recorded(one_process) == {"world_size": 1, "backend": None}
    assert recorded(two_processes) == {"world_size": 2, "backend": "gloo"}
    # Rank 0 alone wrote the run directory: no stray temporary files from another rank.
    assert sorted(p.name for p in two_processes.iterdir()) == sorted(p.name for p in one_process.iterdir())


def _worker_pids(parent: int) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes (Linux /proc)."""
    workers: dict[int, int] = {}
    for task in Path(f"/proc/{parent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for entry in environ:
                if entry.startswith(b"RANK="):
                    workers[int(entry[5:])] = int(pid)
    return workers


def test_killed_rank_is_restarted_by_torchrun_and_resumes(two_processes: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    process = _torchrun(["--standalone", "--max-restarts=1", "--monitor-interval=0.2"], out)
    deadline = time.monotonic() + 240
    killed = None
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "metrics.jsonl").is_file() and _metrics(out) and len(_metrics(out)) < OPTIONS["epochs"]:
            workers = _worker_pids(process.pid)
            if 1 in workers:
                os.kill(workers[1], signal.SIGKILL)
                killed = len(_metrics(out))
                break
        time.sleep(0.05)
    output = _finish(process)
    assert killed is not None, f"the run ended before rank 1 could be killed:\n{output[-3000:]}"
    assert process.returncode == 0, output[-4000:]
    assert f"resuming {out} at epoch {killed + 1}/3 after a torchrun restart" in output
    # The restarted group replays the lost epoch exactly: the result is the uninterrupted run's.
    assert _max_diff(load_file(str(out / "model.safetensors")),
                     load_file(str(two_processes / "model.safetensors"))) == 0
    assert _max_diff(load_file(str(out / "msvp_vectors.safetensors")),
                     load_file(str(two_processes / "msvp_vectors.safetensors"))) == 0
    assert [m["loss"] for m in _metrics(out)] == [m["loss"] for m in _metrics(two_processes)]


def test_nodes_started_with_different_options_refuse_to_train(tmp_path: Path) -> None:
    """Two torchrun 'nodes' on this host (multi-node rendezvous); the second has another --lr."""
    port = _free_port()
    out = tmp_path / "mismatch"
    nodes = []
    for rank, lr in ((0, "0.05"), (1, "0.01")):
        args = ["--nnodes=2", f"--node-rank={rank}", "--master-addr=127.0.0.1", f"--master-port={port}"]
        nodes.append(_torchrun(args, out, nproc=1, extra=["--lr", lr]))
    outputs = [_finish(node) for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode != 0, output[-3000:]
        assert "started with different options" in output, output[-3000:]
        assert "lr (rank 0=0.05, rank 1=0.01)" in output, output[-3000:]
    assert not (out / "config.json").exists()  # nothing was written


def test_compiled_model_under_ddp_trains_what_eager_trains(one_process: Path, tmp_path: Path) -> None:
    """--compile (torch.compile, inductor on CPU) inside DDP: same run up to kernel rounding."""
    out = tmp_path / "compiled"
    process = _torchrun(["--standalone"], out, extra=["--compile"])
    output = _finish(process, timeout=600)
    assert process.returncode == 0, output[-4000:]
    eager, compiled = _metrics(one_process), _metrics(out)
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["replicas"]["max_weight_drift"] == 0.0
    # The run directory holds the plain module's weights (no torch.compile `_orig_mod.` prefix).
    assert _max_diff(load_file(str(one_process / "model.safetensors")),
                     load_file(str(out / "model.safetensors"))) < 1e-3
