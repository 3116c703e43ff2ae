"""The seam's product in Z_2^64: cross[j, a, b] = sum_i Phi[i, j] U[i, a] V[i, b] with Phi public,
U held by party 1 and V by party 2, plus the one-column extension that gives total[a, b].

Protocol (one dealer, semi-honest; ``Ra`` fresh per call, ``Rb`` fixed per pyramid level):

  level start   P2 -> P1 : Vh = enc(V) - Rb                    (once per level; Rb = PRG(k2, level))
  each call     P1 -> P2 : Uh = enc(U) - Ra                    (Ra = PRG(k1, call): fresh)
                D  -> P2 : t2 = T - t1,  T = sum Phi Ra Rb       (t1 = PRG(k1, call), dealer's triple)
                P2 -> P1 : z  = sum Phi Uh V + t2
                P1       : result = z + t1 + sum Phi Ra Vh       (= sum Phi U V, exactly, mod 2^64)

Since Vh, Uh and t2 are one-time padded by uniform ring elements, P2 sees only uniform values;
P1 sees Vh (uniform) and z, which is the output minus terms P1 computes itself. The fixed-point
scales are chosen so the true integer result fits in 63 bits, so opening and dividing by the
scale is exact.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..basis import Basis, DenseBasis, KroneckerBasis, SparseBasis
from .ring import I64, decode, encode

PHI_BITS = 13  # default relative precision of the public basis (see :func:`phi_bits`)
V_BITS = 11  # bits per limb of party 2's features (one-hot features are exact, 0 bits)
V_LIMBS = 3  # dense features (SSD: J, J^2) are split in limbs: V_LIMBS * V_BITS bits of relative precision
HEADROOM = 62  # results must stay below 2^62 in magnitude


LIMBS = 2  # Phi = sum_l Phi_l 2^(bits (LIMBS - 1 - l)): the public basis costs no traffic, so split it


def split_limbs(full: Tensor, bits: int, count: int) -> list[Tensor]:
    """full = sum_l limb_l 2^(bits (count - 1 - l)), most significant limb first; the low limbs are
    non-negative remainders below 2^bits, the top limb carries the sign."""
    limbs = []
    for _ in range(count - 1):
        limbs.append(full & ((1 << bits) - 1))
        full = full >> bits
    limbs.append(full)
    return limbs[::-1]


@dataclass
class IntBasis:
    """A public basis in fixed point, with an extra all-ones column (index ``num_basis - 1``), split in
    ``LIMBS`` limbs of ``limb_bits`` bits each so that its full precision (LIMBS * limb_bits bits)
    does not eat the ring's headroom: each limb is multiplied separately and recombined in float.

    dense: ``matrix`` (L, N, P+1); sparse: ``index`` (N, K+1) and ``weight`` (L, N, K+1).
    ``frac_bits`` is the scale of the recombined basis.
    """

    num_basis: int
    frac_bits: int
    limb_bits: int
    matrix: Tensor | None = None
    index: Tensor | None = None
    weight: Tensor | None = None

    @staticmethod
    def from_basis(basis: Basis, bits: int = PHI_BITS) -> "IntBasis":
        """``bits`` per limb (relative to the largest |Phi|)."""
        if isinstance(basis, KroneckerBasis):
            basis = basis.to_sparse()
        if isinstance(basis, DenseBasis):
            w = basis.matrix.to(torch.float64)
            n = w.shape[0]
            w = torch.cat([w, torch.ones(n, 1, dtype=torch.float64)], 1)
            index = None
            num = w.shape[1]
        elif isinstance(basis, SparseBasis):
            n = basis.weight.shape[0]
            w = torch.cat([basis.weight.to(torch.float64), torch.ones(n, 1, dtype=torch.float64)], 1)
            index = torch.cat([basis.index, torch.full((n, 1), basis.num_basis, dtype=torch.long)], 1)
            num = basis.num_basis + 1
        else:
            raise TypeError(f"unsupported basis {type(basis).__name__}")
        e = int(torch.ceil(torch.log2(w.abs().amax().clamp(min=1.0)))) if w.numel() else 0
        f = LIMBS * bits - e
        stacked = torch.stack(split_limbs(encode(w, f), bits, LIMBS))
        if index is None:
            return IntBasis(num, f, bits, matrix=stacked)
        return IntBasis(num, f, bits, index=index, weight=stacked)

    @property
    def num_points(self) -> int:
        return self.matrix.shape[1] if self.matrix is not None else self.index.shape[0]

    def digest(self) -> str:
        """SHA-256 of the encoded basis: all parties check they use the same public Phi."""
        h = hashlib.sha256()
        for t in (self.matrix, self.index, self.weight):
            if t is not None:
                h.update(t.contiguous().numpy().tobytes())
        h.update(str((self.num_basis, self.frac_bits, self.limb_bits)).encode())
        return h.hexdigest()

    def abs_adjoint(self, u: Tensor) -> Tensor:
        """max_j sum_i max_l |Phi_l[i, j]| |u[i, a]| (float, for the choice of U's scale)."""
        ua = u.abs().to(torch.float64)
        if self.matrix is not None:
            return (self.matrix.abs().amax(0).to(torch.float64).T @ ua).amax(0)
        wmax = self.weight.abs().amax(0).to(torch.float64)
        out = torch.zeros(self.num_basis, u.shape[1], dtype=torch.float64)
        out.index_add_(0, self.index.reshape(-1), (wmax[..., None] * ua[:, None, :]).reshape(-1, u.shape[1]))
        return out.amax(0)


def int_cross(phi: IntBasis, x: Tensor, y: Tensor | None = None, bins: Tensor | None = None, nbins: int = 0,
              chunk: int = 8192) -> Tensor:
    """(L, P+1, a, b) int64: per limb l, sum_i Phi_l[i, j] x[i, a] y[i, b] mod 2^64; y dense (N, b)
    or one-hot given by ``bins``."""
    limbs = phi.matrix if phi.matrix is not None else phi.weight
    return torch.stack([_int_cross_one(phi, limbs[li], x, y, bins, nbins, chunk) for li in range(limbs.shape[0])])


def _int_cross_one(phi: IntBasis, w: Tensor, x: Tensor, y: Tensor | None, bins: Tensor | None, nbins: int,
                   chunk: int) -> Tensor:
    n, a = x.shape
    b = y.shape[1] if y is not None else nbins
    p = phi.num_basis
    if phi.matrix is not None:
        out = torch.zeros(b, p * a, dtype=I64)
        for s in range(0, n, chunk):
            prod = (w[s:s + chunk, :, None] * x[s:s + chunk, None, :]).reshape(-1, p * a)
            if y is not None:
                out += y[s:s + chunk].T @ prod
            else:
                out.index_add_(0, bins[s:s + chunk], prod)
        return out.T.reshape(p, a, b)
    k = phi.index.shape[1]
    out = torch.zeros(p * b, a, dtype=I64) if y is None else torch.zeros(p, a * b, dtype=I64)
    step = max(1, chunk // max(1, k * (1 if y is None else b) // 4))
    for s in range(0, n, step):
        idx, wt, xs = phi.index[s:s + step], w[s:s + step], x[s:s + step]
        if y is None:
            contrib = (wt[:, :, None] * xs[:, None, :]).reshape(-1, a)
            out.index_add_(0, (idx * b + bins[s:s + step, None]).reshape(-1), contrib)
        else:
            z = (xs[:, :, None] * y[s:s + step, None, :]).reshape(xs.shape[0], a * b)
            out.index_add_(0, idx.reshape(-1), (wt[:, :, None] * z[:, None, :]).reshape(-1, a * b))
    if y is None:
        return out.reshape(p, b, a).permute(0, 2, 1).contiguous()
    return out.reshape(p, a, b)


def phi_bits(num_points: int, v_bits: int) -> int:
    """Public bits per limb of Phi: a third of the headroom left after the sum over points and V's
    bits (U gets the rest), between 8 and 24 bits."""
    free = HEADROOM - 1 - v_bits - math.ceil(math.log2(max(num_points, 2)))
    return int(min(24, max(8, free // 3)))


def column_bits(phi: IntBasis, u: Tensor, v_bits: int) -> Tensor:
    """Party 1's per-column fixed-point bits so that |sum Phi_l U V| < 2^HEADROOM with |V_int| <= 2^v_bits."""
    bound = phi.abs_adjoint(u).clamp(min=1e-300)
    bits = torch.floor(HEADROOM - 1 - v_bits - torch.log2(bound)).to(I64)
    return bits.clamp(max=52)


def feature_columns(kind: str, bins: int) -> int:
    """Columns of party 2's encoded features: SSD (J, J^2) in V_LIMBS limbs each; MI one-hot bins."""
    return 2 * V_LIMBS if kind == "ssd" else bins


def encode_features(v: Tensor, one_hot: bool) -> tuple[Tensor, Tensor, int, int]:
    """Party 2: V (N, b) -> (V_int (N, limbs * b), per-column frac bits, bits per limb, limbs).

    One-hot features are exact (one limb, 0 bits). Dense features get V_LIMBS * V_BITS bits relative
    to each column's largest value, split into limbs of V_BITS bits (most significant limb first),
    because the SSD cost sum (I - J)^2 = sum I^2 - 2 I J + J^2 cancels: 16 bits of J alone shift the
    cost by more than a Gauss-Newton step changes it near convergence.
    """
    if one_hot:
        return v.to(I64), torch.zeros(v.shape[1], dtype=I64), 0, 1
    e = torch.ceil(torch.log2(v.abs().amax(0).to(torch.float64).clamp(min=2.0**-20))).to(I64)
    f = V_LIMBS * V_BITS - e
    limbs = split_limbs(encode(v, f), V_BITS, V_LIMBS)
    bits = torch.cat([f - V_BITS * (V_LIMBS - 1 - li) for li in range(V_LIMBS)])
    return torch.cat(limbs, 1), bits, V_BITS, V_LIMBS


def decode_cross(z: Tensor, u_bits: Tensor, v_bits: Tensor, phi: IntBasis, v_limbs: int = 1) -> tuple[Tensor, Tensor]:
    """Opened (L, P+1, a, limbs * b) ring result -> (cross (P, a, b), total (a, b)) in float64."""
    limbs = z.shape[0]
    out = torch.zeros(z.shape[1:], dtype=torch.float64)
    for li in range(limbs):  # most significant limb first
        shift = phi.limb_bits * (limbs - 1 - li)
        f = u_bits[:, None] + v_bits[None, :] + (phi.frac_bits - shift)
        out += decode(z[li], f[None])
    out = out.reshape(out.shape[0], out.shape[1], v_limbs, -1).sum(2)
    return out[:-1], out[-1]


def opened_mask(cross_mask: Tensor, total_mask: Tensor, num_basis: int, limbs: int, v_limbs: int) -> Tensor:
    """Bool (L, P+1, a, v_limbs * b) over an :func:`int_cross` result: the ring entries opened to party 1.

    ``cross_mask``/``total_mask`` (a, b) name the entries the update reads (rows j < P: cross, row P:
    the all-ones column, i.e. the totals); each is opened as its L x v_limbs limb partials."""
    a, b = cross_mask.shape
    out = torch.zeros(limbs, num_basis, a, v_limbs, b, dtype=torch.bool)
    out[:, :-1] = cross_mask[None, None, :, None, :]
    out[:, -1] = total_mask[None, :, None, :]
    return out.reshape(limbs, num_basis, a, v_limbs * b)
