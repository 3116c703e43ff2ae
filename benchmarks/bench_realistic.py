"""Clinical sizes: privreg with the CLI's defaults against SimpleITK, ITKElastix and ANTsPy, same run.

Cases (files made once under OUT/data from ../shared/data):
  brain_affine      Colin27 -> MNI152 at 1 mm (182x218x182), affine, mean AAL Dice over 116 labels
  brain_deformable  the same pair, deformable (privreg greedy LNCC after its affine; ANTs SyN;
                    elastix B-spline after its affine); AAL Dice, folding
  brain_05mm        the same pair resampled to 0.5 mm (~58M voxels), affine, AAL Dice
  thick_slices      ICBM 2009 T1 as a 512x512x48 volume (0.43 x 0.43 x 4 mm), against its copy under
                    a known affine (8 deg, 6 % scale/shear, 10 mm); mean error over the head in mm
  radiograph        the 1955x1841 chest radiograph against its copy under a known smooth
                    deformation (max 8 px) and a 3 deg, 12 px rigid motion; mean error over the body in px

Every tool runs as its own process on the case's files, with 2 threads, and writes what the
scorer reads (a transform or a displacement field); "seconds" is that whole command (reading,
registering, writing), "peak MB" its peak resident memory. privreg runs exactly as a user types it:
``privreg register FIXED MOVING -o OUT --transform T --metric M`` (deformable rows: after its own
affine, as ``--initial-transform``). Prints one table per case and writes OUT/results.json.

Usage: python benchmarks/bench_realistic.py [--cases brain_affine,...] [--peers sitk,elastix,ants] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PY = sys.executable
PRIVREG = [PY, "-m", "privreg.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "2", "MKL_NUM_THREADS": "2"}
CASES = ("brain_affine", "brain_deformable", "brain_05mm", "thick_slices", "radiograph")


# ------------------------------------------------------------------------------ data
def _write(img: sitk.Image, path: Path) -> str:
    sitk.WriteImage(img, str(path), useCompression=True)
    return str(path)


def _resample_to(img: sitk.Image, size, spacing, origin, direction, interp=sitk.sitkLinear) -> sitk.Image:
    return sitk.Resample(img, size, sitk.Transform(), interp, origin, spacing, direction, 0.0, img.GetPixelID())


def _save_case(d: Path, prefix: str, fixed: sitk.Image, moving: sitk.Image, truth: sitk.Transform, suffix: str) -> None:
    _write(moving, d / f"{prefix}_moving.nii.gz")
    _write(fixed, d / f"{prefix}_fixed.nii.gz")
    sitk.WriteTransform(truth, str(d / f"{prefix}_truth{suffix}"))


def _case_files(d: Path, prefix: str, suffix: str) -> dict:
    return {f"{prefix}_{k}": str(d / f"{prefix}_{k}{'.nii.gz' if k != 'truth' else suffix}")
            for k in ("fixed", "moving", "truth")}


def prepare(d: Path) -> dict:
    """Case files (fixed, moving, labels, truth transforms) under ``d``; made once."""
    d.mkdir(parents=True, exist_ok=True)
    b = DATA / "brain3d"
    files = {"mni": str(b / "mni152_t1.nii.gz"), "colin": str(b / "colin27_t1.nii.gz"),
             "mni_aal": str(b / "mni152_aal.nii.gz"), "colin_aal": str(b / "colin27_aal.nii.gz")}
    if not (d / "mni_05.nii.gz").exists():
        for key in ("mni", "colin", "mni_aal", "colin_aal"):
            img = sitk.ReadImage(files[key], sitk.sitkFloat32)
            size = [2 * s for s in img.GetSize()]
            origin = img.TransformContinuousIndexToPhysicalPoint([-0.25] * 3)
            interp = sitk.sitkNearestNeighbor if "aal" in key else sitk.sitkBSpline
            out = _resample_to(img, size, [0.5] * 3, origin, img.GetDirection(), interp)
            if "aal" in key:
                out = sitk.Cast(out, sitk.sitkInt16)
            _write(out, d / f"{key}_05.nii.gz")
    for key in ("mni", "colin", "mni_aal", "colin_aal"):
        files[f"{key}_05"] = str(d / f"{key}_05.nii.gz")
    if not (d / "thick_moving.nii.gz").exists():
        t1 = sitk.ReadImage(str(b / "icbm2009_t1.nii.gz"), sitk.sitkFloat32)
        ext = [sz * sp for sz, sp in zip(t1.GetSize(), t1.GetSpacing())]
        size = [512, 512, 48]
        spacing = [ext[0] / 512, ext[1] / 512, ext[2] / 48]
        origin = t1.GetOrigin()
        thick = sitk.SmoothingRecursiveGaussian(t1, [0.2, 0.2, 1.6])  # slice profile of a thick acquisition
        moving = _resample_to(thick, size, spacing, origin, t1.GetDirection(), sitk.sitkBSpline)
        truth = sitk.AffineTransform(3)
        centre = moving.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in size])
        truth.SetCenter(centre)
        rot = sitk.VersorRigid3DTransform()
        rot.SetRotation([0.3, 0.2, 1.0], np.deg2rad(8.0))
        m = np.array(rot.GetMatrix()).reshape(3, 3) @ np.array([[1.06, 0.03, 0.0], [-0.02, 0.96, 0.04], [0.0, 0.03, 1.02]])
        truth.SetMatrix(m.reshape(-1).tolist())
        truth.SetTranslation([6.0, -5.0, 6.0])
        # the fixed image is the anatomy under the truth, sampled from the unsmoothed 1 mm volume and
        # then given the same slice profile: no interpolation of the moving image itself
        _save_case(d, "thick", sitk.Resample(thick, moving, truth, sitk.sitkBSpline, 0.0, sitk.sitkFloat32), moving,
                   truth, ".tfm")
    files.update(_case_files(d, "thick", ".tfm"))
    if not (d / "xray_fixed.nii.gz").exists():
        xr = sitk.ReadImage(str(DATA / "xray" / "chest_pa_RG1_UNCR.dcm"), sitk.sitkFloat32)
        xr = xr[:, :, 0] if xr.GetDimension() == 3 else xr
        xr = sitk.InvertIntensity(xr, maximum=float(sitk.GetArrayViewFromImage(xr).max()))  # MONOCHROME1
        mesh = [8, 8]
        bs = sitk.BSplineTransformInitializer(xr, mesh, order=3)
        rng = np.random.default_rng(4)
        params = rng.standard_normal(len(bs.GetParameters()))
        bs.SetParameters((params * 8.0 / np.abs(params).max()).tolist())
        rig = sitk.Euler2DTransform()
        rig.SetCenter(xr.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in xr.GetSize()]))
        rig.SetAngle(np.deg2rad(3.0))
        rig.SetTranslation([12.0, -7.0])
        truth = sitk.CompositeTransform([rig, bs])
        _save_case(d, "xray", sitk.Resample(xr, xr, truth, sitk.sitkBSpline, 0.0, sitk.sitkFloat32), xr, truth, ".h5")
    files.update(_case_files(d, "xray", ".h5"))
    return files


# ------------------------------------------------------------------------------ running
def timed(cmd: list[str], log: Path, timeout: float = 3600) -> dict:
    """Run ``cmd`` as its own process: whole-command seconds, peak RSS (MB), exit code."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=ENV)
            _, status, usage = os.wait4(proc.pid, 0)
            rc = os.waitstatus_to_exitcode(status)
        except Exception as exc:  # noqa: BLE001
            return {"failed": str(exc)}
    out = {"seconds": time.perf_counter() - t0, "peak_MB": usage.ru_maxrss / 1024.0, "rc": rc}
    if rc not in (0,):
        out["failed"] = f"exit {rc}: " + " | ".join(Path(log).read_text().strip().splitlines()[-2:])
    return out


PEER_SCRIPT = {
    # each writes OUT/field.nii.gz: the displacement T(x) - x on the fixed grid (float32 vectors)
    "sitk": textwrap.dedent("""
        import sys, SimpleITK as sitk
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
        fixed, moving, out, kind = sys.argv[1:5]
        f, m = sitk.ReadImage(fixed, sitk.sitkFloat32), sitk.ReadImage(moving, sitk.sitkFloat32)
        d = f.GetDimension()
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(32)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.01, seed=1)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetShrinkFactorsPerLevel([4, 2, 1])
        reg.SetSmoothingSigmasPerLevel([2, 1, 0])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        if kind == "affine":
            init = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(d),
                                                     sitk.CenteredTransformInitializerFilter.GEOMETRY)
            reg.SetOptimizerAsGradientDescent(1.0, 100, convergenceMinimumValue=1e-6, convergenceWindowSize=10)
            reg.SetOptimizerScalesFromPhysicalShift()
            reg.SetInitialTransform(init, inPlace=False)
        else:
            mesh = [max(1, int(sz * sp / 50.0)) for sz, sp in zip(f.GetSize(), f.GetSpacing())]
            reg.SetInitialTransform(sitk.BSplineTransformInitializer(f, mesh, order=3), inPlace=False)
            reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=100)
        tx = reg.Execute(f, m)
        u = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, f.GetSize(), f.GetOrigin(),
                                              f.GetSpacing(), f.GetDirection())
        sitk.WriteImage(sitk.Cast(u, sitk.sitkVectorFloat32), out + "/field.nii.gz")
        """),
    "elastix": textwrap.dedent("""
        import os, sys, itk, numpy as np, SimpleITK as sitk
        fixed, moving, out, kind = sys.argv[1:5]
        f, m = itk.imread(fixed, itk.F), itk.imread(moving, itk.F)
        po = itk.ParameterObject.New()
        po.AddParameterMap(po.GetDefaultParameterMap("affine"))
        if kind != "affine":
            po.AddParameterMap(po.GetDefaultParameterMap("bspline"))
        _, params = itk.elastix_registration_method(f, m, parameter_object=po, log_to_console=False,
                                                    number_of_threads=2)
        os.chdir(out)
        field = itk.transformix_deformation_field(m, params)
        arr = itk.array_from_image(field).astype(np.float32)
        img = sitk.GetImageFromArray(arr, isVector=True)
        ref = sitk.ReadImage(fixed)
        img.SetOrigin(ref.GetOrigin()); img.SetSpacing(ref.GetSpacing()); img.SetDirection(ref.GetDirection())
        sitk.WriteImage(img, out + "/field.nii.gz", useCompression=True)
        """),
    "ants": textwrap.dedent("""
        import sys, ants, SimpleITK as sitk
        fixed, moving, out, kind = sys.argv[1:5]
        f, m = ants.image_read(fixed), ants.image_read(moving)
        reg = ants.registration(f, m, type_of_transform="Affine" if kind == "affine" else "SyN")
        # the composite of ANTs' transforms as one displacement field on the fixed grid
        fld = ants.apply_transforms(f, m, transformlist=reg["fwdtransforms"], compose=out + "/ants_")
        img = sitk.ReadImage(fld)
        sitk.WriteImage(sitk.Cast(img, sitk.sitkVectorFloat32), out + "/field.nii.gz", useCompression=True)
        """),
}


def run_privreg(case: dict, work: Path) -> dict:
    out = work / "privreg"
    aff = work / "privreg_affine"
    kind = case["kind"]
    res: dict = {}
    if kind != "affine":  # a user's two steps: affine, then deformable from it
        res = timed(PRIVREG + ["register", case["fixed"], case["moving"], "-o", str(aff), "--transform", "affine",
                               "--metric", "mi", "--threads", "2", "--allow-failure"], work / "privreg_affine.log")
        if "failed" in res:
            return res
    args = PRIVREG + ["register", case["fixed"], case["moving"], "-o", str(out), "--threads", "2", "--allow-failure"]
    if kind == "affine":
        args += ["--transform", "affine", "--metric", "mi"]
    else:
        args += ["--transform", case["privreg_transform"], "--metric", case["privreg_metric"],
                 "--initial-transform", str(aff / "transform.tfm")]
    r = timed(args, work / "privreg.log")
    if "failed" in r:
        return r
    if kind != "affine":
        r["seconds"] += res["seconds"]
        r["peak_MB"] = max(r["peak_MB"], res["peak_MB"])
    rep = json.loads((out / "report.json").read_text())
    r["status"] = rep["status"]
    files = [str(out / f) for f in rep["transform_files"]]
    field = work / "privreg_field.nii.gz"
    _to_field(files, case["fixed"], field)
    r["field"] = str(field)
    r["transform_bytes"] = sum(os.path.getsize(f) for f in files)
    return r


def _to_field(transform_files: list[str], reference: str, path: Path) -> None:
    from privreg.image import read_image
    from privreg.transforms.itk_io import field_image_sitk, load_transforms

    ref = read_image(reference).grid
    t = load_transforms(transform_files)
    with torch.no_grad():
        disp = t.transform_grid(ref).double() - ref.points(torch.float64)
    sitk.WriteImage(field_image_sitk(disp, ref), str(path), useCompression=True)


def run_peer(name: str, case: dict, work: Path) -> dict:
    out = work / name
    out.mkdir(exist_ok=True)
    script = work / f"peer_{name}.py"  # not ants.py: the script would shadow the package
    script.write_text(PEER_SCRIPT[name])
    r = timed([PY, str(script), case["fixed"], case["moving"], str(out), case["kind"]], work / f"{name}.log")
    if "failed" not in r:
        r["field"] = str(out / "field.nii.gz")
    return r


# ------------------------------------------------------------------------------ scoring
def _mapping(field_path: str) -> tuple[np.ndarray, sitk.Image]:
    u = sitk.ReadImage(field_path)
    return sitk.GetArrayFromImage(u).astype(np.float64), u


def score_labels(field_path: str, fixed_labels: str, moving_labels: str) -> dict:
    """Mean Dice over the 116 AAL labels of the moving labels pulled through the field (nearest
    neighbour), and folding (det <= 0) of x + u(x) over the fixed brain."""
    from privreg.evaluate import jacobian_map
    from privreg.image import read_image, resample
    from privreg.transforms.itk_io import load_field

    t = load_field(Path(field_path))
    fl, ml = read_image(fixed_labels), read_image(moving_labels)
    warped = resample(ml, fl.grid, t, mode="nearest")
    a, b = fl.data.round().long(), warped.data.round().long()
    dice = []
    for lab in range(1, 117):
        x, y = a == lab, b == lab
        s = int(x.sum() + y.sum())
        if s:
            dice.append(2.0 * int((x & y).sum()) / s)
    brain = a > 0
    jac = jacobian_map(t, t.ctrl)
    return {"dice": float(np.mean(dice)), "folding_percent": float(100.0 * (jac[brain] <= 0).double().mean())}


def score_truth(field_path: str, fixed: str, truth: str) -> dict:
    """Mean |T(x) - T_true(x)| (mm) over the fixed image's foreground (above its 20th percentile)."""
    u, img = _mapping(field_path)
    f = sitk.ReadImage(fixed, sitk.sitkFloat32)
    fa = sitk.GetArrayViewFromImage(f)
    mask = fa > np.percentile(fa, 20)
    idx = np.argwhere(mask)[:, ::-1]  # (x, y[, z]) indices
    sel = idx[:: max(1, len(idx) // 200000)]
    st = sitk.ReadTransform(truth)
    pts = np.array([f.TransformIndexToPhysicalPoint([int(v) for v in p]) for p in sel])
    true = np.array([st.TransformPoint(p.tolist()) for p in pts])
    mapped = pts + u[tuple(sel[:, ::-1].T)]
    return {"error_mm": float(np.linalg.norm(mapped - true, axis=1).mean())}


def make_case(name: str, files: dict) -> dict:
    if name == "brain_affine":
        return dict(kind="affine", fixed=files["mni"], moving=files["colin"], labels=(files["mni_aal"], files["colin_aal"]))
    if name == "brain_deformable":
        return dict(kind="deformable", fixed=files["mni"], moving=files["colin"],
                    labels=(files["mni_aal"], files["colin_aal"]), privreg_transform="displacement", privreg_metric="lncc")
    if name == "brain_05mm":
        return dict(kind="affine", fixed=files["mni_05"], moving=files["colin_05"],
                    labels=(files["mni_aal_05"], files["colin_aal_05"]))
    if name == "thick_slices":
        return dict(kind="affine", fixed=files["thick_fixed"], moving=files["thick_moving"], truth=files["thick_truth"])
    if name == "radiograph":
        return dict(kind="deformable", fixed=files["xray_fixed"], moving=files["xray_moving"], truth=files["xray_truth"],
                    privreg_transform="bspline", privreg_metric="ssd")
    raise SystemExit(f"unknown case {name}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--peers", default="sitk,elastix,ants")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_realistic"))
    args = ap.parse_args()
    out = Path(args.out).resolve()  # peers chdir into their folders
    files = prepare(out / "data")
    results: dict = {}
    for name in args.cases.split(","):
        case = make_case(name, files)
        work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=out))
        rows = {"privreg": run_privreg(case, work)}
        for peer in args.peers.split(","):
            if peer == "sitk" and case["kind"] != "affine" and "labels" in case:
                rows[peer] = {"failed": "not run: no deformable default for 3D brains (see docstring)"}
                continue
            rows[peer] = run_peer(peer, case, work)
        for tool, r in rows.items():
            if "field" in r:
                try:
                    r.update(score_labels(r["field"], *case["labels"]) if "labels" in case
                             else score_truth(r["field"], case["fixed"], case["truth"]))
                except Exception as exc:  # noqa: BLE001
                    r["failed"] = f"scoring: {exc}"
        results[name] = rows
        _print(name, rows)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    return 0


def _print(name: str, rows: dict) -> None:
    score = "dice" if any("dice" in r for r in rows.values()) else "error_mm"
    p = rows["privreg"]
    print(f"\n{name}")
    print(f"  {'tool':8s} {score:>9s} {'seconds':>8s} {'peak MB':>8s} {'fold %':>7s}  time/privreg")
    for tool, r in rows.items():
        if "failed" in r and score not in r:
            print(f"  {tool:8s} failed: {r['failed'][:100]}")
            continue
        ratio = r["seconds"] / p["seconds"] if "seconds" in p else float("nan")
        fold = r.get("folding_percent", float("nan"))
        print(f"  {tool:8s} {r.get(score, float('nan')):9.4f} {r['seconds']:8.1f} {r['peak_MB']:8.0f} {fold:7.3f}  {ratio:5.2f}"
              + (f"  [{r['status']}]" if "status" in r else ""))
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
