"""Predicted against measured step time and peak memory on this CPU host: DP, ZeRO-3, PP and TP over 2 gloo ranks.

    .venv/bin/python bench/fidelity_cpu.py                 # the table (goal: every step-time ratio within 1.5x)
    .venv/bin/python bench/fidelity_cpu.py --steps 8 --models gpt-tiny
    .venv/bin/python bench/fidelity_cpu.py --measure       # the one-off measurement behind the `cpu` preset

Each model gets an analytic (meta) profile; each plan is a hand-built `Strategy` scored by `planner.evaluate` on the
`cpu` preset as shipped (2 devices), then run by the real executor (`autopar run --report`) for --steps steps. The
measured step time is the run's median (first step excluded); measured memory is the largest rank's peak RSS growth
since before the model was built, the executor's CPU measure. Models: zoo `gpt-tiny` and a ~20M-parameter GPT-2
(`gpt2-small` with 6 blocks of width 256 and 128-token samples).

--measure times, on one thread as each rank runs, what `autopar calibrate` times on each rank
(`executor.calibrate.measure_device`): fp32 and bf16 GEMMs over a range of shapes fitted to the cost model's
efficiency curve (peak FLOP/s and the GEMM ramp), a 64 MiB copy (memory bandwidth) and a chain of tiny ops forward
and backward with autograd (kernel overhead), each the best of several repeats. `autopar calibrate --nproc-per-node 2`
measures the same with every rank busy, plus the gloo links, and writes a cluster file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from planner.cluster import load_cluster
from planner.strategy import ParallelDims, Plan, Provenance, StageSpec, Strategy, ZeroStage

#: name -> (zoo model, size options, global batch)
MODELS = {
    "gpt-tiny": ("gpt-tiny", {}, 8),
    "gpt-20m": ("gpt2-small", {"num_layers": 6, "hidden": 256, "heads": 4, "seq_len": 128}, 4),
}


def _strategies(num_layers: int, cuts: list[int], batch: int) -> dict[str, Strategy]:
    whole = [StageSpec(start=0, stop=num_layers)]
    mid = min(cuts, key=lambda k: abs(k - num_layers / 2))
    dims = {ax: ParallelDims(dp=2 if ax == "dp" else 1, tp=2 if ax == "tp" else 1, pp=2 if ax == "pp" else 1,
                             world_size=2) for ax in ("dp", "tp", "pp")}
    return {
        "DP": Strategy(dims=dims["dp"], micro_batch_size=batch // 2, num_micro_batches=1, stages=whole),
        "ZeRO-3": Strategy(dims=dims["dp"], zero_stage=ZeroStage.FULL, micro_batch_size=batch // 2,
                           num_micro_batches=1, stages=whole),
        "PP": Strategy(dims=dims["pp"], micro_batch_size=batch // 4, num_micro_batches=4,
                       stages=[StageSpec(start=0, stop=mid), StageSpec(start=mid, stop=num_layers)]),
        "TP": Strategy(dims=dims["tp"], micro_batch_size=batch, num_micro_batches=1, stages=whole),
    }


def _run(plan_path: Path, zoo: str, options: dict, steps: int, report: Path, *, record: bool = False) -> dict:
    """`autopar run` of one plan; recorded in the default run store ($AUTOPAR_RUNS_DB) only with `record`."""
    cmd = [sys.executable, "-c", "from api.cli import main; main()", "run", str(plan_path), "--model", zoo,
           "--steps", str(steps), "--report", str(report), *([] if record else ["--no-record"])]
    for key, value in options.items():
        cmd += ["--option", f"{key}={value}"]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO, capture_output=True,
                   timeout=600)
    return json.loads(report.read_text())


def fidelity(models: list[str], steps: int) -> list[tuple]:
    """Rows (model, plan, predicted s, measured s, predicted peak bytes, measured peak bytes)."""
    import profiler
    from planner import evaluate

    cluster = load_cluster("cpu", gpus_per_node=2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            zoo, options, batch = MODELS[name]
            profile = profiler.profile_zoo(zoo, **options)
            for label, st in _strategies(profile.num_layers, profile.cut_points, batch).items():
                pred = evaluate(profile, cluster, st)
                prov = Provenance(model_name=profile.name, profile_hash=profile.profile_hash, cluster=cluster,
                                  planner_version="bench", search_seconds=0, solver_status="MANUAL",
                                  candidates_evaluated=1)
                plan_path = Path(tmp) / f"{name}-{label}.json"
                Plan(kind=st.kind, strategy=st, prediction=pred, explanation=label, provenance=prov).to_json(plan_path)
                rep = _run(plan_path, zoo, options, steps, Path(tmp) / f"{name}-{label}-report.json")
                measured_mem = max(m["peak_bytes"] - m["start_bytes"] for m in rep["memory"])
                rows.append((name, label, pred.step_seconds, rep["measured_step_seconds"],
                             max(m.total for m in pred.memory), measured_mem))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--measure", action="store_true", help="measure the cpu preset's device constants instead")
    args = parser.parse_args()
    console = Console()
    if args.measure:
        # The measuring code `autopar calibrate` runs on each rank.
        from executor.calibrate import measure_device

        for key, value in measure_device().items():
            console.print(f"{key:26s} {value:.3g}")
        return
    rows = fidelity(args.models, args.steps)
    table = Table(title="cpu preset, 2 gloo ranks: predicted vs measured (analytic profiles)")
    for col in ("model", "plan", "pred ms", "meas ms", "meas/pred", "pred MiB", "meas MiB", "meas/pred"):
        table.add_column(col, justify="right")
    for name, label, ps, ms, pm, mm in rows:
        table.add_row(name, label, f"{ps * 1e3:.1f}", f"{ms * 1e3:.1f}", f"{ms / ps:.2f}x", f"{pm / 2**20:.1f}",
                      f"{mm / 2**20:.1f}", f"{mm / pm:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
