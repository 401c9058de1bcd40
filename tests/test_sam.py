"""The sam segmenter (segment-anything's automatic mask generator on weights the user gives): our stand-in box NMS
against a brute-force reference, spec strings with a path and settings, checkpoint errors, and the segmenter
interface on a randomly initialised SAM ViT-B loaded from a checkpoint file (no download)."""

import importlib.util
import sys

import numpy as np
import pytest
import torch

from dfield.errors import TeacherError
from dfield.features.segmenters import SegmentInputs, make_segmenter
from dfield.features.segmenters.sam import box_area, box_nms
from dfield.features.specs import parse_spec

needs_sam = pytest.mark.skipif(importlib.util.find_spec("segment_anything") is None,
                               reason="segment-anything is not installed (scripts/setup.sh installs it)")


def brute_nms(boxes, scores, cats, thr):
    keep = []
    for i in sorted(range(len(boxes)), key=lambda i: -float(scores[i])):
        ok = True
        for j in keep:
            if cats[i] != cats[j]:
                continue
            lo = torch.maximum(boxes[i, :2], boxes[j, :2])
            hi = torch.minimum(boxes[i, 2:], boxes[j, 2:])
            inter = float((hi - lo).clamp(min=0).prod())
            union = float(box_area(boxes[i:i + 1])[0] + box_area(boxes[j:j + 1])[0]) - inter
            if inter / union > thr:
                ok = False
        if ok:
            keep.append(i)
    return keep


def test_box_nms_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        xy = torch.rand(60, 2, generator=g) * 50
        wh = torch.rand(60, 2, generator=g) * 30 + 1
        boxes = torch.cat([xy, xy + wh], 1)
        scores = torch.rand(60, generator=g)
        cats = torch.randint(0, 3, (60,), generator=g)
        for thr in (0.3, 0.7):
            assert box_nms(boxes, scores, cats, thr).tolist() == brute_nms(boxes, scores, cats, thr)
    assert box_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0), 0.5).tolist() == []


def test_spec_with_a_path_and_settings():
    assert parse_spec("sam:/m/sam_vit_b.pth,model_type=vit_b,points_per_side=8") == \
        ("sam", "/m/sam_vit_b.pth", {"model_type": "vit_b", "points_per_side": 8})
    assert parse_spec("segments:sam:/m/x.pth,points_per_side=8") == ("segments", "sam:/m/x.pth,points_per_side=8", {})
    with pytest.raises(ValueError, match="key=value"):
        parse_spec("felzenszwalb:scale=1,oops")


def test_sam_checkpoint_errors(tmp_path):
    with pytest.raises(TeacherError, match="needs a checkpoint"):
        make_segmenter("sam")
    with pytest.raises(TeacherError, match="not found"):
        make_segmenter(f"sam:{tmp_path / 'missing.pth'}")
    with pytest.raises(TeacherError, match="bad settings"):
        make_segmenter(f"sam:{tmp_path / 'x.pth'},pretrained=0,model_type=vit_q")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    seg = make_segmenter(f"sam:{bad}")  # the file is read on first use
    with pytest.raises(TeacherError, match="cannot read SAM weights"):
        seg.segment(SegmentInputs(np.zeros((8, 8, 3), np.uint8)))
    other = tmp_path / "other.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}, other)
    if importlib.util.find_spec("segment_anything") is not None:
        with pytest.raises(TeacherError, match="not SAM vit_b weights"):
            make_segmenter(f"sam:{other}").segment(SegmentInputs(np.zeros((8, 8, 3), np.uint8)))


@needs_sam
def test_sam_segmenter_on_a_random_vit_b_checkpoint(tmp_path):
    from dfield.features.segmenters.sam import build_sam

    torch.manual_seed(0)
    ckpt = tmp_path / "sam_random_vit_b.pth"
    torch.save(build_sam("vit_b").state_dict(), ckpt)  # Meta's checkpoints are plain state dicts like this one
    try:
        seg = make_segmenter(f"segments:sam:{ckpt},points_per_side=2,pred_iou=0,stability=0,min_area=0".split(":", 1)[1])
        assert seg.points_per_side == 2 and str(ckpt.resolve()) in seg.name
        img = np.zeros((48, 64, 3), np.uint8)
        img[8:30, 10:40] = (200, 30, 30)
        lab = seg.segment(SegmentInputs(img))
        assert lab.shape == (48, 64) and lab.dtype == np.int32 and lab.min() >= 0 and lab.max() >= 1
        assert seg.generator.predictor.model.image_encoder.patch_embed.proj.weight.shape[0] == 768  # auto: vit_b
        # The stand-ins for torchvision were only there while segment-anything was imported.
        assert "torchvision.ops.boxes" not in sys.modules or importlib.util.find_spec("torchvision") is not None
    finally:
        ckpt.unlink()
