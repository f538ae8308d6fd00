"""The search: enumerate configurations, prune by lower bounds, place stages with CP-SAT, rank, explain.

`search(view, cluster, ...)` is a pure function of its inputs (no I/O); `planner.plan` wraps it with model and
cluster loading. Branch and bound: configurations are visited in order of their step-time lower bound and one is
solved only while its bound can still beat the best time found in its (dp, tp, pp) group or the top-k groups.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property

from planner.candidate import CandidateCosts, Config, PartitionCosts
from planner.cluster import ClusterSpec
from planner.enumerate import Bounder, SearchSpace, enumerate_configs, legal_degrees
from planner.evaluate import ModelView, PlanError, build_prediction, strategy_of
from planner.stages import StageOptions, greedy_bounds, solve_stages
from planner.strategy import Prediction, Strategy

log = logging.getLogger(__name__)


class Objective(str, Enum):
    """What the search minimises."""

    THROUGHPUT = "throughput"  #: step time
    MEMORY = "memory"  #: peak memory per device among strategies that fit, ties broken by step time


@dataclass
class Scored:
    """A solved candidate; its Strategy and Prediction objects are built only when asked for."""

    cfg: Config
    bounds: tuple[int, ...] | None
    status: str
    bound: float
    costs: CandidateCosts | None = None
    pc: PartitionCosts | None = None

    @cached_property
    def strategy(self) -> Strategy | None:
        """The full strategy (None when no partition exists)."""
        return strategy_of(self.cfg, self.bounds) if self.bounds is not None else None

    @cached_property
    def prediction(self) -> Prediction | None:
        """The cost model's prediction for the strategy."""
        return build_prediction(self.costs, self.pc) if self.pc is not None else None

    @property
    def fits(self) -> bool:
        """Whether a stage partition that fits memory exists."""
        return self.pc is not None and self.pc.fits

    @property
    def step(self) -> float:
        """Predicted step seconds."""
        return self.pc.step

    @property
    def peak(self) -> float:
        """Predicted peak bytes per device."""
        return max(rk.memory_v for rk in self.pc.ranks) / self.cfg.virtual_stages

    @property
    def over_rank(self) -> int:
        """Pipeline rank furthest over (or closest to) its memory capacity."""
        return max(range(len(self.pc.ranks)), key=lambda r: self.pc.ranks[r].memory_v)

    @property
    def over_bytes(self) -> float:
        """Bytes over capacity on the worst rank (0 when it fits)."""
        return max(0.0, self.peak - self.costs.capacity)

    def key(self, objective: Objective) -> tuple:
        """Sort key: the objective, then simpler strategies first (no ZeRO, no recompute, fewer stages)."""
        c = self.cfg
        simple = (int(c.zero), list(type(c.recompute)).index(c.recompute), c.dims.pp, c.virtual_stages, c.dims.tp,
                  -c.micro_batch)
        t = float(f"{self.step:.9e}")
        if objective == Objective.MEMORY:
            return (float(f"{self.peak:.6e}"), t, simple)
        return (t, simple)


@dataclass
class SearchResult:
    """Everything `planner.plan` needs to write a Plan."""

    best: Scored
    ranked: list[Scored]  #: best candidate of each (dp, tp, pp) group that fits, best first
    misfits: list[Scored]  #: groups whose best candidate does not fit, most promising first
    evaluated: int
    seconds: float
    status: str
    pure_dp: Scored | None = None
    notes: list[str] = field(default_factory=list)


def _group(cfg: Config) -> tuple[int, int, int]:
    return (cfg.dims.dp, cfg.dims.tp, cfg.dims.pp)


def search(view: ModelView, cluster: ClusterSpec, *, global_batch_size: int, top_k: int = 5,
           time_limit_s: float = 10.0, seed: int = 0, workers: int = 1,
           objective: Objective = Objective.THROUGHPUT, space: SearchSpace | None = None,
           solve_limit_s: float = 0.2, relative_gap: float = 1e-3, max_solves: int = 16) -> SearchResult:
    """Best strategy under the cost model, the best of the other degree groups, and the search's statistics."""
    t0 = time.perf_counter()
    space = space or SearchSpace()
    configs = enumerate_configs(view, cluster, global_batch_size, space)
    if not configs:
        raise PlanError(_batch_message(view, cluster, global_batch_size, space))
    bounder = Bounder(view, cluster)
    scored = []
    for cfg in configs:
        t_lb, m_lb, r_lb = bounder.bounds(cfg)
        key = m_lb if objective == Objective.MEMORY else t_lb
        scored.append((key, t_lb, m_lb, cfg, r_lb))
    cap = cluster.device.memory_bytes * (1 - cluster.memory_margin)
    fit_possible = [x for x in scored if x[2] <= cap]
    fit_possible.sort(key=lambda x: (x[0], x[1]))
    group_best: dict[tuple, Scored] = {}
    misfit_best: dict[tuple, Scored] = {}
    evaluated = 0
    budget = max(0.5, time_limit_s)

    def record(res: Scored) -> None:
        g = _group(res.cfg)
        if res.fits:
            if g not in group_best or res.key(objective) < group_best[g].key(objective):
                group_best[g] = res
        elif res.pc is not None and (g not in misfit_best or res.over_bytes < misfit_best[g].over_bytes):
            misfit_best[g] = res

    def overall() -> float:
        return min((s.key(objective)[0] for s in group_best.values()), default=float("inf"))

    # Pass 1: every configuration whose bound can still matter gets the balanced (greedy) partition, an upper
    # bound; single-stage ones are exact already.
    pending: list[tuple[float, Config, float]] = []
    for key, t_lb, m_lb, cfg, r_lb in fit_possible:
        g = _group(cfg)
        ranked_vals = sorted(s.key(objective)[0] for s in group_best.values())
        kth = ranked_vals[top_k] if len(ranked_vals) > top_k else float("inf")
        if key >= kth:
            break
        if g in group_best and key >= group_best[g].key(objective)[0]:
            continue
        res = _solve(view, cluster, cfg, key, StageOptions(), objective, may_solve=False)
        evaluated += 1
        record(res)
        if cfg.num_stages > 1:
            pending.append((key, cfg, r_lb))
    # Pass 2: CP-SAT for the multi-stage configurations whose bound is below the best time found, in bound order,
    # until the bound reaches the best (then the best is optimal) or the time budget is spent.
    bounder_v1 = _BottleneckBound()
    solves, closed = 0, True
    for key, cfg, r_lb in sorted(pending, key=lambda x: x[0]):
        if key >= overall():
            break
        if solves >= max_solves:
            closed = False
            break
        if objective == Objective.THROUGHPUT and bounder_v1.bound(view, cluster, cfg, key, r_lb) >= overall():
            continue
        remaining = budget - (time.perf_counter() - t0)
        if remaining <= 0:
            closed = False
            break
        res = _solve(view, cluster, cfg, key, StageOptions(time_limit_s=max(0.05, min(remaining, solve_limit_s)),
                                                           seed=seed, workers=workers, relative_gap=relative_gap),
                     objective, True)
        evaluated += 1
        solves += 1
        closed = closed and res.status in ("OPTIMAL", "INFEASIBLE")
        record(res)
    # The chosen configuration always gets a CP-SAT placement, so its status is the solver's word.
    if group_best:
        top = min(group_best.values(), key=lambda s: s.key(objective))
        if top.status == "GREEDY":
            res = _solve(view, cluster, top.cfg, top.bound, StageOptions(time_limit_s=solve_limit_s, seed=seed,
                         workers=workers, relative_gap=relative_gap), objective, True)
            evaluated += 1
            if res.fits and res.key(objective) <= top.key(objective):
                group_best[_group(top.cfg)] = res
    ranked = sorted(group_best.values(), key=lambda s: s.key(objective))
    # Groups that only failed the memory bound: score their fastest-looking configuration on a balanced split so
    # the plan can say by how much they miss.
    unsolved: dict[tuple, tuple] = {}
    for key, t_lb, m_lb, cfg, _ in scored:
        g = _group(cfg)
        if g not in group_best and g not in misfit_best and (g not in unsolved or t_lb < unsolved[g][0]):
            unsolved[g] = (t_lb, cfg)
    for t_lb, cfg in sorted(unsolved.values(), key=lambda x: x[0])[: top_k]:
        res = _solve(view, cluster, cfg, t_lb, StageOptions(), objective, may_solve=False)
        if res.pc is not None:
            misfit_best[_group(cfg)] = res
    misfits = sorted(misfit_best.values(), key=lambda s: s.step)
    if not ranked:
        raise PlanError(_no_fit_message(view, cluster, scored, misfits, space))
    best = ranked[0]
    pure = next((s for s in ranked if s.cfg.dims.tp == 1 and s.cfg.dims.pp == 1), None)
    status = best.status if closed else f"{best.status} (search stopped by its budget before proving optimality)"
    return SearchResult(best=best, ranked=ranked, misfits=misfits, evaluated=evaluated,
                        seconds=time.perf_counter() - t0, status=status, pure_dp=pure)


class _BottleneckBound:
    """Tighter step-time bound for 1F1B/GPipe: the slowest stage is at least the min-max contiguous split."""

    def __init__(self) -> None:
        self._cache: dict[tuple, float] = {}

    def bound(self, view: ModelView, cluster: ClusterSpec, cfg: Config, lower: float, slowest: float) -> float:
        """`lower` raised by (m - 1) (B* - slowest), B* the min-max stage time (no memory), `slowest` the one
        `lower` assumed."""
        if cfg.virtual_stages != 1 or cfg.dims.pp == 1:
            return lower
        costs = CandidateCosts(view.profile, cluster, cfg, view.cut_bytes)
        key = (tuple(costs.P_time), cfg.dims.pp)
        if key not in self._cache:
            self._cache[key] = minmax_split(costs.P_time, view.cuts, cfg.dims.pp)
        return lower + (cfg.num_micro_batches - 1) * max(0.0, self._cache[key] - slowest)


def minmax_split(P: list[float], cuts: list[int], n: int) -> float:
    """Smallest possible largest stage time when layers (prefix times P) are split at `cuts` into n stages."""
    L = len(P) - 1
    pos_cuts = [0, *cuts, L]
    vals = [P[k] for k in pos_cuts]

    def stages_needed(limit: float) -> int:
        count, i = 0, 0
        while i < len(pos_cuts) - 1:
            j = bisect.bisect_right(vals, vals[i] + limit) - 1
            if j <= i:
                return n + 1
            i, count = j, count + 1
        return count

    lo, hi = 0.0, P[-1]
    for _ in range(60):
        mid = (lo + hi) / 2
        if stages_needed(mid) <= n:
            hi = mid
        else:
            lo = mid
    return lo * (1 - 1e-12)


def _solve(view: ModelView, cluster: ClusterSpec, cfg: Config, bound: float, options: StageOptions,
           objective: Objective, may_solve: bool) -> Scored:
    """Stage boundaries for one configuration: CP-SAT, or the greedy hint when the time budget is spent."""
    costs = CandidateCosts(view.profile, cluster, cfg, view.cut_bytes)
    if cfg.num_stages == 1:
        bounds, status = (0, view.profile.num_layers), "TRIVIAL"
    else:
        sol = solve_stages(costs, view.cuts, options, objective="memory" if objective == Objective.MEMORY
                           else "time") if may_solve else None
        if sol is not None and sol.bounds is not None:
            bounds, status = sol.bounds, sol.status
        else:
            hint = greedy_bounds(costs, view.cuts)
            if hint is None:
                return Scored(cfg=cfg, bounds=None, status="INFEASIBLE", bound=bound)
            bounds, status = tuple(hint), (sol.status if sol is not None else "GREEDY")
    pc = costs.evaluate_bounds(list(bounds))
    return Scored(cfg=cfg, bounds=tuple(bounds), status=status, bound=bound, costs=costs, pc=pc)


def _batch_message(view: ModelView, cluster: ClusterSpec, batch: int, space: SearchSpace) -> str:
    dps = sorted({dp for dp, _, _ in legal_degrees(view, cluster, space)})
    if not dps:
        return (f"no (dp, tp, pp) split of {cluster.world_size} devices is legal for this model (tp must divide the "
                f"attention heads and stay inside a node; pp at most {len(view.cuts) + 1}); change the cluster size")
    lower = next((b for b in range(batch - 1, 0, -1) if any(b % d == 0 for d in dps)), None)
    upper = next(b for b in range(batch + 1, batch + 1 + max(dps)) if any(b % d == 0 for d in dps))
    near = " or ".join(str(b) for b in (lower, upper) if b is not None)
    return (f"global batch {batch} is not divisible by any data-parallel degree possible on {cluster.world_size} "
            f"devices (dp in {dps}); use a global batch of {near}")


def _no_fit_message(view: ModelView, cluster: ClusterSpec, scored: list, misfits: list[Scored],
                    space: SearchSpace) -> str:
    GB = 1e9
    cap = cluster.device.memory_bytes * (1 - cluster.memory_margin)
    closest = min(scored, key=lambda x: x[2])
    cfg, need = closest[3], closest[2]
    where = ""
    if misfits:
        s = min(misfits, key=lambda x: x.over_bytes)
        cfg, need = s.cfg, s.over_bytes + cap
        where = f" on pipeline rank {s.over_rank}"
    over = need - cap
    tips = []
    ratio = need / cap
    tips.append(f"about {max(cluster.nodes + 1, int(cluster.nodes * ratio + 0.999))} nodes instead of "
                f"{cluster.nodes} (more GPUs)")
    from planner.strategy import Recompute
    if Recompute.FULL not in space.recompute:
        tips.append("allow full activation recomputation")
    if cfg.micro_batch > 1 or (space.micro_batch_sizes and min(space.micro_batch_sizes) > 1):
        tips.append("a smaller micro-batch")
    if 3 not in space.zero_stages:
        tips.append("allow ZeRO stage 3")
    return (f"no strategy fits in {cap / GB:.1f} GB per device ({cluster.device.name}, "
            f"{cluster.memory_margin:.0%} held back): the closest, {cfg.dims.dp}x{cfg.dims.tp}x{cfg.dims.pp} "
            f"(dp x tp x pp) with ZeRO-{int(cfg.zero)}, micro-batch {cfg.micro_batch} and recompute "
            f"{cfg.recompute.value}, needs {need / GB:.1f} GB{where}, {over / GB:.1f} GB over; try "
            + ", or ".join(tips))
