"""Procedural multi-object scenes with ground truth, written as a Blender-format dataset.

A few coloured primitives stand on a checkered ground disk. A numpy ray tracer renders them with
Lambertian shading, one directional light plus ambient light, and hard shadows. All of it is
view-independent, so a radiance field can fit it exactly, and every pixel's object is known, so
segmentation and feature fields can be scored against ground truth.

World frame is z-up like Blender: the ground is the disk z = 0, r <= 1.2; objects stand on it,
at most ~0.8 tall, and everything lies inside the aabb [-1.5, 1.5]^3.

Written to `out_dir` (the layout of Blender's synthetic scenes, plus ground truth):
  transforms_{train,test}.json  camera_angle_x, frames [file_path, transform_matrix (c2w, OpenGL
                                camera: looks down -z, +y up), id_path], and aabb, near, far.
                                transforms_val.json only when n_val > 0 (no copy of test).
  {split}/r_{i}.png             RGBA; rays that miss everything are transparent, to be composited
                                onto white like the lego scene. Antialiased with supersample^2
                                regular sub-samples per pixel.
  {split}/id_{i}.png            uint8 id of what each pixel's centre ray hits: 0 nothing, 1 ground,
                                2.. objects.
  objects.json                  {"objects": [...], "background_id": 0, "light": ..., "spec": ...}

Focal length is 0.5 * width / tan(0.5 * camera_angle_x) for both axes, principal point at the
image centre, as Blender readers assume. Output bytes depend only on the spec.

With `unbounded` the objects get surroundings, a 360-degree scene whose content goes far beyond the
cameras: the ground continues past the disk to the horizon (a smooth texture that does not alias), a
ring of tall patterned pillars stands 5 to 12 units away, and a sky dome of radius `SKY_RADIUS` closes
everything, so every pixel is opaque. Surroundings have id 0 (they are not objects); the json keeps the
objects' aabb, and its far bound reaches the sky.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dfield.data.poses import look_at

AABB = ((-1.5, -1.5, -1.5), (1.5, 1.5, 1.5))
GROUND_RADIUS = 1.2
GROUND_TILE = 0.2
GROUND_COLORS = ((0.80, 0.78, 0.74), (0.55, 0.55, 0.57))
TARGET = np.array([0.0, 0.0, 0.3])
AMBIENT, DIFFUSE = 0.35, 0.65
EPS = 1e-7  # smallest accepted ray distance
SHADOW_OFFSET = 1e-4  # lift shadow-ray origins off the surface so they cannot re-hit it

PALETTE = {
    "red": (0.86, 0.16, 0.14),
    "green": (0.18, 0.66, 0.22),
    "blue": (0.16, 0.32, 0.86),
    "yellow": (0.94, 0.82, 0.16),
    "orange": (0.96, 0.52, 0.10),
    "purple": (0.52, 0.22, 0.74),
    "cyan": (0.12, 0.72, 0.78),
    "pink": (0.94, 0.46, 0.66),
    "brown": (0.52, 0.33, 0.18),
}
SHAPES = ("sphere", "box", "cylinder", "cone", "torus")
PATTERNS = ("plain", "stripes", "checker", "dots")
SKY_RADIUS = 50.0  # unbounded scenes: the dome around the origin that closes the scene
PILLAR_RING = (5.0, 12.0)  # unbounded scenes: distances of the pillars from the origin
N_PILLARS = 9


@dataclass
class SceneSpec:
    """What `generate_scene` renders: seed (layout, light, cameras), views per split, image size, object count
    and the cameras' field of view, distance and elevation range; `texture` > 0 adds procedural noise to every
    surface (multiplies albedo by 1 +- 1.5 texture x noise), the detail feature matching needs."""

    seed: int = 0
    n_train: int = 60
    n_test: int = 20
    n_val: int = 0  # 0 writes no transforms_val.json
    width: int = 100
    height: int = 100
    n_objects: int = 5  # 1..9 (one per palette colour)
    shared_colors: int = 0  # this many objects after the first take its colour (same colour, another shape)
    supersample: int = 2  # sub-samples per pixel side, for antialiasing RGB and alpha
    camera_angle_x: float = 0.6911112  # lego's horizontal field of view, radians
    radius_min: float = 3.5  # camera distance from the look-at point (0, 0, 0.3)
    radius_max: float = 4.0
    elevation_min_deg: float = 15.0
    elevation_max_deg: float = 60.0
    texture: float = 0.0  # 0..1: multiply every surface by procedural noise (features for structure from motion)
    # Variants of the same scene (same layout, light and cameras), the ground truth of guided edits:
    recolor: tuple[float, ...] = ()  # (ID, R, G, B): object ID takes this colour (its pattern keeps its shade)
    remove: int = 0  # object ID is left out
    add_sphere: tuple[float, ...] = ()  # (X, Y, Z, RADIUS, R, G, B): one more (plain) sphere, id n_objects + 2
    unbounded: bool = False  # surroundings to the horizon: ground, far pillars and a sky (see the module docstring)


# ----------------------------------------------------------------------------------------------
# Ray-primitive intersection, in each primitive's local frame (origin at its centre, z up).
# Each returns the nearest distance > EPS along unit directions `d`, inf where the ray misses.


def _dot(a, b):
    return np.einsum("ij,ij->i", a, b)


def _first(*candidates):
    return np.minimum.reduce([np.where(np.isfinite(t) & (t > EPS), t, np.inf) for t in candidates])


def _quadratic(a, b, c):
    """Both roots of a t^2 + b t + c (nan where none); a may be 0 for rays along a cone's side."""
    with np.errstate(divide="ignore", invalid="ignore"):
        sq = np.sqrt(b * b - 4 * a * c)
        return (-b - sq) / (2 * a), (-b + sq) / (2 * a)


def _hit_sphere(o, d, radius):
    b = _dot(o, d)
    with np.errstate(invalid="ignore"):
        sq = np.sqrt(b * b - _dot(o, o) + radius * radius)
    return _first(-b - sq, -b + sq)


def _hit_box(o, d, size):
    half = np.asarray(size) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (-half - o) / d, (half - o) / d
    near, far = np.minimum(t1, t2).max(1), np.maximum(t1, t2).min(1)
    return np.where(near <= far, _first(near, far), np.inf)


def _hit_cylinder(o, d, radius, height):
    hh = height / 2
    ts = _quadratic(d[:, 0] ** 2 + d[:, 1] ** 2, 2 * (o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1]),
                    o[:, 0] ** 2 + o[:, 1] ** 2 - radius**2)
    side = [np.where(np.abs(o[:, 2] + t * d[:, 2]) <= hh, t, np.inf) for t in ts]
    caps = [_hit_cap(o, d, z, radius) for z in (-hh, hh)]
    return _first(*side, *caps)


def _hit_cone(o, d, radius, height):
    # Base at z = -h/2, apex at z = +h/2: x^2 + y^2 = k^2 (h/2 - z)^2 with k = radius / height.
    hh, k2 = height / 2, (radius / height) ** 2
    w = hh - o[:, 2]
    ts = _quadratic(d[:, 0] ** 2 + d[:, 1] ** 2 - k2 * d[:, 2] ** 2,
                    2 * (o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1] + k2 * w * d[:, 2]),
                    o[:, 0] ** 2 + o[:, 1] ** 2 - k2 * w * w)
    side = [np.where(np.abs(o[:, 2] + t * d[:, 2]) <= hh, t, np.inf) for t in ts]  # not the mirror cone
    return _first(*side, _hit_cap(o, d, -hh, radius))


def _hit_cap(o, d, z, radius):
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (z - o[:, 2]) / d[:, 2]
        x, y = o[:, 0] + t * d[:, 0], o[:, 1] + t * d[:, 1]
        return np.where(x * x + y * y <= radius * radius, t, np.inf)


def _hit_torus(o, d, major_radius, minor_radius):
    # The quartic's roots are the eigenvalues of its companion matrix (batched LAPACK, no Python
    # loop). Starting from the bounding sphere's entry point, in units of the major radius, keeps
    # the coefficients well conditioned.
    big, small = major_radius, minor_radius / major_radius
    b = _dot(o, d)
    t0 = np.maximum(-b - np.sqrt(np.maximum(b * b - _dot(o, o) + (major_radius + minor_radius) ** 2, 0)), 0)
    p = (o + t0[:, None] * d) / big
    e, f = _dot(p, p) + 1 - small * small, _dot(p, d)
    c3 = 4 * f
    c2 = 4 * f * f + 2 * e - 4 * (d[:, 0] ** 2 + d[:, 1] ** 2)
    c1 = 4 * e * f - 8 * (p[:, 0] * d[:, 0] + p[:, 1] * d[:, 1])
    c0 = e * e - 4 * (p[:, 0] ** 2 + p[:, 1] ** 2)
    companion = np.zeros((len(o), 4, 4))
    companion[:, 0] = -np.stack([c3, c2, c1, c0], 1)
    companion[:, [1, 2, 3], [0, 1, 2]] = 1
    roots = np.linalg.eigvals(companion)
    t = roots.real.copy()
    cs = [c[:, None] for c in (c3, c2, c1, c0)]
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(2):  # Newton polish: eigenvalues lose digits near double roots
            val = (((t + cs[0]) * t + cs[1]) * t + cs[2]) * t + cs[3]
            slope = ((4 * t + 3 * cs[0]) * t + 2 * cs[1]) * t + cs[2]
            t = np.where(slope != 0, t - val / slope, t)
    t = np.where((np.abs(roots.imag) < 1e-6) & (t > EPS), t, np.inf).min(1)
    return t0 + t * big


_HIT = {"sphere": _hit_sphere, "box": _hit_box, "cylinder": _hit_cylinder, "cone": _hit_cone, "torus": _hit_torus}


def _normal(shape, p, params):
    """Outward unit normal at local surface points `p`."""
    x, y, z = p.T
    if shape == "sphere":
        n = p.copy()
    elif shape == "box":
        q = np.abs(p) / np.asarray(params["size"])
        axis = q.argmax(1)
        n = np.zeros_like(p)
        n[np.arange(len(p)), axis] = np.sign(p[np.arange(len(p)), axis])
    elif shape == "torus":
        rho = np.maximum(np.hypot(x, y), 1e-12)
        n = p - params["major_radius"] * np.stack([x / rho, y / rho, 0 * z], 1)
    else:  # cylinder or cone: pick side or cap by which surface the point is closer to
        r, hh = params["radius"], params["height"] / 2
        rho = np.maximum(np.hypot(x, y), 1e-12)
        if shape == "cylinder":
            on_cap = np.abs(z) - hh > rho - r
            side = np.stack([x / rho, y / rho, 0 * z], 1)
        else:
            k = r / params["height"]
            on_cap = z + hh < np.abs(rho - k * (hh - z))
            side = np.stack([x / rho, y / rho, np.full_like(z, k)], 1)
        n = np.where(on_cap[:, None], np.stack([0 * x, 0 * y, np.sign(z)], 1), side)
    return n / np.linalg.norm(n, axis=1, keepdims=True)


def _pattern(kind, p, period):
    """Where a surface texture takes its second colour, from local points (so it moves with the object)."""
    cells = np.floor(p / period).astype(np.int64)
    if kind == "stripes":
        return cells[:, 2] % 2 == 1
    if kind == "checker":
        return cells.sum(1) % 2 == 1
    if kind == "dots":
        frac = p / period - np.round(p / period)
        return np.linalg.norm(frac, axis=1) < 0.3
    return np.zeros(len(p), bool)


# ----------------------------------------------------------------------------------------------
# Scene


@dataclass
class _Object:
    id: int
    name: str
    shape: str
    color: np.ndarray
    pattern: str
    period: float
    center: np.ndarray
    yaw: float
    params: dict
    footprint: float  # radius of the circle it covers on the ground

    @property
    def bound(self):  # bounding-sphere radius about the centre (which is at half height)
        return math.hypot(self.footprint, self.center[2])

    def _rot(self, v, sign):
        c, s = math.cos(sign * self.yaw), math.sin(sign * self.yaw)
        return np.stack([c * v[:, 0] - s * v[:, 1], s * v[:, 0] + c * v[:, 1], v[:, 2]], 1)

    def hit(self, o, d):
        # Only rays through the bounding sphere are solved exactly; most rays miss most objects.
        oc = o - self.center
        b = _dot(oc, d)
        disc = b * b - _dot(oc, oc) + self.bound**2
        idx = np.nonzero((disc >= 0) & (-b + np.sqrt(np.maximum(disc, 0)) > 0))[0]
        t = np.full(len(d), np.inf)
        if len(idx):
            t[idx] = _HIT[self.shape](self._rot(oc[idx], -1), self._rot(d[idx], -1), **self.params)
        return t

    def surface(self, p):
        """World normals and albedo at world surface points."""
        local = self._rot(p - self.center, -1)
        second = _pattern(self.pattern, local, self.period)
        albedo = np.where(second[:, None], 0.45 * self.color, self.color)
        return self._rot(_normal(self.shape, local, self.params), 1), albedo

    def to_json(self):
        if self.shape == "box":
            sx, sy, _ = np.asarray(self.params["size"]) / 2
            corners = np.array([[sx, sy, 0], [sx, -sy, 0], [-sx, sy, 0], [-sx, -sy, 0]])
            reach = self._rot(corners, 1)[:, :2].max(0)
        else:
            reach = np.full(2, self.footprint)
        lo, hi = np.r_[self.center[:2] - reach, 0.0], np.r_[self.center[:2] + reach, 2 * self.center[2]]
        params = {k: _round(v) for k, v in self.params.items()}
        return {"id": self.id, "name": self.name, "shape": self.shape, "color": _round(self.color),
                "pattern": self.pattern, "pattern_period": _round(self.period), "center": _round(self.center),
                "yaw": _round(self.yaw), **params, "bbox": [_round(lo), _round(hi)]}


def _round(x):
    return np.round(np.asarray(x, float), 6).tolist()


def _sample_shape(shape, rng, scale):
    """Size parameters, height and footprint radius of one primitive."""
    u = lambda lo, hi: float(rng.uniform(lo, hi) * scale)  # noqa: E731
    if shape == "sphere":
        r = u(0.2, 0.32)
        return {"radius": r}, 2 * r, r
    if shape == "box":
        size = [u(0.3, 0.55), u(0.3, 0.55), u(0.3, 0.75)]
        return {"size": size}, size[2], math.hypot(size[0], size[1]) / 2
    if shape in ("cylinder", "cone"):
        r = u(0.15, 0.25) if shape == "cylinder" else u(0.2, 0.3)
        h = u(0.45, 0.8)
        return {"radius": r, "height": h}, h, r
    big, small = u(0.2, 0.27), u(0.07, 0.1)
    return {"major_radius": big, "minor_radius": small}, 2 * small, big + small


def _layout(n, rng, shared: int = 0):
    colors = [str(c) for c in rng.permutation(list(PALETTE))[:n]]
    colors[1:1 + shared] = [colors[0]] * len(colors[1:1 + shared])
    shapes = [str(s) for s in rng.permutation(SHAPES)][:n]
    shapes += [str(s) for s in rng.choice(SHAPES, n - len(shapes))]
    scale = 1.0
    while True:  # shrink everything until it all fits on the ground without touching
        objects, placed = [], []
        for i, (color, shape) in enumerate(zip(colors, shapes)):
            params, height, foot = _sample_shape(shape, rng, scale)
            for _ in range(100):
                r = (GROUND_RADIUS - 0.15 - foot) * math.sqrt(rng.uniform())
                a = rng.uniform(0, 2 * math.pi)
                xy = np.array([r * math.cos(a), r * math.sin(a)])
                if all(np.linalg.norm(xy - q) > foot + f + 0.05 for q, f in placed):
                    break
            else:
                break
            placed.append((xy, foot))
            pattern = str(rng.choice(PATTERNS))
            objects.append(_Object(
                id=i + 2, name=f"{color} {shape}", shape=shape, color=np.array(PALETTE[color]),
                pattern=pattern, period=float(rng.uniform(0.06, 0.12)) * scale, center=np.r_[xy, height / 2],
                yaw=float(rng.uniform(0, math.pi)) if shape == "box" else 0.0, params=params,
                footprint=foot))
        if len(objects) == n:
            return objects
        scale *= 0.9


# ----------------------------------------------------------------------------------------------
# Rendering


def _trace(objects, o, d):
    """Nearest hit of each ray: distance and id (0 nothing, 1 ground, 2.. objects)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = -o[:, 2] / d[:, 2]
    p = o + t[:, None] * d
    ground = (t > EPS) & (p[:, 0] ** 2 + p[:, 1] ** 2 <= GROUND_RADIUS**2)
    t = np.where(ground, t, np.inf)
    ids = ground.astype(np.int64)
    for obj in objects:
        to = obj.hit(o, d)
        closer = to < t
        t, ids = np.where(closer, to, t), np.where(closer, obj.id, ids)
    return t, ids


def _shade(objects, light, o, d, t, ids):
    p = o + t[:, None] * d
    normal = np.tile([0.0, 0.0, 1.0], (len(p), 1))
    cell = np.floor(p[:, :2] / GROUND_TILE).astype(np.int64).sum(1) % 2
    albedo = np.asarray(GROUND_COLORS)[cell]
    for obj in objects:
        m = ids == obj.id
        if m.any():
            normal[m], albedo[m] = obj.surface(p[m])
    # Hard shadows: the ground cannot shadow anything (the light is above it), so test objects only.
    return _lit(p, normal, albedo, light, objects)


def _lit(p, normal, albedo, light, blockers):
    """Colours of surface points (N, 3) with their normals and albedos: ambient plus Lambert diffuse light, zero
    diffuse where any of `blockers` (things with `hit(o, d)`) stands between the point and the light."""
    lambert = np.clip(normal @ light, 0, None)
    lit = np.nonzero(lambert > 0)[0]
    origin = p[lit] + SHADOW_OFFSET * normal[lit]
    towards = np.broadcast_to(light, origin.shape)
    blocked = np.zeros(len(lit), bool)
    for obj in blockers:
        blocked |= np.isfinite(obj.hit(origin, towards))
    lambert[lit[blocked]] = 0
    return albedo * (AMBIENT + DIFFUSE * lambert[:, None])


def _rays(c2w, focal, width, height, ss):
    """Rays through a regular ss x ss grid of points in each pixel, row-major over the fine grid."""
    x = ((np.arange(width * ss) + 0.5) / ss - width / 2) / focal
    y = -((np.arange(height * ss) + 0.5) / ss - height / 2) / focal
    rot = c2w[:3, :3]
    d = (x[None, :, None] * rot[:, 0] + y[:, None, None] * rot[:, 1] - rot[:, 2]).reshape(-1, 3)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return np.broadcast_to(c2w[:3, 3], d.shape), d


def _noise(p, seed, octaves=(5.0, 11.0, 23.0, 47.0)):
    """Value noise in [0, 1] at world points (N, 3): hashed lattice values, trilinearly interpolated, averaged over
    lattice frequencies (cells per unit) so features show at every image scale. Fixed by the seed."""
    total = np.zeros(len(p))
    for k, freq in enumerate(octaves):
        q = p * freq
        base = np.floor(q).astype(np.int64)
        f = q - base
        f = f * f * (3 - 2 * f)  # smoothstep: no creases along the lattice
        for corner in range(8):
            c = np.array([(corner >> a) & 1 for a in range(3)])
            h = ((base + c).astype(np.uint64) * np.array([73856093, 19349663, 83492791], np.uint64)).sum(1)
            h ^= np.uint64(seed * 2654435761 + k * 40503 + 1)
            h = (h ^ (h >> np.uint64(29))) * np.uint64(0xBF58476D1CE4E5B9)  # splitmix-style mixing
            h ^= h >> np.uint64(32)
            w = np.prod(np.where(c == 1, f, 1 - f), axis=1)
            total += w * (h & np.uint64(0xFFFF)).astype(np.float64) / 0xFFFF
    return total / len(octaves)


def _render(objects, light, c2w, focal, width, height, ss, texture=0.0, seed=0, far=None):
    """(H, W, 4) uint8 RGBA with straight alpha, and (H, W) uint8 ids of the pixel-centre rays. `far`: the
    surroundings of an unbounded scene (`_surroundings`), seen by every ray that misses the objects and the disk."""
    o, d = _rays(c2w, focal, width, height, ss)
    t, ids = _trace(objects, o, d)
    hit = ids > 0
    color = np.zeros((len(d), 3))
    color[hit] = _shade(objects, light, o[hit], d[hit], t[hit], ids[hit])
    if texture > 0:  # multiplies albedo (shading is linear in it); stretched so neighbouring cells differ clearly
        n = _noise(o[hit] + t[hit, None] * d[hit], seed)
        color[hit] *= np.clip(1 + texture * 3 * (n - 0.5), 0.1, 2.0)[:, None]
        color = np.clip(color, 0, 1)
    if far is not None:
        miss = ~hit
        color[miss] = _shade_surroundings(far, objects, light, o[miss], d[miss])
        hit = np.ones_like(hit)
    premult = color.reshape(height, ss, width, ss, 3).mean((1, 3))
    alpha = hit.reshape(height, ss, width, ss).mean((1, 3))
    rgb = premult / np.maximum(alpha, 1e-12)[..., None]
    rgba = np.round(np.clip(np.concatenate([rgb, alpha[..., None]], -1), 0, 1) * 255).astype(np.uint8)
    o, d = _rays(c2w, focal, width, height, 1)
    _, centre_ids = _trace(objects, o, d)
    return rgba, centre_ids.reshape(height, width).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Surroundings of unbounded scenes


def _surroundings(rng):
    """Tall patterned pillars on a ring PILLAR_RING away from the origin (objects with id 0)."""
    pillars = []
    angles = rng.uniform(0, 2 * math.pi) + np.arange(N_PILLARS) * 2 * math.pi / N_PILLARS
    for i, a in enumerate(angles + rng.uniform(-0.25, 0.25, N_PILLARS)):
        dist = float(rng.uniform(*PILLAR_RING))
        shape = str(rng.choice(("box", "cylinder", "cone")))
        color = str(rng.choice(list(PALETTE)))
        height = float(rng.uniform(1.5, 4.0))
        r = float(rng.uniform(0.35, 0.8))
        params = {"size": [1.6 * r, 1.6 * r, height]} if shape == "box" else {"radius": r, "height": height}
        pillars.append(_Object(
            id=0, name=f"{color} pillar", shape=shape, color=np.array(PALETTE[color]),
            pattern=str(rng.choice(("stripes", "checker", "plain"))), period=float(rng.uniform(0.35, 0.6)),
            center=np.array([dist * math.cos(a), dist * math.sin(a), height / 2]),
            yaw=float(rng.uniform(0, math.pi)) if shape == "box" else 0.0, params=params, footprint=1.2 * r))
    return pillars


def _sky(d):
    """Sky colour seen along unit directions `d`: a gradient from the horizon up, with soft bands of cloud."""
    el = np.arcsin(np.clip(d[:, 2], -1, 1))
    az = np.arctan2(d[:, 1], d[:, 0])
    up = np.clip(el / (math.pi / 2), 0, 1)[:, None]
    base = (1 - up) * np.array([0.86, 0.90, 0.95]) + up * np.array([0.33, 0.52, 0.84])
    cloud = np.clip(np.sin(3 * az + 1.0) * np.cos(7 * el) + 0.5 * np.sin(5 * az - 2 * el), 0, None)
    return np.clip(base + 0.12 * cloud[:, None] * (el > 0)[:, None], 0, 1)


def _far_ground_albedo(p):
    """A smooth, low-frequency ground texture beyond the disk (no fine detail to alias at the horizon)."""
    wave = np.sin(0.9 * p[:, 0] + 0.3) * np.sin(0.7 * p[:, 1] - 0.5) + 0.5 * np.sin(0.23 * (p[:, 0] + 2 * p[:, 1]))
    return np.array([0.45, 0.55, 0.30]) * (0.85 + 0.15 * wave[:, None])


def _trace_surroundings(pillars, o, d):
    """Distance along rays that miss the objects and the disk to the far ground, a pillar or the sky dome, and what
    they hit: -2 sky, -1 ground, k >= 0 pillar k."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = -o[:, 2] / d[:, 2]
    p = o + t[:, None] * d
    rho2 = p[:, 0] ** 2 + p[:, 1] ** 2
    t = np.where((t > EPS) & (rho2 > GROUND_RADIUS**2) & (rho2 <= SKY_RADIUS**2), t, np.inf)
    which = np.where(np.isfinite(t), -1, -2)
    for k, pillar in enumerate(pillars):
        tp = pillar.hit(o, d)
        closer = tp < t
        t, which = np.where(closer, tp, t), np.where(closer, k, which)
    b = _dot(o, d)
    sky = -b + np.sqrt(np.maximum(b * b - _dot(o, o) + SKY_RADIUS**2, 0))
    return np.where(which == -2, sky, t), which


def _shade_surroundings(pillars, objects, light, o, d):
    """Colours of rays that miss the objects and the disk: far ground, pillars, or sky."""
    t, which = _trace_surroundings(pillars, o, d)
    color = _sky(d)
    solid = which > -2
    p = o[solid] + t[solid, None] * d[solid]
    normal = np.tile([0.0, 0.0, 1.0], (len(p), 1))
    albedo = _far_ground_albedo(p)
    for k, pillar in enumerate(pillars):
        m = which[solid] == k
        if m.any():
            normal[m], albedo[m] = pillar.surface(p[m])
    color[solid] = _lit(p, normal, albedo, light, list(objects) + list(pillars))
    return color


# ----------------------------------------------------------------------------------------------
# Cameras


def _cameras(spec, n, phase, rng):
    """c2w of `n` cameras looking at TARGET from a Fibonacci spiral over the elevation band (even coverage)."""
    i = np.arange(n)
    lo, hi = (math.sin(math.radians(a)) for a in (spec.elevation_min_deg, spec.elevation_max_deg))
    elevation = np.arcsin(lo + (hi - lo) * (i + 0.5) / max(n, 1))  # equal-area steps in elevation
    azimuth = phase + i * math.pi * (3 - math.sqrt(5))
    radius = rng.uniform(spec.radius_min, spec.radius_max, n)
    eyes = TARGET + radius[:, None] * np.stack(
        [np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)], 1)
    c2w = look_at(torch.from_numpy(eyes), torch.from_numpy(TARGET), torch.tensor([0.0, 0.0, 1.0])).numpy()
    return [np.concatenate([m, [[0.0, 0.0, 0.0, 1.0]]]) for m in c2w]


def _near_far(c2ws):
    """Distances that bracket the whole aabb from every camera."""
    lo, hi = np.asarray(AABB)
    eyes = np.array([c[:3, 3] for c in c2ws])
    near = np.linalg.norm(np.maximum(np.maximum(lo - eyes, eyes - hi), 0), axis=1).min()
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    far = np.linalg.norm(eyes[:, None] - corners[None], axis=2).max()
    return math.floor(max(near, 0.05) * 100) / 100, math.ceil(far * 100) / 100


def _variant(objects: list, spec: SceneSpec) -> dict:
    """Apply the spec's recolour / removal / added sphere to the laid-out objects (in place); what changed."""
    out = {}
    ids = [o.id for o in objects]
    if spec.recolor:
        if len(spec.recolor) != 4 or int(spec.recolor[0]) not in ids or not all(0 <= c <= 1 for c in spec.recolor[1:]):
            raise ValueError(f"recolor is (ID, R, G, B) with ID one of {ids} and colours in [0, 1], got {spec.recolor}")
        obj = objects[ids.index(int(spec.recolor[0]))]
        obj.color = np.array(spec.recolor[1:], dtype=float)
        out["recolor"] = {"id": obj.id, "color": _round(obj.color)}
    if spec.remove:
        if spec.remove not in ids:
            raise ValueError(f"remove names an object id, one of {ids}; got {spec.remove}")
        objects[:] = [o for o in objects if o.id != spec.remove]
        out["remove"] = {"id": spec.remove}
    if spec.add_sphere:
        if len(spec.add_sphere) != 7 or spec.add_sphere[3] <= 0 or not all(0 <= c <= 1 for c in spec.add_sphere[4:]):
            raise ValueError(f"add_sphere is (X, Y, Z, RADIUS, R, G, B), radius > 0, colours in [0, 1]; got {spec.add_sphere}")
        x, y, z, r = spec.add_sphere[:4]
        new_id = spec.n_objects + 2
        objects.append(_Object(id=new_id, name="added sphere", shape="sphere", color=np.array(spec.add_sphere[4:], float),
                               pattern="plain", period=0.1, center=np.array([x, y, z], float), yaw=0.0,
                               params={"radius": float(r)}, footprint=float(r)))
        out["add"] = {"id": new_id, "center": _round([x, y, z]), "radius": float(r)}
    return out


# ----------------------------------------------------------------------------------------------


def _build(spec: SceneSpec):
    """Everything a spec determines before rendering: objects, light, cameras per split, near/far and the
    surroundings (None unless `spec.unbounded`), drawn from one generator in a fixed order."""
    if not 1 <= spec.n_objects <= len(PALETTE):
        raise ValueError(f"n_objects must be 1..{len(PALETTE)}, got {spec.n_objects}")
    if min(spec.width, spec.height, spec.supersample) < 1 or spec.n_train < 1 or min(spec.n_test, spec.n_val) < 0:
        raise ValueError(f"bad scene spec: {spec}")
    rng = np.random.default_rng(spec.seed)
    if not 0 <= spec.shared_colors < spec.n_objects:
        raise ValueError(f"shared_colors must be 0..n_objects-1 ({spec.n_objects - 1}), got {spec.shared_colors}")
    objects = _layout(spec.n_objects, rng, spec.shared_colors)
    variant = _variant(objects, spec)  # after the layout: the random draws below stay the same
    azimuth, elevation = rng.uniform(0, 2 * math.pi), rng.uniform(math.radians(40), math.radians(60))
    light = np.array([math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth),
                      math.sin(elevation)])
    # Each split's spiral is turned by a different angle, so test and val views are held-out positions.
    phase = rng.uniform(0, 2 * math.pi)
    splits = {name: _cameras(spec, n, phase + k * 2.0, rng)
              for k, (name, n) in enumerate([("train", spec.n_train), ("test", spec.n_test), ("val", spec.n_val)])
              if n > 0 or name != "val"}
    near, far = _near_far([c for cams in splits.values() for c in cams])
    far_content = None
    if spec.unbounded:  # drawn last, so a scene's objects and cameras do not depend on it
        far_content = _surroundings(rng)
        far = math.ceil(SKY_RADIUS + max(np.linalg.norm(c[:3, 3]) for cams in splits.values() for c in cams))
    return objects, light, splits, near, far, far_content, variant


def render_view(spec: SceneSpec, c2w, width: int | None = None, height: int | None = None) -> dict[str, np.ndarray]:
    """Ground truth of the scene `spec` describes from any camera (c2w (3, 4) or (4, 4), OpenGL axes, the spec's
    field of view): rgba (H, W, 4) uint8 as `generate_scene` writes it, ids (H, W) and depth (H, W) float64, the
    distance along each pixel-centre ray to what it hits (inf: nothing; the sky dome of unbounded scenes counts).

    Example:
        >>> spec = SceneSpec(n_train=1, n_test=0, width=8, height=8, unbounded=True)
        >>> view = render_view(spec, np.array([[1.0, 0, 0, 0], [0, 0, -1, -4], [0, 1, 0, 0.5]]))  # looks along +y
        >>> view["rgba"].shape, bool(np.isfinite(view["depth"]).all())
        ((8, 8, 4), True)
    """
    objects, light, _, _, _, far_content, _ = _build(spec)
    width, height = width or spec.width, height or spec.height
    focal = 0.5 * width / math.tan(0.5 * spec.camera_angle_x)
    c2w = np.asarray(c2w, dtype=np.float64)[:3]
    rgba, ids = _render(objects, light, c2w, focal, width, height, spec.supersample, spec.texture, spec.seed,
                        far_content)
    o, d = _rays(c2w, focal, width, height, 1)
    t, hit = _trace(objects, o, d)
    if far_content is not None:
        miss = hit == 0
        t[miss] = _trace_surroundings(far_content, o[miss], d[miss])[0]
    return {"rgba": rgba, "ids": ids, "depth": t.reshape(height, width)}


def generate_scene(out_dir, spec: SceneSpec | None = None) -> Path:
    """Render the scene described by `spec` (default: SceneSpec()) into `out_dir` (see the module docstring) and
    return it."""
    spec = SceneSpec() if spec is None else spec
    out = Path(out_dir)
    objects, light, splits, near, far, far_content, variant = _build(spec)
    focal = 0.5 * spec.width / math.tan(0.5 * spec.camera_angle_x)

    for name, cams in splits.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        frames = []
        for i, c2w in enumerate(cams):
            rgba, ids = _render(objects, light, c2w, focal, spec.width, spec.height, spec.supersample, spec.texture,
                                spec.seed, far_content)
            Image.fromarray(rgba, "RGBA").save(out / name / f"r_{i}.png")
            Image.fromarray(ids, "L").save(out / name / f"id_{i}.png")
            frames.append({"file_path": f"./{name}/r_{i}", "transform_matrix": _round(c2w),
                           "id_path": f"./{name}/id_{i}.png"})
        meta = {"camera_angle_x": spec.camera_angle_x, "aabb": [list(AABB[0]), list(AABB[1])],
                "near": near, "far": far, "frames": frames}
        (out / f"transforms_{name}.json").write_text(json.dumps(meta, indent=2) + "\n")

    ground = {"id": 1, "name": "ground", "shape": "disk", "center": [0.0, 0.0, 0.0], "radius": GROUND_RADIUS,
              "color": list(GROUND_COLORS[0]), "color2": list(GROUND_COLORS[1]), "pattern": "checker",
              "pattern_period": GROUND_TILE}
    info = {"objects": [ground] + [obj.to_json() for obj in objects], "background_id": 0,
            "light": {"direction": _round(light), "ambient": AMBIENT, "diffuse": DIFFUSE}, "spec": asdict(spec)}
    if far_content is not None:
        info["surroundings"] = {"sky_radius": SKY_RADIUS, "pillars": [p.to_json() for p in far_content]}
    if variant:
        info["variant"] = variant
    (out / "objects.json").write_text(json.dumps(info, indent=2) + "\n")
    return out
