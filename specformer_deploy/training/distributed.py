"""torch.distributed plumbing for `train` under ``torchrun``: who am I, on which device, and
do all ranks agree?

Nothing here is home-made distribution: torchrun starts the processes and sets the usual
environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``...), the process group is
PyTorch's own (``gloo`` on CPU, ``nccl`` on GPUs) and the model is wrapped in
``DistributedDataParallel``. This module only adds what the training loop needs on top: the
rank's device, an agreement check on the options (multi-node runs start one command per node,
and a typo on one node must not silently train a different model), and the collectives that
keep metrics global and the power-iteration vectors identical on every rank.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["resolve_device", "DistContext", "DistributedConfigError", "init_distributed", "launched_by_torchrun",
           "per_rank_batch",
           "agree", "gather_objects", "all_reduce_sums", "sync_from_rank0", "broadcast_object", "shutdown",
           "elastic_restart_count"]


class DistributedConfigError(ValueError):
    """The ranks of a distributed run disagree, or the launch itself is inconsistent."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run; a single process is rank 0 of a world of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run directory, logs and shows progress."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def elastic_restart_count() -> int:
    """How many times torchrun has restarted this worker group (``--max-restarts``)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DistributedConfigError(f"torchrun variable {name}={value!r} is not an integer") from None


def init_distributed(device_name: str, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group torchrun prepared (or stay a single process) and pick the device.

    ``device_name`` is the ``--device`` option: ``auto`` takes GPU ``LOCAL_RANK`` when CUDA is
    present (backend ``nccl``), the CPU otherwise (backend ``gloo``).
    """
    if not launched_by_torchrun() or _env_int("WORLD_SIZE") == 1:
        return DistContext(device=resolve_device(device_name))
    world_size, rank, local_rank = _env_int("WORLD_SIZE"), _env_int("RANK"), _env_int("LOCAL_RANK")
    wants_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if device_name not in ("auto", "cpu", "cuda"):
        raise DistributedConfigError(f"under torchrun --device must be auto, cpu or cuda (each rank takes GPU "
                                     f"LOCAL_RANK), got {device_name!r}")
    if wants_cuda:
        count = torch.cuda.device_count()
        if count == 0:
            raise DistributedConfigError("--device cuda was asked for but no usable CUDA device is present; "
                                         "use --device cpu (gloo)")
        if local_rank >= count:
            raise DistributedConfigError(f"LOCAL_RANK {local_rank} has no GPU: this node has {count}; start at most "
                                         f"{count} processes per node (torchrun --nproc-per-node {count})")
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        store = _restart_store(world_size, timeout)
        extra: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
        if store is not None:
            extra.update(store=store, rank=rank, world_size=world_size)
        dist.init_process_group(backend=backend, timeout=timeout, **extra)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


def _restart_store(world_size: int, timeout: timedelta) -> dist.Store | None:
    """A key space of its own for a group that torchrun restarted (``--max-restarts``).

    torchrun shares its rendezvous TCPStore with the workers and keeps it across restarts, so
    the restarted group can read the addresses the dead group published and fail to connect
    ("Connection refused"; pytorch/pytorch#135712, #167288). Keys prefixed with the restart
    count keep each attempt's rendezvous apart. ``None``: the default store is fine.
    """
    restarts = elastic_restart_count()
    if restarts == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    client = dist.TCPStore(os.environ["MASTER_ADDR"], _env_int("MASTER_PORT"), world_size, is_master=False,
                           timeout=timeout)
    return dist.PrefixStore(f"/specformer_deploy/attempt_{restarts}", client)


def resolve_device(name: str) -> torch.device:
    """The device of a single-process run: ``auto`` prefers CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no usable CUDA device is present; use --device cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def per_rank_batch(global_batch: int, world_size: int, even: bool) -> int:
    """``--batch-size`` is the global batch: each rank takes an equal share of it, so a run's
    optimisation (and its learning rate) does not change with the number of processes."""
    if global_batch % world_size:
        raise DistributedConfigError(f"--batch-size {global_batch} is the global batch and must divide evenly over "
                                     f"{world_size} processes; use a multiple of {world_size}")
    share = global_batch // world_size
    if share < 1 or (even and share % 2):
        raise DistributedConfigError(f"--batch-size {global_batch} over {world_size} processes gives {share} images "
                                     "per process; Mixup/CutMix needs an even number per process: use a multiple of "
                                     f"{2 * world_size} or --no-mixup")
    return share


def broadcast_object(ctx: DistContext, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (pickled; for small objects and one-off state)."""
    if not ctx.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0, device=ctx.device if ctx.backend == "nccl" else None)
    return holder[0]


def agree(ctx: DistContext, options: dict[str, Any], error: str | None = None) -> None:
    """Raise the same clear error on every rank when their options differ or any rank failed.

    Called after each rank has set itself up: a rank whose setup failed (a missing data
    directory on one node, say) sends its message instead of leaving the others waiting in
    the first collective until the timeout.
    """
    if not ctx.distributed:
        if error:
            raise DistributedConfigError(error)
        return
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, {"options": options, "error": error})
    failed: dict[str, list[int]] = {}
    for rank, entry in enumerate(gathered):
        if entry["error"]:
            failed.setdefault(entry["error"], []).append(rank)
    if failed:
        if len(failed) == 1 and len(next(iter(failed.values()))) == ctx.world_size:
            raise DistributedConfigError(next(iter(failed)))  # every rank: the plain message
        raise DistributedConfigError("; ".join(f"rank {', '.join(map(str, ranks))}: {message}"
                                               for message, ranks in failed.items()))
    reference = gathered[0]["options"]
    differences = []
    for key in sorted(set().union(*(entry["options"].keys() for entry in gathered))):
        values = [entry["options"].get(key) for entry in gathered]
        if any(value != reference.get(key) for value in values):
            by_rank = ", ".join(f"rank {rank}={value!r}" for rank, value in enumerate(values))
            differences.append(f"{key} ({by_rank})")
    if differences:
        raise DistributedConfigError("the ranks of this run were started with different options; every node must "
                                     "run the same command: " + "; ".join(differences))


def gather_objects(ctx: DistContext, value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank; ``[value]`` alone."""
    if not ctx.distributed:
        return [value]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_sums(ctx: DistContext, values: Sequence[float]) -> list[float]:
    """Sum a few scalars over the ranks (float64, so counts and loss sums stay exact enough)."""
    if not ctx.distributed:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


@torch.no_grad()
def sync_from_rank0(ctx: DistContext, module: nn.Module, *, parameters: bool = False, copy: bool = True) -> float:
    """Return the largest difference any rank's buffers (and parameters) have from rank 0's
    (0.0: the replicas are identical) and, with ``copy``, replace them with rank 0's."""
    tensors = [b for b in module.buffers()] + ([p.data for p in module.parameters()] if parameters else [])
    if not ctx.distributed or not tensors:
        return 0.0
    drift = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for tensor in tensors:
        reference = tensor.detach().clone()
        dist.broadcast(reference, src=0)
        if tensor.is_floating_point():
            drift = torch.maximum(drift, (tensor.double() - reference.double()).abs().max())
        elif not torch.equal(tensor, reference):
            drift = torch.maximum(drift, torch.ones_like(drift))
        if copy:
            tensor.copy_(reference)
    dist.all_reduce(drift, op=dist.ReduceOp.MAX)
    return float(drift)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
