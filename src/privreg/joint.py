"""The joint-product seam: the only computations that mix the two parties' images.

Party 1 (moving image I, parameters theta) holds a matrix U (N x a) per iteration; party 2
(fixed image J) holds a feature matrix V (N x b) computed once per pyramid level from J.
With a public basis Phi (N x P: [x - c, 1] for linear transforms, B-spline weights for FFDs)
the seam returns

    cross[j, a, b] = sum_i Phi[i, j] U[i, a] V[i, b]       (P x a x b)
    total[a, b]    = sum_i U[i, a] V[i, b]                 (a x b)

to party 1. Every quantity of the PPIR paper is of this form:

* SSD (sec. 2.1): V = [J, J^2], U = [m*grad I(W), m*I(W), m]:  S^T J = cross[:, :d, 0],
  sum I(W) J = total[d, 0], sum J^2 = total[d + 1, 1].
* MI (sec. 2.2): V = B (one-hot fixed bins), U = [m*A, m*C]:  P = A^T B / N = total[:nb] / N,
  dP/dtheta = C^T B / N (eq. 9) = cross[:, nb:, :] / N.

U may be given as :class:`Columns`, side-by-side parts some of which are :class:`BlockRows` (MI's
Parzen windows have 4 live bins per row). The clear backend then takes the products on the live
entries only (no N x a dense U); other backends call :func:`dense_columns` first.

Backends: :class:`ClearBackend` here; MPC and CKKS backends implement the same two methods
(``start_level`` and ``cross``) with party 2 in another process. Nothing else in the
registration loop knows which backend runs.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .basis import Basis, DenseBasis, SparseBasis
from .grid import Grid
from .image import (Image, apply_along_axes, convolution_matrix, gaussian_kernel1d, normalize_intensity,
                    resample, smooth)
from .metrics.functional import parzen_fixed_bins


@dataclass(frozen=True)
class PyramidLevel:
    """One resolution level: grid shrink factor and Gaussian smoothing sigma (mm)."""

    factor: float
    sigma_mm: float
    max_iter: int = 100


@dataclass(frozen=True)
class FeatureSpec:
    """What party 2 computes from its image at a level: ``"ssd"`` -> [J, J^2]; ``"mi"`` -> one-hot bins."""

    kind: str
    bins: int = 32


def level_image(image: Image, grid: Grid, level: PyramidLevel) -> Image:
    """Smooth ``image`` with the level's sigma and resample it on the level grid."""
    fused = separable_level_image(image, grid, level.sigma_mm)
    if fused is not None:
        return fused
    data = smooth(image.data, image.grid, level.sigma_mm) if level.sigma_mm > 0 else image.data
    sm = Image(data, image.grid)
    return sm if grid.same_as(image.grid) else resample(sm, grid)


def separable_level_image(image: Image, grid: Grid, sigma_mm: float) -> Image | None:
    """Smoothing and linear resampling as one banded (n_out, n_in) product per axis, when the level
    grid's voxel centres map to the image's along the image axes (a pyramid level of the same
    grid): trilinear interpolation of the smoothed image is then the tensor product of 1D
    interpolations, and each axis shrinks as it is smoothed (2 mm brain, factor 2: 3x faster than
    smoothing then ``grid_sample``). None when the grids are oblique to each other or the level
    reaches outside the image."""
    d = grid.ndim
    m = image.grid.world_to_index_matrix() @ grid.index_to_world_matrix()  # level index -> image index
    lin = m[:d, :d]
    if grid.same_as(image.grid) or float((lin - torch.diag(torch.diagonal(lin))).abs().max()) > 1e-9:
        return None
    dtype = torch.float64 if image.data.dtype == torch.float64 else torch.float32
    mats = []
    for axis in range(d):
        n_in, n_out = image.grid.size[axis], grid.size[axis]
        pos = float(lin[axis, axis]) * torch.arange(n_out, dtype=torch.float64) + float(m[axis, d])
        if float(pos.min()) < -1e-6 or float(pos.max()) > n_in - 1 + 1e-6:
            return None
        pos = pos.clamp(0, n_in - 1)
        lo = pos.floor().long().clamp(max=max(n_in - 2, 0))
        frac = pos - lo
        interp = torch.zeros(n_out, n_in, dtype=torch.float64)
        rows = torch.arange(n_out)
        interp[rows, lo] += 1 - frac
        if n_in > 1:
            interp[rows, lo + 1] += frac
        s = sigma_mm / image.grid.spacing[axis]
        if s > 0.05 and n_in >= 2:
            interp = interp @ convolution_matrix(n_in, gaussian_kernel1d(s, torch.float64))
        mats.append(interp.to(dtype))
    return Image(apply_along_axes(image.data.to(dtype), mats), grid)


class FixedSide:
    """Party 2's local computations: the fixed image pyramid and its feature matrices V."""

    def __init__(self, fixed: Image, levels: list[PyramidLevel], normalize: bool = True) -> None:
        data = normalize_intensity(fixed.data) if normalize else fixed.data
        self.fixed = Image(data.to(torch.float64), fixed.grid)  # float64: reproducible in any process
        self.levels = levels

    def level_grid(self, level: int) -> Grid:
        return self.fixed.grid.downsample(self.levels[level].factor)

    def values(self, level: int) -> Tensor:
        """J at the level's points (N,)."""
        return level_image(self.fixed, self.level_grid(level), self.levels[level]).data.reshape(-1).to(torch.float64)

    def fixed_bins(self, level: int, bins: int) -> Tensor:
        """MI's zero-order Parzen bin of each point (N,): the index of the one in V's row."""
        j = self.values(level)
        return parzen_fixed_bins(j, float(j.min()), float(j.max()), bins)

    def features(self, level: int, spec: FeatureSpec) -> Tensor:
        if spec.kind == "ssd":
            j = self.values(level)
            return torch.stack([j, j * j], dim=1)
        if spec.kind == "mi":
            return F.one_hot(self.fixed_bins(level, spec.bins), spec.bins).to(torch.float64)
        raise ValueError(f"unknown feature kind {spec.kind!r}")


@dataclass(frozen=True)
class BlockRows:
    """An (N, nblocks * width) matrix with K non-zero column blocks per row (block-major columns):
    M[i, idx[i, l] * width + q] = val[i, l, q]; repeated blocks in a row add up."""

    idx: Tensor  # (N, K) long, in [0, nblocks)
    val: Tensor  # (N, K, width)
    nblocks: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.val.shape[0], self.nblocks * self.val.shape[2])

    def dense(self) -> Tensor:
        n, _, w = self.val.shape
        out = torch.zeros(n, self.nblocks, w, dtype=self.val.dtype)
        out.scatter_add_(1, self.idx[:, :, None].expand(-1, -1, w), self.val)
        return out.reshape(n, -1)


@dataclass(frozen=True)
class Columns:
    """U as side-by-side parts (dense tensors or :class:`BlockRows`), all with the same rows."""

    parts: tuple

    @property
    def shape(self) -> tuple[int, int]:
        return (self.parts[0].shape[0], sum(int(p.shape[1]) for p in self.parts))

    def dense(self) -> Tensor:
        return torch.cat([p.dense() if isinstance(p, BlockRows) else p for p in self.parts], 1)


def dense_columns(u: "Tensor | Columns") -> Tensor:
    """U as one dense (N, a) tensor."""
    return u.dense() if isinstance(u, Columns) else u


@dataclass(frozen=True)
class Need:
    """Which entries the caller reads: ``cross[:, cross_cols, cross_features]`` and, of
    ``total[total_cols, :]``, the (column, feature) pairs ``total_entries`` (all when None).

    A backend may skip the rest (entries it skips are NaN); the clear backend computes all. The
    secure backends open only these entries: the plan party 2 enforces derives them the same way
    (:func:`privreg.objectives.seam_need`)."""

    cross_cols: slice = field(default_factory=lambda: slice(None))
    total_cols: slice = field(default_factory=lambda: slice(None))
    cross_features: tuple[int, ...] | None = None
    total_entries: tuple[tuple[int, int], ...] | None = None

    def masks(self, a: int, b: int) -> tuple[Tensor, Tensor]:
        """Boolean (a, b) masks of the cross (every basis function j alike) and total entries read."""
        cross = torch.zeros(a, b, dtype=torch.bool)
        rows = torch.zeros(a, dtype=torch.bool)
        rows[self.cross_cols] = True
        feats = torch.zeros(b, dtype=torch.bool)
        feats[list(self.cross_features) if self.cross_features is not None else slice(None)] = True
        cross[rows[:, None] & feats[None, :]] = True
        total = torch.zeros(a, b, dtype=torch.bool)
        if self.total_entries is None:
            total[self.total_cols] = True
        else:
            for col, feat in self.total_entries:
                total[col, feat] = True
        return cross, total

    def count(self, p: int, a: int, b: int) -> int:
        """Values a call opens with ``p`` basis functions: p x (cross entries) + total entries."""
        cross, total = self.masks(a, b)
        return p * int(cross.sum()) + int(total.sum())


ALL = Need()


@dataclass
class CrossResult:
    cross: Tensor  # (P, a, b)
    total: Tensor  # (a, b)


@dataclass
class BackendStats:
    """Per-run accounting; secure backends fill in bytes and rounds."""

    calls: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


class JointBackend(ABC):
    """Computes the joint products for party 1; party 2's data stays behind this interface."""

    stats: BackendStats

    @abstractmethod
    def start_level(self, level: int, spec: FeatureSpec) -> None:
        """Party 2 prepares V for pyramid ``level`` (done once per level)."""

    @abstractmethod
    def cross(self, u: "Tensor | Columns", basis: Basis, index: Tensor | None, need: Need = ALL) -> CrossResult:
        """Return sum_i Phi[i, j] U[i, a] V[index[i], b] and sum_i U[i, a] V[index[i], b] (at least
        the entries ``need`` names)."""

    #: True when :meth:`cross_contracted` costs less than :meth:`cross` (no full cross product)
    contraction_is_cheap: bool = False

    def cross_contracted(self, u: "Tensor | Columns", basis: Basis, index: Tensor | None, weights: Tensor,
                         groups: Tensor, ngroups: int) -> Tensor:
        """out[j, m] = sum_{a, b} cross[j, a, b] weights[a, b] [groups[a] = m], shape (P, ngroups).

        A gradient-only evaluation needs just this contraction of the cross product with weights
        party 1 derived from the same call's ``total`` (MI: log p / (p_r p_t)). Here: the full cross,
        then the contraction (what a secure backend has to do: same traffic as :meth:`cross`)."""
        res = self.cross(u, basis, index, Need(slice(None), slice(0, 0)))
        contracted = (res.cross * weights.to(res.cross.dtype)[None]).sum(-1)  # (P, a)
        return torch.zeros(contracted.shape[0], ngroups, dtype=contracted.dtype).index_add_(1, groups, contracted)

    def note_sample(self, level: int, iteration: int, index: Tensor | None) -> None:
        """Told which sample (level, draw iteration) the next ``cross`` uses; secure backends send
        this key instead of the indices (URS points follow from the public seed)."""

    def close(self) -> None:
        """Release resources (sockets, processes)."""


def cross_product(u: "Tensor | Columns", v: Tensor, basis: Basis, chunk: int = 16384,
                  v_bins: Tensor | None = None) -> CrossResult:
    """Plain-text evaluation of the seam's products (used by the clear backend and by tests).

    ``v_bins`` (N,) may be given when V is one-hot (MI's zero-order window): V[i] = e_{v_bins[i]};
    then :func:`onehot_product` is used (same result, no (N, a * b) outer product).
    """
    if v_bins is not None:
        return onehot_product(u, v_bins, v.shape[1], basis)
    u = dense_columns(u).to(torch.float64)
    v = v.to(torch.float64)
    a, b = u.shape[1], v.shape[1]
    total = u.T @ v
    if isinstance(basis, DenseBasis):
        phi = basis.matrix.to(torch.float64)
        p = phi.shape[1]
        out = torch.zeros(b, p * a, dtype=torch.float64)
        for s in range(0, u.shape[0], chunk):
            out += v[s:s + chunk].T @ (phi[s:s + chunk, :, None] * u[s:s + chunk, None, :]).reshape(-1, p * a)
        return CrossResult(out.T.reshape(p, a, b), total)
    uv = (u[:, :, None] * v[:, None, :]).reshape(u.shape[0], a * b)
    return CrossResult(basis.adjoint(uv).reshape(-1, a, b), total)


def onehot_product(u: "Tensor | Columns", bins: Tensor, nbins: int, basis: Basis, need: Need = ALL) -> CrossResult:
    """The seam's products when V is one-hot, V[i] = e_{bins[i]} (N,): sums per fixed bin.

    A :class:`BlockRows` part none of whose columns ``need.cross_cols`` names gets NaN cross entries
    (MI reads the cross product of the derivative part only)."""
    if isinstance(u, Columns):
        wanted = torch.zeros(u.shape[1], dtype=torch.bool)
        wanted[need.cross_cols] = True
        res, off = [], 0
        for p in u.parts:
            if isinstance(p, BlockRows):
                res.append(_block_onehot(p, basis, bins, nbins, bool(wanted[off:off + p.shape[1]].any())))
            else:
                res.append(onehot_product(p, bins, nbins, basis))
            off += p.shape[1]
        return CrossResult(torch.cat([r.cross for r in res], 1), torch.cat([r.total for r in res], 0))
    u = u.to(torch.float64)
    total = torch.zeros(nbins, u.shape[1], dtype=torch.float64).index_add_(0, bins, u).T
    return CrossResult(_onehot_cross(basis, u, bins, nbins), total)


def _block_onehot(part: BlockRows, basis: Basis, bins: Tensor, nbins: int, with_cross: bool = True,
                  budget: int = 1 << 24) -> CrossResult:
    """The seam's products for a :class:`BlockRows` part of U and a one-hot V (fixed bins ``bins``):
    each of a row's K live entries is added into its (block, fixed bin) cell, so the work is
    N x K x width (x basis weights per point), not N x nblocks x width."""
    val = part.val.to(torch.float64)
    n, k, w = val.shape
    cells = part.nblocks * nbins
    rows = part.idx * nbins + bins[:, None]  # (N, K) joint (block, fixed bin) cell
    # Parzen rows hold K consecutive blocks r0 .. r0 + K - 1: add each row's K entries at once into
    # cell (r0, t) and fold the K offsets afterwards (index_add_ of N wide rows, not N K narrow ones)
    run = k > 1 and bool((part.idx[:, 1:] - part.idx[:, :-1] == 1).all())
    r0cells = (part.nblocks - k + 1) * nbins

    def add_rows(vals: Tensor) -> Tensor:
        """vals (N, K, c) -> (nblocks, nbins, c): each entry summed into its (block, fixed bin)."""
        c = vals.shape[2]
        if not run:
            out = torch.zeros(cells, c, dtype=torch.float64).index_add_(0, rows.reshape(-1), vals.reshape(-1, c))
            return out.reshape(part.nblocks, nbins, c)
        wide = torch.zeros(r0cells, k * c, dtype=torch.float64).index_add_(0, rows[:, 0], vals.reshape(n, k * c))
        wide = wide.reshape(part.nblocks - k + 1, nbins, k, c)
        out = torch.zeros(part.nblocks, nbins, c, dtype=torch.float64)
        for off in range(k):
            out[off:off + part.nblocks - k + 1] += wide[:, :, off]
        return out

    total = add_rows(val).permute(0, 2, 1).reshape(-1, nbins)
    if not with_cross:
        return CrossResult(torch.full((basis.num_basis, part.nblocks * w, nbins), float("nan"), dtype=torch.float64), total)
    if isinstance(basis, DenseBasis):
        phi = basis.matrix.to(torch.float64)
        p = phi.shape[1]
        cross = add_rows(torch.einsum("nkw,np->nkpw", val, phi).reshape(n, k, p * w))  # 1.7x a broadcast mul
        cross = cross.reshape(part.nblocks, nbins, p, w).permute(2, 0, 3, 1)
    elif isinstance(basis, SparseBasis):  # cell (basis function j, block, fixed bin)
        kp = basis.index.shape[1]
        cross = torch.zeros(basis.num_basis * cells, w, dtype=torch.float64)
        chunk = max(1, budget // max(k * kp * w, 1))
        for s in range(0, n, chunk):
            idx = basis.index[s:s + chunk, None, :] * cells + rows[s:s + chunk, :, None]  # (n, K, Kp)
            contrib = basis.weight[s:s + chunk, None, :, None].to(torch.float64) * val[s:s + chunk, :, None, :]
            cross.index_add_(0, idx.reshape(-1), contrib.reshape(-1, w))
        cross = cross.reshape(basis.num_basis, part.nblocks, nbins, w).permute(0, 1, 3, 2)
    else:
        return CrossResult(_onehot_cross(basis, part.dense().to(torch.float64), bins, nbins), total)
    return CrossResult(cross.reshape(-1, part.nblocks * w, nbins), total)


def _onehot_cross(basis: Basis, u: Tensor, bins: Tensor, nbins: int, budget: int = 1 << 25) -> Tensor:
    """(P, a, nbins) with out[j, :, t] = sum_{i: bins_i = t} Phi[i, j] U[i, :]."""
    a = u.shape[1]
    if isinstance(basis, DenseBasis):  # one matrix product per bin, points sorted by bin
        order = torch.argsort(bins)
        phi, us = basis.matrix.to(u.dtype)[order], u[order]
        out = torch.zeros(phi.shape[1], a, nbins, dtype=u.dtype)
        start = 0
        for t, n in enumerate(torch.bincount(bins, minlength=nbins).tolist()):
            if n:
                out[:, :, t] = phi[start:start + n].T @ us[start:start + n]
            start += n
        return out
    if isinstance(basis, SparseBasis):  # scatter each point's K weights into rows j * nbins + bin
        out = torch.zeros(basis.num_basis * nbins, a, dtype=u.dtype)
        k = basis.index.shape[1]
        chunk = max(1, budget // max(k * a, 1))
        for s in range(0, u.shape[0], chunk):
            idx = basis.index[s:s + chunk] * nbins + bins[s:s + chunk, None]
            contrib = basis.weight[s:s + chunk].to(u.dtype)[..., None] * u[s:s + chunk, None, :]
            out.index_add_(0, idx.reshape(-1), contrib.reshape(-1, a))
        return out.reshape(basis.num_basis, nbins, a).permute(0, 2, 1)
    out = torch.zeros(basis.num_basis, a, nbins, dtype=u.dtype)  # e.g. a Kronecker basis on the full grid
    for t in range(nbins):
        sel = (bins == t).to(u.dtype)[:, None]
        if bool(sel.any()):
            out[:, :, t] = basis.adjoint(u * sel)
    return out


class ClearBackend(JointBackend):
    """Both images in one process (the CLEAR baseline)."""

    def __init__(self, fixed_side: FixedSide) -> None:
        self.fixed_side = fixed_side
        self.v: Tensor | None = None
        self.v_bins: Tensor | None = None
        self.spec: FeatureSpec | None = None
        self.stats = BackendStats()

    def start_level(self, level: int, spec: FeatureSpec) -> None:
        self.spec = spec
        if spec.kind == "mi":  # one-hot V kept as its bin indices
            self.v, self.v_bins = None, self.fixed_side.fixed_bins(level, spec.bins)
        else:
            self.v, self.v_bins = self.fixed_side.features(level, spec), None

    def cross(self, u: "Tensor | Columns", basis: Basis, index: Tensor | None, need: Need = ALL) -> CrossResult:
        if self.v is None and self.v_bins is None:
            raise RuntimeError("start_level must be called before cross")
        t0 = time.perf_counter()
        if self.v_bins is not None:
            res = onehot_product(u, self.v_bins if index is None else self.v_bins[index], self.spec.bins, basis, need)
        else:
            res = cross_product(u, self.v if index is None else self.v[index], basis)
        self.stats.calls += 1
        self.stats.seconds += time.perf_counter() - t0
        return res

    contraction_is_cheap = True

    def cross_contracted(self, u: "Tensor | Columns", basis: Basis, index: Tensor | None, weights: Tensor,
                         groups: Tensor, ngroups: int) -> Tensor:
        """One-hot V and block-sparse U: each point's live entries times the weight at its fixed bin,
        summed per group, then one adjoint of the basis: O(N K w) instead of the O(N K w P)
        cross product (3D MI affine, 53k points: MI evaluations 24 -> 16 ms)."""
        parts = u.parts if isinstance(u, Columns) else ()
        if self.v_bins is None or not parts or not all(isinstance(p, BlockRows) for p in parts):
            return super().cross_contracted(u, basis, index, weights, groups, ngroups)
        t0 = time.perf_counter()
        bins = self.v_bins if index is None else self.v_bins[index]
        flat = weights.to(torch.float64).reshape(-1)
        nb = weights.shape[1]
        g = None
        off = 0
        for part in parts:
            n, k, wd = part.val.shape
            cols = off + part.idx[:, :, None] * wd + torch.arange(wd)  # (N, K, w) dense column of each entry
            vals = part.val.to(torch.float64) * flat[cols * nb + bins[:, None, None]]
            gp = torch.zeros(n, ngroups, dtype=torch.float64).scatter_add_(1, groups[cols].reshape(n, -1),
                                                                           vals.reshape(n, -1))
            g = gp if g is None else g + gp
            off += part.shape[1]
        self.stats.calls += 1
        self.stats.seconds += time.perf_counter() - t0
        return basis.adjoint(g)
