"""Demo on bundled data: multimodal rigid MI (known 13 x 17 px shift) and a B-spline SSD case
with a known synthetic deformation. Writes the usual outputs per case."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from .evaluate import mean_displacement_error
from .image import Image, read_image, resample, smooth
from .outputs import atomic_outdir, write_outputs
from .register import register
from .transforms import AffineTransform, BSplineTransform


def data_path(name: str) -> Path:
    return Path(str(resources.files("privreg") / "data" / name))


def known_bspline(grid, spacing_mm: float, amplitude_mm: float, seed: int) -> BSplineTransform:
    """A smooth random B-spline deformation with max displacement about ``amplitude_mm``."""
    t = BSplineTransform.for_domain(grid, spacing_mm)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        c = torch.randn(t.coefficients.shape, generator=gen, dtype=torch.float64)
        t.coefficients.copy_(c)
        peak = torch.linalg.norm(t.displacement(grid).double(), dim=1).max()
        t.coefficients.mul_(amplitude_mm / float(peak))
    return t


def known_affine(grid, seed: int = 0, deg: float = 6.0, shift: float = 4.0) -> AffineTransform:
    """A random affine about the grid centre: rotation ``deg`` in the first plane, 4 % shear/scale
    noise and a Gaussian shift of ``shift`` mm per axis."""
    gen = torch.Generator().manual_seed(seed)
    d = grid.ndim
    a = torch.eye(d, dtype=torch.float64) + 0.04 * torch.randn(d, d, generator=gen, dtype=torch.float64)
    ang = torch.deg2rad(torch.tensor(deg, dtype=torch.float64))
    rot = torch.eye(d, dtype=torch.float64)
    rot[0, 0], rot[0, 1], rot[1, 0], rot[1, 1] = torch.cos(ang), -torch.sin(ang), torch.sin(ang), torch.cos(ang)
    return AffineTransform(d, rot @ a, shift * torch.randn(d, generator=gen, dtype=torch.float64), grid.center())


def synthetic_t2(t1: Image, gm: Image, wm: Image) -> Image:
    """T2-like contrast: CSF bright, GM mid, WM dark, by a non-monotonic map of the T1 intensities.

    The tissue maps give each class's mean T1 intensity; the map sends CSF -> 1.0, GM -> 0.6,
    WM -> 0.3 (piecewise linear, background stays 0). Built from the T1 itself, the pair is exactly
    aligned: contrasts painted voxel-wise from the ICBM GM/WM maps are not (MI puts their optimum
    0.3-2 mm away from the T1's), so they cannot serve as ground truth at 0.1 mm.
    """
    g, w, x = gm.data.clamp(0, 1), wm.data.clamp(0, 1), t1.data
    brain = smooth(g + w, gm.grid, 2.0) > 0.5
    csf = brain & (g + w < 0.1)
    if int(csf.sum()) < 10:  # coarse maps: take the least tissue-like tenth of the brain
        csf = brain & (g + w <= torch.quantile((g + w)[brain].float(), 0.1).to(g.dtype))
    m_csf = float(x[csf].median())
    m_gm = float(x[g > min(0.9, 0.8 * float(g.max()))].median())
    m_wm = float(x[w > min(0.9, 0.8 * float(w.max()))].median())
    knots_x = torch.tensor([0.0, m_csf, m_gm, m_wm, float(x.max())], dtype=x.dtype)
    knots_y = torch.tensor([0.0, 1.0, 0.6, 0.3, 0.2], dtype=x.dtype)
    k = torch.bucketize(x.clamp(0, float(x.max())), knots_x[1:-1])
    x0, x1, y0, y1 = knots_x[k], knots_x[k + 1], knots_y[k], knots_y[k + 1]
    data = y0 + (y1 - y0) * (x.clamp(min=0) - x0) / (x1 - x0).clamp(min=1e-6)
    return Image(data * 1000, t1.grid)


def run_demo(outdir: str) -> int:
    out = Path(outdir)
    summary = {}
    # 1. multimodal 2D: T1 (fixed) vs proton density shifted by (13, 17) px, Mattes MI, rigid
    fixed = read_image(data_path("BrainT1SliceBorder20.png"))
    moving = read_image(data_path("BrainProtonDensitySliceShifted13x17y.png"))
    print("[1/2] rigid, Mattes MI: T1 vs PD slice shifted by (13, 17) px")
    with atomic_outdir(out / "mi_rigid_2d") as tmp:
        # half a pixel of blur at full resolution too: this pair differs by whole pixels, where linear
        # interpolation puts a dip in MI at the true shift (Pluim et al. 2000; the unblurred MI
        # peaks 0.1 px off in y), so the default sigma 0 at factor 1 lands 0.04-0.14 px off
        res = register(fixed, moving, "rigid", "mi", sigmas=(2.0, 1.0, 0.5), progress=print)
        write_outputs(tmp, fixed, moving, res, fixed.grid)
    c = fixed.grid.center()[None]
    shift = (res.transform(c) - c)[0].detach()
    err = float(torch.linalg.norm(shift - torch.tensor([13.0, 17.0], dtype=shift.dtype)))
    print(f"      recovered shift ({shift[0]:.3f}, {shift[1]:.3f}) px, error {err:.3f} px, {res.report['wall_seconds']:.1f} s")
    summary["mi_rigid_2d"] = {"shift_px": shift.tolist(), "error_px": err, "seconds": res.report["wall_seconds"]}

    # 2. deformable 2D: T1 slice and the same slice warped by a known smooth B-spline field (max 4 mm)
    moving = read_image(data_path("BrainT1Slice.png"))
    truth = known_bspline(moving.grid, 20.0, 4.0, seed=1)
    fixed = resample(moving, moving.grid, truth)  # fixed(x) = moving(truth(x)): the answer is W = truth
    print("[2/2] cubic B-spline FFD, SSD, Gauss-Newton: known smooth deformation (max 4 mm)")
    with atomic_outdir(out / "ssd_bspline_2d") as tmp:
        res = register(fixed, moving, "bspline", "ssd", grid_spacing=20.0, levels=(2, 1), progress=print)
        write_outputs(tmp, fixed, moving, res, fixed.grid)
    mask = (fixed.data > 0.05 * fixed.data.max()).reshape(-1)
    mde = mean_displacement_error(res.transform, truth, fixed.grid, mask)
    print(f"      mean displacement error in the head {mde:.3f} mm (field max 4 mm), {res.report['wall_seconds']:.1f} s")
    summary["ssd_bspline_2d"] = {"mean_displacement_error_mm": mde, "seconds": res.report["wall_seconds"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"outputs in {out}/ (transform, warped.nii.gz, report.json, qc.png per case)")
    return 0
