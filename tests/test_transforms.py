import pytest
import SimpleITK as sitk
import torch

from privreg.grid import Grid
from privreg.transforms import (AffineTransform, BSplineTransform, CompositeTransform, DisplacementFieldTransform,
                                StationaryVelocityTransform, load_transform, make_linear, save_transform)
from privreg.evaluate import jacobian_stats

F64 = torch.float64


def grid3():
    q, _ = torch.linalg.qr(torch.tensor([[1.0, 0.2, 0.0], [-0.1, 1.0, 0.3], [0.0, -0.2, 1.0]], dtype=F64))
    return Grid((14, 12, 10), (2.0, 2.5, 3.0), (-10.0, 5.0, 2.0), tuple(q.reshape(-1).tolist()))


def grid2():
    return Grid((30, 24), (1.5, 2.0), (3.0, -4.0))


def _random_linear(kind, g, seed=0):
    t = make_linear(kind, g.ndim, g.center())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        t.theta.add_(0.05 * torch.randn(t.theta.shape, generator=gen, dtype=F64))
        t.theta.data[-g.ndim:] += torch.randn(g.ndim, generator=gen, dtype=F64) if kind == "affine" else 0
    return t


def _nonlinear(kind, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "bspline":
        t = BSplineTransform.for_domain(g, 12.0)
        with torch.no_grad():
            t.coefficients.copy_(1.5 * torch.randn(t.coefficients.shape, generator=gen, dtype=F64))
    elif kind == "displacement":
        t = DisplacementFieldTransform(g, torch.randn(g.numel, g.ndim, generator=gen, dtype=F64))
    else:
        t = StationaryVelocityTransform(g, 2 * torch.randn(g.numel, g.ndim, generator=gen))
    return t


def interior_points(g, n=60, seed=0):
    """Random points strictly inside the grid's voxel-centre box (off the nodes)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, g.ndim, generator=gen, dtype=F64) * (torch.tensor(g.size, dtype=F64) - 1.5) + 0.25
    return g.index_to_world(idx)


def _sitk_map(path, pts):
    st = sitk.ReadTransform(str(path))
    return torch.tensor([st.TransformPoint(p.tolist()) for p in pts], dtype=F64)


@pytest.mark.parametrize("kind", ["translation", "rigid", "similarity", "affine"])
@pytest.mark.parametrize("dim", [2, 3])
def test_linear_tfm_roundtrip(tmp_path, kind, dim):
    g = grid2() if dim == 2 else grid3()
    t = _random_linear(kind, g)
    save_transform(t, tmp_path / "t.tfm")
    pts = torch.rand(50, dim, dtype=F64) * 40 - 10
    assert torch.allclose(_sitk_map(tmp_path / "t.tfm", pts), t(pts), atol=1e-6)
    back = load_transform(tmp_path / "t.tfm")
    assert torch.allclose(back(pts), t(pts), atol=1e-6)


@pytest.mark.parametrize("kind", ["bspline", "displacement", "svf"])
@pytest.mark.parametrize("dim", [2, 3])
def test_nonlinear_h5_roundtrip(tmp_path, kind, dim):
    g = grid2() if dim == 2 else grid3()
    outer = _random_linear("affine", g, seed=3)
    t = CompositeTransform([outer, _nonlinear(kind, g)])
    save_transform(t, tmp_path / "t.h5", g)
    pts = g.points(F64)[::7]
    with torch.no_grad():
        ours = t(pts)
    assert torch.allclose(_sitk_map(tmp_path / "t.h5", pts), ours.to(F64), atol=1e-4)
    back = load_transform(tmp_path / "t.h5")
    with torch.no_grad():
        assert torch.allclose(back(pts).to(F64), ours.to(F64), atol=1e-4)


def test_dense_field_export_exact_between_voxels(tmp_path):
    """Displacement fields interpolate linearly exactly as ITK does, also off the grid nodes."""
    g = grid3()
    t = _nonlinear("displacement", g)
    save_transform(t, tmp_path / "t.h5", g)
    pts = interior_points(g)
    with torch.no_grad():
        assert torch.allclose(_sitk_map(tmp_path / "t.h5", pts), t(pts), atol=1e-5)


def test_bspline_kronecker_equals_sparse():
    g = grid3()
    t = _nonlinear("bspline", g)
    with torch.no_grad():
        a = t.transform_grid(g).to(F64)
        b = t(g.points(F64))
    assert torch.allclose(a, b, atol=1e-4)


def test_bspline_matches_itk_bspline_transform():
    """Our cubic B-spline equals ITK's BSplineTransform with the same control grid."""
    g = grid2()
    t = _nonlinear("bspline", g)
    ctrl = t.ctrl
    it = sitk.BSplineTransform(2, 3)
    it.SetFixedParameters(list(ctrl.size) + list(ctrl.origin) + list(ctrl.spacing) + list(ctrl.direction))
    coef = t.coefficients.detach()
    it.SetParameters(torch.cat([coef[:, 0], coef[:, 1]]).tolist())
    pts = interior_points(g)
    theirs = torch.tensor([it.TransformPoint(p.tolist()) for p in pts], dtype=F64)
    with torch.no_grad():
        assert torch.allclose(t(pts), theirs, atol=1e-6)


def test_svf_is_diffeomorphic_and_invertible():
    g = Grid((32, 32), (1.0, 1.0))
    x = g.points()
    v = torch.stack([6 * torch.sin(x[:, 1] / 5), 6 * torch.cos(x[:, 0] / 6)], 1)  # large, folding if used as u
    t = StationaryVelocityTransform(g, v)
    stats = jacobian_stats(t, g)
    assert stats["folding_percent"] == 0.0 and stats["min"] > 0
    dense = DisplacementFieldTransform(g, v.double())
    assert jacobian_stats(dense, g)["folding_percent"] > 0  # the same field as a displacement folds
    with torch.no_grad():
        fwd = t.field_displacement()
        inv = t.inverse_field_displacement()
        # exp(v) o exp(-v) ~ id in the interior
        comp = g.points() + inv + dense.__class__(g, fwd.double())(g.points() + inv).float() - (g.points() + inv)
    interior = ((x > 8) & (x < 23)).all(1)
    assert float((comp - g.points())[interior].abs().max()) < 0.3


def test_composite_order_is_itk():
    a = AffineTransform(2, torch.tensor([[2.0, 0], [0, 1]]), torch.tensor([1.0, 0]))
    b = AffineTransform(2, None, torch.tensor([0.0, 5.0]))
    c = CompositeTransform([a, b])  # a(b(x))
    p = torch.tensor([[1.0, 1.0]], dtype=F64)
    assert torch.allclose(c(p), a(b(p)))
    assert torch.allclose(c(p), torch.tensor([[3.0, 6.0]], dtype=F64))


def test_jacobian_determinant_is_in_world_axes_on_flipped_grids():
    """det(dW/dx) of W(x) = A x on a grid with a flipped, rotated direction is det(A): an earlier
    version differentiated along index axes only (det(I + (A - I) D) instead of det(A))."""
    q, _ = torch.linalg.qr(torch.tensor([[1.0, 0.3, 0.1], [0.2, 1.0, -0.2], [0.1, 0.1, 1.0]], dtype=torch.float64))
    flip = q @ torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
    g = Grid((12, 10, 9), (2.0, 1.5, 2.5), (5.0, -3.0, 1.0), tuple(flip.reshape(-1).tolist()))
    a = torch.tensor([[1.2, 0.1, 0.0], [0.05, 0.9, 0.1], [0.0, -0.1, 1.1]], dtype=torch.float64)
    stats = jacobian_stats(AffineTransform(3, a, torch.zeros(3, dtype=torch.float64)), g)
    assert abs(stats["min"] - float(torch.det(a))) < 1e-5 and abs(stats["max"] - float(torch.det(a))) < 1e-5
