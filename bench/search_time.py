"""Search time of `planner.plan` for GPTs of 24 / 96 / 128 layers on 8 / 64 / 512 / 3072 GPUs.

    .venv/bin/python bench/search_time.py            # closed-form profiles (planner.gpt_formula), no torch
    .venv/bin/python bench/search_time.py --profiler # profiles from profiler.profile_zoo on the meta device

Cluster: the dgx-a100-80gb preset scaled by nodes (8 GPUs each). Goals on a 2-core machine: < 0.5 s for 24 layers
on 8 GPUs, < 5 s for 128 layers on 3072 GPUs. Profiling time is not counted (it happens once per model). The
search is anytime: it uses its 10 s budget (plan's default time_limit_s) unless it proves its choice optimal first;
"(budget hit: gap x%)" says it did not, and by how much a better plan could at most be faster; "simpler not all
checked": the budget ran out before every simpler strategy within the 3% tolerance was checked.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner import load_cluster, plan  # noqa: E402
from planner.gpt_formula import gpt_profile  # noqa: E402

MODELS = {24: (2048, 16), 96: (12288, 96), 128: (25600, 160)}  # layers -> (hidden, heads): 1.3B, 175B, 1T
GPUS = (8, 64, 512, 3072)
GLOBAL_BATCH = 3072


def main() -> None:
    """Print the timing table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiler", action="store_true", help="profile with profiler.profile_zoo (needs torch)")
    args = ap.parse_args()
    table = Table(title=f"autopar search time (global batch {GLOBAL_BATCH}, seq 2048, fp16, dgx-a100-80gb nodes)")
    for col in ("layers", "GPUs", "search s", "candidates", "CP-SAT status", "chosen strategy", "step s"):
        table.add_column(col, justify="right")
    for layers, (hidden, heads) in MODELS.items():
        if args.profiler:
            import profiler

            prof = profiler.profile_zoo("gpt2-small", num_layers=layers, hidden=hidden, heads=heads,
                                        vocab_size=51200, seq_len=2048, max_positions=2048, dtype="float16",
                                        device="meta")
        else:
            prof = gpt_profile(num_layers=layers, hidden=hidden, heads=heads, seq_len=2048, vocab_size=51200)
        for gpus in GPUS:
            cluster = load_cluster("dgx-a100-80gb", nodes=gpus // 8)
            t0 = time.perf_counter()
            try:
                result = plan(prof, cluster, global_batch_size=GLOBAL_BATCH, top_k=3)
            except ValueError as exc:  # e.g. a 1T model on 8 GPUs does not fit
                table.add_row(str(layers), str(gpus), f"{time.perf_counter() - t0:.2f}", "-", "no plan",
                              str(exc)[:60] + "...", "-")
                continue
            took = time.perf_counter() - t0
            table.add_row(str(layers), str(gpus), f"{took:.2f}", str(result.provenance.candidates_evaluated),
                          re.sub(r" \(search stopped by its .*? budget; (.*)\)", r" (budget hit: \1)",
                                 result.provenance.solver_status).replace("proved within ", "gap ").replace(
                              " of optimal", "").replace("not every simpler strategy within 3% checked",
                                                         "simpler not all checked"),
                          result.strategy.describe(),
                          f"{result.prediction.step_seconds:.3g}")
    Console(width=180).print(table)


if __name__ == "__main__":
    main()
