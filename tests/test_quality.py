"""A failed registration is never reported as success; a good one carries no mark (issue #16)."""

import json
import math

import torch

import privreg as pr
from privreg.cli import main
from privreg.demo import data_path, known_bspline
from privreg.image import Image, resample, write_image
from privreg.transforms import RigidTransform


def _noise_like(img, seed=0):
    g = torch.Generator().manual_seed(seed)
    return img.with_data(torch.rand(img.data.shape, generator=g) * float(img.data.max()))


def test_noise_moving_image_fails_with_exit_3_and_a_marked_report(tmp_path, capsys):
    f = data_path("BrainT1SliceBorder20.png")
    noise = tmp_path / "noise.nii.gz"
    write_image(_noise_like(pr.read_image(f)), noise)
    out = tmp_path / "out"
    assert main(["register", str(f), str(noise), "-o", str(out), "--transform", "rigid", "--metric", "mi",
                 "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "warning: the aligned images share almost no information" in err and "Traceback" not in err
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "failed" and rep["warnings"] and rep["quality"]["ecc"] < 0.08
    assert main(["register", str(f), str(noise), "-o", str(tmp_path / "o2"), "--transform", "rigid", "--metric", "mi",
                 "--quiet", "--allow-failure"]) == 0


def test_good_registration_has_no_warning(tmp_path, capsys):
    f, m = data_path("BrainT1SliceBorder20.png"), data_path("BrainProtonDensitySliceShifted13x17y.png")
    out = tmp_path / "out"
    assert main(["register", str(f), str(m), "-o", str(out), "--transform", "translation", "--metric", "mi",
                 "--sigmas", "2,1,0.5", "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "ok" and rep["warnings"] == [] and "restart" not in rep


def test_folding_greedy_step_is_a_failure(t1_slice):
    field = known_bspline(t1_slice.grid, 24.0, 3.0, seed=2)
    warped = resample(t1_slice, t1_slice.grid, field)
    res = pr.register(t1_slice, warped, "displacement", "lncc", step_vox=50.0, levels=(2, 1), max_iter=20)
    assert res.report["status"] == "failed" and res.report["quality"]["folding_percent"] > 1.0
    assert any("folds" in w for w in res.report["warnings"])
    good = pr.register(t1_slice, warped, "displacement", "lncc", levels=(2, 1), max_iter=20)
    assert good.report["status"] == "ok" and good.report["quality"]["folding_percent"] == 0.0


def test_rotated_180_degrees_is_recovered_by_the_restart(t1_slice):
    c = t1_slice.grid.center()
    moving = resample(t1_slice, t1_slice.grid, RigidTransform(2, [math.pi], [0.0, 0.0], c))
    res = pr.register(t1_slice, moving, "rigid", "mi")
    assert res.report["restart"]["kept"] == "restarted" and res.report["status"] == "ok"
    truth = RigidTransform(2, [math.pi], [0.0, 0.0], c)
    assert pr.evaluate.displacement_rmse(res.transform, truth, t1_slice.grid) < 0.5  # mm (1 mm pixels)
    first = pr.register(t1_slice, moving, "rigid", "mi", restart=False)
    assert pr.evaluate.displacement_rmse(first.transform, truth, t1_slice.grid) > 50  # a local optimum ...
    assert first.report["quality"]["best_neighbour"] == "rotation 180 deg"  # ... whose better neighbour is named


def test_images_pushed_apart_are_a_failure():
    g = pr.Grid((100, 100))
    a = torch.zeros(100, 100)
    a[30:70, 30:70] = 1.0
    fixed = Image(a, g)
    moving = Image(torch.roll(a, 45, dims=1) + 0.01 * torch.rand(100, 100, generator=torch.Generator().manual_seed(1)), g)
    start = RigidTransform(2, [0.0], [0.0, 0.0], g.center())
    far = RigidTransform(2, [0.0], [90.0, 0.0], g.center())
    v = pr.quality.assess(g, moving, start, far, fixed=fixed)
    assert v.status == "failed" and any("pushed apart" in w for w in v.warnings)
    assert any("moves points" in w for w in v.warnings)
