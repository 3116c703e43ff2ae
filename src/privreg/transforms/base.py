"""Base class of spatial transforms: fixed-space world points -> moving-space world points."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..grid import Grid


class Transform(nn.Module):
    """A spatial transform W_theta mapping fixed-space points (N, d) to moving space (ITK).

    ``theta`` is the flat parameter vector optimised by registration.
    """

    ndim: int

    def __init__(self, ndim: int) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"transforms are 2D or 3D, got ndim={ndim}")
        self.ndim = ndim

    @property
    def theta(self) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def num_params(self) -> int:
        return self.theta.numel()

    def forward(self, points: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def transform_grid(self, grid: Grid) -> Tensor:
        """Mapped points of every voxel of ``grid``, (N, d); subclasses may do it faster."""
        return self(grid.points())

    def displacement(self, grid: Grid) -> Tensor:
        """Displacement W(x) - x on ``grid``, shape (N, d)."""
        return self.transform_grid(grid) - grid.points()

    @property
    def is_linear(self) -> bool:
        return False

    def set_theta(self, value: Tensor) -> None:
        with torch.no_grad():
            self.theta.copy_(value.reshape(self.theta.shape))
