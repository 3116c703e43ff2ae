"""Composition of transforms, in ITK's CompositeTransform order."""

from __future__ import annotations

from torch import Tensor, nn

from ..grid import Grid
from .base import Transform


class CompositeTransform(Transform):
    """W = T_0 o T_1 o ... o T_{n-1}: the last transform is applied first (ITK's order).

    Only the last transform is usually optimised (``theta`` is its parameters).
    """

    def __init__(self, transforms: list[Transform]) -> None:
        if not transforms:
            raise ValueError("a composite transform needs at least one transform")
        super().__init__(transforms[0].ndim)
        if any(t.ndim != self.ndim for t in transforms):
            raise ValueError("all transforms in a composite must have the same dimension")
        self.transforms = nn.ModuleList(transforms)

    @property
    def theta(self) -> Tensor:
        return self.transforms[-1].theta

    def forward(self, points: Tensor) -> Tensor:
        for t in reversed(self.transforms):
            points = t(points)
        return points

    def transform_grid(self, grid: Grid) -> Tensor:
        pts = self.transforms[-1].transform_grid(grid)
        for t in reversed(list(self.transforms)[:-1]):
            pts = t(pts)
        return pts
