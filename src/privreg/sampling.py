"""Which fixed-grid points take part in an iteration: full, URS or GMS.

URS (uniformly random selection, Viola & Wells; Mattes) and GMS (gradient-magnitude sampling,
Sabuncu & Ramadge) draw ``fraction`` of the points from a generator seeded by (seed, level,
iteration) - every iteration (``redraw``, stochastic steps as in the paper) or once per level
(``redraw=False``: a fixed subset as in ITK's Mattes MI, so Gauss-Newton can use LM steps) - so a private run with the same seed uses the same points as a clear
one. URS depends on nothing but the seed; GMS depends on party 1's image gradients.

Stratified URS (``flat_rate < 1``, clear only for now) draws the points in flat moving background
less often and weights them back (:meth:`Sampling.draw_stratified`); on the 3D T1/T2 affine case
(8 seeds, 5 %) it lowers the mean error from 0.032 to 0.027 mm at the same cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import InputError

MODES = ("auto", "full", "urs", "gms")
AUTO_MAX_POINTS = 131072  # "auto": levels with more candidates use a fixed URS subset of this many


@dataclass(frozen=True)
class Sampling:
    mode: str = "full"  # auto: full on levels up to max_points candidates, else a fixed URS subset of max_points
    fraction: float = 0.1
    seed: int = 0
    redraw: bool = True  # False: draw once per level and keep the points (deterministic cost, LM steps)
    # draw at least this many: for MI about 2 bins^2 (3D T1/T2 at 4 mm, 32 bins: 1.4k points on the
    # coarse level let the quasi-Newton search converge to that sample's own optimum, 2.5 mm off)
    min_points: int = 16
    flat_rate: float = 1.0  # URS, finest level: rate of "flat" points relative to the rest (draw_stratified)
    max_points: int = AUTO_MAX_POINTS  # auto: the subset's size on large levels

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"sampling mode must be one of {MODES}, got {self.mode!r}")
        if not 0 < self.fraction <= 1:
            raise InputError(f"sampling fraction must be in (0, 1], got {self.fraction}")
        if not 0 < self.flat_rate <= 1:
            raise InputError(f"sampling flat_rate must be in (0, 1], got {self.flat_rate}")
        if self.flat_rate < 1 and self.mode != "urs":
            raise InputError("flat_rate < 1 (stratified sampling) applies to URS only")
        if self.max_points < 16:
            raise InputError(f"sampling max_points must be >= 16, got {self.max_points}")

    def count(self, candidates: int) -> int:
        """How many of ``candidates`` points a draw takes: ``fraction`` of them, at least ``min_points``
        (auto: all of them, at most ``max_points``)."""
        if self.mode == "auto":
            return min(candidates, self.max_points)
        return min(candidates, max(self.min_points, int(round(self.fraction * candidates))))

    def takes_all(self, candidates: int) -> bool:
        """Whether a level with ``candidates`` points uses every one of them (no draw)."""
        return self.mode == "full" or (self.mode == "auto" and candidates <= self.max_points)

    @property
    def stratified(self) -> bool:
        return self.mode == "urs" and self.flat_rate < 1

    @property
    def stochastic(self) -> bool:
        return self.mode in ("urs", "gms") and self.redraw

    def generator(self, level: int, iteration: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + level * 10_007 + iteration) % (2**63))

    def draw(self, candidates: Tensor, level: int, iteration: int, weights: Tensor | None = None) -> Tensor | None:
        """Indices (sorted) into the level grid, or None for all points.

        Args:
            candidates: indices of points allowed to take part (e.g. inside the fixed mask).
            weights: per-candidate sampling weights for GMS (e.g. gradient magnitude).
        """
        if self.mode == "full":
            return candidates
        n = self.count(candidates.numel())
        gen = self.generator(level, iteration if self.stochastic else 0)
        if self.mode in ("urs", "auto"):
            pick = torch.randperm(candidates.numel(), generator=gen)[:n]
        else:
            if weights is None:
                raise ValueError("GMS sampling needs weights")
            w = weights.to(torch.float64).clamp(min=0) + 1e-12
            pick = torch.multinomial(w, n, replacement=False, generator=gen)
        return torch.sort(candidates[pick]).values

    def draw_stratified(self, candidates: Tensor, informative: Tensor, level: int,
                        iteration: int) -> tuple[Tensor, Tensor]:
        """Stratified URS with Horvitz-Thompson weights: (sorted indices, weights with mean 1).

        ``informative`` (bool per candidate) marks points near moving-image structure; the others
        ("flat": no moving-image gradient nearby, so no gradient of the metric and a fixed place in
        the joint histogram) are drawn ``flat_rate`` times as often, and each drawn point weighs
        its stratum's size over its draw count, so the weighted joint histogram is an unbiased
        estimate of the every-candidate one. Same total as :meth:`draw`, spent where the metric
        changes: a brain at 2 mm has 72 % background voxels. The strata are party 1's own data
        (moving image and transform), so the sample is too (as GMS's)."""
        total = self.count(candidates.numel())
        gen = self.generator(level, iteration if self.stochastic else 0)
        strata = [candidates[informative], candidates[~informative]]
        sizes = [c.numel() for c in strata]
        rate = total / max(sizes[0] + self.flat_rate * sizes[1], 1.0)
        picks, weights = [], []
        for c, r in zip(strata, (rate, rate * self.flat_rate)):
            if c.numel() == 0:
                continue
            n = min(c.numel(), max(1, int(round(r * c.numel()))))
            picks.append(c[torch.randperm(c.numel(), generator=gen)[:n]])
            weights.append(torch.full((n,), c.numel() / n, dtype=torch.float64))
        idx, w = torch.cat(picks), torch.cat(weights)
        order = torch.argsort(idx)
        w = w[order]
        return idx[order], w / w.mean()
