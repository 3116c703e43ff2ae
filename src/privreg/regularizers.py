"""Regularisers of dense displacement fields u with shape (d, *grid.shape) in mm (lower is better).

Derivatives are finite differences in mm; each energy is a mean over voxels.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _diff(u: Tensor, axis: int, spacing: float) -> Tensor:
    """Forward difference along spatial tensor axis ``axis`` (0-based over spatial dims), same size."""
    dim = axis + 1
    d = torch.diff(u, dim=dim) / spacing
    return torch.cat([d, d.narrow(dim, d.shape[dim] - 1, 1) * 0], dim=dim) if d.shape[dim] > 0 else torch.zeros_like(u)


def jacobian_matrix(u: Tensor, spacing: tuple[float, ...], direction: Tensor | None = None) -> Tensor:
    """d u_k / d x_l (central differences), shape (*grid.shape, d, d); spacing in (x, y, z) order.

    ``direction`` (d x d, columns = index axes in world space) makes l a world axis; without it l
    is the l-th index axis (the same for an identity direction). Norms of the whole matrix (the
    diffusion and bending energies) do not depend on it; determinants and divergences do."""
    d = u.shape[0]
    rows = []
    for k in range(d):
        cols = []
        for l in range(d):
            tdim = d - 1 - l
            cols.append(torch.gradient(u[k], dim=tdim)[0] / spacing[l] if u.shape[1 + tdim] > 1 else torch.zeros_like(u[k]))
        rows.append(torch.stack(cols, -1))
    j = torch.stack(rows, -2)  # derivatives along index axes (in mm): J_world @ direction
    return j if direction is None else j @ direction.to(j.dtype).T


def jacobian_determinant(u: Tensor, spacing: tuple[float, ...], direction: Tensor | None = None) -> Tensor:
    """det(I + grad u) per voxel, shape grid.shape (``direction``: the grid's, see jacobian_matrix)."""
    j = jacobian_matrix(u, spacing, direction)
    eye = torch.eye(u.shape[0], dtype=u.dtype)
    return torch.linalg.det(j + eye)


def diffusion_energy(u: Tensor, spacing: tuple[float, ...], direction: Tensor | None = None) -> Tensor:
    """Mean of |grad u|^2."""
    j = jacobian_matrix(u, spacing)
    return (j**2).sum((-1, -2)).mean()


def elastic_energy(u: Tensor, spacing: tuple[float, ...], direction: Tensor | None = None, mu: float = 1.0,
                   lam: float = 1.0) -> Tensor:
    """Linear elasticity: mean of mu * |sym grad u|^2 + lam / 2 * (div u)^2."""
    j = jacobian_matrix(u, spacing, direction)
    sym = 0.5 * (j + j.transpose(-1, -2))
    div = torch.diagonal(j, dim1=-2, dim2=-1).sum(-1)
    return (mu * (sym**2).sum((-1, -2)) + 0.5 * lam * div**2).mean()


def bending_energy(u: Tensor, spacing: tuple[float, ...], direction: Tensor | None = None) -> Tensor:
    """Mean of sum_{k,l,m} (d^2 u_k / dx_l dx_m)^2 (thin-plate bending)."""
    d = u.shape[0]
    j = jacobian_matrix(u, spacing)  # (*s, k, l)
    total = 0.0
    for l in range(d):
        g = j[..., l].movedim(-1, 0)  # (k, *s): d u_k / d x_l
        h = jacobian_matrix(g, spacing)  # (*s, k, m)
        total = total + (h**2).sum((-1, -2))
    return total.mean()


def folding_penalty(u: Tensor, spacing: tuple[float, ...], direction: Tensor | None = None,
                    eps: float = 0.01) -> Tensor:
    """Mean of relu(eps - det J)^2: penalises non-positive Jacobian determinants."""
    return torch.relu(eps - jacobian_determinant(u, spacing, direction)).pow(2).mean()


REGULARIZERS = {
    "diffusion": diffusion_energy,
    "elastic": elastic_energy,
    "bending": bending_energy,
    "folding": folding_penalty,
}


def control_grid_operator(v: Tensor, shape: tuple[int, ...], kind: str) -> Tensor:
    """Quadratic-form operator K v on control-point coefficients v (P, d), C-order ``shape``.

    ``diffusion``: K = -Laplacian (first differences); ``bending``: K = Laplacian^2. Neumann
    borders. Used by Gauss-Newton, where the penalty is 1/2 v^T K v in control-spacing units.
    """
    x = v.T.reshape((v.shape[1],) + tuple(shape))

    def neg_lap_exact(t: Tensor) -> Tensor:
        out = torch.zeros_like(t)
        for dim in range(1, t.dim()):
            if t.shape[dim] < 2:
                continue
            dfw = torch.diff(t, dim=dim)  # t_{i+1} - t_i
            pad = torch.zeros_like(t.narrow(dim, 0, 1))
            out = out + torch.cat([pad, dfw], dim) - torch.cat([dfw, pad], dim)
        return out

    if kind == "diffusion":
        y = neg_lap_exact(x)
    elif kind == "bending":
        y = neg_lap_exact(neg_lap_exact(x))
    else:
        raise ValueError(f"Gauss-Newton supports diffusion or bending regularisation, got {kind!r}")
    return y.reshape(v.shape[1], -1).T
