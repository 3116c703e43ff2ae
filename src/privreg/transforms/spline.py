"""Transforms linear in their parameters on a control grid: cubic B-spline FFD and dense
displacement fields (linear interpolation), plus the stationary velocity field (SVF).

W(x) = x + sum_j Phi_j(x) C_j, C of shape (P, d) in world (mm) units, P = control points in
C order. Points outside the control grid's support keep zero displacement (as ITK).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ..basis import Basis, spline_basis_grid, spline_basis_points
from ..grid import Grid, field_image
from ..image import sample
from .base import Transform

F64 = torch.float64


class GridSplineTransform(Transform):
    """W(x) = x + Phi(x) C with a tensor-product spline of ``order`` on ``ctrl``."""

    order: int = 3

    def __init__(self, ctrl: Grid, coefficients: Tensor | None = None) -> None:
        super().__init__(ctrl.ndim)
        self.ctrl = ctrl
        c = torch.zeros(ctrl.numel, ctrl.ndim, dtype=F64) if coefficients is None else coefficients.to(F64)
        if tuple(c.shape) != (ctrl.numel, ctrl.ndim):
            raise ValueError(f"coefficients must have shape {(ctrl.numel, ctrl.ndim)}, got {tuple(c.shape)}")
        self.coefficients = nn.Parameter(c.clone())
        self._basis_cache: dict = {}
        self._ctrl_points: Tensor | None = None  # order 1: the field's own grid points, made at first use

    @property
    def theta(self) -> Tensor:
        return self.coefficients

    def basis(self, points: Tensor) -> Basis:
        return spline_basis_points(self.ctrl, points, self.order)

    def basis_grid(self, grid: Grid) -> Basis:
        key = (grid.size, grid.spacing, grid.origin, grid.direction)
        if key not in self._basis_cache:
            self._basis_cache = {key: spline_basis_grid(self.ctrl, grid, self.order)}
        return self._basis_cache[key]

    def forward(self, points: Tensor) -> Tensor:
        disp = self.basis(points).apply(self.coefficients)
        return (points.to(F64) + disp).to(points.dtype)

    def transform_grid(self, grid: Grid) -> Tensor:
        if self.order == 1 and grid.same_as(self.ctrl):  # a dense field on its own grid: no interpolation
            if self._ctrl_points is None:  # (greedy registration warps through here at every iteration)
                self._ctrl_points = self.ctrl.points(F64)
            return (self._ctrl_points + self.coefficients.to(F64)).to(torch.float32)
        disp = self.basis_grid(grid).apply(self.coefficients)
        return (grid.points(F64) + disp).to(torch.float32)


class BSplineTransform(GridSplineTransform):
    """Cubic B-spline free-form deformation with control-point spacing in mm."""

    order = 3

    @staticmethod
    def control_grid(domain: Grid, spacing_mm: float | Sequence[float]) -> Grid:
        """Control grid covering ``domain`` (aligned with it) with about ``spacing_mm`` spacing.

        Like ITK's mesh-size initialiser: m = ceil(extent / spacing) cells per axis, m + 3 nodes,
        the first node one spacing before the domain origin.
        """
        d = domain.ndim
        sp = (float(spacing_mm),) * d if isinstance(spacing_mm, (int, float)) else tuple(map(float, spacing_mm))
        size, spacing = [], []
        for a in range(d):
            ext = domain.spacing[a] * (domain.size[a] - 1)
            m = max(1, math.ceil(ext / sp[a] - 1e-9))
            size.append(m + 3)
            spacing.append(ext / m if ext > 0 else sp[a])
        dirm = domain.direction_matrix()
        origin = torch.tensor(domain.origin, dtype=F64) - dirm @ torch.tensor(spacing, dtype=F64)
        return Grid(tuple(size), tuple(spacing), tuple(origin.tolist()), domain.direction)

    @classmethod
    def for_domain(cls, domain: Grid, spacing_mm: float | Sequence[float]) -> "BSplineTransform":
        return cls(cls.control_grid(domain, spacing_mm))


class DisplacementFieldTransform(GridSplineTransform):
    """Dense displacement field on ``ctrl`` with linear interpolation (ITK's DisplacementFieldTransform)."""

    order = 1


class StationaryVelocityTransform(Transform):
    """Diffeomorphic W = exp(v) for a stationary velocity field v on ``field_grid``.

    exp is integrated by scaling and squaring (``steps`` squarings); the resulting displacement
    is interpolated linearly between grid nodes and is zero outside the grid.
    """

    def __init__(self, field_grid: Grid, velocity: Tensor | None = None, steps: int = 7) -> None:
        super().__init__(field_grid.ndim)
        self.field_grid = field_grid
        self.steps = steps
        v = torch.zeros(field_grid.numel, field_grid.ndim, dtype=torch.float32) if velocity is None else velocity
        self.velocity = nn.Parameter(v.to(torch.float32).clone())

    @property
    def theta(self) -> Tensor:
        return self.velocity

    def field_displacement(self, velocity: Tensor | None = None) -> Tensor:
        """exp(v) - id on the field grid, (P, d)."""
        g = self.field_grid
        v = self.velocity if velocity is None else velocity
        u = v / (2**self.steps)
        pts = g.points()
        for _ in range(self.steps):
            field = field_image(u, g)
            shifted, _ = sample(field, g, pts + u, padding_mode="border")
            u = u + shifted
        return u

    def inverse_field_displacement(self) -> Tensor:
        return self.field_displacement(-self.velocity)

    def forward(self, points: Tensor) -> Tensor:
        u = self.field_displacement()
        basis = spline_basis_points(self.field_grid, points, 1)
        return points + basis.apply(u.to(F64)).to(points.dtype)

    def transform_grid(self, grid: Grid) -> Tensor:
        u = self.field_displacement()
        if grid.same_as(self.field_grid):
            return grid.points() + u
        return grid.points() + spline_basis_grid(self.field_grid, grid, 1).apply(u.to(F64)).float()

    def to_displacement_field(self) -> DisplacementFieldTransform:
        return DisplacementFieldTransform(self.field_grid, self.field_displacement().detach())
