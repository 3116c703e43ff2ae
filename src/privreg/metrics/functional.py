"""Stateless image dissimilarity functions (lower is better), deepali/MONAI style.

All take warped moving values ``a`` and fixed values ``b``; flat metrics accept (N,) tensors,
spatial metrics (LNCC, MIND) take image-shaped tensors (*grid.shape). ``mask`` (bool) selects
points that take part (inside the moving image's domain and the user masks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


EPS = 1e-10


def _masked(a: Tensor, b: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    if mask is None:
        return a.reshape(-1), b.reshape(-1)
    m = mask.reshape(-1)
    return a.reshape(-1)[m], b.reshape(-1)[m]


def ssd_loss(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared difference, range [0, inf)."""
    a, b = _masked(a, b, mask)
    return ((a - b) ** 2).mean()


def ncc_loss(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """Negative global normalised cross-correlation, range [-1, 1]."""
    a, b = _masked(a, b, mask)
    a, b = a - a.mean(), b - b.mean()
    return -(a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum() + EPS)


def _box(x: Tensor, radius: int) -> Tensor:
    """Mean over a (2r+1)^d box around each voxel, replicate borders (by cumulative sums: O(N)
    per axis whatever the radius, and cheap to differentiate)."""
    k = 2 * radius + 1
    for dim in range(x.dim()):
        n = x.shape[dim]
        lo = x.narrow(dim, 0, 1).expand(*[radius + 1 if i == dim else s for i, s in enumerate(x.shape)])
        hi = x.narrow(dim, n - 1, 1).expand(*[radius if i == dim else s for i, s in enumerate(x.shape)])
        c = torch.cat([lo, x, hi], dim).cumsum(dim)
        x = (c.narrow(dim, k, n) - c.narrow(dim, 0, n)) / k
    return x


def lncc_loss(a: Tensor, b: Tensor, mask: Tensor | None = None, radius: int = 4) -> Tensor:
    """Negative local (windowed) NCC^2 averaged over the mask, range [-1, 0] (ANTs' CC)."""
    ma, mb = _box(a, radius), _box(b, radius)
    va = _box(a * a, radius) - ma * ma
    vb = _box(b * b, radius) - mb * mb
    cov = _box(a * b, radius) - ma * mb
    cc = cov * cov / (va * vb + 1e-5)
    if mask is not None:
        return -cc[mask].mean()
    return -cc.mean()


# ----------------------------------------------------------- mutual information
def parzen_moving_live(values: Tensor, vmin: float, vmax: float, bins: int) -> tuple[Tensor, Tensor, Tensor, float]:
    """The cubic B-spline Parzen window of moving values on its 4 live bins.

    Intensities map to [2, bins - 3] (Mattes/ITK padding) so the cubic kernel stays inside.
    Returns (bin index (N, 4), weight (N, 4), d weight / d value (N, 4), bin width); bins that fall
    outside [0, bins) get weight 0 and a clamped index.
    """
    width = (vmax - vmin) / (bins - 5) if vmax > vmin else 1.0
    pos = (values - vmin) / width + 2.0
    base = pos.detach().floor()
    r = base.long()[:, None] - 1 + torch.arange(4)  # (N, 4)
    # beta_3(r - pos) at the taps r = floor(pos) - 1 .. + 2 in closed form in f = pos - floor(pos)
    # (3x faster than evaluating the piecewise kernel at the four distances); g = 1 - f
    f = (pos - base)[:, None]
    g = 1.0 - f
    f2, g2 = f * f, g * g
    w = torch.cat([g2 * g / 6, (4 - 6 * f2 + 3 * f2 * f) / 6, (4 - 6 * g2 + 3 * g2 * g) / 6, f2 * f / 6], 1)
    dw = torch.cat([-0.5 * g2, 1.5 * f2 - 2 * f, 2 * g - 1.5 * g2, 0.5 * f2], 1)  # d w / d f
    inside = ((r >= 0) & (r < bins)).to(values.dtype)
    return r.clamp(0, bins - 1), w * inside, dw * inside * (1.0 / width), width


def parzen_moving(values: Tensor, vmin: float, vmax: float, bins: int) -> tuple[Tensor, Tensor, float]:
    """Cubic B-spline Parzen weights A (N, bins) of moving values and dA/dvalue (dense form of
    :func:`parzen_moving_live`). Returns (A, dA/dI, bin width)."""
    idx, w, dw, width = parzen_moving_live(values, vmin, vmax, bins)
    zeros = torch.zeros(values.shape[0], bins, dtype=values.dtype)
    return zeros.scatter_add(1, idx, w), zeros.scatter_add(1, idx, dw), width


def parzen_fixed_bins(values: Tensor, vmin: float, vmax: float, bins: int) -> Tensor:
    """Zero-order Parzen window of fixed values: the bin index of each value (N,)."""
    width = (vmax - vmin) / bins if vmax > vmin else 1.0
    return torch.clamp(((values - vmin) / width).floor().long(), 0, bins - 1)


def parzen_fixed(values: Tensor, vmin: float, vmax: float, bins: int) -> Tensor:
    """Zero-order (one-hot) Parzen weights B (N, bins) of fixed values."""
    return F.one_hot(parzen_fixed_bins(values, vmin, vmax, bins), bins).to(values.dtype)


def mi_from_joint(p: Tensor) -> Tensor:
    """Mutual information of a normalised joint histogram p (r = moving rows, t = fixed cols)."""
    pr = p.sum(1, keepdim=True)
    pt = p.sum(0, keepdim=True)
    ratio = p / (pr * pt + EPS)
    return (p * torch.log(ratio + EPS) * (p > 0)).sum()


def mi_loss(a: Tensor, b: Tensor, mask: Tensor | None = None, bins: int = 32,
            ranges: tuple[float, float, float, float] | None = None) -> Tensor:
    """Negative Mattes mutual information, P = A^T B / N (PPIR eq. 8); range [-log(bins), 0].

    ``ranges`` = (moving min, moving max, fixed min, fixed max); defaults to the data's own.
    """
    a, b = _masked(a, b, mask)
    if ranges is None:
        ranges = (float(a.min()), float(a.max()), float(b.min()), float(b.max()))
    wa, _, _ = parzen_moving(a, ranges[0], ranges[1], bins)
    tb = parzen_fixed_bins(b, ranges[2], ranges[3], bins)  # B one-hot: A^T B sums A's rows per fixed bin
    p = torch.zeros(bins, bins, dtype=wa.dtype).index_add(0, tb, wa).T / a.numel()
    return -mi_from_joint(p)


# --------------------------------------------------------------------- MIND
def _shift(x: Tensor, offset: tuple[int, ...]) -> Tensor:
    """y[i] = x[i + offset] (tensor-axis order), replicate padding at the borders."""
    r = max(abs(o) for o in offset)
    xp = F.pad(x[None, None], [r] * (2 * x.dim()), mode="replicate")[0, 0]
    return xp[tuple(slice(r + o, r + o + n) for o, n in zip(offset, x.shape))]


def mind_ssc(img: Tensor, radius: int = 1, dilation: int = 2) -> Tensor:
    """MIND-SSC descriptor (Heinrich et al. 2013): (C, *shape), self-similarity context.

    Uses the six-neighbourhood pair differences (3D) or four (2D) with Gaussian-like box patches.
    """
    d = img.dim()
    if d == 3:
        six = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
        pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)
                 if sum(abs(a - b) for a, b in zip(six[i], six[j])) == 2]
    else:
        six = [(1, 0), (-1, 0), (0, 1), (0, -1)]
        pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)
                 if sum(abs(a - b) for a, b in zip(six[i], six[j])) == 2]
    feats = []
    for i, j in pairs:
        oi = tuple(dilation * v for v in six[i])
        oj = tuple(dilation * v for v in six[j])
        diff = (_shift(img, oi) - _shift(img, oj)) ** 2
        feats.append(_box(diff, radius))
    ssd = torch.stack(feats)
    ssd = ssd - ssd.min(0, keepdim=True).values
    var = ssd.mean(0, keepdim=True)
    lo, hi = var.mean() * 1e-3, var.mean() * 1e3
    var = torch.clamp(var, float(lo), float(hi)) + 1e-8
    return torch.exp(-ssd / var)


def mind_loss(a: Tensor, b: Tensor, mask: Tensor | None = None, radius: int = 1, dilation: int = 2) -> Tensor:
    """Mean squared difference of MIND-SSC descriptors, range [0, 1]."""
    diff = ((mind_ssc(a, radius, dilation) - mind_ssc(b, radius, dilation)) ** 2).mean(0)
    return diff[mask].mean() if mask is not None else diff.mean()
