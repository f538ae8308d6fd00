"""Learning from runs: fit the cost model's efficiency factors to recorded runs of one cluster.

    from planner.run_fit import FitSample, fit_runs
    fit = fit_runs([FitSample(record, profile), ...], load_cluster("cpu"), source="runs.db")
    plan = planner.plan(profile, fit.cluster, global_batch_size=16, calibration=fit.calibration)

Each recorded run is re-evaluated with `planner.evaluate.evaluate` on its own cluster shape (nodes, devices per
node) carrying the fitted parameters, and the parameters are chosen to minimise the sum of squared log errors
log(predicted / measured) by Levenberg-Marquardt on the logarithm of each parameter, with finite-difference
Jacobians and bounds: compute efficiency never above 1, link bandwidths never above the prior's (a preset's figures
are datasheet peaks; a calibrated cluster file's were measured on a possibly busy host, so they may rise by
`MEASURED_HEADROOM`). Parameters the runs cannot tell apart are left at the prior and named: one whose change moves no
prediction (inter-node bandwidth when no run crossed nodes), or one whose effect the higher-priority parameters
already explain (the order of `PARAMETERS`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from planner.cluster import ClusterSpec
from planner.cluster_fit import FRAMEWORK_FIELDS
from planner.errors import AutoparError
from planner.evaluate import evaluate
from planner.model_profile import ModelProfile
from planner.run_record import RunRecord
from planner.strategy import RunCalibration

log = logging.getLogger(__name__)

#: How far above its measured value a calibrated cluster file's bandwidth may be fitted (measurement noise).
MEASURED_HEADROOM = 2.0
#: A parameter whose 1% change moves no run's predicted log step time by more than this is not identifiable.
SENSITIVITY_FLOOR = 1e-5
#: A parameter whose Jacobian column keeps less than this fraction of its norm once the columns of the parameters
#: before it are projected out is confounded with them.
INDEPENDENCE_FLOOR = 0.05
_STEP = 1e-4  # finite-difference step in log space


class RunFitError(AutoparError):
    """The runs cannot be fitted (none of this cluster, or none with its profile); the message says what to do."""


@dataclass(frozen=True)
class Parameter:
    """One fitted quantity: how to read its prior from a cluster and write a value into one, and its bounds."""

    name: str
    label: str
    read: Callable[[ClusterSpec], float]
    write: Callable[[ClusterSpec, float, ClusterSpec], ClusterSpec]  # (cluster, value, prior) -> cluster
    upper: Callable[[ClusterSpec, bool], float]  # (prior, measured links) -> largest physical value
    lower_factor: float = 1e-3


def _set_compute(c: ClusterSpec, v: float, _: ClusterSpec) -> ClusterSpec:
    return c.model_copy(update={"compute_efficiency": v})


def _set_overhead(c: ClusterSpec, v: float, _: ClusterSpec) -> ClusterSpec:
    return c.model_copy(update={"device": c.device.model_copy(update={"kernel_overhead_seconds": v})})


def _set_link(which: str) -> Callable[[ClusterSpec, float, ClusterSpec], ClusterSpec]:
    def write(c: ClusterSpec, v: float, _: ClusterSpec) -> ClusterSpec:
        return c.model_copy(update={which: getattr(c, which).model_copy(update={"bandwidth": v})})
    return write


def _set_latency(c: ClusterSpec, f: float, prior: ClusterSpec) -> ClusterSpec:
    return c.model_copy(update={
        "collective_latency": prior.collective_latency * f,
        "intra_node": c.intra_node.model_copy(update={"latency": prior.intra_node.latency * f}),
        "inter_node": c.inter_node.model_copy(update={"latency": prior.inter_node.latency * f}),
    })


def _set_framework(c: ClusterSpec, f: float, prior: ClusterSpec) -> ClusterSpec:
    return c.model_copy(update={"device": c.device.model_copy(
        update={k: getattr(prior.device, k) * f for k in FRAMEWORK_FIELDS})})


def _link_cap(which: str) -> Callable[[ClusterSpec, bool], float]:
    return lambda prior, measured: getattr(prior, which).bandwidth * (MEASURED_HEADROOM if measured else 1.0)


#: In priority order: a later parameter whose effect earlier ones already explain stays at its prior.
PARAMETERS: tuple[Parameter, ...] = (
    Parameter("compute_efficiency", "compute efficiency", lambda c: c.compute_efficiency, _set_compute,
              lambda prior, measured: 1.0),
    Parameter("intra_node.bandwidth", "intra-node bandwidth", lambda c: c.intra_node.bandwidth,
              _set_link("intra_node"), _link_cap("intra_node")),
    Parameter("inter_node.bandwidth", "inter-node bandwidth", lambda c: c.inter_node.bandwidth,
              _set_link("inter_node"), _link_cap("inter_node")),
    # One factor on every host-side framework term (DTensor TP modules, FSDP2 units, optimizer tensors, pipeline
    # stages): they are measured together under one load (executor.overhead), so they scale together.
    Parameter("framework", "framework overheads (one factor)", lambda c: 1.0, _set_framework,
              lambda prior, measured: 1e3),
    Parameter("kernel_overhead_seconds", "per-kernel overhead", lambda c: c.device.kernel_overhead_seconds,
              _set_overhead, lambda prior, measured: 1e3 * prior.device.kernel_overhead_seconds),
    Parameter("latency", "collective and link latencies (one factor)", lambda c: 1.0, _set_latency,
              lambda prior, measured: 1e3),
)


@dataclass(frozen=True)
class FitSample:
    """A recorded run and the profile its plan was made from (same hash)."""

    record: RunRecord
    profile: ModelProfile


@dataclass
class RunFit:
    """The fitted cluster, what the plan's provenance says about it, and each run's log error before and after."""

    cluster: ClusterSpec
    calibration: RunCalibration
    reasons: dict[str, str] = field(default_factory=dict)  # parameter -> why it was not fitted / where it stopped
    errors_before: list[float] = field(default_factory=list)
    errors_after: list[float] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "run-... : why"


def apply_factors(cluster: ClusterSpec, factors: dict[str, float], prior: ClusterSpec | None = None) -> ClusterSpec:
    """`cluster` with each named parameter set to factor x its value in `prior` (default: `cluster`), validated."""
    prior = prior or cluster
    out = cluster
    for p in PARAMETERS:
        if p.name in factors:
            out = p.write(out, p.read(prior) * factors[p.name], prior)
    return ClusterSpec.model_validate(out.model_dump())


def _log_errors(samples: Sequence[FitSample], clusters: Sequence[ClusterSpec], prior: ClusterSpec,
                params: Sequence[Parameter], values: np.ndarray) -> np.ndarray:
    out = np.empty(len(samples))
    for i, (s, c) in enumerate(zip(samples, clusters)):
        for p, v in zip(params, values):
            c = p.write(c, float(v), prior)
        pred = evaluate(s.profile, c, s.record.plan.strategy).step_seconds
        out[i] = math.log(pred / s.record.measured.step_seconds)
    return out


def _jacobian(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, r0: np.ndarray) -> np.ndarray:
    """d residual / d log(parameter), by forward differences."""
    jac = np.empty((len(r0), len(x)))
    for j in range(len(x)):
        step = np.zeros_like(x)
        step[j] = _STEP
        jac[:, j] = (f(x + step) - r0) / _STEP
    return jac


def _usable(samples: Sequence[FitSample], prior: ClusterSpec) -> tuple[list[FitSample], list[str]]:
    keep, skipped = [], []
    for s in samples:
        rec = s.record
        if rec.cluster_name != prior.name:
            skipped.append(f"{rec.id}: cluster '{rec.cluster_name}', not '{prior.name}'")
        elif s.profile.profile_hash != rec.profile_hash:
            skipped.append(f"{rec.id}: its profile is not the one the plan was made from")
        else:
            keep.append(s)
    return keep, skipped


def _independent(jac: np.ndarray, candidates: list[int], reasons: dict[str, str]) -> list[int]:
    """Indices (into PARAMETERS) the runs identify, in priority order; `reasons` gets why the others were left."""
    chosen: list[int] = []
    basis: list[np.ndarray] = []
    for j in candidates:
        col = jac[:, j]
        norm = float(np.linalg.norm(col))
        name = PARAMETERS[j].name
        if np.max(np.abs(col)) * 0.01 < SENSITIVITY_FLOOR:
            reasons[name] = "not identifiable: no recorded run's predicted time depends on it"
            continue
        rest = col.copy()
        for q in basis:
            rest -= q * float(q @ rest)
        if float(np.linalg.norm(rest)) < INDEPENDENCE_FLOOR * norm:
            reasons[name] = ("not identifiable: the runs cannot tell it apart from "
                             + ", ".join(PARAMETERS[k].label for k in chosen))
            continue
        if len(chosen) >= jac.shape[0]:
            reasons[name] = f"not identifiable: {jac.shape[0]} run(s) fit at most {jac.shape[0]} parameter(s)"
            continue
        chosen.append(j)
        basis.append(rest / float(np.linalg.norm(rest)))
    return chosen


def _levenberg_marquardt(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                         iterations: int = 100) -> np.ndarray:
    """Bounded least squares of f(x): a step on the parameters not pressed against a bound, then clipped."""
    r = f(x)
    cost = float(r @ r)
    damping = 1e-3
    for _ in range(iterations):
        jac = _jacobian(f, x, r)
        grad = jac.T @ r
        # A parameter at a bound whose descent direction points outward stays there this iteration.
        free = ~(((x <= lo + 1e-12) & (grad > 0)) | ((x >= hi - 1e-12) & (grad < 0)))
        if not free.any():
            break
        jf = jac[:, free]
        a = jf.T @ jf
        improved = False
        while damping < 1e10:
            step = np.zeros_like(x)
            step[free] = np.linalg.solve(a + damping * np.diag(np.diag(a) + 1e-12), -grad[free])
            x_new = np.clip(x + step, lo, hi)
            r_new = f(x_new)
            cost_new = float(r_new @ r_new)
            if cost_new < cost:
                improved = True
                done = cost - cost_new < 1e-14 * max(cost, 1e-30) or float(np.max(np.abs(x_new - x))) < 1e-10
                x, r, cost = x_new, r_new, cost_new
                damping = max(damping / 3, 1e-12)
                break
            damping *= 4
        if not improved or done or cost < 1e-24:
            break
    return x


def fit_runs(samples: Sequence[FitSample], prior: ClusterSpec, *, source: str, measured_links: bool = False
             ) -> RunFit:
    """Fit `prior`'s compute efficiency, link bandwidths, framework and kernel overheads and latencies to recorded
    runs of it.

    `samples`: runs with their profiles; those of another cluster name, or whose profile does not match the plan's
    hash, are skipped (listed in `RunFit.skipped`). `measured_links`: the prior's bandwidths were measured
    (`autopar calibrate`), so they may be fitted up to `MEASURED_HEADROOM` x their value instead of capped at it.
    Raises RunFitError when no run is left.
    """
    usable, skipped = _usable(samples, prior)
    if not usable:
        why = f" ({'; '.join(skipped[:3])})" if skipped else ""
        raise RunFitError(f"no recorded run of cluster '{prior.name}' to fit to{why}; record runs with `autopar run` "
                          f"on that cluster first, or plan without --calibration")
    clusters = [s.record.plan.provenance.cluster for s in usable]
    reasons: dict[str, str] = {}
    candidates = []
    for j, p in enumerate(PARAMETERS):
        if p.read(prior) <= 0:
            reasons[p.name] = "left at its prior: it is 0 in the cluster, so there is nothing to scale"
        else:
            candidates.append(j)
    prior_values = np.array([p.read(prior) for p in PARAMETERS], dtype=float)
    everything = list(PARAMETERS)

    def all_errors(log_values: np.ndarray) -> np.ndarray:
        return _log_errors(usable, clusters, prior, everything, np.exp(log_values))

    x0 = np.log(np.where(prior_values > 0, prior_values, 1.0))
    before = all_errors(x0)
    chosen = _independent(_jacobian(all_errors, x0, before), candidates, reasons)
    x = x0.copy()
    if chosen:
        lo = np.array([x0[j] + math.log(PARAMETERS[j].lower_factor) for j in chosen])
        hi = np.array([math.log(PARAMETERS[j].upper(prior, measured_links)) for j in chosen])
        hi = np.maximum(hi, lo)

        def sub(xs: np.ndarray) -> np.ndarray:
            full = x0.copy()
            full[chosen] = xs
            return all_errors(full)

        x[chosen] = _levenberg_marquardt(sub, np.clip(x0[chosen], lo, hi), lo, hi)
        for k, j in enumerate(chosen):
            p = PARAMETERS[j]
            if x[j] >= hi[k] - 1e-9:
                reasons[p.name] = f"stopped at its physical bound ({_bound_words(p, prior, measured_links)})"
            elif x[j] <= lo[k] + 1e-9:
                reasons[p.name] = f"stopped at its lower bound ({p.lower_factor:g} x the prior)"
    after = all_errors(x)
    factors = {PARAMETERS[j].name: float(math.exp(x[j] - x0[j])) for j in chosen}
    fitted = apply_factors(prior, factors)
    at_bound = [n for n, why in reasons.items() if why.startswith("stopped")]
    calibration = RunCalibration(
        source=source, runs=len(usable), factors=factors,
        at_prior=[n for n, why in reasons.items() if not why.startswith("stopped")], at_bound=at_bound,
        median_abs_log_error_before=float(np.median(np.abs(before))),
        max_abs_log_error_before=float(np.max(np.abs(before))),
        median_abs_log_error_after=float(np.median(np.abs(after))),
        max_abs_log_error_after=float(np.max(np.abs(after))),
    )
    log.info("fitted %d runs of %s: factors %s; median |log error| %.3f -> %.3f", len(usable), prior.name, factors,
             calibration.median_abs_log_error_before, calibration.median_abs_log_error_after)
    return RunFit(cluster=fitted, calibration=calibration, reasons=reasons, errors_before=before.tolist(),
                  errors_after=after.tolist(), run_ids=[s.record.id for s in usable], skipped=skipped)


def _bound_words(p: Parameter, prior: ClusterSpec, measured_links: bool) -> str:
    if p.name == "compute_efficiency":
        return "efficiency 1.0: the device's peak FLOP/s"
    if p.name.endswith("bandwidth"):
        return (f"{MEASURED_HEADROOM:g} x the calibrated figure" if measured_links
                else "the cluster's nominal bandwidth")
    return "1000 x the prior"
