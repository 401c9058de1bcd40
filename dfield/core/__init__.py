"""Core: rays (from cameras, NDC, random batches), sampling (ray-box clipping, occupancy grid, marching), volume
rendering of any field and any named channel (`render_field`, `RenderSettings`), whole-image rendering, camera
paths, regular-grid helpers and metrics.

May import errors and data (the Dataset and Cameras types, pose helpers); nothing above.
"""
