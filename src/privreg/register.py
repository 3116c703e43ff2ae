"""The registration workflow: one multi-resolution loop for every metric, optimiser and backend.

Party 1's view: it owns the moving image and theta; the fixed image is reached only through a
:class:`~privreg.joint.JointBackend` (Gauss-Newton on SSD/MI), except for autograd metrics,
which are clear-only and take the fixed image directly.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from .errors import InputError
from .grid import Grid
from .image import Image, as_image, normalize_intensity, resample
from .joint import ClearBackend, FixedSide, JointBackend, PyramidLevel, level_image
from .objectives import AutogradObjective, JointObjective, MovingLevel, ParamModel
from .optim import FirstOrderOptions, GNOptions, gauss_newton
from .optim.first_order import minimize_autograd, register_owner
from .quality import Assessment, assess, overlap
from .optim.greedy import GreedyOptions, greedy_level, resample_field
from .sampling import Sampling
from .transforms import (BSplineTransform, CompositeTransform, DisplacementFieldTransform, LinearTransform,
                         StationaryVelocityTransform, Transform, make_linear)

LINEAR = ("translation", "rigid", "similarity", "affine")
NONLINEAR = ("bspline", "displacement", "svf")
TRANSFORMS = LINEAR + NONLINEAR
METRICS = ("ssd", "ncc", "lncc", "mi", "mind")
OPTIMIZERS = ("auto", "gn", "lbfgs", "adam", "gd", "greedy")
INITS = ("geometry", "com", "moments", "identity")  # com and moments: centre of mass (ITK's MomentsOn)
REGULARIZERS = ("diffusion", "elastic", "bending", "folding")
MIN_LEVEL_VOXELS = 1024  # a pyramid level with fewer points is skipped (see RegistrationConfig.pyramid)
MIN_LEVEL_AXIS = 8


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _resolves(grid: Grid) -> bool:
    return grid.numel >= MIN_LEVEL_VOXELS and min(grid.size) >= MIN_LEVEL_AXIS


@dataclass
class RegistrationConfig:
    """Everything that defines a registration run (all public: both parties may know it)."""

    transform: str = "affine"
    metric: str = "ssd"
    optimizer: str = "auto"
    levels: Sequence[float] = (4, 2, 1)
    sigmas: Sequence[float] | None = None  # mm per level; default 0.5 * factor * min spacing
    max_iter: int | Sequence[int] = 100
    tol_mm: float = 1e-3
    sampling: Sampling = field(default_factory=lambda: Sampling("auto"))
    bins: int = 32
    grid_spacing: float = 10.0  # mm, B-spline control points / displacement & SVF field spacing
    reg_weight: float | None = None  # None: B-spline Gauss-Newton 3e-3 (SSD) or 3 (MI), relative to the data term; else 0
    reg_kind: str = "bending"
    init: str = "geometry"  # geometry | moments | identity
    normalize: bool | None = None  # None: rescale to [0, 1] for mi/ncc/lncc/mind, keep SSD's shared scale
    lr: float = 0.5
    lncc_radius: int = 4  # voxels: LNCC window (2r + 1)^d
    step_vox: float = 1.0  # greedy: largest update per iteration (voxels of the level)
    greedy_sigmas_vox: tuple[float, float] = (1.732, 0.7071)  # greedy: smoothing of each update, of the field
    restart: bool = True  # clear linear runs: restart once from a coarse rotation/shift that matches better

    def validate(self) -> None:
        """Check every option (ranges, list lengths); the one place the CLI and the API share.

        Raises:
            InputError: naming the option as the CLI spells it.
        """
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise InputError(msg)

        need(self.transform in TRANSFORMS, f"--transform must be one of {', '.join(TRANSFORMS)}, got {self.transform!r}")
        need(self.metric in METRICS, f"--metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        need(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        need(self.init in INITS, f"--init must be one of {', '.join(INITS)}, got {self.init!r}")
        need(self.reg_kind in REGULARIZERS, f"--reg must be one of {', '.join(REGULARIZERS)}, got {self.reg_kind!r}")
        levels = list(self.levels)
        need(0 < len(levels) <= 12 and all(_finite(f) and 1 <= f <= 4096 for f in levels),
             "--levels must be 1 to 12 shrink factors between 1 and 4096, coarse to fine (e.g. 4,2,1)")
        if self.sigmas is not None:
            need(len(self.sigmas) == len(levels), f"--sigmas needs one value per level ({len(levels)}), got {len(self.sigmas)}")
            need(all(_finite(s) and s >= 0 for s in self.sigmas), "--sigmas must be >= 0 (mm)")
        iters = [self.max_iter] if isinstance(self.max_iter, int) else list(self.max_iter)
        need(len(iters) in (1, len(levels)), f"--iterations needs one number or one per level ({len(levels)}), got {len(iters)}")
        need(all(isinstance(i, int) and 1 <= i <= 100000 for i in iters), "--iterations must be between 1 and 100000")
        need(_finite(self.tol_mm) and self.tol_mm >= 0, "--tol must be >= 0 (mm)")
        need(isinstance(self.bins, int) and 4 <= self.bins <= 512, f"--bins must be between 4 and 512, got {self.bins}")
        need(_finite(self.grid_spacing) and self.grid_spacing > 0, "--grid-spacing must be > 0 (mm)")
        need(_finite(self.lr) and self.lr > 0, "learning rate must be > 0")
        need(self.sampling.seed >= 0, "--seed must be >= 0")
        if self.normalize is None:
            self.normalize = self.metric != "ssd"
        if self.reg_weight is None:
            # SSD: tuned on synthetic fields (benchmarks/bspline_sensitivity.py). MI: on Colin27 -> MNI152,
            # where 3e-3 gave Dice 0.63 with 7 % folding at 4 mm and 1 gave 0.853 vs 0.868 for 3 at 2 mm
            self.reg_weight = (3.0 if self.metric == "mi" else 3e-3) if self.transform == "bspline" and self.uses_seam() else 0.0
        need(_finite(self.reg_weight) and self.reg_weight >= 0, "--reg-weight must be >= 0")
        if self.sampling.mode == "auto" and (self.metric in ("lncc", "mind") or self.greedy() or not self.uses_seam()):
            self.sampling = dataclasses.replace(self.sampling, mode="full")  # auto's subsets serve the seam's metrics
        if self.metric in ("lncc", "mind") and self.sampling.mode != "full":
            raise InputError(f"{self.metric} needs full sampling")
        need(isinstance(self.lncc_radius, int) and 1 <= self.lncc_radius <= 64, "--lncc-radius must be between 1 and 64")
        need(len(self.greedy_sigmas_vox) == 2 and all(_finite(s) and s >= 0 for s in self.greedy_sigmas_vox),
             "--greedy-sigmas needs two smoothing sigmas >= 0 (update, field)")
        need(_finite(self.step_vox) and self.step_vox > 0, "--step must be > 0 (voxels)")
        if self.greedy():
            if self.transform != "displacement":
                raise InputError("--optimizer greedy optimises a dense displacement field: use --transform displacement")
            if self.sampling.mode != "full":
                raise InputError("--optimizer greedy needs full sampling (it moves every voxel)")

    def pyramid(self, grid: Grid) -> list[PyramidLevel]:
        """The levels this fixed grid can use: a level whose grid would have fewer than
        :data:`MIN_LEVEL_VOXELS` points or :data:`MIN_LEVEL_AXIS` voxels along an axis resolves nothing
        (Mattes MI needs about 2 bins^2 points) and is skipped, unless no level would remain."""
        sig = self.sigmas
        if sig is None:
            sig = [0.5 * f * min(grid.spacing) if f > 1 else 0.0 for f in self.levels]
        if len(sig) != len(self.levels):
            raise InputError("give one smoothing sigma per level")
        out = [PyramidLevel(float(f), float(s), self.iterations(i)) for i, (f, s) in enumerate(zip(self.levels, sig))]
        kept = [lev for lev in out if _resolves(grid.downsample(lev.factor))]
        if not kept:
            raise InputError(f"every level of --levels {','.join(f'{f:g}' for f in self.levels)} shrinks the "
                             f"{'x'.join(map(str, grid.size))} fixed image below {MIN_LEVEL_AXIS} voxels per axis "
                             f"or {MIN_LEVEL_VOXELS} voxels: use smaller factors (e.g. --levels 1)")
        return kept

    def iterations(self, level: int) -> int:
        """Iteration cap of level ``level`` of ``levels`` (before too-coarse levels are skipped)."""
        if isinstance(self.max_iter, int):
            return self.max_iter
        return int(self.max_iter[level] if len(self.max_iter) > 1 else self.max_iter[0])

    def uses_seam(self) -> bool:
        opt = self.optimizer
        if opt == "auto":
            return self.metric in ("ssd", "mi") and self.transform not in ("svf", "displacement")
        return opt == "gn"

    def greedy(self) -> bool:
        """Greedy diffeomorphic updates of a dense field: the default for ``displacement``."""
        return self.optimizer == "greedy" or (self.optimizer == "auto" and self.transform == "displacement")


@dataclass
class RegistrationResult:
    transform: Transform
    warped: Image
    history: list[dict]
    report: dict
    verdict: Assessment | None = None  # the plausibility checks (report["status"], report["warnings"])


MIN_IMAGE_AXIS = 4  # an image thinner than this along an axis is not a 2D/3D image to register


def check_pair(fixed: Image, moving: Image) -> None:
    """Refuse images that cannot be registered: dimension mismatch, NaN/Inf, constant, too thin."""
    if fixed.ndim != moving.ndim:
        raise InputError(f"fixed image is {fixed.ndim}D but moving image is {moving.ndim}D")
    for name, img in (("fixed image", fixed), ("moving image", moving)):
        img.check_finite(name)
        if min(img.grid.size) < MIN_IMAGE_AXIS:
            raise InputError(f"{name} is {'x'.join(map(str, img.grid.size))} voxels: registration needs at least "
                             f"{MIN_IMAGE_AXIS} voxels along every axis (a 2D image must be stored as 2D)")
        if float(img.data.max() - img.data.min()) <= 0:
            raise InputError(f"{name} is constant")


def check_mask(mask: Image | None, name: str, image: Image | None = None) -> None:
    """A mask must be non-empty, of the image's dimension, and cover part of the image's domain."""
    if mask is None:
        return
    if image is not None and mask.ndim != image.ndim:
        raise InputError(f"{name} is {mask.ndim}D but the images are {image.ndim}D")
    mask.check_finite(name)
    if not bool((mask.data > 0).any()):
        raise InputError(f"{name} is empty")
    if image is not None and not bool((_level_mask(mask, image.grid).data > 0).any()):
        raise InputError(f"{name} does not overlap its image in physical space (check its origin and direction)")


def check_start_overlap(fixed_grid: Grid, moving: Image, start: Transform) -> None:
    """The start transform must map part of the fixed domain into the moving image."""
    if overlap(fixed_grid, moving, start) < 0.01:
        raise InputError("the images do not overlap in physical space under the initial transform: use "
                         "--init geometry (align the image centres) or give --initial-transform")


def initial_linear(kind: str, fixed_grid: Grid, moving: Image, fixed: Image | None, how: str,
                   initial: Transform | None) -> LinearTransform:
    """Initial linear transform about the fixed grid centre (ITK's centred initialiser)."""
    center = fixed_grid.center()
    if isinstance(initial, LinearTransform):
        return make_linear(kind, fixed_grid.ndim, center, initial)
    t = make_linear(kind, fixed_grid.ndim, center)
    if how == "identity":
        return t
    if how in ("com", "moments") and fixed is not None:
        shift = _centroid(moving) - _centroid(fixed)
    else:
        shift = moving.grid.center() - fixed_grid.center()
    off = 1 if kind == "translation" else (1 if fixed_grid.ndim == 2 else 3)
    with torch.no_grad():
        if kind == "translation":
            t.theta.copy_(shift)
        elif kind == "affine":
            t.theta[-fixed_grid.ndim:] = shift
        else:
            t.theta[off: off + fixed_grid.ndim] = shift
    return t


def _centroid(img: Image) -> Tensor:
    w = (img.data - img.data.min()).reshape(-1).to(torch.float64)
    pts = img.grid.points(torch.float64)
    return (pts * w[:, None]).sum(0) / w.sum().clamp(min=1e-12)


def build_transform(cfg: RegistrationConfig, fixed_grid: Grid, moving: Image, fixed: Image | None,
                    initial: Transform | None) -> Transform:
    if cfg.transform in LINEAR:
        return initial_linear(cfg.transform, fixed_grid, moving, fixed, cfg.init, initial)
    outer: list[Transform] = []
    if initial is not None:
        outer = list(initial.transforms) if isinstance(initial, CompositeTransform) else [initial]
    elif cfg.init != "identity":  # non-linear transforms start from the same centring as linear ones
        shift = initial_linear("translation", fixed_grid, moving, fixed, cfg.init, None)
        if float(shift.theta.detach().abs().max()) > 1e-9:
            outer = [shift]
    if cfg.transform == "bspline":
        inner: Transform = BSplineTransform.for_domain(fixed_grid, cfg.grid_spacing)
    else:
        fg = fixed_grid.downsample(max(1.0, cfg.grid_spacing / min(fixed_grid.spacing)))
        inner = DisplacementFieldTransform(fg) if cfg.transform == "displacement" else StationaryVelocityTransform(fg)
    return CompositeTransform(outer + [inner]) if outer else inner


def _param_scales(transform: Transform, grid: Grid) -> Tensor | None:
    inner = transform.transforms[-1] if isinstance(transform, CompositeTransform) else transform
    if not isinstance(inner, LinearTransform):
        return None
    pts = grid.points(torch.float64)[:: max(1, grid.numel // 4096)]
    phi = inner.basis(pts)  # (N, P)
    jac = inner.dense_jacobian().reshape(grid.ndim, grid.ndim + 1, -1)  # (k, j, n)
    motion = torch.einsum("ij,kjn->ikn", phi, jac)  # (N, k, n)
    return torch.sqrt((motion**2).sum(1).mean(0)).clamp(min=1e-6)


def register_with_backend(moving: Image, fixed_grid: Grid, backend: JointBackend, cfg: RegistrationConfig,
                          fixed_candidates: Callable[[int, Grid], Tensor] | None = None,
                          moving_mask: Image | None = None, initial: Transform | None = None,
                          progress: Callable[[str], None] | None = None, fixed: Image | None = None,
                          fixed_mask: Image | None = None) -> RegistrationResult:
    """Party 1's registration loop. ``fixed`` is only used by autograd metrics (clear only)."""
    cfg.validate()
    t_start = time.perf_counter()
    cpu0 = time.process_time()
    levels = cfg.pyramid(fixed_grid)
    mov = Image(normalize_intensity(moving.data) if cfg.normalize else moving.data, moving.grid)
    transform = build_transform(cfg, fixed_grid, mov, fixed, initial)
    start = copy.deepcopy(transform).eval()
    check_start_overlap(fixed_grid, moving, start)
    register_owner(transform)
    history: list[dict] = []
    level_reports = []
    seam = cfg.uses_seam()
    if not seam and fixed is None:
        raise InputError(f"metric {cfg.metric} with optimizer {cfg.optimizer} needs both images (clear only)")
    secant_model = None  # MI's quasi-Newton model, handed from level to level
    for li, lev in enumerate(levels):
        grid = fixed_grid.downsample(lev.factor)
        mgrid = moving.grid.downsample(lev.factor)
        mlev = MovingLevel.build(level_image(mov, mgrid, lev), _level_mask(moving_mask, mgrid), with_gradient=seam,
                                  exact_gradient=cfg.metric != "ssd")
        cand = fixed_candidates(li, grid) if fixed_candidates else torch.arange(grid.numel)
        if cand.numel() < 16:
            raise InputError("the fixed mask is empty at this resolution")
        t0 = time.perf_counter()

        def log(rec: dict, li=li) -> None:
            rec = {"level": li, **rec}
            history.append(rec)
            if progress and (rec["iteration"] % 10 == 0 or rec["iteration"] == 1):
                progress(f"level {li + 1}/{len(levels)} it {rec['iteration']:4d} cost {rec['value']:.6g}")

        if seam:
            model = ParamModel(transform)
            obj = JointObjective(cfg.metric, model, mlev, grid, backend, cfg.bins, cfg.reg_weight, cfg.reg_kind)
            obj.start(li)
            # stratified URS on the finest level only: its strata come from the current transform, which
            # coarser levels have not yet brought close (stratifying every level: 2 of 8 seeds of the
            # 4 mm T1/T2 test ended 0.8 mm off, against 0.13 mm at worst with the finest level only)
            draw = _drawer(cfg.sampling, cand, li, obj, full=cand.numel() == grid.numel,
                           stratify=cfg.sampling.stratified and li == len(levels) - 1)
            tol = cfg.tol_mm * lev.factor
            out = gauss_newton(obj, draw, cfg.sampling.stochastic,
                               GNOptions(max_iter=lev.max_iter, tol_mm=tol, max_step_mm=4.0 * max(grid.spacing),
                                         secant=cfg.metric == "mi", secant_model=secant_model), log)
            secant_model = out.pop("secant_model", None)
        else:
            fl = Image(level_image(fixed, grid, lev).data, grid)
            fm = None
            if fixed_candidates is not None:
                fm = torch.zeros(grid.numel, dtype=torch.bool)
                fm[cand] = True
        if not seam and cfg.greedy():
            transform, out = _greedy_level(transform, grid, mlev, fl, fm, cfg, lev.max_iter, log)
        elif not seam:
            obj = AutogradObjective(cfg.metric, transform, mlev, fl, fm, cfg.bins, cfg.reg_weight, cfg.reg_kind,
                                    cfg.lncc_radius)
            theta = transform.theta
            method = cfg.optimizer if cfg.optimizer != "auto" else ("lbfgs" if not cfg.sampling.stochastic else "adam")

            def loss_fn(it: int, li=li, cand=cand) -> Tensor:
                idx = None if cfg.sampling.takes_all(cand.numel()) and cand.numel() == grid.numel else cfg.sampling.draw(cand, li, it, None if cfg.sampling.mode != "gms" else torch.ones(cand.numel()))
                return obj.loss(idx)

            out = minimize_autograd(loss_fn, theta, _param_scales(transform, grid),
                                    FirstOrderOptions(method=method, max_iter=lev.max_iter, lr=cfg.lr), log)
        n_cand = cand.numel()
        out.update({"level": li, "factor": lev.factor, "sigma_mm": lev.sigma_mm, "grid_size": list(grid.size),
                    "points": n_cand if cfg.sampling.takes_all(n_cand) else cfg.sampling.count(n_cand),
                    "seconds": time.perf_counter() - t0})
        level_reports.append(out)
    warped = resample(moving, fixed_grid, transform.eval())
    report = {
        "transform": cfg.transform, "metric": cfg.metric,
        "optimizer": "gn" if seam else ("greedy" if cfg.greedy() else cfg.optimizer),
        "sampling": {"mode": cfg.sampling.mode, "fraction": cfg.sampling.fraction, "seed": cfg.sampling.seed,
                     "max_points": cfg.sampling.max_points},
        "levels": level_reports, "iterations": sum(r["iterations"] for r in level_reports),
        "wall_seconds": time.perf_counter() - t_start, "cpu_seconds": time.process_time() - cpu0,
        "final_value": level_reports[-1]["final_value"],
    }
    verdict = assess(fixed_grid, moving, start, transform.eval(), fixed=fixed, fixed_mask=fixed_mask)
    report = {**verdict.to_report(), **report}
    return RegistrationResult(transform, warped, history, report, verdict)


def _greedy_level(transform: Transform, grid: Grid, mlev: MovingLevel, fixed: Image, fixed_mask: Tensor | None,
                  cfg: RegistrationConfig, max_iter: int, log) -> tuple[Transform, dict]:
    """One level of greedy diffeomorphic registration: the dense field moves onto this level's grid
    (linear interpolation of the previous level's field), then :func:`greedy_level` updates it."""
    parts = list(transform.transforms) if isinstance(transform, CompositeTransform) else [transform]
    inner, outer = parts[-1], parts[:-1]
    assert isinstance(inner, DisplacementFieldTransform)
    field = DisplacementFieldTransform(grid, resample_field(inner.coefficients.detach(), inner.ctrl, grid))
    level_tx = CompositeTransform(outer + [field]) if outer else field
    obj = AutogradObjective(cfg.metric, level_tx, mlev, fixed, fixed_mask, cfg.bins, 0.0, cfg.reg_kind, cfg.lncc_radius)
    state: dict = {}

    def warp(u: Tensor) -> Tensor:
        field.set_theta(u)
        vals, fv, mask = obj.warp(None)
        state.update(fv=fv, mask=mask)
        return vals.reshape(grid.shape)

    def value_of(w: Tensor) -> Tensor:
        return obj.metric_value(w.reshape(-1), state["fv"], state["mask"])

    opts = GreedyOptions(max_iter=max_iter, step_vox=cfg.step_vox, sigma_update_vox=cfg.greedy_sigmas_vox[0],
                         sigma_field_vox=cfg.greedy_sigmas_vox[1])
    u, out = greedy_level(warp, value_of, field.coefficients.detach(), grid, opts, log)
    field.set_theta(u.to(torch.float64))
    return level_tx, out


def _level_mask(mask: Image | None, grid: Grid) -> Image | None:
    if mask is None:
        return None
    return resample(Image((mask.data > 0).float(), mask.grid), grid, mode="nearest")


def _drawer(sampling: Sampling, cand: Tensor, level: int, obj: JointObjective, full: bool, stratify: bool = False):
    cache: dict[str, Tensor] = {}

    def draw(it: int) -> Tensor | None:
        if sampling.takes_all(cand.numel()):
            return None if full else cand
        key = it if sampling.stochastic else 0
        if "idx" not in cache or sampling.stochastic:
            if stratify:  # strata from party 1's moving image under the current transform
                idx, weights = sampling.draw_stratified(cand, obj.informative_points()[cand], level, key)
                obj.set_point_weights(idx, weights)
                cache["idx"] = idx
            else:
                w = obj.gradient_magnitude()[cand] if sampling.mode == "gms" else None
                cache["idx"] = sampling.draw(cand, level, key, w)
        obj.backend.note_sample(level, key, cache["idx"])
        return cache["idx"]

    return draw


def mask_candidates(fixed_mask: Image | None, cfg_levels: list[PyramidLevel], fixed_grid: Grid):
    if fixed_mask is None:
        return None

    def cand(li: int, grid: Grid) -> Tensor:
        m = _level_mask(fixed_mask, grid)
        return torch.nonzero(m.data.reshape(-1) > 0)[:, 0]

    return cand


def register(fixed, moving, transform: str = "affine", metric: str = "ssd",
             fixed_mask=None, moving_mask=None, initial: Transform | str | None = None,
             progress: Callable[[str], None] | None = None, **options) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` in the clear (ANTsPy-like convenience API).

    Args:
        fixed, moving, fixed_mask, moving_mask: an :class:`Image`, a path, a SimpleITK or nibabel image,
            or ``(array in (z, y, x) order, Grid)`` (see :func:`privreg.image.as_image`).
        initial: a transform or an ITK transform file to start from.
        transform: translation | rigid | similarity | affine | bspline | displacement | svf.
        metric: ssd | ncc | lncc | mi | mind.
        options: any :class:`RegistrationConfig` field (levels, optimizer, sampling, ...).
    Returns:
        :class:`RegistrationResult` with the transform (fixed -> moving points), the moving image
        warped onto the fixed grid, the per-iteration history and a report dict.
    """
    fixed, moving = as_image(fixed, "fixed image"), as_image(moving, "moving image")
    fixed_mask = None if fixed_mask is None else as_image(fixed_mask, "fixed mask")
    moving_mask = None if moving_mask is None else as_image(moving_mask, "moving mask")
    if isinstance(initial, (str, os.PathLike)):
        from .transforms import load_transform

        initial = load_transform(initial)
    if initial is not None and initial.ndim != fixed.ndim:
        raise InputError(f"the initial transform is {initial.ndim}D but the images are {fixed.ndim}D")
    check_pair(fixed, moving)
    check_mask(fixed_mask, "fixed mask", fixed)
    check_mask(moving_mask, "moving mask", moving)
    cfg = RegistrationConfig(transform=transform, metric=metric, **options)
    cfg.validate()
    levels = cfg.pyramid(fixed.grid)
    fside = FixedSide(fixed, levels, cfg.normalize)

    def run(start: Transform | None) -> RegistrationResult:
        return register_with_backend(moving, fixed.grid, ClearBackend(fside), cfg,
                                     mask_candidates(fixed_mask, levels, fixed.grid), moving_mask, start, progress,
                                     fixed=fside.fixed, fixed_mask=fixed_mask)

    res = run(initial)
    verdict = res.verdict
    if verdict is not None and verdict.better_start is not None and cfg.transform in LINEAR and cfg.restart:
        # the result is a local optimum: an unoptimised coarse perturbation of it (a rotation, a shift)
        # matches better. Run again from there and keep the run that ends better (elastix / ANTs search
        # over rotations when a registration fails to capture).
        if progress:
            progress(f"restarting from the better candidate '{verdict.better_start_name}'")
        again = run(verdict.better_start)
        e_old, e_new = res.report["quality"]["ecc"], again.report["quality"]["ecc"]
        chosen = again if e_new > e_old else res
        chosen.report["restart"] = {"from": verdict.better_start_name, "ecc_first_run": e_old,
                                    "ecc_restarted": e_new, "kept": "restarted" if chosen is again else "first run",
                                    "first_run_iterations": res.report["iterations"]}
        res = chosen
    return res
