"""Fields: functions of points. Positional encodings, vector-matrix factorised volumes, the TensoRF radiance field
(density, colour, optional low-dimensional features) and lifted per-voxel teacher features.

May import errors, data and core; nothing above.
"""
