"""2D teachers whose per-pixel features a 3D feature field is distilled from, their registry and their disk cache.

    from dfield.features.teachers import make_teacher, cached_features, feature_cache_dir
    teacher = make_teacher("dinov2:block=7")            # or "clip", "synthetic", "files:<folder>"
    maps = cached_features(teacher, dataset, feature_cache_dir())
    f = maps.sample(view_idx, u, v)                     # (R, D) float32 at image pixel coordinates

Heavy back ends (onnxruntime, transformers) are imported only when their teacher first runs.
"""

from dfield.errors import TeacherError
from dfield.features.teachers.base import Teacher
from dfield.features.teachers.cache import FeatureMaps, cached_features, default_cache_dir, feature_cache_dir
from dfield.features.teachers.registry import make_teacher, register_teacher, teacher_names
from dfield.features.teachers.synthetic import SyntheticTeacher, segment

__all__ = ["FeatureMaps", "SyntheticTeacher", "Teacher", "TeacherError", "cached_features", "default_cache_dir",
           "feature_cache_dir", "make_teacher", "register_teacher", "segment", "teacher_names"]
