"""Query latency on one view: the first query renders the view, a new query on it only decodes and softmaxes.

    python bench/query_speed.py --run RUN [--size 200] [--repeats 5]

Times (seconds, median of --repeats where repeated), on training view 0 rendered at --size px wide:
  first     render the view with its features + answer a query (empty cache)
  requery   a new click (new query set: embedding + negatives from cached clusters) answered on that view
  disk      the same view read back from RUN/cache by a fresh context (a new `dfield query` call) + a query
The query's own training views (click view, clustering views) are rendered before timing starts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfield.io.run import open_run
from dfield.query.builder import make_query
from dfield.query.context import QueryContext
from dfield.query.relevance import relevance
from dfield.query.spec import QuerySpec


def opaque_pixels(ctx: QueryContext, view: int, n: int) -> list[tuple[int, int]]:
    """`n` different opaque pixels of a training view to click on."""
    acc = ctx.train_view(view).acc
    ys, xs = torch.nonzero(acc > 0.5, as_tuple=True)
    pick = torch.linspace(0, len(xs) - 1, n).long()
    return [(int(xs[i]), int(ys[i])) for i in pick]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a run with a feature field")
    ap.add_argument("--size", type=int, default=200, help="width in pixels of the timed view")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "query_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="dfield_qspeed_"))
    try:
        run_dir = work / "run"  # a copy, so the timed render cache starts empty and the run is left as it was
        shutil.copytree(args.run, run_dir, ignore=shutil.ignore_patterns("cache", "query", "renders"))
        ctx = QueryContext(open_run(run_dir))
        cams = ctx.train_cameras.scaled(args.size / ctx.train_cameras.width)
        clicks = opaque_pixels(ctx, 0, args.repeats + 1)
        q = make_query(ctx, QuerySpec(click=(0, *clicks[0])))  # clusters and the click view: before timing
        first = timed(lambda: relevance(ctx, q, cams, views=[0]))
        requery = [timed(lambda c=c: relevance(ctx, make_query(ctx, QuerySpec(click=(0, *c))), cams, views=[0]))
                   for c in clicks[1:]]
        fresh = QueryContext(open_run(run_dir))
        make_query(fresh, QuerySpec(click=(0, *clicks[0])))
        disk = timed(lambda: relevance(fresh, q, cams, views=[0]))
        assert fresh.cache.renders == 0, "the timed view should come from the disk cache"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {"run": str(args.run), "size": [cams.width, cams.height], "threads": args.threads,
           "first_s": first, "requery_s": statistics.median(requery), "requery_all_s": requery, "disk_s": disk}
    print(f"{cams.width}x{cams.height} view, {args.threads} thread(s): first query (render) {first:.2f} s, "
          f"new query on the rendered view {res['requery_s']:.3f} s (median of {len(requery)}), "
          f"from the disk cache {disk:.3f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
