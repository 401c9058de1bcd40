"""Segment Anything (SAM, the `segment-anything` package) with weights the user gives: its automatic mask generator
(a grid of point prompts, masks kept by predicted IoU and stability, deduplicated by box NMS) as a segmenter.

    make_segmenter("sam:/models/sam_vit_b_01ec64.pth")                   # architecture read from the checkpoint
    make_segmenter("sam:/models/sam_vit_h_4b8939.pth,points_per_side=16")

No weights ship with dfield and none are fetched: the checkpoint is one of Meta's `sam_vit_{b,l,h}` .pth files (or
any state dict of those architectures). `build_sam(model_type)` gives the architecture with random weights.

segment-anything imports torchvision for two box operations and an image resize, and PyPI's torchvision does not
import beside dfield's torch; where it cannot be imported, those three come from here (`box_nms`, `box_area`, a
PIL resize) through stand-in modules that exist only while segment-anything is being imported.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dfield.errors import TeacherError
from dfield.features.segmenters.base import Segmenter, SegmentInputs, masks_to_labels, stand_in_modules

# The encoder width of each SAM image encoder: how a checkpoint's architecture is recognised.
MODEL_TYPES = {"vit_b": 768, "vit_l": 1024, "vit_h": 1280}


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas (K,) of boxes (K, 4) given as x0, y0, x1, y1.

    Example:
        >>> box_area(torch.tensor([[0., 0., 2., 3.]])).tolist()
        [6.0]
    """
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, categories: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression per category (torchvision's `batched_nms`): indices of the boxes (K, 4)
    x0, y0, x1, y1 kept, best score first. A box is dropped when its IoU with a kept box of the same category
    exceeds `iou_threshold`,

        IoU(a, b) = |a n b| / (|a| + |b| - |a n b|).

    Example:
        >>> b = torch.tensor([[0., 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
        >>> box_nms(b, torch.tensor([0.5, 0.9, 0.7]), torch.zeros(3), 0.5).tolist()
        [1, 2]
    """
    boxes, scores = torch.as_tensor(boxes).float(), torch.as_tensor(scores).float()
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long)
    order = scores.argsort(descending=True, stable=True)
    b = boxes[order]
    cat = torch.as_tensor(categories)[order]
    lo = torch.maximum(b[:, None, :2], b[None, :, :2])
    hi = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    area = box_area(b)
    iou = inter / (area[:, None] + area[None] - inter).clamp(min=1e-12)
    clash = (iou > iou_threshold) & (cat[:, None] == cat[None])
    alive = torch.ones(len(b), dtype=torch.bool)
    for i in range(len(b)):  # sorted by score: a box is final once every better one has been decided
        if alive[i]:
            alive[i + 1:] &= ~clash[i, i + 1:]
    return order[alive]


def _resize(image: Image.Image, size) -> Image.Image:
    """torchvision.transforms.functional.resize for a PIL image and an (h, w) size, as SAM calls it."""
    h, w = size
    return image.resize((int(w), int(h)), Image.BILINEAR)


def _torchvision_stand_ins() -> dict[str, types.ModuleType]:
    ops, boxes = types.ModuleType("torchvision.ops"), types.ModuleType("torchvision.ops.boxes")
    boxes.batched_nms, boxes.box_area = box_nms, box_area
    ops.boxes = boxes
    transforms, functional = types.ModuleType("torchvision.transforms"), types.ModuleType("torchvision.transforms.functional")
    functional.resize, functional.to_pil_image = _resize, Image.fromarray
    transforms.functional = functional
    root = types.ModuleType("torchvision")
    root.ops, root.transforms = ops, transforms
    return {"torchvision": root, "torchvision.ops": ops, "torchvision.ops.boxes": boxes,
            "torchvision.transforms": transforms, "torchvision.transforms.functional": functional}


def _import_segment_anything():
    """segment_anything, with this module's stand-ins for its three torchvision functions when torchvision itself
    cannot be imported."""
    if "segment_anything" in sys.modules:
        return sys.modules["segment_anything"]
    try:
        import torchvision.ops.boxes  # noqa: F401  (lazy: optional; only batched_nms and box_area are used)
        import torchvision.transforms.functional  # noqa: F401
        stand_ins = {}
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            sys.modules.pop(name)  # a half-imported torchvision must not shadow the stand-ins
        stand_ins = _torchvision_stand_ins()
    try:
        with stand_in_modules(stand_ins):
            import segment_anything  # lazy: optional package
    except ImportError as e:
        raise TeacherError(f"the sam segmenter needs segment-anything ({e}); install it with "
                           "`pip install segment-anything==1.0` (scripts/setup.sh does)") from None
    return segment_anything


def build_sam(model_type: str = "vit_b", checkpoint: str | None = None) -> torch.nn.Module:
    """A SAM network (`vit_b`, `vit_l` or `vit_h`) in eval mode, with the weights of `checkpoint` (a .pth state
    dict) or random ones; model_type "auto" reads the architecture from the checkpoint."""
    state = None
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise TeacherError(f"{path}: SAM checkpoint not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise TeacherError(f"{path}: cannot read SAM weights ({str(e).splitlines()[0]})") from None
        if isinstance(state, dict) and isinstance(state.get("model", state.get("state_dict")), dict):
            state = state.get("model", state.get("state_dict"))
        if not isinstance(state, dict):
            raise TeacherError(f"{path}: not a SAM state dict")
        if model_type == "auto":
            model_type = _model_type_of(state, path)
    elif model_type == "auto":
        raise TeacherError("sam: model_type=auto needs a checkpoint to read the architecture from")
    if model_type not in MODEL_TYPES:
        raise TeacherError(f"sam: unknown model_type {model_type!r}; expected one of {', '.join(MODEL_TYPES)} or auto")
    sa = _import_segment_anything()
    net = sa.sam_model_registry[model_type](checkpoint=None)
    if state is not None:
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise TeacherError(f"{checkpoint}: not SAM {model_type} weights ({str(e).splitlines()[0]}; "
                               f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else ''})") from None
    return net.eval()


def _model_type_of(state: dict, path: Path) -> str:
    w = state.get("image_encoder.patch_embed.proj.weight")
    if w is None:
        raise TeacherError(f"{path}: not a SAM checkpoint (no image_encoder.patch_embed.proj.weight)")
    for name, width in MODEL_TYPES.items():
        if w.shape[0] == width:
            return name
    raise TeacherError(f"{path}: image encoder width {w.shape[0]} is none of SAM's ({MODEL_TYPES})")


class SAMSegmenter(Segmenter):
    """SAM's automatic masks ("segment everything") from a checkpoint the user gives (module docstring).

    Args:
        checkpoint: path of the SAM weights (.pth). Required unless `pretrained` is False.
        model_type: vit_b, vit_l, vit_h, or auto (from the checkpoint).
        points_per_side: the point-prompt grid is points_per_side^2 over the image.
        pred_iou: keep masks whose predicted IoU is above this (SAM's pred_iou_thresh).
        stability: keep masks whose stability score is above this.
        nms: box IoU above which the lower-scored of two masks is dropped.
        crop_layers: SAM's crop_n_layers (0: the whole image only; each layer adds 2^i x 2^i crops).
        min_area: drop masks smaller than this fraction of the image.
        pretrained: False builds random weights of `model_type` (tests).
        batch: point prompts decoded at once.
    """

    def __init__(self, checkpoint: str = "", model_type: str = "auto", points_per_side: int = 32,
                 pred_iou: float = 0.88, stability: float = 0.95, nms: float = 0.7, crop_layers: int = 0,
                 min_area: float = 0.002, pretrained: bool | int = True, batch: int = 64):
        self.checkpoint, self.pretrained = str(checkpoint), bool(pretrained)
        if self.pretrained and not self.checkpoint:
            raise TeacherError("the sam segmenter needs a checkpoint: sam:PATH (e.g. sam:sam_vit_b_01ec64.pth); "
                               "dfield fetches no weights")
        if self.pretrained and not Path(self.checkpoint).expanduser().is_file():
            raise TeacherError(f"{self.checkpoint}: SAM checkpoint not found")
        if model_type not in (*MODEL_TYPES, "auto") or (model_type == "auto" and not self.pretrained):
            raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)} (or auto with a checkpoint), "
                             f"got {model_type!r}")
        if points_per_side < 1 or crop_layers < 0 or batch < 1 or not 0 <= nms <= 1 or min_area < 0:
            raise ValueError("points_per_side and batch must be >= 1, crop_layers and min_area >= 0, nms in [0, 1]")
        self.model_type, self.points_per_side, self.crop_layers = model_type, int(points_per_side), int(crop_layers)
        self.pred_iou, self.stability, self.nms, self.min_area = float(pred_iou), float(stability), float(nms), float(min_area)
        self.batch = int(batch)
        weights = str(Path(self.checkpoint).expanduser().resolve()) if self.pretrained else f"random-{model_type}"
        self.name = (f"sam(weights={weights},model_type={model_type},points={self.points_per_side},"
                     f"pred_iou={self.pred_iou:g},stability={self.stability:g},nms={self.nms:g},"
                     f"crops={self.crop_layers},min_area={self.min_area:g})")
        self._generator = None

    def cache_token(self) -> bytes:
        """The checkpoint's size and time, so replaced weights are used again."""
        if not self.pretrained:
            return b""
        st = Path(self.checkpoint).expanduser().stat()
        return f"{st.st_size}\0{st.st_mtime_ns}".encode()

    @property
    def generator(self):
        """segment-anything's SamAutomaticMaskGenerator over the network, built on first use."""
        if self._generator is None:
            net = build_sam(self.model_type, self.checkpoint if self.pretrained else None)
            sa = _import_segment_anything()
            # min_mask_region_area stays 0: its hole filling needs OpenCV; small masks are dropped below instead.
            self._generator = sa.SamAutomaticMaskGenerator(
                net, points_per_side=self.points_per_side, points_per_batch=self.batch, pred_iou_thresh=self.pred_iou,
                stability_score_thresh=self.stability, box_nms_thresh=self.nms, crop_n_layers=self.crop_layers)
        return self._generator

    @torch.inference_mode()
    def segment(self, inputs: SegmentInputs) -> np.ndarray:
        """SAM's automatic masks of `inputs.image` as labels (the smallest mask wins where they overlap)."""
        image = np.ascontiguousarray(np.asarray(inputs.image, np.uint8))
        h, w = image.shape[:2]
        records = self.generator.generate(image)
        if not records:
            return np.zeros((h, w), np.int32)
        masks = np.stack([np.asarray(r["segmentation"], bool) for r in records])
        return masks_to_labels(masks, min_area=int(np.ceil(self.min_area * h * w)))
