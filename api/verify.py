"""`--verify-top-k K`: run the K best candidates of a plan on this node, re-rank them by measured step time, keep the
fastest (issue 12 item 4).

    autopar plan gpt-tiny --cluster cpu --gpus-per-node 2 --global-batch 8 --verify-top-k 2 --steps 5 --out plan.json
    autopar run --plan-first gpt-tiny --cluster cpu --global-batch 8 --nproc-per-node 2 --verify-top-k 3

The candidates are the plan's strategy and then its alternatives that fit, in the planner's order. Each runs for
--steps steps through `api.launching.launch_plan` (the code `autopar run` launches with) and is recorded as a run
(`api.cli_runs.record_run`, same store as `autopar run`). The plan that comes back has the one measured fastest as its
strategy (with the prediction the cost model made for it), the other verified candidates as alternatives whose reasons
quote the measurements, and `provenance.verification` listing every candidate's predicted and measured seconds and run
id. A candidate whose run fails is reported and ruled out; the others still run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from api.launching import launch_plan, make_spec, run_profile, runnable_reference
from planner.errors import AutoparError
from planner.strategy import Alternative, Plan, Verification, VerifiedCandidate

console = Console()
err_console = Console(stderr=True)


@dataclass(frozen=True)
class Trial:
    """One verified candidate: the candidate as a plan, its place in the planner's order, and what its run gave."""

    plan: Plan
    predicted_rank: int
    measured_seconds: float | None = None
    run_id: str | None = None
    failure: str | None = None


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def candidates(plan: Plan, top_k: int) -> list[Plan]:
    """Up to `top_k` candidates that fit, as plans: the plan's strategy, then its alternatives, in the planner's
    order."""
    pool = [(plan.strategy, plan.prediction, plan.explanation)]
    pool += [(a.strategy, a.prediction, a.reason) for a in plan.alternatives]
    return [plan.model_copy(update={"kind": s.kind, "strategy": s, "prediction": p, "explanation": why,
                                    "alternatives": []})
            for s, p, why in pool if p.fits][:top_k]


def disagreements(trials: list[Trial]) -> list[str]:
    """One line per pair of candidates the measurement ordered the other way round from the planner."""
    done = sorted((t for t in trials if t.measured_seconds), key=lambda t: t.predicted_rank)
    lines = []
    for i, a in enumerate(done):
        for b in done[i + 1:]:
            if b.measured_seconds >= a.measured_seconds:  # type: ignore[operator]
                continue
            name_a, name_b = a.plan.strategy.describe(), b.plan.strategy.describe()
            pa, pb = a.plan.prediction.step_seconds, b.plan.prediction.step_seconds
            said = (f"predicted {name_a} {pb / pa - 1:.0%} faster than {name_b}" if pa < pb else
                    f"ranked {name_a} above {name_b} (predicted within {pa / pb - 1:.0%}, the simpler one)")
            lines.append(f"{said}; measured {name_b} {a.measured_seconds / b.measured_seconds - 1:.0%} faster")
    return lines


def verified_plan(plan: Plan, trials: list[Trial], *, steps: int, world_size: int) -> Plan:
    """`plan` re-ranked by the trials' measured step times: the fastest as its strategy (prediction unchanged), the
    other trials as alternatives quoting their measurements, then the alternatives that were not run."""
    ok = sorted((t for t in trials if t.measured_seconds), key=lambda t: (t.measured_seconds, t.predicted_rank))
    if not ok:
        raise ValueError("no verified candidate has a measured step time")
    win = ok[0]
    w_s, w_pred = win.measured_seconds, win.plan.prediction.step_seconds
    text = (f"Verified by running {len(trials)} candidate(s) for {steps} steps each on {world_size} processes: "
            f"{win.plan.strategy.describe()} measured {_ms(w_s)} ms per step (predicted {_ms(w_pred)} ms), the "
            "fastest.")
    first = min(trials, key=lambda t: t.predicted_rank)
    if first is win:
        text += (" It is also the planner's choice. " + plan.explanation if win.plan.strategy == plan.strategy
                 else " It is also the first candidate the planner ranked that fits.")
    elif first.measured_seconds:
        text += (f" The planner's choice, {first.plan.strategy.describe()}, measured {_ms(first.measured_seconds)} ms "
                 f"({first.measured_seconds / w_s - 1:.0%} slower; predicted "
                 f"{_ms(first.plan.prediction.step_seconds)} ms).")
    else:
        text += f" The planner's choice, {first.plan.strategy.describe()}, failed when run: {first.failure}"
    alts = [Alternative(strategy=t.plan.strategy, prediction=t.plan.prediction, reason=(
        f"measured {t.measured_seconds / w_s - 1:.0%} slower than the verified choice ({_ms(t.measured_seconds)} vs "
        f"{_ms(w_s)} ms per step; predicted {_ms(t.plan.prediction.step_seconds)} ms)")) for t in ok[1:]]
    alts += [Alternative(strategy=t.plan.strategy, prediction=t.plan.prediction,
                         reason=f"failed when verified: {t.failure}") for t in trials if not t.measured_seconds]
    run = [t.plan.strategy for t in trials]
    rest = [Alternative(strategy=plan.strategy, prediction=plan.prediction, reason="the planner's choice, not run: "
                        "predicted not to fit")] if plan.strategy not in run else []
    rest += [a for a in plan.alternatives if a.strategy not in run]
    alts += [a.model_copy(update={"reason": f"not verified; predicted {_ms(a.prediction.step_seconds)} ms (against the "
                                            f"planner's choice: {a.reason})"})
             if a.prediction.fits else a for a in rest]
    verification = Verification(steps=steps, world_size=world_size, candidates=[VerifiedCandidate(
        strategy=t.plan.strategy.describe(), predicted_rank=t.predicted_rank,
        predicted_step_seconds=t.plan.prediction.step_seconds, measured_step_seconds=t.measured_seconds,
        run_id=t.run_id, failure=t.failure) for t in sorted(trials, key=lambda t: t.predicted_rank)])
    return Plan(kind=win.plan.strategy.kind, strategy=win.plan.strategy, prediction=win.plan.prediction,
                explanation=text.strip(), alternatives=alts,
                provenance=plan.provenance.model_copy(update={"verification": verification}))


def print_verification(trials: list[Trial], *, steps: int) -> None:
    """The candidates in measured order next to their predictions, then where the two orders disagreed."""
    ok = sorted((t for t in trials if t.measured_seconds), key=lambda t: (t.measured_seconds, t.predicted_rank))
    rank = {id(t): i + 1 for i, t in enumerate(ok)}
    table = Table(title=f"verification: {len(trials)} candidate(s), {steps} steps each")
    for col in ("candidate", "predicted ms", "measured ms", "ratio", "predicted rank", "measured rank"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    for t in ok + [t for t in trials if not t.measured_seconds]:
        pred = t.plan.prediction.step_seconds
        meas = t.measured_seconds
        table.add_row(t.plan.strategy.describe(), _ms(pred), _ms(meas) if meas else "failed",
                      f"{meas / pred:.2f}x" if meas else "-", str(t.predicted_rank), str(rank.get(id(t), "-")))
    console.print(table)
    lines = disagreements(trials)
    for line in lines:
        console.print(line, soft_wrap=True)
    if not lines and len(ok) > 1:
        console.print("the measured order agrees with the predicted order", soft_wrap=True)


def _failure(exc: BaseException) -> str:
    from executor.launch import RankFailed

    if isinstance(exc, RankFailed):
        last = next((line.strip() for line in reversed(exc.message.splitlines()) if line.strip()), "")
        return f"rank {exc.rank} failed (exit code {exc.exitcode}): {last}"
    return " ".join(str(exc).split())


def verify_candidates(plan: Plan, profile: Any, *, top_k: int, steps: int, model: str, model_options: dict[str, Any],
                      nproc_per_node: int, nnodes: int = 1, records: Path | None = None, no_record: bool = False,
                      save_dir: Path | None = None, server: str | None = None, api_key: str | None = None,
                      **spec_fields: Any) -> Plan:
    """Run up to `top_k` candidates of `plan` for `steps` steps each on this node, record each run, print the
    comparison and return the plan re-ranked by measurement (`verified_plan`). `spec_fields` are the RunSpec fields
    the runs share (data, seed, optimizer, dtype, ...). Refuses (AutoparError, nothing launched) a plan that needs
    more processes than `nproc_per_node` x `nnodes`, more than one node, or one that `check_launch` refuses."""
    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from api.cli_runs import record_run
    from executor.launch import RankFailed, WorkerError, check_launch

    dims = plan.strategy.dims
    if dims.world_size > nproc_per_node * nnodes:
        raise AutoparError(
            f"the plan needs {dims.world_size} processes (dp={dims.dp} tp={dims.tp} pp={dims.pp}) but "
            f"--nproc-per-node {nproc_per_node} x {nnodes} node(s) gives {nproc_per_node * nnodes}; verification runs "
            f"on this node: give --nproc-per-node {dims.world_size}, or plan for the devices of one node")
    if nnodes > 1:
        raise AutoparError(f"--verify-top-k runs the candidates on this node only, not across {nnodes} nodes; verify "
                           "with `autopar plan ... --verify-top-k K` on one node, or run a plan without it")
    if top_k < 1:
        raise AutoparError(f"--verify-top-k {top_k}: give at least 1 candidate to run")
    todo = candidates(plan, top_k)
    if not todo:
        raise AutoparError("no candidate of the plan fits in memory, so none can be verified; plan with a smaller "
                           "--global-batch or on more devices")
    world = dims.world_size
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for cand in todo:
        check_launch(cand, profile, nnodes=1, nproc_per_node=world, cuda_devices=cuda)
    if len(todo) < top_k:
        console.print(f"only {len(todo)} candidate(s) of the plan fit (asked for {top_k}); verifying {len(todo)}",
                      soft_wrap=True)
    trials: list[Trial] = []
    for i, cand in enumerate(todo, 1):
        name, pred = cand.strategy.describe(), cand.prediction.step_seconds
        console.print(f"verify {i}/{len(todo)}: {name} (predicted {_ms(pred)} ms) for {steps} steps", soft_wrap=True)
        try:
            spec = make_spec(cand, profile, model=model, model_options=model_options, steps=steps, **spec_fields)
            report = launch_plan(spec, nproc_per_node=world)
        except (KeyboardInterrupt, SignalException):
            err_console.print("[bold red]interrupted:[/] all ranks stopped")
            sys.exit(130)
        except (AutoparError, WorkerError, RankFailed) as exc:
            trials.append(Trial(cand, i, failure=_failure(exc)))
            console.print(f"verify {i}/{len(todo)}: {name} failed: {escape(_failure(exc))}", soft_wrap=True)
            continue
        if report is None or not report.measured_step_seconds:
            trials.append(Trial(cand, i, failure="no step finished"))
            console.print(f"verify {i}/{len(todo)}: {name} failed: no step finished", soft_wrap=True)
            continue
        record = record_run(report, cand, profile, model=model, options=model_options, steps=steps,
                            nproc_per_node=world, nnodes=1, save_dir=save_dir, records=records, no_record=no_record,
                            server=server, api_key=api_key, plan_id=None)
        meas = report.measured_step_seconds
        trials.append(Trial(cand, i, measured_seconds=meas, run_id=record.id if record is not None else None))
        console.print(f"verify {i}/{len(todo)}: {name} measured {_ms(meas)} ms per step ({meas / pred:.2f}x "
                      "predicted)", soft_wrap=True)
    print_verification(trials, steps=steps)
    if not any(t.measured_seconds for t in trials):
        err_console.print("[bold red]error:[/] every verified candidate failed (see above); nothing to choose from")
        sys.exit(1)
    verified = verified_plan(plan, trials, steps=steps, world_size=world)
    console.print(f"verified choice: {verified.strategy.describe()}"
                  + ("" if verified.strategy == plan.strategy else f" (the planner chose {plan.strategy.describe()})"),
                  soft_wrap=True)
    return verified


def verify_model_plan(plan: Plan, model: str, model_options: dict[str, Any], *, dtype: str | None, top_k: int,
                      steps: int, nproc_per_node: int | None, records: Path | None, no_record: bool) -> Plan:
    """`autopar plan MODEL ... --verify-top-k K`: verify `plan` by running MODEL (synthetic data, the plan's
    precision) with up to `nproc_per_node` processes (default: the plan cluster's devices per node)."""
    from planner.precision import RUN_DTYPES

    ref = runnable_reference(model, model_options)
    profile = run_profile(ref, plan, dtype)
    return verify_candidates(plan, profile, top_k=top_k, steps=steps, model=str(ref), model_options=model_options,
                             nproc_per_node=nproc_per_node or plan.provenance.cluster.gpus_per_node,
                             records=records, no_record=no_record, data="synthetic", dtype=RUN_DTYPES[profile.dtype])
