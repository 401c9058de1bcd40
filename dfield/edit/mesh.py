"""Meshes from density: marching cubes over a field's box, coloured by the field seen from outside."""

from __future__ import annotations

import math

import numpy as np
import torch
from skimage.measure import marching_cubes

from dfield.core.grids import voxel_res


@torch.no_grad()
def field_mesh(field, box: torch.Tensor | None = None, resolution: int = 192, opacity: float = 0.5,
               chunk: int = 2**18) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertices (V, 3), faces (F, 3) and vertex colours (V, 3) of the surface where a voxel-long step
    through the field would be `opacity` opaque (density = -ln(1 - opacity) / voxel size)."""
    box = (field.aabb if box is None else box).float().cpu()
    size = box[1] - box[0]
    voxel = float((size.prod() / resolution**3) ** (1 / 3))
    res = list(voxel_res(box, resolution**3, minimum=4))
    axes = [torch.linspace(float(box[0, k]), float(box[1, k]), res[k]) for k in range(3)]
    pts = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    sigma = torch.cat([field.density(p) for p in pts.split(chunk)]).reshape(res).numpy()
    level = -math.log(1 - opacity) / voxel
    if not (sigma.max() > level > sigma.min()):
        raise ValueError(f"no surface: density ranges {sigma.min():.3g}..{sigma.max():.3g} in the box, level {level:.3g} "
                         "(an empty selection, or try another --mesh-opacity)")
    spacing = tuple(float(size[k]) / (res[k] - 1) for k in range(3))
    verts, faces, normals, _ = marching_cubes(sigma, level, spacing=spacing)
    verts = torch.from_numpy(verts.copy()).float() + box[0]
    n = torch.nn.functional.normalize(torch.from_numpy(normals.copy()).float(), dim=-1)
    # Look at each vertex from outside: along the normal's side where density rises (into the surface).
    probe = 0.5 * voxel
    rising = torch.cat([field.density(v + probe * m) - field.density(v - probe * m)
                        for v, m in zip(verts.split(chunk), n.split(chunk))])
    view = torch.where((rising >= 0)[:, None], n, -n)
    colors = torch.cat([field.color(v, d) for v, d in zip(verts.split(chunk), view.split(chunk))]).clamp(0, 1)
    return verts.numpy(), faces.astype(np.int32), colors.numpy()
