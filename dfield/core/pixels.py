"""Sets of training pixels kept as sorted runs of flat pixel ids, so a set over thousands of images costs memory in
proportion to its image rows, not its pixels.

The trainer's draw pool after the box shrink is such a set (the pixels whose rays hit the box: one interval per
image row for a convex box), and so is its complement (the rays that miss it). As a list of int64 ids the pool of
1600 views of 200x200 pixels would take about 500 MB; as runs it takes a few MB. `runs[r]` is the r-th smallest
id, so drawing `runs[randint(len(runs))]` is exactly what indexing a sorted id list would draw.
"""

from __future__ import annotations

import torch


class PixelRuns:
    """A set of flat pixel ids as sorted, disjoint runs `[start, start + length)`.

    Example:
        >>> runs = PixelRuns.from_ids(torch.tensor([2, 3, 4, 9, 10, 15]))
        >>> len(runs), runs.n_runs, runs[torch.tensor([0, 3, 5])]
        (6, 3, tensor([ 2,  9, 15]))
        >>> runs.complement(17).ids()
        tensor([ 0,  1,  5,  6,  7,  8, 11, 12, 13, 14, 16])
    """

    def __init__(self, starts: torch.Tensor, lengths: torch.Tensor):
        self.starts = starts.to(torch.long).reshape(-1)
        self.lengths = lengths.to(torch.long).reshape(-1)
        # ends[k]: how many ids lie in runs 0..k, so run k holds members ends[k-1] .. ends[k]-1.
        self.ends = torch.cumsum(self.lengths, 0)

    # -- construction ---------------------------------------------------------------------------
    @staticmethod
    def from_mask(mask: torch.Tensor, offset: int = 0) -> "PixelRuns":
        """The ids `offset + i` of the True entries of a flat bool `mask`."""
        m = mask.reshape(-1).to(torch.int8)
        edges = torch.diff(m, prepend=m.new_zeros(1), append=m.new_zeros(1))
        starts = (edges == 1).nonzero()[:, 0]
        stops = (edges == -1).nonzero()[:, 0]
        return PixelRuns(starts + offset, stops - starts)

    @staticmethod
    def from_ids(ids: torch.Tensor) -> "PixelRuns":
        """The runs of a sorted 1-D tensor of distinct ids."""
        ids = ids.to(torch.long).reshape(-1)
        if len(ids) == 0:
            return PixelRuns(ids, ids)
        new = torch.ones(len(ids), dtype=torch.bool)
        new[1:] = ids[1:] != ids[:-1] + 1
        first = new.nonzero()[:, 0]
        lengths = torch.diff(first, append=torch.tensor([len(ids)]))
        return PixelRuns(ids[first], lengths)

    @staticmethod
    def concat(parts: list["PixelRuns"]) -> "PixelRuns":
        """The union of sets that lie in increasing, non-overlapping ranges, in that order."""
        if not parts:
            return PixelRuns(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        return PixelRuns(torch.cat([p.starts for p in parts]), torch.cat([p.lengths for p in parts]))

    # -- reading --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    @property
    def n_runs(self) -> int:
        """How many runs the set is stored as."""
        return len(self.starts)

    def __getitem__(self, r: torch.Tensor) -> torch.Tensor:
        """The `r`-th smallest ids (a long tensor of ranks in 0..len-1) -> long tensor of ids, same shape."""
        r = torch.as_tensor(r, dtype=torch.long)
        k = torch.searchsorted(self.ends, r, right=True)
        before = torch.where(k > 0, self.ends[(k - 1).clamp(min=0)], torch.zeros_like(k))
        return self.starts[k] + (r - before)

    def ids(self) -> torch.Tensor:
        """Every id, sorted (as much memory as a plain id list: for small sets and tests)."""
        return self[torch.arange(len(self))]

    def complement(self, n: int) -> "PixelRuns":
        """The ids in 0..n-1 that are not in the set."""
        stops = self.starts + self.lengths
        gap_starts = torch.cat([torch.zeros(1, dtype=torch.long), stops])
        gap_stops = torch.cat([self.starts, torch.tensor([n], dtype=torch.long)])
        keep = gap_stops > gap_starts
        return PixelRuns(gap_starts[keep], (gap_stops - gap_starts)[keep])

    # -- checkpoints ----------------------------------------------------------------------------
    def state(self) -> torch.Tensor:
        """(R, 2) long tensor of [start, length] rows, to checkpoint."""
        return torch.stack([self.starts, self.lengths], 1)

    @staticmethod
    def from_state(t: torch.Tensor) -> "PixelRuns":
        """Rebuild from `state()`; a 1-D tensor is read as a sorted id list (checkpoints before runs)."""
        if t.dim() == 1:
            return PixelRuns.from_ids(t)
        return PixelRuns(t[:, 0], t[:, 1])
