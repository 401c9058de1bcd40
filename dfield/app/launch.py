"""`dfield train|resume|eval|render ... --nproc N`: N local worker processes that form one torch.distributed job,
started with the environment torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), so the command's code runs the same way under either.

Each worker calls the same API function; rank 0 prints and returns its result to the caller. The first worker
that fails stops the others, and its error is raised here, so a user error is still one line on the CLI.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import sys
import warnings
from collections.abc import Callable
from typing import Any

from dfield.core import ranks
from dfield.errors import RunError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for the job's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable, args: tuple, kwargs: dict, env: dict, results) -> None:
    os.environ.update(env)
    rank = int(env["RANK"])
    if rank > 0:  # rank 0 speaks for the job
        sys.stdout = open(os.devnull, "w")
        warnings.simplefilter("ignore")
    try:
        out = fn(*args, **kwargs)
        results.put((rank, None, out if rank == 0 else None))
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the launcher, which re-raises it
        try:
            pickle.dumps(e)
            err = e
        except Exception:  # noqa: BLE001
            err = RuntimeError(f"{type(e).__name__}: {e}")
        results.put((rank, err, None))


def launch(fn: Callable[..., Any], nproc: int, *args, **kwargs) -> Any:
    """Run `fn(*args, **kwargs)` in `nproc` new local processes forming one torch.distributed job; returns rank 0's
    result, or raises the first error a worker raised (the others are stopped).

    Example:
        >>> launch(api.train, 2, cfg, Path("runs/toy"))   # what `dfield train ... --nproc 2` does  # doctest: +SKIP
    """
    if nproc < 1:
        raise RunError(f"--nproc must be at least 1, got {nproc}")
    if ranks.launched_world() > 1:
        raise RunError("already one of several processes (torchrun?): start either with torchrun or with --nproc, "
                       "not both")
    ctx = mp.get_context("spawn")  # fresh interpreters: a forked torch (threads, locks) is not safe
    results = ctx.Queue()
    port = str(free_port())
    procs = []
    for r in range(nproc):
        env = {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
               "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        p = ctx.Process(target=_worker, args=(fn, args, kwargs, env, results), name=f"dfield-rank{r}")
        p.start()
        procs.append(p)
    done: dict[int, Any] = {}
    try:
        while len(done) < nproc:
            try:
                rank, err, out = results.get(timeout=0.2)
            except queue.Empty:
                for r, p in enumerate(procs):
                    if r not in done and not p.is_alive() and p.exitcode not in (0, None):
                        raise RuntimeError(f"worker {r} of {nproc} died (exit code {p.exitcode})") from None
                continue
            if err is not None:
                raise err
            done[rank] = out
    finally:
        for p in procs:
            if p.is_alive() and len(done) < nproc:
                p.terminate()  # blocked in a collective with a worker that is gone
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    return done[0]
