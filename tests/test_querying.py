"""Queries on a trained feature field: render cache, query building and its errors, outputs, IoU, the CLI."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from dfield.app.cli import main
from dfield.core.metrics import iou
from dfield.errors import QueryError
from dfield.features.teachers import SyntheticTeacher, register_teacher
from dfield.io.run import open_run
from dfield.query.builder import make_query
from dfield.query.clusters import far_clusters, scene_clusters, spherical_kmeans
from dfield.query.context import QueryContext, context
from dfield.query.evaluation import inscribed_square, object_prompt, query_iou_per_object
from dfield.query.outputs import run_query, selection_points
from dfield.query.relevance import relevance
from dfield.query.spec import QuerySpec


@pytest.fixture
def fresh_run(feature_run, tmp_path, monkeypatch, teacher_cache):
    monkeypatch.setenv("DFIELD_CACHE_DIR", str(teacher_cache))
    dst = tmp_path / "run"
    shutil.copytree(feature_run, dst)
    return dst


def _centre_click(run):
    """(view, x, y) on the most visible object of training view 0 (the deepest interior pixel)."""
    ids = context(run).data("train").object_ids
    p = object_prompt(ids[:1], int(torch.mode(ids[0][ids[0] > 1]).values), "interior")
    return (p["view"], *p["click"]), (p["view"], *p["box"])


def test_cache_hit_returns_identical_maps_without_rendering(fresh_run):
    ctx = context(open_run(fresh_run))
    click, box = _centre_click(ctx)
    q = make_query(ctx, QuerySpec(click=click))
    first = relevance(ctx, q, views=[0, 1, 2])
    rendered = ctx.cache.renders
    assert rendered >= 3
    # A new query on the same views: decode and softmax only.
    q2 = make_query(ctx, QuerySpec(patch=box))
    relevance(ctx, q2, views=[0, 1, 2])
    assert ctx.cache.renders == rendered
    # A new process (fresh Run, same checkpoint) reads the renders from RUN/cache.
    again = QueryContext(open_run(fresh_run))
    second = relevance(again, q, views=[0, 1, 2])
    assert again.cache.renders == 0
    for a, b in zip(first, second):
        assert torch.equal(a.probability, b.probability) and torch.equal(a.mask, b.mask)
    assert list((fresh_run / "cache" / "render").iterdir()) == [ctx.cache.folder]


def test_a_click_stands_for_the_surface_around_it(fresh_run):
    """A click's positive is the mean decoded feature of its click region (same depth, within the radius); radius 0
    is the one pixel."""
    from dfield.query.builder import field_click_embedding
    from dfield.query.sets import click_region

    ctx = context(open_run(fresh_run))
    (view, x, y), _ = _centre_click(ctx)
    r = ctx.train_view(view)
    decoded = ctx.decode(r.feature.float())
    torch.testing.assert_close(field_click_embedding(ctx, view, (x, y)), decoded[y, x])
    mask = click_region(r.acc, r.depth / r.acc.clamp(min=1e-6), x, y, 0.1)
    assert mask[y, x] and 1 < mask.sum() <= 5 * 5  # 0.1 of 20 px: a 5x5 square at most
    torch.testing.assert_close(field_click_embedding(ctx, view, (x, y), 0.1), decoded[mask].mean(0))
    q = make_query(ctx, QuerySpec(click=(view, x, y), click_radius=0.1))
    torch.testing.assert_close(q.positives[0], decoded[mask].mean(0))


def test_new_weights_invalidate_the_disk_cache(fresh_run):
    ctx = QueryContext(open_run(fresh_run))
    ctx.render(ctx.train_cameras, 0)
    old = ctx.cache.folder
    run = open_run(fresh_run)
    with torch.no_grad():
        run.model.decoder.bias.add_(1.0)
    changed = QueryContext(run)
    assert changed.cache.folder != old
    changed.render(changed.train_cameras, 0)
    assert changed.cache.renders == 1 and not old.exists()


@pytest.mark.parametrize("spec, message", [
    (QuerySpec(), "empty query"),
    (QuerySpec(click=(0, 20, 5)), "outside the 20x20"),
    (QuerySpec(click=(0, -1, 5)), "outside"),
    (QuerySpec(patch=(0, 5, 5, 30, 10)), "not inside"),
    (QuerySpec(patch=(0, 8, 5, 4, 10)), "not inside"),
    (QuerySpec(click=(8, 3, 3)), "view 8 is out of range: the run has 8 training views"),
    (QuerySpec(patch=(-1, 0, 0, 4, 4)), "out of range"),
    (QuerySpec(text=["red box"]), r"teacher synthetic\(.*\) has no text encoder"),
    (QuerySpec(text=["  "]), "empty text"),
    (QuerySpec(click=(0, 3, 3), threshold=1.5), "threshold"),
    (QuerySpec(click=(0, 3, 3), negatives="everything"), "negatives must be"),
    (QuerySpec(cluster=24), "cluster 24 is out of range: the scene is split into 24 clusters"),
    (QuerySpec(cluster=-1), "out of range"),
])
def test_bad_queries_are_clear_errors(feature_run, spec, message):
    with pytest.raises(QueryError, match=message):
        make_query(context(open_run(feature_run)), spec)


def test_patch_from_the_teachers_own_map(fresh_run):
    ctx = context(open_run(fresh_run))
    _, box = _centre_click(ctx)
    field = make_query(ctx, QuerySpec(patch=box))
    teacher = make_query(ctx, QuerySpec(patch=box, patch_source="teacher"))
    assert teacher.positives.shape == field.positives.shape
    assert not torch.allclose(teacher.positives, field.positives)


def test_a_run_without_a_feature_field(feature_run):
    run = open_run(feature_run)
    run.model.decoder = None
    with pytest.raises(QueryError, match="no feature field"):
        context(run)


def test_click_on_empty_space(feature_run):
    ctx = QueryContext(open_run(feature_run), disk_cache=False)
    acc = ctx.train_view(0).acc
    y, x = map(int, torch.nonzero(acc < 0.1)[0])
    with pytest.raises(QueryError, match="empty space"):
        make_query(ctx, QuerySpec(click=(0, x, y)))


class NamedSynthetic(SyntheticTeacher):
    """The synthetic teacher plus a text encoder: an object's name maps to its clean embedding."""

    text_aligned = True

    def __init__(self, names: dict, **kw):
        super().__init__(**kw)
        self.names = {v: int(k) for k, v in names.items()}

    def encode_text(self, texts):
        return self.object_embeddings()[[self.names.get(t, 0) for t in texts]]


def test_text_query_with_a_text_aligned_teacher(fresh_run):
    run = open_run(fresh_run)
    names = run.scene.object_names
    register_teacher("named_synthetic", lambda **kw: NamedSynthetic(names, **kw))
    run.cfg.features.teacher = "named_synthetic"
    ctx = context(run)
    target = int(torch.mode(ctx.data("train").object_ids[0][ctx.data("train").object_ids[0] > 1]).values)
    q = make_query(ctx, QuerySpec(text=[names[str(target)]]))
    assert len(q.negatives) == 4  # the canonical phrases
    q = make_query(ctx, QuerySpec(text=[names[str(target)]], negatives="auto"))
    p = relevance(ctx, q, views=[0])[0].probability
    ids = ctx.data("train").object_ids[0]
    assert p[ids == target].mean() > p[(ids != target) & (ids > 0)].mean()


def test_kmeans_and_far_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4) + 1.0  # a large shared component, as dense features have
    x = torch.cat([c + 0.05 * torch.randn(50, 4, generator=g) for c in centres])
    c = spherical_kmeans(x, 4)
    assert len(c) == 4
    center, means = scene_clusters(x, 4)
    assert torch.allclose(center, torch.full((4,), 1.25), atol=0.02)  # mean of the 4 cluster means
    neg = far_clusters(means, centres[:1], center, 0.8)
    assert len(neg) == 3 and (torch.cdist(neg, centres[:1]) > 1).all()
    # Nothing far enough: every cluster but the query's own.
    assert len(far_clusters(means, centres[:1], center, -5.0)) == 3
    assert len(spherical_kmeans(torch.ones(10, 3), 5)) == 1  # fewer distinct points than clusters


def test_iou_and_prompts_on_hand_made_masks():
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    b = torch.zeros(2, 4, 4, dtype=torch.bool)
    a[0, :2, :2] = True  # 4 pixels
    b[0, :2, :] = True  # 8 pixels, 4 shared
    b[1, 3, 3] = True  # a miss in the second view
    assert iou(a, b) == pytest.approx(4 / 9)
    assert iou(torch.zeros(3, 3), torch.zeros(3, 3)) is None
    # A ring: the deepest pixel is on the ring, not in the hole.
    yy, xx = torch.meshgrid(torch.arange(21), torch.arange(21), indexing="ij")
    r = ((yy - 10) ** 2 + (xx - 10) ** 2).float().sqrt()
    ring = (r > 4) & (r < 9)
    x, y, depth = inscribed_square(ring)
    assert ring[y, x] and depth >= 2
    ids = torch.zeros(3, 21, 21, dtype=torch.long)
    ids[1][ring] = 2
    ids[2, 2:6, 2:6] = 2
    p = object_prompt(ids, 2, "interior")
    x0, y0, x1, y1 = p["box"]
    assert p["view"] == 1 and ring[y0:y1, x0:x1].all()
    assert object_prompt(ids, 2, "bbox")["box"] == [2, 2, 19, 19]
    assert object_prompt(ids, 5) is None


def test_selection_points_lie_on_the_rendered_surface(fresh_run):
    ctx = context(open_run(fresh_run))
    click, _ = _centre_click(ctx)
    rels = relevance(ctx, make_query(ctx, QuerySpec(click=click)), views=[0, 3])
    pts, cols = selection_points(rels, ctx.train_cameras)
    assert len(pts) > 0 and pts.shape == cols.shape
    assert len(pts) <= sum(int(r.mask.sum()) for r in rels)
    box = torch.tensor(ctx.run.scene.aabb)
    assert ((pts >= box[0] - 0.1) & (pts <= box[1] + 0.1)).all()


def test_run_query_writes_outputs(fresh_run, tmp_path):
    click, box = _centre_click(open_run(fresh_run))
    out = tmp_path / "q"
    res = run_query(fresh_run, QuerySpec(patch=box), path="test", out=out)
    for kind in ("heatmap", "overlay", "mask"):
        assert sorted(p.name for p in out.glob(f"{kind}_*.png")) == [f"{kind}_000.png", f"{kind}_001.png"]
    from PIL import Image

    m = np.asarray(Image.open(out / "mask_000.png"))
    assert m.shape == (20, 20) and set(np.unique(m)) <= {0, 255}
    header = (out / "selection.ply").read_bytes().split(b"end_header")[0].decode()
    assert f"element vertex {res['ply_points']}" in header and res["ply_points"] > 0
    assert res["selected_pixels"] > 0 and (out / "query.json").is_file()


def test_empty_selection_says_lower_the_threshold(fresh_run, tmp_path):
    click, _ = _centre_click(open_run(fresh_run))
    with pytest.raises(QueryError, match="lower --threshold"):
        run_query(fresh_run, QuerySpec(click=click, threshold=0.999999), out=tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_per_object_iou(fresh_run):
    res = query_iou_per_object(fresh_run)
    names = set(open_run(fresh_run).scene.object_names.values())
    assert set(res["objects"]) <= names and "ground" in res["objects"]
    for row in res["objects"].values():
        for k in ("field_patch", "teacher_patch", "field_click", "teacher_click", "boundary_f_patch", "boundary_f_click"):
            assert row.get(k) is None or 0 <= row[k] <= 1
    assert set(res["mean"]) == {"field_patch", "teacher_patch", "field_click", "teacher_click", "boundary_f_patch",
                                "boundary_f_click"}


def test_cli_query(fresh_run, tmp_path, capsys):
    click, box = _centre_click(open_run(fresh_run))
    out = tmp_path / "q"
    assert main(["query", str(fresh_run), "--click", *map(str, click), "--path", "train", "--out", str(out),
                 "--no-ply", "--eval-objects"]) == 0
    assert len(list(out.glob("mask_*.png"))) == 8 and not (out / "selection.ply").exists()
    assert "mean (objects)" in capsys.readouterr().out
    for bad in (["--click", "0", "99", "5"], [], ["--patch", "9", "0", "0", "5", "5"], ["--text", "red box"]):
        assert main(["query", str(fresh_run), *bad, "--out", str(tmp_path / "bad")]) == 2
        assert not (tmp_path / "bad").exists()
    assert "dfield: error:" in capsys.readouterr().err


def test_cluster_query_selects_its_cluster_and_writes_maps(fresh_run, tmp_path):
    import json

    from PIL import Image

    out = tmp_path / "c"
    assert main(["query", str(fresh_run), "--cluster", "2", "--clusters", "6", "--path", "train", "--out", str(out),
                 "--no-ply"]) == 0
    legend = json.loads((out / "clusters.json").read_text())
    assert legend["chosen"] == 2 and len(legend["clusters"]) <= 6
    assert abs(sum(c["share"] for c in legend["clusters"]) - 1) < 1e-6
    maps = sorted(out.glob("clusters_*.png"))
    assert len(maps) == 8
    # The selection is (mostly) the chosen cluster's pixels: their colour in the maps.
    colour = np.array(legend["clusters"][2]["rgb"])
    inside = outside = 0
    for m in maps:
        img = np.asarray(Image.open(m).convert("RGB")).astype(int)
        mask = np.asarray(Image.open(out / m.name.replace("clusters_", "mask_"))) > 127
        # The chosen cluster is drawn in its colour and outlined in white; on these 20-pixel views the outline can
        # cover a small cluster entirely, so white pixels count as the chosen cluster's.
        is_c = (np.abs(img - colour).max(-1) <= 2) | (img.min(-1) >= 250)
        inside += (mask & is_c).sum()
        outside += (mask & ~is_c).sum()
    assert inside > 0 and inside > outside
    assert main(["query", str(fresh_run), "--cluster", "7", "--clusters", "6", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
