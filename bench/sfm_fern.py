"""Structure from motion on LLFF fern against its provided poses: registration, pose accuracy, time.

    python bench/sfm_fern.py                                  # process images_8 into /tmp/fern_sfm, then compare
    python bench/sfm_fern.py --scene /tmp/fern_sfm --no-process  # compare an already processed scene

Runs what `dfield process-images ../shared/data/llff_fern/images_8 --out SCENE` runs (timed), reads the poses it
wrote (SCENE/sparse/0, any frame) and fern's poses_bounds.npy (LLFF axes, read as dfield's LLFF reader does),
pairs them by image name, aligns the SfM camera centres to the provided ones by a similarity (Umeyama), and
reports per camera: centre error as a fraction of the scene extent (two extents: the largest distance between two
provided camera centres, and the scene's depth, the largest far bound of poses_bounds.npy) and rotation error in
degrees. Targets (issue 19): all 20 register, centres within 2 % of the extent, rotations within 2 degrees.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dfield.data.alignment import pose_errors
from dfield.data.colmap import c2w_opengl, read_images
from dfield.data.images import list_images
from dfield.data.llff import read_poses_bounds
from dfield.io.capture import CaptureOptions, process_images
from dfield.io.sfm import SfmOptions

DEFAULT_DATA = REPO.parent / "shared/data/llff_fern"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="LLFF scene with poses_bounds.npy")
    p.add_argument("--images", default="images_8", help="image folder of --data to process")
    p.add_argument("--scene", type=Path, default=Path("/tmp/fern_sfm"), help="processed scene folder")
    p.add_argument("--no-process", dest="process", action="store_false", help="only compare an existing --scene")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/sfm_fern.json")
    args = p.parse_args(argv)

    summary, seconds = None, None
    if args.process:
        t = time.perf_counter()
        summary = process_images(args.data / args.images, args.scene, CaptureOptions(sfm=SfmOptions(threads=args.threads)),
                                 overwrite=True)
        seconds = time.perf_counter() - t
    else:
        summary = json.loads((args.scene / "sfm.json").read_text())

    ref_c2w, bounds, _ = read_poses_bounds(args.data / "poses_bounds.npy")
    ref_names = [q.name for q in list_images(args.data / args.images)]
    images = read_images(args.scene / "sparse" / "0" / "images.txt")
    est = {im.name: c2w_opengl(im.qvec, im.tvec) for im in images.values()}
    names = [n for n in ref_names if n in est]
    idx = [ref_names.index(n) for n in names]
    e = pose_errors(np.stack([est[n] for n in names]), ref_c2w[idx])
    depth = float(bounds.max())  # the provided poses' units: the farthest far bound
    res = {
        "registered": len(names), "images": len(ref_names), "missing": [n for n in ref_names if n not in est],
        "position_error_rel_camera_extent": {"max": float(e["position_error_rel"].max()),
                                             "mean": float(e["position_error_rel"].mean())},
        "position_error_rel_scene_depth": {"max": float(e["position_error"].max() / depth),
                                           "mean": float(e["position_error"].mean() / depth)},
        "rotation_error_deg": {"max": float(e["rotation_error_deg"].max()), "mean": float(e["rotation_error_deg"].mean())},
        "camera_extent": e["extent"], "scene_depth": depth, "similarity_scale": e["scale"],
        "mean_reprojection_error_px": summary.get("mean_reprojection_error_px"),
        "process_seconds": seconds, "sfm_seconds": summary.get("seconds"),
        "per_image": {n: {"position_error_rel_camera_extent": float(a), "rotation_error_deg": float(b)}
                      for n, a, b in zip(names, e["position_error_rel"], e["rotation_error_deg"])},
        "scene": str(args.scene), "format": summary.get("format"), "scene_type": summary.get("scene_type"),
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
    }
    try:
        res["machine"]["cpu"] = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ok = (len(names) == len(ref_names) and res["position_error_rel_camera_extent"]["max"] <= 0.02
          and res["rotation_error_deg"]["max"] <= 2.0)
    res["targets_met"] = ok
    print(f"registered       {len(names)} of {len(ref_names)}" + (f" (missing {', '.join(res['missing'])})" if res["missing"] else ""))
    print(f"camera centres   max {100 * res['position_error_rel_camera_extent']['max']:.2f} % / mean "
          f"{100 * res['position_error_rel_camera_extent']['mean']:.2f} % of the camera extent; max "
          f"{100 * res['position_error_rel_scene_depth']['max']:.3f} % of the scene depth")
    print(f"rotations        max {res['rotation_error_deg']['max']:.3f} deg / mean {res['rotation_error_deg']['mean']:.3f} deg")
    print(f"reprojection     {res['mean_reprojection_error_px']} px mean")
    if seconds is not None:
        print(f"time             {seconds:.1f} s for process-images (stages: {summary['seconds']})")
    print(f"targets (all register, < 2 %, < 2 deg): {'met' if ok else 'NOT met'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
