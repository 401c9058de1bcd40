"""Models: a field plus its sampler, behind one interface (`base.Model`: rendering, features and decoding, loss
terms, schedule, checkpoint state). The grid model (TensoRF field, occupancy marching, coarse-to-fine schedule),
the PE-MLP NeRF baseline, the schedules as objects, and the loss terms.

May import errors, data, core and fields; nothing above.
"""
