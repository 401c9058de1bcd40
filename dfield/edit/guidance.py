"""What a guided edit should become, behind one interface: a `Guidance` turns the blended field's renders into loss
terms each step.

- `EditedViews`: one or two training views the user painted in an image editor. Painted pixels are matched, the
  other pixels the edit could reach keep the source's colour; the blended field carries the change to every
  other view. Offline; what most users can give.
- `Exemplar`: a reference image (or a colour swatch). Loss on an image encoder's embedding (DINOv2, offline) of
  crops of the rendered region: global (the crop looks like the exemplar) and directional (edited minus source
  points the way exemplar minus source does).
- `TextGuidance`: a text, with CLIP / SigLIP: the papers' global CLIP loss and directional CLIP loss (edited
  minus source image embedding aligned with target minus source text embedding), over random augmentations.

    g = EditedViews(load_edited_views("painted/", n, w, h))
    terms = g.loss(ctx, generator)     # {name: scalar tensor}, summed by the trainer
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dfield.edit.guide_context import GuideContext
from dfield.edit.region import painted_mask
from dfield.errors import EditError
from dfield.features.encoders import ImageEncoder


class Guidance:
    """Base class: `prepare(ctx)` once before training, then `loss(ctx, generator)` every step."""

    name = "guidance"

    def prepare(self, ctx: GuideContext) -> None:
        """Precompute what the loss needs (masks, target embeddings) from the context's source renders."""

    def loss(self, ctx: GuideContext, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Loss terms (already weighted) for one step, by name; `preserve_mse` (no gradient needed) may report how
        far pixels that should keep their colour moved."""
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-able settings, for guide.json."""
        return {"guidance": self.name}


class EditedViews(Guidance):
    """Painted training views {view: (H, W, 3) in [0, 1], NaN where transparent}: match painted pixels, keep the rest.

    Each step draws `batch` rays: half from painted pixels, half from the other pixels of those views whose rays
    can meet the region (so the edit neither spills onto them nor misses them).
    """

    name = "edited-views"

    def __init__(self, views: dict[int, torch.Tensor], batch: int = 2048, tol: float = 0.04, keep_weight: float = 1.0):
        if not views:
            raise EditError("edited-views guidance needs at least one painted view")
        self.views, self.batch, self.tol, self.keep_weight = views, batch, tol, keep_weight
        self.painted: dict[int, torch.Tensor] = {}
        self.kept: dict[int, torch.Tensor] = {}

    def prepare(self, ctx: GuideContext) -> None:
        for v, img in self.views.items():
            mask = painted_mask(img, ctx.views[v].rgb, self.tol).reshape(-1)
            known = ~torch.isnan(img).any(-1).reshape(-1)
            self.painted[v] = mask.nonzero()[:, 0]
            keep = torch.zeros_like(mask)
            keep[ctx.crossing(v)] = True
            self.kept[v] = (keep & ~mask & known).nonzero()[:, 0]
        if sum(len(p) for p in self.painted.values()) == 0:
            raise EditError(f"the edited views {sorted(self.views)} do not differ from the renders of those views "
                            f"(by more than {self.tol}); paint on `dfield render RUN --path train` output")

    def painted_pixels(self) -> int:
        """How many pixels differ from the source render, over all edited views."""
        return int(sum(len(p) for p in self.painted.values()))

    def _draw(self, pools: dict[int, torch.Tensor], n: int, g: torch.Generator) -> list[tuple[int, torch.Tensor]]:
        sizes = torch.tensor([len(p) for p in pools.values()], dtype=torch.float32)
        if sizes.sum() == 0 or n == 0:
            return []
        pick = torch.multinomial(sizes, n, replacement=True, generator=g)
        out = []
        for k, (v, pool) in enumerate(pools.items()):
            c = int((pick == k).sum())
            if c:
                out.append((v, pool[torch.randint(len(pool), (c,), generator=g)]))
        return out

    def loss(self, ctx: GuideContext, generator: torch.Generator) -> dict[str, torch.Tensor]:
        terms = {}
        half = self.batch // 2
        for name, pools, weight in (("paint", self.painted, 1.0), ("keep", self.kept, self.keep_weight)):
            picks = self._draw(pools, half, generator)
            if not picks:
                continue
            rays = [ctx.rays(v, p) for v, p in picks]
            target = torch.cat([self.views[v].reshape(-1, 3)[p] for v, p in picks]).to(ctx.device)
            out = ctx.render(type(rays[0])(torch.cat([r.origins for r in rays]), torch.cat([r.directions for r in rays])),
                             generator)
            err = (out["rgb"] - target).square().mean()
            terms[name] = weight * err
            if name == "keep":
                terms["keep_mse"] = err.detach()
        return terms

    def describe(self) -> dict:
        return {"guidance": self.name, "views": sorted(self.views), "painted_pixels": self.painted_pixels()}


def augment(images: torch.Tensor, n: int, generator: torch.Generator, scale=(0.7, 1.0)) -> torch.Tensor:
    """`n` random augmentations of a stack of images (K, 3, H, W) -> (n, K, 3, H, W): the same random resized crop and
    horizontal flip for each image of the stack (so edited and source crops stay aligned), differentiable.

    Example:
        >>> augment(torch.rand(2, 3, 16, 16), 4, torch.Generator().manual_seed(0)).shape
        torch.Size([4, 2, 3, 16, 16])
    """
    k = images.shape[0]
    out = []
    for _ in range(n):
        s = scale[0] + (scale[1] - scale[0]) * torch.rand(1, generator=generator).item()
        tx, ty = ((torch.rand(2, generator=generator) * 2 - 1) * (1 - s)).tolist()
        flip = -1.0 if torch.rand(1, generator=generator).item() < 0.5 else 1.0
        theta = torch.tensor([[s * flip, 0, tx], [0, s, ty]], dtype=images.dtype, device=images.device)
        grid = F.affine_grid(theta[None].expand(k, 2, 3), list(images.shape), align_corners=False)
        out.append(F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False))
    return torch.stack(out)


class _EmbeddingGuidance(Guidance):
    """Shared by exemplar and text guidance: crops of the region in random views, augmented, encoded; subclasses
    give the target embedding and the direction."""

    def __init__(self, encoder: ImageEncoder, global_weight: float = 1.0, directional_weight: float = 1.0,
                 augmentations: int = 4, views_per_step: int = 1):
        self.encoder = encoder
        self.global_weight, self.directional_weight = global_weight, directional_weight
        self.augmentations, self.views_per_step = augmentations, views_per_step
        self.crop_views: list[int] = []

    def prepare(self, ctx: GuideContext) -> None:
        self.crop_views = [v for v in ctx.views if ctx.crop_box(v) is not None]
        if not self.crop_views:
            raise EditError("the region is not visible in any training view: nothing to render for the guidance")

    def target(self, src_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(target embedding (D,), target direction (D,)) given the source crop's embeddings (n, D)."""
        raise NotImplementedError

    def loss(self, ctx: GuideContext, generator: torch.Generator) -> dict[str, torch.Tensor]:
        g_terms, d_terms = [], []
        for _ in range(self.views_per_step):
            v = self.crop_views[int(torch.randint(len(self.crop_views), (1,), generator=generator))]
            edited, source, _ = ctx.render_crop(v, ctx.crop_box(v), generator)
            pair = torch.stack([edited, source]).permute(0, 3, 1, 2)
            aug = augment(pair, self.augmentations, generator)
            e = self.encoder.encode_image(aug[:, 0])
            with torch.no_grad():
                s = self.encoder.encode_image(aug[:, 1])
            t, direction = self.target(s)
            g_terms.append(1 - (e @ t.to(e)).mean())
            delta = F.normalize(e - s, dim=-1, eps=1e-6)
            d_terms.append(1 - (delta @ direction.to(e)).mean())
        terms = {}
        if self.global_weight:
            terms["global"] = self.global_weight * torch.stack(g_terms).mean()
        if self.directional_weight:
            terms["directional"] = self.directional_weight * torch.stack(d_terms).mean()
        return terms


class Exemplar(_EmbeddingGuidance):
    """A reference image (H, W, 3) in [0, 1] (or a colour swatch) that the region should come to look like."""

    name = "exemplar"

    def __init__(self, encoder: ImageEncoder, image: torch.Tensor, **kw):
        super().__init__(encoder, **kw)
        self.image = image.float().clamp(0, 1)
        with torch.no_grad():
            self.embedding = encoder.encode_image(self.image.permute(2, 0, 1)[None])[0]

    def target(self, src_embedding):
        direction = F.normalize(self.embedding[None] - src_embedding, dim=-1, eps=1e-6).mean(0)
        return self.embedding, F.normalize(direction, dim=0, eps=1e-6)

    def describe(self) -> dict:
        return {"guidance": self.name, "encoder": self.encoder.name, "exemplar_size": list(self.image.shape[:2])}


class TextGuidance(_EmbeddingGuidance):
    """A text the region should come to match (CLIP / SigLIP), with `source_text` describing it before (the
    directional loss's reference)."""

    name = "text"

    def __init__(self, encoder: ImageEncoder, text: str, source_text: str = "a photo of an object", **kw):
        if not getattr(encoder, "text_aligned", False):
            raise EditError(f"text guidance needs a text-aligned encoder (CLIP / SigLIP); {encoder.name} is not")
        super().__init__(encoder, **kw)
        self.text, self.source_text = text, source_text
        t = encoder.encode_text([text, source_text])
        self.embedding, self.direction = t[0], F.normalize(t[0] - t[1], dim=0, eps=1e-6)

    def target(self, src_embedding):
        return self.embedding, self.direction

    def describe(self) -> dict:
        return {"guidance": self.name, "encoder": self.encoder.name, "text": self.text, "source_text": self.source_text}


def swatch(color, size: int = 64) -> torch.Tensor:
    """A (size, size, 3) image of one colour (an exemplar from a colour).

    Example:
        >>> swatch([0.2, 0.8, 0.2], 4)[0, 0].tolist()
        [0.20000000298023224, 0.800000011920929, 0.20000000298023224]
    """
    c = torch.tensor([float(v) for v in color], dtype=torch.float32)
    if c.shape != (3,) or not ((c >= 0) & (c <= 1)).all() or not math.isfinite(float(c.sum())):
        raise EditError(f"a colour swatch is three numbers in [0, 1], got {list(color)}")
    return c.expand(size, size, 3).clone()
