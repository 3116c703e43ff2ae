import numpy as np
import pytest
import SimpleITK as sitk
import torch

from privreg.errors import InputError
from privreg.grid import Grid
from privreg.image import Image, read_image, resample, sample, sample_linear_with_gradient, write_image
from privreg.transforms import TranslationTransform


def rotated_grid():
    q, _ = torch.linalg.qr(torch.tensor([[1.0, 0.3, 0.1], [0.2, 1.0, -0.2], [0.1, 0.1, 1.0]], dtype=torch.float64))
    return Grid((7, 9, 5), (1.5, 0.8, 2.5), (10.0, -3.0, 4.0), tuple(q.reshape(-1).tolist()))


def test_world_index_roundtrip_matches_sitk():
    g = rotated_grid()
    img = sitk.Image(list(g.size), sitk.sitkFloat32)
    img.SetSpacing(g.spacing), img.SetOrigin(g.origin), img.SetDirection(g.direction)
    idx = torch.tensor([[1.0, 2.0, 3.0], [6.0, 0.0, 4.0]], dtype=torch.float64)
    ours = g.index_to_world(idx)
    theirs = torch.tensor([img.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in idx], dtype=torch.float64)
    assert torch.allclose(ours, theirs, atol=1e-9)
    assert torch.allclose(g.world_to_index(ours), idx, atol=1e-9)


def test_points_order_matches_array_order():
    g = rotated_grid()
    pts = g.points(torch.float64).reshape(g.shape + (3,))
    # tensor element [k, j, i] sits at index (i, j, k)
    assert torch.allclose(pts[2, 3, 4], g.index_to_world(torch.tensor([[4.0, 3.0, 2.0]], dtype=torch.float64))[0])


def test_nifti_roundtrip_keeps_geometry(tmp_path):
    g = rotated_grid()
    img = Image(torch.rand(g.shape), g)
    write_image(img, tmp_path / "x.nii.gz")
    back = read_image(tmp_path / "x.nii.gz")
    assert back.grid.same_as(g, tol=1e-4)
    assert torch.allclose(back.data, img.data)


@pytest.mark.parametrize("ext", [".mha", ".nrrd", ".nii"])
def test_formats(tmp_path, ext):
    g = Grid((6, 5, 4), (1.0, 2.0, 3.0), (1.0, 2.0, 3.0))
    img = Image(torch.arange(120, dtype=torch.float32).reshape(g.shape), g)
    write_image(img, tmp_path / f"x{ext}")
    back = read_image(tmp_path / f"x{ext}")
    assert back.grid.same_as(g) and torch.equal(back.data, img.data)


def test_png_rgb_is_read_as_scalar_2d(t1_slice):
    assert t1_slice.ndim == 2 and t1_slice.data.shape == (217, 181)


def test_dicom_file_and_series(tmp_path):
    arr = (np.arange(4 * 6 * 5).reshape(4, 6, 5) % 50).astype(np.int16)
    vol = sitk.GetImageFromArray(arr)
    vol.SetSpacing((0.5, 0.7, 2.0))
    series = tmp_path / "series"
    series.mkdir()
    for k in range(arr.shape[0]):
        sl = vol[:, :, k]
        sl.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.1")  # series UID
        sl.SetMetaData("0020|0032", f"0\\0\\{2.0 * k}")  # image position
        sl.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        sl.SetMetaData("0020|0013", str(k))
        sl.SetMetaData("0028|0030", "0.7\\0.5")
        w = sitk.ImageFileWriter()
        w.KeepOriginalImageUIDOn()
        w.SetFileName(str(series / f"s{k}.dcm"))
        w.Execute(sl)
    one = read_image(series / "s1.dcm")
    assert one.ndim == 2 and torch.equal(one.data, torch.from_numpy(arr[1].astype(np.float32)))
    vol3 = read_image(series)
    assert vol3.ndim == 3 and vol3.data.shape == (4, 6, 5)
    assert abs(vol3.grid.spacing[2] - 2.0) < 1e-3


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "missing.nii.gz")
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read"):
        read_image(bad)
    g = Grid((4, 4))
    data = torch.zeros(4, 4)
    data[1, 1] = float("nan")
    write_image(Image(data, g), tmp_path / "nan.mha")
    with pytest.raises(InputError, match="NaN"):
        read_image(tmp_path / "nan.mha")


def test_sample_and_resample_translation():
    g = Grid((20, 16), (2.0, 1.0), (5.0, -2.0))
    y, x = torch.meshgrid(torch.arange(16.0), torch.arange(20.0), indexing="ij")
    img = Image(3 * x + 2 * y, g)  # linear in index: linear interpolation is exact
    t = TranslationTransform(2, [2.0, 1.0])  # one voxel in x and y
    out = resample(img, g, t)
    assert torch.allclose(out.data[:-1, :-1], img.data[1:, 1:], atol=1e-4)
    vals, inside = sample(img.data, g, torch.tensor([[6.0, -1.5]]))
    assert inside.all() and abs(float(vals[0]) - (3 * 0.5 + 2 * 0.5)) < 1e-4


def test_linear_interpolant_gradient_is_its_exact_derivative():
    """Value = grid_sample's trilinear value (zeros outside); gradient = finite differences of that
    value in world space, on an oblique anisotropic grid, including points in the fading border."""
    g = rotated_grid()
    gen = torch.Generator().manual_seed(4)
    data = torch.rand(g.shape, generator=gen, dtype=torch.float64)
    index = torch.rand(400, 3, generator=gen, dtype=torch.float64) * (torch.tensor(g.size) + 1.0) - 1.0
    index = index[((index - index.round()).abs() > 1e-3).all(1)]  # away from the kinks at the voxels
    pts = g.index_to_world(index)
    val, grad = sample_linear_with_gradient(data, g, index)
    ref, _ = sample(data, g, pts)
    assert torch.allclose(val, ref.to(val.dtype), atol=1e-5)
    h = 1e-6
    for k in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[k] = h
        up = sample_linear_with_gradient(data, g, g.world_to_index(pts + e))[0]
        down = sample_linear_with_gradient(data, g, g.world_to_index(pts - e))[0]
        assert torch.allclose(grad[:, k], (up - down) / (2 * h), atol=1e-6)
    outside = g.world_to_index(g.index_to_world(torch.tensor([[-1.5, 2.0, 2.0], [3.0, 9.2, 1.0]], dtype=torch.float64)))
    v, gr = sample_linear_with_gradient(data, g, outside)
    assert (v == 0).all() and (gr == 0).all()


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_linear_resample_equals_resampling_world_points(mode):
    """resample's affine_grid path (linear transforms) = sampling at the mapped world points, on an
    oblique moving grid that only partly covers the output grid (same values, same outside)."""
    from privreg.image import sample
    from privreg.transforms import make_linear

    gm = Grid((17, 19, 15), rotated_grid().spacing, rotated_grid().origin, rotated_grid().direction)
    gf = Grid((13, 11, 11), (1.0, 0.6, 1.5), tuple(gm.index_to_world(torch.tensor([5.0, 5.0, 4.0], dtype=torch.float64)).tolist()))
    img = Image(torch.rand(gm.shape, generator=torch.Generator().manual_seed(1)), gm)
    a = make_linear("affine", 3, gf.center())
    with torch.no_grad():
        a.theta.add_(torch.randn(12, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.05)
    for t in (None, a):
        got = resample(img, gf, t, mode=mode, default=-1.0).data.reshape(-1)
        pts = gf.points(torch.float64) if t is None else a(gf.points(torch.float64))
        vals, inside = sample(img.data, gm, pts.float(), mode=mode, padding_mode="border")
        ref = torch.where(inside, vals, torch.tensor(-1.0))
        assert 0.2 < float(inside.float().mean()) < 0.9 and torch.equal(got == -1, ref == -1)
        assert torch.allclose(got, ref, atol=1e-5)


def test_smooth_equals_scipy_gaussian_on_anisotropic_grids():
    """Separable smoothing keeps the shape and matches scipy's 1D correlations with the same
    Gaussian kernels (replicate borders) on anisotropic grids, in 2D, 3D and channel-batched form
    (an earlier version padded the wrong axis: wrong borders, and a different shape whenever the
    kernel radii differed per axis)."""
    from scipy.ndimage import correlate1d

    from privreg.image import gaussian_kernel1d, smooth

    gen = torch.Generator().manual_seed(0)
    for grid in (Grid((23, 17, 11), (1.0, 2.0, 3.5)), Grid((19, 13), (0.7, 1.9))):
        x = torch.randn(grid.shape, generator=gen, dtype=torch.float64)
        ref = x.numpy()
        for axis, sp in enumerate(grid.spacing):  # (x, y, z) axis -> tensor dim d - 1 - axis
            k = gaussian_kernel1d(4.0 / sp, torch.float64).numpy()
            ref = correlate1d(ref, k, axis=grid.ndim - 1 - axis, mode="nearest")
        ours = smooth(x, grid, 4.0)
        assert ours.shape == x.shape
        assert np.abs(ours.numpy() - ref).max() < 1e-10
        batch = smooth(torch.stack([x, 2 * x]), grid, 4.0)
        assert torch.allclose(batch[1], 2 * ours) and torch.allclose(batch[0], ours)


def test_box_mean_matches_average_pooling():
    import torch.nn.functional as F

    from privreg.metrics.functional import _box

    x = torch.randn(9, 12, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = F.avg_pool3d(F.pad(x[None, None], [2] * 6, mode="replicate"), 5, stride=1)[0, 0]
    assert torch.allclose(_box(x, 2), ref, atol=1e-12)
