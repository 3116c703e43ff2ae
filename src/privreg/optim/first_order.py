"""First-order optimisers (gradient descent, Adam, L-BFGS) on autograd objectives.

Parameters are optimised in scaled units (about 1 mm of point motion per unit), like ITK's
physical-shift scales, so one learning rate suits rotations and translations alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass
class FirstOrderOptions:
    method: str = "lbfgs"  # lbfgs | adam | gd
    max_iter: int = 100
    lr: float = 0.5  # mm per step for adam / gd
    tol: float = 1e-12  # change of the loss or step below which L-BFGS stops
    history_size: int = 20


def minimize_autograd(loss_fn: Callable[[int], Tensor], theta: Tensor, scales: Tensor | None,
                      options: FirstOrderOptions, log: Callable[[dict], None] | None = None) -> dict:
    """Minimise ``loss_fn(iteration)`` over ``theta`` (an nn.Parameter, updated in place)."""
    ref = theta.detach().clone()
    s = torch.ones_like(ref) if scales is None else scales.reshape(ref.shape).to(ref.dtype)
    z = torch.zeros_like(ref, requires_grad=True)

    def bind() -> None:
        theta.data = ref + z.detach() / s

    def closure_value(it: int) -> Tensor:
        theta_eff = ref + z / s
        theta.data = theta_eff.detach()
        # route gradients through z by a parameter swap
        loss = _with_param(theta, theta_eff, lambda: loss_fn(it))
        return loss

    # normalise the objective so that its initial gradient (in mm units) has unit max-norm:
    # L-BFGS's first step and tolerances are then independent of the metric's scale
    g0 = torch.autograd.grad(closure_value(0), z)[0]
    gain = 1.0 / max(float(g0.abs().max()), 1e-12)
    iters = 0
    m = options.method
    if m == "lbfgs":
        opt = torch.optim.LBFGS([z], lr=1.0, max_iter=options.max_iter, history_size=options.history_size,
                                line_search_fn="strong_wolfe", tolerance_change=options.tol, tolerance_grad=1e-12)
        counter = {"n": 0}

        def closure() -> Tensor:
            opt.zero_grad()
            loss = closure_value(counter["n"])
            scaled = gain * loss  # the line search needs the value and the gradient of the same function
            scaled.backward()
            counter["n"] += 1
            if log:
                log({"iteration": counter["n"], "value": float(loss.detach())})
            return scaled

        opt.step(closure)
        iters = counter["n"]
    elif m in ("adam", "gd"):
        opt = torch.optim.Adam([z], lr=options.lr) if m == "adam" else torch.optim.SGD([z], lr=options.lr)
        for it in range(options.max_iter):
            opt.zero_grad()
            loss = closure_value(it)
            loss.backward()
            opt.step()
            iters += 1
            if log:
                log({"iteration": iters, "value": float(loss.detach())})
    else:
        raise ValueError(f"unknown optimiser {m!r}; choose gn, lbfgs, adam or gd")
    bind()
    with torch.no_grad():
        final = float(_with_param(theta, theta.detach(), lambda: loss_fn(iters)))
    return {"iterations": iters, "final_value": final, "converged": True}


def _with_param(param: torch.nn.Parameter, value: Tensor, fn: Callable[[], Tensor]) -> Tensor:
    """Evaluate ``fn`` with ``param`` temporarily replaced by the (differentiable) ``value``."""
    module, name = _OWNERS.get(id(param), (None, None))
    if module is None:
        raise RuntimeError("parameter owner not registered; call register_owner first")
    saved = module._parameters[name]
    del module._parameters[name]
    setattr(module, name, value.to(saved.dtype))
    try:
        return fn()
    finally:
        delattr(module, name)
        module._parameters[name] = saved


_OWNERS: dict[int, tuple[torch.nn.Module, str]] = {}


def register_owner(module: torch.nn.Module) -> None:
    """Record which module owns each parameter (needed to substitute scaled parameters)."""
    for mod in module.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                _OWNERS[id(p)] = (mod, name)
