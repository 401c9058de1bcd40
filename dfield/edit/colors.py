"""Recolouring in colour spaces that keep shading: hue shifts, a target colour that keeps each point's
brightness, and Reinhard-style transfer from an exemplar. Each returns a function (N, 3) -> (N, 3) of RGB in [0, 1]."""

from __future__ import annotations

from typing import Callable

import torch

ColorFn = Callable[[torch.Tensor], torch.Tensor]


def rgb_to_hsv(c: torch.Tensor) -> torch.Tensor:
    """(..., 3) RGB in [0, 1] -> (..., 3) HSV, each in [0, 1] (hue in turns: 0 red, 1/3 green, 2/3 blue).

    Grey (no chroma) gets hue 0, black saturation 0.

    Example:
        >>> rgb_to_hsv(torch.tensor([[1.0, 0.5, 0.0]]))  # orange: a twelfth of a turn from red
        tensor([[0.0833, 1.0000, 1.0000]])
    """
    r, g, b = c.unbind(-1)
    mx, mn = c.max(-1).values, c.min(-1).values
    delta = mx - mn
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(mx == r, ((g - b) / safe) % 6, torch.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    s = torch.where(mx > 0, delta / torch.where(mx > 0, mx, torch.ones_like(mx)), torch.zeros_like(mx))
    return torch.stack([h, s, mx], -1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_hsv`: (..., 3) HSV in [0, 1] (hue in turns, wrapping) -> (..., 3) RGB in [0, 1]."""
    h, s, v = hsv.unbind(-1)
    k = lambda n: (n + h * 6) % 6
    f = lambda n: v - v * s * torch.clamp(torch.minimum(k(n), 4 - k(n)), 0, 1)
    return torch.stack([f(5), f(3), f(1)], -1)


def hue_shift(degrees: float) -> ColorFn:
    """Rotate hue; saturation and value (the shading) stay."""
    def fn(c):
        hsv = rgb_to_hsv(c)
        hsv[:, 0] = (hsv[:, 0] + degrees / 360.0) % 1.0
        return hsv_to_rgb(hsv)
    return fn


def set_color(rgb, reference_value: float) -> ColorFn:
    """Take the target's hue and saturation; keep each point's brightness relative to the region's typical
    brightness (`reference_value`), so shading and shadows survive the new colour."""
    target = rgb_to_hsv(torch.as_tensor(rgb, dtype=torch.float32)[None])[0]

    def fn(c):
        hsv = rgb_to_hsv(c)
        v = (hsv[:, 2] / max(reference_value, 1e-3) * target[2]).clamp(0, 1)
        return hsv_to_rgb(torch.stack([torch.full_like(v, target[0].item()), torch.full_like(v, target[1].item()), v], -1))
    return fn


_YCC = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def color_transfer(source_colors: torch.Tensor, target_colors: torch.Tensor) -> ColorFn:
    """Reinhard-style transfer: match the mean and spread of the region's colours to an exemplar's, per
    channel of a luma/chroma space (where shading mostly lives in luma and hue in chroma)."""
    to = lambda c: c @ _YCC.T.to(c)
    src, tgt = to(source_colors.float()), to(target_colors.float())
    ms, ss, mt, st = src.mean(0), src.std(0).clamp(min=1e-3), tgt.mean(0), tgt.std(0)
    inv = torch.linalg.inv(_YCC)

    def fn(c):
        y = (to(c) - ms.to(c)) / ss.to(c) * st.to(c) + mt.to(c)
        return y @ inv.T.to(c)
    return fn
