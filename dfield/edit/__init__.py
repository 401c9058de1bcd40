"""Edits: selections as functions of points (a world box, or a query sampled on a grid), edits as field wrappers
(extract, delete, recolour, move/rotate/scale, composite another run) that leave everything outside their
selection bit-for-bit unchanged, the edit spec (JSON/YAML), building an edited model from a spec, rendering it
beside the original with locality scores, meshes, and `apply_edits` (what `dfield edit` does).

May import every layer below it (errors, data, core, fields, models, config, io, features, training, query);
never app.
"""
