"""CLIP dense features in the text embedding space (MaskCLIP), through Hugging Face `transformers`.

CLIP's image embedding is the CLS token; its patch tokens are not aligned with text. MaskCLIP
(Zhou et al., 2022) gets aligned per-patch features by changing only the last block: each patch's
value embedding, v_proj(layer_norm1(x)), goes through out_proj without attention mixing (and without
the residual and MLP), then through post_layernorm and visual_projection, the same head the CLS token
takes. So patch features can be compared with encode_text() by cosine similarity.

    ClipTeacher("openai/clip-vit-base-patch16")      # from the Hugging Face cache or the network
    ClipTeacher("/models/clip-vit-b16")              # a folder saved with save_pretrained
    ClipTeacher.from_model(model, tokenizer)         # an already built CLIPModel

Install: pip install transformers (uses the installed torch; needs no torchvision).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

from dfield.errors import TeacherError
from dfield.features.teachers.base import Teacher, resize_normalize

DEFAULT_MODEL = "openai/clip-vit-base-patch16"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _transformers():
    try:
        import transformers  # heavy (about 1.5 s) and only this teacher needs it
    except ImportError as e:
        raise TeacherError(f"the clip teacher needs transformers ({e}): pip install transformers") from None
    return transformers


def _no_weights(name: str, why: str = "no local copy and no network") -> TeacherError:
    return TeacherError(f"could not load CLIP weights '{name}': {why}; pass a local folder with --teacher.model PATH")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick check before asking the hub, which otherwise retries for ~20 s when there is no network."""
    try:
        from huggingface_hub import constants  # comes with transformers, which only this teacher needs

        url = urlparse(constants.ENDPOINT)
    except Exception:
        url = urlparse("https://huggingface.co")
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def tokenizer_and_normalization(src: str, path: Path, local: bool):
    """(tokenizer or None, image mean, image std) of the CLIP-family model loaded from `src`: the tokenizer when
    one is there, the normalisation from its folder's preprocessor_config.json, else CLIP's."""
    tokenizer = None
    try:
        tokenizer = _transformers().AutoTokenizer.from_pretrained(src, local_files_only=local)
    except Exception:  # no tokenizer files: image-only use still works
        pass
    mean, std = CLIP_MEAN, CLIP_STD
    cfg = path / "preprocessor_config.json"
    if cfg.is_file():
        try:
            pre = json.loads(cfg.read_text())
            mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
        except (OSError, ValueError):
            pass
    return tokenizer, mean, std


def _load(name: str, local_files_only: bool | None):
    """(CLIPModel, tokenizer or None, mean, std, id) from a local folder or a Hugging Face hub name."""
    tr = _transformers()
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise _no_weights(name, "not a folder")
        sources, ident = [(str(path), True)], str(path.resolve())
    elif path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise _no_weights(name, "no such folder")
    else:
        offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        sources, ident = [(name, True)], name
        if not offline and _hub_reachable():
            sources.append((name, False))
    model = err = None
    for src, local in sources:
        try:
            model = tr.CLIPModel.from_pretrained(src, local_files_only=local)
            break
        except Exception as e:  # OSError, HF hub errors, network errors: all mean "not available"
            err = e
    if model is None:
        first = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        if path.exists():
            raise _no_weights(name, first)
        if len(sources) > 1:  # the hub answered, but has no such model (or refused it)
            raise _no_weights(name, f"not in the local cache nor downloadable ({first})")
        raise _no_weights(name)
    tokenizer, mean, std = tokenizer_and_normalization(src, path, local)
    return model, tokenizer, mean, std, ident


class ClipTeacher(Teacher):
    """MaskCLIP features (N, h'/p, w'/p, projection_dim) of images resized to shorter side `input_size`
    (default: the model's own image size, 224 for the OpenAI models), unit-norm when `normalize`."""

    text_aligned = True

    def __init__(self, model: str = DEFAULT_MODEL, input_size: int | None = None, normalize: bool = True,
                 local_files_only: bool | None = None):
        m, tok, mean, std, ident = _load(str(model), local_files_only)
        self._setup(m, tok, ident, input_size or m.config.vision_config.image_size, normalize, mean, std)

    @classmethod
    def from_model(cls, model, processor_or_tokenizer=None, input_size: int | None = None, normalize: bool = True,
                   name: str | None = None) -> "ClipTeacher":
        """Wrap a constructed CLIPModel. `name` identifies it in cache keys (default: a hash of its weights)."""
        tok = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
        ip = getattr(processor_or_tokenizer, "image_processor", None)
        mean = tuple(getattr(ip, "image_mean", None) or CLIP_MEAN)
        std = tuple(getattr(ip, "image_std", None) or CLIP_STD)
        if name is None:
            h = hashlib.sha1(model.config.to_json_string().encode())
            for p in model.state_dict().values():
                h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            name = f"model-{h.hexdigest()[:12]}"
        self = cls.__new__(cls)
        self._setup(model, tok, name, input_size or model.config.vision_config.image_size, normalize, mean, std)
        return self

    def _setup(self, model, tokenizer, ident, input_size, normalize, mean, std):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.ident = ident
        self.patch = int(model.config.vision_config.patch_size)
        if not (isinstance(input_size, int) and input_size >= self.patch):
            raise TeacherError(f"clip input_size must be an integer >= the patch size {self.patch}, got {input_size!r}")
        self.input_size, self.normalize, self.mean, self.std = input_size, bool(normalize), mean, std
        self.dim = int(model.config.projection_dim)
        self.name = f"clip-maskclip({ident},size={input_size},norm={int(self.normalize)})"

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, object_ids: torch.Tensor | None = None) -> torch.Tensor:
        vm = self.model.vision_model
        dev = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        x = resize_normalize(images, self.input_size, self.patch, self.mean, self.std).to(dev, dtype)
        n, _, h, w = x.shape
        size = vm.embeddings.image_size
        hs = vm.embeddings(x, interpolate_pos_encoding=(h, w) != (size, size))
        hs = vm.pre_layrnorm(hs)
        layers = vm.encoder.layers
        for layer in layers[:-1]:
            out = layer(hs, None)
            hs = out[0] if isinstance(out, tuple) else out
        last = layers[-1]
        v = last.self_attn.out_proj(last.self_attn.v_proj(last.layer_norm1(hs)))
        f = self.model.visual_projection(vm.post_layernorm(v[:, 1:]))  # CLS dropped
        f = f.float().reshape(n, h // self.patch, w // self.patch, self.dim)
        if self.normalize:
            f = F.normalize(f, dim=-1)
        return f.cpu()

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """(T, D) unit-norm text embeddings (compare with features by cosine)."""
        if self.tokenizer is None:
            raise TeacherError(f"{self.name} has no tokenizer; pass one to ClipTeacher.from_model or use a model "
                               "folder that includes its tokenizer files")
        if isinstance(texts, str):
            texts = [texts]
        ctx = int(self.model.config.text_config.max_position_embeddings)
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=ctx, return_tensors="pt")
        dev = next(self.model.parameters()).device
        out = self.model.get_text_features(input_ids=tok["input_ids"].to(dev),
                                           attention_mask=tok.get("attention_mask").to(dev)
                                           if tok.get("attention_mask") is not None else None)
        if not torch.is_tensor(out):
            out = out.pooler_output
        return F.normalize(out.float(), dim=-1).cpu()
