"""Linear bases Phi (N points x P coefficients) used by transforms that are linear in their parameters.

``apply``   : (P, c) coefficients -> (N, c) values at the points  (Phi @ C)
``adjoint`` : (N, c) values at the points -> (P, c)               (Phi^T @ V)

The joint-product seam and Gauss-Newton use only these two maps, so a basis can be dense
(affine: Phi(x) = [x - c, 1]), sparse (B-spline rows at sampled points) or a Kronecker
product of 1D spline matrices (B-spline on a full grid).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .grid import Grid


def bspline_kernel(t: Tensor, order: int) -> Tensor:
    """Centred cardinal B-spline beta_order(t) for order 0..3."""
    a = t.abs()
    if order == 3:
        return torch.where(a < 1, (4 - 6 * a**2 + 3 * a**3) / 6, torch.where(a < 2, (2 - a) ** 3 / 6, torch.zeros_like(a)))
    if order == 2:
        return torch.where(a < 0.5, 0.75 - a**2, torch.where(a < 1.5, 0.5 * (1.5 - a) ** 2, torch.zeros_like(a)))
    if order == 1:
        return torch.clamp(1 - a, min=0)
    if order == 0:
        return ((t >= -0.5) & (t < 0.5)).to(t.dtype)
    raise ValueError(f"unsupported B-spline order {order}")


def bspline_kernel_derivative(t: Tensor, order: int = 3) -> Tensor:
    """d beta_order / dt = beta_{order-1}(t + 1/2) - beta_{order-1}(t - 1/2)."""
    return bspline_kernel(t + 0.5, order - 1) - bspline_kernel(t - 0.5, order - 1)


class Basis:
    num_points: int
    num_basis: int

    def apply(self, coef: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def adjoint(self, values: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def adjoint_squared(self, values: Tensor) -> Tensor:
        """(Phi o Phi)^T V, elementwise-squared basis (for Jacobi preconditioners)."""
        raise NotImplementedError  # pragma: no cover

    def dense(self) -> Tensor:
        return self.apply(torch.eye(self.num_basis, dtype=torch.float64))

    def rows(self, index: Tensor) -> "Basis":  # pragma: no cover - interface
        raise NotImplementedError


class DenseBasis(Basis):
    def __init__(self, matrix: Tensor) -> None:
        self.matrix = matrix
        self.num_points, self.num_basis = matrix.shape

    def apply(self, coef: Tensor) -> Tensor:
        return self.matrix.to(coef.dtype) @ coef

    def adjoint(self, values: Tensor) -> Tensor:
        return self.matrix.to(values.dtype).T @ values

    def adjoint_squared(self, values: Tensor) -> Tensor:
        return (self.matrix.to(values.dtype) ** 2).T @ values

    def dense(self) -> Tensor:
        return self.matrix

    def rows(self, index: Tensor) -> "DenseBasis":
        return DenseBasis(self.matrix[index])


class SparseBasis(Basis):
    """Each point has K (index, weight) pairs; ``index`` and ``weight`` have shape (N, K)."""

    def __init__(self, index: Tensor, weight: Tensor, num_basis: int) -> None:
        self.index, self.weight = index, weight
        self.num_points, self.num_basis = index.shape[0], num_basis

    def apply(self, coef: Tensor) -> Tensor:
        return torch.einsum("nk,nkc->nc", self.weight.to(coef.dtype), coef[self.index])

    def adjoint(self, values: Tensor) -> Tensor:
        return self._scatter(values, self.weight)

    def adjoint_squared(self, values: Tensor) -> Tensor:
        return self._scatter(values, self.weight**2)

    def _scatter(self, values: Tensor, weight: Tensor) -> Tensor:
        contrib = weight.to(values.dtype)[..., None] * values[:, None, :]  # (N, K, c)
        out = torch.zeros(self.num_basis, values.shape[1], dtype=values.dtype)
        out.index_add_(0, self.index.reshape(-1), contrib.reshape(-1, values.shape[1]))
        return out

    def rows(self, index: Tensor) -> "SparseBasis":
        return SparseBasis(self.index[index], self.weight[index], self.num_basis)


class KroneckerBasis(Basis):
    """Tensor-product basis on a full grid: Phi = Bz (x) By (x) Bx, factors in (x, y[, z]) order.

    factors[a] has shape (n_a points, m_a coefficients) along axis a. Points and coefficients are
    both in C order (z slowest).
    """

    def __init__(self, factors: Sequence[Tensor]) -> None:
        self.factors = list(factors)
        self.num_points = math.prod(f.shape[0] for f in self.factors)
        self.num_basis = math.prod(f.shape[1] for f in self.factors)

    def _contract(self, x: Tensor, mats: Sequence[Tensor], transpose: bool) -> Tensor:
        d = len(mats)
        c = x.shape[1]
        sizes = [m.shape[1] if not transpose else m.shape[0] for m in mats][::-1]  # z,y,x
        t = x.reshape(*sizes, c)
        for axis in range(d):
            m = mats[axis].to(x.dtype)
            m = m.T if transpose else m  # (out, in)
            tdim = d - 1 - axis
            t = torch.tensordot(m, t, dims=([1], [tdim]))  # new axis at front
            t = torch.movedim(t, 0, tdim)
        return t.reshape(-1, c)

    def apply(self, coef: Tensor) -> Tensor:
        return self._contract(coef, self.factors, transpose=False)

    def adjoint(self, values: Tensor) -> Tensor:
        return self._contract(values, self.factors, transpose=True)

    def adjoint_squared(self, values: Tensor) -> Tensor:
        return self._contract(values, [f**2 for f in self.factors], transpose=True)

    def rows(self, index: Tensor) -> "KroneckerRows":
        """The sparse rows of the points ``index`` (flat C-order indices), computed for those only."""
        ns = [f.shape[0] for f in self.factors]
        pidx, rest = [], index.long()
        for n in ns:  # x varies fastest
            pidx.append(rest % n)
            rest = rest // n
        sparse = self._sparse_at(pidx)
        return KroneckerRows(sparse.index, sparse.weight, self, index.long())

    def to_sparse(self) -> SparseBasis:
        ns = [f.shape[0] for f in self.factors]
        mesh = torch.meshgrid(*[torch.arange(n) for n in ns[::-1]], indexing="ij")
        return self._sparse_at([m.reshape(-1) for m in reversed(mesh)])  # x, y, z index per point

    def _sparse_at(self, pidx: list[Tensor]) -> SparseBasis:
        """Sparse rows at the points whose per-axis indices are ``pidx`` (x, y[, z])."""
        n = pidx[0].shape[0]
        idx = torch.zeros(n, 1, dtype=torch.long)
        wt = torch.ones(n, 1, dtype=self.factors[0].dtype)
        stride = 1
        for a, f in enumerate(self.factors):
            k = int((f != 0).sum(1).max().item()) if f.numel() else 1
            _, i = torch.topk(f.abs(), k=max(k, 1), dim=1)
            ia, wa = i[pidx[a]], torch.gather(f, 1, i)[pidx[a]]  # (N, k_a)
            idx = (idx[:, :, None] + stride * ia[:, None, :]).reshape(n, -1)
            wt = (wt[:, :, None] * wa[:, None, :]).reshape(n, -1)
            stride *= f.shape[1]
        return SparseBasis(idx, wt, self.num_basis)


class KroneckerRows(SparseBasis):
    """Sparse rows of a Kronecker basis (the points ``points`` of its grid) that keep the basis
    they came from. ``apply``/``adjoint`` go through the full-grid per-axis products (a scatter
    onto the grid, or a gather after them) whenever that is cheaper than the rows' 4^d weights
    per point, i.e. for samples above 1 / 4^d of the grid (3D B-spline Gauss-Newton on a 25 %
    sample: 5x faster). Backends that need the rows themselves (MPC, CKKS) still see a
    :class:`SparseBasis`."""

    def __init__(self, index: Tensor, weight: Tensor, kron: KroneckerBasis, points: Tensor) -> None:
        super().__init__(index, weight, kron.num_basis)
        self.kron, self.points = kron, points
        self._via_grid = points.shape[0] * index.shape[1] >= kron.num_points
        self._unique = self._via_grid and torch.unique(points).numel() == points.numel()

    def apply(self, coef: Tensor) -> Tensor:
        return self.kron.apply(coef)[self.points] if self._via_grid else super().apply(coef)

    def _on_grid(self, values: Tensor) -> Tensor:
        out = torch.zeros(self.kron.num_points, values.shape[1], dtype=values.dtype)
        if self._unique:  # a plain scatter is several times faster than index_add_
            out[self.points] = values
            return out
        return out.index_add_(0, self.points, values)

    def adjoint(self, values: Tensor) -> Tensor:
        return self.kron.adjoint(self._on_grid(values)) if self._via_grid else super().adjoint(values)

    def adjoint_squared(self, values: Tensor) -> Tensor:
        return self.kron.adjoint_squared(self._on_grid(values)) if self._via_grid else super().adjoint_squared(values)

    def rows(self, index: Tensor) -> "KroneckerRows":
        return KroneckerRows(self.index[index], self.weight[index], self.kron, self.points[index])


def spline_support(u: Tensor, n: int, order: int) -> tuple[Tensor, Tensor]:
    """Indices (N, order+1) and weights of a 1D spline at continuous indices u, grid of n nodes.

    Points outside the node range get zero weights (identity / zero displacement, as ITK).
    """
    k = order + 1
    start = torch.floor(u - (order - 1) / 2.0).long() if order > 0 else torch.round(u).long()
    start = torch.clamp(start, 0, max(n - k, 0))
    idx = start[:, None] + torch.arange(k)[None]
    w = bspline_kernel(u[:, None] - idx.to(u.dtype), order)
    idx = torch.clamp(idx, 0, n - 1)
    return idx, w


def spline_basis_points(ctrl: Grid, points: Tensor, order: int) -> SparseBasis:
    """Sparse tensor-product spline basis of the control grid ``ctrl`` at world points (N, d)."""
    u = ctrl.world_to_index(points.to(torch.float64))
    n_pts = u.shape[0]
    idx = torch.zeros(n_pts, 1, dtype=torch.long)
    wt = torch.ones(n_pts, 1, dtype=torch.float64)
    stride = 1
    for a in range(ctrl.ndim):
        ia, wa = spline_support(u[:, a], ctrl.size[a], order)
        idx = (idx[:, :, None] + stride * ia[:, None, :]).reshape(n_pts, -1)
        wt = (wt[:, :, None] * wa[:, None, :]).reshape(n_pts, -1)
        stride *= ctrl.size[a]
    return SparseBasis(idx, wt, ctrl.numel)


def spline_basis_grid(ctrl: Grid, grid: Grid, order: int) -> Basis:
    """Spline basis on every voxel of ``grid``: Kronecker when axes align, sparse otherwise."""
    if ctrl.ndim != grid.ndim:
        raise ValueError("control grid and sampling grid differ in dimension")
    if not all(abs(a - b) < 1e-6 for a, b in zip(ctrl.direction, grid.direction)):
        return spline_basis_points(ctrl, grid.points(torch.float64), order)
    factors = []
    for a in range(grid.ndim):
        idx = torch.zeros(grid.size[a], grid.ndim, dtype=torch.float64)
        idx[:, a] = torch.arange(grid.size[a], dtype=torch.float64)
        u = ctrl.world_to_index(grid.index_to_world(idx))[:, a]
        nodes = torch.arange(ctrl.size[a], dtype=torch.float64)
        mat = bspline_kernel(u[:, None] - nodes[None], order)
        # mimic the clamped support of spline_support at the boundary nodes
        ii, ww = spline_support(u, ctrl.size[a], order)
        exact = torch.zeros_like(mat)
        exact.scatter_add_(1, ii, ww)
        factors.append(exact if not torch.allclose(exact, mat) else mat)
    return KroneckerBasis(factors)
