"""The closed loop on this CPU host (issue 12 item 5): predicted vs measured step time and peak memory with the `cpu`
preset as shipped, after `autopar calibrate`, and after fitting to 5 recorded runs.

    .venv/bin/python bench/closed_loop.py                        # both models, 10 steps a run (several minutes)
    .venv/bin/python bench/closed_loop.py --quick                # 5 steps a run
    .venv/bin/python bench/closed_loop.py --models gpt-tiny --steps 8 --calibrated cluster.yaml   # reuse a calibration

1. `autopar calibrate --nproc-per-node 2 --quick` writes a cluster file (skipped with --calibrated FILE).
2. Each model (bench/fidelity_cpu.py's MODELS: zoo gpt-tiny and a ~20M GPT-2) runs each of fidelity_cpu's DP,
   ZeRO-3, PP and TP plans on 2 gloo ranks through `autopar run` (fidelity_cpu's `_run`), the plans made on the
   calibrated cluster, so every run is recorded (`autopar run`'s own recording, into a run store in a temporary
   directory) against the calibrated cluster's name.
3. `planner.run_fit.fit_runs` fits the calibrated cluster to 5 of those records (alternating models across the plan
   kinds, so every kind is fitted on one model and held out on the other where the runs allow; with fewer than 6 runs,
   all but one), and every run is evaluated again on the fitted cluster.

The table gives, per run, the measured median step time (first step excluded) and each cluster's prediction with its
error (predicted / measured - 1), whether the run was one of the fitted five, and the largest per-rank ratio of
measured peak memory (RSS growth since before the model was built) to the plan's per-rank prediction (the memory
prediction does not depend on the fitted factors). Medians are over all runs and over the runs not fitted.
Goal (issue 12): median step-time error <= 10% after fitting; memory never under-predicted by more than 5%.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from fidelity_cpu import MODELS, _run, _strategies

from api.run_store import STORE_ENV, RunStore
from planner.cluster import ClusterSpec, load_cluster
from planner.run_record import used_bytes
from planner.strategy import Plan, Provenance

FIT_RUNS = 5


def calibrate(out: Path, console: Console) -> None:
    """`autopar calibrate --nproc-per-node 2 --quick --out OUT` (about a minute on 2 cores)."""
    console.print("autopar calibrate --nproc-per-node 2 --quick ...")
    subprocess.run([sys.executable, "-c", "from api.cli import main; main()", "calibrate", "--nproc-per-node", "2",
                    "--quick", "--out", str(out)], check=True, cwd=REPO, capture_output=True, timeout=1200)


def record_runs(models: list[str], cluster: ClusterSpec, steps: int, tmp: Path, console: Console) -> list[dict]:
    """Run every (model, plan kind) on 2 ranks through `autopar run`, recorded in the store $AUTOPAR_RUNS_DB names.
    Returns one dict per run: model, kind, profile, strategy."""
    import profiler
    from planner import evaluate

    runs = []
    for mi, name in enumerate(models):
        zoo, options, batch = MODELS[name]
        profile = profiler.profile_zoo(zoo, **options)
        for ki, (kind, st) in enumerate(_strategies(profile.num_layers, profile.cut_points, batch).items()):
            prov = Provenance(model_name=profile.name, profile_hash=profile.profile_hash, cluster=cluster,
                              planner_version="bench", search_seconds=0, solver_status="MANUAL",
                              candidates_evaluated=1, dtype=profile.dtype)
            plan_path = tmp / f"{name}-{kind}.json"
            Plan(kind=st.kind, strategy=st, prediction=evaluate(profile, cluster, st), explanation=kind,
                 provenance=prov).to_json(plan_path)
            console.print(f"run {name} {kind} ({steps} steps, 2 ranks), load {os.getloadavg()[0]:.1f}")
            _run(plan_path, zoo, options, steps, tmp / f"{name}-{kind}-report.json", record=True)
            runs.append({"model": name, "kind": kind, "profile": profile, "strategy": st, "order": (mi + ki) % 2})
    return runs


def fit_set(runs: list[dict]) -> list[int]:
    """Indices of the runs to fit to: alternate models across plan kinds first, at most FIT_RUNS, one left out."""
    order = sorted(range(len(runs)), key=lambda i: (runs[i]["order"], i))
    return sorted(order[: min(FIT_RUNS, len(runs) - 1)])


def _err(pred: float, meas: float) -> float:
    return pred / meas - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 10, 5 with --quick)")
    parser.add_argument("--quick", action="store_true", help="5 steps per run")
    parser.add_argument("--calibrated", type=Path, default=None,
                        help="an `autopar calibrate` cluster file to use instead of calibrating again")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (for the docs)")
    args = parser.parse_args()
    steps = args.steps or (5 if args.quick else 10)
    console = Console(width=200)
    from planner import evaluate
    from planner.run_fit import fit_runs

    load_before = os.getloadavg()
    preset = load_cluster("cpu", gpus_per_node=2)
    with tempfile.TemporaryDirectory(prefix="autopar-closed-loop-") as tmp_name:
        tmp = Path(tmp_name)
        cal_path = args.calibrated or tmp / "cluster.yaml"
        if args.calibrated is None:
            calibrate(cal_path, console)
        calibrated = load_cluster(str(cal_path))
        store_path = tmp / "runs.db"
        os.environ[STORE_ENV] = str(store_path)  # `autopar run` records each run there
        runs = record_runs(args.models, calibrated, steps, tmp, console)
        samples, missing = RunStore(store_path, create=False).fit_samples(calibrated.name)
        assert not missing and len(samples) == len(runs), (missing, len(samples))
        by_key = {(s.record.profile_hash, s.record.plan.strategy.describe()): s for s in samples}
        for r in runs:
            r["sample"] = by_key[(r["profile"].profile_hash, r["strategy"].describe())]
        fitted_idx = fit_set(runs)
        fit = fit_runs([runs[i]["sample"] for i in fitted_idx], calibrated, source=str(store_path),
                       measured_links=True)
    load_after = os.getloadavg()

    table = Table(title=f"closed loop on this host: 2 gloo ranks, {steps} steps a run; step-time error = predicted / "
                        "measured - 1")
    headers = ("model", "plan", "fitted", "meas ms", "preset ms", "err", "calibrated ms", "err", "fitted ms", "err",
               "mem meas MiB", "mem pred MiB", "mem meas/pred")
    for col in headers:
        table.add_column(col, justify="left" if col in ("model", "plan", "fitted") else "right")
    rows: list[list[str]] = []
    errs: dict[str, list[tuple[bool, float]]] = {"preset": [], "calibrated": [], "fitted": []}
    mem_ratios = []
    for i, r in enumerate(runs):
        rec = r["sample"].record
        meas = rec.measured.step_seconds
        cells = []
        for label, cluster in (("preset", preset), ("calibrated", calibrated), ("fitted", fit.cluster)):
            pred = evaluate(r["profile"], cluster, r["strategy"]).step_seconds
            errs[label].append((i in fitted_idx, _err(pred, meas)))
            cells += [f"{pred * 1e3:.1f}", f"{_err(pred, meas):+.0%}"]
        # The rank measured furthest above its own pipeline rank's prediction.
        ratio, rank = max(((x, m) for x, m in zip(rec.errors.memory_ratio, rec.measured.memory, strict=True)
                           if x is not None), key=lambda xm: xm[0])
        used, pred_mem = used_bytes(rank, rec.measured.memory_kind), rank.predicted_bytes
        mem_ratios.append((r["model"], r["kind"], ratio))
        rows.append([r["model"], r["kind"], "yes" if i in fitted_idx else "no", f"{meas * 1e3:.1f}", *cells,
                     f"{used / 2**20:.1f}", f"{pred_mem / 2**20:.1f}", f"{ratio:.2f}x"])
    for subset, keep in (("median |err|, all runs", lambda f: True),
                         ("median |err|, runs not fitted", lambda f: not f)):
        meds = [statistics.median(abs(e) for f, e in errs[k] if keep(f)) for k in ("preset", "calibrated", "fitted")]
        rows.append([subset, "", "", "", "", f"{meds[0]:.0%}", "", f"{meds[1]:.0%}", "", f"{meds[2]:.0%}", "", "", ""])
    if args.markdown:
        for row in (headers, ["---"] * len(headers), *rows):
            console.print("| " + " | ".join(row) + " |", soft_wrap=True, markup=False)
    else:
        for row in rows:
            table.add_row(*row)
        console.print(table)
    cal = fit.calibration
    factors = ", ".join(f"{k} {v:.3f}x" for k, v in cal.factors.items()) or "none"
    names = ", ".join(f"{runs[i]['model']} {runs[i]['kind']}" for i in fitted_idx)
    console.print(f"fitted to {cal.runs} runs ({names})"
                  f": {factors}; left at prior: {', '.join(cal.at_prior) or 'none'}; at bound: "
                  f"{', '.join(cal.at_bound) or 'none'}", soft_wrap=True)
    held = [abs(e) for f, e in errs["fitted"] if not f]
    med = statistics.median(held)
    console.print(f"goal: median step-time error after fitting <= 10% on the runs not fitted: {med:.1%} "
                  f"({'met' if med <= 0.10 else f'missed by {med - 0.10:.1%}'})", soft_wrap=True)
    worst = max(mem_ratios, key=lambda x: x[2])
    under = [f"{m} {k} {x:.2f}x" for m, k, x in mem_ratios if x > 1.05]
    console.print(f"goal: memory never under-predicted by more than 5%: worst measured/predicted {worst[2]:.2f}x "
                  f"({worst[0]} {worst[1]}); {'met' if not under else 'missed: ' + ', '.join(under)}", soft_wrap=True)
    console.print(f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after, on "
                  f"{os.cpu_count()} cores", soft_wrap=True)


if __name__ == "__main__":
    main()
