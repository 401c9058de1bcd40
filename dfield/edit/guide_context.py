"""What guidance sees of an edit while it trains: the blended field rendered with gradients, with Blending-NeRF's
accumulated opacities of each edit kind (`render_terms`), and the training views it works on: the source's
renders of them, the region's mask in each, and crops around the region (`GuideContext`).

Only rays that cross the attention's box can change; everything else in a view is the source's render, taken as
it is, so a loss on a whole crop costs only the rays that cross the region.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dfield.core.rays import Rays, camera_image_rays, field_rays
from dfield.core.rendering import RenderSettings, scatter_samples, weights_from_density
from dfield.core.sampling import march, ray_aabb
from dfield.data.dataset import Cameras
from dfield.fields.blended import BlendedField


def render_terms(field: BlendedField, rays: Rays, s: RenderSettings, generator: torch.Generator | None = None) -> dict:
    """Render `rays` through a blended field with gradients to the edit, and the per-ray terms its priors need.

    Returns rgb (R, 3), acc (R,) and Blending-NeRF's accumulated opacities of each kind: `added` = 1 - exp(-sum
    s_E dt) (the edit's density alone), `removed` = 1 - exp(-sum r_sigma sigma_S dt) (the source density taken
    away), `recolored` = sum w r_c (the weight of replaced colour), and `region` = sum w [A > 0] (no gradient).
    Colour is evaluated only where the weight exceeds `s.weight_threshold`, as in `render_field`.
    """
    R = len(rays)
    smp = march(rays, field.aabb, s.near, s.far, s.step, field.occupancy, generator, s.max_samples)
    x, ri = smp.positions, smp.ray_index
    d = rays.directions[ri]
    dt = smp.dt[smp.mask]
    with torch.no_grad():
        a = field.attention(x)
        sigma_src = field.source.density(x)
    m = (a > 0).nonzero()[:, 0]
    p = field.parts(x[m], a[m], d[m], sigma_s=sigma_src[m])
    sigma = sigma_src.index_put((m,), p["sigma"])
    w, _ = weights_from_density(scatter_samples(smp.mask, sigma), smp.dt)
    wv = w[smp.mask]
    heavy = wv.detach() > s.weight_threshold
    heavy[m] = False  # region samples have their blended colour already
    h = heavy.nonzero()[:, 0]
    with torch.no_grad():
        c_out = field.source.color(x[h], d[h])
    rgb = x.new_zeros(R, 3).index_add(0, ri[h], wv[h, None] * c_out)
    rgb = rgb.index_add(0, ri[m], wv[m, None] * p["color"])
    acc = x.new_zeros(R).index_add(0, ri, wv)
    zero = x.new_zeros(R)
    added = zero.index_add(0, ri[m], p["sigma_e"] * dt[m])
    removed = zero.index_add(0, ri[m], p["r_sigma"] * p["sigma_s"] * dt[m])
    return {"rgb": rgb + (1 - acc)[:, None] * s.background.to(rgb), "acc": acc,
            "added": 1 - torch.exp(-added), "removed": 1 - torch.exp(-removed),
            "recolored": zero.index_add(0, ri[m], wv[m] * p["r_color"]),
            "region": zero.index_add(0, ri[m], wv[m].detach())}


@dataclass
class ViewData:
    """One training view as guidance uses it: the source's render and the region's soft mask in [0, 1]."""

    rgb: torch.Tensor  # (H, W, 3)
    acc: torch.Tensor  # (H, W)
    depth: torch.Tensor  # (H, W), expected distance (weighted sum of sample distances / opacity where opaque)
    region: torch.Tensor  # (H, W)


class GuideContext:
    """A blended field in training and the training views guidance works on (`views`: {index: ViewData})."""

    def __init__(self, field: BlendedField, settings: RenderSettings, cameras: Cameras, views: dict[int, ViewData],
                 ndc=None, device="cpu"):
        self.field, self.settings, self.cameras, self.views, self.ndc = field, settings, cameras, views, ndc
        self.device = torch.device(device)
        self.width, self.height = cameras.width, cameras.height
        self._crossing: dict[int, torch.Tensor] = {}

    def rays(self, view: int, pixels: torch.Tensor) -> Rays:
        """Rays of flat (row-major) pixel ids of training view `view`, on the context's device."""
        u = (pixels % self.width).float() + 0.5
        v = (pixels // self.width).float() + 0.5
        cam = torch.full_like(pixels, int(view))
        return field_rays(self.cameras, cam, u, v, self.ndc).to(self.device)

    def render(self, rays: Rays, generator: torch.Generator | None = None) -> dict:
        """`render_terms` of the blended field."""
        return render_terms(self.field, rays, self.settings, generator)

    def crossing(self, view: int) -> torch.Tensor:
        """Flat pixel ids of `view` whose rays cross the attention's support box (the only ones an edit can change)."""
        if view not in self._crossing:
            rays = camera_image_rays(self.cameras, view, self.ndc)
            box = self.field.attention.support_box().cpu()
            t0, t1 = ray_aabb(rays, box)
            self._crossing[view] = (t1 > t0.clamp(min=self.settings.near)).nonzero()[:, 0]
        return self._crossing[view]

    def source_rgb(self, view: int, pixels: torch.Tensor) -> torch.Tensor:
        """(P, 3) the source's colours of pixels of `view`."""
        return self.views[view].rgb.reshape(-1, 3)[pixels].to(self.device)

    def region_of(self, view: int, pixels: torch.Tensor) -> torch.Tensor:
        """(P,) the region's mask at pixels of `view`."""
        return self.views[view].region.reshape(-1)[pixels].to(self.device)

    def crop_box(self, view: int, grow: float = 0.3, minimum: int = 24) -> tuple[int, int, int, int] | None:
        """A square (x0, y0, x1, y1) around the region's pixels in `view` (mask above 0.5), grown by `grow` of its
        size, at least `minimum` pixels, inside the image; None when the region is not in view."""
        ys, xs = (self.views[view].region > 0.5).nonzero(as_tuple=True)
        if len(xs) == 0:
            return None
        cx, cy = (xs.min() + xs.max() + 1).item() / 2, (ys.min() + ys.max() + 1).item() / 2
        side = max(minimum, int(max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1).item() * (1 + grow)))
        side = min(side, self.width, self.height)
        x0 = int(min(max(0, round(cx - side / 2)), self.width - side))
        y0 = int(min(max(0, round(cy - side / 2)), self.height - side))
        return x0, y0, x0 + side, y0 + side

    def render_crop(self, view: int, box: tuple[int, int, int, int],
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(edited (h, w, 3) with gradients, source (h, w, 3), render terms of the rays rendered) for a pixel box of
        `view`: rays that cannot meet the region are the source's pixels."""
        x0, y0, x1, y1 = box
        ys, xs = torch.meshgrid(torch.arange(y0, y1), torch.arange(x0, x1), indexing="ij")
        pix = (ys * self.width + xs).reshape(-1)
        src = self.source_rgb(view, pix)
        cross = torch.zeros(self.width * self.height, dtype=torch.bool)
        cross[self.crossing(view)] = True
        k = cross[pix].nonzero()[:, 0]
        out = self.render(self.rays(view, pix[k]), generator) if len(k) else {}
        img = src.index_put((k.to(self.device),), out["rgb"]) if len(k) else src
        shape = (y1 - y0, x1 - x0, 3)
        return img.reshape(shape), src.reshape(shape), out
