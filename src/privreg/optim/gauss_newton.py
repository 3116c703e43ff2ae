"""Gauss-Newton with Levenberg-Marquardt damping (PPIR Algorithm 1).

Each iteration needs one objective evaluation (one round of the joint-product seam).
With full sampling a step is accepted only if the cost decreased. The Levenberg-Marquardt damping
follows the gain ratio rho = actual / predicted decrease (Marquardt's rule: divide by 3 when
rho > 3/4, double when rho < 1/4; after a rejection multiply by 2, 4, 8, ... as in Nielsen's rule),
so it settles where steps are accepted instead of alternating accept/reject.

The model Hessian is also scaled by a curvature factor c <= 1, solving (c H + mu diag H) d = -g.
When the actual decrease is more than 1.5x the predicted one while mu is already negligible
(<= 1e-6), the model is too curved along the step and c is halved (down to 1e-3); when rho < 1/2, or a step is rejected, c grows back towards 1
before mu is raised. On a quadratic with an exact Hessian rho = 1 and c stays 1 (SSD: plain
Levenberg-Marquardt). MI's Dowson-Bowden Hessian with a sparsely filled joint histogram
overestimates the curvature at the scale of the misalignment many times (rho ~ 2 at every step,
0.1 mm steps 4 mm from the optimum); c lets those steps grow. With stochastic sampling (URS/GMS)
every step is taken, as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..errors import InputError
from ..objectives import Evaluation, JointObjective

F64 = torch.float64


@dataclass
class GNOptions:
    max_iter: int = 100
    tol_mm: float = 1e-3  # stop when the RMS point displacement of a step is below this
    damping: float = 1e-3  # initial Levenberg-Marquardt factor (relative to diag(H))
    cg_iter: int = 20  # matrix-free solves: truncated conjugate gradients (inexact Gauss-Newton)
    cg_tol: float = 1e-2  # ... stopped when the residual falls below this fraction of the first
    max_step_mm: float = 0.0  # 0 = no cap; else rescale steps whose max displacement exceeds it
    secant: bool = False  # dense Hessians, fixed points: correct the model by BFGS from the gradients
    secant_model: Tensor | None = None  # the previous level's final BFGS model (same parameters)


def _solve(ev: Evaluation, mu: float, cg_iter: int, curv: float = 1.0, cg_tol: float = 1e-2) -> Tensor:
    g = ev.grad.to(F64)
    if ev.hess is not None:
        h = ev.hess.to(F64)
        diag = torch.diagonal(h).clamp(min=0)
        scale = float(diag.mean()) if diag.numel() else 1.0
        a = curv * h + torch.diag(mu * diag + 1e-9 * max(scale, 1e-30))
        try:
            return -torch.linalg.solve(a, g)
        except RuntimeError:
            return -torch.linalg.lstsq(a, g[:, None]).solution[:, 0]
    # matrix-free preconditioned conjugate gradients
    diag = ev.hess_diag.to(F64).clamp(min=0)
    reg = mu * diag + 1e-9 * float(diag.mean() + 1e-30)
    precond = 1.0 / (curv * diag + reg)

    def op(v: Tensor) -> Tensor:
        return curv * ev.hess_matvec(v) + reg * v

    x = torch.zeros_like(g)
    r = -g - op(x)
    z = precond * r
    p = z.clone()
    rz = float(r @ z)
    r0 = math.sqrt(float(r @ r)) + 1e-30
    for _ in range(cg_iter):
        ap = op(p)
        alpha = rz / max(float(p @ ap), 1e-300)
        x = x + alpha * p
        r = r - alpha * ap
        if math.sqrt(float(r @ r)) < cg_tol * r0:
            break
        z = precond * r
        rz_new = float(r @ z)
        p = z + (rz_new / max(rz, 1e-300)) * p
        rz = rz_new
    return x


def _predicted_gain(ev: Evaluation, delta: Tensor, curv: float = 1.0) -> float:
    """Decrease of the (curvature-scaled) Gauss-Newton model: -(g^T d + c d^T H d / 2)."""
    d = delta.to(F64)
    hd = ev.hess.to(F64) @ d if ev.hess is not None else ev.hess_matvec(d)
    return -float(ev.grad.to(F64) @ d + 0.5 * curv * (d @ hd))


def secant_update(b: Tensor, s: Tensor, y: Tensor, first: bool) -> Tensor:
    """Powell-damped BFGS update of the model Hessian ``b`` by a step ``s`` and gradient change ``y``.

    The first update also rescales ``b`` so its curvature along ``s`` matches the measured s^T y
    (within 10^+-3): Mattes MI's Dowson-Bowden Hessian is 3-10x below the actual curvature near the
    optimum and far above it 4 mm away, so the Gauss-Newton matrix fixes the model's shape and the
    gradients its scale. Damping keeps ``b`` positive definite when s^T y is small or negative."""
    s, y = s.to(F64), y.to(F64)
    bs = b @ s
    sbs = float(s @ bs)
    if sbs <= 0:
        return b
    sy = float(s @ y)
    if first and sy > 0:
        gamma = min(max(sy / sbs, 1e-3), 1e3)
        b, bs, sbs = b * gamma, bs * gamma, sbs * gamma
    theta = 1.0 if sy >= 0.2 * sbs else 0.8 * sbs / (sbs - sy)
    r = theta * y + (1.0 - theta) * bs
    return b - torch.outer(bs, bs) / sbs + torch.outer(r, r) / float(s @ r)


def step_displacement(objective: JointObjective, ev: Evaluation, delta: Tensor) -> Tensor:
    """Displacement (N, d) of the sampled points caused by a parameter step."""
    jac = objective.model.chain()
    dvec = delta if jac is None else jac @ delta
    d = objective.model.ndim
    return ev.basis.apply(dvec.reshape(-1, d)) @ objective.model.outer_linear.T


def gauss_newton(objective: JointObjective, draw: Callable[[int], Tensor | None], stochastic: bool,
                 options: GNOptions, log: Callable[[dict], None] | None = None) -> dict:
    """Minimise ``objective``; ``draw(iteration)`` gives the point indices of each iteration."""
    model = objective.model
    mu, nu, curv = options.damping, 2.0, 1.0
    it = 0
    ev = objective.evaluate(draw(0))
    evals = 1
    converged = False
    last_step = float("nan")
    if options.secant and ev.hess is not None and not stochastic:
        return _secant_line_search(objective, draw, options, log, ev)
    while it < options.max_iter:
        delta = _solve(ev, mu, options.cg_iter, curv, options.cg_tol)
        disp = step_displacement(objective, ev, delta)
        norms = torch.linalg.norm(disp, dim=1)
        if options.max_step_mm > 0 and float(norms.max()) > options.max_step_mm:
            f = options.max_step_mm / float(norms.max())
            delta, norms = delta * f, norms * f
        last_step = float(torch.sqrt((norms**2).mean()))
        model.update(delta)
        it += 1
        try:
            new = objective.evaluate(draw(it), reference=None if stochastic else ev)
        except InputError:
            if stochastic:
                raise
            new = None  # the step left the overlap: reject it like a cost increase
        evals += 1
        if not stochastic and (new is None or not (new.value <= ev.value)):
            model.update(-delta)  # reject: restore and damp more
            if curv < 1.0:
                curv = min(1.0, 4.0 * curv)
            else:
                mu = min(mu * nu, 1e8)
                nu *= 2.0
            if log:
                log({"iteration": it, "value": ev.value, "step_mm": last_step, "accepted": False, "damping": mu})
            if mu >= 1e8 or last_step < options.tol_mm:
                converged = last_step < options.tol_mm
                break
            continue
        if not stochastic:  # damp by how well the quadratic model predicted the gain
            rho = (ev.value - new.value) / max(_predicted_gain(ev, delta, curv), 1e-300)
            if rho > 0.75:
                mu = max(mu / 3.0, 1e-7)
                if rho > 1.5 and mu <= 1e-6:
                    curv = max(curv / 2.0, 1e-3)
            elif rho < 0.5 and curv < 1.0:
                curv = min(1.0, 2.0 * curv)
            elif rho < 0.25:
                mu = min(mu * 2.0, 1e8)
            nu = 2.0
        ev = new
        if log:
            log({"iteration": it, "value": ev.value, "step_mm": last_step, "accepted": True, "damping": mu,
                 "curvature": curv, "points": ev.num_points})
        if last_step < options.tol_mm:
            converged = True
            break
    return {"iterations": it, "evaluations": evals, "final_value": ev.value, "converged": converged,
            "last_step_mm": last_step}


def _cubic_step(a: float, f0: float, d0: float, f1: float, d1: float) -> float:
    """Minimiser in (0, a) of the cubic through values f0, f1 and slopes d0, d1 at 0 and a
    (Nocedal & Wright eq. 3.59), kept within [0.1 a, 0.9 a]; quadratic when the cubic has none."""
    t1 = d0 + d1 - 3.0 * (f0 - f1) / (0.0 - a)
    disc = t1 * t1 - d0 * d1
    if disc >= 0:
        t2 = math.sqrt(disc)
        den = d1 - d0 + 2.0 * t2
        new = a - a * (d1 + t2 - t1) / den if den != 0 else 0.5 * a
    else:
        curv = f1 - f0 - d0 * a
        new = -d0 * a * a / (2.0 * curv) if curv > 0 else 0.5 * a
    return min(max(new, 0.1 * a), 0.9 * a)


def _secant_line_search(objective: JointObjective, draw: Callable[[int], Tensor | None], options: GNOptions,
                        log: Callable[[dict], None] | None, ev: Evaluation) -> dict:
    """Quasi-Newton with the Gauss-Newton matrix as its first model and a line search.

    The model B starts as the level's Gauss-Newton Hessian and is corrected after every step by the
    gradients (:func:`secant_update`); each step d = -B^-1 g is searched along: the trial's value and
    slope give a cubic whose minimiser is tried next until the Armijo condition holds. Used for
    Mattes MI on fixed points, whose Dowson-Bowden matrix has the right shape but not the right scale
    (Levenberg-Marquardt spent every other evaluation on a rejected overshoot). ``secant_model``
    replaces the first model by the previous pyramid level's final one (3D T1/T2 affine: 18.7 -> 13
    fine-level iterations over 3 seeds, same error); the result's ``secant_model`` is this level's."""
    model = objective.model
    b = ev.hess.to(F64).clone()
    start = options.secant_model
    if start is not None and start.shape == b.shape:  # warm start: the coarser level learnt the scale
        b = start.to(F64).clone()
    it, evals, updates = 0, 1, 0
    converged = False
    last_step = float("nan")
    first_alpha = 1.0
    restarted = False
    while it < options.max_iter:
        ev.hess = b
        delta = _solve(ev, 1e-6, options.cg_iter)
        norms = torch.linalg.norm(step_displacement(objective, ev, delta), dim=1)
        if options.max_step_mm > 0 and float(norms.max()) > options.max_step_mm:
            f = options.max_step_mm / float(norms.max())
            delta, norms = delta * f, norms * f
        slope = float(ev.grad.to(F64) @ delta)
        if slope >= 0:  # not a descent direction (B lost positive definiteness, or a zero gradient)
            if restarted:  # already restarted from B's diagonal: nothing left to descend along
                converged = not bool(ev.grad.abs().max() > 0)
                break
            b, restarted = torch.diag(torch.diagonal(b).abs().clamp(min=1e-12)), True
            continue
        restarted = False
        rms = float(torch.sqrt((norms**2).mean()))
        if rms < options.tol_mm:  # the model's own step to its minimum is below tolerance: done
            last_step, converged = rms, True
            break
        alpha, moved, new = first_alpha, 0.0, None
        for _ in range(4):  # backtracking by cubic interpolation
            model.update((alpha - moved) * delta)
            moved = alpha
            it += 1
            evals += 1
            try:
                new = objective.evaluate(draw(it), reference=ev, hessian=False)  # B replaces the Hessian
            except InputError:
                new = None
            ok = new is not None and new.value <= ev.value + 1e-4 * alpha * slope
            last_step = alpha * rms
            if log:
                log({"iteration": it, "value": new.value if ok else ev.value, "step_mm": last_step, "accepted": ok,
                     "damping": alpha})
            if ok or it >= options.max_iter:
                break
            alpha = 0.25 * alpha if new is None else _cubic_step(alpha, ev.value, slope, new.value,
                                                                 float(new.grad.to(F64) @ delta))
        if new is None or not new.value <= ev.value:  # no decrease along the direction: stop here
            model.update(-moved * delta)
            converged = last_step < 10 * options.tol_mm
            break
        b = secant_update(b, moved * delta, new.grad - ev.grad, first=updates == 0)
        updates += 1
        first_alpha = min(1.0, 2.0 * moved)  # the model overshot by about the same factor as last time
        ev = new
    return {"iterations": it, "evaluations": evals, "final_value": ev.value, "converged": converged,
            "last_step_mm": last_step, "secant_model": b}
