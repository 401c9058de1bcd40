"""How the factorised volumes are best read on this processor: forward + backward time of one VM plane read by
`embedding_bag` with each of dfield's backward kernels (one `index_add_`, or one sparse-matrix product: what
`dfield.fields.vm.gather_backward` chooses between at run time), by `embedding_bag` with PyTorch's own backward,
and by `grid_sample` (what TensoRF does), side by side in one process, alternating, for the sizes training uses.

    .venv/bin/python bench/gather_paths.py [--threads 2] [--points 60000 200000] [--channels 16 48] [--res 128]

Prints milliseconds per read (median of --repeats) and the ratio to the fastest, and writes the rows to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfield.fields import vm
from dfield.fields.vm import _bilinear_rows, _GatherRows

REPO = Path(__file__).resolve().parents[1]


def read_embedding_bag(table, rows, w, kernel: str | None):
    """kernel: one of dfield's backward kernels (vm.BACKWARDS), or None for embedding_bag's own backward."""
    if kernel is not None:
        vm._chosen["cpu"] = kernel
        return _GatherRows.apply(table, rows, w)
    return F.embedding_bag(rows, table, per_sample_weights=w, mode="sum")


def read_grid_sample(image, u):
    """image (1, C, H, W); u (N, 2) in [0, 1] over (H, W) -> (N, C), bilinear, corners on the grid nodes."""
    grid = torch.stack([u[:, 1], u[:, 0]], -1) * 2 - 1  # grid_sample's x is the width axis
    return F.grid_sample(image, grid.view(1, -1, 1, 2), mode="bilinear", align_corners=True)[0, :, :, 0].T


def time_one(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--points", type=int, nargs="+", default=[60000, 200000])
    ap.add_argument("--channels", type=int, nargs="+", default=[16, 48])
    ap.add_argument("--res", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/gather_paths.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows_out = []
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    print(f"{cpu}, torch {torch.__version__}, {args.threads} threads, plane {args.res}x{args.res}")
    for c in args.channels:
        for n in args.points:
            r = args.res
            table = (0.1 * torch.randn(r * r, c, generator=g)).requires_grad_()
            image = table.detach().T.reshape(1, c, r, r).contiguous().requires_grad_()
            u = torch.rand(n, 2, generator=g)
            grad = torch.randn(n, c, generator=g)
            rows, w = _bilinear_rows(u, r, r)

            def eb(kernel):
                def run():
                    table.grad = None
                    read_embedding_bag(table, rows, w, kernel).backward(grad)
                return run

            def gs():
                image.grad = None
                read_grid_sample(image, u).backward(grad)

            # The paths compute the same values (checked), then are timed round-robin so drift hits all alike.
            ref = read_embedding_bag(table, rows, w, None).detach()
            assert torch.allclose(read_grid_sample(image, u).detach(), ref, atol=1e-5)
            paths = {"embedding_bag + index_add backward": eb("index_add"),
                     "embedding_bag + sparse backward": eb("sparse"), "embedding_bag, stock backward": eb(None),
                     "grid_sample": gs}
            for fn in paths.values():
                fn()  # warm-up
            times = {k: [] for k in paths}
            for _ in range(args.repeats):
                for k, fn in paths.items():
                    times[k].append(time_one(fn, 1))
            med = {k: statistics.median(v) * 1000 for k, v in times.items()}
            best = min(med.values())
            for k, ms in med.items():
                print(f"  C={c:3d} N={n:7d}  {k:34s} {ms:8.2f} ms  ({ms / best:.2f}x the fastest)")
                rows_out.append({"channels": c, "points": n, "path": k, "ms": ms, "ratio_to_fastest": ms / best})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu, "torch": torch.__version__, "threads": args.threads, "res": args.res,
                                    "rows": rows_out}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
