import pytest
import torch

from privreg.image import Image, resample, smooth, write_image
from privreg.secure.launch import local_parties
from privreg.secure.parties import run_moving_party

F64 = torch.float64

from privreg.demo import data_path
from privreg.image import read_image

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def t1_slice():
    return read_image(data_path("BrainT1Slice.png"))


@pytest.fixture(scope="session")
def pd_slice():
    return read_image(data_path("BrainProtonDensitySlice.png"))


@pytest.fixture(scope="session")
def brain3d():
    return read_image(data_path("mni152_t1_4mm.nii.gz"))


@pytest.fixture(scope="session")
def pair2d(tmp_path_factory):
    """A 128 x 128 T1 slice (moving) and its copy under a known affine (fixed), on disk."""
    from privreg.demo import data_path

    src = read_image(data_path("BrainT1Slice.png"))
    grid = src.grid.downsample(2.0)
    moving = resample(Image(smooth(src.data, src.grid, 1.0), src.grid), grid)
    from privreg.transforms import AffineTransform

    a = torch.tensor([[1.03, 0.05], [-0.06, 0.98]], dtype=F64)
    truth = AffineTransform(2, a, torch.tensor([3.0, -2.0], dtype=F64), grid.center())
    fixed = resample(moving, grid, truth)
    from privreg.demo import known_bspline

    field = known_bspline(grid, 24.0, 3.0, seed=2)
    warped = resample(moving, grid, field)
    d = tmp_path_factory.mktemp("pair")
    write_image(fixed, d / "fixed.nii.gz")
    write_image(warped, d / "fixed_bspline.nii.gz")
    # CLEAR runs use the images party 2 reads (NIfTI stores the geometry in float32)
    fixed, warped = read_image(d / "fixed.nii.gz"), read_image(d / "fixed_bspline.nii.gz")
    return {"fixed": fixed, "moving": moving, "fixed_path": str(d / "fixed.nii.gz"), "truth": truth,
            "bspline": {"fixed": warped, "moving": moving, "fixed_path": str(d / "fixed_bspline.nii.gz"), "truth": field}}


def _secure(pair, cfg, recorder=None, progress=None, timeout=60.0, protocol="mpc", reveal_limit=1e6):
    """Run party 1 here against party 2 (and the dealer for MPC) spawned as processes with the same plan
    (a generous reveal limit: these tests are about accuracy; tests/test_enforcement.py about limits)."""
    with local_parties(pair["fixed_path"], timeout, dealer=protocol == "mpc", cfg=cfg, protocol=protocol,
                       reveal_limit=reveal_limit) as peers:
        res, _ = run_moving_party(pair["moving"], peers["fixed"], peers["dealer"], peers["pki"], cfg, timeout,
                                  progress=progress, recorder=recorder, protocol=protocol)
        procs = peers["processes"]
    assert all(p.poll() is not None for p in procs)  # no process left behind
    return res


@pytest.fixture
def secure_run():
    return _secure




def assert_private_matches_clear(private, clear, grid, metric: str) -> None:
    """A private run reaches the clear run's result. SSD (Levenberg-Marquardt) also takes the same
    decisions on the backends' noise (MPC fixed point, CKKS ~1e-7), so the same iteration count; MI's
    quasi-Newton line search amplifies that noise along a narrow valley: the same optimum by another
    path, so MI's iteration count is not compared (CKKS, 2D rigid case, 6 runs: up to 0.0105 mm
    apart, final MI within 4.4e-6, 24 to 37 iterations against the clear run's 33)."""
    from privreg.evaluate import displacement_rmse

    rmse = displacement_rmse(private.transform, clear.transform, grid)
    n_private, n_clear = private.report["iterations"], clear.report["iterations"]
    if metric == "ssd":
        assert rmse < 0.01 and n_private == n_clear, (rmse, n_private, n_clear)
    else:
        assert rmse < 0.025 and abs(private.report["final_value"] - clear.report["final_value"]) < 2e-5, (
            rmse, n_private, n_clear)


@pytest.fixture
def private_matches_clear():
    return assert_private_matches_clear
