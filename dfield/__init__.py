"""dfield: distilled feature fields on a CPU.

The package is in layers; each imports only the ones before it (tests/test_layers.py checks this):

    errors    user-fixable error types
    data      Dataset/Cameras, scene readers, the on-disk image store, generated scenes, pose helpers
    core      rays, pixel sets, sampling, volume rendering, whole images, camera paths, grids, metrics, ranks
    fields    encodings, factorised volumes, the TensoRF field, lifted feature grids
    models    the model interface, grid and NeRF models, schedules, loss terms
    config    the typed training configuration
    io        atomic writes, exports, checkpoints, run folders
    features  teachers and their cache, feature fitting and lifting, distill into a run, segmentation scores
    training  the trainer, data-parallel training, evaluation
    query     query sets, relevance, outputs, scores against ground truth
    edit      selections, edit wrappers, the edit spec, edited models, locality, meshes
    app       the Python API behind the CLI, the CLI, --nproc workers, the demo, progress bars

The Python API is `dfield.app.api` (what each command does).
"""

__version__ = "0.1.0"
