"""Evaluation: label overlap, surface distances, landmark TRE, Jacobian statistics, SSIM, PSNR,
displacement RMSE between transforms. Distances are in mm (physical space)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from .grid import Grid, field_image
from .image import Image
from .regularizers import jacobian_determinant
from .transforms import Transform


def _labels(a: Tensor, b: Tensor, labels: list[int] | None) -> list[int]:
    if labels is not None:
        return labels
    vals = set(torch.unique(a).long().tolist()) | set(torch.unique(b).long().tolist())
    return sorted(v for v in vals if v != 0)


def dice(a: Tensor, b: Tensor, labels: list[int] | None = None) -> dict[int, float]:
    """Dice per label of two label maps on the same grid (labels absent from both are skipped)."""
    out = {}
    for lab in _labels(a, b, labels):
        x, y = a == lab, b == lab
        s = int(x.sum() + y.sum())
        if s:
            out[lab] = 2.0 * int((x & y).sum()) / s
    return out


def jaccard(a: Tensor, b: Tensor, labels: list[int] | None = None) -> dict[int, float]:
    out = {}
    for lab in _labels(a, b, labels):
        x, y = a == lab, b == lab
        u = int((x | y).sum())
        if u:
            out[lab] = int((x & y).sum()) / u
    return out


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    sp = tuple(reversed(spacing))  # array axis order
    sa = a & ~ndimage.binary_erosion(a)
    sb = b & ~ndimage.binary_erosion(b)
    db = ndimage.distance_transform_edt(~sb, sampling=sp)
    da = ndimage.distance_transform_edt(~sa, sampling=sp)
    return db[sa], da[sb]


def hd95(a: Tensor, b: Tensor, grid: Grid) -> float:
    """95th percentile symmetric Hausdorff distance (mm) between two binary masks."""
    x, y = a.numpy().astype(bool), b.numpy().astype(bool)
    if not x.any() or not y.any():
        return float("nan")
    d1, d2 = _surface_distances(x, y, grid.spacing)
    return float(max(np.percentile(d1, 95), np.percentile(d2, 95)))


def assd(a: Tensor, b: Tensor, grid: Grid) -> float:
    """Average symmetric surface distance (mm)."""
    x, y = a.numpy().astype(bool), b.numpy().astype(bool)
    if not x.any() or not y.any():
        return float("nan")
    d1, d2 = _surface_distances(x, y, grid.spacing)
    return float((d1.sum() + d2.sum()) / (len(d1) + len(d2)))


def tre(transform: Transform, fixed_points: Tensor, moving_points: Tensor) -> Tensor:
    """Target registration error (mm) per landmark: |W(p_fixed) - p_moving|."""
    with torch.no_grad():
        return torch.linalg.norm(transform(fixed_points.to(torch.float64)).to(torch.float64) - moving_points.to(torch.float64), dim=1)


def jacobian_map(transform: Transform, grid: Grid) -> Tensor:
    """det(dW/dx) of ``transform`` at every voxel of ``grid`` (grid.shape); <= 0 where it folds."""
    with torch.no_grad():
        disp = transform.displacement(grid).to(torch.float64)
    return jacobian_determinant(field_image(disp, grid), grid.spacing, grid.direction_matrix())


def jacobian_stats(transform: Transform, grid: Grid, mask: Tensor | None = None) -> dict[str, float]:
    """Statistics of det(dW/dx) on ``grid``; folding = % of voxels with det <= 0."""
    det = jacobian_map(transform, grid)
    if mask is not None:
        det = det[mask.reshape(det.shape).bool()]
    det = det.reshape(-1)
    return {"min": float(det.min()), "max": float(det.max()), "mean": float(det.mean()), "std": float(det.std()),
            "folding_percent": 100.0 * float((det <= 0).double().mean())}


def displacement_rmse(a: Transform, b: Transform, grid: Grid, mask: Tensor | None = None) -> float:
    """RMS over ``grid`` (optionally masked) of |a(x) - b(x)| in mm."""
    with torch.no_grad():
        pa, pb = a.transform_grid(grid).to(torch.float64), b.transform_grid(grid).to(torch.float64)
    d2 = ((pa - pb) ** 2).sum(1)
    if mask is not None:
        d2 = d2[mask.reshape(-1).bool()]
    return float(torch.sqrt(d2.mean()))


def mean_displacement_error(a: Transform, b: Transform, grid: Grid, mask: Tensor | None = None) -> float:
    """Mean over ``grid`` of |a(x) - b(x)| in mm."""
    with torch.no_grad():
        pa, pb = a.transform_grid(grid).to(torch.float64), b.transform_grid(grid).to(torch.float64)
    d = torch.linalg.norm(pa - pb, dim=1)
    if mask is not None:
        d = d[mask.reshape(-1).bool()]
    return float(d.mean())


def psnr(a: Tensor, b: Tensor, data_range: float | None = None) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    rng = float(b.max() - b.min()) if data_range is None else data_range
    return float("inf") if mse == 0 else 10.0 * np.log10(rng**2 / mse)


def ssim(a: Tensor, b: Tensor, data_range: float | None = None, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) with a Gaussian window."""
    x, y = a.double().numpy(), b.double().numpy()
    rng = float(y.max() - y.min()) if data_range is None else data_range
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    f = lambda z: ndimage.gaussian_filter(z, sigma)  # noqa: E731
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def evaluate_images(fixed: Image, warped: Image) -> dict[str, float]:
    return {"ssim": ssim(warped.data, fixed.data), "psnr": psnr(warped.data, fixed.data)}
