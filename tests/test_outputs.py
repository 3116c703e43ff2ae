"""The files users expect: compact transforms that ITK reads, inverse and Jacobian maps, apply with
ANTs-style warps, label maps kept integer, landmark files, and the API's input types (issue #16)."""

import gzip
import json

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch

import privreg as pr
from privreg.cli import main
from privreg.demo import data_path, known_bspline
from privreg.image import Image, resample, write_image
from privreg.landmarks import read_points


def _pair(tmp_path, t1_slice):
    g = t1_slice.grid.downsample(2.0)
    moving = resample(t1_slice, g)
    fixed = resample(moving, g, known_bspline(g, 30.0, 4.0, seed=3))
    write_image(fixed, tmp_path / "f.nii.gz")
    write_image(moving, tmp_path / "m.nii.gz")
    return str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz")


def _sitk_points(transform, pts):
    return torch.tensor([transform.TransformPoint(p) for p in pts.tolist()], dtype=torch.float64)


def test_dense_field_files_are_float32_compressed_and_read_by_itk(tmp_path, t1_slice):
    f, m = _pair(tmp_path, t1_slice)
    out = tmp_path / "g"
    assert main(["register", f, m, "-o", str(out), "--transform", "displacement", "--metric", "lncc", "--quiet",
                 "--write-inverse", "--write-jacobian", "--levels", "2,1", "--iterations", "30"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["transform_files"] == ["transform.tfm", "warp.nii.gz"]
    warp = sitk.ReadImage(str(out / "warp.nii.gz"))
    assert warp.GetPixelID() == sitk.sitkVectorFloat32 and warp.GetNumberOfComponentsPerPixel() == 2
    raw = sitk.GetArrayFromImage(warp).astype(np.float32).tobytes()
    assert (out / "warp.nii.gz").stat().st_size <= 1.2 * len(gzip.compress(raw))
    # ITK maps points through the written files exactly as privreg's transform does
    ours = pr.transforms.itk_io.load_transforms([out / "transform.tfm", out / "warp.nii.gz"])
    comp = sitk.CompositeTransform([sitk.ReadTransform(str(out / "transform.tfm")),
                                    sitk.DisplacementFieldTransform(sitk.Cast(warp, sitk.sitkVectorFloat64))])
    fixed = pr.read_image(f)
    pts = fixed.grid.points(torch.float64)[::97]
    with torch.no_grad():
        assert torch.allclose(_sitk_points(comp, pts), ours(pts).double(), atol=1e-4)
    # apply with the ANTs-style pair reproduces warped.nii.gz
    w = tmp_path / "w.nii.gz"
    assert main(["apply", m, f, str(out / "transform.tfm"), str(out / "warp.nii.gz"), "-o", str(w)]) == 0
    assert torch.allclose(pr.read_image(w).data, pr.read_image(out / "warped.nii.gz").data, atol=1e-3)
    # the inverse undoes the transform where the field does not fold
    inv = pr.transforms.itk_io.load_transforms([out / "inverse_warp.nii.gz", out / "inverse.tfm"])
    inner = fixed.grid.points(torch.float64)
    inner = inner[(inner > inner.min(0).values + 15).all(1) & (inner < inner.max(0).values - 15).all(1)][::13]
    with torch.no_grad():
        back = ours(inv(inner).double()).double()
    assert float(torch.linalg.norm(back - inner, dim=1).max()) < 0.1  # mm, 2 mm pixels
    jac = pr.read_image(out / "jacobian.nii.gz").data
    assert float(jac.min()) > 0 and abs(float(jac.mean()) - 1.0) < 0.05


def test_bspline_result_is_stored_as_its_coefficients(tmp_path, t1_slice):
    f, m = _pair(tmp_path, t1_slice)
    out = tmp_path / "b"
    assert main(["register", f, m, "-o", str(out), "--transform", "bspline", "--grid-spacing", "30", "--quiet"]) == 0
    st = sitk.ReadTransform(str(out / "transform.h5"))
    names = [sitk.CompositeTransform(st).GetNthTransform(i).GetName() for i in range(2)]
    assert names == ["AffineTransform", "BSplineTransform"]
    assert (out / "transform.h5").stat().st_size < 100_000  # coefficients, not a dense field
    ours = pr.load_transform(out / "transform.h5")
    pts = pr.read_image(f).grid.points(torch.float64)[::53]
    with torch.no_grad():
        assert torch.allclose(_sitk_points(st, pts), ours(pts).double(), atol=1e-6)


def test_apply_keeps_labels_integer_and_fills(tmp_path):
    g = pr.Grid((40, 30))
    lab = torch.zeros(30, 40)
    lab[5:20, 10:30] = 7
    write_image(Image(lab, g), tmp_path / "lab.nii.gz", dtype=np.uint8)
    pr.save_transform(pr.transforms.TranslationTransform(2, [5.0, 0.0]), tmp_path / "t.tfm")
    out = tmp_path / "o.nii.gz"
    assert main(["apply", str(tmp_path / "lab.nii.gz"), str(tmp_path / "lab.nii.gz"), str(tmp_path / "t.tfm"),
                 "-o", str(out), "--labels", "--fill", "3"]) == 0
    img = sitk.ReadImage(str(out))
    assert img.GetPixelID() == sitk.sitkUInt8
    arr = sitk.GetArrayFromImage(img)
    assert set(np.unique(arr)) == {0, 3, 7} and (arr[:, -5:] == 3).all()


def test_landmark_files_give_tre(tmp_path):
    g = pr.Grid((50, 60), (0.8, 0.8))
    write_image(Image(torch.rand(60, 50), g), tmp_path / "ref.nii.gz")
    pr.save_transform(pr.transforms.TranslationTransform(2, [1.0, 2.0]), tmp_path / "t.tfm")
    (tmp_path / "f.txt").write_text("point\n3\n1 2\n10 20\n30 5\n")
    (tmp_path / "m.csv").write_text("x,y\n2,4\n11,22\n31,10\n")  # last one 3 mm off
    out = tmp_path / "e.json"
    assert main(["evaluate", "--transform", str(tmp_path / "t.tfm"), "--reference", str(tmp_path / "ref.nii.gz"),
                 "--landmarks", str(tmp_path / "f.txt"), str(tmp_path / "m.csv"), "-o", str(out)]) == 0
    tre = json.loads(out.read_text())["tre_mm"]
    assert np.allclose(tre["per_point"], [0, 0, 3]) and abs(tre["mean"] - 1.0) < 1e-9
    (tmp_path / "i.txt").write_text("index\n1\n10 5\n")
    assert torch.allclose(read_points(tmp_path / "i.txt", g), torch.tensor([[8.0, 4.0]], dtype=torch.float64))


def test_register_accepts_paths_sitk_nibabel_and_arrays(brain3d):
    p = str(data_path("mni152_t1_4mm.nii.gz"))
    arr = brain3d.data.numpy()
    moved = resample(brain3d, brain3d.grid, pr.transforms.TranslationTransform(3, [4.0, -2.0, 0.0]))
    for fixed in (p, sitk.ReadImage(p), nib.load(p), (arr, brain3d.grid)):
        res = pr.register(fixed, moved, "translation", "ssd", levels=(2, 1))
        assert res.report["status"] == "ok"
        assert torch.allclose(res.transform.theta.detach(), torch.tensor([-4.0, 2.0, 0.0], dtype=torch.float64),
                              atol=0.05)
