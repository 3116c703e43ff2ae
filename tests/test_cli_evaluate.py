import json
import subprocess
import sys

import torch

from privreg.cli import main
from privreg.demo import data_path
from privreg.evaluate import assd, dice, hd95, jaccard, psnr, ssim, tre
from privreg.grid import Grid
from privreg.image import Image, read_image, write_image
from privreg.landmarks import affine_landmarks, rigid_landmarks, tps_landmarks
from privreg.transforms import AffineTransform, RigidTransform

F64 = torch.float64


def test_cli_register_apply_evaluate(tmp_path):
    f, m = data_path("BrainT1SliceBorder20.png"), data_path("BrainProtonDensitySliceShifted13x17y.png")
    out = tmp_path / "out"
    assert main(["register", str(f), str(m), "-o", str(out), "--transform", "translation", "--metric", "mi",
                 "--quiet"]) == 0
    assert {p.name for p in out.iterdir()} == {"transform.tfm", "warped.nii.gz", "report.json", "qc.png"}
    rep = json.loads((out / "report.json").read_text())
    assert rep["iterations"] > 0 and rep["metric"] == "mi"
    warped = tmp_path / "w.nii.gz"
    assert main(["apply", str(m), str(f), str(out / "transform.tfm"), "-o", str(warped)]) == 0
    w, fixed = read_image(warped), read_image(f)
    assert w.grid.same_as(fixed.grid)
    assert main(["evaluate", "--images", str(f), str(warped), "-o", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["ssim"] > 0.3


def test_cli_bad_inputs_leave_no_outdir(tmp_path, capsys):
    f = data_path("BrainT1SliceBorder20.png")
    out = tmp_path / "never"
    assert main(["register", str(f), str(tmp_path / "missing.nii"), "-o", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not out.exists()
    vol = tmp_path / "v.nii.gz"
    write_image(Image(torch.rand(5, 6, 7), Grid((7, 6, 5))), vol)
    assert main(["register", str(f), str(vol), "-o", str(out)]) == 2
    assert "2D but moving image is 3D" in capsys.readouterr().err
    mask = tmp_path / "empty.png"
    write_image(Image(torch.zeros(257, 221), read_image(f).grid), mask)
    assert main(["register", str(f), str(f), "-o", str(out), "--fixed-mask", str(mask)]) == 2
    assert "empty" in capsys.readouterr().err
    for bad, msg in ((["--sampling", "urs", "--sampling-fraction", "2"], "fraction"),
                     (["--sampling", "gms", "--flat-rate", "0.5"], "URS only")):
        assert main(["register", str(f), str(f), "-o", str(out)] + bad) == 2
        assert msg in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_cli_entry_point_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "privreg.cli", "register", "a.nii", "b.nii", "-o", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no such file" in r.stderr


def test_overlap_and_surface_metrics():
    g = Grid((40, 40), (0.5, 0.5))
    a = torch.zeros(40, 40)
    a[10:20, 10:20] = 1
    b = torch.roll(a, 4, dims=1)  # shifted by 4 voxels = 2 mm
    assert abs(dice(a, b)[1] - 0.6) < 1e-9 and abs(jaccard(a, b)[1] - 6 / 14) < 1e-9
    assert abs(hd95(a > 0, b > 0, g) - 2.0) < 1e-6
    assert 0 < assd(a > 0, b > 0, g) <= 2.0
    assert psnr(a, a) == float("inf") and ssim(a, a) > 0.999


def test_landmark_registration():
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(12, 3, generator=gen, dtype=F64) * 100
    rig = RigidTransform(3, [0.1, -0.2, 0.3], [5.0, -3.0, 2.0], [50.0, 50.0, 50.0])
    q = rig(p).detach()
    fit = rigid_landmarks(p, q)
    assert float(tre(fit, p, q).max()) < 1e-8
    aff = AffineTransform(3, torch.eye(3, dtype=F64) + 0.1 * torch.randn(3, 3, generator=gen, dtype=F64),
                          torch.tensor([1.0, 2.0, 3.0]))
    q2 = aff(p).detach()
    assert float(tre(affine_landmarks(p, q2), p, q2).max()) < 1e-8
    q3 = q2 + torch.randn(12, 3, generator=gen, dtype=F64)
    assert float(tre(tps_landmarks(p, q3), p, q3).max()) < 1e-6  # interpolating TPS
