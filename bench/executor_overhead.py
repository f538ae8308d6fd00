"""Step time of `autopar run` with a data-parallel plan against a plain hand-written DDP script (goal: <= 1.05x).

    .venv/bin/python bench/executor_overhead.py --steps 40 --rounds 3

Both run the same model (gpt-tiny, widened by --hidden / --layers), the same per-rank batch, AdamW, 2 processes on
CPU with gloo, launched by torchrun. The two are run alternately for --rounds rounds so that drift in machine load
hits both; each round's figure is the median step time after --warmup steps, and the last row pools every
round's steps. Wall time is what a user sees; rank 0's CPU time per step is shown too because it barely moves when
other processes load the machine. Prints a table.
"""

from __future__ import annotations

import argparse
import json
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

from planner.cluster import load_cluster
from planner.strategy import (
    MemoryBreakdown,
    ParallelDims,
    Plan,
    Prediction,
    Provenance,
    StageSpec,
    Strategy,
    TimeBreakdown,
)


def _plan(profile, batch_per_rank: int) -> Plan:
    st = Strategy(dims=ParallelDims(dp=2, tp=1, pp=1, world_size=2), micro_batch_size=batch_per_rank,
                  num_micro_batches=1, stages=[StageSpec(start=0, stop=profile.num_layers)])
    cluster = load_cluster("cpu", gpus_per_node=2)
    try:
        from planner import evaluate  # the cost model, when it is installed

        pred = evaluate(profile, cluster, st)
    except ImportError:
        mem = MemoryBreakdown(parameters=0, gradients=0, optimizer_state=0, activations=0, comm_buffers=0, total=0,
                              capacity=cluster.device.memory_bytes)
        pred = Prediction(step_seconds=1.0, time=TimeBreakdown(compute=1.0, recompute=0, bubble=0, exposed_comm=0,
                                                                 optimizer=0),
                          samples_per_second=0, tokens_per_second=0, model_flops_per_gpu=0, hardware_flops_per_gpu=0,
                          mfu=0, memory=[mem], fits=True)
    prov = Provenance(model_name=profile.name, profile_hash=profile.profile_hash, cluster=cluster,
                      planner_version="bench", search_seconds=0, solver_status="MANUAL", candidates_evaluated=1)
    return Plan(kind=st.kind, strategy=st, prediction=pred, explanation="data parallel over 2 processes",
                provenance=prov)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-per-rank", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    import profiler

    profile = profiler.profile_zoo("gpt-tiny", hidden=args.hidden, num_layers=args.layers)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plan_path = Path(tmp) / "plan.json"
        _plan(profile, args.batch_per_rank).to_json(plan_path)
        for r in range(args.rounds):
            base_out = Path(tmp) / f"ddp{r}.json"
            subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 str(REPO / "bench" / "scripts" / "ddp_baseline.py"), "--steps", str(args.steps), "--batch-per-rank",
                 str(args.batch_per_rank), "--hidden", str(args.hidden), "--layers", str(args.layers),
                 "--out", str(base_out)],
                check=True, env=env, cwd=REPO, capture_output=True,
            )
            report = Path(tmp) / f"autopar{r}.json"
            subprocess.run(
                [sys.executable, "-c", "from api.cli import main; main()", "run", str(plan_path), "--model",
                 "gpt-tiny", "--option", f"hidden={args.hidden}", "--option", f"num_layers={args.layers}",
                 "--steps", str(args.steps), "--report", str(report)],
                check=True, env=env, cwd=REPO, capture_output=True,
            )
            ddp = [tuple(t) for t in json.loads(base_out.read_text())[args.warmup:]]
            steps = json.loads(report.read_text())["steps"][args.warmup:]
            rows.append((str(r), ddp, [(st["seconds"], st["cpu_seconds"]) for st in steps]))
    # Pooled over rounds: every post-warm-up step of each side counts once.
    rows.append(("all rounds", [t for row in rows for t in row[1]], [t for row in rows for t in row[2]]))

    table = Table(title=f"autopar run (dp=2) vs hand-written DDP: gpt-tiny hidden={args.hidden} "
                        f"layers={args.layers}, batch {args.batch_per_rank}/rank, 2 CPU processes, median ms/step")
    for col in ("round", "DDP wall", "autopar wall", "wall ratio", "DDP CPU", "autopar CPU", "CPU ratio"):
        table.add_column(col, justify="right")
    for name, ddp, ours in rows:
        cells = [name]
        for k in (0, 1):
            d, o = statistics.median(t[k] for t in ddp), statistics.median(t[k] for t in ours)
            cells += [f"{d * 1e3:.2f}", f"{o * 1e3:.2f}", f"{o / d:.3f}x"]
        table.add_row(*cells)
    Console().print(table)


if __name__ == "__main__":
    main()
