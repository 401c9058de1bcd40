"""One run opened in the viewer: what it renders now (the trained model or the model under the edits made so far),
the query being built (clicks, boxes, texts, clusters; positives and negatives), and the edit stack, written as
an ordinary edit spec so `dfield edit RUN RUN/viewer/spec.json` repeats what the viewer did.

Everything here is plain Python over dfield's query and edit layers; the browser (dfield.view.server) only
forwards events to it.

    s = ViewerSession("runs/toy")
    f = s.render(s.home(), 256)                   # a Frame
    s.click(f, (0.5, 0.55))                       # the feature under the canvas centre becomes a positive
    img = s.image(f, "overlay")                   # (H, W, 3) uint8
    s.apply_edit("recolor", color=[0.1, 0.4, 1])  # everything renders through the edit from now on
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dfield.core.image_rendering import ndc_of
from dfield.edit.build import build_edited, mesh_box
from dfield.edit.mesh import field_mesh
from dfield.edit.spec import OPS, parse_spec
from dfield.errors import EditError, QueryError
from dfield.features.pca import FeaturePCA
from dfield.io.atomic import atomic_write_text
from dfield.io.export import save_mesh_ply, save_ply, save_png
from dfield.io.run import open_run
from dfield.query.builder import encode_texts
from dfield.query.clusters import auto_view_ids, far_clusters, nearest_cluster, scene_clusters, subsample
from dfield.query.context import QueryContext
from dfield.query.outputs import selection_points
from dfield.query.relevance import view_relevance
from dfield.query.sets import QuerySet, click_region, save_query_set
from dfield.query.spec import OPAQUE, TEXT_NEGATIVES, QuerySpec
from dfield.view.camera import ViewCamera, look_at_point, scene_up, view_of
from dfield.view.frames import Frame, add_features, compose, render_frame

SAMPLE_SIDE = 128  # training views are rendered this small for the scene's clusters and PCA (speed, not detail)


@dataclass
class Prompt:
    """One thing the user pointed at: its embedding in teacher space, whether it is a negative, what it was
    (for the list in the panel) and the 3D point it landed on (a seed for connected selections)."""

    embedding: torch.Tensor
    negative: bool
    label: str
    point: list[float] | None = None


@dataclass
class QueryState:
    """The query being built: prompts (positives and negatives), automatic negatives on or off, and the scoring
    settings of `dfield query` (threshold, temperature, claim, clusters, click radius)."""

    prompts: list[Prompt] = field(default_factory=list)
    auto_negatives: bool = True
    threshold: float = QuerySpec.threshold
    temperature: float = QuerySpec.temperature
    claim: float = QuerySpec.claim
    clusters: int = QuerySpec.clusters
    click_radius: float = QuerySpec.click_radius

    @property
    def positives(self) -> list[Prompt]:
        """The positive prompts."""
        return [p for p in self.prompts if not p.negative]


class ViewerSession:
    """A run opened for viewing, querying and editing (see the module docstring)."""

    def __init__(self, run, device: str = "cpu", workdir: Path | None = None):
        self.run = open_run(run, device) if not hasattr(run, "model") else run
        self.device = device
        self.ndc = ndc_of(self.run.scene)
        self.name = Path(self.run.path).name
        self.workdir = Path(workdir) if workdir is not None else Path(self.run.path) / "viewer"
        self.train_cameras = self.run.scene.train_cameras()
        self.model = self.run.model
        self.query = QueryState()
        self.edits: list[dict] = []
        self.lock = threading.RLock()  # the render thread and GUI callbacks share the model and the query
        self._ctx: QueryContext | None = None
        self._sample: torch.Tensor | None = None
        self._clusters: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pca: FeaturePCA | None = None
        self._decoded: tuple[int, torch.Tensor] | None = None
        self._queries = 0
        self._sample_lock = threading.Lock()  # one computation of the feature sample, shared by whoever asks first

    # ------------------------------------------------------------------------------------------ rendering
    @property
    def has_features(self) -> bool:
        """Whether this run can be queried (it has a feature field)."""
        return self.run.model.has_features

    def home(self, aspect: float | None = None) -> ViewCamera:
        """The browser camera of training view 0."""
        return view_of(self.train_cameras, 0, aspect)

    def up(self) -> np.ndarray:
        """The scene's up direction."""
        return scene_up(self.train_cameras)

    def center(self) -> np.ndarray:
        """The point the training cameras look at."""
        return look_at_point(self.train_cameras)

    def render(self, view: ViewCamera, max_side: int, cancelled=lambda: False, features: bool = True,
               later: bool = False) -> Frame:
        """Render `view` with the current model (edits included), with features when the run has them and
        `features` asks for them; `later` keeps what `add_features` needs to add them afterwards."""
        with self.lock:
            model = self.model
        return render_frame(model, view, max_side, features=features and self.has_features, ndc=self.ndc,
                            cancelled=cancelled, device=self.device, later=later)

    @staticmethod
    def add_features(frame: Frame, cancelled=lambda: False) -> Frame:
        """A frame rendered with `later` with its features added (see dfield.view.frames.add_features)."""
        return add_features(frame, cancelled)

    def set_model(self, model, step: int) -> None:
        """Show other weights of the same run (a training snapshot): the edits are rebuilt on them, and the scene's
        clusters, PCA and query context are recomputed when next needed (prompts keep their embeddings)."""
        with self.lock:
            self.run.model, self.run.step = model, step
            self._ctx, self._sample, self._clusters, self._pca, self._decoded = None, None, None, None, None
            if not self.edits:
                self.model = model
        if self.edits:
            self._rebuild(self.edits)

    # ------------------------------------------------------------------------------------------ features
    @property
    def ctx(self) -> QueryContext:
        """The run's query context (render cache kept in memory only: viewer renders are throwaway)."""
        if self._ctx is None:
            if not self.has_features:
                raise QueryError(f"{self.run.path}: this run has no feature field to query (dfield distill it first)")
            self._ctx = QueryContext(self.run, disk_cache=False)
        return self._ctx

    @torch.no_grad()
    def decoded(self, frame: Frame) -> torch.Tensor:
        """(H, W, D) teacher-space features of a frame, decoded once per frame."""
        if frame.feature is None:
            raise QueryError(f"{self.run.path}: this run has no feature field to query")
        if self._decoded is None or self._decoded[0] != id(frame):
            with self.lock:
                model = self.model
            device = next(self.run.model.parameters()).device
            self._decoded = (id(frame), model.decode(frame.feature.to(device).float()).cpu())
        return self._decoded[1]

    def sample_cameras(self):
        """Training cameras at most SAMPLE_SIDE pixels wide: the views the scene's clusters and PCA come from."""
        cams = self.train_cameras
        return cams.scaled(min(1.0, SAMPLE_SIDE / max(cams.width, cams.height)))

    def feature_sample(self, limit: int = 20000) -> torch.Tensor:
        """Decoded features of the opaque pixels of a few training views (computed once; `prepare_queries` computes
        it ahead, while the user looks)."""
        with self._sample_lock:
            return self._feature_sample(limit)

    def _feature_sample(self, limit: int) -> torch.Tensor:
        if self._sample is None:
            ctx, cams = self.ctx, self.sample_cameras()
            feats = []
            for v in auto_view_ids(len(cams), 4, []):
                r = ctx.render(cams, v)
                feats.append(ctx.decode(r.feature[r.acc > OPAQUE]))
            x = torch.cat(feats)
            if len(x) == 0:
                raise QueryError(f"{self.run.path}: the training views render nothing opaque; is the run trained?")
            self._sample = subsample(x, limit)
        return self._sample

    def prepare_queries(self) -> None:
        """Compute what the first click needs besides its own frame (the scene's feature sample and clusters, for
        automatic negatives), so that it re-colours the view at once. Quietly does nothing for a run that cannot
        be queried."""
        if not self.has_features:
            return
        try:
            self.clusters()
        except QueryError:
            pass

    def clusters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(centre, (K, D) means) of the scene's feature clusters (k = query.clusters), computed once per k."""
        if self._clusters is None or len(self._clusters[1]) > self.query.clusters:
            self._clusters = scene_clusters(self.feature_sample(), self.query.clusters)
        return self._clusters

    def pca(self, frame: Frame) -> torch.Tensor:
        """(H, W, 3) colours of a frame's features by one PCA fitted on the scene's feature sample."""
        if self._pca is None:
            self._pca = FeaturePCA(self.feature_sample())
        return self._pca(self.decoded(frame))

    def cluster_ids(self, frame: Frame) -> torch.Tensor:
        """(H, W) index of each pixel's nearest scene cluster (cosine from the scene's centre), -1 where empty."""
        ids = nearest_cluster(self.decoded(frame), self.clusters())
        return torch.where(frame.acc > OPAQUE, ids, torch.full_like(ids, -1))

    # ------------------------------------------------------------------------------------------ queries
    def click(self, frame: Frame, screen_xy, negative: bool = False) -> Prompt:
        """The feature under a click (canvas fractions) becomes a positive (or a negative); QueryError on empty space."""
        x, y = frame.pixel(screen_xy)
        point = frame.point((x, y))
        if point is None:
            raise QueryError(f"the click at pixel ({x}, {y}) hits empty space")
        mask = click_region(frame.acc, frame.depth, x, y, self.query.click_radius)
        return self._add(Prompt(self.decoded(frame)[mask].mean(0), negative, f"click ({x}, {y})", point.tolist()))

    def box(self, frame: Frame, screen_min, screen_max, negative: bool = False) -> Prompt:
        """The mean feature of the opaque pixels inside a dragged box becomes a prompt."""
        (x0, y0), (x1, y1) = frame.pixel(screen_min), frame.pixel(screen_max)
        x0, x1, y0, y1 = min(x0, x1), max(x0, x1) + 1, min(y0, y1), max(y0, y1) + 1
        opaque = frame.acc[y0:y1, x0:x1] > OPAQUE
        if not opaque.any():
            raise QueryError(f"the box ({x0}, {y0})-({x1}, {y1}) covers only empty space")
        emb = self.decoded(frame)[y0:y1, x0:x1][opaque].mean(0)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        point = frame.point((cx, cy))
        return self._add(Prompt(emb, negative, f"box ({x0}, {y0})-({x1}, {y1})",
                                None if point is None else point.tolist()))

    def text(self, texts: list[str], negative: bool = False) -> list[Prompt]:
        """Texts as prompts, through the teacher's text encoder (QueryError when it has none)."""
        texts = [t.strip() for t in texts if t.strip()]
        if not texts:
            raise QueryError("type a text to look for")
        emb = encode_texts(self.ctx.teacher, texts)
        return [self._add(Prompt(e, negative, f"text '{t}'")) for e, t in zip(emb, texts)]

    def pick_cluster(self, frame: Frame, screen_xy, negative: bool = False) -> Prompt:
        """The scene cluster under a click becomes a prompt (its mean feature): the DFF paper's cluster selection."""
        x, y = frame.pixel(screen_xy)
        j = int(self.cluster_ids(frame)[y, x])
        if j < 0:
            raise QueryError(f"the click at pixel ({x}, {y}) hits empty space")
        point = frame.point((x, y))
        return self._add(Prompt(self.clusters()[1][j].clone(), negative, f"cluster {j}",
                                None if point is None else point.tolist()))

    def _add(self, prompt: Prompt) -> Prompt:
        with self.lock:
            self.query.prompts.append(prompt)
        return prompt

    def clear_query(self) -> None:
        """Forget every prompt."""
        with self.lock:
            self.query.prompts.clear()

    def query_set(self) -> QuerySet | None:
        """The query of the current prompts (None without a positive): automatic negatives (the scene clusters
        unlike the positives), the user's negatives, and stock phrases for text-only queries without automatic
        ones."""
        with self.lock:
            q = self.query
            pos = [p.embedding for p in q.positives]
            neg = [p.embedding for p in q.prompts if p.negative]
        if not pos:
            return None
        pos = torch.stack(pos)
        center = None
        negatives = [torch.stack(neg)] if neg else []
        if q.auto_negatives:
            center, means = self.clusters()
            negatives.append(far_clusters(means, pos, center, q.claim))
        elif not neg and any(p.label.startswith("text") for p in q.positives):
            negatives.append(encode_texts(self.ctx.teacher, list(TEXT_NEGATIVES)))
        negatives = torch.cat(negatives) if negatives else torch.zeros(0, pos.shape[1])
        return QuerySet(pos, negatives, temperature=q.temperature, center=center)

    def probability(self, frame: Frame) -> torch.Tensor | None:
        """(H, W) relevance of the current query on a frame, or None without a query."""
        qs = self.query_set()
        return None if qs is None or frame.feature is None else qs.probability(self.decoded(frame))

    def selected_fraction(self, frame: Frame) -> float:
        """Share of the frame's opaque pixels the current query selects (0 without a query)."""
        p = self.probability(frame)
        opaque = frame.acc > OPAQUE
        if p is None or not opaque.any():
            return 0.0
        return float(((p > self.query.threshold) & opaque).sum() / opaque.sum())

    def image(self, frame: Frame, mode: str) -> np.ndarray:
        """(H, W, 3) uint8 of a frame in a display mode (dfield.view.frames.MODES); modes that need features
        fall back to RGB on a run without them."""
        if frame.feature is None or mode in ("rgb", "depth"):
            return compose(frame, mode if mode in ("rgb", "depth") else "rgb")
        if mode == "features":
            return compose(frame, mode, pca=self.pca(frame))
        if mode == "clusters":
            return compose(frame, mode, cluster_ids=self.cluster_ids(frame))
        return compose(frame, mode, probability=self.probability(frame), threshold=self.query.threshold)

    # ------------------------------------------------------------------------------------------ edits
    def _selection(self) -> dict:
        qs = self.query_set()
        if qs is None:
            raise EditError("select something first: click an object (or drag a box, or type a text)")
        self._queries += 1
        path = save_query_set(self.workdir / "queries" / f"query_{len(self.edits):02d}_{self._queries:03d}.json", qs)
        seeds = [p.point for p in self.query.positives if p.point is not None]
        sel = {"query": str(path.relative_to(self.workdir)), "threshold": self.query.threshold,
               "temperature": self.query.temperature}
        if seeds:
            sel["seeds"] = seeds
        else:
            sel["connected"] = False
        return sel

    def edit_item(self, op: str, **params) -> dict:
        """The edit-spec item of `op` on the current selection (composite: another run, no selection needed)."""
        if op not in OPS:
            raise EditError(f"unknown edit {op!r}; expected one of {', '.join(OPS)}")
        item = {"op": op, **{k: v for k, v in params.items() if v is not None}}
        if op != "composite":
            item["select"] = self._selection()
        return item

    def apply_edit(self, op: str, **params) -> dict:
        """Add an edit on the current selection and render through it from now on; the selection is cleared (a
        new edit needs a new one). Raises EditError/QueryError without changing anything when it cannot be built."""
        item = self.edit_item(op, **params)
        self._rebuild(self.edits + [item])
        self.clear_query()
        return item

    def undo_edit(self) -> None:
        """Drop the last edit."""
        self._rebuild(self.edits[:-1])

    def _rebuild(self, items: list[dict]) -> None:
        if items:
            model = build_edited(self.run, parse_spec({"edits": items}, self.workdir), self.device)
        else:
            model = self.run.model
        with self.lock:
            self.model, self.edits = model, items
            self._decoded = None

    # ------------------------------------------------------------------------------------------ saving
    def save_spec(self, path: Path | None = None) -> Path:
        """Write the edits made so far as an edit spec (query files beside it): `dfield edit RUN SPEC` repeats them."""
        if not self.edits:
            raise EditError("no edits to save yet")
        path = Path(path) if path is not None else self.workdir / "spec.json"
        items = [dict(e) for e in self.edits]
        if path.parent.resolve() != self.workdir.resolve():
            for e in items:  # query paths are relative to the spec's folder
                if "select" in e and "query" in e["select"]:
                    e["select"] = {**e["select"], "query": str((self.workdir / e["select"]["query"]).resolve())}
        atomic_write_text(path, json.dumps({"edits": items}, indent=1))
        return path

    def save_image(self, frame: Frame, mode: str, path: Path | None = None) -> Path:
        """The frame as shown, as a PNG (default RUN/viewer/view_NNN.png, numbered)."""
        if path is None:
            n = len(list(self.workdir.glob("view_*.png"))) if self.workdir.is_dir() else 0
            path = self.workdir / f"view_{n:03d}.png"
        return save_png(path, self.image(frame, mode))

    def save_selection_ply(self, path: Path | None = None) -> tuple[Path, int]:
        """The selected pixels of a few training views back-projected at their depth, as a PLY point cloud
        (as `dfield query` writes it); returns the path and the number of points."""
        qs = self.query_set()
        if qs is None:
            raise QueryError("select something first")
        cams = self.sample_cameras()
        rels = [view_relevance(self.ctx, qs, cams, v, self.query.threshold)
                for v in auto_view_ids(len(cams), 8, [])]
        pts, cols = selection_points(rels, cams, self.ndc)
        if len(pts) == 0:
            raise QueryError("the selection is empty on the training views (lower the threshold)")
        path = Path(path) if path is not None else self.workdir / "selection.ply"
        return save_ply(path, pts.numpy(), cols.numpy()), len(pts)

    def save_selection_mesh(self, path: Path | None = None, resolution: int = 128, opacity: float = 0.5) -> Path:
        """A coloured mesh of the selected object (extracted under the edits made so far), as PLY."""
        item = self.edit_item("extract")
        edited = build_edited(self.run, parse_spec({"edits": self.edits + [item]}, self.workdir), self.device)
        verts, faces, colors = field_mesh(edited.field, mesh_box(edited), resolution, opacity)
        path = Path(path) if path is not None else self.workdir / "selection_mesh.ply"
        return save_mesh_ply(path, verts, faces, colors)
