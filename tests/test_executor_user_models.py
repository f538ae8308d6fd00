"""Every layout trains exactly the user's model, or is refused before launch: models written by others, built on
the meta device from their factories
(tests/user_models.py: glue in forward, a CNN with BatchNorm and flatten, a fused-qkv GPT with a tied head and a
hand-written RMSNorm, dict inputs with a `.loss` output, Hugging Face GPT-2 / Llama / BERT), fp32, SGD, 3 steps,
gloo on CPU, 2 and 4 real processes.

Each world size is one torchrun launch running all its cases (this file is also the worker program). The reference is
the plain single-process loop on the same model and batches, with the batch grouped the way the layout groups it
(micro-batch i of every replica together), which is what BatchNorm's statistics see under synchronised BatchNorm and
changes nothing for the other models.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import executor_support as sup
import user_models as um

TOL = 1e-5
STEPS = 3
LR = 0.1
HAS_TRANSFORMERS = True
try:
    import transformers  # noqa: F401
except ImportError:  # pragma: no cover - transformers is a test dependency
    HAS_TRANSFORMERS = False

#: layout -> (world size, Strategy keywords without stages, number of pipeline stages, needs TP-capable layers)
LAYOUTS = {
    "dp2_ddp": (2, {"dp": 2}, 1, False),
    "dp2_zero1": (2, {"dp": 2, "zero_stage": 1}, 1, False),
    "dp2_zero2": (2, {"dp": 2, "zero_stage": 2}, 1, False),
    "dp2_zero3": (2, {"dp": 2, "zero_stage": 3}, 1, False),
    "pp2_gpipe": (2, {"pp": 2, "schedule": "gpipe"}, 2, False),
    "pp2_1f1b": (2, {"pp": 2, "schedule": "1f1b", "num_micro_batches": 4, "micro_batch_size": 1}, 2, False),
    "pp2_interleaved": (2, {"pp": 2, "schedule": "interleaved_1f1b", "virtual_stages": 2}, 4, False),
    "tp2": (2, {"tp": 2}, 1, True),
    "dp2xpp2_replicate": (4, {"dp": 2, "pp": 2, "schedule": "1f1b"}, 2, False),
    "dp2xpp2_zero3": (4, {"dp": 2, "pp": 2, "schedule": "gpipe", "zero_stage": 3}, 2, False),
    "dp2xtp2_zero3": (4, {"dp": 2, "tp": 2, "zero_stage": 3}, 1, True),
    "pp2xtp2": (4, {"pp": 2, "tp": 2, "schedule": "1f1b"}, 2, True),
}
MODELS = [n for n, c in um.CASES.items() if HAS_TRANSFORMERS or not c.needs_transformers]


@functools.cache
def profile_of(name: str):
    """Analytic profile of a zoo case as `autopar run` makes it before launching."""
    import profiler

    case = um.CASES[name]
    inputs, targets = case.batch(0, 2)
    return profiler.profile(case.build(), inputs, cache=False, name=name, loss_fn=case.loss_fn,
                            targets=targets if case.loss_fn else None)


def _pick_cuts(cut_points: list[int], stages: int) -> list[int] | None:
    """`stages - 1` consecutive legal cuts from the middle of the model, or None when it has too few."""
    need = stages - 1
    if len(cut_points) < need:
        return None
    start = (len(cut_points) - need) // 2
    return cut_points[start:start + need]


def plan_cases(world: int) -> tuple[dict, dict, dict]:
    """Every (model, layout) of this world size as one of: run (name -> {model, strategy}); refused (a pipeline
    layout the model has too few legal cuts for: the strategy with illegal cuts, which must be refused); or
    inapplicable (name -> why: no layer tensor parallelism can split, or fewer layers than stages)."""
    run, refused, inapplicable = {}, {}, {}
    for model in MODELS:
        profile = profile_of(model)
        has_tp = any(layer.tp is not None for layer in profile.layers)
        for layout, (size, kw, stages, needs_tp) in LAYOUTS.items():
            name = f"{model}:{layout}"
            if size != world:
                continue
            if needs_tp and not has_tp:
                inapplicable[name] = "no tensor-parallel layer"
                continue
            if profile.num_layers < stages:
                inapplicable[name] = "fewer layers than stages"
                continue
            cuts = _pick_cuts(profile.cut_points, stages)
            if cuts is None:  # one illegal cut, the other boundaries anywhere
                illegal = next(k for k in range(1, profile.num_layers) if k not in profile.cut_points)
                others = [k for k in range(1, profile.num_layers) if k != illegal][:stages - 2]
                refused[name] = {"model": model, "strategy": _strategy(kw, sorted([illegal, *others]),
                                                                       profile.num_layers)}
            else:
                run[name] = {"model": model, "strategy": _strategy(kw, cuts, profile.num_layers)}
    return run, refused, inapplicable


def _strategy(kw: dict, cuts: list[int], num_layers: int) -> dict:
    kw = dict(kw)
    dims = {a: kw.pop(a, 1) for a in ("dp", "tp", "pp")}
    return sup.strategy(**dims, cuts=tuple(cuts), num_layers=num_layers, **kw).model_dump(mode="json")


def reference_losses(model: str, strategy) -> list[float]:
    """The single-process run, each step's batch grouped as the layout groups it (see the module docstring)."""
    from executor.batch import Batch, training_loss
    from executor.init import build_initialized

    case = um.CASES[model]
    net = build_initialized(case.factory, seed=sup.SEED)  # the weights every layout starts from for this seed
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    dp, mbs, nmb = strategy.dims.dp, strategy.micro_batch_size, strategy.num_micro_batches
    local = mbs * nmb
    losses = []
    for step in range(STEPS):
        batch = Batch.of(*case.batch(step, strategy.global_batch_size))
        total = 0.0
        for i in range(nmb):
            group = Batch.cat([batch.select(r * local + i * mbs, r * local + (i + 1) * mbs) for r in range(dp)])
            loss = training_loss(group.call(net), group.targets, case.loss_fn)
            (loss / nmb).backward()
            total += loss.item() / nmb
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def _worker(cases_path: str, out_path: str) -> None:
    """Run every case on this rank; rank 0 writes {case: losses or error}."""
    import torch.distributed as dist

    from executor import ExecutorError, apply_plan, init_distributed
    from executor.worker import teardown
    from planner.model_profile import ModelProfile
    from planner.strategy import Strategy

    payload = json.loads(Path(cases_path).read_text())
    device = init_distributed("cpu")
    results: dict = {}
    for name, spec in payload["cases"].items():
        case = um.CASES[spec["model"]]
        st = Strategy.model_validate(spec["strategy"])
        profile = ModelProfile.model_validate(payload["profiles"][spec["model"]])
        example = case.batch(0, st.micro_batch_size)[0]
        # The factory, not a built model: every rank builds on the meta device and initialises only its shards.
        pm = apply_plan(st, case.factory, profile, loss_fn=case.loss_fn, device=device,
                        seed=sup.SEED, example_inputs=example, sync_batchnorm=case.has_batchnorm)
        opts = [torch.optim.SGD(p.parameters(), lr=LR) for p in pm.parts]
        losses = []
        for step in range(STEPS):
            local = pm.forward_backward(pm.local_batch(*case.batch(step, st.global_batch_size)))
            for opt in opts:
                opt.step()
                opt.zero_grad()
            losses.append(pm.global_loss(local))
        results[name] = losses
    for name, spec in payload["refused"].items():  # the ranks refuse an illegal cut too, before any step
        case = um.CASES[spec["model"]]
        profile = ModelProfile.model_validate(payload["profiles"][spec["model"]])
        try:
            apply_plan(Strategy.model_validate(spec["strategy"]), case.build(seed=sup.SEED), profile,
                       loss_fn=case.loss_fn or um.lm_loss, device=device,
                       example_inputs=case.batch(0, 2)[0])
            results[name] = ""
        except ExecutorError as exc:
            results[name] = str(exc)
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))
    teardown()


def _launch(nproc: int, tmp: Path) -> dict:
    cases, refused, inapplicable = plan_cases(nproc)
    models = sorted({c["model"] for c in [*cases.values(), *refused.values()]})
    payload = {"cases": cases, "refused": refused,
               "profiles": {m: profile_of(m).model_dump(mode="json") for m in models}}
    cases_path, out_path = tmp / f"cases{nproc}.json", tmp / f"out{nproc}.json"
    sup.run_workers(__file__, nproc, payload, cases_path, out_path, timeout=280)
    return {"results": json.loads(out_path.read_text()), "cases": cases, "refused": refused,
            "inapplicable": inapplicable}


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory) -> dict:
    return _launch(2, tmp_path_factory.mktemp("user2"))


@pytest.fixture(scope="module")
def four_rank(tmp_path_factory) -> dict:
    return _launch(4, tmp_path_factory.mktemp("user4"))


def _expected_outcome(world: int) -> list[str]:
    return [f"{m}:{layout}" for m in MODELS for layout, spec in LAYOUTS.items() if spec[0] == world]


def _check_world(run: dict, world: int) -> None:
    from planner.strategy import Strategy

    for name in _expected_outcome(world):
        if name in run["cases"]:
            st = Strategy.model_validate(run["cases"][name]["strategy"])
            ref = reference_losses(run["cases"][name]["model"], st)
            got = run["results"][name]
            assert len(got) == STEPS and max(abs(a - b) for a, b in zip(got, ref)) <= TOL, (name, got, ref)
        elif name in run["refused"]:
            message = run["results"][name]
            assert "cannot start at layer" in message, (name, message)
        else:
            assert name in run["inapplicable"], f"{name} was neither run nor refused"


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_two_rank_layouts_train_the_users_model_or_are_refused(two_rank):
    _check_world(two_rank, 2)


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_four_rank_hybrids_train_the_users_model_or_are_refused(four_rank):
    _check_world(four_rank, 4)


@pytest.mark.parametrize("model", MODELS)
def test_an_illegal_cut_is_refused_before_launch_naming_the_layer(model):
    from executor.launch import LaunchError, check_launch
    from planner.strategy import Strategy

    profile = profile_of(model)
    illegal = [k for k in range(1, profile.num_layers) if k not in profile.cut_points]
    if not illegal:
        pytest.skip(f"every boundary of {model} is a legal cut")
    st = Strategy.model_validate(_strategy({"pp": 2, "schedule": "gpipe"}, illegal[:1], profile.num_layers))
    with pytest.raises(LaunchError, match=profile.layers[illegal[0]].name.replace(".", r"\.")):
        check_launch(sup.make_plan(st, profile), profile, nnodes=1, nproc_per_node=2, cuda_devices=0)


def test_the_matrix_runs_pipelines_of_models_with_glue():
    # Guards the matrix against silently degenerating to data parallelism only.
    cases, refused, inapplicable = plan_cases(2)
    # Every model has a tensor-parallel layer (a classifier or LM head split by class / vocabulary, an embedding
    # split by vocabulary, Megatron-style blocks) except the HF models whose blocks fx cannot trace and that have no
    # tensor-parallel plan of their own.
    no_tp = {f"{m}:tp2" for m in ("hf_gpt2", "hf_bert") if m in MODELS}
    assert inapplicable.pop("dict_lm:pp2_interleaved") == "fewer layers than stages"
    assert set(inapplicable) <= no_tp and all(v == "no tensor-parallel layer" for v in inapplicable.values())
    assert {"glue_mlp:pp2_1f1b", "cnn:pp2_gpipe", "fused_gpt:pp2_interleaved", "glue_mlp:tp2", "cnn:tp2",
            "fused_gpt:tp2"} <= set(cases)
    # fused_gpt's tp layouts shard its fused qkv per head too (executor.tp_rewrite), not only the MLP
    block = next(layer for layer in profile_of("fused_gpt").layers if layer.name == "blocks.0")
    assert [s.segments for s in block.tp.shards if s.module == "qkv"] == [[16, 16, 16]]
    assert "dict_lm:pp2_gpipe" in refused


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
