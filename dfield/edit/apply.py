"""`apply_edits`: what `dfield edit` does. An edit spec applied to a run, rendered along test views or an orbit
beside the original, scored for locality (and, on generated scenes, each edit's selection against ground truth),
optionally meshed; everything written to one output folder with edit.json."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from dfield.core.camera_paths import orbit_path
from dfield.core.image_rendering import ndc_of
from dfield.edit.build import build_edited, mesh_box
from dfield.edit.guided import guided_layer
from dfield.edit.locality import best_object, json_number, locality, object_overlaps, render_pair, untouched_mask
from dfield.edit.mesh import field_mesh
from dfield.edit.spec import load_spec
from dfield.io.atomic import atomic_write_text
from dfield.io.export import save_mesh_ply, save_png, save_video
from dfield.io.run import load_eval_data, open_run


def apply_edits(run: Path, spec: Path, out: Path | None = None, path: str = "test", frames: int = 48, every: int = 1,
                video: bool = True, export_mesh: bool = False, mesh_resolution: int = 192, mesh_opacity: float = 0.5,
                device: str = "cpu", progress: Callable[[str, int, int, dict | None], None] | None = None) -> dict:
    """Apply the edit spec file `spec` to the run folder `run` and render it along `path` ("test": every
    `every`-th test view, scored against ground truth on generated scenes; "orbit": `frames` views) into `out`
    (default RUN/edits/SPEC_NAME): edited_NNN.png beside original_NNN.png, touched_NNN.png, edited.mp4, mesh.ply
    when asked, and edit.json with the figures, which are also returned (plus `out`).

    Nothing is written when the spec or the run is bad: everything is validated and built before the first file.
    `progress("edit PATH", views_done, views, None)` is called after each rendered view.

    Example:
        >>> s = apply_edits("runs/toy", "delete.json")                # doctest: +SKIP
        >>> s["locality_psnr_min"], s["selections"]                   # doctest: +SKIP
    """
    t0 = time.perf_counter()
    edits = load_spec(spec)
    r = open_run(run, device)
    edited = build_edited(r, edits, device, guided=lambda run_, field, e, below: guided_layer(
        run_, field, e, below, device=device, progress=progress))
    ids, names = None, r.scene.object_names
    if path == "test":
        data = load_eval_data(r.cfg, "test", every)
        cams, ids = data.cameras, data.object_ids
    else:
        cams = orbit_path(r.scene.train_cameras(), frames)
    mesh = None
    if export_mesh:  # before any file is written: a mesh that cannot be made must not leave half an output
        mesh = field_mesh(edited.field, mesh_box(edited), mesh_resolution, mesh_opacity)
    out = Path(out) if out is not None else Path(run) / "edits" / Path(spec).stem
    out.mkdir(parents=True, exist_ok=True)
    build_s = time.perf_counter() - t0
    rows, frames_rgb, overlaps = [], [], {}
    t1 = time.perf_counter()
    for i in range(len(cams)):
        pair = render_pair(edited, cams, i, ndc_of(r.scene), device=device)
        rows.append({"view": i, **{k: json_number(v) for k, v in locality(pair).items()}})
        save_png(out / f"edited_{i:03d}.png", pair["rgb"])
        save_png(out / f"original_{i:03d}.png", pair["base_rgb"])
        save_png(out / f"touched_{i:03d}.png", (~untouched_mask(pair["touched"])).float())
        frames_rgb.append(pair["rgb"])
        if ids is not None:
            for k in (k for k in pair if k.startswith("sel")):
                object_overlaps(pair[k] > 0.5, ids[i], overlaps.setdefault(int(k[3:]), {}))
        if progress is not None:
            progress(f"edit {path}", i + 1, len(cams), None)
    render_s = time.perf_counter() - t1
    if video and len(frames_rgb) > 1:
        save_video(out / "edited.mp4", frames_rgb, fps=24 if path == "orbit" else 4)
    finite = [row["psnr_outside"] for row in rows if row["psnr_outside"] != "inf"]
    summary = {
        "run": str(run), "spec": str(spec), "edits": [e.op for e in edits], "views": len(rows), "path": path,
        "locality_psnr_min": json_number(min(finite) if finite else float("inf")),
        "locality_max_abs_diff": max(row["max_abs_diff_outside"] for row in rows),
        "build_seconds": build_s, "render_seconds_per_view": render_s / max(1, len(rows)), "per_view": rows,
    }
    if overlaps:
        summary["selections"] = {f"edit {k} ({edits[k].op})": best_object(v, names) for k, v in overlaps.items()}
    if mesh is not None:
        save_mesh_ply(out / "mesh.ply", *mesh)
        summary["mesh"] = {"file": str(out / "mesh.ply"), "vertices": len(mesh[0]), "faces": len(mesh[1])}
    atomic_write_text(out / "edit.json", json.dumps(summary, indent=1))
    return {**summary, "out": str(out)}
