"""The public plan of a private registration and the budget party 2 derives from it.

Both parties state the plan on their own command lines (transform, metric and bins, levels and
iterations, sampling, control-grid spacing, protocol); party 2 adds its fixed grid and, for CKKS,
its own parameters. Party 2 refuses a session whose plan differs from its own, and *before any
image-derived value moves* derives from its own plan a hard budget: per pyramid level the number of
seam calls (iterations + 1), the shape of every U (rows: the level's sample, columns: what the
metric needs) and the values each call opens (:func:`privreg.objectives.seam_need`). A call outside
the budget ends the session.

What the budget bounds: a malicious party 1 chooses U freely (its own moving image), so each opened
value can be any linear functional of party 2's features it likes. ``total_values`` is therefore the
most linear functionals of J (SSD) or of its one-hot bin image (MI) it can obtain in one session,
and party 2 refuses plans above ``limit_fraction`` x the fixed image's voxels (and keeps a ledger
across sessions, :mod:`privreg.secure.ledger`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from ..errors import InputError
from ..grid import Grid
from ..joint import Need
from ..objectives import seam_need, seam_shape
from ..register import RegistrationConfig
from ..transforms import BSplineTransform

PROTOCOLS = ("mpc", "fhe-v1", "fhe-v2")
DEFAULT_LIMIT_FRACTION = 0.1  # party 2 opens at most this fraction of its voxels' worth of functionals


class PlanMismatch(InputError):
    """The two parties stated different plans (a usage error on one side: exit 2 on both)."""


@dataclass(frozen=True)
class LevelBudget:
    """What one pyramid level may cost party 2."""

    factor: float
    max_iter: int
    calls: int  # seam calls allowed: the first evaluation plus one per iteration
    points: int  # rows of every U (the level's sample)
    basis: int  # P: basis functions of the transform
    cols: int  # a: columns of U
    features: int  # b: columns of V
    values_per_call: int  # entries a call opens (seam_need)

    @property
    def values(self) -> int:
        return self.calls * self.values_per_call


def public_plan(protocol: str, cfg: RegistrationConfig, fixed_grid: Grid) -> dict:
    """The fields both parties must agree on (everything else is party 1's own business)."""
    cfg.validate()  # resolves defaults (e.g. intensity normalisation) exactly as the run will
    levels = cfg.pyramid(fixed_grid)
    plan = {"protocol": protocol, "transform": cfg.transform, "metric": cfg.metric,
            "levels": [[lev.factor, lev.sigma_mm, lev.max_iter] for lev in levels],
            "sampling": dataclasses.asdict(cfg.sampling), "normalize": bool(cfg.normalize)}
    if cfg.metric == "mi":
        plan["bins"] = cfg.bins
    if cfg.transform == "bspline":
        plan["grid_spacing"] = cfg.grid_spacing
    return json.loads(json.dumps(plan))  # plain JSON types, as the peer will see them


def plan_difference(mine: dict, theirs: object) -> str | None:
    """A one-line description of the first difference between two public plans, or None."""
    if not isinstance(theirs, dict):
        return "the peer sent no plan"
    for key in sorted(set(mine) | set(theirs)):
        if mine.get(key) != theirs.get(key):
            return f"{key}: here {json.dumps(mine.get(key))}, peer {json.dumps(theirs.get(key))}"
    return None


def num_basis(cfg: RegistrationConfig, fixed_grid: Grid) -> int:
    """P: the transform's basis functions (linear: d + 1; B-spline: control points)."""
    if cfg.transform == "bspline":
        return BSplineTransform.for_domain(fixed_grid, cfg.grid_spacing).ctrl.numel
    return fixed_grid.ndim + 1


def level_budgets(cfg: RegistrationConfig, fixed_grid: Grid) -> list[LevelBudget]:
    d = fixed_grid.ndim
    a, b = seam_shape(cfg.metric, d, cfg.bins)
    need = seam_need(cfg.metric, d, cfg.bins)
    p = num_basis(cfg, fixed_grid)
    out = []
    for lev in cfg.pyramid(fixed_grid):
        n = fixed_grid.downsample(lev.factor).numel
        points = n if cfg.sampling.takes_all(n) else cfg.sampling.count(n)
        out.append(LevelBudget(lev.factor, lev.max_iter, lev.max_iter + 1, points, p, a, b, need.count(p, a, b)))
    return out


@dataclass
class Budget:
    """Party 2's running account of one session against its plan; every check raises on excess."""

    levels: list[LevelBudget]
    need: Need
    level: int = -1
    calls: int = 0  # in the current level
    opened: int = 0  # values opened so far in this session

    @property
    def total_values(self) -> int:
        return sum(lev.values for lev in self.levels)

    def start_level(self, level: int) -> LevelBudget:
        if level != self.level + 1 or level >= len(self.levels):
            raise BudgetExceeded(f"party 1 asked for level {level}; the plan's next level is {self.level + 1} "
                                 f"of {len(self.levels)}")
        self.level, self.calls = level, 0
        return self.levels[level]

    def current(self) -> LevelBudget:
        if self.level < 0:
            raise BudgetExceeded("a product was requested before any level was started")
        return self.levels[self.level]

    def charge_call(self, rows: int, cols: int) -> LevelBudget:
        """Count one seam call whose U is ``rows`` x ``cols``; refuse anything the plan does not allow."""
        lev = self.current()
        if cols != lev.cols:
            raise BudgetExceeded(f"party 1 sent a U with {cols} columns; the plan's metric needs {lev.cols}")
        if rows != lev.points:
            raise BudgetExceeded(f"party 1 sent a U with {rows} rows; the plan's sample has {lev.points} points")
        if self.calls >= lev.calls:
            raise BudgetExceeded(f"party 1 asked for more than the plan's {lev.calls} products at level {self.level}")
        self.calls += 1
        self.opened += lev.values_per_call
        return lev


class BudgetExceeded(PlanMismatch):
    """Party 1 asked for something outside the agreed plan: the session ends, nothing more is opened."""


def check_limit(total_values: int, voxels: int, fraction: float) -> None:
    """Refuse a plan that could open more functionals than ``fraction`` of the fixed image's voxels."""
    limit = math.floor(fraction * voxels)
    if total_values > limit:
        raise PlanMismatch(
            f"the plan lets party 1 obtain up to {total_values} linear functionals of the fixed image "
            f"({total_values / voxels:.1%} of its {voxels} voxels), above the fixed party's limit of {fraction:g} "
            f"(--reveal-limit): use fewer iterations, levels or sample points, or a coarser control grid")
