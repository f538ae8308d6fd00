"""The zoo's models have the published sizes and each top-level unit maps one tensor to one tensor."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from profiler.zoo import ZooError, get_model, list_models

REFERENCE = Path(__file__).resolve().parent / "data"  # copied from the published sources, see data/README.md


def _reference_counts() -> dict[str, dict[str, str]]:
    with open(REFERENCE / "exact_counts.csv", newline="") as f:
        return {row["model"]: row for row in csv.DictReader(f)}


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() lists a tied weight once


@pytest.mark.parametrize(
    ("zoo_name", "reference_name"),
    [
        ("gpt2-small", "gpt2-small"), ("gpt2-medium", "gpt2-medium"), ("gpt2-large", "gpt2-large"),
        ("gpt2-xl", "gpt2-xl"), ("bert-base", "bert-base-uncased"), ("bert-large", "bert-large-uncased"),
    ],
)
def test_transformer_param_counts_equal_reference_csv(zoo_name: str, reference_name: str) -> None:
    row = _reference_counts()[reference_name]
    model = get_model(zoo_name).build(device="meta")
    assert _params(model) == int(row["total_params"])
    # The CSV's non-embedding count is exactly the transformer blocks (no embeddings, norms outside, pooler).
    assert sum(_params(block) for block in model.blocks) == int(row["non_embedding_params"])


@pytest.mark.parametrize("depth", [34, 50, 101, 152])
def test_resnet_param_counts_equal_torchvision(depth: int) -> None:
    row = _reference_counts()[f"resnet{depth}"]
    assert _params(get_model(f"resnet{depth}").build(device="meta")) == int(row["total_params"])


def test_resnet50_has_exactly_25_557_032_params() -> None:
    assert _params(get_model("resnet50").build(device="meta")) == 25_557_032


@pytest.mark.parametrize(
    ("name", "layers", "hidden", "kv_heads", "head_dim", "ffn"),
    [("llama-7b", 32, 4096, 32, 128, 11008), ("llama-13b", 40, 5120, 40, 128, 13824),
     ("llama-70b", 80, 8192, 8, 128, 28672)],
)
def test_llama_param_counts_follow_the_architecture_formula(name, layers, hidden, kv_heads, head_dim, ffn) -> None:
    vocab = 32000
    per_block = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * ffn + 2 * hidden
    expected = 2 * vocab * hidden + layers * per_block + hidden
    assert _params(get_model(name).build(device="meta")) == expected


def test_llama_7b_matches_the_published_parameter_count() -> None:
    # Llama 2 7B as released: 6,738,415,616 parameters.
    assert _params(get_model("llama-7b").build(device="meta")) == 6_738_415_616


TINY = {
    "gpt-tiny": {}, "bert-tiny": {}, "llama-tiny": {}, "mlp-tiny": {},
    "resnet18": {"image_size": 32, "width": 8, "num_classes": 10},
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_top_level_unit_takes_one_tensor_and_returns_one(name: str) -> None:
    zoo_model = get_model(name, **TINY[name])
    model = zoo_model.build(device="meta")
    seen: list[tuple[int, bool]] = []
    units = [m for n, m in model.named_children() if n != "blocks"] + list(model.blocks)
    hooks = [
        u.register_forward_hook(lambda _m, args, out: seen.append((len(args), isinstance(out, torch.Tensor))))
        for u in units
    ]
    model(*zoo_model.example_inputs(2, device="meta"))
    for h in hooks:
        h.remove()
    assert len(seen) == len(units)
    assert all(n_args == 1 and is_tensor for n_args, is_tensor in seen)


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_models_train_one_step_on_cpu(name: str) -> None:
    zoo_model = get_model(name, **TINY[name])
    model = zoo_model.build(device="cpu")
    inputs, targets = zoo_model.synthetic_batch(2, seed=0)
    loss = zoo_model.loss(model(*inputs), targets)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


def test_llama_rejects_heads_not_divisible_by_kv_heads() -> None:
    with pytest.raises(ZooError, match="kv_heads"):
        get_model("llama-tiny", heads=4, kv_heads=3)


def test_unknown_zoo_name_lists_the_known_models() -> None:
    with pytest.raises(ZooError) as info:
        get_model("gpt5")
    assert all(name in str(info.value) for name in list_models())
