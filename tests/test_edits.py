"""Edit wrappers on small analytic fields: outside the selection every value passes through bit for bit."""

import json

import pytest
import torch

from dfield.edit.colors import color_transfer, hsv_to_rgb, hue_shift, rgb_to_hsv, set_color
from dfield.edit.selection import BoxSelection, VoxelSelection, selection_bounds
from dfield.edit.spec import load_spec, parse_spec
from dfield.edit.wrappers import Delete, Extract, Place, Recolor, affine
from dfield.errors import EditError


class Balls:
    """Two soft balls (left red, right blue) in [-1, 1]^3, with view-dependent colour and 2-d features."""

    def __init__(self, shift=0.0):
        self.aabb = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
        self.occupancy = None
        self.centers = torch.tensor([[-0.5 + shift, 0.0, 0.0], [0.5 + shift, 0.0, 0.0]])

    def density(self, x):
        d = torch.cdist(x, self.centers)
        return 50 * torch.relu(0.3 - d).amax(-1) / 0.3

    def _which(self, x):
        return torch.cdist(x, self.centers).argmin(-1)

    def color(self, x, d):
        base = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.2, 0.9]])[self._which(x)]
        return (base + 0.05 * d[:, :1]).clamp(0, 1)

    def features(self, x):
        return torch.nn.functional.one_hot(self._which(x), 2).float()


def points(n=4000, seed=0):
    return torch.rand(n, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def dirs(n=4000, seed=1):
    return torch.nn.functional.normalize(torch.randn(n, 3, generator=torch.Generator().manual_seed(seed)), dim=-1)


RIGHT = BoxSelection([0.0, -1.0, -1.0], [1.0, 1.0, 1.0])


def test_delete_and_extract_are_exact_outside_the_selection():
    f, x = Balls(), points()
    inside = RIGHT.mask(x)
    assert inside.any() and (~inside).any()
    dele, ext = Delete(f, RIGHT), Extract(f, RIGHT)
    assert torch.equal(dele.density(x)[~inside], f.density(x)[~inside])
    assert (dele.density(x)[inside] == 0).all()
    assert torch.equal(ext.density(x)[inside], f.density(x)[inside])
    assert (ext.density(x)[~inside] == 0).all()
    d = dirs()
    assert torch.equal(dele.color(x, d), f.color(x, d)) and torch.equal(dele.features(x), f.features(x))


def test_recolor_changes_only_selected_colours():
    f, x, d = Balls(), points(), dirs()
    r = Recolor(f, RIGHT, hue_shift(180))
    inside = RIGHT.mask(x)
    assert torch.equal(r.density(x), f.density(x))
    assert torch.equal(r.color(x, d)[~inside], f.color(x, d)[~inside])
    assert not torch.allclose(r.color(x, d)[inside], f.color(x, d)[inside])


def test_transform_moves_the_selection_and_leaves_the_rest():
    f, x, d = Balls(), points(), dirs()
    m = affine(translate=(0.0, 0.4, 0.0))
    t = Place(f, f, RIGHT, m, selection_bounds(RIGHT, f.aabb), remove=True)
    moved_to = RIGHT.mask(x - torch.tensor([0.0, 0.4, 0.0]))
    outside = ~RIGHT.mask(x) & ~moved_to
    assert outside.any()
    for a, b in ((t.density(x), f.density(x)), (t.color(x, d), f.color(x, d)), (t.features(x), f.features(x))):
        assert torch.equal(a[outside], b[outside])
    # The right ball now sits 0.4 higher in y; the left one did not move.
    c = torch.tensor([[0.5, 0.4, 0.0], [0.5, 0.0, 0.0], [-0.5, 0.0, 0.0]])
    sig = t.density(c)
    assert sig[0] == pytest.approx(50.0) and sig[1] == 0 and sig[2] == pytest.approx(50.0)
    assert t.features(c[:1])[0, 1] == 1 and t.touched(c).tolist() == [True, True, False]
    # The box grew to hold the moved content.
    assert t.aabb[1, 1] >= 1.4 - 1e-6


def test_rotation_turns_view_directions_with_the_content():
    f = Balls()
    m = affine(rotate_deg=(0.0, 0.0, 180.0), pivot=(0.5, 0.0, 0.0))
    t = Place(f, f, RIGHT, m, selection_bounds(RIGHT, f.aabb), remove=True)
    p, d = torch.tensor([[0.5, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    # Seen along +x after a half turn is seen along -x before it.
    assert torch.allclose(t.color(p, d), f.color(p, -d), atol=1e-6)


def test_scale_keeps_opacity_per_surface():
    f = Balls()
    m = affine(scale=2.0, pivot=(0.5, 0.0, 0.0))
    t = Place(f, f, BoxSelection([0.2, -0.3, -0.3], [0.8, 0.3, 0.3]), m, torch.tensor([[0.2, -0.3, -0.3], [0.8, 0.3, 0.3]]),
              remove=True)
    assert t.density(torch.tensor([[0.5, 0.0, 0.0]]))[0] == pytest.approx(25.0)
    assert t.density(torch.tensor([[0.5, 0.5, 0.0]]))[0] > 0  # twice as wide now


def test_composite_adds_densities_and_mixes_colours_by_density():
    a, b = Balls(), Balls(shift=0.2)
    comp = Place(a, b, None, affine(), b.aabb)
    x, d = points(), dirs()
    assert torch.allclose(comp.density(x), a.density(x) + b.density(x))
    sa, sb = a.density(x), b.density(x)
    both = (sa > 0) & (sb > 0)
    want = (sa[both, None] * a.color(x, d)[both] + sb[both, None] * b.color(x, d)[both]) / (sa + sb)[both, None]
    assert torch.allclose(comp.color(x, d)[both], want, atol=1e-6)
    only_a = (sa > 0) & (sb == 0) & ~((x >= b.aabb[0]) & (x <= b.aabb[1])).all(-1)
    assert torch.equal(comp.color(x, d)[only_a], a.color(x, d)[only_a])


def test_hsv_roundtrip_and_colour_ops_keep_shading():
    c = torch.rand(500, 3, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(c)), c, atol=1e-5)
    shade = torch.tensor([[0.8, 0.1, 0.1], [0.4, 0.05, 0.05]])  # same red, lit and in shadow
    green = set_color([0.1, 0.8, 0.1], reference_value=0.8)(shade)
    assert green[0, 1] > green[0, 0] and green[1, 1].item() == pytest.approx(green[0, 1].item() / 2, rel=1e-4)
    out = color_transfer(shade, torch.tensor([[0.1, 0.1, 0.9], [0.1, 0.1, 0.5]]))(shade)
    assert out[:, 2].mean() > out[:, 0].mean()


def test_voxel_selection_matches_its_source_and_grows_by_dilation():
    aabb = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    box = BoxSelection([0.1, -0.5, -0.5], [0.9, 0.5, 0.5])
    v0 = VoxelSelection.sample(box, aabb, 20, dilate=0)
    x = points()
    centre = box.mask(x) & ((x - torch.tensor([0.5, 0, 0])).abs() < torch.tensor([0.3, 0.4, 0.4])).all(-1)
    assert v0.mask(x)[centre].all()
    far = ~BoxSelection([0.0, -0.6, -0.6], [1.0, 0.6, 0.6]).mask(x)
    assert not v0.mask(x)[far].any()
    v1 = VoxelSelection.sample(box, aabb, 20, dilate=1)
    assert v1.voxel_count() > v0.voxel_count()
    lo, hi = selection_bounds(v0, aabb)
    assert (lo <= torch.tensor([0.1, -0.5, -0.5]) + 0.1).all() and (hi >= torch.tensor([0.9, 0.5, 0.5]) - 0.1).all()


def test_spec_validation_errors_name_the_edit(tmp_path):
    ok = parse_spec({"edits": [{"op": "delete", "select": {"box": [[0, 0, 0], [1, 1, 1]]}}]})
    assert ok[0].op == "delete" and ok[0].select.box == [[0, 0, 0], [1, 1, 1]]
    bad = [
        ({"edits": [{"op": "explode", "select": {"text": "cat"}}]}, "unknown op"),
        ({"edits": [{"op": "delete"}]}, "needs a 'select'"),
        ({"edits": [{"op": "delete", "select": {"txt": "cat"}}]}, "unknown key"),
        ({"edits": [{"op": "delete", "select": {}}]}, "exactly one of text"),
        ({"edits": [{"op": "recolor", "select": {"text": "cat"}}]}, "exactly one of hue_shift"),
        ({"edits": [{"op": "transform", "select": {"text": "cat"}, "translate": [1, 2]}]}, "list of 3 numbers"),
        ({"edits": [{"op": "transform", "select": {"text": "cat"}, "scale": 0}]}, "scale must be"),
        ({"edits": [{"op": "composite"}]}, "needs 'run'"),
        ({"edits": [{"op": "composite", "run": "nowhere"}]}, "not found"),
        ({"edits": []}, "non-empty list"),
        ({"edit": []}, "unknown top-level"),
    ]
    for spec, msg in bad:
        with pytest.raises(EditError, match=msg):
            parse_spec(spec, tmp_path)
    (tmp_path / "e.yaml").write_text("edits:\n  - op: recolor\n    select: {click: [0, 3, 4]}\n    hue_shift: 90\n")
    assert load_spec(tmp_path / "e.yaml")[0].hue_shift == 90
    (tmp_path / "e.json").write_text(json.dumps({"edits": [{"op": "recolor"}]}))
    with pytest.raises(EditError, match="e.json: edit 0"):
        load_spec(tmp_path / "e.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(EditError, match="cannot parse"):
        load_spec(tmp_path / "broken.json")


def test_buried_cells_take_the_selection_of_the_nearest_surface():
    """A solid ball whose core features say 'not selected' (never seen) is still selected through and through."""
    aabb = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])

    class Dense:
        def query(self, x):
            return x.norm(dim=-1) < 0.6

    class ShellOnly(BoxSelection):
        def prob(self, x):
            return (x.norm(dim=-1) > 0.45).float()  # the core scores 0, as unseen features would

    v = VoxelSelection.sample(ShellOnly([-1, -1, -1], [1, 1, 1]), aabb, 24, occupied=Dense())
    assert v.mask(torch.zeros(1, 3)).item()
    v_raw = VoxelSelection.sample(ShellOnly([-1, -1, -1], [1, 1, 1]), aabb, 24, occupied=Dense(), fill_interior=False)
    assert not v_raw.mask(torch.zeros(1, 3)).item()


def test_seeded_selection_keeps_only_the_piece_the_click_landed_on():
    aabb = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    two = BoxSelection([-0.9, -0.2, -0.2], [0.9, 0.2, 0.2])

    class Gap(BoxSelection):
        def prob(self, x):
            return (two.mask(x) & (x[:, 0].abs() > 0.3)).float()  # two pieces, left and right

    v = VoxelSelection.sample(Gap([-1, -1, -1], [1, 1, 1]), aabb, 20, seeds=torch.tensor([[0.6, 0.0, 0.0]]))
    assert v.mask(torch.tensor([[0.6, 0.0, 0.0]])).item() and not v.mask(torch.tensor([[-0.6, 0.0, 0.0]])).item()


def test_cells_are_scored_where_their_matter_is_not_at_their_centre():
    """A thin sheet between cell centres: only its own points carry the right features (as in a trained field)."""
    aabb = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    z0 = 0.05 + 0.1 / 3  # inside the cells centred at z = 0.05 (size 0.1), on one of their 3x3x3 probe points

    class Sheet(BoxSelection):
        def prob(self, x):
            return ((x[:, 2] - z0).abs() < 0.01).float()

    density = lambda x: 100 * torch.exp(-(((x[:, 2] - z0) / 0.02) ** 2))  # noqa: E731
    sheet = Sheet([-1, -1, -1], [1, 1, 1])
    assert VoxelSelection.sample(sheet, aabb, 20).voxel_count() == 0
    v = VoxelSelection.sample(sheet, aabb, 20, density=density)
    assert v.voxel_count() == 20 * 20 and v.mask(torch.tensor([[0.3, -0.4, z0]])).item()
