"""Training: the trainer (ray batches, optimiser, learning rates, time budget, checkpoints, resume, divergence
guard) and evaluation of a trained run on held-out views.

May import errors, data, core, fields, models, config, io and features (teachers for joint distillation,
segmentation scores); never query, edit or app.
"""
