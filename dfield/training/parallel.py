"""Data-parallel training on torch.distributed: the ray streams each process draws, and the gradient average.

**The batch rule.** `--batch-rays B` is the batch of one optimiser step over all processes. It is split into S
random ray *streams* (S = `--ray-streams`, by default the number of processes the run starts with), stream k
drawing b_k = B/S rays (the first B mod S streams one more) from its own generators, and the processes share the
streams out (stream k goes to process k mod N). So the effective batch is B whatever N is, and learning rates,
iterations and every step of the grid's schedule mean what they mean in one process: N processes take the same
steps, each computing 1/N of every step's rays. To use more processes for a bigger batch instead of faster steps,
raise `--batch-rays` yourself.

**The gradient.** Each process's loss is sum_k (b_k / B) loss_k over its streams plus the model's regulariser / N,
and the gradients are summed over processes with one all-reduce per step (with the logged loss figures packed into
the same buffer), which gives exactly the gradient of the whole batch: a step with N processes is the step one
process takes on the union of their rays (`tests/test_parallel.py` checks it to float tolerance). This is an
explicit all-reduce, not DistributedDataParallel: the grid model replaces its parameters when it upsamples and
when its box shrinks, and DDP registers its gradient hooks and buckets on the parameters it is built with (it would
have to be rebuilt at every such step), and it reduces only when the module's `forward` is called, while models
here render through `render_rays`.

**The same model everywhere.** Every process starts from the same seed and applies the same summed gradient, so
the parameters are bit-identical on every process, and the schedule (occupancy grid, box shrink, upsampling: a
deterministic function of the parameters and the step) gives the same result on each without communication. That
is checked whenever the parameters change shape and at every checkpoint (`same_model`): should processes ever
disagree (different CPUs across machines rounding differently), rank 0's model is copied to the others.

**Checkpoints** hold every stream's generator states, so a run resumed with any number of processes draws the same
rays as one that was never stopped (fewer processes than streams: a process takes several); a run resumed with
more processes than it has streams is widened to one stream per process.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dfield.core import ranks
from dfield.core.rays import RayBatcher
from dfield.data.dataset import Dataset

STREAM_SEED_STEP = 1_000_003  # stream k's generators are seeded with seed + k * this (stream 0: the run's seed)


@dataclass
class Stream:
    """One random ray stream: its batcher (pixels), its jitter generator (sample offsets, missed-ray draws), its
    index among the run's streams and its weight b_k / B in the step's loss."""

    index: int
    batcher: RayBatcher
    jitter: torch.Generator
    weight: float


def stream_sizes(batch: int, n_streams: int) -> list[int]:
    """Rays per stream: `batch` split as evenly as whole rays allow.

    Example:
        >>> stream_sizes(1024, 3)
        [342, 341, 341]
    """
    if n_streams < 1 or batch < n_streams:
        raise ValueError(f"cannot split a batch of {batch} rays over {n_streams} streams")
    return [batch // n_streams + (k < batch % n_streams) for k in range(n_streams)]


def streams_of(rank: int, world: int, n_streams: int) -> list[int]:
    """The streams process `rank` of `world` draws: k = rank, rank + world, ...

    Example:
        >>> streams_of(0, 2, 3), streams_of(1, 2, 3)
        ([0, 2], [1])
    """
    return list(range(rank, n_streams, world))


def make_streams(data: Dataset, batch: int, seed: int, n_streams: int, rank: int | None = None,
                 world: int | None = None) -> list[Stream]:
    """This process's streams of a run with `n_streams` streams splitting `batch` rays (see the module doc)."""
    rank = ranks.rank() if rank is None else rank
    world = ranks.world() if world is None else world
    if n_streams < world:
        raise ValueError(f"{n_streams} ray streams cannot feed {world} processes")
    sizes = stream_sizes(batch, n_streams)
    out = []
    for k in streams_of(rank, world, n_streams):
        s = seed + k * STREAM_SEED_STEP
        out.append(Stream(k, RayBatcher(data, sizes[k], seed=s), torch.Generator().manual_seed(s + 1), sizes[k] / batch))
    return out


def sum_over_processes(params: list[torch.Tensor], stats: torch.Tensor) -> torch.Tensor:
    """Sum every parameter's gradient and the `stats` vector over the job's processes, in one all-reduce; returns
    the summed stats. A parameter without a gradient on any process keeps none (Adam then skips it, as it would in
    one process); one with a gradient somewhere gets the sum, zeros standing in where it had none.

    Without a job this returns `stats` and leaves the gradients as they are.
    """
    if not ranks.active() or ranks.world() == 1:
        return stats
    device = params[0].device if params else stats.device
    parts, present = [], []
    for p in params:
        g = p.grad
        if g is not None and g.is_sparse:
            g = g.to_dense()
        present.append(1.0 if g is not None else 0.0)
        parts.append(g.reshape(-1).to(torch.float32) if g is not None else torch.zeros(p.numel(), device=device))
    flat = torch.cat(parts + [torch.tensor(present, device=device), stats.to(device, torch.float32)])
    dist.all_reduce(flat)
    flags = flat[sum(p.numel() for p in params): sum(p.numel() for p in params) + len(params)]
    o = 0
    for p, flag in zip(params, flags.tolist()):
        n = p.numel()
        p.grad = flat[o:o + n].view_as(p).to(p.dtype) if flag > 0 else None
        o += n
    return flat[-len(stats):].to(stats.device)


def model_digest(tensors: dict[str, torch.Tensor], structure: dict) -> str:
    """sha1 of a model's structure and tensors: equal on two processes exactly when their models are."""
    h = hashlib.sha1(repr(sorted(structure.items())).encode())
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def same_model(tensors: dict[str, torch.Tensor], structure: dict) -> bool:
    """Whether every process of the job holds this model (compared by `model_digest`); True without a job."""
    if not ranks.active() or ranks.world() == 1:
        return True
    digests = ranks.all_gather_object(model_digest(tensors, structure))
    return all(d == digests[0] for d in digests)


def gather_stream_states(streams: list[Stream]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Every stream's (batcher, jitter) generator states from every process, by stream index (a collective)."""
    mine = {s.index: (s.batcher.state(), s.jitter.get_state()) for s in streams}
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for part in ranks.all_gather_object(mine):
        out.update(part)
    return out
