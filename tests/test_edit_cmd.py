"""Edits on tiny trained runs, end to end: spec -> edited renders, locality, meshes, composite, errors."""

from __future__ import annotations

import json

import pytest
import torch

from dfield.app.cli import main
from dfield.core.image_rendering import render_image
from dfield.edit.build import build_edited
from dfield.edit.spec import parse_spec
from dfield.errors import EditError
from dfield.io.run import open_run


@pytest.fixture(scope="module")
def feature_run(feature_run, tmp_path_factory):
    """A private copy of the shared feature run: edits write selection renders into RUN/cache."""
    import shutil

    dst = tmp_path_factory.mktemp("erun") / "run"
    shutil.copytree(feature_run, dst)
    return dst


def spec_file(tmp_path, edits, name="spec.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"edits": edits}))
    return path


BOX = {"box": [[-0.8, -0.8, 0.02], [0.8, 0.8, 1.2]]}  # everything standing on the ground


def test_edit_command_renders_and_scores_locality(feature_run, tmp_path, capsys):
    spec = spec_file(tmp_path, [{"op": "recolor", "select": BOX, "hue_shift": 90},
                                {"op": "transform", "select": BOX, "translate": [0, 0, 0.1]}])
    out = tmp_path / "out"
    assert main(["edit", str(feature_run), "--spec", str(spec), "--out", str(out), "--export-mesh",
                 "--mesh-resolution", "32", "--mesh-opacity", "0.02"]) == 0
    res = json.loads((out / "edit.json").read_text())
    assert res["edits"] == ["recolor", "transform"] and res["views"] == 2
    assert res["locality_psnr_min"] == "inf" or res["locality_psnr_min"] >= 40
    assert (out / "edited_000.png").is_file() and (out / "original_001.png").is_file() and (out / "mesh.ply").is_file()
    assert "selection matches" in capsys.readouterr().err  # generated scene: scored against ground truth


def test_untouched_rays_render_as_before(feature_run):
    r = open_run(feature_run)
    edited = build_edited(r, parse_spec({"edits": [{"op": "delete", "select": BOX}]}))
    cams = r.scene.train_cameras()
    a, b = render_image(r.model, cams, 0), render_image(edited, cams, 0)
    # Pixels that see only the ground (below the box) keep their colour exactly; some pixels do change.
    from dfield.edit.locality import render_pair, untouched_mask

    keep = untouched_mask(render_pair(edited, cams, 0)["touched"], threshold=0.0)
    assert keep.any() and (~keep).any()
    assert torch.allclose(a["rgb"][keep], b["rgb"][keep], atol=1e-6)
    assert not torch.allclose(a["rgb"][~keep], b["rgb"][~keep], atol=1e-3)


def test_query_selections_and_composite(feature_run, tmp_path):
    r = open_run(feature_run)
    edits = parse_spec({"edits": [
        {"op": "delete", "select": {"click": [0, 10, 10], "threshold": 0.3}},
        {"op": "composite", "run": str(feature_run), "select": BOX, "translate": [0.0, 0.0, 1.0], "scale": 0.5},
    ]})
    edited = build_edited(r, edits)
    assert edited.field.aabb[1, 2] > r.model.field.aabb[1, 2]  # the box grew to hold the inserted copy
    cams = r.scene.train_cameras()
    out = render_image(edited, cams, 0)
    assert torch.isfinite(out["rgb"]).all()


def test_edit_errors_are_clear_and_write_nothing(feature_run, tiny_scene, tiny_train_config, tmp_path, capsys):
    out = tmp_path / "never"
    cases = [
        ([{"op": "melt", "select": BOX}], "unknown op"),
        ([{"op": "delete", "select": {"click": [0, 500, 5]}}], "outside"),
        ([{"op": "delete", "select": {"patch": [99, 0, 0, 5, 5]}}], "out of range"),
        ([{"op": "delete", "select": {"box": [[5, 5, 5], [6, 6, 6]]}}], None),  # box holds nothing: still valid
        ([{"op": "composite", "run": str(tmp_path / "missing")}], "not found"),
    ]
    for i, (edits, msg) in enumerate(cases):
        spec = spec_file(tmp_path, edits, f"s{i}.json")
        code = main(["edit", str(feature_run), "--spec", str(spec), "--out", str(out), "--no-video"])
        err = capsys.readouterr().err
        if msg is None:
            assert code == 0
            import shutil

            shutil.rmtree(out)
            continue
        assert code == 2 and msg in err and not out.exists(), err
    with pytest.raises(EditError, match="selection .* is empty"):
        build_edited(open_run(feature_run), parse_spec({"edits": [{"op": "delete", "select": {"click": [0, 10, 10],
                                                                                           "threshold": 0.99, "temperature": 100.0}}]}))
