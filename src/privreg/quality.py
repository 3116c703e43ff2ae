"""Is a registration result plausible? Measures taken from the run itself, and the verdict.

A registration that ends at a wrong optimum still "converges"; the optimiser's own flags cannot
tell. :func:`assess` measures, independently of the metric that was optimised:

* ``overlap``: fraction of the fixed domain (or fixed mask) that the final transform maps inside
  the moving image's domain;
* ``ecc`` (entropy correlation coefficient, 2 I(F; M) / (H(F) + H(M)), in [0, 1]) of the fixed
  image and the moving image under the start and the final transform, and its *chance level*:
  the same statistic with the moving values shuffled (what unrelated images of these intensity
  distributions give on that many points);
* ``excursion``: the largest distance the final transform moves a fixed-domain point beyond where
  the start transform put it, relative to the fixed domain's diagonal;
* ``folding_percent`` of a dense / B-spline result (non-positive Jacobian determinant);
* the linear part's singular values (scale or shear far from 1).

The thresholds are stated in :data:`LIMITS`; each failed check gives one warning naming the cause
and what to try. A run with no warning has ``status == "ok"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .grid import Grid
from .image import Image, sample
from .transforms import CompositeTransform, LinearTransform, Transform

#: thresholds of the plausibility checks (fractions unless stated)
LIMITS = {
    "min_overlap": 0.5,  # final overlap below this and below the start's: the images were pushed apart
    "min_overlap_absolute": 0.2,  # below this at the end: fails whatever the start was
    "ecc_over_chance": 3.0,  # final ECC must exceed chance x this ...
    "ecc_margin": 0.02,  # ... and chance + this
    "ecc_drop": 0.02,  # final ECC below the start's by more than this: the run made things worse
    "max_excursion": 0.5,  # of the fixed domain's diagonal
    "max_folding_percent": 0.5,
    "linear_singular_range": (0.4, 2.5),
    "min_ecc": 0.08,  # below this the images share almost no information, whatever the chance level
    "neighbour_gain": (1.15, 0.02),  # an unoptimised neighbour beating the result by x1.15 + 0.02: not an optimum
    "restart_gain": 0.01,  # a neighbour beating the result by this is worth a restart from it (clear linear runs)
}
_MAX_POINTS = 1 << 16
_BINS = 32


@dataclass
class Assessment:
    """The verdict on one registration: ``status`` is ``"ok"`` or ``"failed"``."""

    measures: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    better_start: Transform | None = None  # a linear start that matches better than the result (restart there)
    better_start_name: str = ""

    @property
    def status(self) -> str:
        return "failed" if self.warnings else "ok"

    def to_report(self) -> dict:
        return {"status": self.status, "warnings": list(self.warnings), "quality": dict(self.measures)}


def _subsample(grid: Grid, mask: Image | None) -> Tensor:
    """Indices of at most ``_MAX_POINTS`` fixed-grid points (a regular stride), inside ``mask``."""
    idx = torch.arange(grid.numel)
    if mask is not None:
        idx = idx[mask.data.reshape(-1) > 0]
    step = max(1, math.ceil(idx.numel() / _MAX_POINTS))
    return idx[::step]


def _bin(v: Tensor, bins: int) -> Tensor:
    lo, hi = torch.quantile(v, torch.tensor([0.005, 0.995], dtype=v.dtype)).tolist()
    if hi <= lo:
        lo, hi = float(v.min()), float(v.max())
    return ((v - lo) / max(hi - lo, 1e-12) * bins).long().clamp(0, bins - 1)


def ecc(a: Tensor, b: Tensor, bins: int = _BINS) -> float:
    """Entropy correlation coefficient 2 I / (H(a) + H(b)) of paired samples (N,), in [0, 1]."""
    if a.numel() < 16:
        return 0.0
    ia, ib = _bin(a.double(), bins), _bin(b.double(), bins)
    joint = torch.bincount(ia * bins + ib, minlength=bins * bins).double().reshape(bins, bins)
    p = joint / joint.sum()
    pa, pb = p.sum(1), p.sum(0)

    def h(q: Tensor) -> float:
        q = q[q > 0]
        return float(-(q * q.log()).sum())

    ha, hb, hab = h(pa), h(pb), h(p)
    return 0.0 if ha + hb <= 0 else max(0.0, 2.0 * (ha + hb - hab) / (ha + hb))


def _warped_values(fixed: Image, moving: Image, t: Transform, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    pts = fixed.grid.points_at(idx)
    with torch.no_grad():
        mp = t(pts).to(torch.float64)
    mv, inside = sample(moving.data, moving.grid, mp.to(moving.data.dtype))  # float32: binned into 32 bins
    return fixed.data.reshape(-1)[idx].double(), mv.double(), inside


def overlap(fixed_grid: Grid, moving: Image, t: Transform, idx: Tensor | None = None) -> float:
    """Fraction of the fixed grid's points (or of ``idx``) that ``t`` maps inside the moving image's domain."""
    if idx is None:
        idx = _subsample(fixed_grid, None)
    pts = fixed_grid.points_at(idx)
    with torch.no_grad():
        mp = t(pts).to(torch.float64)
    idx_m = moving.grid.world_to_index(mp)
    size = torch.tensor(moving.grid.size, dtype=idx_m.dtype)
    inside = ((idx_m >= -0.5) & (idx_m <= size - 0.5)).all(1)
    return float(inside.double().mean())


def _parts(t: Transform) -> list[Transform]:
    return list(t.transforms) if isinstance(t, CompositeTransform) else [t]


def _linear_part(t: Transform) -> LinearTransform | None:
    """The transform itself when it is linear (a composite of linear parts: its last), else None."""
    parts = _parts(t)
    return parts[-1] if all(isinstance(p, LinearTransform) for p in parts) else None


def _dense(t: Transform) -> bool:
    return any(not isinstance(p, LinearTransform) for p in _parts(t))


def assess(fixed_grid: Grid, moving: Image, start: Transform, final: Transform, fixed: Image | None = None,
           fixed_mask: Image | None = None, check_similarity: bool = True) -> Assessment:
    """Measure the final transform's plausibility against the start transform.

    Args:
        fixed_grid: the fixed image's grid (the domain the transforms map from).
        moving: the moving image (original intensities).
        start, final: the transform before and after optimisation.
        fixed: the fixed image, when known (party 1 of a private run has only its grid: the
            similarity checks are then skipped).
        fixed_mask: restricts every measure to the mask.
    """
    a = Assessment()
    idx = _subsample(fixed_grid, fixed_mask)
    ov0, ov1 = overlap(fixed_grid, moving, start, idx), overlap(fixed_grid, moving, final, idx)
    a.measures.update(overlap_start=ov0, overlap=ov1)
    if ov1 < LIMITS["min_overlap_absolute"] or (ov1 < LIMITS["min_overlap"] and ov1 < ov0 - 0.05):
        a.warnings.append(f"the result maps only {100 * ov1:.0f}% of the fixed image inside the moving image "
                          f"({100 * ov0:.0f}% at the start): the images were pushed apart; check that they "
                          "show the same anatomy, try --init moments or a fixed mask")
    pts = fixed_grid.points_at(idx)
    with torch.no_grad():
        d = torch.linalg.norm(final(pts).double() - start(pts).double(), dim=1)
    diag = math.sqrt(sum(e * e for e in fixed_grid.extent()))
    exc = float(d.max()) / max(diag, 1e-12)
    a.measures.update(max_motion_mm=float(d.max()), excursion=exc)
    if exc > LIMITS["max_excursion"]:
        a.warnings.append(f"the result moves points by up to {float(d.max()):.1f} mm from the start, "
                          f"{100 * exc:.0f}% of the image's diagonal: implausible; try a better initial "
                          "transform (--init moments, --initial-transform) or fewer levels")
    lin = _linear_part(final)
    if lin is not None:
        m, _ = lin.matrix_translation()
        sv = torch.linalg.svdvals(m.detach().double())
        lo, hi = LIMITS["linear_singular_range"]
        a.measures["linear_singular_values"] = [float(s) for s in sv]
        if float(sv.min()) < lo or float(sv.max()) > hi:
            a.warnings.append(f"the linear part scales by {float(sv.min()):.2f} to {float(sv.max()):.2f} along its axes "
                              f"(plausible: {lo} to {hi}): implausible; try --transform rigid first, or a mask")
    if _dense(final) and float(d.max()) == 0.0:
        a.warnings.append("the deformable stage did not move at all (every step was rejected): the result is its "
                          "start; try a coarser --grid-spacing, --metric mi or more regularisation")
    if _dense(final):
        from .evaluate import jacobian_stats

        fold = jacobian_stats(final, fixed_grid)["folding_percent"]
        a.measures["folding_percent"] = fold
        if fold > LIMITS["max_folding_percent"]:
            a.warnings.append(f"the deformation folds {fold:.2f}% of the fixed image (non-positive Jacobian): "
                              "use a smaller --step, more regularisation (--reg-weight) or a coarser grid")
    if fixed is not None and check_similarity:
        fv0, mv0, in0 = _warped_values(fixed, moving, start, idx)
        fv1, mv1, in1 = _warped_values(fixed, moving, final, idx)
        e0 = ecc(fv0[in0], mv0[in0]) if int(in0.sum()) >= 16 else 0.0
        e1 = ecc(fv1[in1], mv1[in1]) if int(in1.sum()) >= 16 else 0.0
        gen = torch.Generator().manual_seed(0)
        mv1s = mv1[in1]
        chance = ecc(fv1[in1], mv1s[torch.randperm(mv1s.numel(), generator=gen)]) if mv1s.numel() >= 16 else 0.0
        a.measures.update(ecc_start=e0, ecc=e1, ecc_chance=chance)
        if e1 < max(LIMITS["ecc_over_chance"] * chance, chance + LIMITS["ecc_margin"], LIMITS["min_ecc"]):
            a.warnings.append(f"the aligned images share almost no information (ECC {e1:.3f}, chance level "
                              f"{chance:.3f}): they may not show the same anatomy, or the optimiser stopped "
                              "far from the alignment; try --init moments or a coarser first level")
        elif e1 < e0 - LIMITS["ecc_drop"]:
            a.warnings.append(f"the images match worse after registration than before (ECC {e0:.3f} -> {e1:.3f}): "
                              "try a smaller step, another metric or --init identity")
        if lin is not None and not a.warnings:
            name, best, e_best = best_neighbour(fixed, moving, lin, idx)
            a.measures.update(best_neighbour=name, ecc_best_neighbour=e_best)
            ratio, margin = LIMITS["neighbour_gain"]
            if e_best > e1 + LIMITS["restart_gain"]:
                a.better_start, a.better_start_name = best, name
            if e_best > ratio * e1 + margin:
                a.warnings.append(f"the result is not the best alignment: the unoptimised candidate '{name}' "
                                  f"matches better (ECC {e_best:.3f} against {e1:.3f}); the optimiser stopped in a "
                                  "local optimum: try --init moments, more iterations or full sampling")
    return a


def neighbours(t: LinearTransform, grid: Grid) -> list[tuple[str, LinearTransform]]:
    """Coarse perturbations W(P(x)) of a linear transform W: rotations P about the fixed grid's centre
    (2D: 30 degree steps; 3D: 90 degree steps about each axis; skipped for a translation) and shifts
    by 1/16 and 1/8 of the fixed extent along each axis."""
    from itertools import product

    from .transforms import AffineTransform
    from .transforms.linear import TranslationTransform, rotation_matrix

    d, c = grid.ndim, grid.center().to(torch.float64)
    ext = torch.tensor(grid.extent(), dtype=torch.float64)
    perts: list[tuple[str, Tensor, Tensor]] = []
    if not isinstance(t, TranslationTransform):
        if d == 2:
            angles = [(f"rotation {k * 30} deg", torch.tensor([math.radians(k * 30.0)])) for k in range(1, 12)]
        else:
            angles = [(f"rotation {k * 90} deg about {'xyz'[ax]}", torch.eye(3, dtype=torch.float64)[ax] * math.radians(k * 90.0))
                      for ax in range(3) for k in (1, 2, 3)]
        for name, rot in angles:
            perts.append((name, rotation_matrix(rot.to(torch.float64), d), torch.zeros(d, dtype=torch.float64)))
    for steps in product((-2, -1, 0, 1, 2), repeat=d):
        if any(steps):
            s = torch.tensor(steps, dtype=torch.float64) * ext / 16.0
            perts.append((f"shift {tuple(round(float(v), 1) for v in s)} mm", torch.eye(d, dtype=torch.float64), s))
    h = t.homogeneous().detach()
    out = []
    for name, r, s in perts:
        p = torch.eye(d + 1, dtype=torch.float64)
        p[:d, :d], p[:d, d] = r, c + s - r @ c
        m = h @ p
        a = m[:d, :d]
        out.append((name, AffineTransform(d, a, m[:d, d] + a @ c - c, c)))
    return out


def best_neighbour(fixed: Image, moving: Image, t: LinearTransform, idx: Tensor) -> tuple[str, LinearTransform, float]:
    """The perturbation of :func:`neighbours` with the highest ECC on the points ``idx`` (a regular
    subsample of at most 8192 of them)."""
    idx = idx[:: max(1, math.ceil(idx.numel() / 8192))]
    best: tuple[str, LinearTransform, float] = ("none", t, -1.0)
    for name, cand in neighbours(t, fixed.grid):
        fv, mv, inside = _warped_values(fixed, moving, cand, idx)
        if int(inside.sum()) < max(16, idx.numel() // 4):
            continue
        e = ecc(fv[inside], mv[inside])
        if e > best[2]:
            best = (name, cand, e)
    return best
