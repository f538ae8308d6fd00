"""`autopar run` on a model file as users write it (dict inputs, attention mask, `.loss` output): the same run on one
process and on two (data parallel) gives the same losses, and the synthetic data follows the example batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tests/run_model_dict.py:model"


def _run(tmp: Path, nproc: int) -> list[float]:
    report = tmp / f"report{nproc}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "api.cli", "run", "--plan-first", MODEL, "--cluster", "cpu", "--global-batch", "4",
         "--nproc-per-node", str(nproc), "--steps", "3", "--optimizer", "sgd", "--lr", "0.1", "--report",
         str(report)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=150, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["world_size"] == nproc
    return [s["loss"] for s in data["steps"]]


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_run_of_a_dict_input_model_file_gives_the_single_process_losses(tmp_path):
    one, two = _run(tmp_path, 1), _run(tmp_path, 2)
    assert len(one) == 3 and len(set(one)) == 3  # it trained
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (one, two)


def test_a_factory_file_resolves_to_a_model_with_its_example_batch_and_own_loss():
    from executor.sources import UserModel, resolve_model

    m = resolve_model(str(ROOT / MODEL))
    assert isinstance(m, UserModel) and m.loss_fn is None
    inputs, targets = m.synthetic_batch(6, seed=3)
    assert set(inputs) == {"input_ids", "attention_mask", "labels"} and targets is None
    assert inputs["input_ids"].shape == (6, 8) and bool((inputs["attention_mask"] == 1).all())
    assert int(inputs["input_ids"].min()) >= 1 and int(inputs["input_ids"].max()) < 64  # the example's range
    out = m.build()(**inputs)
    assert torch.equal(m.loss(out, targets), out.loss)
    again, _ = m.synthetic_batch(6, seed=3)
    assert torch.equal(again["input_ids"], inputs["input_ids"])  # a function of the seed (resume sees the same)


def test_a_factory_without_an_example_batch_is_refused_with_the_fix(tmp_path):
    from executor.errors import ExecutorError
    from executor.sources import resolve_model

    f = tmp_path / "bare.py"
    f.write_text("import torch\ndef model():\n    return torch.nn.Linear(2, 2)\n")
    with pytest.raises(ExecutorError, match="example_batch"):
        resolve_model(f"{f}:model")


def test_profile_and_run_read_the_same_model_file_to_the_same_profile_hash():
    import profiler
    from profiler.factory import load_factory
    from profiler.resolve import resolve_profile

    name = str(ROOT / MODEL)
    loaded = load_factory(name, batch_size=1)
    profiled = profiler.profile(loaded.module, loaded.inputs, cache=False)
    assert resolve_profile(name, dtype="float32", cache=False).profile.profile_hash == profiled.profile_hash
