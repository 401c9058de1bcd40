"""Guided local editing (Blending-NeRF + LENeRF): what `dfield guide-edit` does.

A trained run is frozen; a small edit field is blended with it (dfield.fields.blended) under a 3D attention
field distilled from a query's relevance maps (dfield.edit.region), and the edit field is trained so that the
blended scene becomes what a guidance says (dfield.edit.guidance: painted views, an exemplar, a text). Besides
the guidance, every step renders rays of the training views that can meet the region and applies Blending-NeRF's
accumulated-opacity constraints (what an edit kind adds, removes or recolours stays inside the region's mask)
and keeps the source's colour outside that mask.

    s = guided_edit("runs/toy", "runs/toy-green", "painted/", where=parse_where("click:3,40,58"))
    s["preserve_psnr"], s["seconds"]

The result is a run folder (config.json with model "blended", scene.json, checkpoints, guide.json, log.jsonl)
that render, eval, query, edit and the viewer open like any other. `guided_layer` does the same inside an edit
spec (`{"op": "guided", ...}`), on whatever the spec's earlier edits made, cached under RUN/cache/guided/.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from dfield.config import to_dict
from dfield.core.grids import voxel_res
from dfield.core.image_rendering import ndc_of, render_image
from dfield.core.metrics import peak_rss_bytes, psnr_from_mse
from dfield.core.optimizers import adam
from dfield.core.rays import field_rays
from dfield.edit.build import EditedModel, make_selection, select_query
from dfield.edit.guidance import EditedViews, Exemplar, Guidance, TextGuidance, swatch
from dfield.edit.guide_context import GuideContext, ViewData
from dfield.edit.guided_eval import evaluate_guided
from dfield.edit.region import (
    distill_attention,
    initial_attention,
    load_edited_views,
    paint_hull,
    painted_mask,
    ray_max,
    region_box,
    region_samples,
)
from dfield.edit.selection import VoxelSelection, selection_bounds
from dfield.edit.spec import Edit, Select
from dfield.errors import EditError, RunError
from dfield.features.encoders import ClipEncoder, DinoEncoder
from dfield.fields.attention import AttentionField
from dfield.fields.blended import KINDS, BlendedField, DeformationField, EditField, EditFieldConfig
from dfield.io.atomic import atomic_path, atomic_write_text
from dfield.io.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    optimizer_tensors,
    restore_optimizer,
    save_checkpoint,
)
from dfield.io.run import Run, build_model, model_tensors, open_run, save_config
from dfield.models.blended import BlendConfig, BlendedModel
from dfield.models.grid import GridModel
from dfield.query.relevance import relevance
from dfield.query.render_cache import checkpoint_key

Progress = Callable[[str, int, int, dict | None], None]
DEFAULT_CLIP = "openai/clip-vit-base-patch16"


@dataclass
class GuidedConfig:
    """How a guided edit is trained: kinds, steps and rays, learning rates, sizes of its fields, the attention's
    distillation, and the weights of its priors."""

    kinds: tuple[str, ...] = ()
    """Edit kinds (add, remove, color); empty: color."""
    steps: int = 300
    batch_rays: int = 2048
    """Rays per step for edited-view guidance (half painted pixels, half the pixels to keep)."""
    constraint_rays: int = 1024
    """Rays per step from the training views around the region, for the opacity constraints and preservation."""
    lr_grid: float = 0.1
    """Adam step of the edit's grid (added density, blending ratios, latent): 0.1 takes a ratio from its start to
    fully on in about 100 steps."""
    lr_network: float = 0.005
    lr_gain: float = 0.2
    """Adam step of the log colour gain (0.05 had not converged in 150 steps: 26.5 dB inside the recoloured object
    of bench/guided_edit.py at 200 px against 27.8 with 0.2; 0.5 gave 27.6)."""
    color_model: str = ""
    """How the edit colour follows the source's (dfield.fields.blended.EditFieldConfig.color_model): `gain`, `free`,
    or empty: `gain` unless the kinds add matter. Painting several colours onto one region wants `free`."""
    lr_deform: float = 0.002
    lr_final_ratio: float = 0.1
    edit_voxels: int = 48**3
    attention_voxels: int = 48**3
    attention_steps: int = 200
    attention_views: int = 20
    """Training views the attention is distilled on (and the constraints use), spread around the scene."""
    attention_sparsity: float = 0.02
    attention_tv: float = 0.05
    attention_floor: float = 0.02
    attention_grow: int = 1
    """Cells the query's 3D selection (and the paint hull) grow by before the attention is distilled."""
    region_grow_px: int = 2
    """Pixels each view's region mask grows by (the opacity constraints and preservation act outside it)."""
    constraint_weight: float = 0.1
    """Blending-NeRF's accumulated-opacity constraints: what each kind changes, outside the region's mask."""
    preserve_weight: float = 1.0
    """Keep the source's colour outside the region's mask."""
    latent_weight: float = 0.01
    density_weight: float = 0.001
    tv_weight: float = 0.001
    """Total variation of the edit's density and ratio logits (cells no ray sees follow their neighbours)."""
    ratio_full: float = 0.5
    """Attention from which the density-removal and colour ratios act fully (below it, in proportion). With 1 (as
    strong as the attention) a distilled attention of 0.9-0.97 inside the object left a ghost of a removed cylinder
    (opacity 0.091 in its box on bench/guided_edit.py against 0.024 with 0.5; 0.25 gave no more) and a tenth of the
    old colour in a recolour (27.8 dB inside the object at 200 px against 28.9 with 0.5)."""
    removal_start: float = 8.0
    """Logit of the removal ratio at the start when the kinds include remove: the attention's region starts removed
    and the guidance keeps what should stay (cells no view constrains follow the query's region, not the
    optimiser's start). Opaque matter is gone only when the ratio is within about 1e-3 of one: logit 7 or more."""
    deform: bool = False
    """Also train a deformation field (shape changes inside the attention)."""
    deform_res: int = 16
    deform_weight: float = 10.0
    deform_tv_weight: float = 10.0
    hull_voxels: int = 96**3
    paint_tol: float = 0.04
    """A pixel of an edited view counts as painted when it differs from the render by more than this."""
    augmentations: int = 4
    seed: int = 0
    max_seconds: float = 0.0
    """Stop after this much training (0: no limit)."""
    log_every: int = 10
    checkpoint_every: int = 100


# ------------------------------------------------------------------------------------------- inputs


def parse_to(to: str) -> tuple[str, object]:
    """What `--to` names: ("views", folder) for a folder of edited views, ("image", path) for an exemplar image,
    ("color", [r, g, b]) for `color:R,G,B` (a swatch exemplar), else ("text", text) (`text:` prefix optional).

    Example:
        >>> parse_to("color:0.2,0.8,0.2"), parse_to("text:a green ball"), parse_to("a red cube")
        (('color', [0.2, 0.8, 0.2]), ('text', 'a green ball'), ('text', 'a red cube'))
    """
    s = str(to).strip()
    if not s:
        raise EditError("--to is empty: give a folder of edited views, an image, color:R,G,B or a text")
    if s.startswith("text:"):
        return "text", s[5:].strip()
    if s.startswith("color:"):
        try:
            return "color", [float(v) for v in s[6:].split(",")]
        except ValueError:
            raise EditError(f"--to {s}: a colour is color:R,G,B with numbers in [0, 1]") from None
    p = Path(s).expanduser()
    if p.is_dir():
        return "views", p
    if p.is_file():
        return "image", p
    if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") or "/" in s:
        raise EditError(f"--to {s}: no such file or folder")
    return "text", s


def make_guidance(kind: str, value, n_views: int, size: tuple[int, int], cfg: GuidedConfig, clip: str | None = None,
                  source_text: str = "a photo of an object", encoder=None) -> Guidance:
    """The Guidance for a parsed `--to` (see `parse_to`). Exemplars use DINOv2 (offline) unless `encoder` is given;
    text uses CLIP / SigLIP `clip` (hub name or folder) or `encoder`."""
    if kind == "views":
        return EditedViews(load_edited_views(value, n_views, *size), batch=cfg.batch_rays, tol=cfg.paint_tol)
    if kind in ("image", "color"):
        if kind == "image":
            try:
                img = torch.from_numpy(np.asarray(Image.open(value).convert("RGB"), dtype=np.float32) / 255.0)
            except OSError as e:
                raise EditError(f"{value}: cannot read the exemplar image ({e})") from None
        else:
            img = swatch(value)
        return Exemplar(encoder or DinoEncoder.from_imgfocus(), img, augmentations=cfg.augmentations)
    return TextGuidance(encoder or ClipEncoder(clip or DEFAULT_CLIP), str(value), source_text,
                        augmentations=cfg.augmentations)


def pick_views(n: int, k: int, extra=()) -> list[int]:
    """About `k` training views spread over 0..n-1, plus the views in `extra`, sorted.

    Example:
        >>> pick_views(60, 4, extra=[7])
        [0, 7, 20, 39, 59]
    """
    base = np.linspace(0, n - 1, max(1, min(k, n))).round().astype(int).tolist()
    return sorted(set(base) | {int(v) for v in extra})


# ------------------------------------------------------------------------------------------- the region


@dataclass
class Region:
    """Where the edit acts: the distilled attention field, the views it was made on (source renders and the
    region's mask in each), the 3D selection it started from, and figures about it."""

    attention: AttentionField
    views: dict[int, ViewData]
    stats: dict = field(default_factory=dict)


@torch.no_grad()
def source_views(renderer, cameras, views, ndc=None, device="cpu") -> dict[int, ViewData]:
    """The source rendered on training `views` (rgb, opacity, expected depth); regions filled in later."""
    out = {}
    for v in views:
        o = render_image(renderer, cameras, int(v), ndc, device=device)
        depth = torch.where(o["acc"] > 1e-3, o["depth"] / o["acc"].clamp(min=1e-3), torch.zeros_like(o["depth"]))
        out[int(v)] = ViewData(o["rgb"], o["acc"], depth, torch.zeros_like(o["acc"]))
    return out


def build_region(run: Run, field, select: Select | None, painted: dict[int, torch.Tensor] | None, kinds,
                 views: list[int], cfg: GuidedConfig, use_cache: bool = True, device="cpu", progress: Progress | None = None) -> Region:
    """The region of a guided edit on `field` (the run's field, or what earlier edits made of it): a 3D attention
    field started from the query's 3D selection (and from the hull of painted pixels where density may be added),
    distilled on the query's relevance maps of `views` (from the run's render cache when `use_cache`)."""
    t0 = time.perf_counter()
    base: GridModel = run.model
    settings = base.render_settings()
    cams, ndc = run.scene.train_cameras(), ndc_of(run.scene)
    renderer = EditedModel(base, field, [])
    data = source_views(renderer, cams, views, ndc, device)
    rel = {v: torch.zeros_like(d.acc) for v, d in data.items()}
    boxes, starts, stats = [], [], {}
    if select is not None:
        sel = make_selection(select, run, field, base.step)
        boxes.append(selection_bounds(sel, field.aabb).cpu())
        starts.append(sel.prob)
        if select.box is None:
            query = select_query(select, run)
            # The query decides in or out at its threshold; distilling the soft probabilities instead would leave
            # the attention at 0.6 on an object the query is 60 % sure of, and the edit could change it only 60 %.
            if use_cache:
                for r in relevance(run, query, views=views):
                    rel[r.view] = (r.probability >= select.threshold).float() * r.rendered.acc
            else:
                for v in views:
                    o = render_image(renderer, cams, v, ndc, device=device, features=True)
                    rel[v] = (query.probability(o["feature"]) >= select.threshold).float() * o["acc"]
        else:
            for v in views:
                rel[v] = render_image(renderer, cams, v, ndc, device=device, channels={"sel": sel.prob})["sel"]
        stats["selection_cells"] = sel.voxel_count() if isinstance(sel, VoxelSelection) else None
    masks = {}
    hull_fn = None
    if painted:
        for v, img in painted.items():
            masks[v] = painted_mask(img, data[v].rgb, cfg.paint_tol) & ~torch.isnan(img).any(-1)
        stats["painted_pixels"] = {int(v): int(m.sum()) for v, m in masks.items()}
        if "add" in kinds or select is None:
            scene_box = torch.tensor(run.scene.aabb, dtype=torch.float32)
            res = voxel_res(scene_box, cfg.hull_voxels)
            cell = float(((scene_box[1] - scene_box[0]) / torch.tensor(res)).max())
            rays, ends = [], []
            for v, m in masks.items():
                pix = m.reshape(-1).nonzero()[:, 0]
                if len(pix) == 0:
                    continue
                r = field_rays(cams, torch.full_like(pix, v), (pix % cams.width).float() + 0.5,
                               (pix // cams.width).float() + 0.5, ndc)
                d = data[v]
                seen = d.acc.reshape(-1)[pix] > 0.5
                # New matter must lie in front of the surface the painted pixel saw (behind it, it would be hidden).
                far = torch.full_like(pix, 1e9, dtype=torch.float32)
                ends.append(torch.where(seen, d.depth.reshape(-1)[pix] + cell, far))
                rays.append(r)
            if not rays:
                raise EditError("no pixel of the edited views differs from the renders: nothing was painted")
            hull = paint_hull(rays, ends, scene_box, res, settings.near, cell / 2)
            if not hull.any():
                raise EditError("the painted regions of the edited views do not meet in 3D "
                                "(paint the same place in each)")
            hull_sel = VoxelSelection(scene_box, hull.float(), 0.5)
            hull_fn = hull_sel.prob
            boxes.append(selection_bounds(hull_sel, scene_box))
            starts.append(hull_fn)
            stats["hull_cells"] = int(hull.sum())
    if not starts:
        raise EditError("a guided edit needs a region: --where (a query) or painted views")
    limit = torch.tensor(run.scene.aabb, dtype=torch.float32)
    box = region_box(boxes, limit)
    attention = initial_attention(box, cfg.attention_voxels, starts, floor=cfg.attention_floor,
                                  grow=cfg.attention_grow)
    # What the attention should render as: the query's relevance, and every painted pixel (for colour and removal).
    for v, m in masks.items():
        if kinds_touch_surface(kinds):
            rel[v] = torch.maximum(rel[v], m.float() * data[v].acc)
    if select is not None and cfg.attention_steps > 0:
        samples = region_samples(field, settings, cams, views, attention.aabb.to(field.aabb.device), ndc)
        targets = _gather_targets(rel, samples)
        stats["attention"] = distill_attention(attention, samples, targets, cfg.attention_steps,
                                               sparsity=cfg.attention_sparsity, tv=cfg.attention_tv, seed=cfg.seed,
                                               progress=progress)
    attention.requires_grad_(False)
    for v, d in data.items():
        region = rel[v]
        if hull_fn is not None:
            pix = torch.arange(cams.width * cams.height)
            r = field_rays(cams, torch.full_like(pix, v), (pix % cams.width).float() + 0.5,
                           (pix // cams.width).float() + 0.5, ndc)
            ends = torch.where(d.acc.reshape(-1) > 0.5, d.depth.reshape(-1) + 0.02, torch.full((len(pix),), 1e9))
            cover = ray_max(hull_fn, r, ends, attention.aabb.cpu(), settings.near, settings.step * 2)
            region = torch.maximum(region, cover.reshape(region.shape))
        if v in masks:
            region = torch.maximum(region, masks[v].float())
        if cfg.region_grow_px > 0:  # relevance maps are blurry at silhouettes: let the edit reach a little beyond
            k = cfg.region_grow_px
            region = F.max_pool2d(region[None, None], 2 * k + 1, stride=1, padding=k)[0, 0]
        d.region = region.clamp(0, 1)
    stats["attention_box"] = attention.aabb.tolist()
    stats["attention_res"] = list(attention.res)
    stats["seconds"] = time.perf_counter() - t0
    return Region(attention, data, stats)


def kinds_touch_surface(kinds) -> bool:
    """Whether the kinds change existing matter (colour change or removal), so painted pixels are on the region."""
    return bool(set(kinds) & {"color", "remove"})


def _gather_targets(rel: dict[int, torch.Tensor], samples) -> torch.Tensor:
    out = torch.zeros(samples.n_rays)
    for v in samples.view.unique().tolist():
        k = (samples.view == v).nonzero()[:, 0]
        out[k] = rel[v].reshape(-1)[samples.pixel[k]]
    return out


# ------------------------------------------------------------------------------------------- training


def param_groups(edit: EditField, deform: DeformationField | None, cfg: GuidedConfig) -> list[dict]:
    """Optimiser groups of the edit: its grid (densities, ratios, latent), its colour network and the deformation."""
    groups = [{"params": [edit.grid], "lr": cfg.lr_grid, "name": "edit_grid"},
              {"params": list(edit.color_mlp.parameters()), "lr": cfg.lr_network, "name": "edit_network"}]
    if deform is not None:
        groups.append({"params": list(deform.parameters()), "lr": cfg.lr_deform, "name": "deform"})
    # Last, so that an edit checkpointed before the gain existed resumes with the groups it saved plus this one.
    groups.append({"params": [edit.gain], "lr": cfg.lr_gain, "name": "edit_gain"})
    for g in groups:
        g["initial_lr"] = g["lr"]
    return groups


def constraint_terms(ctx: GuideContext, pools: list[tuple[int, torch.Tensor]], n: int, kinds,
                     g: torch.Generator) -> dict[str, torch.Tensor]:
    """Blending-NeRF's accumulated-opacity constraints and colour preservation on `n` rays drawn from `pools`
    ((view, pixel ids) of rays that can meet the region): what each enabled kind adds, removes or recolours,
    and any colour change, weighted by how far outside the region's mask a ray is."""
    sizes = torch.tensor([len(p) for _, p in pools], dtype=torch.float32)
    if n <= 0 or sizes.sum() == 0:
        return {}
    pick = torch.multinomial(sizes, n, replacement=True, generator=g)
    rays, src, region = [], [], []
    for k, (v, pool) in enumerate(pools):
        c = int((pick == k).sum())
        if c:
            px = pool[torch.randint(len(pool), (c,), generator=g)]
            rays.append(ctx.rays(v, px))
            src.append(ctx.source_rgb(v, px))
            region.append(ctx.region_of(v, px))
    origins = torch.cat([r.origins for r in rays])
    out = ctx.render(type(rays[0])(origins, torch.cat([r.directions for r in rays])), g)
    src, region = torch.cat(src), torch.cat(region)
    outside = 1 - region
    opacity = {"add": out["added"], "remove": out["removed"], "color": out["recolored"]}
    constraint = sum((opacity[k] * outside).mean() for k in kinds)
    err = (out["rgb"] - src).square().mean(-1)
    far = region < 0.5
    return {"constraint": constraint, "preserve": (err * outside).mean(),
            "preserve_mse": err[far].mean().detach() if far.any() else torch.zeros(())}


def saved_groups(opt: torch.optim.Optimizer, groups: list[dict]) -> list[dict]:
    """A checkpoint's optimiser groups for `opt`: an edit saved before the colour gain existed lacks its group (the
    last one); it is added with fresh moments."""
    if len(groups) == len(opt.param_groups) - 1 and opt.param_groups[-1].get("name") == "edit_gain":
        last = opt.param_groups[-1]
        used = [i for grp in groups for i in grp["params"]]
        groups = [*groups, {**{k: v for k, v in last.items() if k != "params"}, "params": [max(used, default=-1) + 1]}]
    return groups


def train_edit(ctx: GuideContext, guidance: Guidance, edit: EditField, deform: DeformationField | None, kinds,
               cfg: GuidedConfig, start_step: int = 0, optimizer_state: tuple[dict, list] | None = None,
               seconds: float = 0.0,
               on_checkpoint: Callable[[int, torch.optim.Optimizer, float, dict], None] | None = None,
               log: Callable[[dict], None] | None = None, progress: Progress | None = None) -> dict:
    """Train the edit (and deformation) fields of `ctx.field` for `cfg.steps` steps (from `start_step`, with a
    saved optimiser state when resuming). Returns the last step's figures; calls `on_checkpoint(step, optimizer,
    seconds, figures)` every `cfg.checkpoint_every` steps and at the end, `log(figures)` every `cfg.log_every`."""
    opt = adam(param_groups(edit, deform, cfg), betas=(0.9, 0.99))
    if optimizer_state is not None:
        tensors, groups = optimizer_state
        restore_optimizer(opt, tensors, saved_groups(opt, groups), device=ctx.device)
    g = torch.Generator().manual_seed(cfg.seed * 1000003 + start_step)
    pools = [(v, ctx.crossing(v)) for v in ctx.views]
    figures: dict = {}
    step = start_step
    while step < cfg.steps and not (cfg.max_seconds and seconds >= cfg.max_seconds):
        t0 = time.perf_counter()
        frac = step / max(1, cfg.steps)
        for grp in opt.param_groups:
            grp["lr"] = grp["initial_lr"] * cfg.lr_final_ratio ** frac
        terms = guidance.loss(ctx, g)
        terms.update(constraint_terms(ctx, pools, cfg.constraint_rays, kinds, g))
        regs = edit.regularizers()
        terms["latent"] = cfg.latent_weight * regs["latent"]
        terms["tv"] = cfg.tv_weight * regs["tv"]
        if "add" in kinds:
            terms["density"] = cfg.density_weight * regs["density"]
        if "constraint" in terms:
            terms["constraint"] = cfg.constraint_weight * terms["constraint"]
            terms["preserve"] = cfg.preserve_weight * terms["preserve"]
        if deform is not None:
            dr = deform.regularizers()
            terms["deform"] = cfg.deform_weight * dr["deform"] + cfg.deform_tv_weight * dr["deform_tv"]
        monitor = {k: terms.pop(k) for k in [k for k in terms if k.endswith("_mse")]}
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            raise EditError(f"the guided edit's loss became {loss.item()} at step {step} "
                            f"({ {k: float(v) for k, v in terms.items()} }); try lower learning rates")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        seconds += time.perf_counter() - t0
        mse = [float(v) for v in monitor.values()]
        figures = {"step": step, "loss": loss.item(), **{k: float(v.detach()) for k, v in terms.items()},
                   "preserve_psnr": psnr_from_mse(max(sum(mse) / len(mse), 1e-10)) if mse else None,
                   "seconds": round(seconds, 2)}
        if log is not None and (step % cfg.log_every == 0 or step == cfg.steps):
            log(figures)
        if progress is not None:
            progress("guide", step, cfg.steps, figures if step % cfg.log_every == 0 or step == cfg.steps else None)
        if on_checkpoint is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            on_checkpoint(step, opt, seconds, figures)
    if on_checkpoint is not None and step % cfg.checkpoint_every != 0 and step != cfg.steps:
        on_checkpoint(step, opt, seconds, figures)  # stopped by the time budget: keep what was learned
    return figures


# ------------------------------------------------------------------------------------------- the run folder


def _kinds(cfg: GuidedConfig) -> tuple[str, ...]:
    kinds = tuple(dict.fromkeys(cfg.kinds or ("color",)))
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise EditError(f"unknown edit kind(s) {bad}: choose from {', '.join(KINDS)}")
    return kinds


def guided_edit(run: Path, out: Path, to: str, where: Select | None = None, cfg: GuidedConfig | None = None,
                clip: str | None = None, source_text: str = "a photo of an object", resume: bool = False,
                overwrite: bool = False, eval_scene: Path | None = None, device: str = "cpu",
                progress: Progress | None = None, encoder=None) -> dict:
    """Train a guided edit of the run folder `run` into the run folder `out` and evaluate it on the run's test views
    (see the module docstring). `to`: a folder of edited views, an exemplar image, color:R,G,B or a text; `where`:
    the region as a Select (patch, click, text, box or a saved query); optional with edited views. With `resume`,
    an interrupted `out` continues from its last checkpoint. `eval_scene`: a generated scene variant (generate-scene
    --recolor / --remove / --add-sphere) to score the edit against. Returns the summary written to OUT/guide.json.
    """
    t_start = time.perf_counter()
    cfg = copy.deepcopy(cfg) if cfg is not None else GuidedConfig()
    run, out = Path(run), Path(out)
    src = open_run(run, device)
    if isinstance(src.model, BlendedModel):
        raise EditError(f"{run} is itself a guided edit; edit its source run, or stack edits in an edit spec "
                        "(dfield edit RUN --spec, op guided)")
    if not isinstance(src.model, GridModel):
        raise RunError(f"{run}: guided edits need a grid model run (this one is {src.cfg.model})")
    kind, value = parse_to(to)
    if kind == "text" and where is None:
        raise EditError("text guidance needs --where (the region to edit); painted views can say where themselves")
    if kind in ("image", "color") and where is None:
        raise EditError("exemplar guidance needs --where (the region to edit)")
    kinds = _kinds(cfg)
    cfg.kinds = kinds
    if out.resolve() == run.resolve():
        raise EditError(f"--out {out} is the source run itself; give a new folder")
    has_run = (out / "config.json").is_file()
    if has_run and not (resume or overwrite):
        raise EditError(f"{out} already holds a run; --resume continues it, --overwrite starts over")
    cams = src.scene.train_cameras()
    guidance = make_guidance(kind, value, len(cams), (cams.width, cams.height), cfg, clip, source_text, encoder)
    painted = guidance.views if isinstance(guidance, EditedViews) else None
    extra = list(painted or ())
    for v in (where.patch, where.click) if where is not None else ():
        if v is not None:
            extra.append(int(v[0]))
    views = pick_views(len(cams), cfg.attention_views, extra)
    ckpt = latest_checkpoint(out / "checkpoints") if resume and has_run else None
    field_src = src.model.as_field(decoded=True)
    region = build_region(src, field_src, where, painted, kinds, views, cfg if ckpt is None else
                          _no_distill(cfg), device=device, progress=progress)
    if ckpt is not None:
        model, step, seconds, opt_state = _load_edit(out, ckpt, device)
        if tuple(model.blend.kinds) != kinds:
            raise EditError(f"{out} was trained with kinds {list(model.blend.kinds)}, not {list(kinds)}")
        region.attention = model.attention
    else:
        if overwrite and out.exists():
            for name in ("checkpoints", "log.jsonl", "guide.json", "eval.json", "cache", "renders", "edits"):
                p = out / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        model = _new_model(src, region.attention, kinds, cfg, run, device)
        step, seconds, opt_state = 0, 0.0, None
        out.mkdir(parents=True, exist_ok=True)
        save_config(_edit_config(src, model), out / "config.json")
        src.scene.save(out / "scene.json")
    ctx = GuideContext(model.as_field(), model.render_settings(), cams, region.views, ndc_of(src.scene), device)
    guidance.prepare(ctx)
    record = {"source": str(run.resolve()), "to": str(to), "guidance": guidance.describe(), "kinds": list(kinds),
              "where": None if where is None else {k: v for k, v in asdict(where).items()
                                                   if v not in (None, [], False)},
              "views": views, "region": region.stats, "config": asdict(cfg)}

    def checkpoint(step_, opt, secs, figs):
        opt_t, groups = optimizer_tensors(opt)
        meta = {"seconds": secs, "structure": model.structure(), "optimizer_groups": groups, "last": figs,
                "peak_rss_bytes": peak_rss_bytes(), "features": to_dict(src.cfg.features), "guided": record}
        save_checkpoint(out / "checkpoints", step_, model_tensors(model), opt_t, meta)

    with open(out / "log.jsonl", "a") as logf:
        def log(figs):
            logf.write(json.dumps(figs) + "\n")
            logf.flush()
        last = train_edit(ctx, guidance, model.edit, model.deform, kinds, cfg, step, opt_state, seconds,
                          checkpoint, log, progress)
    train_s = last.get("seconds", seconds)
    from_eval = evaluate_guided(open_run(out, device), src, eval_scene=eval_scene,
                                clip=guidance.encoder if isinstance(guidance, TextGuidance) else None,
                                text=(value, source_text) if kind == "text" else None, device=device, progress=progress)
    summary = {**record, "out": str(out), "steps": last.get("step", step), "train_seconds": train_s,
               "total_seconds": time.perf_counter() - t_start, "last": last, **from_eval}
    atomic_write_text(out / "guide.json", json.dumps(_jsonable(summary), indent=1))
    return summary


def _no_distill(cfg: GuidedConfig) -> GuidedConfig:
    c = copy.deepcopy(cfg)
    c.attention_steps = 0  # resuming: the distilled attention is in the checkpoint
    return c


def _new_model(src: Run, attention: AttentionField, kinds, cfg: GuidedConfig, run: Path, device) -> BlendedModel:
    box = attention.aabb.cpu()
    blend = BlendConfig(kinds=tuple(kinds), edit_aabb=box.tolist(), edit_res=list(voxel_res(box, cfg.edit_voxels)),
                        attention_aabb=box.tolist(), attention_res=list(attention.res), floor=attention.floor,
                        deform_res=[cfg.deform_res] * 3 if cfg.deform else [], source=str(Path(run).resolve()),
                        edit=EditFieldConfig(color_model=color_model(kinds, cfg)), ratio_full=cfg.ratio_full)
    ecfg = _edit_config(src, None, blend)
    model = build_model(ecfg, src.scene).to(device)
    model.restructure(src.model.structure())
    model.load_extra_state(src.model.extra_state())
    missing, unexpected = model.load_state_dict(src.model.state_dict(), strict=False)
    if unexpected or any(not k.startswith(("edit.", "attention.", "deform.")) for k in missing):
        raise RunError(f"{run}: its weights do not fit a blended model ({unexpected[:3]}, {missing[:3]})")
    with torch.no_grad():
        model.attention.logits.copy_(attention.logits)
    start_edit(model.edit, kinds, cfg)
    model.attention.requires_grad_(False)
    for p in model.source_parameters():
        p.requires_grad_(False)
    return model


def color_model(kinds, cfg: GuidedConfig) -> str:
    """The edit colour's model: the config's, else `free` where matter is added (it has no source colour to
    follow) and `gain` for recolours (one gain generalises from the painted views; a free MLP there fitted the
    painted pixels and missed the rest: 20.8 dB against 25.9 inside the recoloured object of bench/guided_edit.py)."""
    if cfg.color_model:
        if cfg.color_model not in ("gain", "free"):
            raise EditError(f"color_model is gain or free, got {cfg.color_model!r}")
        return cfg.color_model
    return "free" if "add" in kinds else "gain"


@torch.no_grad()
def start_edit(edit: EditField, kinds, cfg: GuidedConfig) -> None:
    """Set where a new edit field starts for its kinds: with remove, the region starts removed (`removal_start`)."""
    if "remove" in kinds:
        edit.grid[1].fill_(cfg.removal_start)


def _edit_config(src: Run, model: BlendedModel | None, blend: BlendConfig | None = None):
    cfg = copy.deepcopy(src.cfg)
    cfg.model = "blended"
    cfg.blend = copy.deepcopy(blend if blend is not None else model.blend)
    return cfg


def _load_edit(out: Path, ckpt: Path, device) -> tuple[BlendedModel, int, float, tuple[dict, list]]:
    r = open_run(out, device, ckpt)
    if not isinstance(r.model, BlendedModel):
        raise EditError(f"{out} is not a guided edit run; give another --out")
    r.model.attention.requires_grad_(False)
    _, trainer_t, meta = load_checkpoint(ckpt, device)
    return r.model, r.step, float(meta.get("seconds", 0.0)), (trainer_t, meta["optimizer_groups"])


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


# ------------------------------------------------------------------------------------------- the edit spec op


def guided_layer(run: Run, field, edit: Edit, below: list[Edit] = (), cfg: GuidedConfig | None = None, encoder=None,
                 device="cpu", progress: Progress | None = None) -> BlendedField:
    """A spec's `{"op": "guided", ...}` on `field` (the run's field after the spec's earlier edits `below`): trained
    once, then loaded from RUN/cache/guided/ (keyed by the edit, the earlier edits and the run's weights)."""
    cfg = copy.deepcopy(cfg) if cfg is not None else GuidedConfig()
    cfg.kinds = tuple(edit.kinds or cfg.kinds or ("color",))
    if edit.steps is not None:
        cfg.steps = int(edit.steps)
    kinds = _kinds(cfg)
    cams = run.scene.train_cameras()
    key_src = json.dumps({"edit": asdict(edit), "below": [asdict(e) for e in below], "cfg": asdict(cfg),
                          "weights": checkpoint_key(run)}, sort_keys=True, default=str)
    key = hashlib.sha1(key_src.encode()).hexdigest()[:16]
    folder = Path(run.path) / "cache" / "guided"
    tensors, info = folder / f"{key}.safetensors", folder / f"{key}.json"
    if tensors.is_file() and info.is_file():
        try:
            meta = json.loads(info.read_text())
            mods = _modules(meta)
            state = load_file(str(tensors))
            for name, mod in mods.items():
                if mod is not None:
                    mod.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})
            return BlendedField(field, mods["edit"], mods["attention"], kinds, mods["deform"],
                                ratio_full=meta.get("ratio_full", 1.0))
        except (OSError, KeyError, RuntimeError, ValueError):
            pass  # a damaged cache entry is trained again
    kind, value = parse_to(edit.to)
    guidance = make_guidance(kind, value, len(cams), (cams.width, cams.height), cfg, edit.clip, edit.source_text,
                             encoder)
    painted = guidance.views if isinstance(guidance, EditedViews) else None
    extra = list(painted or ())
    if edit.select is not None:
        extra += [int(v[0]) for v in (edit.select.patch, edit.select.click) if v is not None]
    views = pick_views(len(cams), cfg.attention_views, extra)
    region = build_region(run, field, edit.select, painted, kinds, views, cfg, use_cache=False, device=device,
                          progress=progress)
    box = region.attention.aabb.cpu()
    meta = {"edit_aabb": box.tolist(), "edit_res": list(voxel_res(box, cfg.edit_voxels)),
            "attention_res": list(region.attention.res), "floor": region.attention.floor,
            "deform_res": [cfg.deform_res] * 3 if cfg.deform else [], "color_model": color_model(kinds, cfg),
            "ratio_full": cfg.ratio_full}
    mods = _modules(meta)
    with torch.no_grad():
        mods["attention"].logits.copy_(region.attention.logits)
    start_edit(mods["edit"], kinds, cfg)
    mods["attention"].requires_grad_(False)
    blended = BlendedField(field, mods["edit"], mods["attention"], kinds, mods["deform"],
                           ratio_full=cfg.ratio_full)
    ctx = GuideContext(blended, run.model.render_settings(), cams, region.views, ndc_of(run.scene), device)
    guidance.prepare(ctx)
    train_edit(ctx, guidance, mods["edit"], mods["deform"], kinds, cfg, progress=progress)
    state = {f"{n}.{k}": v.detach().contiguous() for n, m in mods.items() if m is not None
             for k, v in m.state_dict().items()}
    with atomic_path(tensors) as tmp:
        save_file(state, tmp)
    atomic_write_text(info, json.dumps(meta))
    return blended


def _modules(meta: dict) -> dict:
    box = torch.tensor(meta["edit_aabb"], dtype=torch.float32)
    # Entries cached before these keys existed were trained with the free colour model and proportional removal.
    return {"edit": EditField(box, meta["edit_res"], EditFieldConfig(color_model=meta.get("color_model", "free"))),
            "attention": AttentionField(box, meta["attention_res"], floor=meta["floor"]),
            "deform": DeformationField(box, meta["deform_res"]) if meta["deform_res"] else None}
