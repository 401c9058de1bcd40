"""Feature maps -> RGB by PCA, fitted once so colours mean the same thing in every view."""

from __future__ import annotations

import torch


class FeaturePCA:
    """A fixed projection of D-dim features onto their first `n` principal components, scaled to [0, 1] by the
    fitted samples' 1st..99th percentiles: call it on (..., D) features to get (..., n) colours."""

    def __init__(self, samples: torch.Tensor, n: int = 3):
        """Fit on (N, D) feature samples (e.g. pixels from a few views)."""
        x = samples.float()
        self.mean = x.mean(0)
        _, _, v = torch.linalg.svd(x - self.mean, full_matrices=False)
        self.basis = v[:n].T  # (D, 3)
        proj = (x - self.mean) @ self.basis
        # Robust range (1st-99th percentile) so a few outliers do not wash the colours out.
        self.lo = torch.quantile(proj, 0.01, dim=0)
        self.hi = torch.quantile(proj, 0.99, dim=0)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., 3) in [0, 1]."""
        proj = (features.float() - self.mean) @ self.basis
        return ((proj - self.lo) / (self.hi - self.lo).clamp(min=1e-8)).clamp(0, 1)
