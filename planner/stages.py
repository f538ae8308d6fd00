"""Layers -> pipeline stages with OR-Tools CP-SAT.

Given a candidate's cost tables (`planner.candidate.CandidateCosts`), choose the stage boundaries that minimise the
predicted step time (which is driven by the slowest pipeline rank) subject to every rank's memory fitting the device.
Stages are contiguous runs of layers that start at legal cut points; with interleaving, stage c runs on rank c % pp.

Times enter the model as integers (a fixed number of units for the whole model's compute), memory as whole bytes.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass

from ortools.sat.python import cp_model

from planner.candidate import CandidateCosts

log = logging.getLogger(__name__)

#: Integer time units that the whole model's per-micro-batch time is scaled to.
TIME_UNITS = 100_000_000


@dataclass(frozen=True)
class StageOptions:
    """Solver options for the stage assignment."""

    time_limit_s: float = 5.0  #: wall-clock limit of one solve
    seed: int = 0  #: CP-SAT random seed
    workers: int = 1  #: CP-SAT search workers (1 keeps results reproducible)
    relative_gap: float = 1e-3  #: stop when the step time is proven within this fraction of the optimum


@dataclass(frozen=True)
class StageSolution:
    """Stage boundaries (stage c = layers [bounds[c], bounds[c+1])) and how the solver got there."""

    bounds: tuple[int, ...] | None
    status: str  #: OPTIMAL, FEASIBLE, INFEASIBLE, UNKNOWN (time out) or TRIVIAL (one stage)
    seconds: float
    from_cache: bool = False
    #: proved lower bound on the step seconds of any partition (time objective; None otherwise or without a bound)
    lower_bound: float | None = None


_CACHE: dict[tuple, StageSolution] = {}


def greedy_bounds(costs: CandidateCosts, cuts: list[int]) -> list[int] | None:
    """Balanced boundaries: each cut at the legal point nearest its share of the total time (the solver's hint)."""
    n, L = costs.cfg.num_stages, costs.profile.num_layers
    if len(cuts) < n - 1:
        return None
    P, total = costs.P_time, costs.P_time[-1]
    bounds, prev = [0], -1
    for c in range(1, n):
        # cut index i must leave n - 1 - c later cuts for the stages still to place
        lo, hi = prev + 1, len(cuts) - (n - c)
        target = total * c / n
        i = _nearest(cuts, P, target, lo, hi)
        bounds.append(cuts[i])
        prev = i
    bounds.append(L)
    return bounds


def _nearest(cuts: list[int], P: list[float], target: float, lo: int, hi: int) -> int:
    """Index in cuts[lo..hi] whose prefix time is nearest `target` (prefix times increase along cuts)."""
    i = bisect.bisect_left([P[k] for k in cuts[lo:hi + 1]], target) + lo
    return min((j for j in (i - 1, i) if lo <= j <= hi), key=lambda j: (abs(P[cuts[j]] - target), j))


def _key(costs: CandidateCosts, cuts: list[int], objective: str) -> tuple:
    c = costs
    return (objective, tuple(cuts), c.cfg.num_stages, c.cfg.dims.pp, c.cfg.virtual_stages, c.cfg.num_micro_batches,
            tuple(c.P_time), tuple(c.P_window), tuple(c.P_elems), tuple(c.P_static),
            tuple(c.P_act), tuple(c.cut_bytes), tuple(c.p2p_link), tuple(c.P_zero), tuple(c.P_dp_overlap),
            tuple(c.P_dp_blocking), c.dp.fixed, tuple(c.P_opt), c.framework.stage_per_mb, c.overlap, tuple(c.in_flight), c.const_bytes,
            c.capacity)


def solve_stages(costs: CandidateCosts, cuts: list[int], options: StageOptions, *, objective: str = "time"
                 ) -> StageSolution:
    """Optimal boundaries for `costs` ('time': min step time; 'memory': min peak memory, then time).

    Results are cached by the full cost tables, so candidates that share them solve once.
    """
    L, n = costs.profile.num_layers, costs.cfg.num_stages
    if n == 1:
        return StageSolution(bounds=(0, L), status="TRIVIAL", seconds=0.0)
    key = _key(costs, cuts, objective)
    if key in _CACHE:
        hit = _CACHE[key]
        return StageSolution(bounds=hit.bounds, status=hit.status, seconds=0.0, from_cache=True)
    start = time.perf_counter()
    if len(cuts) < n - 1:
        sol = StageSolution(bounds=None, status="INFEASIBLE", seconds=0.0)
    else:
        sol = _solve(costs, cuts, options, objective, start)
    if sol.status in ("OPTIMAL", "INFEASIBLE"):
        _CACHE[key] = sol
    return sol


# CP-SAT presolve spends most of a solve on these small models without tightening them; the hint is tight.
PRESOLVE = False


def _hint_derived(model, costs: CandidateCosts, hint: list[int], scale: float, per_mb, slowest, tail) -> None:
    """Hint the rank-time variables with their values under the hinted boundaries, so the hint is tight."""
    pc = costs.evaluate_bounds(hint)
    for r, rk in enumerate(pc.ranks):
        model.add_hint(per_mb[r], round(rk.per_mb * scale))
    model.add_hint(slowest, round(pc.ranks[pc.slowest].per_mb * scale))
    model.add_hint(tail, round(pc.ranks[pc.tail_rank].tail * scale))


@dataclass(frozen=True)
class _Segment:
    """A run of consecutive layers with identical costs: layers [start, start + count)."""

    start: int
    count: int


def _segments(costs: CandidateCosts) -> list[_Segment]:
    """Group consecutive layers whose every cost (and the bytes a cut after them sends) is identical.

    Transformer stacks collapse to a handful of segments, so a stage boundary's prefix sums become a few clamped
    linear terms instead of element lookups over all layers.
    """
    c, L = costs, costs.profile.num_layers

    def sig(i: int) -> tuple:
        d = lambda P: P[i + 1] - P[i]
        return (d(c.P_time), d(c.P_window), d(c.P_zero), d(c.P_dp_overlap), d(c.P_dp_blocking), d(c.P_elems),
                d(c.P_opt),
                d(c.P_static), d(c.P_act),
                c.cut_bytes[i + 1] if i + 1 < L else None)

    segs: list[_Segment] = []
    prev = None
    for i in range(L):
        s = sig(i)
        if segs and s == prev:
            segs[-1] = _Segment(segs[-1].start, segs[-1].count + 1)
        else:
            segs.append(_Segment(i, 1))
        prev = s
    return segs


def _solve(costs: CandidateCosts, cuts: list[int], options: StageOptions, objective: str, start: float
           ) -> StageSolution:
    cfg = costs.cfg
    L, n, pp, v, m = costs.profile.num_layers, cfg.num_stages, cfg.dims.pp, cfg.virtual_stages, cfg.num_micro_batches
    scale = TIME_UNITS / max(costs.P_time[-1], 1e-30)
    segs = _segments(costs)
    use_k, overlap = costs.P_zero[-1] > 0, costs.overlap
    # DDP's rounding call and last bucket: exposed once per step (DDP runs only without a pipeline: one rank).
    fixed = round(costs.dp.fixed * scale)
    # The pipeline schedule's own work per micro-batch for each of a rank's v chunks (planner.cost.FrameworkOverhead).
    stage_work = round(v * costs.framework.stage_per_mb * scale)

    def inc(P: list[float], f: float = 1.0) -> list[int]:
        # per-layer integer increment of prefix table P in each segment (time tables scaled to units)
        return [round((P[g.start + 1] - P[g.start]) * f * scale) for g in segs]

    incs = {
        "time": inc(costs.P_time),
        "zero": inc(costs.P_zero),
        "tail": [round(((costs.P_opt[g.start + 1] - costs.P_opt[g.start])
                        + (costs.P_dp_blocking[g.start + 1] - costs.P_dp_blocking[g.start])) * scale) for g in segs],
        "dpcomm": inc(costs.P_dp_overlap),
        "window": inc(costs.P_window),
        "static": [costs.P_static[g.start + 1] - costs.P_static[g.start] for g in segs],
        "act": [costs.P_act[g.start + 1] - costs.P_act[g.start] for g in segs],
    }

    model = cp_model.CpModel()
    # --- variables ---
    # bound[c]: first layer of stage c (bound[0] = 0, bound[n] = L); inner ones range over the legal cuts that
    # leave at least one cut for each stage before and after.
    bound: list = [model.new_constant(0)]
    domains = [[0]]
    for c in range(1, n):
        dom = cuts[c - 1: len(cuts) - (n - 1 - c)]
        domains.append(dom)
        bound.append(model.new_int_var_from_domain(cp_model.Domain.from_values(dom), f"first_layer_of_stage_{c}"))
    bound.append(model.new_constant(L))
    domains.append([L])
    # taken[c][j]: layers of segment j before bound[c], clamp(bound[c] - start_j, 0, count_j); a constant or a
    # linear term when bound[c]'s domain stays on one side of the segment, a max/min pair otherwise.
    taken: list[list] = []
    for c in range(n + 1):
        row = []
        lo, hi = domains[c][0], domains[c][-1]
        for j, g in enumerate(segs):
            if hi <= g.start:
                row.append(0)
            elif lo >= g.start + g.count:
                row.append(g.count)
            elif lo >= g.start and hi <= g.start + g.count:
                row.append(bound[c] - g.start)
            else:
                over = model.new_int_var(0, L, f"past_segment_{j}_at_{c}")
                model.add_max_equality(over, [bound[c] - g.start, 0])
                y = model.new_int_var(0, g.count, f"taken_segment_{j}_at_{c}")
                model.add_min_equality(y, [over, g.count])
                row.append(y)
        taken.append(row)

    def prefix(name: str, c: int) -> cp_model.LinearExpr:
        return sum(k * y for k, y in zip(incs[name], taken[c]))

    # sends[c]: time of one send over the cut after stage c; what the cut sends depends on the segment the
    # stage's last layer belongs to, selected by after[j] = (bound >= start_j + 1).
    sends = []
    for c in range(n - 1):
        costs_j = [round(costs.p2p_seconds(c, min(g.start + g.count, L - 1)) * scale) for g in segs]
        lo, hi = domains[c + 1][0], domains[c + 1][-1]
        live = [j for j, g in enumerate(segs) if g.start + 1 <= hi and g.start + g.count >= lo]
        expr = costs_j[live[0]]
        for prev_j, j in zip(live, live[1:]):
            if costs_j[j] != costs_j[prev_j]:
                after = model.new_bool_var(f"cut_{c + 1}_after_segment_{j}_start")
                model.add(bound[c + 1] >= segs[j].start + 1).only_enforce_if(after)
                model.add(bound[c + 1] <= segs[j].start).only_enforce_if(~after)
                expr = expr + (costs_j[j] - costs_j[prev_j]) * after
        sends.append(expr)
    horizon = (abs(incs["time"][0]) + 1) * L * 4 + sum(abs(x) * L for k in ("zero", "tail", "dpcomm")
                                                        for x in incs[k])
    horizon += sum(max(0, x) for g in segs for x in [round(costs.p2p_seconds(0, min(g.start + g.count, L - 1))
                                                           * scale)]) * 2 * n
    horizon += fixed * 2 + stage_work * 2 + TIME_UNITS * 4
    # per_mb[r]: time of pipeline rank r per micro-batch; tail: largest once-per-step work after the drain.
    per_mb = [model.new_int_var(0, horizon, f"per_microbatch_rank_{r}") for r in range(pp)]
    slowest = model.new_int_var(0, horizon, "slowest_rank_time")
    tail = model.new_int_var(0, horizon, "largest_tail")
    mem_ub = v * (costs.P_static[-1] + costs.const_bytes) + max(costs.in_flight) * costs.P_act[-1]
    peak = model.new_int_var(0, mem_ub, "peak_memory_times_v")

    # --- constraints ---
    for c in range(n):
        model.add(bound[c] < bound[c + 1])  # stages are non-empty and in order
    for r in range(pp):
        chunks = range(r, n, pp)

        def rank_sum(name: str) -> cp_model.LinearExpr:
            return sum(prefix(name, c + 1) - prefix(name, c) for c in chunks)

        busy = (rank_sum("time") + stage_work + sum(sends[c] for c in chunks if c < n - 1)
                + sum(sends[c - 1] for c in chunks if c))
        if use_k:
            zero = rank_sum("zero")
            if overlap:
                model.add(per_mb[r] >= busy)
                model.add(per_mb[r] >= zero)
            else:
                model.add(per_mb[r] == busy + zero)
        else:
            model.add(per_mb[r] == busy)
        model.add(slowest >= per_mb[r])
        fixed_tail = rank_sum("tail")
        dp_comm = rank_sum("dpcomm")
        model.add(tail >= fixed_tail)
        if overlap:
            model.add(tail >= fixed_tail + fixed + dp_comm - rank_sum("window"))
            model.add(tail >= fixed_tail + fixed)
        else:
            model.add(tail >= fixed_tail + fixed + dp_comm)
        memory_v = v * rank_sum("static") + costs.in_flight[r] * rank_sum("act") + v * costs.const_bytes
        model.add(memory_v <= v * costs.capacity)
        model.add(peak >= memory_v)

    # --- objective ---
    # v * step = (m v - 1) * slowest + sum_r per_mb[r] + v * tail   (planner.pipeline)
    step_v = (m * v - 1) * slowest + sum(per_mb) + v * tail
    if objective == "memory":
        peak_mib = model.new_int_var(0, mem_ub // 2**20 + 1, "peak_memory_mib_times_v")
        model.add(peak_mib * 2**20 >= peak)
        model.minimize(peak_mib * (horizon * (m * v + v + pp) + 1) + step_v)
    else:
        model.minimize(step_v)

    hint = greedy_bounds(costs, cuts)
    if hint is not None:
        for c in range(1, n):
            model.add_hint(bound[c], hint[c])
        _hint_derived(model, costs, hint, scale, per_mb, slowest, tail)

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.05, options.time_limit_s)
    solver.parameters.random_seed = options.seed
    solver.parameters.num_workers = options.workers
    solver.parameters.cp_model_presolve = PRESOLVE
    solver.parameters.relative_gap_limit = options.relative_gap
    status = solver.solve(model)
    name = solver.status_name(status)
    bounds = None
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        bounds = tuple(solver.value(bound[c]) for c in range(n + 1))
    log.debug("stages pp=%d v=%d segments=%d: %s in %.3fs", pp, v, len(segs), name, time.perf_counter() - start)
    # the integer objective is v * step in units of 1/scale s; its per-layer rounding stays below the 1e-5 margin
    lower = (solver.best_objective_bound / (v * scale) * (1 - 1e-5)
             if objective == "time" and status in (cp_model.OPTIMAL, cp_model.FEASIBLE) else None)
    return StageSolution(bounds=bounds, status=name, seconds=time.perf_counter() - start, lower_bound=lower)
