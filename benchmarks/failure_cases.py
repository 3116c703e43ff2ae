"""The failure cases of issue #16 and good cases beside them: does the verdict tell them apart?

    python benchmarks/failure_cases.py [--cases NAME,...]

Prints, per case, the expected verdict, the status the run reported, its warnings and measures.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

import privreg as pr
from privreg.demo import data_path, known_bspline
from privreg.image import Image, resample, smooth
from privreg.transforms import RigidTransform

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _noise_like(img: Image, seed: int = 0) -> Image:
    g = torch.Generator().manual_seed(seed)
    return img.with_data(torch.rand(img.data.shape, generator=g) * float(img.data.max()))


def _rotated(img: Image, deg: float) -> Image:
    t = RigidTransform(2, [math.radians(deg)], [0.0, 0.0], img.grid.center())
    return resample(img, img.grid, t)


def cases() -> dict:
    t1 = pr.read_image(data_path("BrainT1SliceBorder20.png"))
    pd = pr.read_image(data_path("BrainProtonDensitySliceShifted13x17y.png"))
    t1s, pds = pr.read_image(data_path("BrainT1Slice.png")), pr.read_image(data_path("BrainProtonDensitySlice.png"))
    b3 = pr.read_image(data_path("mni152_t1_4mm.nii.gz"))
    half = t1s.data.shape[1] // 2
    left = Image(t1s.data[:, :half].contiguous(), pr.Grid((half, t1s.grid.size[1])))
    right = Image(t1s.data[:, half:2 * half].contiguous(), pr.Grid((half, t1s.grid.size[1]), origin=(half, 0.0)))
    field = known_bspline(t1s.grid, 24.0, 3.0, seed=2)
    t1w = resample(t1s, t1s.grid, field)
    c = {
        # name: (fixed, moving, options, expected status)
        "noise_mi_2d": (t1, _noise_like(pd), dict(transform="rigid", metric="mi"), "failed"),
        "noise_ssd_3d": (b3, _noise_like(b3), dict(transform="affine", metric="ssd"), "failed"),
        "urs10_mi_13x17": (t1, pd, dict(transform="rigid", metric="mi",
                                        sampling=pr.Sampling("urs", 0.1, 0)), "ok (restart)"),
        "rot180_mi": (t1s, _rotated(t1s, 180), dict(transform="rigid", metric="mi"), "ok (restart)"),
        "halves_mi": (left, right, dict(transform="rigid", metric="mi"), "failed"),
        "greedy_step50": (t1s, t1w, dict(transform="displacement", metric="lncc", step_vox=50.0,
                                         levels=(2, 1), max_iter=20), "failed"),
        "good_13x17_mi": (t1, pd, dict(transform="translation", metric="mi", sigmas=(2, 1, 0.5)), "ok"),
        "good_t1pd_rigid": (t1s, pds, dict(transform="rigid", metric="mi"), "ok"),
        "good_rot20_mi": (t1s, _rotated(pds, 20), dict(transform="rigid", metric="mi"), "ok"),
        "good_bspline_ssd": (t1w, t1s, dict(transform="bspline", metric="ssd", grid_spacing=24.0), "ok"),
        "good_greedy": (t1s, t1w, dict(transform="displacement", metric="lncc", levels=(2, 1), max_iter=20), "ok"),
        "good_3d_affine_ssd": (b3, resample(b3, b3.grid, RigidTransform(3, [0.05, 0.0, -0.05], [3.0, -2.0, 1.0],
                                                                        b3.grid.center())),
                               dict(transform="affine", metric="ssd"), "ok"),
    }
    import nibabel

    anat = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"
    if anat.exists():  # nibabel's sample and its reoriented, moved copy
        a, m = pr.read_image(anat), pr.read_image(anat.parent / "reoriented_anat_moved.nii")
        c["nibabel_reoriented_mi"] = (a, m, dict(transform="rigid", metric="mi"), "ok")
    return c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    all_cases = cases()
    names = args.cases.split(",") if args.cases else list(all_cases)
    for name in names:
        fixed, moving, opts, expected = all_cases[name]
        opts = dict(opts)
        t0 = time.perf_counter()
        res = pr.register(fixed, moving, **opts)
        r = res.report
        q = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r["quality"].items()}
        got = r["status"] + (" (restart)" if r.get("restart", {}).get("kept") == "restarted" else "")
        print(f"{name:24s} expected {expected:13s} got {got:13s} {time.perf_counter() - t0:6.1f}s {q}")
        for w in r["warnings"]:
            print(f"{'':26s}warning: {w}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
