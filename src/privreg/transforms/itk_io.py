"""ITK transform files, readable by SimpleITK, ITK and ANTs.

* linear -> ``.tfm`` (AffineTransform);
* cubic B-spline (after an optional linear part) -> composite ``.h5`` holding the affine and an ITK
  ``BSplineTransform`` with the control-point coefficients (exact, a few kB);
* any other non-linear transform -> composite ``.h5`` (affine + float64 displacement field), or, as
  privreg's outputs write it, a displacement-field image ``.nii.gz`` (float32 vectors in world mm,
  gzip-compressed: ANTs' ``Warp.nii.gz`` convention) beside the linear part's ``.tfm``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import InputError
from ..grid import Grid
from .base import Transform
from .composite import CompositeTransform
from .linear import AffineTransform, LinearTransform
from .spline import BSplineTransform, DisplacementFieldTransform, StationaryVelocityTransform

FIELD_SUFFIXES = (".nii", ".nii.gz", ".mha", ".nrrd")  # displacement-field images (ANTs Warp.nii.gz)

F64 = torch.float64


def linear_to_sitk(t: LinearTransform) -> sitk.AffineTransform:
    a, tr = (x.detach().to(F64) for x in t.matrix_translation())
    out = sitk.AffineTransform(t.ndim)
    out.SetCenter(t.center.tolist())
    out.SetMatrix(a.reshape(-1).tolist())
    out.SetTranslation(tr.tolist())
    return out


def _on_grid(arr: np.ndarray, grid: Grid, vector: bool = False) -> sitk.Image:
    """A (z, y, x[, d]) array as a SimpleITK image with ``grid``'s geometry."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=vector)
    img.SetSpacing(grid.spacing)
    img.SetOrigin(grid.origin)
    img.SetDirection(grid.direction)
    return img


def field_to_sitk(disp: torch.Tensor, grid: Grid) -> sitk.DisplacementFieldTransform:
    """Displacement (N, d) on ``grid`` (C order) -> ITK displacement field transform."""
    return sitk.DisplacementFieldTransform(field_image_sitk(disp, grid, np.float64))


def bspline_to_sitk(t: BSplineTransform) -> sitk.BSplineTransform:
    """privreg's control grid is ITK's (m + 3 nodes, the first one spacing before the domain), padded
    with one node of zero coefficients on every side: ITK returns points outside its "valid region"
    unmoved, and on an oblique grid rounding put the domain's own edge points outside it (1.5 mm off);
    the zero nodes add nothing inside the domain and make ITK agree with privreg a cell beyond it."""
    c = t.ctrl
    d = c.ndim
    coef = np.pad(t.coefficients.detach().to(F64).reshape(c.shape + (d,)).numpy(), [(1, 1)] * d + [(0, 0)])
    origin = torch.tensor(c.origin, dtype=F64) - c.direction_matrix() @ torch.tensor(c.spacing, dtype=F64)
    g = Grid(tuple(s + 2 for s in c.size), c.spacing, tuple(origin.tolist()), c.direction)
    return sitk.BSplineTransform([_on_grid(coef[..., k], g) for k in range(d)], 3)


def field_image_sitk(disp: torch.Tensor, grid: Grid, dtype=np.float32) -> sitk.Image:
    """Displacement (N, d) on ``grid`` -> vector image of world-mm displacements (ITK / ANTs)."""
    return _on_grid(disp.detach().to(F64).reshape(grid.shape + (grid.ndim,)).numpy().astype(dtype), grid, vector=True)


def dense_displacement(inner: Transform, reference: Grid) -> torch.Tensor:
    """(N, d) displacement of a non-linear transform on ``reference`` (its own field when it lives there)."""
    with torch.no_grad():
        if isinstance(inner, DisplacementFieldTransform) and inner.ctrl.same_as(reference):
            return inner.coefficients.detach()
        if isinstance(inner, StationaryVelocityTransform) and inner.field_grid.same_as(reference):
            return inner.field_displacement()
        return inner.transform_grid(reference).to(F64) - reference.points(F64)


def save_field(inner: Transform, path: str | os.PathLike, reference: Grid) -> None:
    """Write a non-linear transform as a float32, compressed displacement-field image."""
    sitk.WriteImage(field_image_sitk(dense_displacement(inner, reference), reference), str(path), useCompression=True)


def invert_field(disp: torch.Tensor, grid: Grid, iterations: int = 30) -> torch.Tensor:
    """Inverse of x -> x + u(x) on ``grid`` by fixed-point iteration v(y) = -u(y + v(y)) (as ITK's
    InvertDisplacementFieldImageFilter); (N, d) world mm. Exact where the field does not fold."""
    from ..basis import spline_basis_points

    pts = grid.points(F64)
    u = disp.detach().to(F64)
    v = -u.clone()
    for _ in range(iterations):
        v = -spline_basis_points(grid, pts + v, 1).apply(u)
    return v


def inverse_parts(transform: Transform, reference: Grid) -> tuple[AffineTransform, torch.Tensor | None]:
    """W = A o D (D non-linear, on the fixed grid) -> (A^-1, displacement of D^-1 on ``reference``)."""
    lin, rest = _split(transform)
    affine = compose_linear(lin, transform.ndim)
    inv_a = AffineTransform.from_homogeneous(torch.linalg.inv(affine.homogeneous().detach()), affine.center)
    if not rest:
        return inv_a, None
    inner = rest[0] if len(rest) == 1 else CompositeTransform(rest)
    return inv_a, invert_field(dense_displacement(inner, reference), reference)


def _split(transform: Transform) -> tuple[list[LinearTransform], list[Transform]]:
    """Leading linear transforms (applied last) and the rest."""
    parts = list(transform.transforms) if isinstance(transform, CompositeTransform) else [transform]
    lin: list[LinearTransform] = []
    while parts and isinstance(parts[0], LinearTransform):
        lin.append(parts.pop(0))
    return lin, parts


def compose_linear(transforms: list[LinearTransform], ndim: int) -> AffineTransform:
    m = torch.eye(ndim + 1, dtype=F64)
    for t in transforms:
        m = m @ t.homogeneous().detach()
    center = transforms[-1].center if transforms else None
    return AffineTransform.from_homogeneous(m, center)


def to_sitk_transform(transform: Transform, reference: Grid | None = None) -> sitk.Transform:
    lin, rest = _split(transform)
    affine = compose_linear(lin, transform.ndim)
    if not rest:
        return linear_to_sitk(affine)
    if reference is None:
        raise ValueError("exporting a non-linear transform needs the reference (fixed) grid")
    inner = rest[0] if len(rest) == 1 else CompositeTransform(rest)
    comp = sitk.CompositeTransform(transform.ndim)
    comp.AddTransform(linear_to_sitk(affine))
    if isinstance(inner, BSplineTransform):
        comp.AddTransform(bspline_to_sitk(inner))
    else:
        comp.AddTransform(field_to_sitk(dense_displacement(inner, reference), reference))
    return comp


def save_transform(transform: Transform, path: str | os.PathLike, reference: Grid | None = None) -> None:
    """Write ``transform`` to an ITK file (``.tfm``/``.txt`` for linear, ``.h5`` for any)."""
    p = Path(path)
    st = to_sitk_transform(transform, reference)
    if isinstance(st, sitk.CompositeTransform) and p.suffix.lower() not in (".h5", ".hdf5"):
        raise ValueError("non-linear transforms must be saved as .h5")
    sitk.WriteTransform(st, str(p))


def from_sitk_transform(st: sitk.Transform) -> Transform:
    name = st.GetName()
    if name == "CompositeTransform":
        comp = sitk.CompositeTransform(st)
        parts = [from_sitk_transform(comp.GetNthTransform(i)) for i in range(comp.GetNumberOfTransforms())]
        return parts[0] if len(parts) == 1 else CompositeTransform(parts)
    if name == "BSplineTransform":
        bst = sitk.BSplineTransform(st)
        if bst.GetOrder() != 3:
            raise InputError(f"only cubic B-spline transforms are supported, got order {bst.GetOrder()}")
        imgs = bst.GetCoefficientImages()
        g = Grid(imgs[0].GetSize(), imgs[0].GetSpacing(), imgs[0].GetOrigin(), imgs[0].GetDirection())
        coef = np.stack([sitk.GetArrayFromImage(im).reshape(-1) for im in imgs], axis=1)
        return BSplineTransform(g, torch.from_numpy(coef.astype(np.float64)))
    if name == "DisplacementFieldTransform":
        dft = sitk.DisplacementFieldTransform(st)
        img = dft.GetDisplacementField()
        grid = Grid(img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection())
        arr = torch.from_numpy(sitk.GetArrayFromImage(img).astype(np.float64)).reshape(-1, grid.ndim)
        return DisplacementFieldTransform(grid, arr)
    dim = st.GetDimension()
    try:  # every MatrixOffsetTransformBase (Euler, Versor, Similarity, Affine, Translation...)
        aff = sitk.AffineTransform(dim)
        aff.SetMatrix(st.GetMatrix())
        aff.SetTranslation(st.GetTranslation())
        aff.SetCenter(st.GetCenter())
    except (AttributeError, RuntimeError):
        if name == "TranslationTransform":
            off = sitk.TranslationTransform(st).GetOffset()
            return AffineTransform(dim, None, torch.tensor(off, dtype=F64))
        raise InputError(f"unsupported ITK transform type {name}") from None
    return AffineTransform(dim, torch.tensor(aff.GetMatrix(), dtype=F64).reshape(dim, dim),
                           torch.tensor(aff.GetTranslation(), dtype=F64), torch.tensor(aff.GetCenter(), dtype=F64))


def load_field(path: Path) -> DisplacementFieldTransform:
    """A displacement-field image (ITK / ANTs ``Warp.nii.gz``: d-vector voxels, world mm)."""
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"cannot read displacement field {path}: {str(exc).strip().splitlines()[-1]}") from None
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = sitk.Extract(img, list(img.GetSize()[:3]) + [0], [0, 0, 0, 0])
    d = img.GetDimension()
    if d not in (2, 3) or img.GetNumberOfComponentsPerPixel() != d:
        raise InputError(f"{path} is not a displacement field: a {d}D image needs {d} components per voxel, "
                         f"has {img.GetNumberOfComponentsPerPixel()}")
    grid = Grid(img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection())
    arr = torch.from_numpy(sitk.GetArrayFromImage(img).astype(np.float64)).reshape(-1, d)
    if not torch.isfinite(arr).all():
        raise InputError(f"displacement field {path} contains NaN or infinite values")
    return DisplacementFieldTransform(grid, arr)


def load_transforms(paths: list[str | os.PathLike]) -> Transform:
    """Several transform files in ITK / ANTs order (the last listed is applied to points first), as one."""
    parts = [load_transform(p) for p in paths]
    if len({t.ndim for t in parts}) > 1:
        raise InputError("the transforms have different dimensions")
    return parts[0] if len(parts) == 1 else CompositeTransform(parts)


def load_transform(path: str | os.PathLike) -> Transform:
    """Read an ITK transform file (.tfm/.txt/.mat/.h5) or a displacement-field image (.nii.gz, ...)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such transform file: {p}")
    if p.name.lower().endswith(FIELD_SUFFIXES):
        return load_field(p)
    try:
        st = sitk.ReadTransform(str(p))
    except RuntimeError as exc:
        raise InputError(f"cannot read transform {p}: {str(exc).strip().splitlines()[-1]}") from None
    return from_sitk_transform(st)
