"""Clear-registration benchmark: privreg vs SimpleITK, ITKElastix, ANTsPy (and DIPY) in one run.

Cases with known ground truth, made from ../shared/data (ICBM 2009a at 2 mm, 99x117x95):
  affine3d_mono   ICBM T1 warped by a known affine (6 deg, 4 % shear, ~4 mm shift)
  affine3d_multi  the same T1 (fixed) vs a synthetic T2-like contrast (moving, from the GM/WM maps)
  bspline3d       ICBM T1 warped by a known cubic B-spline field (max 5 mm)
  affine2d        121x121 T1 slice warped by a known affine
and the real inter-subject benchmark Colin27 -> MNI152 (mean AAL Dice over 116 labels).

Error = mean |T(x) - T_true(x)| over the fixed brain (mm). Each peer runs with its defaults,
2 threads. Prints one table per case with ratios (peer / privreg) and writes JSON.

Usage:  python benchmarks/bench_clear.py [--cases affine3d_mono,...] [--peers sitk,elastix,ants,dipy]
                                         [--json out/bench_clear.json] [--seeds N]
--seeds N runs privreg with sampling seeds 0..N-1 and reports their mean (and range).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from privreg.demo import known_affine, known_bspline, synthetic_t2  # noqa: E402
from privreg.evaluate import dice, jacobian_stats  # noqa: E402
from privreg.grid import Grid  # noqa: E402
from privreg.image import Image, read_image, resample, smooth, to_sitk, write_image  # noqa: E402
from privreg.register import register  # noqa: E402
from privreg.sampling import Sampling  # noqa: E402
from privreg.transforms import Transform  # noqa: E402

torch.set_num_threads(2)
sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
F64 = torch.float64
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# ----------------------------------------------------------------------------- cases
def at_2mm(img: Image) -> Image:
    grid = img.grid.downsample(2.0)
    return resample(Image(smooth(img.data, img.grid, 0.85), img.grid), grid)


def make_cases(names: list[str]) -> dict[str, dict]:
    """Fixed images are warped at 1 mm (2D: at the slice's full resolution) and then smoothed and
    downsampled, so they are not the linear interpolation of the moving image that the
    registration itself computes (no "inverse crime")."""
    cases = {}
    if any(n.startswith(("affine3d", "bspline3d")) for n in names):
        t1_1mm = read_image(DATA / "brain3d/icbm2009_t1.nii.gz")
        t1 = at_2mm(t1_1mm)
        gm = at_2mm(read_image(DATA / "brain3d/icbm2009_gm.nii.gz"))
        wm = at_2mm(read_image(DATA / "brain3d/icbm2009_wm.nii.gz"))
        brain = Image(((gm.data + wm.data) > 0.5).float(), t1.grid)
        aff = known_affine(t1.grid)
        for name, moving in (("affine3d_mono", t1), ("affine3d_multi", synthetic_t2(t1, gm, wm))):
            if name in names:
                cases[name] = dict(fixed=at_2mm(resample(t1_1mm, t1_1mm.grid, aff)), moving=moving, truth=aff,
                                   mask=resample(brain, t1.grid, aff, mode="nearest").data.reshape(-1) > 0, kind="affine",
                                   multimodal=name.endswith("multi"))
        if "bspline3d" in names:
            field = known_bspline(t1.grid, 20.0, 5.0, seed=3)
            cases["bspline3d"] = dict(fixed=at_2mm(resample(t1_1mm, t1_1mm.grid, field)), moving=t1, truth=field,
                                      mask=resample(brain, t1.grid, field, mode="nearest").data.reshape(-1) > 0,
                                      kind="deformable", multimodal=False)
    if "affine2d" in names:
        sl = read_image(Path(__file__).resolve().parents[1] / "src/privreg/data/BrainT1Slice.png")
        g = sl.grid
        sp = tuple(s * (n - 1) / 120 for s, n in zip(g.spacing, g.size))
        grid = Grid((121, 121), sp, g.origin, g.direction)
        smooth_full = Image(smooth(sl.data, g, 0.5 * sp[0]), g)
        img = resample(smooth_full, grid)
        aff = known_affine(grid, seed=2, deg=5.0, shift=3.0)
        fixed = resample(smooth_full, grid, aff)  # sampled from the full-resolution slice
        cases["affine2d"] = dict(fixed=fixed, moving=img, truth=aff,
                                 mask=fixed.data.reshape(-1) > 0.05 * float(fixed.data.max()), kind="affine", multimodal=False)
    return cases


# ------------------------------------------------------------------------- utilities
def error_from_points(mapped: np.ndarray, case: dict) -> float:
    """Mean |T(x) - T_true(x)| over the mask; ``mapped`` (N, d) = T(x) for all fixed voxels (C order)."""
    grid = case["fixed"].grid
    pts = grid.points(F64)
    m = case["mask"]
    true = case["truth"](pts[m]).detach()
    return float(torch.linalg.norm(torch.as_tensor(mapped, dtype=F64)[m] - true, dim=1).mean())


def mapped_from_displacement(field: sitk.Image, grid: Grid) -> np.ndarray:
    """A displacement field on the fixed grid (sitk vector image) -> T(x) = x + u(x), (N, d)."""
    u = sitk.GetArrayFromImage(field).reshape(-1, grid.ndim)
    return grid.points(F64).numpy() + u


def coordinate_images(moving: Image, tmp: Path) -> list[Path]:
    """One image per axis whose value is the physical coordinate (moving grid, padded 20 voxels)."""
    g = moving.grid
    pad = 20
    origin = g.index_to_world(torch.full((g.ndim,), -float(pad), dtype=F64))
    big = Grid(tuple(n + 2 * pad for n in g.size), g.spacing, tuple(float(v) for v in origin), g.direction)
    pts = big.points(F64)
    paths = []
    for k in range(g.ndim):
        p = tmp / f"coord{k}.nii.gz"
        write_image(Image(pts[:, k].reshape(big.shape).float(), big), p)
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------- peers
def run_privreg(case: dict, tmp: Path, seed: int = 0) -> dict:
    f, m = case["fixed"], case["moving"]
    t0 = time.perf_counter()
    if case["kind"] == "affine":
        if case["multimodal"]:  # a fixed random subset (5 %, >= 4096 points) per level, 48 bins; on the
            # finest level, flat moving background is drawn at a tenth of the rate and weighted back
            res = register(f, m, "affine", "mi", levels=(4, 2, 1), max_iter=(100, 30, 30), tol_mm=0.01, bins=48,
                           sampling=Sampling("urs", 0.05, seed=seed, redraw=False, min_points=4096, flat_rate=0.1))
        elif f.ndim == 3:  # a fixed 20 % random subset per level (elastix samples 2048 points by default),
            # stratified on the finest level as for MI
            res = register(f, m, "affine", "ssd", levels=(4, 2, 1), max_iter=(50, 30, 15),
                           sampling=Sampling("urs", 0.2, seed=seed, redraw=False, flat_rate=0.1))
        else:
            res = register(f, m, "affine", "ssd", levels=(2, 1), max_iter=50)
    else:
        res = register(f, m, "bspline", "ssd", grid_spacing=20.0, levels=(2, 1), max_iter=(30, 3),
                       sampling=Sampling("urs", 0.25, seed=seed, redraw=False))  # a fixed 25 % subset per level
    dt = time.perf_counter() - t0
    mapped = res.transform(f.grid.points(F64)).detach().numpy()
    out = {"seconds": dt, "error_mm": error_from_points(mapped, case), "iterations": res.report["iterations"]}
    if case["kind"] != "affine":
        out["jacobian"] = jacobian_stats(res.transform, f.grid, case["mask"])
    return out


def privreg_seeds(case: dict, tmp: Path, seeds: int) -> dict:
    """privreg on ``seeds`` sampling seeds (its random subsets); error and time are their means."""
    runs = [run_privreg(case, tmp, seed) for seed in range(max(1, seeds))]
    if len(runs) == 1:
        return runs[0]
    out = {k: float(np.mean([r[k] for r in runs])) for k in ("seconds", "error_mm")}
    return {**runs[0], **out, "seeds": runs}


def run_sitk(case: dict, tmp: Path) -> dict:
    f, m = to_sitk(case["fixed"], np.float32), to_sitk(case["moving"], np.float32)
    reg = sitk.ImageRegistrationMethod()
    if case["multimodal"]:
        reg.SetMetricAsMattesMutualInformation(32)
    else:
        reg.SetMetricAsMeanSquares()
    reg.SetInterpolator(sitk.sitkLinear)
    t0 = time.perf_counter()
    if case["kind"] == "affine":
        init = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(f.GetDimension()),
                                                 sitk.CenteredTransformInitializerFilter.GEOMETRY)
        reg.SetInitialTransform(init, inPlace=False)
        reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 200)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([4, 2, 1] if f.GetDimension() == 3 else [2, 1])
        reg.SetSmoothingSigmasPerLevel([2, 1, 0] if f.GetDimension() == 3 else [1, 0])
    else:
        mesh = [max(1, int(sz * sp / 20.0)) for sz, sp in zip(f.GetSize(), f.GetSpacing())]
        init = sitk.BSplineTransformInitializer(f, mesh, order=3)
        reg.SetInitialTransform(init, inPlace=False)
        reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=100)
        # every voxel took > 20 min here; a 10 % random subset, as elastix samples by default
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.1, seed=1)
        reg.SetShrinkFactorsPerLevel([2, 1])
        reg.SetSmoothingSigmasPerLevel([1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    tx = reg.Execute(f, m)
    dt = time.perf_counter() - t0
    disp = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, f.GetSize(), f.GetOrigin(), f.GetSpacing(),
                                             f.GetDirection())
    return {"seconds": dt, "error_mm": error_from_points(mapped_from_displacement(disp, case["fixed"].grid), case)}


def run_elastix(case: dict, tmp: Path) -> dict:
    import itk

    write_image(case["fixed"], tmp / "f.nii.gz")
    write_image(case["moving"], tmp / "m.nii.gz")
    f = itk.imread(str(tmp / "f.nii.gz"), itk.F)
    m = itk.imread(str(tmp / "m.nii.gz"), itk.F)
    po = itk.ParameterObject.New()
    po.AddParameterMap(po.GetDefaultParameterMap("affine" if case["kind"] == "affine" else "bspline"))
    t0 = time.perf_counter()
    _, params = itk.elastix_registration_method(f, m, parameter_object=po, log_to_console=False, number_of_threads=2)
    dt = time.perf_counter() - t0
    cwd = os.getcwd()
    os.chdir(tmp)  # transformix writes deformationField.nii into the working directory
    try:
        field = itk.transformix_deformation_field(m, params)
    finally:
        os.chdir(cwd)
    u = itk.array_from_image(field).reshape(-1, case["fixed"].ndim)
    mapped = case["fixed"].grid.points(F64).numpy() + u
    return {"seconds": dt, "error_mm": error_from_points(mapped, case)}


def run_ants(case: dict, tmp: Path) -> dict:
    import ants

    write_image(case["fixed"], tmp / "f.nii.gz")
    write_image(case["moving"], tmp / "m.nii.gz")
    f, m = ants.image_read(str(tmp / "f.nii.gz")), ants.image_read(str(tmp / "m.nii.gz"))
    t0 = time.perf_counter()
    out = ants.registration(f, m, type_of_transform="Affine" if case["kind"] == "affine" else "SyN")
    dt = time.perf_counter() - t0
    mapped = []
    for p in coordinate_images(case["moving"], tmp):
        w = ants.apply_transforms(f, ants.image_read(str(p)), transformlist=out["fwdtransforms"], interpolator="linear")
        mapped.append(sitk.GetArrayFromImage(sitk.ReadImage(_ants_write(w, tmp))).reshape(-1))
    return {"seconds": dt, "error_mm": error_from_points(np.stack(mapped, 1), case)}


def _ants_write(img, tmp: Path) -> str:
    p = str(tmp / "ants_out.nii.gz")
    img.to_file(p)
    return p


def run_dipy(case: dict, tmp: Path) -> dict:
    import nibabel as nib
    from dipy.align.imaffine import AffineRegistration, MutualInformationMetric, transform_centers_of_mass
    from dipy.align.transforms import AffineTransform3D, RigidTransform3D, TranslationTransform3D

    write_image(case["fixed"], tmp / "f.nii.gz")
    write_image(case["moving"], tmp / "m.nii.gz")
    fi, mi = nib.load(str(tmp / "f.nii.gz")), nib.load(str(tmp / "m.nii.gz"))
    st, mv = fi.get_fdata(), mi.get_fdata()
    t0 = time.perf_counter()
    reg = AffineRegistration(metric=MutualInformationMetric(32, None), level_iters=[10000, 1000, 100],
                             sigmas=[3.0, 1.0, 0.0], factors=[4, 2, 1], verbosity=0)
    c = transform_centers_of_mass(st, fi.affine, mv, mi.affine)
    x = c.affine
    for tr in (TranslationTransform3D(), RigidTransform3D(), AffineTransform3D()):
        x = reg.optimize(st, mv, tr, None, fi.affine, mi.affine, starting_affine=x).affine
    dt = time.perf_counter() - t0
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS
    a = flip @ x @ flip
    pts = case["fixed"].grid.points(F64).numpy()
    mapped = pts @ a[:3, :3].T + a[:3, 3]
    return {"seconds": dt, "error_mm": error_from_points(mapped, case)}


def _child(fn, case: dict, tmp: Path, send) -> None:
    try:
        send.send(fn(case, tmp))
    except Exception as exc:
        send.send({"failed": f"{type(exc).__name__}: {exc}"})


def isolated(fn, case: dict, tmp: Path) -> dict:
    """Run a peer in a fresh child process, so a crash in its native code (ITKElastix segfaults on
    the 3D B-spline case) is reported as a failure instead of ending the benchmark. Spawned, not
    forked: torch's OpenMP pool does not survive a fork (the forked ANTs child hung)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, case, tmp, send))
    proc.start()
    send.close()
    try:
        out = recv.recv()
    except EOFError:
        out = None
    proc.join()
    if out is None:
        raise RuntimeError(f"crashed (exit code {proc.exitcode})")
    return out


PEERS = {"sitk": run_sitk, "elastix": run_elastix, "ants": run_ants, "dipy": run_dipy}
# DIPY's registration is affine only; we run it on the 3D affine cases, as in the figures
RUNS_ON = {"dipy": lambda case: case["kind"] == "affine" and case["fixed"].ndim == 3}


# ------------------------------------------------------------------ Colin27 -> MNI152
def colin_to_mni() -> dict:
    """Colin27 (brain only) -> MNI152 T1 masked by its brain mask, registered at 2 mm: affine MI
    (Gauss-Newton, 10 % URS), then a cubic B-spline (12 mm) with MI and bending energy (relative
    weight 3: real inter-subject anatomy needs far more than the synthetic-field default)."""
    fixed1 = read_image(DATA / "brain3d/mni152_t1.nii.gz")
    brain = resample(read_image(DATA / "brain3d/mni152_brainmask.nii.gz"), fixed1.grid, mode="nearest")
    moving1 = read_image(DATA / "brain3d/colin27_t1.nii.gz")
    fl, ml = read_image(DATA / "brain3d/mni152_aal.nii.gz"), read_image(DATA / "brain3d/colin27_aal.nii.gz")
    fixed, moving = at_2mm(Image(fixed1.data * (brain.data > 0), fixed1.grid)), at_2mm(moving1)
    labels = list(range(1, 117))
    results = {}

    def score(tx: Transform | None) -> float:
        warped = resample(ml, fl.grid, tx, mode="nearest")
        d = dice(fl.data.round().long(), warped.data.round().long(), labels)
        return float(np.mean(list(d.values())))

    results["none"] = {"dice": score(None)}
    t0 = time.perf_counter()
    aff = register(fixed, moving, "affine", "mi", levels=(4, 2, 1), max_iter=(30, 60, 100), tol_mm=1e-3,
                   sampling=Sampling("urs", 0.1, seed=0, redraw=False))
    t_affine = time.perf_counter() - t0
    results["privreg_affine"] = {"dice": score(aff.transform), "seconds": t_affine}
    mask = (fixed.data > 0).reshape(-1)
    # greedy diffeomorphic dense field with LNCC (5^3 window) after the same affine; its time
    # includes the affine's, as ANTs SyN's includes its own affine stage
    t0 = time.perf_counter()
    dense = register(fixed, moving, "displacement", "lncc", levels=(4, 2, 1), max_iter=(60, 40, 5), lncc_radius=2,
                     initial=aff.transform)
    t_dense = time.perf_counter() - t0
    results["privreg_greedy"] = {"dice": score(dense.transform), "seconds": t_affine + t_dense,
                                 "jacobian": jacobian_stats(dense.transform, fixed.grid, mask),
                                 "levels": [(r["iterations"], r["seconds"]) for r in dense.report["levels"]]}
    t0 = time.perf_counter()
    defo = register(fixed, moving, "bspline", "mi", grid_spacing=12.0, levels=(2, 1), max_iter=(30, 20), reg_weight=3.0,
                    initial=aff.transform, sampling=Sampling("urs", 0.2, seed=0, redraw=False))
    results["privreg_bspline"] = {"dice": score(defo.transform), "seconds": time.perf_counter() - t0,
                                  "jacobian": jacobian_stats(defo.transform, fixed.grid, mask)}
    results.update(_colin_ants(fixed, moving, labels, mask))
    return results


def _colin_ants(fixed: Image, moving: Image, labels: list[int], mask: torch.Tensor) -> dict:
    """ANTs Affine and SyN (defaults) on the same 2 mm pair, labels warped the same way; for SyN
    the Jacobian determinant of its warp field over the fixed brain (its affine has det > 0, so
    the sign, hence folding, is that of the whole map)."""
    import ants

    out = {}
    with tempfile.TemporaryDirectory() as td:
        write_image(fixed, f"{td}/f.nii.gz")
        write_image(moving, f"{td}/m.nii.gz")
        f, m = ants.image_read(f"{td}/f.nii.gz"), ants.image_read(f"{td}/m.nii.gz")
        fl = ants.image_read(str(DATA / "brain3d/mni152_aal.nii.gz"))
        ml = ants.image_read(str(DATA / "brain3d/colin27_aal.nii.gz"))
        for kind in ("Affine", "SyN"):
            t0 = time.perf_counter()
            reg = ants.registration(f, m, type_of_transform=kind)
            dt = time.perf_counter() - t0
            w = ants.apply_transforms(fl, ml, transformlist=reg["fwdtransforms"], interpolator="nearestNeighbor")
            d = dice(torch.from_numpy(fl.numpy()).round().long(), torch.from_numpy(w.numpy()).round().long(), labels)
            out[f"ants_{kind.lower()}"] = {"dice": float(np.mean(list(d.values()))), "seconds": dt}
            if kind == "SyN":
                det = ants.create_jacobian_determinant_image(f, reg["fwdtransforms"][0]).numpy()
                det = torch.from_numpy(np.ascontiguousarray(det.T)).reshape(-1)[mask].double()  # ANTs arrays are (x, y, z)
                out["ants_syn"]["jacobian"] = {"min": float(det.min()), "max": float(det.max()),
                                               "folding_percent": 100.0 * float((det <= 0).double().mean())}
    return out


# ------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="affine2d,affine3d_mono,affine3d_multi,bspline3d,colin_mni")
    ap.add_argument("--peers", default="sitk,elastix,ants,dipy")
    ap.add_argument("--json", default="out/bench_clear.json")
    ap.add_argument("--seeds", type=int, default=1,
                    help="privreg runs per case with sampling seeds 0..N-1; its row is their mean")
    args = ap.parse_args()
    names = args.cases.split(",")
    peers = [p for p in args.peers.split(",") if p]
    results: dict = {}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for name, case in make_cases(names).items():
            print(f"\n== {name}: fixed {tuple(case['fixed'].grid.size)} @ {case['fixed'].grid.spacing[0]:.2f} mm")
            print(f"{'method':10s} {'error mm':>9s} {'time s':>8s} {'err/privreg':>12s} {'time/privreg':>13s}", flush=True)
            row: dict = {}
            for p in ["privreg"] + peers:
                if p != "privreg" and not RUNS_ON.get(p, lambda c: True)(case):
                    continue
                try:
                    row[p] = privreg_seeds(case, tmp, args.seeds) if p == "privreg" else isolated(PEERS[p], case, tmp)
                except Exception as exc:  # a peer failing must not hide the others' numbers
                    if p == "privreg":
                        raise
                    row[p] = {"failed": f"{type(exc).__name__}: {exc}"}
                v, ref = row[p], row["privreg"]
                if "failed" in v:
                    print(f"{p:10s} failed: {v['failed']}", flush=True)
                    continue
                spread = ""
                if "seeds" in v and len(v["seeds"]) > 1:
                    errs = [r["error_mm"] for r in v["seeds"]]
                    secs = [r["seconds"] for r in v["seeds"]]
                    spread = (f"   {len(errs)} sampling seeds: error {min(errs):.4f}-{max(errs):.4f}, "
                              f"time {min(secs):.2f}-{max(secs):.2f}")
                print(f"{p:10s} {v['error_mm']:9.4f} {v['seconds']:8.2f} {v['error_mm'] / ref['error_mm']:12.2f} "
                      f"{v['seconds'] / ref['seconds']:13.2f}{spread}", flush=True)
            results[name] = row
        if "colin_mni" in names:
            print("\n== Colin27 -> MNI152 (2 mm registration, Dice on the 1 mm MNI grid, 116 AAL labels)")
            res = colin_to_mni()
            for k, v in res.items():
                extra = f"  {v['seconds']:.1f} s" if "seconds" in v else ""
                jac = f"  non-positive Jacobian {v['jacobian']['folding_percent']:.3f} %" if "jacobian" in v else ""
                print(f"{k:18s} mean Dice {v['dice']:.4f}{extra}{jac}")
            results["colin_mni"] = res
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
