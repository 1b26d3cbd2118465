"""Data parallelism on PyTorch's own engine: rank, world, process-group setup and gather helpers.

`torchrun --nproc_per_node N -m diffutext ...` starts N copies of a command with RANK, WORLD_SIZE
and LOCAL_RANK in the environment; `setup(device)` then joins the process group (gloo on CPU,
NCCL on CUDA, each rank on its own GPU). Without those variables, or with one process, every
helper here is a no-op, so the engine runs unchanged from one CPU to many GPUs. Rank 0 alone
writes files and reports; the others compute their share and meet it in the collectives.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 without torchrun), read without touching the process group."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def env_rank() -> int:
    """RANK as torchrun sets it (0 without torchrun), read without touching the process group."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the process group when torchrun started more than one process; return this rank's device.

    CUDA ranks each take GPU LOCAL_RANK (so `--device cuda` means "one GPU per process").
    An already initialised group (a test, a caller) is used as it is.
    """
    if device.type == "cuda" and (env_world_size() > 1 or active()):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if env_world_size() > 1 and not active():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return device


def shutdown() -> None:
    """Leave the process group (at the end of a command)."""
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """rank src's obj on every rank (picklable objects)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def all_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over ranks (one collective; the tensor is averaged in place and returned)."""
    if active():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= world()
    return values


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over ranks (one collective, in place; the tensor itself without torchrun)."""
    if active():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def main_first(fn: Callable[[], T], error: type[Exception] = ValueError) -> T:
    """Run fn on rank 0 only and hand its result to every rank; if it raises, every rank raises
    the same kind of error with the same message (instead of the others waiting forever)."""
    if not active():
        return fn()
    result, failure = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # re-raised on every rank below
            failure = (type(e), str(e))
    result, failure = broadcast_object((result, failure))
    if failure is not None:
        kind, message = failure
        try:
            exc = kind(message) if isinstance(kind, type) and issubclass(kind, Exception) else error(message)
        except TypeError:  # an exception type that takes other arguments
            exc = error(message)
        raise exc
    return result
