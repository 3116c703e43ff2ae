"""ITK transform files: linear -> ``.tfm`` (AffineTransform), non-linear -> composite ``.h5``
(affine + displacement field sampled on the fixed grid), readable by SimpleITK, ITK and ANTs.
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
from .spline import DisplacementFieldTransform, StationaryVelocityTransform

F64 = torch.float64


def linear_to_sitk(t: LinearTransform) -> sitk.AffineTransform:
    a, tr = (x.detach().to(F64) for x in t.matrix_translation())
    out = sitk.AffineTransform(t.ndim)
    out.SetCenter(t.center.tolist())
    out.SetMatrix(a.reshape(-1).tolist())
    out.SetTranslation(tr.tolist())
    return out


def field_to_sitk(disp: torch.Tensor, grid: Grid) -> sitk.DisplacementFieldTransform:
    """Displacement (N, d) on ``grid`` (C order) -> ITK displacement field transform."""
    arr = disp.detach().to(F64).reshape(grid.shape + (grid.ndim,)).numpy()
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=True)
    img.SetSpacing(grid.spacing)
    img.SetOrigin(grid.origin)
    img.SetDirection(grid.direction)
    return sitk.DisplacementFieldTransform(img)


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
    with torch.no_grad():
        if isinstance(inner, (DisplacementFieldTransform,)) and inner.ctrl.same_as(reference):
            disp = inner.coefficients.detach()
        elif isinstance(inner, StationaryVelocityTransform) and inner.field_grid.same_as(reference):
            disp = inner.field_displacement()
        else:
            disp = inner.transform_grid(reference).to(F64) - reference.points(F64)
    comp = sitk.CompositeTransform(transform.ndim)
    comp.AddTransform(linear_to_sitk(affine))
    comp.AddTransform(field_to_sitk(disp, reference))
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


def load_transform(path: str | os.PathLike) -> Transform:
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such transform file: {p}")
    try:
        st = sitk.ReadTransform(str(p))
    except RuntimeError as exc:
        raise InputError(f"cannot read transform {p}: {str(exc).strip().splitlines()[-1]}") from None
    return from_sitk_transform(st)
