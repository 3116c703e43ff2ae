"""Registration objectives at one pyramid level, seen from party 1 (moving image, theta).

* :class:`JointObjective` - SSD or Mattes MI whose image-mixing terms go through the joint-product
  seam (:mod:`privreg.joint`); returns value, gradient and Gauss-Newton Hessian (SSD: linearised
  Hessian S^T S; MI: Dowson-Bowden). Works for any backend.
* :class:`AutogradObjective` - any metric (SSD, NCC, LNCC, MI, MIND) by automatic differentiation,
  both images in one process (clear only).

Parameters are handled in "dense" form D (P x d): W(x) = L (x_or_c + Phi(x) D) ... so that
dW_k/dD_jk = (L Phi_j)(x); linear transforms map D <-> theta through their Jacobian.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .basis import Basis, DenseBasis
from .grid import Grid, field_image
from .image import (Image, dilate, gradient, resample, sample, sample_index, sample_linear_with_gradient,
                    zero_padded)
from .joint import BlockRows, Columns, FeatureSpec, JointBackend, Need
from .metrics.functional import lncc_loss, mi_loss, mind_loss, ncc_loss, parzen_moving_live, ssd_loss
from .regularizers import REGULARIZERS, control_grid_operator
from .transforms import CompositeTransform, GridSplineTransform, LinearTransform, Transform

F64 = torch.float64


@dataclass
class MovingLevel:
    """Party 1's data at a level: moving image (smoothed), its float64 copy for the seam objectives'
    analytic derivatives, and its mask.

    The image gradient is the exact derivative of the linear interpolant (``exact_gradient``), or
    the central-difference gradient image interpolated like the image (ITK's classic metrics). MI's
    line search needs the former (3D T1/T2 affine: 0.030 mm against 0.053 mm); SSD's Gauss-Newton
    lands closer to the truth with the latter, whose model is smooth across voxel faces (2D affine
    0.0032 against 0.0048 mm, 3D B-spline 0.268 against 0.301 mm: ``benchmarks/bench_clear.py``)."""

    image: Image
    # float64 (the SSD cost cancels: sum I^2 - 2 I J + J^2), for the seam objectives only (None for
    # autograd): the image with a border of zeros (the exact interpolator's layout), or
    # ``channels`` (1 + d, *shape): the image and its central-difference gradient
    padded: Tensor | None = None
    channels: Tensor | None = None
    mask: Image | None = None
    vmin: float = 0.0
    vmax: float = 1.0
    structure_cache: dict = field(default_factory=dict, repr=False)  # radius -> structure() mask

    @staticmethod
    def build(image: Image, mask: Image | None = None, with_gradient: bool = True,
              exact_gradient: bool = True) -> "MovingLevel":
        vals = image.data[mask.data > 0] if mask is not None else image.data
        padded = channels = None
        if with_gradient:
            data = image.data.to(F64)
            if exact_gradient:
                padded = zero_padded(data)
            else:
                channels = torch.cat([data[None], gradient(data, image.grid)], 0)
        return MovingLevel(image, padded, channels, mask, float(vals.min()), float(vals.max()))

    def structure(self, radius: int = 2) -> Image:
        """1 within ``radius`` voxels of a voxel whose central-difference gradient exceeds 1e-3 of the
        largest, else 0 (flat background): the strata of stratified sampling. Cached per radius.
        Levels above 2^18 voxels use every other voxel (any strata keep the estimate unbiased)."""
        cache = self.structure_cache
        if radius not in cache:
            data, grid = self.image.data, self.image.grid
            step = 2 if data.numel() > 1 << 18 else 1  # large levels: every other voxel (8x fewer), radius / 2
            if step > 1:
                data = data[(slice(None, None, step),) * data.dim()]
                grid = Grid(tuple(data.shape[::-1]), tuple(s * step for s in grid.spacing), grid.origin, grid.direction)
            g2 = (gradient(data.to(F64), grid) ** 2).sum(0)  # |grad|^2 (vector_norm over dim 0: 8x slower)
            r = max(1, round(radius / step))
            cache[radius] = Image(dilate(g2 > 1e-6 * float(g2.max()), r).float(), grid)
        return cache[radius]

    def values(self, points: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """At moving-space points (N, d): the linearly interpolated intensity (N,), its world
        gradient (N, d; exact or interpolated, see the class), a weight in [0, 1] (N,) and the weight's world gradient (N, d).

        The weight falls from 1 to 0 over the outermost voxel of the moving image's domain, so a
        point leaving the domain fades out instead of dropping out: the metric stays continuous in
        the parameters (a hard in/out mask made every Levenberg-Marquardt trial step look worse near
        the optimum when the overlap cut through the image, as for ITK's 13 x 17 px pair). The mask,
        sampled nearest-neighbour, multiplies the weight (piecewise constant: no gradient)."""
        g = self.image.grid
        idx = g.world_to_index(points.to(F64))
        if self.channels is not None:
            out = sample_index(self.channels, g, idx)
            value, grad = out[:, 0].to(F64), out[:, 1:].to(F64)
        else:
            value, grad = sample_linear_with_gradient(self.padded, g, idx, padded=True)
        top = torch.tensor(g.size, dtype=F64) - 1
        dist = torch.minimum(idx, top - idx)  # (N, d) index distance to the nearest domain face per axis
        near, axis = dist.min(dim=1)
        weight = near.clamp(0.0, 1.0)
        fading = (near > 0) & (near < 1)
        dw_index = torch.zeros_like(idx)  # d weight / d index: +-1 along the nearest face's axis
        side = torch.where(idx.gather(1, axis[:, None])[:, 0] <= top[axis] / 2, 1.0, -1.0).to(F64)
        dw_index.scatter_(1, axis[:, None], (side * fading)[:, None])
        dw = (dw_index / torch.tensor(g.spacing, dtype=F64)) @ g.direction_matrix(F64).T
        if self.mask is not None:
            mv, _ = sample(self.mask.data.to(torch.float32), self.mask.grid, points.to(torch.float32), mode="nearest")
            keep = (mv > 0).to(F64)
            weight, dw = weight * keep, dw * keep[:, None]
        return value, grad, weight, dw


class ParamModel:
    """Splits W into a fixed outer linear part L and an optimised inner part linear in D."""

    def __init__(self, transform: Transform) -> None:
        self.transform = transform
        parts = list(transform.transforms) if isinstance(transform, CompositeTransform) else [transform]
        self.inner = parts[-1]
        outer = parts[:-1]
        if not all(isinstance(t, LinearTransform) for t in outer):
            raise ValueError("Gauss-Newton needs the transforms applied after the optimised one to be linear")
        d = transform.ndim
        lin = torch.eye(d, dtype=F64)
        for t in outer:
            lin = lin @ t.matrix_translation()[0].detach()
        self.outer_linear = lin  # dW/dy of the outer part
        self._basis_cache: tuple | None = None
        if isinstance(self.inner, LinearTransform):
            self.kind = "linear"
        elif isinstance(self.inner, GridSplineTransform):
            self.kind = "spline"
        else:
            raise ValueError(f"Gauss-Newton does not support {type(self.inner).__name__}; use lbfgs/adam")

    @property
    def ndim(self) -> int:
        return self.transform.ndim

    def basis(self, grid: Grid, points: Tensor, index: Tensor | None) -> Basis:
        if self.kind == "linear":
            return DenseBasis(self.inner.basis(points))
        cached = self._basis_cache  # a spline's basis depends on the level's points only
        if cached is not None and cached[0] is grid and _same_points(cached[1], index):
            return cached[2]
        full = self.inner.basis_grid(grid)
        basis = full if index is None else full.rows(index)
        self._basis_cache = (grid, index, basis)
        return basis

    def map_points(self, grid: Grid, points: Tensor, index: Tensor | None) -> Tensor:
        """W(x) at the level's points (float64). Splines reuse the level's cached basis (building a
        sparse basis for a 3D sample at every evaluation dominated sampled B-spline runs)."""
        if self.kind != "spline":
            return self.transform(points)
        y = points + self.basis(grid, points, index).apply(self.inner.coefficients.detach().to(F64))
        outer = list(self.transform.transforms)[:-1] if isinstance(self.transform, CompositeTransform) else []
        for t in reversed(outer):
            y = t(y)
        return y

    def chain(self) -> Tensor | None:
        """d vec(D) / d theta, or None for identity (splines)."""
        if self.kind == "spline":
            return None
        jm = self.inner.dense_jacobian()  # (d*(d+1), n) rows in M (d x P) order
        d = self.ndim
        p = d + 1
        perm = torch.arange(d * p).reshape(d, p).T.reshape(-1)  # D (P x d) order
        return jm[perm]

    def update(self, delta_theta: Tensor) -> None:
        with torch.no_grad():
            th = self.inner.theta
            th.add_(delta_theta.reshape(th.shape).to(th.dtype))


@dataclass
class Evaluation:
    value: float
    grad: Tensor  # (n_theta,)
    hess: Tensor | None  # (n, n) dense, or None if matvec is used
    hess_matvec: object = None
    hess_diag: Tensor | None = None
    num_points: int = 0
    basis: Basis | None = None
    g_outer: Tensor | None = None  # (N, d) L^T grad I at points, for step sizes
    ssd_state: tuple | None = None  # SSD: (index, m I_w, m, sum m I_w^2, data value) for the next increment


DENSE_HESSIAN_MAX = 4096  # parameters above which Gauss-Newton Hessians stay matrix-free


def seam_shape(metric: str, ndim: int, bins: int) -> tuple[int, int]:
    """(a, b): columns of party 1's U and of party 2's features V in one seam call.

    SSD: U = [m grad I_w (d), m I_w, m], V = [J, J^2]. MI: U = [m A (bins), d(m A)/dW (bins x d)],
    V = the one-hot fixed bin (bins)."""
    if metric == "ssd":
        return ndim + 2, 2
    if metric == "mi":
        return bins + bins * ndim, bins
    raise ValueError(f"metric {metric!r} does not use the seam")


def seam_need(metric: str, ndim: int, bins: int) -> Need:
    """The entries of a seam call the objective reads, which are all a secure backend opens.

    SSD: S^T J = sum Phi_j m g_k J (P x d) and the two cost sums sum m I_w J and sum m J^2.
    MI: the joint histogram sum m A_r [bin J = t] (bins x bins) and its derivative
    sum Phi_j d(m A_r)/dW_k [bin J = t] (P x d x bins x bins), PPIR eqs. (8)-(9)."""
    if metric == "ssd":
        d = ndim
        return Need(slice(0, d), slice(d, d + 2), cross_features=(0,), total_entries=((d, 0), (d + 1, 1)))
    if metric == "mi":
        return Need(slice(bins, None), slice(0, bins))
    raise ValueError(f"metric {metric!r} does not use the seam")


class JointObjective:
    """SSD or MI through the joint-product seam (the PPIR formulation)."""

    def __init__(self, metric: str, model: ParamModel, moving: MovingLevel, grid: Grid, backend: JointBackend,
                 bins: int = 32, reg_weight: float = 0.0, reg_kind: str = "bending") -> None:
        if metric not in ("ssd", "mi"):
            raise ValueError(f"joint objective supports ssd or mi, got {metric!r}")
        self.metric, self.model, self.moving, self.grid, self.backend = metric, model, moving, grid, backend
        self.bins = bins
        self.reg_weight, self.reg_kind = reg_weight, reg_kind
        self._all_points: Tensor | None = None  # the level grid's world points, made when first needed
        self._sample: tuple[Tensor, Tensor] | None = None  # (index, points[index]) of the last call
        self._point_weights: tuple[Tensor, Tensor] | None = None  # (index, weights): stratified samples
        self.spec = FeatureSpec(metric, bins)
        self._lam: float | None = None  # regulariser weight, fixed at a level's first evaluation
        self._kmat: Tensor | None = None  # dense regulariser matrix K, built at first use

    def start(self, level: int) -> None:
        self.backend.start_level(level, self.spec)
        self._lam = None
        self._kmat = None

    @property
    def points(self) -> Tensor:
        """World points (N, d) of every voxel of the level grid (C order)."""
        if self._all_points is None:
            self._all_points = self.grid.points(F64)
        return self._all_points

    def warped(self, index: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Points, I(W(x)), its gradient, the overlap weight m and m's gradient, the gradients taken
        with respect to the inner transform's output y (g' = L^T g, row form g L)."""
        if index is None:
            pts = self.points
        elif self._sample is not None and self._sample[0] is index:  # a fixed subset: made once
            pts = self._sample[1]
        else:  # only the sample's points (not the whole grid's: 25 MB at 2 mm)
            pts = self.points[index] if self._all_points is not None else self.grid.index_to_world(
                _unravel(index, self.grid.size))
            self._sample = (index, pts)
        with torch.no_grad():
            wpts = self.model.map_points(self.grid, pts, index)
        i_w, g, inside, dm = self.moving.values(wpts)
        lin = self.model.outer_linear
        if index is not None and self._point_weights is not None and self._point_weights[0] is index:
            w = self._point_weights[1]  # a stratified sample's weights scale each point's share of m
            inside, dm = inside * w, dm * w[:, None]
        return pts, i_w, g @ lin, inside, dm @ lin

    def set_point_weights(self, index: Tensor, weights: Tensor) -> None:
        """Weights (N,) for the sample ``index`` (the same tensor object is passed to evaluate)."""
        self._point_weights = (index, weights.to(F64))

    def informative_points(self, radius: int = 2) -> Tensor:
        """Bool (grid.numel,): points that the current transform maps within ``radius`` moving voxels
        of moving-image structure (:meth:`MovingLevel.structure`); the rest lie in flat background."""
        with torch.no_grad():
            warped = resample(self.moving.structure(radius), self.grid, self.model.transform, mode="nearest")
        return warped.data.reshape(-1) > 0

    def gradient_magnitude(self) -> Tensor:
        """|grad I(W(x))| on the full level grid, party 1's GMS weights."""
        _, _, g, inside, _ = self.warped(None)
        return torch.linalg.norm(g, dim=1) * inside

    def evaluate(self, index: Tensor | None, reference: Evaluation | None = None,
                 hessian: bool = True) -> Evaluation:
        """Value, gradient and Gauss-Newton Hessian at the current theta on the points ``index``.

        ``hessian=False``: the caller only reads value and gradient (MI's quasi-Newton trial steps);
        a backend whose contraction is cheap then skips the full cross product (``hess`` is None).

        ``reference``: an earlier evaluation on the same points (the last accepted iterate). SSD then
        gets its value as reference value + increment, the increment's joint terms being products
        of the *changes* m I_w - m' I_w' and m - m' with J: the cost sum I^2 - 2 I J + J^2 cancels, so
        a backend's relative error (fixed point, CKKS) would otherwise swamp the small differences
        that Levenberg-Marquardt compares. Same number of columns, so the same traffic.
        """
        pts, i_w, g, inside, dm = self.warped(index)
        m = inside.to(F64)
        nvalid = float(m.sum())
        if nvalid < 16:
            from .errors import InputError

            raise InputError("the images do not overlap under the current transform (fewer than 16 points)")
        basis = self.model.basis(self.grid, pts, index)
        d = self.model.ndim
        if self.metric == "ssd":
            ref = reference.ssd_state if reference is not None else None
            if ref is not None and not _same_points(ref[0], index):
                ref = None
            ev = self._ssd(i_w, g, m, float(m.numel()), basis, d, index, ref)  # fixed n: no jump when a point leaves
        else:
            ev = self._mi(i_w, g, m, dm, nvalid, basis, d, index, hessian)
        ev.num_points, ev.basis, ev.g_outer = int(nvalid), basis, g * m[:, None]
        self._add_regularizer(ev)
        return self._chain(ev)

    # ------------------------------------------------------------------ SSD
    def _ssd(self, i_w, g, m, n, basis: Basis, d: int, index: Tensor | None, ref: tuple | None) -> Evaluation:
        mi = m * i_w
        sum_ii = float((mi * i_w).sum())
        if ref is None:  # absolute: sum m I^2 - 2 sum m I J + sum m J^2
            cols = [mi, m]
        else:  # increment from the reference: the same sums over the changes
            cols = [mi - ref[1], m - ref[2]]
        u = torch.cat([g * m[:, None], cols[0][:, None], cols[1][:, None]], 1)
        res = self.backend.cross(u, basis, index, seam_need("ssd", d, 0))
        r = res.cross[:, :d, 0]  # S^T J  (P, d)
        sum_ij = float(res.total[d, 0])
        sum_jj = float(res.total[d + 1, 1])
        if ref is None:
            value = (sum_ii - 2 * sum_ij + sum_jj) / n
        else:
            value = ref[4] + (sum_ii - ref[3] - 2 * sum_ij + sum_jj) / n
        state = (index, mi, m, sum_ii, value)
        local = basis.adjoint(g * (m * i_w)[:, None])  # sum Phi m g I_w
        grad = (2.0 / n) * (local - r).reshape(-1)
        # Gauss-Newton: sum m g g^T, so each point's row carries sqrt(m) (m holds the overlap weight
        # and a stratified sample's weight; m g here made the weighted Hessian w times too small)
        gm = g * m.clamp(min=0).sqrt()[:, None]
        if isinstance(basis, DenseBasis):
            s = (basis.matrix[:, :, None] * gm[:, None, :]).reshape(gm.shape[0], -1)
            hess = (2.0 / n) * (s.T @ s)
            return Evaluation(value, grad, hess, ssd_state=state)

        def matvec(v: Tensor) -> Tensor:
            disp = basis.apply(v.reshape(-1, d))  # (N, d)
            s_v = torch.einsum("nd,nd->n", gm, disp)[:, None]  # (4x faster than .sum(1) over d = 3)
            return (2.0 / n) * basis.adjoint(gm * s_v).reshape(-1)

        diag = (2.0 / n) * basis.adjoint_squared(gm * gm).reshape(-1)
        return Evaluation(value, grad, None, matvec, diag, ssd_state=state)

    # ------------------------------------------------------------------- MI
    def _mi(self, i_w, g, m, dm, n, basis: Basis, d: int, index: Tensor | None, hessian: bool = True) -> Evaluation:
        """Mattes MI, p = (m A)^T B / n with n = sum m (PPIR eq. 8), and its exact derivative: the
        seam's C holds d(m A)/dW = m dA/dI grad I + A grad m (eq. 9 plus the overlap weight's
        change), and dn/dtheta = sum Phi grad m is party 1's own."""
        nb = self.bins
        idx, wa, dwa, _ = parzen_moving_live(i_w, self.moving.vmin, self.moving.vmax, nb)  # A's 4 live bins
        a = BlockRows(idx, (wa * m[:, None])[:, :, None], nb)  # m A  (N, nb)
        dma = (dwa * m[:, None])[:, :, None] * g[:, None, :] + wa[:, :, None] * dm[:, None, :]
        c = BlockRows(idx, dma, nb)  # d(m A(x, r))/dW_k  (N, nb * d)
        pnum = basis.num_basis
        dn = basis.adjoint(dm).reshape(pnum, d)  # d n / dD
        gradient_only = not hessian and self.backend.contraction_is_cheap
        if gradient_only:  # the joint pdf first, then the cross product contracted with its log term
            res = self.backend.cross(Columns((a,)), basis, index, Need(slice(0, 0), slice(0, nb)))
        else:
            res = self.backend.cross(Columns((a, c)), basis, index, seam_need("mi", d, nb))
        p = res.total[:nb] / n  # joint pdf (nb, nbt), PPIR eq. (8)
        pr = p.sum(1, keepdim=True)
        pt = p.sum(0, keepdim=True)
        nz = p > 1e-12
        # dMI = sum dp log(p / (pr pt)): the fixed marginal pt moves too when points fade in or out
        logterm = torch.where(nz, torch.log(p.clamp(min=1e-12) / (pr * pt).clamp(min=1e-24)), torch.zeros_like(p))
        mi = float((p * torch.log((p / (pr * pt).clamp(min=1e-20)).clamp(min=1e-20)) * nz).sum())
        if gradient_only:  # grad = -(1/n) (sum_{r,t} cross[:, (r, k), t] L[r, t] - dn sum p L)
            weights = logterm.repeat_interleave(d, dim=0)  # column (r, k) of C -> L[r, :]
            groups = torch.arange(d).repeat(nb)  # ... summed per direction k
            out = self.backend.cross_contracted(Columns((c,)), basis, index, weights, groups, d)
            grad = -(out - dn * float((p * logterm).sum())).reshape(-1) / n
            return Evaluation(-mi, grad, None)
        dp = res.cross[:, nb:, :].reshape(pnum, nb, d, -1).permute(0, 2, 1, 3) / n  # eq. (9) (P, d, nb, nbt)
        dp = (dp - dn[:, :, None, None] * p[None, None] / n).reshape(pnum * d, -1)
        grad = -(dp @ logterm.reshape(-1))
        w = torch.where(nz, 1.0 / p.clamp(min=1e-12) - 1.0 / pr.clamp(min=1e-12), torch.zeros_like(p)).reshape(-1)
        if dp.shape[0] <= DENSE_HESSIAN_MAX:
            return Evaluation(-mi, grad, (dp * w[None]) @ dp.T)
        live = w > 0  # Dowson-Bowden Hessian dp diag(w) dp^T, matrix-free (B-splines: P d ~ 10^4-10^5)
        dpl, wl = dp[:, live], w[live]
        return Evaluation(-mi, grad, None, lambda v: dpl @ (wl * (dpl.T @ v)), (dpl * dpl) @ wl)

    # ------------------------------------------------------- regularisation
    def _add_regularizer(self, ev: Evaluation) -> None:
        """Add ``reg_weight`` x the control-grid penalty 1/2 c^T K c, scaled to the data term.

        The weight is relative: lambda = reg_weight x mean(diag H_data) / diag(K), fixed at the
        first evaluation of a level, so the same ``reg_weight`` means the same balance whatever the
        intensity scale, image size or grid spacing. H_data is party 1's own Gauss-Newton Hessian
        (moving-image gradients only), so choosing lambda reveals nothing about the fixed image.
        """
        if self.reg_weight <= 0 or self.model.kind != "spline":
            return
        shape = self.model.inner.ctrl.shape
        coef = self.model.inner.coefficients.detach().to(F64)
        d = coef.shape[1]
        kdiag = 2.0 * len(shape) if self.reg_kind == "diffusion" else (2.0 * len(shape)) ** 2
        if self._lam is None:
            hdiag = torch.diagonal(ev.hess) if ev.hess is not None else ev.hess_diag
            self._lam = self.reg_weight * max(float(hdiag.to(F64).mean()), 1e-30) / kdiag
        lam = self._lam
        kc = control_grid_operator(coef, shape, self.reg_kind)
        ev.value += 0.5 * lam * float((coef * kc).sum())
        ev.grad = ev.grad + lam * kc.reshape(-1)
        if ev.hess is not None:
            if self._kmat is None:  # K as a dense matrix, once per level (it does not depend on c)
                eye = torch.eye(coef.numel(), dtype=F64)
                self._kmat = torch.stack([control_grid_operator(e.reshape(-1, d), shape, self.reg_kind).reshape(-1)
                                          for e in eye])
            ev.hess = ev.hess + lam * self._kmat
        elif ev.hess_matvec is not None:  # (a gradient-only evaluation has neither)
            base = ev.hess_matvec
            ev.hess_matvec = lambda v: base(v) + lam * control_grid_operator(v.reshape(-1, d), shape, self.reg_kind).reshape(-1)
            ev.hess_diag = ev.hess_diag + lam * kdiag

    def _chain(self, ev: Evaluation) -> Evaluation:
        jac = self.model.chain()
        if jac is None:
            return ev
        ev.grad = jac.T @ ev.grad
        if ev.hess is not None:
            ev.hess = jac.T @ ev.hess @ jac
        return ev



def _unravel(index: Tensor, size: tuple[int, ...]) -> Tensor:
    """C-order flat voxel indices (N,) -> continuous (x, y[, z]) indices (N, d), float64."""
    cols, rem = [], index
    for n in size:  # x varies fastest
        cols.append(rem % n)
        rem = rem // n
    return torch.stack(cols, 1).to(F64)


def _same_points(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))


class AutogradObjective:
    """Any metric, differentiated by autograd (clear only: needs both images in one process)."""

    def __init__(self, metric: str, transform: Transform, moving: MovingLevel, fixed: Image,
                 fixed_mask: Tensor | None, bins: int = 32, reg_weight: float = 0.0, reg_kind: str = "bending",
                 lncc_radius: int = 4) -> None:
        self.metric, self.transform, self.moving, self.fixed = metric, transform, moving, fixed
        self.fixed_mask = fixed_mask
        self.bins, self.reg_weight, self.reg_kind, self.lncc_radius = bins, reg_weight, reg_kind, lncc_radius
        self.points = fixed.grid.points()
        self.fvals = fixed.data.reshape(-1)
        self.franges = (float(self.fvals.min()), float(self.fvals.max()))

    def warp(self, index: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Warped moving values (N,), fixed values (N,) and the points that take part (N,) bool."""
        if index is None:
            wpts = self.transform.transform_grid(self.fixed.grid).to(torch.float32)
        else:
            wpts = self.transform(self.points[index].to(F64)).to(torch.float32)
        vals, inside = sample(self.moving.image.data, self.moving.image.grid, wpts)
        if self.moving.mask is not None:
            mv, _ = sample(self.moving.mask.data.float(), self.moving.mask.grid, wpts.detach(), mode="nearest")
            inside = inside & (mv > 0)
        fv = self.fvals if index is None else self.fvals[index]
        mask = inside if self.fixed_mask is None else inside & (self.fixed_mask.reshape(-1) if index is None else self.fixed_mask.reshape(-1)[index])
        if mask.sum() < 16:
            from .errors import InputError

            raise InputError("the images do not overlap under the current transform (fewer than 16 points)")
        return vals, fv, mask

    def metric_value(self, vals: Tensor, fv: Tensor, mask: Tensor, full: bool = True) -> Tensor:
        """The metric (lower is better) of warped values against fixed values at the masked points;
        spatial metrics (LNCC, MIND) need ``full`` (values of the whole fixed grid, C order)."""
        m = self.metric
        if m == "ssd":
            return ssd_loss(vals, fv, mask)
        if m == "ncc":
            return ncc_loss(vals, fv, mask)
        if m == "mi":
            return mi_loss(vals, fv, mask, self.bins, (self.moving.vmin, self.moving.vmax) + self.franges)
        if m in ("lncc", "mind"):
            if not full:
                raise ValueError(f"{m} needs full sampling")
            shape = self.fixed.grid.shape
            a, b, mk = vals.reshape(shape), fv.reshape(shape), mask.reshape(shape)
            return lncc_loss(a, b, mk, self.lncc_radius) if m == "lncc" else mind_loss(a, b, mk)
        raise ValueError(f"unknown metric {m!r}")

    def loss(self, index: Tensor | None) -> Tensor:
        vals, fv, mask = self.warp(index)
        loss = self.metric_value(vals, fv, mask, index is None)
        if self.reg_weight > 0 and not isinstance(self.transform.transforms[-1] if isinstance(self.transform, CompositeTransform) else self.transform, LinearTransform):
            loss = loss + self.reg_weight * self.regularizer()
        return loss

    def regularizer(self) -> Tensor:
        inner = self.transform.transforms[-1] if isinstance(self.transform, CompositeTransform) else self.transform
        from .transforms import StationaryVelocityTransform

        if isinstance(inner, StationaryVelocityTransform):
            g = inner.field_grid
            u = field_image(inner.velocity, g)
        elif isinstance(inner, GridSplineTransform):
            g = inner.ctrl if inner.order == 1 else self.fixed.grid
            disp = inner.basis_grid(g).apply(inner.coefficients) if inner.order == 3 else inner.coefficients
            u = field_image(disp, g).to(torch.float32)
        else:
            return torch.zeros(())
        return REGULARIZERS[self.reg_kind](u, g.spacing, g.direction_matrix())
