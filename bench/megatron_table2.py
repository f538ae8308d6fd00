"""Megatron-LM SC'21 Table 2 (PTD parallelism vs ZeRO-3) against autopar's cost model, presets as shipped.

    .venv/bin/python bench/megatron_table2.py             # evaluate the 12 published configurations
    .venv/bin/python bench/megatron_table2.py --plan      # also let plan() choose for each model and GPU count

For every row of bench/data/megatron_sc21_table2.csv: the published TFLOP/s per GPU, `planner.evaluate`'s prediction
for that configuration on the `dgx-a100-80gb` preset exactly as shipped (Selene's nodes), the error, whether it is
predicted to fit in 80 GB, and per model size and GPU count whether the faster of the two schemes is the one the paper
measured faster. The model is `bench/models/nanogpt.py` (fused qkv, tied head, SDPA), profiled on the meta device in
fp16; nothing is marked by hand. Both schemes run with full activation recomputation (the paper's runs did);
PTD runs 1F1B without interleaving (Table 2 does not give the schedule). FLOPs are the paper's eq. (3).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.models.nanogpt import block_bounds, nanogpt_profile
from planner import evaluate, load_cluster, plan
from planner.strategy import ParallelDims, Recompute, Schedule, StageSpec, Strategy, ZeroStage

TABLE = ROOT / "bench" / "data" / "megatron_sc21_table2.csv"  # see bench/data/README.md
SEQ, VOCAB = 2048, 51200
#: The two models of Table 2 (paper, Section 5.2): layers, hidden size, attention heads.
SHAPES = {"174.6": (96, 12288, 96), "529.6": (105, 20480, 128)}


def eq3_flops(batch: int, layers: int, hidden: int) -> float:
    """FLOPs per iteration, Narayanan et al. eq. (3) (GEMMs only, full recompute counted)."""
    return 96 * batch * SEQ * layers * hidden**2 * (1 + SEQ / (6 * hidden) + VOCAB / (16 * layers * hidden))


def make_profile(layers: int, hidden: int, heads: int):
    """The fp16 profile of bench/models/nanogpt.py at the row's size, counted on the meta device."""
    return nanogpt_profile(layers=layers, hidden=hidden, heads=heads, seq_len=SEQ, vocab_size=VOCAB)


def published_strategy(row: dict, profile) -> Strategy:
    """The paper's configuration of one row."""
    gpus, tp, pp, mb = int(row["gpus"]), int(row["tp"]), int(row["pp"]), int(row["micro_batch"])
    dp = gpus // (tp * pp)
    zero = ZeroStage.FULL if row["scheme"] == "zero3" else ZeroStage.NONE
    bounds = block_bounds(profile, pp)
    return Strategy(dims=ParallelDims(dp=dp, tp=tp, pp=pp, world_size=gpus), zero_stage=zero, micro_batch_size=mb,
                    num_micro_batches=int(row["global_batch"]) // (dp * mb), schedule=Schedule.ONE_F_ONE_B,
                    recompute=Recompute.FULL,
                    stages=[StageSpec(start=a, stop=b) for a, b in zip(bounds, bounds[1:])])


def main() -> None:
    """Print the comparison table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", action="store_true", help="also run plan() per model size and GPU count")
    ap.add_argument("--time-limit", type=float, default=10.0, help="search budget per plan() (s)")
    args = ap.parse_args()
    rows = list(csv.DictReader(TABLE.open()))
    profiles = {size: make_profile(*shape) for size, shape in SHAPES.items()}
    table = Table(title="Megatron-LM SC'21 Table 2 vs autopar (TFLOP/s per GPU, eq. (3) FLOPs; dgx-a100-80gb preset)")
    for col in ("model", "scheme", "gpus", "tp/pp/dp mb", "published", "predicted", "error", "fits", "peak GiB"):
        table.add_column(col, justify="right")
    predicted: dict[tuple, dict[str, float]] = {}
    published: dict[tuple, dict[str, float]] = {}
    errors = []
    for row in rows:
        size, gpus = row["params_billion"], int(row["gpus"])
        L, h, _ = SHAPES[size]
        profile = profiles[size]
        s = published_strategy(row, profile)
        pred = evaluate(profile, load_cluster("dgx-a100-80gb", nodes=gpus // 8), s)
        tflops = eq3_flops(s.global_batch_size, L, h) / (pred.step_seconds * gpus) / 1e12
        pub = float(row["achieved_tflops_per_gpu"])
        errors.append(tflops / pub - 1)
        # Table 2 pairs the schemes by model and GPU count (the 530B ZeRO-3 rows ran on 640 / 1120 / 2240 GPUs).
        key = (size, sorted({int(r["gpus"]) for r in rows if r["params_billion"] == size and
                             r["scheme"] == row["scheme"]}).index(gpus))
        predicted.setdefault(key, {})[row["scheme"]] = tflops
        published.setdefault(key, {})[row["scheme"]] = pub
        peak = max(m.total for m in pred.memory) / 2**30
        table.add_row(f"{size}B", row["scheme"], str(gpus),
                      f"{s.dims.tp}/{s.dims.pp}/{s.dims.dp} {s.micro_batch_size}", f"{pub:.0f}", f"{tflops:.1f}",
                      f"{errors[-1]:+.1%}", "yes" if pred.fits else "NO", f"{peak:.1f}")
    console = Console(width=160)
    console.print(table)
    agree = sum(max(predicted[k], key=predicted[k].get) == max(published[k], key=published[k].get)
                for k in predicted)
    errs = sorted(abs(e) for e in errors)
    console.print(f"largest |error| {errs[-1]:.1%}, median {errs[len(errs) // 2]:.1%}; the faster scheme agrees with "
                  f"the paper in {agree} of {len(predicted)} (model, GPU count) pairs")
    if args.plan:
        plans = Table(title="plan() per model and GPU count (global batch of the PTD rows)")
        for col in ("model", "gpus", "chosen", "predicted TFLOP/s", "search s"):
            plans.add_column(col, justify="right")
        for row in rows:
            if row["scheme"] != "ptd":
                continue
            size, gpus, batch = row["params_billion"], int(row["gpus"]), int(row["global_batch"])
            L, h, _ = SHAPES[size]
            t0 = time.perf_counter()
            chosen = plan(profiles[size], load_cluster("dgx-a100-80gb", nodes=gpus // 8), global_batch_size=batch,
                          top_k=1, time_limit_s=args.time_limit)
            took = time.perf_counter() - t0
            tf = eq3_flops(batch, L, h) / (chosen.prediction.step_seconds * gpus) / 1e12
            plans.add_row(f"{size}B", str(gpus), chosen.strategy.describe(), f"{tf:.1f}", f"{took:.1f}")
        console.print(plans)


if __name__ == "__main__":
    main()
