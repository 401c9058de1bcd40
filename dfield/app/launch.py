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
import time
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


def _dead(procs, done: dict, errors: dict) -> dict[int, int]:
    """Workers that exited with an error code without reporting anything: rank -> exit code."""
    return {r: p.exitcode for r, p in enumerate(procs)
            if r not in done and r not in errors and not p.is_alive() and p.exitcode not in (0, None)}


def _echo(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another worker is gone (not a cause of its own)."""
    text = f"{type(e).__name__} {e}"
    return any(k in text for k in ("DistBackendError", "Connection closed by peer", "Connection reset by peer",
                                   "gloo/transport", "NCCL", "Broken pipe"))


def _cause(errors: dict[int, BaseException], dead: dict[int, int], nproc: int) -> BaseException:
    own = [errors[r] for r in sorted(errors) if not _echo(errors[r])]
    if own:
        return own[0]
    if dead:
        r = min(dead)
        return RuntimeError(f"worker {r} of {nproc} died (exit code {dead[r]})")
    return errors[min(errors)]


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
    errors: dict[int, BaseException] = {}

    def collect(timeout: float | None) -> None:
        while True:
            try:
                rank, err, out = results.get(timeout=timeout) if timeout else results.get_nowait()
            except queue.Empty:
                return
            (errors if err is not None else done)[rank] = err if err is not None else out
            timeout = None

    try:
        failed_at = None
        while len(done) < nproc:
            collect(0.2)
            if (errors or _dead(procs, done, errors)) and failed_at is None:
                failed_at = time.monotonic()
            # A failure in one worker makes the others fail in their next collective: give them a moment to report,
            # then name the cause (a worker's own error, or one that died without a word) rather than the echoes.
            settled = all(r in done or r in errors or not p.is_alive() for r, p in enumerate(procs))
            if settled:
                collect(None)  # what the workers sent just before they exited
            if failed_at is not None and (settled or time.monotonic() - failed_at > 3.0):
                raise _cause(errors, _dead(procs, done, errors), nproc)
            if settled and len(done) < nproc and not errors:
                gone = [r for r in range(nproc) if r not in done]
                raise RuntimeError(f"worker {gone[0]} of {nproc} exited without a result")
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
