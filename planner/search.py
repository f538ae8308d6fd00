"""The search: enumerate configurations, prune by lower bounds, place stages with CP-SAT, rank, explain.

`search(view, cluster, ...)` is a pure function of its inputs (no I/O); `planner.plan` wraps it with model and
cluster loading. Anytime branch and bound: configurations are visited in order of their step-time lower bound and
one is solved only while its bound can still beat the best time found; the search ends when no open bound can (the
choice is proved optimal) or when its time budget is spent (the proved gap is reported). Among strategies predicted
within `simplicity_tolerance` of the fastest, the simplest is chosen.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property

from planner.budget import Budget
from planner.candidate import CandidateCosts, Config, PartitionCosts
from planner.cluster import ClusterSpec
from planner.enumerate import Bounder, SearchSpace, enumerate_configs, legal_degrees
from planner.evaluate import ModelView, PlanError, build_prediction, strategy_of
from planner.stages import StageOptions, greedy_bounds, solve_stages
from planner.strategy import Prediction, Recompute, Strategy

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
    lower: float | None = None  #: CP-SAT's proved lower bound on the step time of any partition, when it gave one

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
        simple = (int(c.zero_stage), list(type(c.recompute)).index(c.recompute), c.dims.pp, c.virtual_stages, c.dims.tp,
                  int(c.sequence_parallel), -c.micro_batch_size)
        t = float(f"{self.step:.9e}")
        if objective == Objective.MEMORY:
            return (float(f"{self.peak:.6e}"), t, simple)
        return (t, simple)


#: Default `simplicity_tolerance`: strategies predicted within 3% of the fastest count as equally fast. The cost
#: model's measured error band: |error| <= 2.6% on the six Megatron-LM SC'21 Table 1 rows without deep pipelines
#: (bench/megatron_table1.py with attention unfused as Megatron ran it, docs/planner.md), so it cannot tell apart
#: strategies closer than that.
SIMPLICITY_TOLERANCE = 0.03


def simplicity(cfg: Config) -> tuple:
    """Sort key, simpler first: lower ZeRO stage (DDP < ZeRO-1 < ZeRO-3), then fewer pipeline stages, then less
    recomputation, then less tensor parallelism, then no sequence parallelism."""
    return (int(cfg.zero_stage), cfg.dims.pp, cfg.virtual_stages, list(Recompute).index(cfg.recompute), cfg.dims.tp,
            int(cfg.sequence_parallel))


@dataclass
class SearchResult:
    """Everything `planner.plan` needs to write a Plan."""

    best: Scored
    ranked: list[Scored]  #: best candidate of each (dp, tp, pp) group that fits, best first (plus `fastest`)
    misfits: list[Scored]  #: groups whose best candidate does not fit, most promising first
    evaluated: int
    seconds: float
    status: str  #: the chosen placement's CP-SAT status, and the proved gap when the budget ran out
    pure_dp: Scored | None = None
    notes: list[str] = field(default_factory=list)
    gap: float = 0.0  #: proved bound on how much faster the optimum can be, as a fraction of `fastest`'s time
    proved: bool = True  #: whether the search closed (gap <= relative_gap) before its time budget ran out
    checked: bool = True  #: whether every simpler strategy within the tolerance was checked before the budget ran out
    fastest: Scored | None = None  #: the fastest strategy found, when a simpler one within the tolerance was chosen
    tolerance: float = 0.0  #: the simplicity tolerance the choice was made with


def _group(cfg: Config) -> tuple[int, int, int]:
    return (cfg.dims.dp, cfg.dims.tp, cfg.dims.pp)


def search(view: ModelView, cluster: ClusterSpec, *, global_batch_size: int, top_k: int = 5,
           time_limit_s: float = 10.0, seed: int = 0, workers: int = 1,
           objective: Objective = Objective.THROUGHPUT, space: SearchSpace | None = None,
           solve_limit_s: float = 0.2, relative_gap: float = 1e-3,
           simplicity_tolerance: float = SIMPLICITY_TOLERANCE, budget: Budget | None = None) -> SearchResult:
    """Best strategy under the cost model, the best of the other degree groups, and the search's statistics.

    Anytime branch and bound: it stops when the smallest lower bound of the configurations still open reaches the
    best time found (optimal within `relative_gap`) or when `time_limit_s` is spent, and reports the gap it proved.
    A CP-SAT solve first gets `solve_limit_s`; a configuration it does not close goes back in the queue with four
    times that. With the throughput objective, the simplest strategy within `simplicity_tolerance` of the fastest
    is chosen (see `simplicity`). A `budget` (from `planner.plan`, which started it before preparing the graph)
    replaces `time_limit_s`: its deadline is the search's, and its cancellation flag stops the search.
    """
    t0 = time.perf_counter()
    budget = budget or Budget(time_limit_s)
    deadline = budget.expires_at
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
    seen: dict[Config, Scored] = {}
    evaluated = 0

    def record(res: Scored) -> None:
        g = _group(res.cfg)
        if res.pc is not None and (res.cfg not in seen or not seen[res.cfg].fits
                                   or (res.fits and res.key(objective) < seen[res.cfg].key(objective))):
            seen[res.cfg] = res
        if res.fits:
            if g not in group_best or res.key(objective) < group_best[g].key(objective):
                group_best[g] = res
        elif res.pc is not None and (g not in misfit_best or res.over_bytes < misfit_best[g].over_bytes):
            misfit_best[g] = res

    def overall() -> float:
        return min((s.key(objective)[0] for s in group_best.values()), default=float("inf"))

    def options(limit: float) -> StageOptions:
        budget.check_cancelled()  # before every CP-SAT solve: an abandoned request stops here
        return StageOptions(time_limit_s=max(0.05, limit), seed=seed, workers=workers, relative_gap=relative_gap)

    # Pass 1: every configuration whose bound can still matter gets the balanced (greedy) partition, an upper
    # bound; single-stage ones are exact already.
    pending: list[tuple[float, Config, float]] = []
    for key, t_lb, m_lb, cfg, r_lb in fit_possible:
        g = _group(cfg)
        ranked_vals = sorted(s.key(objective)[0] for s in group_best.values())
        kth = ranked_vals[top_k] if len(ranked_vals) > top_k else float("inf")
        if key >= kth:
            break
        if budget.expired() and group_best:
            break  # the budget covers this pass too; what is scored so far is an answer
        budget.check("scoring the candidate configurations")
        if g in group_best and key >= group_best[g].key(objective)[0]:
            continue
        res = _solve(view, cluster, cfg, key, StageOptions(), objective, may_solve=False)
        evaluated += 1
        record(res)
        if cfg.num_stages > 1:
            pending.append((key, cfg, r_lb))
    # Pass 2: CP-SAT for the multi-stage configurations, smallest lower bound first, until that bound reaches the
    # best time found (then the best is optimal) or the budget is spent. A solve that does not close its
    # configuration returns it to the queue with a longer limit.
    bounder_v1 = _BottleneckBound()
    queue = [(key, i, cfg, r_lb, solve_limit_s, False) for i, (key, cfg, r_lb) in enumerate(pending)]
    heapq.heapify(queue)
    while queue and queue[0][0] < overall() * (1 - relative_gap):
        lb, i, cfg, r_lb, limit, tight = heapq.heappop(queue)
        if not tight and objective == Objective.THROUGHPUT:  # tighten lazily, keeping smallest-bound-first order
            heapq.heappush(queue, (max(lb, bounder_v1.bound(view, cluster, cfg, lb, r_lb)), i, cfg, r_lb, limit,
                                   True))
            continue
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            heapq.heappush(queue, (lb, i, cfg, r_lb, limit, tight))
            break
        res = _solve(view, cluster, cfg, lb, options(min(limit, remaining)), objective, True)
        evaluated += 1
        record(res)
        if res.status not in ("OPTIMAL", "INFEASIBLE"):
            heapq.heappush(queue, (max(lb, res.lower or lb), i, cfg, r_lb, limit * 4, tight))
    if not group_best:
        ranked: list[Scored] = []
    else:
        incumbent = overall()
        open_lb = min((q[0] for q in queue), default=incumbent)
        gap = max(0.0, 1 - open_lb / incumbent) if incumbent > 0 else 0.0
        fastest = min(group_best.values(), key=lambda s: s.key(objective))
        best, checked = fastest, True
        if objective == Objective.THROUGHPUT and simplicity_tolerance > 0:
            best, solved, checked = _prefer_simpler(
                view, cluster, fit_possible, seen, fastest, simplicity_tolerance, deadline, solve_limit_s, options,
                record, lambda cfg, lb, r_lb: bounder_v1.bound(view, cluster, cfg, lb, r_lb))
            evaluated += solved
        # The chosen configuration always gets a CP-SAT placement, so its status is the solver's word.
        if best.status == "GREEDY":
            res = _solve(view, cluster, best.cfg, best.bound,
                         options(min(solve_limit_s, max(0.0, deadline - time.perf_counter()))), objective, True)
            evaluated += 1
            if res.fits and res.key(objective) <= best.key(objective):
                best = res
        others = [s for s in group_best.values() if _group(s.cfg) != _group(best.cfg)]
        if best.cfg != fastest.cfg:
            others.append(fastest)
        ranked = [best, *sorted(others, key=lambda s: s.key(objective))]
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
    proved = gap <= relative_gap
    cut_short = ([] if proved else [f"proved within {gap:.1%} of optimal"]) + (
        [] if checked else [f"not every simpler strategy within {simplicity_tolerance:.0%} checked"])
    status = best.status + (f" (search stopped by its {budget.time_limit_s:g} s budget; {'; '.join(cut_short)})"
                            if cut_short else "")
    pure = next((s for s in ranked if s.cfg.dims.tp == 1 and s.cfg.dims.pp == 1), None)
    return SearchResult(best=best, ranked=ranked, misfits=misfits, evaluated=evaluated,
                        seconds=time.perf_counter() - t0, status=status, pure_dp=pure, gap=gap, proved=proved,
                        checked=checked,
                        fastest=fastest if best.cfg != fastest.cfg else None,
                        tolerance=simplicity_tolerance if objective == Objective.THROUGHPUT else 0.0)


def _prefer_simpler(view: ModelView, cluster: ClusterSpec, fit_possible: list, seen: dict, fastest: Scored,
                    tolerance: float, deadline: float, first_limit: float, options, record, tighten
                    ) -> tuple[Scored, int, bool]:
    """The simplest configuration predicted within `tolerance` of `fastest` (the fastest of its simplicity class),
    how many configurations it evaluated, and whether it checked every simpler one before the deadline.

    Multi-stage configurations get CP-SAT like pass 2: `first_limit` seconds, four times more while the solver
    neither closes them nor finds a partition inside the window nor proves one impossible.
    """
    window = fastest.step * (1 + tolerance)
    solved, complete = 0, True
    classes: dict[tuple, list] = {}
    for _, t_lb, _, cfg, r_lb in fit_possible:
        if t_lb <= window and simplicity(cfg) < simplicity(fastest.cfg):
            t_lb = tighten(cfg, t_lb, r_lb)
            if t_lb <= window:
                classes.setdefault(simplicity(cfg), []).append((t_lb, cfg))
    for cls in sorted(classes):
        pick = None
        for t_lb, cfg in sorted(classes[cls], key=lambda x: x[0]):
            if pick is not None and t_lb >= pick.step:
                break
            res, limit = seen.get(cfg), first_limit
            while res is None or (cfg.num_stages > 1 and res.status not in ("OPTIMAL", "INFEASIBLE")
                                  and not (res.fits and res.step <= window)
                                  and (res.lower is None or res.lower <= window)):
                remaining = deadline - time.perf_counter()
                if res is not None and remaining <= 0:
                    complete = False
                    break
                res = _solve(view, cluster, cfg, t_lb, options(min(limit, remaining)), Objective.THROUGHPUT,
                             may_solve=remaining > 0)
                solved, limit = solved + 1, limit * 4
                record(res)
            if res.fits and res.step <= window and (pick is None or res.key(Objective.THROUGHPUT) <
                                                    pick.key(Objective.THROUGHPUT)):
                pick = res
        if pick is not None:
            return pick, solved, complete
    return fastest, solved, complete


class _BottleneckBound:
    """Tighter step-time bound from the slowest pipeline rank: at least the average rank's compute plus its share of
    the pipeline sends (every cut sends an activation forward and a gradient back, at least the smallest legal cut's
    bytes), and for 1F1B/GPipe at least the min-max contiguous split of the compute."""

    def __init__(self) -> None:
        self._cache: dict[tuple, float] = {}

    def bound(self, view: ModelView, cluster: ClusterSpec, cfg: Config, lower: float, slowest: float) -> float:
        """`lower` raised by (m - 1/v) (R - slowest), R the bound above on the slowest rank's time per micro-batch,
        `slowest` the one `lower` assumed."""
        if cfg.dims.pp == 1:
            return lower
        costs = CandidateCosts(view.profile, cluster, cfg, view.cut_bytes)
        smallest = min(costs.cut_bytes[k] for k in view.cuts)
        sends = 2 * sum(costs.comm.p2p(smallest, link) for link in costs.p2p_link)
        rank = (costs.P_time[-1] + sends) / cfg.dims.pp
        if cfg.virtual_stages == 1:
            key = (tuple(costs.P_time), cfg.dims.pp)
            if key not in self._cache:
                self._cache[key] = minmax_split(costs.P_time, view.cuts, cfg.dims.pp)
            rank = max(rank, self._cache[key])
        return lower + (cfg.num_micro_batches - 1 / cfg.virtual_stages) * max(0.0, rank - slowest) * (1 - 1e-12)


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
    sol = None
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
    return Scored(cfg=cfg, bounds=tuple(bounds), status=status, bound=bound, costs=costs, pc=pc,
                  lower=sol.lower_bound if sol is not None else None)


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
    if cfg.micro_batch_size > 1 or (space.micro_batch_sizes and min(space.micro_batch_sizes) > 1):
        tips.append("a smaller micro-batch")
    if 3 not in space.zero_stages:
        tips.append("allow ZeRO stage 3")
    return (f"no strategy fits in {cap / GB:.1f} GB per device ({cluster.device.name}, "
            f"{cluster.memory_margin:.0%} held back): the closest, {cfg.dims.dp}x{cfg.dims.tp}x{cfg.dims.pp} "
            f"(dp x tp x pp) with ZeRO-{int(cfg.zero_stage)}, micro-batch {cfg.micro_batch_size} and recompute "
            f"{cfg.recompute.value}, needs {need / GB:.1f} GB{where}, {over / GB:.1f} GB over; try "
            + ", or ".join(tips))
