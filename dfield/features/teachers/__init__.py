"""2D teachers whose per-pixel features a 3D feature field is distilled from, and their disk cache.

    from dfield.features.teachers import make_teacher, cached_features
    teacher = make_teacher("dinov2", block=7)          # or "clip", "synthetic", "files:<folder>"
    feats = cached_features(teacher, dataset, run_dir / "features")
    f = feats.sample(view_idx, u, v)                   # (R, D) float32 at image pixel coordinates

Heavy back ends (onnxruntime, transformers) are imported only when their teacher is built.
"""

from dfield.features.teachers.base import (FeatureMaps, Teacher, TeacherError, cached_features, default_cache_dir,
                                  make_teacher, register_teacher, teacher_names)
from dfield.features.teachers.synthetic import SyntheticTeacher, segment

__all__ = ["FeatureMaps", "SyntheticTeacher", "Teacher", "TeacherError", "cached_features", "default_cache_dir",
           "make_teacher", "register_teacher", "segment", "teacher_names"]
