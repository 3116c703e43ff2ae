"""What all parties agree on in public: the registration configuration, the fixed grid geometry,
the public basis Phi of each call and the sampled points (URS from the shared seed).

What each party learns (MPC protocol, see :mod:`privreg.mpc.product`):

* party 1 (moving image, theta): the fixed grid geometry (size, spacing, origin, direction); per
  level, a power-of-two bound of each feature column of party 2 (e.g. ceil(log2 max J)); per
  seam call, the opened products: SSD - sum_i Phi_j m g_k J, sum Phi_j m I_w J, sum Phi_j m J,
  sum Phi_j m J^2 (this is S^T J and the cost terms of the paper); MI - the joint histogram
  A^T B and its derivative C^T B (eqs. 8-9), which include the histogram of J inside the overlap.
* party 2 (fixed image J): the configuration, the sample keys (URS: level and iteration; the
  points follow from the public seed) or, only with ``reveal_gms_indices``, the GMS point indices
  (they depend on party 1's image gradients); every other value it receives is one-time padded.
* dealer: the configuration, the geometry and the sample keys/indices; no image-derived value.

What each party learns (FHE-v1, CKKS, see :mod:`privreg.fhe.ckks`; no dealer):

* party 1: the fixed grid geometry; the public CKKS context (public and Galois keys, never the
  secret key); per level a power-of-two bound of each feature column; the features encrypted
  (IND-CPA under RLWE); per call the same products as with MPC (plus the CKKS error, at most about
  2^-23 of each output's bound and dependent on party 2's secret key, which party 2's 2^-28
  flooding noise blurs but does not statistically drown).
* party 2: the configuration, the URS sample keys (never GMS indices: party 1 weighs the whole
  level with zeros off its sample), and per call y + M for each output y normalised to |y| <= 1
  and a fresh uniform mask M on [-2^24, 2^24]: within statistical distance 2^-24 per value of a
  distribution that does not depend on y (CKKS decodes in double precision, which bounds the
  mask size; this is weaker than the MPC backend's perfect one-time pad).

What each party learns (FHE-v2: each party has its own key pair; rows [0, n1) of a call are
evaluated by party 1, rows [n1, n) by party 2, n1 = ceil(n / 2), public):

* party 1: everything it learns under FHE-v1 (the same opened products y = y_1 + y_2, now with
  party 2's flooding noise twice); separately it decrypts y_2 + R + e and receives y_1 + M - R,
  where R is party 2's fresh uniform mask on [-2^24, 2^24] per value and e uniform flooding noise
  of 2^-28 over the CKKS error of party 2's products (which depends on V_2; as in v1 the flood
  blurs that error but is smaller than its bound, so it does not drown it statistically): neither
  half alone is revealed beyond the same 2^-24 statistical bound.
* party 2: party 1's public context; per call [[W_2]] encrypted under party 1's key (IND-CPA,
  nothing), and, as in v1, y_1 + M for party 1's half. GMS: the rows are the whole level
  (party 1's encrypted W_2 is zero off its sample), so the indices still never leave party 1.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..basis import Basis, DenseBasis
from ..errors import InputError
from ..grid import Grid
from ..mpc.product import IntBasis
from ..net.channel import PeerError
from ..register import LINEAR, RegistrationConfig
from ..sampling import Sampling
from ..transforms import BSplineTransform

F64 = torch.float64


def config_to_dict(cfg: RegistrationConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["levels"] = list(cfg.levels)
    d["sigmas"] = None if cfg.sigmas is None else list(cfg.sigmas)
    d["max_iter"] = cfg.max_iter if isinstance(cfg.max_iter, int) else list(cfg.max_iter)
    return d


def config_from_dict(d: dict) -> RegistrationConfig:
    d = dict(d)
    d["sampling"] = Sampling(**d["sampling"])
    d["levels"] = tuple(d["levels"])
    if d.get("sigmas") is not None:
        d["sigmas"] = tuple(d["sigmas"])
    cfg = RegistrationConfig(**d)
    cfg.validate()
    return cfg


def config_from_plan(plan: dict) -> RegistrationConfig:
    """The public part of a configuration, rebuilt from a plan (:func:`privreg.secure.plan.public_plan`)
    by a party that holds no image (the dealer)."""
    try:
        levels = plan["levels"]
        cfg = RegistrationConfig(
            transform=plan["transform"], metric=plan["metric"], bins=int(plan.get("bins", 32)),
            grid_spacing=float(plan.get("grid_spacing", 10.0)), levels=tuple(float(lv[0]) for lv in levels),
            sigmas=tuple(float(lv[1]) for lv in levels), max_iter=[int(lv[2]) for lv in levels],
            sampling=Sampling(**plan["sampling"]), normalize=bool(plan["normalize"]))
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise PeerError(f"malformed plan from party 1: {exc}") from None
    cfg.validate()
    return cfg


def grid_to_dict(g: Grid) -> dict:
    return {"size": list(g.size), "spacing": list(g.spacing), "origin": list(g.origin), "direction": list(g.direction)}


def grid_from_dict(d: dict) -> Grid:
    return Grid(tuple(int(x) for x in d["size"]), tuple(float(x) for x in d["spacing"]),
                tuple(float(x) for x in d["origin"]), tuple(float(x) for x in d["direction"]))


def check_secure_config(cfg: RegistrationConfig, reveal_gms_indices: bool, protocol: str = "mpc") -> None:
    """Refuse what a private run cannot do; GMS under MPC needs the explicit opt-in (under FHE the
    indices never leave party 1)."""
    if cfg.metric not in ("ssd", "mi"):
        raise InputError(f"private registration supports --metric ssd or mi, got {cfg.metric!r}")
    if cfg.transform not in LINEAR + ("bspline",):
        raise InputError(f"private registration supports linear transforms and bspline, got {cfg.transform!r}")
    if cfg.optimizer not in ("auto", "gn"):
        raise InputError("private registration uses Gauss-Newton (--optimizer gn)")
    if cfg.sampling.stratified:  # party 2 would re-draw plain URS from the seed: refuse rather than diverge
        raise InputError("stratified URS (flat_rate < 1) is clear-only for now: use flat_rate 1 or GMS")
    if cfg.sampling.mode == "gms" and protocol == "mpc" and not reveal_gms_indices:
        raise InputError("GMS picks points from the moving image's gradients; sending them to the fixed party "
                         "leaks them. Use --sampling urs, or opt in with --reveal-gms-indices.")


class PublicSession:
    """The public part of a run that party 2 and the dealer rebuild from party 1's setup message."""

    def __init__(self, cfg: RegistrationConfig, fixed_grid: Grid) -> None:
        self.cfg, self.fixed_grid = cfg, fixed_grid
        self.levels = cfg.pyramid(fixed_grid)
        self._spline = (BSplineTransform.for_domain(fixed_grid, cfg.grid_spacing)
                        if cfg.transform == "bspline" else None)
        self._call_cache: tuple | None = None

    def level_grid(self, level: int) -> Grid:
        return self.fixed_grid.downsample(self.levels[level].factor)

    def index(self, level: int, meta: dict, arrays: dict) -> Tensor | None:
        """The points of a call: explicit (revealed GMS), from the seed (URS) or all."""
        if "index" in arrays:
            idx = arrays["index"].to(torch.long)
            n = self.level_grid(level).numel
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise InputError("sample index out of range")
            return idx
        key = meta.get("sample")
        if key is None:
            return None
        grid = self.level_grid(level)
        return self.cfg.sampling.draw(torch.arange(grid.numel), int(key[0]), int(key[1]))

    def call_basis(self, level: int, meta: dict, arrays: dict) -> tuple[Tensor | None, IntBasis]:
        """The points and encoded Phi of a seam call, checked against party 1's digest.

        Built once per (level, sample key, precision) and reused: with full sampling or a fixed
        subset that is once per level, not once per iteration (B-spline bases are costly)."""
        pb = int(meta.get("phi_bits", -1))
        if not 8 <= pb <= 24:
            raise PeerError(f"invalid basis precision {pb} from party 1")
        key = (level, tuple(meta["sample"]) if meta.get("sample") else None, pb)
        if self._call_cache is None or self._call_cache[0] != key:
            index = self.index(level, meta, arrays)
            phi = IntBasis.from_basis(self.basis(level, index), pb)
            self._call_cache = (key, index, phi, phi.digest())
        _, index, phi, digest = self._call_cache
        if digest != meta["digest"]:
            raise PeerError("party 1's basis differs from the public one (configuration mismatch)")
        return index, phi

    def basis(self, level: int, index: Tensor | None) -> Basis:
        """Phi at the call's points, exactly as party 1's ParamModel builds it."""
        grid = self.level_grid(level)
        if self._spline is not None:
            full = self._spline.basis_grid(grid)
            return full if index is None else full.rows(index)
        pts = grid.points(F64)
        if index is not None:
            pts = pts[index]
        c = self.fixed_grid.center().to(F64)
        return DenseBasis(torch.cat([pts - c, torch.ones(pts.shape[0], 1, dtype=F64)], 1))
