"""I/O: atomic writes (one helper for every file dfield writes), image/video/PLY exports, checkpoints, and run
folders (config.json, scene.json, checkpoints; opening a run; reading its data splits).

May import errors, data, core, fields, models and config; nothing above.
"""
