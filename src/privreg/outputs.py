"""Atomic outputs: results appear all at once or not at all, and bad targets are refused up front."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import InputError


def _check_parent(target: Path) -> None:
    """The existing ancestor of ``target`` must be a writable directory (a missing parent is created later)."""
    probe = target.absolute().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"cannot write {target}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {target}: no permission to write in {probe}")


def check_outdir(outdir: str | os.PathLike) -> None:
    """Refuse an output directory that names an existing file or lies under a file or an unwritable folder."""
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output directory {out} exists and is a file")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"cannot write in output directory {out}: permission denied")
    _check_parent(out)


def check_file_target(path: str | os.PathLike) -> None:
    """Refuse an output file path that names a directory or lies under a file or an unwritable folder."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"output {p} is a directory; give a file name")
    _check_parent(p)


def _mkdir(parent: Path) -> None:
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {parent}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def atomic_outdir(outdir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success its files are moved into ``outdir``.

    On any exception (SIGINT/SIGTERM included) the temporary directory is removed and ``outdir`` is
    left untouched.
    """
    out = Path(outdir)
    check_outdir(out)
    parent = out.absolute().parent
    _mkdir(parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the result is an ordinary folder
    try:
        yield tmp
        if not out.exists():
            os.replace(tmp, out)
            return
        for item in tmp.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffixes); on success it replaces ``path``."""
    target = Path(path)
    check_file_target(target)
    parent = target.absolute().parent
    _mkdir(parent)
    suffix = "".join(target.suffixes)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", suffix=suffix, dir=parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_outputs(out: Path, fixed, moving, result, reference_grid, inverse: bool = False,
                  jacobian: bool = False) -> None:
    """A registration's files in ``out``: the transform, ``warped.nii.gz``, ``report.json``, ``qc.png``.

    Transform files (ITK / ANTs, listed in ``report["transform_files"]`` in ANTs' ``-t`` order, the last
    applied to points first): ``transform.tfm`` for a linear result; ``transform.h5`` (affine + the
    B-spline's coefficients) for a B-spline; ``transform.tfm`` + ``warp.nii.gz`` (float32, compressed
    displacement field on the fixed grid) for a dense field. ``inverse``: the inverse transform too
    (``inverse.tfm`` [+ ``inverse_warp.nii.gz``]); ``jacobian``: ``jacobian.nii.gz``, det(dW/dx) on
    the fixed grid. ``fixed`` is None for party 1 of a private run (its QC shows the moving image only).
    """
    import json

    from .evaluate import jacobian_map
    from .image import Image, resample, write_image
    from .qc import save_qc
    from .transforms import BSplineTransform, CompositeTransform, save_transform
    import SimpleITK as sitk

    from .transforms.itk_io import _split, compose_linear, field_image_sitk, inverse_parts, save_field

    t = result.transform
    lin, rest = _split(t)
    if not rest:
        files = ["transform.tfm"]
        save_transform(t, out / "transform.tfm")
    elif len(rest) == 1 and isinstance(rest[0], BSplineTransform):
        files = ["transform.h5"]
        save_transform(t, out / "transform.h5", reference_grid)
    else:
        files = ["transform.tfm", "warp.nii.gz"]
        save_transform(compose_linear(lin, t.ndim), out / "transform.tfm")
        save_field(rest[0] if len(rest) == 1 else CompositeTransform(rest), out / "warp.nii.gz", reference_grid)
    report = dict(result.report)
    if inverse:
        inv_a, inv_u = inverse_parts(t, reference_grid)
        save_transform(inv_a, out / "inverse.tfm")
        report["inverse_files"] = ["inverse.tfm"]
        if inv_u is not None:
            sitk.WriteImage(field_image_sitk(inv_u, reference_grid), str(out / "inverse_warp.nii.gz"),
                            useCompression=True)
            report["inverse_files"] = ["inverse_warp.nii.gz", "inverse.tfm"]
    if jacobian:
        write_image(Image(jacobian_map(t, reference_grid).float(), reference_grid), out / "jacobian.nii.gz")
    write_image(result.warped, out / "warped.nii.gz")
    before = resample(moving, reference_grid)
    save_qc(fixed, before, result.warped, out / "qc.png")
    report["transform_file"] = files[0]
    report["transform_files"] = files
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
