"""Landmark (point-set) registration: rigid (Kabsch), affine least squares, thin-plate spline.

Inputs are corresponding points (N, d) in fixed and moving space; each returns a transform
mapping fixed points to moving points (ITK convention).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import InputError
from .transforms import AffineTransform, Transform

F64 = torch.float64


def read_points(path, grid=None) -> Tensor:
    """Points (N, d) in world mm (ITK's LPS) from a landmark file.

    Formats: elastix / transformix point files (first line ``point`` or ``index``, second the count,
    then one point per line; ``index`` needs ``grid`` to convert voxel indices to mm); CSV or
    whitespace-separated text with one point per row (a header row of names is skipped; ANTs' CSV
    columns ``x,y,z[,t,label]`` keep their first d columns given by ``grid``'s dimension, or 3).
    """
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise InputError(f"no such landmark file: {p}")
    lines = [ln.strip() for ln in p.read_text(errors="replace").splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise InputError(f"landmark file {p} is empty")
    kind = lines[0].lower()
    index = kind == "index"
    if kind in ("point", "index"):
        lines = lines[2:]
    elif not _numeric(lines[0]):
        lines = lines[1:]  # a CSV header
    try:
        rows = [[float(v) for v in ln.replace(",", " ").split()] for ln in lines]
    except ValueError:
        raise InputError(f"landmark file {p} has a row that is not numbers") from None
    if not rows:
        raise InputError(f"landmark file {p} has no points")
    d = grid.ndim if grid is not None else min(3, len(rows[0]))
    if any(len(r) < d for r in rows):
        raise InputError(f"landmark file {p}: every row needs {d} coordinates")
    pts = torch.tensor([r[:d] for r in rows], dtype=F64)
    if index:
        if grid is None:
            raise InputError(f"{p} holds voxel indices: give the image they refer to (--reference)")
        pts = grid.index_to_world(pts)
    return pts


def _numeric(line: str) -> bool:
    try:
        [float(v) for v in line.replace(",", " ").split()]
        return True
    except ValueError:
        return False


def _check(fixed: Tensor, moving: Tensor, minimum: int) -> tuple[Tensor, Tensor]:
    f, m = torch.as_tensor(fixed, dtype=F64), torch.as_tensor(moving, dtype=F64)
    if f.shape != m.shape or f.dim() != 2 or f.shape[1] not in (2, 3):
        raise InputError(f"landmarks must be two (N, d) arrays of the same shape, got {tuple(f.shape)} and {tuple(m.shape)}")
    if f.shape[0] < minimum:
        raise InputError(f"need at least {minimum} landmark pairs, got {f.shape[0]}")
    return f, m


def rigid_landmarks(fixed: Tensor, moving: Tensor, scaling: bool = False) -> AffineTransform:
    """Least-squares rigid (or similarity) fit via Kabsch/Umeyama."""
    f, m = _check(fixed, moving, torch.as_tensor(fixed).shape[-1])
    cf, cm = f.mean(0), m.mean(0)
    x, y = f - cf, m - cm
    u, s, vh = torch.linalg.svd(y.T @ x)
    dfix = torch.ones(f.shape[1], dtype=F64)
    dfix[-1] = torch.sign(torch.linalg.det(u @ vh))
    r = u @ torch.diag(dfix) @ vh
    scale = float((s * dfix).sum() / (x**2).sum()) if scaling else 1.0
    a = scale * r
    return AffineTransform(f.shape[1], a, cm - a @ cf, None)


def affine_landmarks(fixed: Tensor, moving: Tensor) -> AffineTransform:
    """Least-squares affine fit (needs d + 1 non-degenerate pairs)."""
    f, m = _check(fixed, moving, fixed.shape[1] + 1)
    h = torch.cat([f, torch.ones(f.shape[0], 1, dtype=F64)], 1)
    sol = torch.linalg.lstsq(h, m).solution  # (d+1, d)
    d = f.shape[1]
    return AffineTransform(d, sol[:d].T, sol[d], None)


class ThinPlateSplineTransform(Transform):
    """Interpolating (or smoothing) thin-plate spline through landmark pairs."""

    def __init__(self, fixed: Tensor, moving: Tensor, smoothing: float = 0.0) -> None:
        f, m = _check(fixed, moving, fixed.shape[1] + 1)
        super().__init__(f.shape[1])
        self.register_buffer("ctrl", f)
        n, d = f.shape
        k = self._kernel(f, f) + smoothing * torch.eye(n, dtype=F64)
        p = torch.cat([torch.ones(n, 1, dtype=F64), f], 1)
        a = torch.zeros(n + d + 1, n + d + 1, dtype=F64)
        a[:n, :n], a[:n, n:], a[n:, :n] = k, p, p.T
        rhs = torch.cat([m, torch.zeros(d + 1, d, dtype=F64)], 0)
        sol = torch.linalg.lstsq(a, rhs).solution
        self.register_buffer("w", sol[:n])
        self.register_buffer("aff", sol[n:])
        self.coef = torch.nn.Parameter(torch.zeros(0, dtype=F64), requires_grad=False)

    @property
    def theta(self) -> Tensor:
        return self.coef

    def _kernel(self, a: Tensor, b: Tensor) -> Tensor:
        r = torch.cdist(a, b)
        if self.ndim == 2:
            return torch.where(r > 0, r**2 * torch.log(r.clamp(min=1e-12)), torch.zeros_like(r))
        return -r  # 3D biharmonic kernel

    def forward(self, points: Tensor) -> Tensor:
        p = points.to(F64)
        k = self._kernel(p, self.ctrl)
        out = k @ self.w + torch.cat([torch.ones(p.shape[0], 1, dtype=F64), p], 1) @ self.aff
        return out.to(points.dtype)


def tps_landmarks(fixed: Tensor, moving: Tensor, smoothing: float = 0.0) -> ThinPlateSplineTransform:
    return ThinPlateSplineTransform(torch.as_tensor(fixed), torch.as_tensor(moving), smoothing)
