"""Images in physical space and their I/O (SimpleITK: NIfTI, MHA/MHD, NRRD, PNG/JPEG, DICOM).

An :class:`Image` is a float tensor of shape ``grid.shape`` (z, y, x) on a :class:`Grid`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError
from .grid import DTYPE, Grid, index_to_normalized_matrix, world_to_normalized

_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


@dataclass
class Image:
    """A scalar image: ``data`` has shape ``grid.shape`` (z, y, x)."""

    data: Tensor
    grid: Grid

    def __post_init__(self) -> None:
        if tuple(self.data.shape) != self.grid.shape:
            raise ValueError(f"data shape {tuple(self.data.shape)} does not match grid shape {self.grid.shape}")

    @property
    def ndim(self) -> int:
        return self.grid.ndim

    def with_data(self, data: Tensor) -> "Image":
        return Image(data, self.grid)

    def check_finite(self, name: str = "image") -> "Image":
        if not torch.isfinite(self.data).all():
            raise InputError(f"{name} contains NaN or infinite values")
        return self


# ------------------------------------------------------------------------ I/O
def grid_from_sitk(img: sitk.Image) -> Grid:
    return Grid(img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection())


def to_sitk(image: Image, dtype: np.dtype | None = None) -> sitk.Image:
    arr = image.data.detach().cpu().numpy()
    if dtype is not None:
        arr = arr.astype(dtype)
    out = sitk.GetImageFromArray(arr)
    g = image.grid
    out.SetSpacing(g.spacing)
    out.SetOrigin(g.origin)
    out.SetDirection(g.direction)
    return out


WRITABLE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".png", ".jpg", ".jpeg", ".tif", ".tiff")


def check_image_suffix(path: str | os.PathLike) -> None:
    """Refuse an output image name whose extension no writer knows (before any work is done)."""
    name = Path(path).name.lower()
    if not name.endswith(WRITABLE_SUFFIXES):
        raise InputError(f"cannot write an image named {Path(path).name!r}: use one of {', '.join(WRITABLE_SUFFIXES)}")


def _check_nifti(p: Path) -> None:
    """SimpleITK reads truncated NIfTI files (padding with zeros) and turns NaN/Inf voxels into 0 on the
    way; nibabel does neither, so a NIfTI's voxels are checked with nibabel before they are used."""
    import nibabel as nib

    try:
        arr = np.asanyarray(nib.load(str(p)).dataobj)
    except Exception as exc:  # nibabel raises several types for truncated / corrupt files
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot read image {p}: {msg}") from None
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        n = int((~np.isfinite(arr)).sum())
        raise InputError(f"{p} contains NaN or infinite values ({n} of {arr.size} voxels)")


def from_sitk(img: sitk.Image) -> Image:
    if img.GetNumberOfComponentsPerPixel() not in (1, 3, 4):
        raise InputError(f"expected a scalar (or RGB) image, got {img.GetNumberOfComponentsPerPixel()} components per voxel")
    if img.GetNumberOfComponentsPerPixel() > 1:
        # RGB(A) slices with equal channels (e.g. ITK example PNGs): use luminance.
        n = img.GetNumberOfComponentsPerPixel()
        chans = [sitk.Cast(sitk.VectorIndexSelectionCast(img, i), sitk.sitkFloat32) for i in range(min(n, 3))]
        img = chans[0] if len(chans) < 3 else 0.299 * chans[0] + 0.587 * chans[1] + 0.114 * chans[2]
    if img.GetDimension() == 3 and img.GetSize()[2] == 1:
        img = img[:, :, 0]  # single-slice volume (e.g. a 2D DICOM) -> 2D
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:  # e.g. a NIfTI with a time axis of length 1
        img = sitk.Extract(img, list(img.GetSize()[:3]) + [0], [0, 0, 0, 0])
    if img.GetDimension() not in (2, 3):
        raise InputError(f"only 2D and 3D images are supported, got {img.GetDimension()}D")
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    return Image(torch.from_numpy(np.ascontiguousarray(arr)), grid_from_sitk(img))


def read_image(path: str | os.PathLike) -> Image:
    """Read a 2D/3D scalar image; a directory is read as a DICOM series.

    Raises:
        InputError: missing, unreadable or non-finite image.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such file or directory: {p}")
    if p.is_file() and p.stat().st_size == 0:
        raise InputError(f"cannot read image {p}: the file is empty")
    if p.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti(p)
    try:
        if p.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(p))
            if not series:
                raise InputError(f"no DICOM series found in directory {p}")
            files = reader.GetGDCMSeriesFileNames(str(p), series[0])
            reader.SetFileNames(files)
            img = reader.Execute()
            photometric = _dicom_tag(files[0], "0028|0004")
        else:
            img = sitk.ReadImage(str(p))
            photometric = _dicom_tag(str(p), "0028|0004") if p.suffix.lower() in _DICOM_SUFFIXES else ""
    except RuntimeError as exc:
        raise InputError(f"cannot read image {p}: {str(exc).strip().splitlines()[-1]}") from None
    image = from_sitk(img)
    if photometric.strip().upper() == "MONOCHROME1":  # bright = low values: invert to MONOCHROME2
        image = image.with_data(image.data.max() + image.data.min() - image.data)
    return image.check_finite(str(p))


def from_nibabel(img) -> Image:
    """A nibabel image (RAS affine) as an :class:`Image` (ITK's LPS world: x and y flipped)."""
    arr = np.asanyarray(img.dataobj).astype(np.float32)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    aff = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(img.affine, dtype=np.float64)
    d = 2 if arr.ndim == 3 and arr.shape[2] == 1 else arr.ndim
    if d not in (2, 3) or arr.ndim > 3:
        raise InputError(f"only 2D and 3D scalar images are supported, got shape {arr.shape}")
    if d == 2:
        arr = arr[:, :, 0]
    m = aff[:d, :d]
    spacing = np.linalg.norm(m, axis=0)
    direction = m / spacing
    return Image(torch.from_numpy(np.ascontiguousarray(arr.T)), Grid(arr.shape, tuple(spacing), tuple(aff[:d, 3]),
                                                                     tuple(direction.reshape(-1))))


def as_image(obj, name: str = "image") -> Image:
    """An :class:`Image` from what users hold: an Image, a path, a SimpleITK image, a nibabel image, or
    ``(array or tensor in (z, y, x) order, Grid)``; a bare array gets a unit grid (spacing 1 mm, origin 0)."""
    if isinstance(obj, Image):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return read_image(obj)
    if isinstance(obj, sitk.Image):
        return from_sitk(obj).check_finite(name)
    if hasattr(obj, "affine") and hasattr(obj, "dataobj"):
        return from_nibabel(obj).check_finite(name)
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], Grid):
        data = torch.as_tensor(np.asarray(obj[0]) if not isinstance(obj[0], Tensor) else obj[0]).to(torch.float32)
        try:
            return Image(data, obj[1]).check_finite(name)
        except ValueError as exc:
            raise InputError(f"{name}: {exc}") from None
    if isinstance(obj, (np.ndarray, Tensor)):
        data = torch.as_tensor(obj).to(torch.float32)
        if data.ndim not in (2, 3):
            raise InputError(f"{name} must be a 2D or 3D array, got shape {tuple(data.shape)}")
        return Image(data, Grid(tuple(reversed(data.shape)))).check_finite(name)
    raise InputError(f"{name}: expected a path, a privreg/SimpleITK/nibabel image or (array, Grid), got {type(obj).__name__}")


def _dicom_tag(path: str, tag: str) -> str:
    try:
        r = sitk.ImageFileReader()
        r.SetFileName(path)
        r.ReadImageInformation()
        return r.GetMetaData(tag) if r.HasMetaDataKey(tag) else ""
    except RuntimeError:
        return ""


def write_image(image: Image, path: str | os.PathLike, dtype: np.dtype | None = None) -> None:
    """Write an image; PNG/JPEG are rescaled to uint8 unless already in [0, 255]."""
    p = Path(path)
    if p.suffix.lower() in (".png", ".jpg", ".jpeg"):
        data = image.data
        lo, hi = float(data.min()), float(data.max())
        if lo < 0 or hi > 255:
            data = (data - lo) / max(hi - lo, 1e-12) * 255
        image = image.with_data(data.round())
        dtype = np.uint8
    sitk.WriteImage(to_sitk(image, dtype), str(p), useCompression=True)


# ------------------------------------------------------------------ sampling
def sample(data: Tensor, grid: Grid, points: Tensor, mode: str = "bilinear",
           padding_mode: str = "zeros") -> tuple[Tensor, Tensor]:
    """Sample a (C, *grid.shape) or grid.shape tensor at world points.

    Args:
        data: image values, shape ``(C, *grid.shape)`` or ``grid.shape``.
        grid: the grid the data lives on.
        points: world points, shape (N, d).
        mode: ``"bilinear"`` (linear) or ``"nearest"``.
    Returns:
        values of shape (N, C) (or (N,) for scalar data) and a bool mask (N,) of points inside
        the grid's voxel-centre bounding box.
    """
    norm = world_to_normalized(grid, points.to(data.dtype))
    inside = ((norm >= -1 - 1e-6) & (norm <= 1 + 1e-6)).all(dim=1)
    return _sample_normalized(data, grid, norm, mode, padding_mode), inside


def sample_index(data: Tensor, grid: Grid, index: Tensor, mode: str = "bilinear",
                 padding_mode: str = "zeros") -> Tensor:
    """:func:`sample` at continuous (x, y[, z]) indices (N, d) of ``grid`` instead of world points."""
    size = torch.tensor(grid.size, dtype=data.dtype)
    norm = 2.0 * index.to(data.dtype) / torch.clamp(size - 1, min=1) - 1.0
    return _sample_normalized(data, grid, norm, mode, padding_mode)


def sample_linear_with_gradient(data: Tensor, grid: Grid, index: Tensor,
                                padded: bool = False) -> tuple[Tensor, Tensor]:
    """Linear interpolation of ``data`` (grid.shape) at continuous indices (N, d) and the exact
    derivative of that interpolant in world space (N, d), zero outside the grid.

    Value and gradient belong to one function (as ITK's ``EvaluateDerivative`` of a linear
    interpolator), so a metric's analytic gradient is the derivative of the value it reports:
    interpolating a central-difference gradient image instead is off by 10-130 % per direction for
    Mattes MI on 2 mm brains, enough to stop Gauss-Newton short of the optimum. ``padded``: ``data``
    is already :func:`zero_padded` (made once per level instead of once per call).
    """
    d = grid.ndim
    pad = data if padded else zero_padded(data)
    size = torch.tensor(grid.size, dtype=index.dtype)
    idx = index.to(data.dtype)
    live = ((idx > -1) & (idx < size)).all(1)  # outside: value 0, gradient 0
    idx = torch.minimum(torch.maximum(idx, torch.full_like(idx, -1.0)), size.to(idx.dtype))
    base = idx.floor()
    frac = idx - base
    base = base.long() + 1  # index into the padded array
    strides = [1]
    for n in grid.size[:-1]:
        strides.append(strides[-1] * (n + 2))
    lin = sum(base[:, k] * strides[k] for k in range(d))
    offs = torch.tensor([sum(((c >> k) & 1) * strides[k] for k in range(d)) for c in range(2 ** d)])
    flat = pad.reshape(-1)
    v = flat[(lin[:, None] + offs).clamp(max=flat.numel() - 1)]  # (N, 2^d), corner bits (x fastest)
    # reduce axis by axis (x, then y, then z): lerp the values, difference for the reduced axis
    v = v.reshape((-1,) + (2,) * d)  # (N, [2z,] 2y, 2x)
    grads: list[Tensor] = []
    for k in range(d):
        f = frac[:, k].reshape((-1,) + (1,) * (d - 1 - k))
        lo, hi = v[..., 0], v[..., 1]
        grads = [g[..., 0] + (g[..., 1] - g[..., 0]) * f for g in grads] + [hi - lo]
        v = lo + (hi - lo) * f
    gi = torch.stack(grads, 1) * live[:, None] / torch.tensor(grid.spacing, dtype=data.dtype)
    return v, gi @ grid.direction_matrix(data.dtype).T


def dilate(mask: Tensor, radius: int) -> Tensor:
    """Binary dilation of a bool array (2D/3D, any shape) by a (2 radius + 1)^d box, separably
    (three 1D max-pools: 10x faster than one 5^3 ``max_pool3d`` on a 2 mm brain)."""
    if radius <= 0:
        return mask.clone()
    x = mask.to(torch.float32)[None, None]
    d = mask.dim()
    pool = F.max_pool3d if d == 3 else F.max_pool2d
    for axis in range(d):
        k = [1] * d
        k[axis] = 2 * radius + 1
        pad = [0] * d
        pad[axis] = radius
        x = pool(x, tuple(k), 1, tuple(pad))
    return x[0, 0] > 0


def zero_padded(data: Tensor) -> Tensor:
    """``data`` with one voxel of zeros around it (for :func:`sample_linear_with_gradient`)."""
    return F.pad(data, (1, 1) * data.dim())


def _sample_normalized(data: Tensor, grid: Grid, norm: Tensor, mode: str = "bilinear",
                      padding_mode: str = "zeros") -> Tensor:
    """:func:`sample` at grid_sample's normalised coordinates (N, d) in [-1, 1] (align_corners)."""
    scalar = data.dim() == grid.ndim
    x = data[None] if scalar else data
    d = grid.ndim
    g = norm.reshape((1,) + (1,) * (d - 1) + (-1, d))
    out = F.grid_sample(x[None], g, mode=mode, padding_mode=padding_mode, align_corners=True)
    out = out.reshape(x.shape[0], -1).T
    return out[:, 0] if scalar else out


def resample(image: Image, grid: Grid, transform=None, mode: str = "bilinear", default: float = 0.0) -> Image:
    """Resample ``image`` onto ``grid``: value at x is image(transform(x)) (ITK convention)."""
    if (transform is None or hasattr(transform, "homogeneous")) and min(grid.size) > 1:
        return _resample_linear(image, grid, transform, mode, default)
    with torch.no_grad():
        pts = grid.points()
        if transform is not None:
            pts = transform.transform_grid(grid) if hasattr(transform, "transform_grid") else transform(pts)
        pts = pts.to(torch.float64 if image.data.dtype == torch.float64 else torch.float32)
    vals, inside = sample(image.data, image.grid, pts, mode=mode, padding_mode="border")
    vals = torch.where(inside, vals, torch.as_tensor(default, dtype=vals.dtype))
    return Image(vals.reshape(grid.shape), grid)


def _resample_linear(image: Image, grid: Grid, transform, mode: str, default: float) -> Image:
    """:func:`resample` under a linear transform (or none): one homogeneous matrix from the output
    grid's normalised coordinates to the image's, so ``affine_grid`` makes the sampling grid without
    world points (a 2 mm brain: 88 -> ~15 ms)."""
    d = grid.ndim
    with torch.no_grad():
        w = torch.eye(d + 1, dtype=torch.float64) if transform is None else transform.homogeneous().detach()
        m = (index_to_normalized_matrix(image.grid) @ image.grid.world_to_index_matrix() @ w
             @ grid.index_to_world_matrix() @ torch.linalg.inv(index_to_normalized_matrix(grid)))
        dt = image.data.dtype if image.data.dtype == torch.float64 else torch.float32
        shape = (1, 1) + tuple(grid.shape)
        norm = F.affine_grid(m[:d].to(dt)[None], list(shape), align_corners=True)  # (1, [D,] H, W, d)
        x = image.data.to(dt)[None, None]
        out = F.grid_sample(x, norm, mode=mode, padding_mode="border", align_corners=True)[0, 0]
        inside = ((norm >= -1 - 1e-6) & (norm <= 1 + 1e-6)).all(-1)[0]
        out = torch.where(inside, out, torch.as_tensor(default, dtype=out.dtype))
    return Image(out, grid)


# ---------------------------------------------------------------- filtering
def gaussian_kernel1d(sigma_vox: float, dtype: torch.dtype = DTYPE) -> Tensor:
    """Normalised Gaussian of ``sigma_vox`` voxels, radius ceil(3 sigma)."""
    radius = max(1, int(np.ceil(3.0 * sigma_vox)))
    x = torch.arange(-radius, radius + 1, dtype=dtype)
    k = torch.exp(-0.5 * (x / sigma_vox) ** 2)
    return k / k.sum()


def convolution_matrix(n: int, kernel: Tensor) -> Tensor:
    """(n, n) matrix of a 1D convolution with an odd ``kernel`` and replicate borders: y = M @ x."""
    r = (kernel.numel() - 1) // 2
    m = torch.zeros(n, n, dtype=kernel.dtype)
    rows = torch.arange(n)
    for j in range(-r, r + 1):
        m.index_put_((rows, (rows + j).clamp(0, n - 1)), kernel[j + r].expand(n), accumulate=True)
    return m


def smooth(data: Tensor, grid: Grid, sigma_mm: float | tuple[float, ...]) -> Tensor:
    """Separable Gaussian smoothing (sigma in mm, replicate borders, kernel radius ceil(3 sigma)).

    ``data`` has shape ``grid.shape`` or ``(C, *grid.shape)`` (each channel smoothed alike). Each
    axis is one product with a banded (n, n) convolution matrix, which is several times faster
    on the CPU than a 3D convolution with a 1D kernel and has exact borders. Computes in float32,
    or in float64 for float64 input (party 2's features: two processes must get the same numbers).
    """
    d = grid.ndim
    sig = (sigma_mm,) * d if isinstance(sigma_mm, (int, float)) else tuple(sigma_mm)
    out = data.to(torch.float64 if data.dtype == torch.float64 else DTYPE)
    mats: list[Tensor | None] = []
    for axis in range(d):  # axis in (x, y, z) order
        s = sig[axis] / grid.spacing[axis]
        n = grid.size[axis]
        mats.append(None if s <= 0.05 or n < 2 else convolution_matrix(n, gaussian_kernel1d(s, out.dtype)))
    return apply_along_axes(out, mats)


def apply_along_axes(data: Tensor, mats: list[Tensor | None]) -> Tensor:
    """y = M_z (M_y (M_x x)) with one (n_out, n_in) matrix per grid axis in (x, y[, z]) order (None:
    leave that axis), on the trailing dims of ``data`` (grid.shape or (C, *grid.shape))."""
    out = data
    for axis, m in enumerate(mats):
        if m is None:
            continue
        dim = out.dim() - 1 - axis  # tensor dims count the grid axes from the end
        out = torch.movedim(torch.tensordot(out, m, dims=([dim], [1])), -1, dim)
    return out.contiguous()


def gradient(data: Tensor, grid: Grid) -> Tensor:
    """World-space gradient (central differences), shape (d, *grid.shape), (x, y[, z]) order."""
    d = grid.ndim
    comps = []
    for axis in range(d):
        tdim = d - 1 - axis
        g = torch.gradient(data, dim=tdim)[0] if data.shape[tdim] > 1 else torch.zeros_like(data)
        comps.append(g / grid.spacing[axis])
    gi = torch.stack(comps)  # d/d(index_axis) scaled by spacing -> derivative along direction columns
    dirm = grid.direction_matrix(gi.dtype)
    return torch.einsum("ij,j...->i...", dirm, gi)


def quantile(values: Tensor, q: float) -> Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) of a 1D tensor by two order statistics
    (``kthvalue``, linear time) instead of a full sort: 5 against 32 ms for a 2 mm brain."""
    n = values.numel()
    h = q * (n - 1)
    k = int(math.floor(h))
    lo = torch.kthvalue(values, k + 1).values
    if k + 1 >= n or h == k:
        return lo
    hi = torch.kthvalue(values, k + 2).values
    return lo + (hi - lo) * (h - k)


def normalize_intensity(data: Tensor, mask: Tensor | None = None, lo_pct: float = 0.0,
                        hi_pct: float = 99.9) -> Tensor:
    """Robustly rescale intensities to about [0, 1] using percentiles (within mask if given)."""
    vals = data[mask] if mask is not None else data.reshape(-1)
    if vals.numel() > 2_000_000:
        vals = vals[torch.randperm(vals.numel(), generator=torch.Generator().manual_seed(0))[:2_000_000]]
    vals = vals.float()
    lo = quantile(vals, lo_pct / 100.0) if lo_pct > 0 else vals.min()
    hi = quantile(vals, hi_pct / 100.0)
    if float(hi - lo) <= 0:
        hi = vals.max()
    return (data - lo) / max(float(hi - lo), 1e-12)
