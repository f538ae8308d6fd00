"""`autopar demo`: the main job end to end on built-in models and clusters (what `make demo` runs).

    autopar demo                 # plan GPT-2 medium on two DGX A100 nodes, then plan and run a tiny GPT on 2 CPU ranks
    autopar demo --steps 10      # a longer CPU run

Part 1 profiles GPT-2 medium on the meta device (no weights allocated) and plans it for 2 x 8 A100-80GB at a global
batch of 512. Part 2 plans `gpt-tiny` for the `cpu` preset with 2 gloo processes and trains it for a few steps with
torch.distributed, then prints measured against predicted step time and memory.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.console import Console

console = Console()


def demo_command(
    steps: Annotated[int, typer.Option(min=1, help="Training steps of the CPU run.")] = 5,
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

    console.rule("[bold]2. gpt-tiny on 2 CPU processes (gloo): plan, then run")
    if skip_run:
        console.print("skipped (--skip-run)")
        return
    run_command(plan_first="gpt-tiny", cluster="cpu", nodes=1, gpus_per_node=2, global_batch=8, steps=steps,
                option=[], plan_path=None, model=None, data="synthetic", nproc_per_node=None, nnodes=None,
                node_rank=None, rdzv_endpoint=None, save_dir=None, save_every=0, resume=False, report=None, seed=0,
                optimizer="adamw", lr=3e-4, dtype="float32")


def register(app: typer.Typer) -> None:
    """Add the command to the CLI."""
    app.command("demo")(demo_command)
