"""Features: 2D teachers (interface, registry, disk cache, each teacher), distilling them into a 3D feature field
on a trained radiance field (fit) or lifting them in one pass (lift), adding either to a run folder (distill),
and scoring the result (segmentation against ground truth, PCA images).

May import errors, data, core, fields, models, config and io; never training, query, edit or app.
"""
