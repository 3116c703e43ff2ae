"""Greedy diffeomorphic registration of a dense displacement field (clear only).

The scheme of Yushkevich's Greedy, of the greedy half of ANTs SyN and of (diffeomorphic) demons.
At every iteration, with W(x) = L(x + u(x)) (L the fixed outer part, u the field on the level grid):

1. force    f(x) = dE/dI_w(x) * grad I_w(x): the metric's derivative with respect to a small
            displacement of the warped image I_w = M o W (autograd only through the metric, the
            warped image's gradient by central differences: no backward pass through sampling);
2. update   v = -step * G_fluid * f / max |G_fluid * f|: Gaussian smoothing of the force
            (fluid-like regularisation), scaled so that no voxel moves more than ``step_vox``;
3. compose  u <- v + u o (id + v), i.e. W <- W o (id + v) (a composition of small smooth
            displacements, each with positive Jacobian, stays invertible);
4. smooth   u <- G_field * u (diffusion-like regularisation of the total field).

Sigmas and steps are in voxels of the level grid (Greedy's ``-s 1.732vox 0.7071vox -e 1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..grid import Grid, field_image, field_points
from ..image import gradient, sample, sample_index, smooth


@dataclass
class GreedyOptions:
    max_iter: int = 50
    step_vox: float = 1.0  # largest update per iteration, in voxels
    sigma_update_vox: float = 1.732  # smoothing of each update (fluid-like)
    sigma_field_vox: float = 0.7071  # smoothing of the total field (diffusion-like)
    tol: float = 1e-4  # stop when the metric improved by less than tol * |value| over ``window`` iterations
    window: int = 10


class FieldComposer:
    """Composition of displacement fields on one grid, in index space (the grid's voxel indices
    and the world -> index map are computed once, not at every iteration)."""

    def __init__(self, grid: Grid, dtype: torch.dtype = torch.float32) -> None:
        self.grid = grid
        d = grid.ndim
        self.base = grid.indices(dtype)  # (P, d) voxel indices
        self.to_index = grid.world_to_index_matrix()[:d, :d].T.to(dtype)  # mm (row vectors) -> index units

    def __call__(self, u: Tensor, v: Tensor) -> Tensor:
        """Displacement of (id + u) o (id + v): v(x) + u(x + v(x)); u, v (d, *grid.shape) in mm."""
        shifted = sample_index(u, self.grid, self.base + field_points(v) @ self.to_index, padding_mode="border")
        return v + field_image(shifted, self.grid)


def resample_field(u: Tensor, src: Grid, dst: Grid) -> Tensor:
    """A (P_src, d) displacement field on ``src`` interpolated linearly at the points of ``dst``."""
    if dst.same_as(src):
        return u
    vals, _ = sample(field_image(u, src), src, dst.points(u.dtype), padding_mode="border")
    return vals


def metric_force(value_of: Callable[[Tensor], Tensor], warped: Tensor, grid: Grid) -> tuple[float, Tensor]:
    """Value E(I_w) and the force dE/dI_w * grad I_w, shape (d, *grid.shape) (world axes, mm^-1)."""
    w = warped.detach().requires_grad_(True)
    value = value_of(w)
    (de,) = torch.autograd.grad(value, w)
    return float(value.detach()), de[None] * gradient(w.detach(), grid)


def greedy_level(warp: Callable[[Tensor], Tensor], value_of: Callable[[Tensor], Tensor], u: Tensor, grid: Grid,
                 options: GreedyOptions, log: Callable[[dict], None] | None = None) -> tuple[Tensor, dict]:
    """Run the greedy scheme on one level.

    Args:
        warp: u (P, d) -> warped moving image on ``grid`` (grid.shape), no gradient needed.
        value_of: warped image (grid.shape) -> metric value (lower is better), differentiable.
        u: initial field (P, d) in mm on ``grid`` (C order).
    Returns:
        the final field (P, d) and a report (iterations, final value, converged).
    """
    f = field_image(u.detach().to(torch.float32), grid)
    compose = FieldComposer(grid)
    step_mm = options.step_vox * min(grid.spacing)
    values: list[float] = []
    converged = False
    it = 0
    for it in range(1, options.max_iter + 1):
        with torch.no_grad():
            warped = warp(field_points(f))
        value, force = metric_force(value_of, warped, grid)
        values.append(value)
        if log:
            log({"iteration": it, "value": value})
        if len(values) > options.window and values[-options.window - 1] - value < options.tol * abs(value):
            converged = True
            break
        with torch.no_grad():
            v = smooth(force, grid, options.sigma_update_vox * min(grid.spacing))
            vmax = float((v * v).sum(0).max().sqrt())  # (linalg.norm over dim 0 is 20x slower here)
            if vmax <= 0:
                converged = True
                break
            f = compose(f, v * (-step_mm / vmax))
            if options.sigma_field_vox > 0:
                f = smooth(f, grid, options.sigma_field_vox * min(grid.spacing))
    return field_points(f), {"iterations": it, "final_value": values[-1] if values else float("nan"),
                             "converged": converged}
