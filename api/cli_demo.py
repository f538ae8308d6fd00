"""`autopar demo`: the main job end to end on built-in models and clusters (what `make demo` runs).

    autopar demo                 # plan GPT-2 medium on two DGX A100 nodes, then plan and run a tiny GPT on 2 CPU ranks
    autopar demo --steps 10      # a longer CPU run

Part 1 profiles GPT-2 medium on the meta device (no weights allocated) and plans it for 2 x 8 A100-80GB at a global
batch of 512. Part 2 profiles `gpt-tiny` on this CPU (measured), plans it for the `cpu` preset with 2 gloo processes,
trains it for a few steps with torch.distributed, then prints measured against predicted step time and memory.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()

# gpt-tiny widened so that compute, not per-call framework overhead, dominates a CPU step (about 4M parameters).
_CPU_MODEL = {"hidden": 256, "heads": 8, "seq_len": 128, "max_positions": 128, "vocab_size": 2048}


def demo_command(
    steps: Annotated[int, typer.Option(min=1, help="Training steps of the CPU run.")] = 10,
    skip_run: Annotated[bool, typer.Option(help="Only plan; do not launch the CPU run.")] = False,
) -> None:
    """Plan GPT-2 medium on 2 DGX A100 nodes, then plan and run a tiny GPT on 2 CPU processes."""
    import profiler
    from api.cli_plan import print_plan
    from api.cli_run import run_command
    from planner import load_cluster, plan

    console.rule("[bold]1. GPT-2 medium on 2 x DGX A100 80GB, global batch 512")
    t0 = time.perf_counter()
    profile = profiler.profile_zoo("gpt2-medium", device="meta", dtype="bfloat16")
    console.print(f"profiled {profile.num_layers} layers, {profile.param_count:,} parameters on the meta device "
                  f"in {time.perf_counter() - t0:.1f} s")
    print_plan(plan(profile, load_cluster("dgx-a100-80gb", nodes=2), global_batch_size=512, top_k=4))

    console.rule("[bold]2. gpt-tiny on 2 CPU processes (gloo): profile on the CPU, plan, run")
    if skip_run:
        console.print("skipped (--skip-run)")
        return
    import torch

    # Each torchrun worker runs one thread (OMP_NUM_THREADS=1), so the layers are timed with one thread too:
    # a plan made from measured CPU times then predicts what the workers will do.
    torch.set_num_threads(1)
    measured = profiler.profile_zoo("gpt-tiny", device="cpu", batch_size=4, dtype="float32", **_CPU_MODEL)
    cpu_plan = plan(measured, load_cluster("cpu", nodes=1, gpus_per_node=2), global_batch_size=8, top_k=2)
    console.print(f"planned from measured CPU times: {cpu_plan.strategy.describe()} "
                  f"(predicted {cpu_plan.prediction.step_seconds * 1e3:.1f} ms per step)")
    with tempfile.TemporaryDirectory(prefix="autopar-demo-") as tmp:
        plan_path = Path(tmp) / "plan.json"
        cpu_plan.to_json(plan_path)
        run_command(plan_path=plan_path, model="gpt-tiny", steps=steps, option=[f"{k}={v}" for k, v in _CPU_MODEL.items()], plan_first=None, cluster="cpu",
                    nodes=None, gpus_per_node=None, global_batch=None, data="synthetic", nproc_per_node=None,
                    nnodes=None, node_rank=None, rdzv_endpoint=None, save_dir=None, save_every=0, resume=False,
                    report=None, seed=0, optimizer="adamw", lr=3e-4, dtype="float32")


def register(app: typer.Typer) -> None:
    """Add the command to the CLI."""
    app.command("demo")(demo_command)
