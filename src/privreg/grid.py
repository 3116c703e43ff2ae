"""Physical-space sampling grids: the single place where world <-> index conversions live.

Conventions (ITK):
    * ``size``, ``origin``, ``spacing`` are in (x, y[, z]) order.
    * ``direction`` is a d x d matrix whose columns are the directions of the index axes.
    * world = origin + direction @ diag(spacing) @ index.
    * An image tensor on a grid has shape ``size[::-1]`` (z, y, x), as SimpleITK/numpy.
    * Points are float tensors of shape (N, d) in (x, y[, z]) world coordinates (mm).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

DTYPE = torch.float32


@dataclass(frozen=True)
class Grid:
    """A regular sampling grid in physical space."""

    size: tuple[int, ...]
    spacing: tuple[float, ...] = field(default=())
    origin: tuple[float, ...] = field(default=())
    direction: tuple[float, ...] = field(default=())  # row-major d*d

    def __post_init__(self) -> None:
        d = len(self.size)
        if d not in (2, 3):
            raise ValueError(f"Grid must be 2D or 3D, got size={self.size}")
        if any(int(s) < 1 for s in self.size):
            raise ValueError(f"Grid size must be positive, got {self.size}")
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "spacing", tuple(float(s) for s in (self.spacing or (1.0,) * d)))
        object.__setattr__(self, "origin", tuple(float(s) for s in (self.origin or (0.0,) * d)))
        eye = tuple(float(i == j) for i in range(d) for j in range(d))
        object.__setattr__(self, "direction", tuple(float(s) for s in (self.direction or eye)))
        if len(self.spacing) != d or len(self.origin) != d or len(self.direction) != d * d:
            raise ValueError("Grid size, spacing, origin and direction disagree in dimension")
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"Grid spacing must be positive, got {self.spacing}")

    # ------------------------------------------------------------------ basics
    @property
    def ndim(self) -> int:
        return len(self.size)

    @property
    def shape(self) -> tuple[int, ...]:
        """Tensor shape of an image on this grid: size reversed (z, y, x)."""
        return tuple(reversed(self.size))

    @property
    def numel(self) -> int:
        n = 1
        for s in self.size:
            n *= s
        return n

    def direction_matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        return torch.tensor(self.direction, dtype=dtype).reshape(self.ndim, self.ndim)

    def index_to_world_matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """Homogeneous (d+1)x(d+1) matrix mapping (x, y[, z]) index to world."""
        d = self.ndim
        m = torch.eye(d + 1, dtype=dtype)
        m[:d, :d] = self.direction_matrix(dtype) * torch.tensor(self.spacing, dtype=dtype)
        m[:d, d] = torch.tensor(self.origin, dtype=dtype)
        return m

    def world_to_index_matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        return torch.linalg.inv(self.index_to_world_matrix(torch.float64)).to(dtype)

    # ------------------------------------------------------------- conversions
    def index_to_world(self, index: Tensor) -> Tensor:
        m = self.index_to_world_matrix(index.dtype)
        return index @ m[:-1, :-1].T + m[:-1, -1]

    def world_to_index(self, points: Tensor) -> Tensor:
        m = self.world_to_index_matrix(points.dtype)
        return points @ m[:-1, :-1].T + m[:-1, -1]

    def axes_indices(self, dtype: torch.dtype = DTYPE) -> list[Tensor]:
        """1D index coordinates per axis in (x, y[, z]) order."""
        return [torch.arange(s, dtype=dtype) for s in self.size]

    def indices(self, dtype: torch.dtype = DTYPE) -> Tensor:
        """(N, d) continuous indices of all voxels, in tensor (C) order."""
        axes = self.axes_indices(dtype)[::-1]
        mesh = torch.meshgrid(*axes, indexing="ij")  # z, y, x
        return torch.stack([m.reshape(-1) for m in reversed(mesh)], dim=1)

    def points(self, dtype: torch.dtype = DTYPE) -> Tensor:
        """(N, d) world coordinates of all voxels, in tensor (C) order."""
        return self.index_to_world(self.indices(torch.float64)).to(dtype)

    def points_at(self, flat: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        """World points (N, d) of flat (C-order) voxel indices ``flat``, without the whole grid's points."""
        ijk, rest = [], flat
        for n in self.size:  # x varies fastest in C order of shape (z, y, x)
            ijk.append(rest % n)
            rest = rest // n
        return self.index_to_world(torch.stack(ijk, 1).to(dtype))

    def center(self) -> Tensor:
        """World coordinates of the grid centre, shape (d,)."""
        mid = torch.tensor([(s - 1) / 2.0 for s in self.size], dtype=torch.float64)
        return self.index_to_world(mid[None])[0]

    def extent(self) -> tuple[float, ...]:
        """Physical extent (mm) of the grid along each index axis."""
        return tuple(sp * (s - 1) for sp, s in zip(self.spacing, self.size))

    # ------------------------------------------------------------ derived grids
    def downsample(self, factor: float) -> "Grid":
        """A coarser grid covering the same physical region (voxel centres re-spread)."""
        if factor <= 1:
            return self
        size = tuple(max(1, int(round(s / factor))) for s in self.size)
        spacing = tuple(
            (sp * (s - 1) / (n - 1)) if n > 1 else sp * s for sp, s, n in zip(self.spacing, self.size, size)
        )
        return Grid(size, spacing, self.origin, self.direction)

    def same_as(self, other: "Grid", tol: float = 1e-4) -> bool:
        return (
            self.size == other.size
            and all(abs(a - b) <= tol for a, b in zip(self.spacing, other.spacing))
            and all(abs(a - b) <= tol * max(1.0, abs(b)) for a, b in zip(self.origin, other.origin))
            and all(abs(a - b) <= tol for a, b in zip(self.direction, other.direction))
        )

    @staticmethod
    def from_affine(size: Sequence[int], affine: Tensor) -> "Grid":
        """Grid from a homogeneous index->world matrix (no shear allowed)."""
        d = len(size)
        lin = affine[:d, :d].double()
        spacing = torch.linalg.norm(lin, dim=0)
        direction = lin / spacing
        return Grid(tuple(size), tuple(spacing.tolist()), tuple(affine[:d, d].double().tolist()),
                    tuple(direction.reshape(-1).tolist()))


def field_image(u: Tensor, grid: Grid) -> Tensor:
    """A point-major field (P, d) on ``grid`` (C order) -> channel-major (d, *grid.shape)."""
    return u.T.reshape((u.shape[1],) + grid.shape)


def field_points(f: Tensor) -> Tensor:
    """A channel-major field (d, *shape) -> point-major (P, d) (C order)."""
    return f.reshape(f.shape[0], -1).T


def world_to_normalized(grid: Grid, points: Tensor) -> Tensor:
    """Map world points to grid_sample's [-1, 1] coordinates (align_corners=True)."""
    idx = grid.world_to_index(points)
    size = torch.tensor(grid.size, dtype=points.dtype)
    denom = torch.clamp(size - 1, min=1)
    return 2.0 * idx / denom - 1.0


def index_to_normalized_matrix(grid: Grid) -> Tensor:
    """Homogeneous (d+1)x(d+1) float64 matrix of :func:`world_to_normalized`'s index step:
    continuous (x, y[, z]) index -> grid_sample's [-1, 1] (align_corners=True)."""
    d = grid.ndim
    m = torch.eye(d + 1, dtype=torch.float64)
    m[:d, :d] = torch.diag(2.0 / torch.clamp(torch.tensor(grid.size, dtype=torch.float64) - 1, min=1))
    m[:d, d] = -1.0
    return m
