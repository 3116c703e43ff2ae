import numpy as np
import pytest
import torch

from privreg.grid import Grid
from privreg.image import Image
from privreg.joint import BlockRows, ClearBackend, Columns, FixedSide, Need, PyramidLevel, cross_product, onehot_product
from privreg.basis import DenseBasis, KroneckerBasis
from privreg.metrics.functional import (lncc_loss, mi_loss, mind_loss, ncc_loss, parzen_fixed, parzen_moving,
                                        ssd_loss)
from privreg.objectives import JointObjective, MovingLevel, ParamModel
from privreg.transforms import BSplineTransform, make_linear

F64 = torch.float64


def blobs(g, centres):
    p = g.points(F64)
    out = 0
    for c, s, a in centres:
        out = out + a * torch.exp(-((p - torch.tensor(c, dtype=F64)) ** 2).sum(1) / (2 * s * s))
    return out.reshape(g.shape).float()


SCENE = [([50, 40], 12, 1.0), ([75, 60], 8, 0.7), ([40, 70], 10, 0.5)]


def test_mi_matrix_form_equals_direct_histogram():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(3000, generator=gen, dtype=F64)
    b = (a + 0.3 * torch.rand(3000, generator=gen, dtype=F64)) ** 2
    bins = 16
    wa, _, width = parzen_moving(a, float(a.min()), float(a.max()), bins)
    wb = parzen_fixed(b, float(b.min()), float(b.max()), bins)
    p = wa.T @ wb / a.numel()  # PPIR eq. (8)
    # direct loop: each sample adds its cubic Parzen weights to the row of its fixed bin
    direct = np.zeros((bins, bins))
    bw = (float(b.max()) - float(b.min())) / bins
    for x, y in zip(a.tolist(), b.tolist()):
        t = min(int((y - float(b.min())) / bw), bins - 1)
        pos = (x - float(a.min())) / width + 2.0
        for r in range(bins):
            u = abs(r - pos)
            w = (4 - 6 * u * u + 3 * u**3) / 6 if u < 1 else ((2 - u) ** 3 / 6 if u < 2 else 0.0)
            direct[r, t] += w
    direct /= a.numel()
    assert np.allclose(p.numpy(), direct, atol=1e-12)
    assert abs(float(p.sum()) - 1.0) < 1e-9  # partition of unity


def test_cross_product_matches_einsum():
    gen = torch.Generator().manual_seed(1)
    u, v = torch.randn(500, 4, generator=gen, dtype=F64), torch.randn(500, 3, generator=gen, dtype=F64)
    phi = torch.randn(500, 5, generator=gen, dtype=F64)
    ref = torch.einsum("ij,ia,ib->jab", phi, u, v)
    assert torch.allclose(cross_product(u, v, DenseBasis(phi), chunk=128).cross, ref)
    onehot = torch.nn.functional.one_hot(torch.randint(0, 3, (500,), generator=gen), 3).to(F64)
    fast = cross_product(u, onehot, DenseBasis(phi), chunk=128, v_bins=onehot.argmax(1))
    assert torch.allclose(fast.cross, torch.einsum("ij,ia,ib->jab", phi, u, onehot))
    assert torch.allclose(fast.total, u.T @ onehot)
    kb = KroneckerBasis([torch.randn(20, 6, generator=gen, dtype=F64), torch.randn(25, 7, generator=gen, dtype=F64)])
    ref = torch.einsum("ij,ia,ib->jab", kb.dense(), u, v)
    assert torch.allclose(cross_product(u, v, kb).cross, ref)
    assert torch.allclose(kb.to_sparse().dense(), kb.dense())
    pick = torch.randperm(500, generator=gen)[:37]
    assert torch.allclose(kb.rows(pick).dense(), kb.dense()[pick])  # rows computed for the points only
    # one-hot V with spline bases (MI with a B-spline): scatter per bin, no (N, a * bins) product
    for basis in (kb, kb.to_sparse()):
        fast = cross_product(u, onehot, basis, v_bins=onehot.argmax(1))
        assert torch.allclose(fast.cross, torch.einsum("ij,ia,ib->jab", kb.dense(), u, onehot))


def test_block_sparse_columns_match_their_dense_form():
    """MI's U as Parzen blocks (4 live bins per row) gives the same products as the dense U, for
    every basis kind; repeated blocks in a row add up."""
    gen = torch.Generator().manual_seed(2)
    n, nb, w = 500, 6, 3
    idx = torch.randint(0, nb, (n, 4), generator=gen)
    u = Columns((torch.randn(n, 2, generator=gen, dtype=F64),
                 BlockRows(idx, torch.randn(n, 4, w, generator=gen, dtype=F64), nb)))
    dense = u.dense()
    assert dense.shape == u.shape == (n, 2 + nb * w)
    i, l = 7, 2
    assert torch.allclose(dense[i, 2 + idx[i, l] * w: 2 + (idx[i, l] + 1) * w],
                          u.parts[1].val[i][idx[i] == idx[i, l]].sum(0))
    bins = torch.randint(0, 5, (n,), generator=gen)
    onehot = torch.nn.functional.one_hot(bins, 5).to(F64)
    kb = KroneckerBasis([torch.randn(20, 6, generator=gen, dtype=F64), torch.randn(25, 7, generator=gen, dtype=F64)])
    for basis in (DenseBasis(torch.randn(n, 4, generator=gen, dtype=F64)), kb, kb.to_sparse()):
        phi = basis.matrix if isinstance(basis, DenseBasis) else kb.dense()
        got = onehot_product(u, bins, 5, basis)
        assert torch.allclose(got.cross, torch.einsum("ij,ia,ib->jab", phi, dense, onehot))
        assert torch.allclose(got.total, dense.T @ onehot)
    u2 = Columns((u.parts[1], BlockRows(idx, u.parts[1].val[:, :, :1], nb)))  # MI's [A-like, C-like] order
    got = onehot_product(u2, bins, 5, basis, Need(cross_cols=slice(0, nb * w)))  # the cross of part 2 is skipped
    ref = torch.einsum("ij,ia,ib->jab", phi, u2.dense(), onehot)
    assert torch.allclose(got.cross[:, :nb * w], ref[:, :nb * w]) and bool(got.cross[:, nb * w:].isnan().all())


def central_difference(obj, t, th0, i, h):
    """(cost(theta + h e_i) - cost(theta - h e_i)) / 2h of a seam objective; leaves theta at th0."""
    vals = []
    for s in (1, -1):
        th = th0.clone()
        th[i] += s * h
        t.set_theta(th)
        vals.append(obj.evaluate(None).value)
    t.set_theta(th0)
    return (vals[0] - vals[1]) / (2 * h)


def fading_pair():
    """Fixed and moving blob images on the same 2 mm grid (points leave the moving domain), with a
    clear backend on the fixed one."""
    g = Grid((60, 50), (2.0, 2.0))
    fixed, moving = Image(blobs(g, SCENE), g), Image(blobs(g, [([55, 45], 14, 1.0), ([80, 70], 9, 0.6)]), g)
    return g, moving, ClearBackend(FixedSide(fixed, [PyramidLevel(1, 0)], normalize=False))


@pytest.mark.parametrize("metric", ["ssd", "mi"])
@pytest.mark.parametrize("kind", ["rigid", "affine", "bspline"])
def test_seam_gradient_matches_finite_differences(metric, kind):
    """Analytic gradients through the joint-product seam vs central differences of the cost.

    The moving domain is larger than the fixed one so that no point crosses the border.
    """
    g = Grid((120, 100), (1.0, 1.0))
    gm = Grid((160, 140), (1.0, 1.0), (-20.0, -20.0))
    fixed, moving = Image(blobs(g, SCENE), g), Image(blobs(gm, SCENE), gm)
    be = ClearBackend(FixedSide(fixed, [PyramidLevel(1, 0)], normalize=False))
    ml = MovingLevel.build(moving)
    t = make_linear(kind, 2, g.center()) if kind != "bspline" else BSplineTransform.for_domain(g, 30.0)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        if kind == "rigid":
            t.theta.copy_(torch.tensor([0.05, 2.3, -1.7]))
        elif kind == "affine":
            t.theta.copy_(torch.tensor([1.02, 0.03, -0.02, 0.98, 2.3, -1.7]))
        else:
            t.theta.copy_(torch.randn(t.theta.shape, generator=gen, dtype=F64))
    obj = JointObjective(metric, ParamModel(t), ml, g, be)
    obj.start(0)
    ev = obj.evaluate(None)
    th0 = t.theta.detach().clone().reshape(-1)
    idx = range(th0.numel()) if kind != "bspline" else torch.argsort(ev.grad.abs(), descending=True)[:5].tolist()
    h = 1e-3 if kind != "bspline" else 1e-2
    for i in idx:
        fd = central_difference(obj, t, th0, i, h)
        scale = float(ev.grad.abs().max())
        assert abs(float(ev.grad[i]) - fd) < 0.05 * scale, (i, float(ev.grad[i]), fd)
    t.set_theta(th0)
    if metric == "mi" and kind == "bspline":  # the matrix-free Hessian (large grids) equals the dense one
        import privreg.objectives as objectives

        dense = obj.evaluate(None).hess
        objectives.DENSE_HESSIAN_MAX, saved = 0, objectives.DENSE_HESSIAN_MAX
        try:
            free = obj.evaluate(None)
        finally:
            objectives.DENSE_HESSIAN_MAX = saved
        v = torch.randn(dense.shape[0], generator=gen, dtype=F64)
        assert free.hess is None and torch.allclose(free.hess_matvec(v), dense @ v)
        assert torch.allclose(free.hess_diag, torch.diagonal(dense))


@pytest.mark.parametrize("kind", ["rigid", "affine"])
def test_mi_gradient_is_exact_where_points_fade_out(kind):
    """Mattes MI's analytic gradient is the derivative of the value it reports, to 1e-4 of its norm,
    when the moving domain equals the fixed one (points fade out over the border voxel, so the fixed
    marginal changes with the parameters: the log term is log p / (p_r p_t))."""
    g, moving, be = fading_pair()
    t = make_linear(kind, 2, g.center())
    with torch.no_grad():
        t.theta.copy_(torch.tensor([0.08, 6.3, -4.7] if kind == "rigid" else [1.05, 0.04, -0.03, 0.96, 6.3, -4.7]))
    obj = JointObjective("mi", ParamModel(t), MovingLevel.build(moving), g, be, bins=24)
    obj.start(0)
    ev = obj.evaluate(None)
    th0 = t.theta.detach().clone().reshape(-1)
    fd = torch.zeros_like(th0)
    for i in range(th0.numel()):
        h = 1e-5 if i < th0.numel() - 2 else 1e-3  # matrix entries are unit-less, shifts in mm
        fd[i] = central_difference(obj, t, th0, i, h)
    assert float(torch.linalg.norm(ev.grad.to(F64) - fd)) < 1e-4 * float(torch.linalg.norm(fd)), (ev.grad, fd)


@pytest.mark.parametrize("kind", ["affine", "bspline"])
def test_gradient_only_mi_equals_the_full_evaluation(kind):
    """hessian=False: the clear backend contracts the cross product with MI's log term without
    forming it; value and gradient equal the full evaluation's, and the contraction equals the
    generic one (full cross product, then the contraction) that the secure backends inherit."""
    from privreg.joint import JointBackend

    g, moving, be = fading_pair()
    t = make_linear(kind, 2, g.center()) if kind != "bspline" else BSplineTransform.for_domain(g, 30.0)
    with torch.no_grad():
        t.theta.add_(torch.randn(t.theta.shape, generator=torch.Generator().manual_seed(1), dtype=F64) * 0.05)
    obj = JointObjective("mi", ParamModel(t), MovingLevel.build(moving), g, be, bins=24)
    obj.start(0)
    idx = torch.arange(0, g.numel, 3)
    full, fast = obj.evaluate(idx), obj.evaluate(idx, hessian=False)
    assert fast.hess is None and full.hess is not None and fast.value == full.value
    assert torch.allclose(fast.grad, full.grad, rtol=1e-10, atol=1e-12 * float(full.grad.abs().max()))
    gen = torch.Generator().manual_seed(3)
    u = Columns((BlockRows(torch.randint(0, 22, (idx.numel(), 4), generator=gen),
                           torch.rand(idx.numel(), 4, 2, generator=gen, dtype=F64), 24),))
    weights = torch.rand(48, 24, generator=gen, dtype=F64)
    basis = DenseBasis(torch.rand(idx.numel(), 3, generator=gen, dtype=F64))
    for groups, ngroups in ((torch.arange(2).repeat(24), 2), (torch.randint(0, 5, (48,), generator=gen), 5)):
        got = be.cross_contracted(u, basis, idx, weights, groups, ngroups)
        ref = JointBackend.cross_contracted(be, u, basis, idx, weights, groups, ngroups)
        assert got.shape == (3, ngroups) and torch.allclose(got, ref)


def mi_fixed_range(a, b):
    return mi_loss(a, b, ranges=(0.0, 1.0, 0.0, 1.0))


@pytest.mark.parametrize("fn,tol", [(ssd_loss, 1e-3), (ncc_loss, 1e-3), (mi_fixed_range, 1e-3), (lncc_loss, 1e-3),
                                    (mind_loss, 5e-2)])
def test_autograd_metrics_are_minimal_at_identity_and_differentiable(fn, tol):
    g = Grid((60, 50), (1.0, 1.0))
    a = blobs(g, [([25, 20], 6, 1.0), ([40, 30], 4, 0.7)])
    shifted = torch.roll(a, 2, dims=1)
    base = float(fn(a, a))
    assert float(fn(shifted, a)) > base
    x = shifted.clone().double().requires_grad_(True)
    loss = fn(x, a.double())
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # directional derivative check
    d = torch.randn_like(x)
    eps = 1e-4
    fd = (float(fn(x.detach() + eps * d, a.double())) - float(fn(x.detach() - eps * d, a.double()))) / (2 * eps)
    assert abs(float((grad * d).sum()) - fd) < tol * max(1.0, abs(fd)) + 1e-6
