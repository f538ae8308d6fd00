"""Faults in `autopar run`: a diverging loss, a damaged checkpoint, the launcher killed with SIGKILL.

The end-to-end tests really launch `autopar run` (gpt-tiny, 2 gloo ranks, FSDP + AdamW so that sharded model and
optimizer state go through the checkpoints); the checkpoint rules are also checked in-process on a small module.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import executor_support as sup

from executor import checkpoint
from executor.launch import LAUNCHER_PID_ENV

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # single-process DCP

REPO = Path(__file__).resolve().parents[1]
#: The step (0-based) from which `nan_loss_from_step_2` makes the loss NaN.
NAN_STEP = 2


def nan_loss_from_step_2(step: int, global_batch: int):
    """Data source (`--data test_executor_faults:nan_loss_from_step_2`): gpt-tiny's synthetic batches, except that
    from step 2 on every target is the ignore index, so the mean cross-entropy is 0/0 = NaN."""
    from profiler.zoo import get_model

    inputs, targets = get_model("gpt-tiny").synthetic_batch(global_batch, seed=step)
    if step >= NAN_STEP:
        targets = torch.full_like(targets, -100)
    return inputs, targets


def _fsdp_plan(tmp_path: Path) -> Path:
    path = tmp_path / "plan.json"
    sup.make_plan(sup.strategy(dp=2, zero_stage=3), sup.tiny_profile()).to_json(path)
    return path


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# --- divergence --------------------------------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_nan_loss_stops_the_run_at_that_step_and_never_saves_its_state(tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = sup.autopar_run(str(_fsdp_plan(tmp_path)), "--model", "gpt-tiny", "--steps", "6", "--save-dir", str(ckpt),
                    "--save-every", "1", "--data", "test_executor_faults:nan_loss_from_step_2",
                    "--report", str(tmp_path / "r.json"))
    out = proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.returncode == 1, out
    assert _last_line(proc.stderr).startswith(f"error: loss became NaN at step {NAN_STEP};"), out
    assert "Traceback" not in proc.stderr, out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["diverged_at_step"] == NAN_STEP
    # The steps before it are kept, finite.
    assert [r["step"] for r in report["steps"]] == list(range(NAN_STEP))
    assert all(math.isfinite(r["loss"]) for r in report["steps"])
    # step_0000000N holds the state after N steps; step 2's update (its loss NaN) would be step_00000003.
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000001", f"step_{NAN_STEP:08d}"]


# --- damaged checkpoints -----------------------------------------------------------------------------------------

def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 8] = bytes(b ^ 0xFF for b in data[mid:mid + 8])
    path.write_bytes(bytes(data))


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_damaged_shard_is_refused_and_fallback_resumes_from_the_previous_good_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    common = [str(_fsdp_plan(tmp_path)), "--model", "gpt-tiny", "--steps", "4", "--save-dir", str(ckpt), "--lr", "1e-3"]
    first = sup.autopar_run(*common, "--save-every", "2", "--report", str(tmp_path / "a.json"))
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    # No .partial left over; beside the checkpoints only the run store `autopar run` records into.
    assert sorted(p.name for p in ckpt.iterdir()) == ["autopar-runs.db", "step_00000002", "step_00000004"]

    shard = ckpt / "step_00000004" / "__1_0.distcp"
    _flip_bytes(shard)
    refused = sup.autopar_run(*common, "--resume")
    assert refused.returncode == 1, refused.stdout[-2000:] + refused.stderr[-4000:]
    line = _last_line(refused.stderr)
    assert line.startswith("error: checkpoint") and str(shard) in line and "--resume-fallback" in line, line
    assert "step 2 " not in refused.stdout  # refused before training

    second = sup.autopar_run(*common, "--resume", "--resume-fallback", "--report", str(tmp_path / "b.json"))
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-4000:]
    assert "skipping it for an older one" in second.stdout and str(shard) in second.stdout
    a = json.loads((tmp_path / "a.json").read_text())["steps"]
    b = json.loads((tmp_path / "b.json").read_text())["steps"]
    assert [s["step"] for s in b] == [2, 3]
    assert len({s["loss"] for s in a}) == 4  # the curve moves, so matching it means something
    for old, new in zip(a[2:], b):
        assert abs(old["loss"] - new["loss"]) <= 1e-6, (a, b)
    checkpoint.verify(ckpt / "step_00000004")  # the damaged checkpoint was replaced by a good one


def _small_state(seed: int = 0) -> checkpoint.TrainState:
    torch.manual_seed(seed)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    return checkpoint.TrainState([net], [opt])


def test_crash_mid_save_leaves_no_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    state = _small_state()
    state.step = 1
    checkpoint.save(state, tmp_path)

    def crash(path: Path):  # the process dies after DCP wrote shards and .metadata, before the manifest
        raise SystemExit("killed mid-save")

    monkeypatch.setattr(checkpoint, "_sha256", crash)
    state.step = 2
    with pytest.raises(SystemExit):
        checkpoint.save(state, tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "step_00000002.partial" / ".metadata").exists()
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    fresh = _small_state(seed=1)
    assert checkpoint.resume(fresh, tmp_path) == tmp_path / "step_00000001" and fresh.step == 1
    state.step = 2
    checkpoint.save(state, tmp_path)  # a later save of the same step clears the partial directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002"]


def test_non_finite_state_is_never_saved_and_never_loaded(tmp_path, monkeypatch):
    state = _small_state()
    state.step = 3
    with torch.no_grad():
        state.parts[0].weight[0, 0] = float("nan")
    with pytest.raises(checkpoint.StateDiverged, match=r"step 2 \(model.weight\)"):
        checkpoint.save(state, tmp_path)
    assert list(tmp_path.iterdir()) == []
    # A checkpoint written with NaN inside (by a writer without the check) passes its checksums but is refused.
    monkeypatch.setattr(checkpoint.TrainState, "first_non_finite", lambda self: None)
    checkpoint.save(state, tmp_path)
    monkeypatch.undo()
    with pytest.raises(checkpoint.CheckpointError, match=r"step_00000003 is unusable: .*non-finite.*model.weight"):
        checkpoint.resume(_small_state(), tmp_path)


def test_missing_or_resized_file_is_named(tmp_path):
    state = _small_state()
    state.step = 1
    path = checkpoint.save(state, tmp_path)
    metadata = path / ".metadata"
    good = metadata.read_bytes()
    metadata.write_bytes(good + b"x")
    with pytest.raises(checkpoint.CheckpointError, match=r"\.metadata has \d+ bytes"):
        checkpoint.verify(path)
    metadata.write_bytes(good)
    checkpoint.verify(path)
    (path / "__0_0.distcp").unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"__0_0\.distcp is missing"):
        checkpoint.load(_small_state(), path)


# --- launcher killed ----------------------------------------------------------------------------------------------

def _workers_of(launcher_pid: int) -> list[int]:
    """Worker processes of one launch, found by the launcher pid the launcher puts in their environment."""
    marker = f"{LAUNCHER_PID_ENV}={launcher_pid} "
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [pid for pid in pids
            if "executor.worker" in sup.proc_text(pid, "cmdline") and marker in sup.proc_text(pid, "environ")]


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux-only")
def test_workers_die_when_the_launcher_is_killed_with_sigkill(tmp_path):
    cli = sup.start_training(_fsdp_plan(tmp_path), new_session=True)
    workers: list[int] = []
    spec_dirs: set[Path] = set()
    try:
        sup.wait_until_training(cli)
        workers = _workers_of(cli.pid)
        assert len(workers) == 2
        # torchrun's agent runs inside `autopar run` and starts the workers itself: the launcher is their parent.
        assert all(int(sup.proc_text(w, "stat").rsplit(")", 1)[1].split()[1]) == cli.pid for w in workers)
        spec_dirs = {Path(sup.proc_text(w, "cmdline").split()[-1]).parent for w in workers}
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(sup.process_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if sup.process_alive(w)]
    finally:
        cli.kill()
        for w in workers:
            if sup.process_alive(w):
                os.kill(w, signal.SIGKILL)
        for d in spec_dirs:  # the killed launcher could not remove its temporary directory
            if d.name.startswith("autopar-run-"):
                shutil.rmtree(d, ignore_errors=True)
