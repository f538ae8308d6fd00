"""Shared pieces of the executor tests: hand-built plans for gpt-tiny and the single-process reference run."""

from __future__ import annotations

import functools
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from planner.cluster import load_cluster
from planner.model_profile import ModelProfile
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

SEED = 0
DATA_SEED = 100
LR = 0.2
STEPS = 3
#: gpt-tiny's pipeline units: embed, blocks.0-3, head.
NUM_LAYERS = 6


#: A small GPT-2 layout with the output head tied to the token embedding (gpt2-small's tie, tiny sizes).
TIED = ("gpt2-small", (("num_layers", 2), ("hidden", 32), ("heads", 2), ("vocab_size", 64), ("seq_len", 8),
                       ("max_positions", 8)))


@functools.cache
def tiny_profile(model: str = "gpt-tiny", options: tuple = ()) -> ModelProfile:
    """Analytic profile of a zoo model at one sample (what `autopar run` computes before launching)."""
    import profiler

    return profiler.profile_zoo(model, device="meta", cache=False, **dict(options))


def stages(*bounds: int, num_layers: int = NUM_LAYERS) -> list[StageSpec]:
    """Stages from cut positions, e.g. stages(3) -> [0, 3), [3, 6)."""
    edges = [0, *bounds, num_layers]
    return [StageSpec(start=a, stop=b) for a, b in itertools.pairwise(edges)]


def strategy(
    dp: int = 1, tp: int = 1, pp: int = 1, *, cuts: tuple[int, ...] = (), num_layers: int = NUM_LAYERS, **kw
) -> Strategy:
    """A strategy for gpt-tiny (or a model of `num_layers` layers) with the given degrees and cuts."""
    return Strategy(
        dims=ParallelDims(dp=dp, tp=tp, pp=pp, world_size=dp * tp * pp),
        stages=stages(*cuts, num_layers=num_layers), **{"micro_batch_size": 2, "num_micro_batches": 2, **kw},
    )


def make_plan(st: Strategy, profile: ModelProfile, *, cluster: str = "cpu", profile_hash: str | None = None) -> Plan:
    """A plan around a hand-made strategy; its prediction is a placeholder (1 s, 1 MiB per pipeline rank)."""
    spec = load_cluster(cluster, gpus_per_node=st.dims.world_size)
    mem = MemoryBreakdown(parameters=2**20, gradients=0, optimizer_state=0, activations=0, comm_buffers=0,
                          total=2**20, capacity=spec.device.memory_bytes)
    pred = Prediction(
        step_seconds=1.0, time=TimeBreakdown(compute=1.0, recompute=0, bubble=0, exposed_comm=0, optimizer=0),
        samples_per_second=1.0, tokens_per_second=1.0, model_flops_per_gpu=0, hardware_flops_per_gpu=0, mfu=0,
        memory=[mem] * st.dims.pp, fits=True,
    )
    prov = Provenance(model_name=profile.name, profile_hash=profile_hash or profile.profile_hash, cluster=spec,
                      planner_version="test", search_seconds=0, solver_status="MANUAL", candidates_evaluated=1)
    return Plan(kind=st.kind, strategy=st, prediction=pred, explanation="hand-made for a test", provenance=prov)


def reference_losses(
    global_batch: int, steps: int = STEPS, *, build_seed: int | None = None, model: str = "gpt-tiny",
    options: tuple = (),
) -> list[float]:
    """The single-process run: whole gpt-tiny, whole global batch, plain SGD loop.

    Initial weights come from the model's own per-parameter rule with the name-seeded generator the executor uses,
    filled in directly here (no meta device, no slicing); with `build_seed`, from a plain build under that seed.
    """
    from executor.init import name_seed
    from profiler.zoo import get_model

    zoo = get_model(model, **dict(options))
    if build_seed is not None:
        torch.manual_seed(build_seed)
    net = zoo.build("cpu")
    if build_seed is None:
        with torch.no_grad():
            for name, p in net.named_parameters():
                net.init_parameter(name, p, torch.Generator().manual_seed(name_seed(SEED, name)))
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    losses = []
    for step in range(steps):
        inputs, targets = zoo.synthetic_batch(global_batch, seed=DATA_SEED + step)
        loss = zoo.loss(net(*inputs), targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def run_workers(script: str, nproc: int, payload: dict, cases_path: Path, out_path: Path, *, timeout: float) -> None:
    """Write `payload` to `cases_path` and run `script` (a test file that is also its worker program, called as
    `script CASES OUT`) on `nproc` gloo ranks under torchrun; fail with the ranks' output if it does not succeed."""
    cases_path.write_text(json.dumps(payload))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
         "--max-restarts", "0", script, str(cases_path), str(out_path)],
        check=False, capture_output=True, text=True, timeout=timeout, env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


REPO = Path(__file__).resolve().parents[1]


def autopar_run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`autopar run ARGS` in a subprocess (tests/ on PYTHONPATH for `--data executor_support:...`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    return subprocess.run([sys.executable, "-c", "from api.cli import main; main()", "run", *args],
                          check=False, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def start_training(plan_path: Path, *, new_session: bool = False) -> subprocess.Popen:
    """Start `autopar run PLAN --model gpt-tiny` for a long run (stdout piped for `wait_until_training`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", "from api.cli import main; main()", "run", str(plan_path),
                             "--model", "gpt-tiny", "--steps", "100000"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=new_session)


def wait_until_training(cli: subprocess.Popen) -> None:
    """Return once rank 0 of a `start_training` run has reported a step (or its output ended)."""
    for line in cli.stdout:
        if line.startswith("step "):
            break


def proc_text(pid: int, name: str) -> str:
    """/proc/PID/NAME as text (NULs as spaces), or '' when the process is gone."""
    try:
        return (Path("/proc") / str(pid) / name).read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def process_alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    stat = proc_text(pid, "stat")
    return bool(stat) and stat.rsplit(")", 1)[1].split()[0] != "Z"


def crash_on_rank_1(step: int, global_batch: int):
    """A data source (`--data executor_support:crash_on_rank_1`) whose rank 1 raises at step 1."""
    import os

    from profiler.zoo import get_model

    if os.environ.get("RANK") == "1" and step == 1:
        raise RuntimeError("injected failure on rank 1")
    return get_model("gpt-tiny").synthetic_batch(global_batch, seed=step)


def reference_data(step: int, global_batch: int):
    """The reference run's batches as a `--data` source (`executor_support:reference_data`)."""
    from profiler.zoo import get_model

    return get_model("gpt-tiny").synthetic_batch(global_batch, seed=DATA_SEED + step)
