"""The one definition of a legal pipeline cut (`profiler.partition`): the stages it builds compose to the model.

Property test: random small models whose forward mixes layers with glue (element-wise functions, residual adds from
any earlier value, a root-owned scale, reshapes, concatenation); for every cut the partition calls legal, and for
random sets of legal cuts, running the stages one after another gives exactly the model's output and gradients.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from planner.strategy import ParallelDims, StageSpec, Strategy
from profiler.partition import PartitionError, partition, positional_inputs

DIM = 6


class RandomGlueNet(nn.Module):
    """`n` Linear layers; before each, glue reads any earlier value (a skip) and applies a random op."""

    def __init__(self, seed: int, n: int = 5) -> None:
        super().__init__()
        rng = random.Random(seed)
        self.n = n
        self.layers = nn.ModuleList(nn.Linear(DIM, DIM, bias=rng.random() < 0.5) for _ in range(n))
        self.scale = nn.Parameter(torch.rand(DIM) + 0.5)
        # For layer i: (op, index of an earlier value to mix in or None)
        self.plan = [(rng.choice(["relu", "tanh", "scale", "flatten", "cat", "none", "double"]),
                      rng.choice([None, None, rng.randrange(0, i + 1)])) for i in range(n)]
        self.scale_at = rng.randrange(0, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = [x]
        h = x
        for i, (op, skip) in enumerate(self.plan):
            if skip is not None:
                h = h + values[skip]
            if op == "relu":
                h = torch.relu(h)
            elif op == "tanh":
                h = torch.tanh(h)
            elif op == "flatten":
                h = h.reshape(h.shape[0], 2, DIM // 2).flatten(1)
            elif op == "cat":
                h = torch.cat([h[:, : DIM // 2], h[:, DIM // 2:] * 2], dim=1)
            elif op == "double":
                h = h * 2.0
            if i == self.scale_at:
                h = h * self.scale
            h = self.layers[i](h)
            values.append(h)
        return F.gelu(h).sum(1)


def _compose(stages, x):
    out = stages[0](x)
    for s in stages[1:]:
        out = s(out)
    return out


@pytest.mark.parametrize("seed", range(40))
def test_every_legal_cut_gives_stages_that_compose_to_the_forward(seed):
    torch.manual_seed(seed)
    model = RandomGlueNet(seed)
    x = torch.randn(3, DIM)
    names = [f"layers.{i}" for i in range(model.n)]
    part = partition(model, names, (x,))
    assert part.trace_error is None
    expected = model(x)
    expected.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    rng = random.Random(seed)
    cut_sets = [[k] for k in part.legal_cuts]
    if len(part.legal_cuts) >= 2:
        cut_sets += [sorted(rng.sample(part.legal_cuts, rng.randint(2, len(part.legal_cuts)))) for _ in range(3)]
    for cuts in cut_sets:
        model.zero_grad()
        stages = part.stage_modules(model, cuts, copy_model=False)
        out = _compose(stages, x)
        assert torch.equal(out, expected), (seed, cuts)
        out.sum().backward()
        for n, p in model.named_parameters():
            assert torch.allclose(p.grad, grads[n], atol=1e-6), (seed, cuts, n)
    for k in set(range(1, model.n)) - set(part.legal_cuts):
        assert part.why_illegal(k)  # every refusal says why


def test_the_property_test_sees_both_legal_and_illegal_cuts():
    # Guards the property test against models so simple that every cut (or none) is legal.
    legal = illegal = 0
    for seed in range(40):
        model = RandomGlueNet(seed)
        part = partition(model, [f"layers.{i}" for i in range(model.n)], (torch.randn(3, DIM),))
        legal += len(part.legal_cuts)
        illegal += model.n - 1 - len(part.legal_cuts)
    assert legal > 40 and illegal > 20


def test_a_cut_that_two_values_cross_is_refused_naming_them():
    class TwoPaths(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x)
            return self.c(self.b(h)) + h  # h is still needed after c

    part = partition(TwoPaths(), ["a", "b", "c"], (torch.randn(2, 4),))
    assert part.legal_cuts == [1]
    with pytest.raises(PartitionError, match=r"layer 2 \('c'\): 2 values cross it"):
        part.check([2])


def test_a_model_input_read_by_a_later_stage_rules_the_cut_out():
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x, mask):
            return self.b(self.a(x)) * mask

    part = partition(Masked(), ["a", "b"], (torch.randn(2, 4), torch.ones(2, 4)))
    assert part.legal_cuts == []
    assert "model input 'mask'" in part.why_illegal(1)


def test_dict_inputs_bind_to_the_forward_in_order_with_defaults_between():
    class Kw(nn.Module):
        def forward(self, input_ids, attention_mask=None, scale=1.0, labels=None):
            return input_ids

    ids, labels = torch.zeros(2, 3), torch.ones(2, 3)
    args = positional_inputs(Kw(), {"labels": labels, "input_ids": ids})
    assert args[0] is ids and args[1] is None and args[2] == 1.0 and args[3] is labels
    with pytest.raises(TypeError, match="no parameter 'mask'"):
        positional_inputs(Kw(), {"input_ids": ids, "mask": ids})


def test_untraceable_model_has_no_legal_cut_and_says_why():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x)
            if h.sum() > 0:  # data-dependent: fx cannot follow it
                h = -h
            return self.b(h)

    part = partition(Branchy(), ["a", "b"], (torch.randn(2, 4),))
    assert part.legal_cuts == [] and "torch.fx could not trace" in part.why_illegal(1)


def test_a_glue_parameter_used_on_both_sides_rules_the_cut_out():
    class Tied(nn.Module):
        """The output projection reuses the embedding's weight in forward (no lm_head module)."""

        def __init__(self) -> None:
            super().__init__()
            self.embed, self.mid = nn.Embedding(10, 4), nn.Linear(4, 4)

        def forward(self, ids):
            return F.linear(self.mid(self.embed(ids)), self.embed.weight)

    part = partition(Tied(), ["embed", "mid"], (torch.zeros(2, 3, dtype=torch.long),))
    assert part.legal_cuts == []
    assert "both sides" in part.why_illegal(1)


def test_pipeline_strategies_need_a_micro_batch_per_stage():
    dims = ParallelDims(dp=1, tp=1, pp=2, world_size=2)
    stages = [StageSpec(start=0, stop=1), StageSpec(start=1, stop=2)]
    with pytest.raises(ValueError, match="at least 2 micro-batches"):
        Strategy(dims=dims, stages=stages, micro_batch_size=4, num_micro_batches=1)
    assert Strategy(dims=dims, stages=stages, micro_batch_size=2, num_micro_batches=2).num_micro_batches == 2


@pytest.mark.parametrize("global_batch", [16, 32, 128])
def test_plan_never_returns_a_pipeline_with_fewer_micro_batches_than_stages(global_batch):
    # The reported case: a small model on 16 x DGX-H100 came back as pp=2 with one micro-batch.
    from planner import load_cluster, plan

    cluster = load_cluster("dgx-h100", nodes=2)
    result = plan("gpt-tiny", cluster, global_batch_size=global_batch, time_limit_s=5, top_k=20, pp_degrees=[2, 4, 8])
    for st in [result.strategy, *(alt.strategy for alt in result.alternatives)]:
        assert st.dims.pp > 1 and st.num_micro_batches >= st.dims.pp, st.describe()
