"""One model reference, one precision, one cache key: `profiler.resolve` behind every entry point.

A reference with the same options must give the same profile hash from `autopar profile`, `autopar plan`, Python
`planner.plan()` (by reference and as an nn.Module with example inputs), the service and `autopar run` (which
refuses a plan whose hash differs); the precision is what the cluster trains in unless told otherwise; and the
profile cache must not hand back a profile of code that has since been edited.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import planner
from api.cli import app
from planner.cluster import PRESETS, ClusterSpec, load_cluster
from planner.model_profile import DType, ModelProfile
from planner.precision import default_dtype
from planner.strategy import Plan

ROOT = Path(__file__).resolve().parents[1]

# A user's model file as torchvision users write it: in-place ReLUs, a factory, its example batch and loss.
FACTORY = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from torch import nn

    WIDTH = 16

    def model():
        return nn.Sequential(nn.Linear(8, WIDTH), nn.ReLU(inplace=True), nn.Linear(WIDTH, WIDTH),
                             nn.ReLU(inplace=True), nn.Linear(WIDTH, 3))

    def example_batch(batch_size):
        return torch.randn(batch_size, 8), torch.randint(0, 3, (batch_size,))

    def loss_fn(output, targets):
        return F.cross_entropy(output, targets)
""")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPAR_CACHE_DIR", str(tmp_path / "cache"))


def _cli(*argv: str) -> str:
    r = CliRunner().invoke(app, list(argv))
    assert r.exit_code == 0, (r.output, r.exception)
    return r.output


@pytest.mark.parametrize(("cluster", "dtype"), [("cpu", DType.FP32), ("dgx-h100", DType.BF16)])
def test_a_zoo_name_gives_one_profile_hash_and_precision_from_every_entry_point(tmp_path, cluster, dtype):
    from service_support import TestClient, make_app, zoo_request

    from api.launching import run_profile as _profile_for
    from profiler.resolve import parse_reference

    prof, plan_file = tmp_path / "p.json", tmp_path / "plan.json"
    _cli("profile", "gpt-tiny", "--seq-len", "16", "--cluster", cluster, "--out", str(prof))
    _cli("plan", "gpt-tiny", "--seq-len", "16", "--cluster", cluster, "--global-batch", "8", "--time-limit", "2",
         "--out", str(plan_file))
    profiled, cli_plan = ModelProfile.from_json(prof), Plan.from_json(plan_file)
    py_plan = planner.plan("gpt-tiny", cluster, global_batch_size=8, model_options={"seq_len": 16}, time_limit_s=2)
    request = zoo_request(seq_len=16)
    del request["model"]["dtype"]
    request["cluster"] = {"kind": "preset", "name": cluster}
    with TestClient(make_app(tmp_path / "plans.db")) as c:
        answer = c.post("/v1/plans", json=request)
    assert answer.status_code in (200, 201), answer.text
    served = Plan.model_validate(answer.json()["plan"])
    to_run = _profile_for(parse_reference("gpt-tiny", {"seq_len": 16}), cli_plan, None)

    assert profiled.dtype == dtype and profiled.input.seq_len == 16
    hashes = {p.provenance.profile_hash for p in (cli_plan, py_plan, served)} | {to_run.profile_hash}
    assert hashes == {profiled.profile_hash}
    assert {p.provenance.dtype for p in (cli_plan, py_plan, served)} == {dtype}


def test_a_factory_file_gives_one_profile_hash_in_profile_plan_python_plan_and_run(tmp_path):
    source = tmp_path / "net.py"
    source.write_text(FACTORY)
    ref = f"{source}:model"
    prof, plan_file, report = tmp_path / "p.json", tmp_path / "plan.json", tmp_path / "report.json"
    _cli("profile", ref, "--cluster", "cpu", "--out", str(prof))
    _cli("plan", ref, "--cluster", "cpu", "--gpus-per-node", "1", "--global-batch", "4", "--time-limit", "2",
         "--out", str(plan_file))
    one_cpu = load_cluster("cpu", gpus_per_node=1)
    by_reference = planner.plan(ref, one_cpu, global_batch_size=4, time_limit_s=2)
    sys.path.insert(0, str(tmp_path))
    try:
        import net  # the user's own import of the same file
    finally:
        sys.path.remove(str(tmp_path))
    inputs, _ = net.example_batch(2)
    as_module = planner.plan(net.model(), one_cpu, global_batch_size=4, example_inputs=(inputs,), time_limit_s=2)

    want = ModelProfile.from_json(prof).profile_hash
    assert Plan.from_json(plan_file).provenance.profile_hash == want
    assert by_reference.provenance.profile_hash == want and as_module.provenance.profile_hash == want
    # `autopar run` refuses a plan whose profile hash differs from the model's, before any rank starts.
    proc = subprocess.run(
        [sys.executable, "-m", "api.cli", "run", str(plan_file), "--model", ref, "--steps", "1", "--report",
         str(report)],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "in float32" in proc.stdout
    assert len(json.loads(report.read_text())["steps"]) == 1


def test_default_precision_is_bf16_on_gpu_presets_and_fp32_on_cpu():
    assert default_dtype(load_cluster("cpu")) == DType.FP32
    for name in set(PRESETS) - {"cpu"}:
        assert default_dtype(load_cluster(name)) == DType.BF16, name
    v100 = load_cluster("dgx-a100-40gb").model_dump()
    v100["device"]["peak_flops"] = {"float32": 15.7e12, "float16": 125e12}  # no bfloat16 on a V100
    assert default_dtype(ClusterSpec.model_validate(v100)) == DType.FP16
    assert default_dtype(device="cpu") == DType.FP32
    assert default_dtype(device="meta") == DType.BF16 and default_dtype(device="cuda") == DType.BF16


def test_run_takes_the_plans_precision_and_names_the_dtype_flag_that_fits(tmp_path):
    from api.launching import run_profile as _profile_for
    from profiler.resolve import parse_reference

    bf16_plan = planner.plan("gpt-tiny", "dgx-h100", global_batch_size=8, time_limit_s=2)
    assert bf16_plan.provenance.dtype == DType.BF16
    ref = parse_reference("gpt-tiny")
    assert _profile_for(ref, bf16_plan, None).dtype == DType.BF16
    # A plan written before the precision was recorded is matched by its profile hash.
    unrecorded = bf16_plan.model_copy(update={"provenance": bf16_plan.provenance.model_copy(update={"dtype": None})})
    assert _profile_for(ref, unrecorded, None).dtype == DType.BF16

    path = tmp_path / "plan.json"
    bf16_plan.to_json(path)
    r = CliRunner().invoke(app, ["run", str(path), "--model", "gpt-tiny", "--dtype", "float32"])
    assert r.exit_code == 2, r.output
    assert "made for bfloat16" in r.stderr and "add --dtype bfloat16" in r.stderr
    assert "launching" not in r.stdout


def test_a_long_sequence_on_a_rotary_zoo_model_plans(tmp_path):
    out = tmp_path / "plan.json"
    _cli("plan", "llama-7b", "--seq-len", "2048", "--cluster", "dgx-h100", "--global-batch", "64", "--time-limit",
         "2", "--out", str(out))
    assert Plan.from_json(out).provenance.dtype == DType.BF16


def _factory_with_repeats(path: Path, repeats: int) -> None:
    """Same modules (same structure hash), but the forward applies the layer `repeats` times."""
    path.write_text(textwrap.dedent(f"""
        import torch
        from torch import nn

        REPEATS = {repeats}

        class Body(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(16, 16)

            def forward(self, x):
                for _ in range(REPEATS):
                    x = self.lin(x)
                return x

        def build(batch_size=2):
            return nn.Sequential(nn.Linear(16, 16), Body()), (torch.randn(batch_size, 16),)
    """))


def test_an_edited_model_file_is_profiled_again_despite_the_cache(tmp_path):
    from profiler.resolve import resolve_profile

    source = tmp_path / "edited.py"
    _factory_with_repeats(source, 1)
    first = resolve_profile(f"{source}:build", dtype="float32").profile
    _factory_with_repeats(source, 3)
    stamp = source.stat().st_mtime_ns + 2_000_000_000  # a new mtime even on a coarse-grained file system
    os.utime(source, ns=(stamp, stamp))
    edited = resolve_profile(f"{source}:build", dtype="float32").profile
    again = resolve_profile(f"{source}:build", dtype="float32").profile

    assert edited.structure_hash == first.structure_hash  # a structure-only key would return `first`
    # Body's Linear runs three times instead of once: 2 * 16 * 16 FLOPs per sample each time.
    assert edited.layers[1].fwd_flops == pytest.approx(3 * first.layers[1].fwd_flops)
    assert first.layers[1].fwd_flops == pytest.approx(2 * 16 * 16, rel=0.1)
    assert again == edited  # unchanged code: the cached profile


def test_an_override_is_part_of_the_cache_key(tmp_path):
    from profiler import cache
    from profiler.resolve import resolve_profile

    whole = resolve_profile("gpt-tiny", dtype="float32").profile
    fewer = resolve_profile("gpt-tiny", options={"num_layers": 2}, dtype="float32").profile
    inside = ["blocks.0.ln_1", "blocks.0.attn", "blocks.0.ln_2", "blocks.0.mlp"]
    layers = ["embed", *inside, "blocks.1", "blocks.2", "blocks.3", "head"]
    chosen = resolve_profile("gpt-tiny", dtype="float32", layers=layers).profile
    assert [whole.num_layers, fewer.num_layers, chosen.num_layers] == [6, 4, 9]
    assert len(list((tmp_path / "cache").glob("*.profile.json"))) == 3
    spec = whole.input
    base = cache.cache_key("s", spec, "float32", "meta", None, (2, 5))
    assert cache.cache_key("s", spec, "float32", "meta", None, (2, 5), code="other code") != base
    assert cache.cache_key("s", spec, "float32", "meta", None, (2, 5), overrides={"tp": "none"}) != base


def test_the_service_path_never_imports_code():
    from profiler.errors import ProfileError
    from profiler.resolve import resolve_profile

    with pytest.raises(ProfileError, match="does not import"):
        resolve_profile(f"{ROOT / 'examples' / 'glue_cnn.py'}:model", allow_code=False)
