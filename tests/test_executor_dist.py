"""Every layout gives the single-process loss: gpt-tiny (and a GPT-2 layout with a tied head), fp32, SGD, 3 steps,
gloo on CPU, 2 and 4 real processes.

To stay inside the time budget each world size is one torchrun launch that runs all its layouts one after another
(this file is also the worker program); the tests then compare each layout's losses with a single-process run of
the same global batch computed here.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import executor_support as sup

TOL = 1e-5

# name -> Strategy keyword arguments (see executor_support.strategy)
TWO_RANK = {
    "dp2_ddp": {"dp": 2},
    "fsdp2_zero3_full_recompute": {"dp": 2, "zero_stage": 3, "recompute": "full"},
    "pp2_gpipe": {"pp": 2, "cuts": (3,), "schedule": "gpipe", "num_micro_batches": 4},
    "pp2_1f1b": {"pp": 2, "cuts": (2,), "schedule": "1f1b", "num_micro_batches": 4},
    "pp2_interleaved_4_stages": {"pp": 2, "cuts": (2, 3, 4), "schedule": "interleaved_1f1b", "virtual_stages": 2,
                                 "num_micro_batches": 4, "micro_batch_size": 1},
    "tp2_selective_recompute": {"tp": 2, "recompute": "selective"},
    # gpt2 layout with the head tied to the embedding: FSDP must keep the two names one tensor.
    "tied_head_fsdp2": {"dp": 2, "zero_stage": 3, "cuts": (), "num_layers": 4},
    # The same model cut between embedding and head: each end stage holds a copy, gradients summed every step.
    "tied_pp2_1f1b": {"pp": 2, "cuts": (2,), "schedule": "1f1b", "num_micro_batches": 4, "num_layers": 4},
    "tied_pp2_interleaved_4_stages": {"pp": 2, "cuts": (1, 2, 3), "schedule": "interleaved_1f1b",
                                      "virtual_stages": 2, "num_micro_batches": 4, "micro_batch_size": 1,
                                      "num_layers": 4},
}
FOUR_RANK = {
    "dp2xpp2_replicate_full_recompute": {"dp": 2, "pp": 2, "cuts": (3,), "schedule": "1f1b", "num_micro_batches": 4,
                                         "micro_batch_size": 1, "recompute": "full"},
    "dp2xpp2_zero1": {"dp": 2, "pp": 2, "cuts": (3,), "schedule": "gpipe", "zero_stage": 1},
    "dp2xtp2_fsdp": {"dp": 2, "tp": 2, "zero_stage": 3},
    "pp2xtp2": {"pp": 2, "tp": 2, "cuts": (2,), "schedule": "1f1b", "num_micro_batches": 4},
    # Tied head split from the embedding with data parallelism: the copies' FSDP shards / replicas are summed
    # over the two ranks of each dp coordinate.
    "tied_dp2xpp2_fsdp": {"dp": 2, "pp": 2, "cuts": (2,), "schedule": "1f1b", "num_micro_batches": 2,
                          "zero_stage": 3, "num_layers": 4},
    "tied_dp2xpp2_replicate": {"dp": 2, "pp": 2, "cuts": (2,), "schedule": "gpipe", "num_micro_batches": 2,
                               "num_layers": 4},
}
#: Cases that train the tied model instead of gpt-tiny.
TIED_CASES = {n for n in [*TWO_RANK, *FOUR_RANK] if n.startswith("tied_")}
#: The tied parameter's two names (Hugging Face layout).
TIED_NAMES = ("embed.wte.weight", "head.lm_head.weight")
#: The layout run through a hand-written loop on `apply_plan` (the API for users with their own loop), given a
#: model with real weights (built under this seed) instead of a factory.
OWN_LOOP = "pp2_1f1b"
OWN_LOOP_BUILD_SEED = 7


def _tied_copies(parts) -> dict:
    """This rank's whole copies of the tied parameter by name (collective over the dp axis for FSDP/replicate)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for part in parts:
        for name in TIED_NAMES:
            try:
                p = part.get_parameter(name)
            except AttributeError:
                continue
            out[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
    return out


def _check_copies(pm, opts, name: str, ckpt_dir: Path, results: dict) -> None:
    """Record whether every copy of the tied weight on every rank is bit-identical, and survives a checkpoint."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from executor import checkpoint

    before = _tied_copies(pm.parts)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {k: v.tolist() for k, v in before.items()})
    copies = [(k, torch.tensor(v)) for d in everyone for k, v in d.items()]
    results[f"{name}:copies"] = {
        "names": sorted({k for k, _ in copies}),
        "count": len(copies),
        "identical": all(torch.equal(t, copies[0][1]) for _, t in copies),
    }
    state = checkpoint.TrainState(pm.parts, opts)
    state.step = sup.STEPS
    path = checkpoint.save(state, ckpt_dir / name)
    with torch.no_grad():
        for part in pm.parts:
            for p in part.parameters():
                (p.to_local() if isinstance(p, DTensor) else p).zero_()
    checkpoint.load(state, path)
    after = _tied_copies(pm.parts)
    ok = torch.tensor(float(sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)))
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    results[f"{name}:reloaded"] = bool(ok)


def _worker(cases_path: str, out_path: str) -> None:
    """Run every case in the file on this rank; rank 0 writes {case: losses}."""
    import torch
    import torch.distributed as dist

    from executor import ExecutorError, apply_plan, init_distributed, train
    from executor.worker import teardown
    from planner.model_profile import ModelProfile
    from planner.strategy import Strategy
    from profiler.zoo import get_model

    payload = json.loads(Path(cases_path).read_text())
    tiny_profile = ModelProfile.model_validate(payload["profile"])
    device = init_distributed("cpu")
    results = {}
    for name, raw in payload["cases"].items():
        st = Strategy.model_validate(raw)
        tied = name in TIED_CASES
        zoo = get_model(sup.TIED[0], **dict(sup.TIED[1])) if tied else get_model("gpt-tiny")
        profile = ModelProfile.model_validate(payload["tied_profile"]) if tied else tiny_profile

        def data(step: int, batch: int, zoo=zoo):
            return zoo.synthetic_batch(batch, seed=sup.DATA_SEED + step)

        model = functools.partial(zoo.build, "meta")
        if name == OWN_LOOP:
            torch.manual_seed(OWN_LOOP_BUILD_SEED)
            model = zoo.build("cpu")
        pm = apply_plan(st, model, profile, loss_fn=zoo.loss, device=device, seed=sup.SEED)
        opts = [torch.optim.SGD(p.parameters(), lr=sup.LR) for p in pm.parts]
        if name == OWN_LOOP:
            losses = []
            for step in range(sup.STEPS):
                local = pm.forward_backward(pm.local_batch(*data(step, st.global_batch_size)))
                for opt in opts:
                    opt.step()
                    opt.zero_grad()
                losses.append(pm.global_loss(local))
        else:
            losses = [r.loss for r in train(pm, opts, data, steps=sup.STEPS)]
        results[name] = losses
        if tied and st.dims.pp > 1:
            _check_copies(pm, opts, name, Path(cases_path).parent / "ckpt", results)
    if dist.get_world_size() == 2:
        # A planned TP key that matches no module must fail loudly (parallelize_module would only warn).
        zoo, profile = get_model("gpt-tiny"), tiny_profile
        block = profile.layers[1]
        shards = [block.tp.shards[0].model_copy(update={"module": "attn.qkv"}), *block.tp.shards[1:]]
        block = block.model_copy(update={"tp": block.tp.model_copy(update={"shards": shards})})
        bad = profile.model_copy(update={"layers": [profile.layers[0], block, *profile.layers[2:]]})
        try:
            apply_plan(Strategy.model_validate(payload["tp_strategy"]), lambda: zoo.build("meta"), bad,
                       loss_fn=zoo.loss, device=device)
            results["bad_tp_key_error"] = ""
        except ExecutorError as exc:
            results["bad_tp_key_error"] = str(exc)
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))
    teardown()


def _launch(nproc: int, cases: dict, tmp: Path) -> dict:
    cases_path, out_path = tmp / f"cases{nproc}.json", tmp / f"out{nproc}.json"
    profile = sup.tiny_profile()
    payload = {
        "profile": profile.model_dump(mode="json"),
        "tied_profile": sup.tiny_profile(*sup.TIED).model_dump(mode="json"),
        "cases": {n: sup.strategy(**kw).model_dump(mode="json") for n, kw in cases.items()},
        "tp_strategy": sup.strategy(tp=2).model_dump(mode="json"),
    }
    sup.run_workers(__file__, nproc, payload, cases_path, out_path, timeout=150)
    return json.loads(out_path.read_text())


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory) -> dict:
    return _launch(2, TWO_RANK, tmp_path_factory.mktemp("exec2"))


@pytest.fixture(scope="module")
def four_rank(tmp_path_factory) -> dict:
    return _launch(4, FOUR_RANK, tmp_path_factory.mktemp("exec4"))


def _check(losses: list[float], kw: dict, build_seed: int | None = None, tied: bool = False) -> None:
    st = sup.strategy(**kw)
    model = {"model": sup.TIED[0], "options": sup.TIED[1]} if tied else {}
    ref = sup.reference_losses(st.global_batch_size, build_seed=build_seed, **model)
    assert len(losses) == sup.STEPS
    assert max(abs(a - b) for a, b in zip(losses, ref)) <= TOL, (losses, ref)


@pytest.mark.distributed
@pytest.mark.timeout(200)
@pytest.mark.parametrize("case", sorted(TWO_RANK))
def test_two_rank_layout_loss_equals_single_process(two_rank, case):
    _check(two_rank[case], TWO_RANK[case], OWN_LOOP_BUILD_SEED if case == OWN_LOOP else None, case in TIED_CASES)


@pytest.mark.distributed
@pytest.mark.timeout(200)
@pytest.mark.parametrize("case", sorted(FOUR_RANK))
def test_four_rank_layout_loss_equals_single_process(four_rank, case):
    _check(four_rank[case], FOUR_RANK[case], tied=case in TIED_CASES)


@pytest.mark.distributed
@pytest.mark.timeout(200)
@pytest.mark.parametrize("case", sorted(n for n in TIED_CASES if "pp2" in n))
def test_tied_weight_copies_of_split_stages_stay_bit_identical(request, case):
    results = request.getfixturevalue("two_rank" if case in TWO_RANK else "four_rank")
    copies = results[f"{case}:copies"]
    assert copies["names"] == sorted(TIED_NAMES)  # both names really live on some rank: the tie was split
    dp = (TWO_RANK | FOUR_RANK)[case].get("dp", 1)
    assert copies["count"] == 2 * dp
    assert copies["identical"]
    assert results[f"{case}:reloaded"]  # a checkpoint saves both copies and loads both back


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_tp_plan_key_matching_no_module_is_an_error(two_rank):
    assert "attn.qkv" in two_rank["bad_tp_key_error"]


def test_training_changes_the_loss():
    # Guards the comparisons above against a degenerate setup where every run returns the same constant.
    ref = sup.reference_losses(4)
    assert len(set(ref)) == sup.STEPS


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
