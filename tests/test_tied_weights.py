"""A tied weight (GPT-2's head sharing the token embedding) is counted once, and charged again to a pipeline stage
that holds its own copy."""

import pytest

from planner import ParallelDims, StageSpec, Strategy, evaluate, load_cluster
from planner.gpt_formula import gpt_profile


def test_profiler_records_the_tied_head_as_shared_with_the_embedding():
    import profiler

    tied = profiler.profile_zoo("gpt2-small", num_layers=2, device="meta", cache=False)
    head = tied.layers[-1]
    # The head's weight is the embedding's (vocab x hidden); it owns only ln_f.
    assert head.shared_param_count == 50257 * 768
    assert head.param_count == 2 * 768
    untied = profiler.profile_zoo("gpt-tiny", device="meta", cache=False)
    assert all(layer.shared_param_count == 0 for layer in untied.layers)


@pytest.mark.parametrize("pp", [1, 2])
def test_last_stage_holds_a_copy_of_the_tied_weight_only_when_the_model_is_cut(pp):
    kw = dict(num_layers=4, hidden=256, heads=4, seq_len=128, vocab_size=4096, dtype="float32")
    tied, untied = gpt_profile(**kw), gpt_profile(**kw)
    untied = untied.model_copy(update={"layers": [
        layer.model_copy(update={"shared_param_count": 0}) for layer in untied.layers]})
    n = tied.num_layers
    stages = [StageSpec(start=0, stop=n)] if pp == 1 else [StageSpec(start=0, stop=3), StageSpec(start=3, stop=n)]
    strategy = Strategy(dims=ParallelDims(dp=1, tp=1, pp=pp, world_size=pp), micro_batch_size=1,
                        num_micro_batches=2, stages=stages)
    cluster = load_cluster("dgx-a100-80gb", gpus_per_node=pp)
    a, b = evaluate(tied, cluster, strategy), evaluate(untied, cluster, strategy)
    # fp32 AdamW: 4 bytes of weight, 4 of gradient, 8 of moments per parameter (no separate master copy).
    copy = 4096 * 256
    expected_extra = [0.0] * pp if pp == 1 else [0.0, copy * 4.0]
    assert [x.parameters - y.parameters for x, y in zip(a.memory, b.memory)] == expected_extra
    assert [x.gradients - y.gradients for x, y in zip(a.memory, b.memory)] == expected_extra
    assert [x.optimizer_state - y.optimizer_state for x, y in zip(a.memory, b.memory)] == [2 * e for e in expected_extra]
