"""Which process of a torch.distributed job this is, and the few collectives dfield uses.

`torchrun --nproc-per-node N -m dfield ...` and `dfield ... --nproc N` start N processes with the environment
torchrun defines (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT); `session` joins them
into one job (gloo on CPU, nccl on CUDA). Without an initialised process group every function here gives the
one-process answer (rank 0 of 1; collectives return their input), so callers need no second code path.

    with session("cpu") as device:          # joins the job when WORLD_SIZE > 1
        for i in share(n_views):            # this process's contiguous share of the views
            ...
        rows = all_gather_object(mine)      # every process's rows, in rank order
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist

from dfield.errors import RunError

T = TypeVar("T")


def active() -> bool:
    """Whether this process is part of an initialised torch.distributed job."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the job (0 without one)."""
    return dist.get_rank() if active() else 0


def world() -> int:
    """The number of processes in the job (1 without one)."""
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    """This process's rank among those on its machine (LOCAL_RANK; 0 without a job)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if active() else 0


def local_world() -> int:
    """How many of the job's processes run on this machine (LOCAL_WORLD_SIZE; 1 without a job)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(world()))) if active() else 1


def is_main() -> bool:
    """Whether this is rank 0: the one process that writes run files, logs and prints."""
    return rank() == 0


def launched_world() -> int:
    """WORLD_SIZE of the environment (set by torchrun or `--nproc`), whether or not the job is joined yet."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def share(n: int, r: int | None = None, w: int | None = None) -> range:
    """Rank `r`'s contiguous share of `n` items out of `w` ranks (default: this process of this job).

    Example:
        >>> [list(share(5, r, 2)) for r in range(2)]
        [[0, 1], [2, 3, 4]]
    """
    r, w = (rank() if r is None else r), (world() if w is None else w)
    return range(r * n // w, (r + 1) * n // w)


def _device() -> torch.device:
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every process of the job gets here (nothing without a job)."""
    if active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """`obj` of rank `src` on every process (pickled; for small things: settings, keys, shapes)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_device() if dist.get_backend() == "nccl" else None)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every process's `obj`, in rank order (pickled)."""
    if not active():
        return [obj]
    out: list = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def broadcast_flag(flag: bool, src: int = 0) -> bool:
    """Rank `src`'s `flag` on every process: decisions that must not differ between processes (stop now?)."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_device())
    dist.broadcast(t, src=src)
    return bool(t.item() > 0)


def main_first(fn: Callable[[], T], local: bool = False) -> T:
    """`fn()` on rank 0 (with `local`: on each machine's local rank 0) before every other process runs it: for work
    that fills a cache the others then read (decoded images, smoothed targets)."""
    first = (local_rank() if local else rank()) == 0
    if first:
        out = fn()
    barrier()
    if not first:
        out = fn()
    return out


@contextmanager
def session(device: str = "cpu", timeout_minutes: float = 30.0) -> Iterator[str]:
    """Join the torch.distributed job this process was started in when WORLD_SIZE > 1 and none is joined yet: gloo for
    `device` cpu, nccl for cuda (one GPU per local rank). Yields the device this process computes on (`cuda:R` for
    local rank R; `device` otherwise) and leaves the job at the end if it joined it here.

    On a CPU, a process of a job that does not set its thread count gets its machine's cores divided by the
    processes on that machine (torch's default, all cores in every process, makes them fight over each core).
    """
    joined = False
    if launched_world() > 1 and not active():
        cuda = str(device).startswith("cuda")
        if cuda:
            local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            if local >= gpus:  # nccl needs a GPU of its own per process
                raise RunError(f"{launched_world()} processes on CUDA need one GPU each, but process {local} on this "
                               f"machine has {gpus} GPU{'s' if gpus != 1 else ''} to pick from; use --nproc {gpus} "
                               "(--nproc-per-node with torchrun) or --device cpu")
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
        joined = True
        if not cuda and "OMP_NUM_THREADS" not in os.environ:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            torch.set_num_threads(max(1, cores // local_world()))
    try:
        if active() and dist.get_backend() == "nccl":
            yield f"cuda:{torch.cuda.current_device()}"
        else:
            yield device
    finally:
        if joined:
            dist.destroy_process_group()
