"""Spec strings shared by the teacher and segmenter registries: "name", "name:ARG", "name:key=value,key=value" or
"name:ARG,key=value,...".

    >>> parse_spec("dinov2:block=7,input_size=518")
    ('dinov2', None, {'block': 7, 'input_size': 518})
    >>> parse_spec("files:/data/masks")
    ('files', '/data/masks', {})
    >>> parse_spec("sam:/models/sam_vit_b.pth,points_per_side=16")
    ('sam', '/models/sam_vit_b.pth', {'points_per_side': 16})
"""

from __future__ import annotations


def parse_value(v: str):
    """'7' -> 7, '0.5' -> 0.5, anything else stays a string."""
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_spec(spec: str) -> tuple[str, str | None, dict]:
    """spec -> (name, positional argument or None, settings). Raises ValueError for a setting that is not key=value.

    Everything after the first ':' is either key=value pairs (when it holds a '=', optionally after one positional
    argument: "sam:PATH,model_type=vit_b") or one positional argument, so a nested spec such as
    "segments:felzenszwalb:scale=100" keeps its inner spec whole for the inner registry.
    """
    name, sep, arg = str(spec).partition(":")
    if not sep:
        return name, None, {}
    head = arg.split(":", 1)[0]
    if "=" not in head:
        return name, arg, {}
    kw = {}
    items = arg.split(",")
    positional = None
    if "=" not in items[0] and len(items) > 1:
        positional = items.pop(0).strip() or None
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"settings must be key=value pairs, got {item!r} in {spec!r}")
        kw[key.strip()] = parse_value(value.strip())
    return name, positional, kw
