"""Every bad input is one clear line on stderr, exit code 2, no traceback, nothing written (issue #16).

One table: each row is a command line (built from files made here) and a fragment of the expected
message. A row passes when ``main`` returns 2 (or argparse exits 2), stderr is a single line starting
with ``privreg: error:`` that contains the fragment, and the working folder holds nothing but the
inputs (no OUTDIR, no temporary files).
"""

import gzip
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from privreg.cli import main
from privreg.demo import data_path
from privreg.grid import Grid
from privreg.image import Image, write_image
from privreg.transforms import AffineTransform, save_transform

PNG = str(data_path("BrainT1SliceBorder20.png"))


def _nifti(path, arr, affine=None):
    nib.save(nib.Nifti1Image(arr.astype(np.float32), np.eye(4) if affine is None else affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    vol = rng.random((20, 22, 24)).astype(np.float32)
    f = {"png": PNG, "vol": _nifti(d / "vol.nii.gz", vol)}
    (d / "empty.nii.gz").write_bytes(b"")
    f["empty"] = str(d / "empty.nii.gz")
    (d / "corrupt.nii.gz").write_bytes(rng.bytes(4000))
    f["corrupt"] = str(d / "corrupt.nii.gz")
    full = _nifti(d / "whole.nii", vol)
    raw = open(full, "rb").read()
    (d / "trunc.nii").write_bytes(raw[: len(raw) // 2])
    f["trunc_nii"] = str(d / "trunc.nii")
    (d / "trunc.nii.gz").write_bytes(gzip.compress(raw)[: len(raw) // 3])
    f["trunc_gz"] = str(d / "trunc.nii.gz")
    some_nan = vol.copy()
    some_nan[3, 4, 5:9] = np.nan
    f["nan"] = _nifti(d / "nan.nii.gz", some_nan)
    one_inf = vol.copy()
    one_inf[10, 10, 10] = np.inf
    f["inf"] = _nifti(d / "inf.nii", one_inf)
    f["allnan"] = _nifti(d / "allnan.nii.gz", np.full_like(vol, np.nan))
    mha = sitk.GetImageFromArray(some_nan.transpose(2, 1, 0))
    sitk.WriteImage(mha, str(d / "nan.mha"))
    f["nan_mha"] = str(d / "nan.mha")
    f["const"] = _nifti(d / "const.nii.gz", np.ones_like(vol))
    vec = sitk.Compose([sitk.GetImageFromArray(vol[..., 0].T.copy())] * 2)
    sitk.WriteImage(vec, str(d / "vec2.mha"))
    f["vector"] = str(d / "vec2.mha")
    write_image(Image(torch.rand(1, 64), Grid((64, 1))), d / "thin.nii.gz")
    f["thin"] = str(d / "thin.nii.gz")
    g = sitk.ReadImage(PNG)
    size = g.GetSize()
    write_image(Image(torch.zeros(size[1], size[0]), Grid(size)), d / "empty_mask.nii.gz")
    f["empty_mask"] = str(d / "empty_mask.nii.gz")
    write_image(Image(torch.ones(size[1], size[0]), Grid(size, origin=(5000.0, 5000.0))), d / "far_mask.nii.gz")
    f["far_mask"] = str(d / "far_mask.nii.gz")
    f["mask3d"] = f["vol"]
    write_image(Image(torch.rand(size[1], size[0]) * 100, Grid(size, origin=(9000.0, 0.0))), d / "far.nii.gz")
    f["far"] = str(d / "far.nii.gz")
    save_transform(AffineTransform(3), d / "t3.tfm")
    f["t3d"] = str(d / "t3.tfm")
    (d / "bad.tfm").write_text("#Insight Transform File V1.0\nnonsense\n")
    f["bad_tfm"] = str(d / "bad.tfm")
    save_transform(AffineTransform(2), d / "t2.tfm")
    f["t2d"] = str(d / "t2.tfm")
    return f


# (name, argv with {placeholders}, expected message fragment)
ROWS = [
    ("missing file", "register {png} {d}/nope.nii.gz -o {out}", "no such file"),
    ("empty file", "register {png} {empty} -o {out}", "empty"),
    ("corrupt file", "register {png} {corrupt} -o {out}", "cannot read image"),
    ("truncated nii", "register {vol} {trunc_nii} -o {out}", "cannot read image"),
    ("truncated nii.gz", "register {vol} {trunc_gz} -o {out}", "cannot read image"),
    ("2D vs 3D", "register {png} {vol} -o {out}", "2D but moving image is 3D"),
    ("2 components", "register {png} {vector} -o {out}", "components"),
    ("NIfTI with NaN", "register {vol} {nan} -o {out}", "NaN"),
    ("NIfTI with one +Inf", "register {vol} {inf} -o {out}", "NaN or infinite"),
    ("all-NaN NIfTI", "register {vol} {allnan} -o {out}", "NaN"),
    ("MHA with NaN", "register {vol} {nan_mha} -o {out}", "NaN"),
    ("constant image", "register {vol} {const} -o {out}", "constant"),
    ("64 x 1 image", "register {thin} {thin} -o {out}", "at least 4 voxels"),
    ("empty mask", "register {png} {png} -o {out} --fixed-mask {empty_mask}", "fixed mask is empty"),
    ("3D mask on 2D", "register {png} {png} -o {out} --fixed-mask {mask3d}", "3D but the images are 2D"),
    ("mask elsewhere", "register {png} {png} -o {out} --fixed-mask {far_mask}", "does not overlap"),
    ("no overlap, --init identity", "register {png} {far} -o {out} --init identity", "do not overlap"),
    ("iterations < 1", "register {png} {png} -o {out} --iterations -5", "--iterations must be"),
    ("iterations per level", "register {png} {png} -o {out} --iterations 5,5", "one per level"),
    ("negative tol", "register {png} {png} -o {out} --tol -1", "--tol"),
    ("one bin", "register {png} {png} -o {out} --metric mi --bins 1", "--bins"),
    ("grid spacing 0", "register {png} {png} -o {out} --transform bspline --grid-spacing 0", "--grid-spacing"),
    ("levels too coarse", "register {png} {png} -o {out} --levels 1000", "every level"),
    ("level below 1", "register {png} {png} -o {out} --levels 2,0.5", "--levels"),
    ("sigmas per level", "register {png} {png} -o {out} --sigmas 1,2", "--sigmas"),
    ("sampling fraction", "register {png} {png} -o {out} --sampling urs --sampling-fraction 2", "fraction"),
    ("lncc radius", "register {png} {png} -o {out} --metric lncc --lncc-radius 0", "--lncc-radius"),
    ("greedy step", "register {png} {png} -o {out} --transform displacement --step 0", "--step"),
    ("not a number", "register {png} {png} -o {out} --iterations abc", "comma-separated"),
    ("unknown choice", "register {png} {png} -o {out} --metric foo", "invalid choice"),
    ("3D initial transform", "register {png} {png} -o {out} --initial-transform {t3d}", "--initial-transform is 3D"),
    ("corrupt transform", "register {png} {png} -o {out} --initial-transform {bad_tfm}", "cannot read transform"),
    ("threads", "register {png} {png} -o {out} --threads 0", "--threads"),
    ("max points", "register {png} {png} -o {out} --max-points 3", "max_points"),
    ("apply: fill not a number", "apply {png} {png} {t2d} -o {d}/w.nii.gz --fill abc", "invalid float"),
    ("evaluate: missing landmarks", "evaluate --transform {t2d} --reference {png} --landmarks {d}/a.txt {d}/b.txt",
     "no such landmark file"),
    ("-o is a file", "register {png} {png} -o {png}", "is a file"),
    ("-o under a file", "register {png} {png} -o {png}/sub", "is a file, not a directory"),
    ("apply: unknown extension", "apply {png} {png} {t2d} -o {d}/w.xyz", "cannot write an image"),
    ("apply: -o is a folder", "apply {png} {png} {t2d} -o {d}", "is a directory"),
    ("apply: 3D transform", "apply {png} {png} {t3d} -o {d}/w.nii.gz", "same dimension"),
    ("evaluate: no --reference", "evaluate --transform {t2d}", "--reference"),
    ("evaluate: nothing", "evaluate", "needs --labels"),
    ("evaluate: -o under a file", "evaluate --images {png} {png} -o {png}/e.json", "is a file"),
    ("secure: missing fixed", "secure-register {d}/nope.png {png} -o {out}", "no such file"),
]


@pytest.mark.parametrize("name,argv,fragment", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_clear_line(files, tmp_path, capsys, name, argv, fragment):
    before = sorted(os.listdir(tmp_path))
    args = argv.format(d=tmp_path, out=tmp_path / "out", **files).split()
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(err) == 1 and err[0].startswith("privreg: error:") and fragment in err[0], err
    assert sorted(os.listdir(tmp_path)) == before  # no OUTDIR, no temporary files


def test_table_is_large_enough():
    assert len(ROWS) >= 30


def test_full_disk_while_writing_leaves_nothing(tmp_path, capsys, monkeypatch):
    import errno

    import privreg.qc

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "qc.png")

    monkeypatch.setattr(privreg.qc, "save_qc", full)
    rc = main(["register", PNG, PNG, "-o", str(tmp_path / "out"), "--transform", "translation", "--levels", "2",
               "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "No space left" in err[0], err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_clean_up(tmp_path, sig, code):
    brain = str(data_path("mni152_t1_4mm.nii.gz"))
    proc = subprocess.Popen([sys.executable, "-m", "privreg.cli", "register", brain, brain, "-o", str(tmp_path / "o"),
                             "--transform", "displacement", "--metric", "lncc", "--iterations", "100000",
                             "--levels", "1"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    line = ""
    while "it" not in line and time.monotonic() < deadline:  # wait until it is iterating
        line = proc.stderr.readline()
    assert list(tmp_path.glob(".o.tmp-*")), "the run should be writing into its temporary folder"
    proc.send_signal(sig)
    rc = proc.wait(timeout=30)
    assert rc == code and os.listdir(tmp_path) == []
