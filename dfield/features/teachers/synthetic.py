"""A teacher made from ground truth, with the kinds of errors real 2D teachers make.

For generated scenes (which carry per-pixel object ids) this stands in for a network teacher, so
distillation can be tested and scored exactly: every object id has a fixed random unit embedding,
and each view's feature map is

  1. the id map taken down to `resolution_scale` of the image (majority vote per cell: coarse, like a
     ViT patch grid),
  2. with a fraction `confusion` of the cells relabelled as another object, in blobs a few cells wide
     (smooth random field thresholded), like a teacher that mistakes a region for something else,
  3. embedded with that view's slightly distorted copy of the embeddings (each view applies its own
     random near-identity linear map, strength `view_jitter`: features are not multi-view consistent),
  4. plus Gaussian noise with expected norm `noise` per cell (embeddings have norm 1).

A 3D field distilled from many such views should beat the teacher on held-out views, since blobs,
distortions and noise differ from view to view while the object underneath does not.

The random draws of a view depend only on `seed` and the view's content (its id map and pixels),
so a view gets the same features whatever batch, order or subset it is encoded in.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from dfield.errors import TeacherError
from dfield.features.teachers.base import Teacher


def mode_downsample(ids, h: int, w: int, num_ids: int | None = None) -> torch.Tensor:
    """(H, W) integer ids -> (h, w) majority id per cell (cells spread evenly over the image; ties -> lowest id)."""
    a = np.asarray(torch.as_tensor(ids).cpu(), dtype=np.int64)
    H, W = a.shape
    k = int(a.max()) + 1 if num_ids is None else int(num_ids)
    cy = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
    cx = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
    cell = cy[:, None] * w + cx[None, :]
    counts = np.bincount((cell * k + a).ravel(), minlength=h * w * k).reshape(h * w, k)
    return torch.from_numpy(counts.argmax(1).reshape(h, w))


def segment(features, embeddings) -> torch.Tensor:
    """Index of the nearest embedding by cosine similarity: features (..., D), embeddings (K, D) -> (...) long."""
    f = F.normalize(torch.as_tensor(features).float(), dim=-1)
    e = F.normalize(torch.as_tensor(embeddings).float().to(f.device), dim=-1)
    return (f @ e.T).argmax(-1)


class SyntheticTeacher(Teacher):
    uses_object_ids = True

    def __init__(self, dim: int = 32, resolution_scale: float = 0.25, noise: float = 0.5, view_jitter: float = 0.3,
                 confusion: float = 0.15, seed: int = 0, num_ids: int = 16, blob: int = 3):
        if int(dim) < 2:
            raise TeacherError(f"synthetic teacher: dim must be >= 2, got {dim}")
        if not 0 < resolution_scale <= 1:
            raise TeacherError(f"synthetic teacher: resolution_scale must be in (0, 1], got {resolution_scale}")
        if noise < 0 or view_jitter < 0:
            raise TeacherError("synthetic teacher: noise and view_jitter must be >= 0")
        if not 0 <= confusion < 1:
            raise TeacherError(f"synthetic teacher: confusion must be in [0, 1), got {confusion}")
        if int(num_ids) < 2 or int(blob) < 1:
            raise TeacherError("synthetic teacher: num_ids must be >= 2 and blob >= 1")
        self.dim, self.resolution_scale, self.noise = int(dim), float(resolution_scale), float(noise)
        self.view_jitter, self.confusion, self.seed = float(view_jitter), float(confusion), int(seed)
        self.num_ids, self.blob = int(num_ids), int(blob)
        self.name = (f"synthetic(dim={self.dim},scale={self.resolution_scale:g},noise={self.noise:g},"
                     f"jitter={self.view_jitter:g},confusion={self.confusion:g},blob={self.blob},"
                     f"seed={self.seed},ids={self.num_ids})")
        self._emb = np.stack([self._embedding(i) for i in range(self.num_ids)])

    def _embedding(self, i: int) -> np.ndarray:
        e = np.random.default_rng([self.seed, 0x5EED, i]).standard_normal(self.dim)
        return e / np.linalg.norm(e)

    def object_embeddings(self, k: int | None = None) -> torch.Tensor:
        """(K, D) clean unit embeddings of ids 0..K-1 (default: all `num_ids`); row i is the same for any K."""
        k = self.num_ids if k is None else int(k)
        rows = [self._emb[i] if i < self.num_ids else self._embedding(i) for i in range(k)]
        return torch.from_numpy(np.stack(rows).astype(np.float32))

    def resolution(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the feature map for an image of height x width."""
        return max(1, round(height * self.resolution_scale)), max(1, round(width * self.resolution_scale))

    def encode(self, images: torch.Tensor, object_ids: torch.Tensor | None = None) -> torch.Tensor:
        if object_ids is None:
            raise TeacherError(f"the synthetic teacher needs ground-truth object ids (generated scenes have them); "
                               f"got none for {tuple(images.shape)} images")
        images, object_ids = torch.as_tensor(images), torch.as_tensor(object_ids)
        if object_ids.shape != images.shape[:3]:
            raise TeacherError(f"object ids {tuple(object_ids.shape)} do not match images {tuple(images.shape)}")
        return torch.stack([self._encode_one(images[i], object_ids[i]) for i in range(images.shape[0])])

    def _encode_one(self, image: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ids_np = np.ascontiguousarray(ids.cpu().numpy()).astype(np.int64)
        if ids_np.min() < 0 or ids_np.max() >= self.num_ids:
            raise TeacherError(f"synthetic teacher: object ids must be in 0..{self.num_ids - 1}, found "
                               f"{ids_np.min()}..{ids_np.max()} (raise num_ids)")
        digest = hashlib.sha1(ids_np.tobytes() + np.ascontiguousarray(image.cpu().numpy()).tobytes()).digest()
        rng = np.random.default_rng([self.seed, 0xF00D, int.from_bytes(digest[:8], "little")])
        H, W = ids_np.shape
        h, w = self.resolution(H, W)
        labels = mode_downsample(ids_np, h, w, self.num_ids).numpy()

        if self.confusion > 0:
            present = np.unique(labels)
            cands = present if present.size > 1 else np.arange(self.num_ids)
            gh, gw = math.ceil(h / self.blob) + 1, math.ceil(w / self.blob) + 1
            field = torch.from_numpy(rng.standard_normal((1, 1, gh, gw)))
            field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True)[0, 0].numpy()
            # Exactly round(confusion * h * w) cells, the highest of a smooth field: blobs, not speckle.
            n_swap = round(self.confusion * h * w)
            swap = np.zeros(h * w, dtype=bool)
            swap[np.argsort(-field.ravel(), kind="stable")[:n_swap]] = True
            swap = swap.reshape(h, w)
            coarse = rng.choice(cands, size=(gh, gw))
            cy = np.minimum(np.arange(h) * gh // h, gh - 1)
            cx = np.minimum(np.arange(w) * gw // w, gw - 1)
            other = coarse[cy[:, None], cx[None, :]]
            pos = np.searchsorted(cands, labels).clip(0, cands.size - 1)
            same = other == labels
            other[same] = cands[(pos[same] + 1) % cands.size]  # never "swap" to the same label
            labels = np.where(swap, other, labels)

        emb = self._emb
        if self.view_jitter > 0:
            a = np.eye(self.dim) + self.view_jitter * rng.standard_normal((self.dim, self.dim)) / math.sqrt(self.dim)
            emb = emb @ a
            emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        feats = emb[labels]
        if self.noise > 0:
            feats = feats + self.noise / math.sqrt(self.dim) * rng.standard_normal(feats.shape)
        return torch.from_numpy(feats.astype(np.float32))
