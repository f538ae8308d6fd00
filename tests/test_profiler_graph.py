"""Layer decomposition, the layer graph and legal pipeline cuts."""

from __future__ import annotations

import logging

import networkx as nx
import pytest
import torch
from torch import nn

from planner.model_profile import INPUT_NODE, OUTPUT_NODE
from profiler import ProfileError, layer_graph, profile, profile_zoo


def test_gpt_layers_are_embed_each_block_and_head_with_a_cut_between_every_pair() -> None:
    p = profile_zoo("gpt-tiny", batch_size=2, cache=False)
    assert [layer.name for layer in p.layers] == ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    assert p.cut_points == [1, 2, 3, 4, 5]
    g = layer_graph(p)
    assert nx.is_directed_acyclic_graph(g)
    assert list(nx.topological_sort(g)) == [INPUT_NODE] + [layer.name for layer in p.layers] + [OUTPUT_NODE]
    # one (seq x hidden) fp32 activation per sample crosses every block boundary
    assert g.edges["blocks.0", "blocks.1"]["bytes"] == 32 * 64 * 4


def test_inside_a_gpt_block_only_cuts_where_the_residual_stream_alone_crosses() -> None:
    inside = ["blocks.0.ln_1", "blocks.0.attn", "blocks.0.ln_2", "blocks.0.mlp"]
    layers = ["embed", *inside, "blocks.1", "blocks.2", "blocks.3", "head"]
    p = profile_zoo("gpt-tiny", batch_size=2, cache=False, layers=layers)
    assert [layer.name for layer in p.layers] == layers
    # Before ln_1 (1), after the attention residual add (3) and after the MLP residual add (5) the residual stream
    # is the one value that crosses; before attn (2) and before mlp (4) the norm's output crosses beside it.
    assert p.cut_points == [1, 3, 5, 6, 7, 8]


class _Skip(nn.Module):
    """l0 -> l1 -> l2 -> merge(l2 out, l1 out) -> l4: the l1 output jumps over l2."""

    def __init__(self) -> None:
        super().__init__()
        self.l0, self.l1, self.l2, self.l4 = (nn.Linear(8, 8) for _ in range(4))
        self.merge = _Merge()

    def forward(self, x):
        a = self.l1(self.l0(x))
        return self.l4(self.merge(self.l2(a), a))


class _Merge(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, a, b):
        return self.lin(a + b)


def test_skip_connection_rules_out_only_the_cut_where_two_values_cross() -> None:
    p = profile(_Skip(), torch.randn(3, 8), cache=False)
    assert [layer.name for layer in p.layers] == ["l0", "l1", "l2", "merge", "l4"]
    # Before l2 only `a` crosses (l2 and merge both read it on the later stage); before merge both l2's output and
    # `a` cross, which one activation cannot carry.
    assert p.cut_points == [1, 2, 4]
    assert {(e.src, e.dst) for e in p.edges} >= {("l1", "merge"), ("l2", "merge")}


class _Glue(nn.Module):
    """Computation in the model's own forward between two layers: a stage made of layers would lose it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.a(x))))


def test_glue_between_layers_travels_with_a_stage() -> None:
    from profiler.partition import partition

    model, x = _Glue(), torch.randn(3, 8)
    assert profile(model, x, cache=False).cut_points == [1, 2]
    first, second = partition(model, ["a", "b", "c"], (x,)).stage_modules(model, [2], copy_model=False)
    # The relu between b and c runs on one of the stages: the composition is the model, not c(b(a(x))).
    assert torch.equal(second(first(x)), model(x))
    assert not torch.allclose(model.c(model.b(model.a(x))), model(x))


class _ShapeBranch(nn.Module):
    """fx cannot trace a Python branch on a traced shape (the meta device runs it fine)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x)
        if h.shape[0] > 100:
            h = h * 0
        return self.c(self.b(h))


def test_untraceable_model_falls_back_to_hooks_and_gets_no_pipeline_cuts(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        p = profile(_ShapeBranch(), torch.randn(3, 8), cache=False)
    assert any("torch.fx could not trace" in r.getMessage() and "hooks" in r.getMessage() for r in caplog.records)
    assert any("pp=1 only" in r.getMessage() for r in caplog.records)
    assert [layer.name for layer in p.layers] == ["a", "b", "c"]
    assert p.cut_points == []  # without a traced graph no cut can be shown to keep the forward
    assert p.fwd_flops == 2 * (8 * 8 + 8 * 8 + 8 * 4)


def test_sequential_children_are_the_layers() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    p = profile(model, torch.randn(5, 16), cache=False)
    assert [layer.name for layer in p.layers] == ["0", "1", "2"]
    assert [layer.param_count for layer in p.layers] == [16 * 32 + 32, 0, 32 * 4 + 4]
    assert p.layers[0].output_bytes == 32 * 4


def test_layers_override_rejects_unknown_and_overlapping_names() -> None:
    with pytest.raises(ProfileError, match="not a submodule"):
        profile_zoo("gpt-tiny", cache=False, layers=["embed", "nope"])
    with pytest.raises(ProfileError, match="overlap"):
        profile_zoo("gpt-tiny", cache=False, layers=["blocks.0", "blocks.0.attn"])


class _ValueBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) if h.sum() > 0 else h


def test_value_dependent_forward_is_explained_not_blamed_on_the_inputs() -> None:
    with pytest.raises(ProfileError, match="depends on tensor values"):
        profile(_ValueBranch(), torch.randn(3, 8), cache=False)


class _Nested(nn.Module):
    """Hugging Face layout: the block list sits inside a `transformer` module that is itself called."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = _Trunk()
        self.lm_head = nn.Linear(8, 16)

    def forward(self, ids):
        return self.lm_head(self.transformer(ids))


class _Trunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(16, 8)
        self.h = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(3))
        self.ln_f = nn.LayerNorm(8)

    def forward(self, ids):
        x = self.wte(ids)
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


def test_nested_block_list_is_opened_with_its_siblings_in_call_order() -> None:
    p = profile(_Nested(), torch.randint(0, 16, (2, 5)), cache=False)
    assert [layer.name for layer in p.layers] == [
        "transformer.wte", "transformer.h.0", "transformer.h.1", "transformer.h.2", "transformer.ln_f", "lm_head"]
    assert p.cut_points == [1, 2, 3, 4, 5]
    assert p.param_count == sum(t.numel() for t in _Nested().parameters())
