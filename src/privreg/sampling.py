"""Which fixed-grid points take part in an iteration: full, URS or GMS.

URS (uniformly random selection, Viola & Wells; Mattes) and GMS (gradient-magnitude sampling,
Sabuncu & Ramadge) draw ``fraction`` of the points from a generator seeded by (seed, level,
iteration) - every iteration (``redraw``, stochastic steps as in the paper) or once per level
(``redraw=False``: a fixed subset as in ITK's Mattes MI, so Gauss-Newton can use LM steps) - so a private run with the same seed uses the same points as a clear
one. URS depends on nothing but the seed; GMS depends on party 1's image gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MODES = ("full", "urs", "gms")


@dataclass(frozen=True)
class Sampling:
    mode: str = "full"
    fraction: float = 0.1
    seed: int = 0
    redraw: bool = True  # False: draw once per level and keep the points (deterministic cost, LM steps)
    min_points: int = 16  # draw at least this many (coarse levels: a histogram needs points per bin)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"sampling mode must be one of {MODES}, got {self.mode!r}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"sampling fraction must be in (0, 1], got {self.fraction}")

    @property
    def stochastic(self) -> bool:
        return self.mode != "full" and self.redraw

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
        n = max(self.min_points, int(round(self.fraction * candidates.numel())))
        n = min(n, candidates.numel())
        gen = self.generator(level, iteration if self.redraw else 0)
        if self.mode == "urs":
            pick = torch.randperm(candidates.numel(), generator=gen)[:n]
        else:
            if weights is None:
                raise ValueError("GMS sampling needs weights")
            w = weights.to(torch.float64).clamp(min=0) + 1e-12
            pick = torch.multinomial(w, n, replacement=False, generator=gen)
        return torch.sort(candidates[pick]).values
