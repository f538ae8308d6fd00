"""Vocabulary-parallel embedding and output head (Megatron's `VocabParallelEmbedding` and parallel output layer).

Two parts of a language model are found here, not by `profiler.tensor_parallel` (which splits Linears pairwise):

- the token embedding: the nn.Embedding with the most rows among the layers (a learned position embedding is
  small and stays replicated). Its rows are split over the TP group (`ShardStyle.VOCAB_ROWWISE`): each rank looks up
  the ids it holds, zeros the rest, and one all-reduce of the output makes it whole again, so whatever the output
  feeds sees the same tensor as without TP.
- the output head: a Linear of the last layer whose output is the model's output (the logits). Its weight is split
  by vocabulary entry (`ShardStyle.VOCAB_COLWISE`) and the logits stay split; the loss reduces per token only
  (torch's `loss_parallel`). The executor falls back to gathering the logits where the loss cannot take them split.

A weight tied between the two (GPT-2) is split the same way in both, so it stays one tensor. A tie to anything
else leaves both replicated. An embedding with `max_norm` (renormalises rows in place) or sparse gradients is left
alone.

Uneven splits are fine: torch's DTensor gives the first ranks one row more (`torch.chunk`), and both the masked
lookup and `loss_parallel` handle that (checked with a vocabulary of 11 over 2 ranks, and GPT-2's 50257 is odd).
The spec says so with `uneven_max` = the row count: any TP degree that leaves no shard empty.

All-reduce accounting (the spec counts N all-reduces per forward and as many in backward, of one size): the
embedding all-reduces its output (b*s*h) in forward and nothing in backward; the head all-reduces three per-token
values in forward (max, sum of exponentials, target logit) and its input gradient (b*s*h) in backward. Each is given
as one all-reduce per pass of half its two passes' bytes, so the bytes per step are exact.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from planner.model_profile import ShardStyle, TensorParallelSpec, TPShard
from profiler.recording import LayerCall, tensors_of

logger = logging.getLogger(__name__)

#: The loss's per-token reductions in forward: max, sum of exponentials, and the target's logit.
_LOSS_REDUCTIONS = 3


def detect_vocab_parallel(
    model: nn.Module, names: list[str], records: dict[str, LayerCall], batch: int
) -> dict[str, TensorParallelSpec]:
    """Vocabulary-parallel specs by layer name: the token embedding's layer and the output head's layer.

    `model` is the meta model the layers `names` (in execution order) belong to; `records` their recorded calls
    (with "<output>" for the model's output); `batch` the profiled batch size.
    """
    owner = _param_owners(model, names)
    users = _param_users(model)
    head = _find_head(model, names[-1], records, batch)
    embed = _find_embedding(model, names)
    if head is not None:
        linear = model.get_submodule(_join(names[-1], head.path))
        tied = users[id(linear.weight)] - {_join(names[-1], head.path) + ".weight"}
        embed_weight = None if embed is None else _join(embed[0], embed[1]) + ".weight"
        if linear.bias is not None:  # a bias shared with another module (BERT's cls.predictions.bias) stays whole
            tied_bias = users[id(linear.bias)] - {_join(names[-1], head.path) + ".bias"}
            tied = tied | tied_bias
        if tied and tied != {embed_weight}:
            logger.info("output head %s: its parameters are shared with %s; left replicated", head.path,
                        sorted(tied))
            head = None
    if embed is not None:
        layer, path = embed
        weight = model.get_submodule(_join(layer, path)).weight
        others = users[id(weight)] - {_join(layer, path) + ".weight"}
        head_weight = None if head is None else _join(names[-1], head.path) + ".weight"
        if others and others != {head_weight}:
            logger.info("token embedding %s: its weight is shared with %s; left replicated", path, sorted(others))
            embed = None
    specs: dict[str, TensorParallelSpec] = {}
    if embed is not None:
        layer, path = embed
        module = model.get_submodule(_join(layer, path))
        specs[layer] = TensorParallelSpec(
            shards=[TPShard(module=path, style=ShardStyle.VOCAB_ROWWISE)],
            divisor=1, uneven_max=module.num_embeddings,
            sharded_param_count=_owned(module, layer, owner),
            # The partial output is all-reduced in forward; the ids need no gradient, so backward has none.
            allreduces_per_forward=1, allreduces_per_backward=0,
            allreduce_bytes=_embedding_output_bytes(model, layer, path, records[layer], batch),
        )
    if head is not None:
        module = model.get_submodule(_join(names[-1], head.path))
        specs[names[-1]] = TensorParallelSpec(
            shards=[TPShard(module=head.path, style=ShardStyle.VOCAB_COLWISE)],
            divisor=1, uneven_max=module.out_features,
            sharded_param_count=_owned(module, names[-1], owner),
            # Forward: loss_parallel's per-token reductions (max, sum of exponentials, target logit); backward: the
            # replicated input's gradient (ColwiseParallel), the head's input width.
            allreduces_per_forward=_LOSS_REDUCTIONS, allreduces_per_backward=1,
            allreduce_bytes=(head.input_bytes + _LOSS_REDUCTIONS * 4 * head.tokens) / (_LOSS_REDUCTIONS + 1),
        )
    return specs


def merge_specs(spec: TensorParallelSpec | None, vocab: TensorParallelSpec | None) -> TensorParallelSpec | None:
    """One layer's Megatron spec and its vocabulary-parallel spec as one (either may be None)."""
    if spec is None or vocab is None:
        return spec or vocab
    def backward(s: TensorParallelSpec) -> int:
        return s.allreduces_per_forward if s.allreduces_per_backward is None else s.allreduces_per_backward

    count = spec.allreduces_per_step(recompute_forward=False) + vocab.allreduces_per_step(recompute_forward=False)
    total = (spec.allreduces_per_step(recompute_forward=False) * spec.allreduce_bytes
             + vocab.allreduces_per_step(recompute_forward=False) * vocab.allreduce_bytes)
    return TensorParallelSpec(
        shards=[*spec.shards, *vocab.shards],
        # vocabulary specs split unevenly: a Megatron spec's divisor binds, two vocabulary specs only their rows
        divisor=spec.divisor if spec.uneven_max is None else vocab.divisor,
        uneven_max=None if spec.uneven_max is None else min(spec.uneven_max, vocab.uneven_max),
        sharded_param_count=spec.sharded_param_count + vocab.sharded_param_count,
        allreduces_per_forward=spec.allreduces_per_forward + vocab.allreduces_per_forward,
        allreduces_per_backward=backward(spec) + backward(vocab),
        allreduce_bytes=total / count if count else 0.0,
    )


class _Head:
    def __init__(self, path: str, input_bytes: float, tokens: float) -> None:
        self.path, self.input_bytes, self.tokens = path, input_bytes, tokens


def _join(layer: str, path: str) -> str:
    return ".".join(p for p in (layer, path) if p)


def _param_owners(model: nn.Module, names: list[str]) -> dict[int, str]:
    """Parameter id -> the first layer (in execution order) that holds it, as `LayerProfile.param_count` counts."""
    owner: dict[int, str] = {}
    for n in names:
        for p in model.get_submodule(n).parameters():
            owner.setdefault(id(p), n)
    return owner


def _param_users(model: nn.Module) -> dict[int, set[str]]:
    users: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        users.setdefault(id(p), set()).add(name)
    return users


def _owned(module: nn.Module, layer: str, owner: dict[int, str]) -> int:
    """Elements of `module`'s parameters that `layer` owns (a tied weight counts with its first user)."""
    return sum(p.numel() for p in module.parameters() if owner.get(id(p)) == layer)


def _find_embedding(model: nn.Module, names: list[str]) -> tuple[str, str] | None:
    """(layer, path in the layer) of the nn.Embedding with the most rows, or None."""
    best: tuple[int, str, str] | None = None
    for layer in names:
        for path, m in model.get_submodule(layer).named_modules():
            if not isinstance(m, nn.Embedding):
                continue
            if m.max_norm is not None or m.sparse:
                logger.info("embedding %s: max_norm / sparse gradients; not vocabulary-parallel", _join(layer, path))
                continue
            if best is None or m.num_embeddings > best[0]:
                best = (m.num_embeddings, layer, path)
    return None if best is None else (best[1], best[2])


def _run_with_hooks(module: nn.Module, call: LayerCall, targets: list[tuple[str, nn.Module]]) -> tuple[Any, dict]:
    """Run the layer once on its recorded (meta) inputs; (output, {path: (input, output)} of each target)."""
    seen: dict[str, tuple[Any, Any]] = {}
    handles = [
        m.register_forward_hook(lambda _m, args, out, path=path: seen.__setitem__(path, (args, out)))
        for path, m in targets
    ]
    try:
        with torch.no_grad():
            out = module(*call.args, **call.kwargs)
    finally:
        for h in handles:
            h.remove()
    return out, seen


def _find_head(model: nn.Module, last: str, records: dict[str, LayerCall], batch: int) -> _Head | None:
    """The Linear of the last layer whose output is the layer's output, when that is also the model's output."""
    layer_out = tensors_of(records[last].output)
    model_out = tensors_of(records["<output>"].output) if "<output>" in records else []
    if len(layer_out) != 1 or [id(t) for t in model_out] != [id(layer_out[0])]:
        return None  # the model changes the last layer's output, or returns more than the logits
    module = model.get_submodule(last)
    linears = [(path, m) for path, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    try:
        out, seen = _run_with_hooks(module, records[last], linears)
    except Exception as exc:  # noqa: BLE001 - a layer that does not rerun on meta simply gets no vocab parallelism
        logger.info("no vocabulary-parallel head for %s: rerunning it on meta failed (%s)", last, exc)
        return None
    for path, _m in linears:
        if path in seen and seen[path][1] is out:
            x, logits = seen[path][0][0], seen[path][1]
            vocab = logits.shape[-1]
            return _Head(path, float(x.numel() * x.element_size()) / batch, logits.numel() / vocab / batch)
    return None


def _embedding_output_bytes(model: nn.Module, layer: str, path: str, call: LayerCall, batch: int) -> float:
    module = model.get_submodule(layer)
    target = module.get_submodule(path)
    try:
        _out, seen = _run_with_hooks(module, call, [(path, target)])
    except Exception:  # noqa: BLE001 - fall back to the layer's own output size
        seen = {}
    if path in seen:
        out = seen[path][1]
        return float(out.numel() * out.element_size()) / batch
    return sum(float(t.numel() * t.element_size()) for t in tensors_of(call.output)) / batch
