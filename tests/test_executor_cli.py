"""`autopar run` end to end (refusals before launch, a crashing rank, checkpoint resume) and the launch helpers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import executor_support as sup

from executor.errors import ExecutorError
from executor.launch import LaunchError, check_launch, first_host, slurm_launch, torchrun_args
from executor.pipeline import check_pipelinable

REPO = Path(__file__).resolve().parents[1]


# --- refusals before launch -------------------------------------------------------------------------------------

def test_launch_refuses_world_size_other_than_the_plans():
    plan = sup.make_plan(sup.strategy(dp=2), sup.tiny_profile())
    with pytest.raises(LaunchError, match="world size 2"):
        check_launch(plan, sup.tiny_profile(), nnodes=1, nproc_per_node=4, cuda_devices=0)
    check_launch(plan, sup.tiny_profile(), nnodes=2, nproc_per_node=1, cuda_devices=0)


def test_launch_refuses_cuda_plan_on_node_without_gpus():
    plan = sup.make_plan(sup.strategy(dp=2), sup.tiny_profile(), cluster="dgx-a100-80gb")
    with pytest.raises(LaunchError, match="CUDA"):
        check_launch(plan, sup.tiny_profile(), nnodes=1, nproc_per_node=2, cuda_devices=0)


@pytest.mark.timeout(120)
def test_run_refuses_plan_made_for_another_model_without_starting_ranks(tmp_path):
    plan_path = tmp_path / "plan.json"
    sup.make_plan(sup.strategy(dp=2), sup.tiny_profile(), profile_hash="0123456789abcdef").to_json(plan_path)
    proc = sup.autopar_run(str(plan_path), "--model", "gpt-tiny", "--steps", "1")
    assert proc.returncode == 2, proc.stderr
    assert "profile hash" in proc.stderr and "0123456789abcdef" in proc.stderr
    assert "launching" not in proc.stdout


def test_run_refuses_a_data_source_it_cannot_import_without_starting_ranks(tmp_path):
    plan_path = tmp_path / "plan.json"
    sup.make_plan(sup.strategy(dp=2), sup.tiny_profile()).to_json(plan_path)
    proc = sup.autopar_run(str(plan_path), "--model", "gpt-tiny", "--steps", "1", "--data", "no_such_module:batches")
    assert proc.returncode == 2, proc.stderr
    assert "no_such_module" in proc.stderr and "launching" not in proc.stdout


def test_launch_refuses_stages_that_do_not_cover_the_model():
    profile = sup.tiny_profile()
    short = sup.strategy(pp=2, cuts=(3,), schedule="gpipe", num_layers=5)  # the model has 6 layers
    with pytest.raises(LaunchError, match="cover layers 0..5 but the model has 6"):
        check_launch(sup.make_plan(short, profile), profile, nnodes=1, nproc_per_node=2, cuda_devices=0)


# --- faults ----------------------------------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_crashing_rank_fails_the_job_within_60_s_with_its_error(tmp_path):
    plan_path = tmp_path / "plan.json"
    sup.make_plan(sup.strategy(pp=2, cuts=(3,), schedule="1f1b", num_micro_batches=4), sup.tiny_profile()
                  ).to_json(plan_path)
    start = time.monotonic()
    proc = sup.autopar_run(str(plan_path), "--model", "gpt-tiny", "--steps", "5", "--data",
                    "executor_support:crash_on_rank_1", timeout=90)
    assert time.monotonic() - start < 60
    assert proc.returncode == 1
    assert "rank 1 failed" in proc.stderr and "injected failure on rank 1" in proc.stderr


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
def test_ctrl_c_stops_every_rank(tmp_path):
    plan_path = tmp_path / "plan.json"
    sup.make_plan(sup.strategy(pp=2, cuts=(3,), schedule="1f1b", num_micro_batches=4), sup.tiny_profile()
                  ).to_json(plan_path)
    cli = sup.start_training(plan_path)
    try:
        sup.wait_until_training(cli)
        workers = _children(cli.pid)
        assert len(workers) == 2
        cli.send_signal(signal.SIGINT)
        assert cli.wait(timeout=45) != 0
        deadline = time.monotonic() + 15
        while any(sup.process_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(sup.process_alive(w) for w in workers)
    finally:
        cli.kill()


# --- multi-node ------------------------------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_two_node_launch_gives_the_single_process_loss(tmp_path):
    # Two `autopar run` processes on this host stand in for two nodes (static rendezvous, one rank each).
    st = sup.strategy(pp=2, cuts=(3,), schedule="gpipe", num_micro_batches=4)
    plan_path = tmp_path / "plan.json"
    sup.make_plan(st, sup.tiny_profile()).to_json(plan_path)
    port = 29000 + os.getpid() % 1000
    common = [str(plan_path), "--model", "gpt-tiny", "--steps", str(sup.STEPS), "--optimizer", "sgd", "--lr",
              str(sup.LR), "--data", "executor_support:reference_data", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-endpoint", f"127.0.0.1:{port}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    other = subprocess.Popen([sys.executable, "-c", "from api.cli import main; main()", "run", *common,
                              "--node-rank", "1"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        first = sup.autopar_run(*common, "--node-rank", "0", "--report", str(tmp_path / "r.json"), timeout=120)
        assert first.returncode == 0, first.stderr[-3000:]
        assert other.wait(timeout=60) == 0, other.stderr.read()[-3000:]
    finally:
        other.kill()
    losses = [s["loss"] for s in json.loads((tmp_path / "r.json").read_text())["steps"]]
    ref = sup.reference_losses(st.global_batch_size)
    assert max(abs(a - b) for a, b in zip(losses, ref)) <= 1e-5, (losses, ref)


# --- checkpointing ---------------------------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_resumed_run_continues_the_same_losses(tmp_path):
    plan_path, ckpt = tmp_path / "plan.json", tmp_path / "ckpt"
    # FSDP (ZeRO-3): sharded model and AdamW state go through DCP; AdamW makes the optimizer state matter.
    sup.make_plan(sup.strategy(dp=2, zero_stage=3), sup.tiny_profile()).to_json(plan_path)
    common = [str(plan_path), "--model", "gpt-tiny", "--steps", "4", "--save-dir", str(ckpt), "--lr", "1e-3"]
    first = sup.autopar_run(*common, "--save-every", "2", "--report", str(tmp_path / "a.json"))
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    shutil.rmtree(ckpt / "step_00000004")  # as if the job had died after step 3
    second = sup.autopar_run(*common, "--resume", "--report", str(tmp_path / "b.json"))
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-4000:]
    a = json.loads((tmp_path / "a.json").read_text())["steps"]
    b = json.loads((tmp_path / "b.json").read_text())["steps"]
    assert [s["step"] for s in b] == [2, 3]
    assert len({s["loss"] for s in a}) == 4  # the curve moves, so matching it means something
    for old, new in zip(a[2:], b):
        assert abs(old["loss"] - new["loss"]) <= 1e-6, (a, b, first.stdout, second.stdout)


# --- launch helpers --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("node07", "node07"), ("gpu[03-05,09],cpu1", "gpu03"), ("a1,a2", "a1"), ("rack[2]-n[001-004]", "rack2-n[001-004]")],
)
def test_first_host_of_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_slurm_environment_gives_nodes_rank_and_master():
    env = {"SLURM_NNODES": "4", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "dgx[010-013]"}
    s = slurm_launch(env)
    assert (s.nnodes, s.node_rank, s.master_host) == (4, 2, "dgx010")
    assert slurm_launch({}) is None


def test_multinode_launch_without_endpoint_is_refused():
    with pytest.raises(LaunchError, match="rdzv-endpoint"):
        torchrun_args(Path("s.json"), nnodes=2, nproc_per_node=8, node_rank=0, rdzv_endpoint=None, run_id="x")
    args = torchrun_args(Path("s.json"), nnodes=2, nproc_per_node=8, node_rank=1, rdzv_endpoint="h0", run_id="x")
    assert args[args.index("--rdzv-endpoint") + 1] == "h0:29500"
    assert args[args.index("--node-rank") + 1] == "1"


# --- pipeline cuts -----------------------------------------------------------------------------------------------

def test_pp_refuses_tied_weight_copies_that_tensor_parallelism_shards_differently():
    from planner.model_profile import ShardStyle, TPShard
    from profiler.zoo import get_model

    profile = sup.tiny_profile(*sup.TIED)
    model = get_model(sup.TIED[0], **dict(sup.TIED[1])).build("meta")  # head.lm_head.weight is embed.wte.weight
    split = [sup.StageSpec(start=0, stop=2), sup.StageSpec(start=2, stop=4)]
    check_pipelinable(model, profile, split, tp=2)  # neither copy is tensor-parallel: one copy per stage is fine
    # A profile that shards the head column-wise while the embedding stays whole: the copies' gradients differ in
    # shape per rank and could not be summed.
    block_tp = profile.layers[1].tp
    head_tp = block_tp.model_copy(update={"shards": [TPShard(module="lm_head", style=ShardStyle.COLWISE)]})
    sharded = profile.model_copy(update={"layers": [*profile.layers[:-1],
                                                    profile.layers[-1].model_copy(update={"tp": head_tp})]})
    with pytest.raises(ExecutorError, match="head.lm_head.weight colwise"):
        check_pipelinable(model, sharded, split, tp=2)
    check_pipelinable(model, sharded, split, tp=1)  # without tensor parallelism the layout is the same again
    check_pipelinable(model, sharded, [sup.StageSpec(start=0, stop=4)], tp=2)  # one stage: still one tensor


def test_pp_refuses_a_cut_the_models_own_forward_does_not_allow():
    from user_models import FusedGPT

    import profiler

    model = FusedGPT()
    ids = torch.zeros(2, 8, dtype=torch.long)
    profile = profiler.profile(model, (ids,), cache=False)
    # Between wte and wpe both the token embedding and the positions built in forward would have to cross.
    with pytest.raises(ExecutorError, match=r"cannot start at layer 1 \('wpe'\): 2 values cross it"):
        check_pipelinable(model, profile, sup.stages(1, num_layers=profile.num_layers), example_inputs=(ids,))
    check_pipelinable(model, profile, sup.stages(2, num_layers=profile.num_layers), example_inputs=(ids,))