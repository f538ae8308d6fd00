"""Sequence parallelism (Megatron `--sequence-parallel`, torchtitan's `SequenceParallel`): profiler marks, cost model,
executor and the Megatron / torchtitan round trip.

The multi-process case is one 2-rank torchrun launch; this file is also its worker program.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import executor_support as sup
import pytest
import torch

from planner.cluster import load_cluster
from planner.cost import CommModel, place_group
from planner.evaluate import evaluate
from planner.gpt_formula import gpt_profile
from planner.memory import estimate_layer_activation_bytes
from planner.strategy import ParallelDims, Recompute, Schedule, StageSpec, Strategy
from planner.tp_comm import tp_collectives

TOL = 1e-5


# --- profiler ---------------------------------------------------------------------------------------------------


def test_profiler_marks_gpt_block_norms_and_regions_and_their_gathered_inputs():
    p = sup.tiny_profile()
    s, h = 32, 64  # gpt-tiny, fp32
    for block in p.layers[1:-1]:
        sp = block.tp.sequence_parallel
        assert sp.norms == ["ln_1", "ln_2"] and sp.regions == ["attn", "mlp"]
        assert sp.gathered_bytes == 2 * s * h * 4  # the inputs of attn and mlp, each (s, h) floats per sample
    assert p.layers[0].tp.sequence_parallel is None and p.layers[-1].tp.sequence_parallel is None


def test_profiler_refuses_sequence_parallel_where_the_block_reads_its_token_count():
    # tests/user_models.FusedBlock calls its fused qkv in the block itself and does `b, t, c = x.shape`: on a
    # sequence shard t would be the local token count.
    from user_models import FusedGPT

    import profiler

    p = profiler.profile(FusedGPT(), (torch.zeros(2, 8, dtype=torch.long),), cache=False)
    blocks = [x for x in p.layers if x.tp is not None and any(s.module == "qkv" for s in x.tp.shards)]
    assert blocks and all(x.tp.sequence_parallel is None for x in blocks)


# --- cost model ---------------------------------------------------------------------------------------------------


def test_sequence_sharded_activations_at_tp8_are_an_eighth_of_tp1():
    p = sup.tiny_profile("gpt-tiny", (("heads", 8),))
    block = p.layers[1]
    s, h, b = 32, 64, 2
    # By hand: the block keeps ln_1's and ln_2's inputs (s h fp32 each) and their mean / rstd (s fp32 each, x2)
    # outside its regions; with sequence parallelism every one of them is a sequence shard.
    seq_sharded = 2 * s * h * 4 + 2 * 2 * s * 4
    gathered = 2 * s * h * 4
    inside = block.saved_activation_bytes - seq_sharded - gathered  # what the regions keep besides their inputs
    tp8 = estimate_layer_activation_bytes(block, tp=8, micro_batch=b, recompute=Recompute.NONE,
                                          sequence_parallel=True)
    assert tp8 == math.ceil(b * (seq_sharded / 8 + gathered + inside / 8))
    no_sp = estimate_layer_activation_bytes(block, tp=8, micro_batch=b, recompute=Recompute.NONE)
    assert tp8 < no_sp
    tp1 = estimate_layer_activation_bytes(block, tp=1, micro_batch=b, recompute=Recompute.NONE,
                                          sequence_parallel=True)
    assert tp1 == math.ceil(b * block.saved_activation_bytes)  # tp=1: nothing to shard


def test_block_activations_follow_korthikanti_with_and_without_sequence_parallel():
    # Korthikanti et al. 2022, eq. 2-4, 16-bit, no flash attention, per layer: 10 s b h + 24 s b h / t + 5 a s^2 b / t
    # with TP alone, 34 s b h / t + 5 a s^2 b / t with sequence parallelism. torch keeps the two gathered region
    # inputs whole (Megatron gathers them again in backward), 2 x 2 s b h: add (1 - 1/t) 4 s b h.
    s, h, a, b, t = 2048, 12288, 96, 1, 8
    block = gpt_profile(num_layers=1, hidden=h, heads=a, seq_len=s).layers[1]
    sp = estimate_layer_activation_bytes(block, tp=t, micro_batch=b, recompute=Recompute.NONE,
                                         sequence_parallel=True)
    assert sp == pytest.approx(34 * s * b * h / t + 5 * a * s * s * b / t + (1 - 1 / t) * 4 * s * b * h, rel=1e-9)
    # Without SP our model keeps the block input and output whole twice (8 s b h: LN inputs, residuals) where the
    # paper keeps 10 s b h (its 2 s b h of dropout masks are split here): within 2 s b h of the paper's count.
    plain = estimate_layer_activation_bytes(block, tp=t, micro_batch=b, recompute=Recompute.NONE)
    paper = 10 * s * b * h + 24 * s * b * h / t + 5 * a * s * s * b / t
    assert abs(plain - paper) <= 2 * s * b * h * (1 - 1 / t) + 1


def _korthikanti_22b(micro_batch: int, sequence_parallel: bool):
    # Korthikanti et al. 2022, Table 3: the 22B model (h 6144, a 64, 48 layers, s 2048) on one DGX A100-80GB node
    # with t = 8, p = 1 and selective recompute.
    prof = gpt_profile(num_layers=48, hidden=6144, heads=64, seq_len=2048, vocab_size=51200)
    st = Strategy(dims=ParallelDims(dp=1, tp=8, pp=1, world_size=8), micro_batch_size=micro_batch,
                  num_micro_batches=4 // micro_batch, recompute=Recompute.SELECTIVE,
                  stages=[StageSpec(start=0, stop=prof.num_layers)], sequence_parallel=sequence_parallel)
    return prof, st


def test_published_long_sequence_layout_fits_only_with_sequence_parallelism():
    # At micro-batch 2 the 22B layout's activations (48 layers x (34 s b h / t + 4 s b h (1 - 1/t)) with SP against
    # 48 x (8 s b h + 26 s b h / t) without, 2 s b h of dropout masks aside) decide whether it fits in 80 GB less
    # the margin, next to about 51 GB of fp16 / fp32 / Adam state.
    cluster = load_cluster("dgx-a100-80gb")
    prof, plain = _korthikanti_22b(2, False)
    without = evaluate(prof, cluster, plain)
    with_sp = evaluate(prof, cluster, _korthikanti_22b(2, True)[1])
    assert not without.fits and with_sp.fits
    assert with_sp.memory[0].activations < without.memory[0].activations
    # only activations change
    assert with_sp.memory[0].parameters + with_sp.memory[0].optimizer_state == pytest.approx(
        without.memory[0].parameters + without.memory[0].optimizer_state)


def test_each_region_trades_its_allreduces_for_a_gather_and_a_reduce_scatter():
    p = sup.tiny_profile()
    block, cluster = p.layers[2], load_cluster("dgx-a100-80gb")
    comm, group = CommModel(cluster), place_group(8, 1, 8)
    sp = tp_collectives(block, p.layers[1], tp=8, sequence_parallel=True, recompute_forward=False)
    # 2 regions x (forward + backward): 4 all-gathers and 4 reduce-scatters of the block's (s, h) activation
    assert sorted((c.collective, c.count, c.nbytes) for c in sp) == [
        ("all_gather", 4, 32 * 64 * 4), ("reduce_scatter", 4, 32 * 64 * 4)]
    # On a ring an all-gather plus a reduce-scatter take the time of one all-reduce of the same bytes
    x = 1e8
    assert comm.all_gather(x, group) + comm.reduce_scatter(x, group) == pytest.approx(comm.all_reduce(x, group))
    # Where sharding starts (after the embedding) the backward gathers the input gradient once more
    first = tp_collectives(p.layers[1], p.layers[0], tp=8, sequence_parallel=True, recompute_forward=False)
    assert ("all_gather", 1, p.layers[1].input_bytes) in [(c.collective, c.count, c.nbytes) for c in first]


def test_search_picks_sequence_parallel_when_only_it_fits_and_plain_tp_on_a_tie():
    import planner
    from planner.search import SIMPLICITY_TOLERANCE

    prof, _ = _korthikanti_22b(2, True)
    space = {"tp_degrees": (8,), "pp_degrees": (1,), "micro_batch_sizes": (2,), "recompute": (Recompute.SELECTIVE,),
             "zero_stages": (0,)}
    plan = planner.plan(prof, load_cluster("dgx-a100-80gb"), global_batch_size=4, **space)
    assert plan.strategy.sequence_parallel and plan.prediction.fits
    cpu = load_cluster("cpu", gpus_per_node=2)
    small = planner.plan(sup.tiny_profile(), cpu, global_batch_size=4, tp_degrees=(2,), zero_stages=(0,))
    flipped = small.strategy.model_copy(update={"sequence_parallel": not small.strategy.sequence_parallel})
    alt = evaluate(sup.tiny_profile(), cpu, flipped)
    if small.strategy.sequence_parallel:  # chosen only when faster than plain TP by more than the tolerance
        assert small.prediction.step_seconds * (1 + SIMPLICITY_TOLERANCE) < alt.step_seconds
    else:
        assert small.prediction.step_seconds <= alt.step_seconds * (1 + SIMPLICITY_TOLERANCE)


def test_a_pipeline_cut_between_sequence_parallel_blocks_sends_each_rank_its_shard():
    profile = sup.tiny_profile()
    cpu = load_cluster("cpu", gpus_per_node=4)

    def p2p(sp: bool, cut: int) -> float:
        pred = evaluate(profile, cpu, sup.strategy(tp=2, pp=2, cuts=(cut,), sequence_parallel=sp))
        return next(c.bytes for c in pred.time.comms if c.collective == "p2p")

    # between two blocks: the shard (the sequence split over tp=2); after the embedding, which does not run
    # sequence-parallel: its whole output, which the next block cuts itself
    assert p2p(True, 3) == pytest.approx(p2p(False, 3) / 2, rel=1e-12)
    assert p2p(True, 1) == pytest.approx(p2p(False, 1), rel=1e-12)


def test_megatron_export_sets_sequence_parallel_and_reads_back_as_the_strategy():
    from planner.evaluate import name_stages
    from planner.export_launch import megatron_args
    from planner.import_configs import parse_config
    from planner.import_strategy import to_strategy

    prof, st = _korthikanti_22b(2, True)
    st = name_stages(st, prof)
    plan = sup.make_plan(st, prof, cluster="dgx-a100-80gb")
    args, warnings = megatron_args(plan)
    assert "--sequence-parallel" in args and not any("sequence" in w for w in warnings)
    back = to_strategy(parse_config("megatron-args", " ".join(args), world_size=8), prof,
                       global_batch_size=st.global_batch_size).strategy
    assert back.sequence_parallel and back.dims == st.dims
    plain, _ = megatron_args(sup.make_plan(name_stages(_korthikanti_22b(2, False)[1], prof), prof,
                                           cluster="dgx-a100-80gb"))
    assert "--sequence-parallel" not in plain
    assert not to_strategy(parse_config("megatron-args", " ".join(plain), world_size=8), prof,
                           global_batch_size=st.global_batch_size).strategy.sequence_parallel


# --- executor: refusals --------------------------------------------------------------------------------------------


def test_executor_refuses_sequence_parallel_it_cannot_run_before_launch():
    from executor.errors import ExecutorError
    from executor.sequence_parallel import check_sequence_parallel

    p = sup.tiny_profile()
    odd = sup.tiny_profile("gpt-tiny", (("seq_len", 31),))
    with pytest.raises(ExecutorError, match="not divisible by tp=2"):
        check_sequence_parallel(sup.strategy(tp=2, sequence_parallel=True), odd)
    check_sequence_parallel(sup.strategy(tp=2, sequence_parallel=True), p)  # runs
    check_sequence_parallel(sup.strategy(tp=2, pp=2, cuts=(3,), sequence_parallel=True), p)  # pipelined too
    with pytest.raises(ValueError, match="needs tensor parallelism"):
        sup.strategy(tp=1, dp=2, sequence_parallel=True)


# --- executor: multi-process ----------------------------------------------------------------------------------------

#: All on 4 ranks (one launch): tp=2 with dp=2 (with full recompute too), and pp=2 x tp=2, where stages hand each
#: other sequence shards (a cut between two sequence-parallel blocks) or the first block of a stage cuts its whole
#: input (the embedding alone on stage 0), over 4 interleaved stages too.
CASES = {
    "sp_dp2": {"tp": 2, "dp": 2, "sequence_parallel": True},
    "sp_dp2_full_recompute": {"tp": 2, "dp": 2, "sequence_parallel": True, "recompute": Recompute.FULL},
    "sp_pp_1f1b": {"tp": 2, "pp": 2, "cuts": (3,), "sequence_parallel": True},
    "sp_pp_interleaved": {"tp": 2, "pp": 2, "cuts": (1, 3, 5), "sequence_parallel": True,
                          "schedule": Schedule.INTERLEAVED_1F1B, "virtual_stages": 2},
}


def _worker(cases_path: str, out_path: str) -> None:
    """Run every case on this rank; rank 0 writes losses, local token counts and final whole parameters."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from executor import apply_plan, init_distributed, train
    from executor.worker import teardown
    from planner.model_profile import ModelProfile
    from profiler.zoo import get_model

    payload = json.loads(Path(cases_path).read_text())
    device = init_distributed("cpu")
    results, params = {}, {}
    profile = ModelProfile.model_validate(payload["profile"])
    for name, case in payload["cases"].items():
        zoo = get_model("gpt-tiny")
        st = Strategy.model_validate(case)
        pm = apply_plan(st, functools.partial(zoo.build, "meta"), profile, loss_fn=zoo.loss, device=device,
                        seed=sup.SEED)
        tokens = []
        for part in pm.parts:  # every block this rank holds records the tokens it runs on
            for block in [m for n, m in part.named_modules() if n.startswith("blocks.") and n.count(".") == 1]:
                block.register_forward_pre_hook(lambda _m, args, seen=tokens: seen.append(args[0].shape[1]))
        opts = [torch.optim.SGD(q.parameters(), lr=sup.LR) for q in pm.parts]
        losses = [r.loss for r in train(pm, opts, lambda step, batch, zoo=zoo: zoo.synthetic_batch(
            batch, seed=sup.DATA_SEED + step), steps=sup.STEPS)]
        whole = {n: (q.full_tensor() if isinstance(q, DTensor) else q).detach().clone()
                 for part in pm.parts for n, q in part.named_parameters()}
        results[name] = {"losses": losses, "tokens": sorted(set(tokens))}
        params[name] = whole
    # every rank's parameters (a pipeline rank holds its stages' only); rank 0 writes the union
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (results, params))
    if dist.get_rank() == 0:
        merged = {name: {} for name in params}
        tokens = {name: set() for name in results}
        for rank_results, rank_params in gathered:
            for name in merged:
                merged[name].update(rank_params[name])
                tokens[name].update(rank_results[name]["tokens"])
        for name in results:
            results[name]["tokens"] = sorted(tokens[name])
        torch.save(merged, out_path + ".pt")
        Path(out_path).write_text(json.dumps(results))
    teardown()


def _reference(global_batch: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    from executor.init import name_seed
    from profiler.zoo import get_model

    zoo = get_model("gpt-tiny")
    net = zoo.build("cpu")
    with torch.no_grad():
        for name, q in net.named_parameters():
            net.init_parameter(name, q, torch.Generator().manual_seed(name_seed(sup.SEED, name)))
    opt = torch.optim.SGD(net.parameters(), lr=sup.LR)
    losses = []
    for step in range(sup.STEPS):
        inputs, targets = zoo.synthetic_batch(global_batch, seed=sup.DATA_SEED + step)
        loss = zoo.loss(net(*inputs), targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: q.detach() for n, q in net.named_parameters()}


def _launch(tmp: Path, cases: dict, nproc: int) -> tuple[dict, dict]:
    payload = {"profile": sup.tiny_profile().model_dump(mode="json"),
               "cases": {n: sup.strategy(**kw).model_dump(mode="json") for n, kw in cases.items()}}
    sup.run_workers(__file__, nproc, payload, tmp / "cases.json", tmp / "out.json", timeout=240)
    return json.loads((tmp / "out.json").read_text()), torch.load(str(tmp / "out.json") + ".pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict]:
    return _launch(tmp_path_factory.mktemp("sp"), CASES, 4)


@pytest.mark.distributed
@pytest.mark.timeout(400)
@pytest.mark.parametrize("case", sorted(CASES))
def test_sequence_parallel_training_equals_single_process(runs, case):
    results, params = runs
    st = sup.strategy(**CASES[case])
    ref_losses, ref_params = _reference(st.global_batch_size)
    got = results[case]
    assert max(abs(a - b) for a, b in zip(got["losses"], ref_losses, strict=True)) <= TOL, (got["losses"], ref_losses)
    assert params[case].keys() == ref_params.keys()
    worst = max((params[case][n] - ref_params[n]).abs().max().item() for n in ref_params)
    assert worst <= TOL, worst
    assert got["tokens"] == [32 // 2]  # blocks really ran on sequence shards of gpt-tiny's 32 tokens


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
