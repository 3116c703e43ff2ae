"""PPIR(MPC) vs CLEAR on the bundled 2D data, in the structure of the PPIR paper's tables 1-3.

Each private run spawns party 2 and the dealer as their own processes (TLS on localhost) and is
compared with the clear engine run with the same configuration and sampling seed: iterations,
displacement RMSE vs CLEAR, time per iteration and MB per iteration for each party.

Usage:  python benchmarks/bench_mpc.py [--json out/bench_mpc.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from privreg.demo import data_path, known_bspline
from privreg.evaluate import displacement_rmse
from privreg.image import Image, read_image, resample, smooth, write_image
from privreg.register import RegistrationConfig, register
from privreg.sampling import Sampling
from privreg.secure.launch import local_parties
from privreg.secure.parties import run_moving_party
from privreg.transforms import AffineTransform

torch.set_num_threads(2)
F64 = torch.float64


def cases(tmp: Path) -> list[dict]:
    src = read_image(data_path("BrainT1Slice.png"))
    moving = Image(smooth(src.data, src.grid, 0.5), src.grid)
    grid = moving.grid
    aff = AffineTransform(2, torch.tensor([[1.03, 0.05], [-0.06, 0.98]], dtype=F64), torch.tensor([3.0, -2.0], dtype=F64),
                          grid.center())
    fixed_aff = resample(moving, grid, aff)
    fixed_bsp = resample(moving, grid, known_bspline(grid, 20.0, 4.0, seed=1))
    write_image(fixed_aff, tmp / "fixed_affine.nii.gz")
    write_image(fixed_bsp, tmp / "fixed_bspline.nii.gz")
    t1 = read_image(data_path("BrainT1SliceBorder20.png"))
    pd = read_image(data_path("BrainProtonDensitySliceShifted13x17y.png"))
    out = []
    for mode in ("full", "urs", "gms"):
        s = Sampling(mode, 0.1, seed=3) if mode != "full" else Sampling()
        out.append({"name": f"SSD affine 2D {mode}", "fixed": fixed_aff, "moving": moving,
                    "path": str(tmp / "fixed_affine.nii.gz"),
                    "cfg": dict(transform="affine", metric="ssd", levels=(2, 1), max_iter=50, sampling=s)})
    out.append({"name": "SSD B-spline 2D urs", "fixed": fixed_bsp, "moving": moving, "path": str(tmp / "fixed_bspline.nii.gz"),
                "cfg": dict(transform="bspline", metric="ssd", levels=(2, 1), max_iter=30, grid_spacing=20.0,
                            reg_weight=0.01, sampling=Sampling("urs", 0.2, seed=3))})
    out.append({"name": "MI rigid 2D full (T1 vs PD)", "fixed": t1, "moving": pd,
                "path": str(data_path("BrainT1SliceBorder20.png")),
                "cfg": dict(transform="rigid", metric="mi", levels=(4, 2, 1), max_iter=50)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="out/bench_mpc.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as td:
        for case in cases(Path(td)):
            t0 = time.perf_counter()
            clear = register(case["fixed"], case["moving"], **case["cfg"])
            t_clear = time.perf_counter() - t0
            cfg = RegistrationConfig(**case["cfg"])
            with local_parties(case["path"], 120.0) as peers:
                private, _ = run_moving_party(case["moving"], peers["fixed"], peers["dealer"], peers["pki"], cfg, 120.0,
                                              reveal_gms_indices=True)
            sec = private.report["secure"]
            calls = sec["calls"]
            mv, fx = sec["moving"], sec["fixed"]
            p1_mb = (mv["traffic_fixed"]["wire_bytes_sent"] + mv["traffic_fixed"]["wire_bytes_received"]) / calls / 1e6
            p2_online = (fx["traffic_moving"]["wire_bytes_sent"] + fx["traffic_moving"]["wire_bytes_received"]
                         - fx["traffic_moving"]["by_message"].get("sent:features", 0)) / calls / 1e6
            row = {
                "case": case["name"], "clear_iterations": clear.report["iterations"],
                "mpc_iterations": private.report["iterations"],
                "rmse_vs_clear_mm": displacement_rmse(private.transform, clear.transform, case["fixed"].grid),
                "clear_s_per_it": t_clear / max(clear.report["iterations"], 1),
                "p1_s_per_it": mv["wall_seconds"] / calls, "p2_cpu_s_per_it": fx["cpu_seconds"] / calls,
                "p1_MB_per_it": p1_mb, "p2_online_MB_per_it": p2_online,
                "features_MB_once": fx["traffic_moving"]["by_message"].get("sent:features", 0) / 1e6,
                "dealer_MB_per_it": sec["dealer"]["traffic_fixed"]["wire_bytes_sent"] / calls / 1e6,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    hdr = ("case", "it CLEAR", "it MPC", "RMSE mm", "CLEAR s/it", "P1 s/it", "P2 cpu s/it", "P1 MB/it", "P2 MB/it",
           "V once MB", "dealer MB/it")
    print(" | ".join(hdr))
    for r in rows:
        print(f"{r['case']} | {r['clear_iterations']} | {r['mpc_iterations']} | {r['rmse_vs_clear_mm']:.5f} | "
              f"{r['clear_s_per_it']:.3f} | {r['p1_s_per_it']:.3f} | {r['p2_cpu_s_per_it']:.3f} | {r['p1_MB_per_it']:.3f} | "
              f"{r['p2_online_MB_per_it']:.3f} | {r['features_MB_once']:.2f} | {r['dealer_MB_per_it']:.4f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
