"""What a run folder holds, in one dict: data, model, teacher, steps, time, metrics, edits and viewer output
(`dfield info RUN` prints it). Reads only small JSON files, never the weights."""

from __future__ import annotations

import json
from pathlib import Path

from dfield.errors import RunError
from dfield.io.checkpoint import latest_checkpoint


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_log(path: Path) -> dict | None:
    if not path.is_file():
        return None
    last = None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    last = json.loads(line)
                except ValueError:  # a line cut short by a kill
                    pass
    return last


def run_summary(path) -> dict:
    """A run folder's contents: data, model, teacher, checkpoint step, training log tail, evaluation figures,
    distillation, edits and viewer files. RunError when `path` is not a run."""
    path = Path(path)
    cfg = _json(path / "config.json")
    scene = _json(path / "scene.json")
    if cfg is None or scene is None:
        raise RunError(f"{path}: not a dfield run folder (config.json or scene.json missing or unreadable)")
    ckpt = latest_checkpoint(path / "checkpoints") if (path / "checkpoints").is_dir() else None
    meta = _json(ckpt / "meta.json") if ckpt is not None else None
    features = (meta or {}).get("features") or cfg.get("features") or {}
    out = {
        "run": str(path),
        "data": {"path": cfg.get("data", {}).get("path"), "format": scene.get("format"),
                 "train_views": len(scene.get("train_c2w", [])), "size": [scene.get("width"), scene.get("height")],
                 "ndc": scene.get("ndc", False), "objects": scene.get("object_names") or None},
        "model": cfg.get("model"),
        "iterations": cfg.get("iterations"),
        "checkpoint": None if ckpt is None else {"path": str(ckpt), "step": (meta or {}).get("step")},
        "checkpoints": len([p for p in (path / "checkpoints").glob("step_*")]) if (path / "checkpoints").is_dir() else 0,
        "teacher": features.get("teacher") or None,
        "feature_dim": features.get("dim") if features.get("teacher") else None,
        "log": _last_log(path / "log.jsonl"),
        "eval": _json(path / "eval.json"),
        "distill": _json(path / "distill.json"),
        "edits": sorted(str(p.relative_to(path)) for p in (path / "edits").glob("*/edit.json"))
        if (path / "edits").is_dir() else [],
        "viewer": sorted(str(p.relative_to(path)) for p in (path / "viewer").glob("*") if p.is_file())
        if (path / "viewer").is_dir() else [],
    }
    return out


def format_summary(s: dict) -> str:
    """The summary as the screen `dfield info` prints."""
    d = s["data"]
    lines = [f"run        {s['run']}",
             f"data       {d['path']} ({d['format'] or '?'}, {d['train_views']} training views, "
             f"{d['size'][0]}x{d['size'][1]}{', NDC' if d['ndc'] else ''})"]
    if d["objects"]:
        lines.append(f"objects    {', '.join(str(v) for v in d['objects'].values())}")
    ck = s["checkpoint"]
    lines.append(f"model      {s['model']}, step {ck['step'] if ck else 'none'} of {s['iterations']}"
                 f" ({s['checkpoints']} checkpoint{'s' if s['checkpoints'] != 1 else ''} kept)")
    log = s["log"]
    if log:
        lines.append(f"training   {log.get('seconds', 0):.0f} s, last batch PSNR {log.get('psnr', float('nan')):.2f} dB")
    lines.append(f"features   {s['teacher']} ({s['feature_dim']}-d field)" if s["teacher"] else "features   none")
    ev = s["eval"]
    if ev:
        m = ev.get("mean", ev)
        figs = [f"{k} {m[k]:.4g}" for k in ("psnr", "ssim", "lpips") if isinstance(m.get(k), (int, float))]
        seg = ev.get("segmentation") or {}
        if isinstance(seg.get("field_miou"), (int, float)):
            figs.append(f"3D mIoU {seg['field_miou']:.3f}")
        lines.append(f"eval       {', '.join(figs) or 'see eval.json'} ({ev.get('views', '?')} views)")
    if s["distill"]:
        dd = s["distill"]
        lines.append(f"distill    {dd.get('method', '?')} with {dd.get('teacher', '?')}"
                     + (f", {dd['seconds']:.0f} s" if isinstance(dd.get("seconds"), (int, float)) else ""))
    lines.append(f"edits      {', '.join(s['edits'])}" if s["edits"] else "edits      none")
    if s["viewer"]:
        lines.append(f"viewer     {', '.join(s['viewer'][:6])}{' ...' if len(s['viewer']) > 6 else ''}")
    return "\n".join(lines)
