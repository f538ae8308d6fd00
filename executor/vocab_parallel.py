"""Running the vocabulary-parallel embedding and head that `profiler.vocab_parallel` marks.

The embedding (`ShardStyle.VOCAB_ROWWISE`) needs nothing from the rest of the run: its output is whole again after
its all-reduce. The head (`ShardStyle.VOCAB_COLWISE`) leaves the logits split over the vocabulary, as a DTensor, and
the loss must then run under torch's `loss_parallel` (forward and backward). That is only the same training as one
process when the loss is a cross-entropy on those logits, so before the model is built `logits_layout` decides:

- split logits + `loss_parallel`: no pipelining, and a loss known to be a cross-entropy of the logits:
  `F.cross_entropy`, an `nn.CrossEntropyLoss` without label smoothing, the zoo's language-model and classification
  losses, or any function marked `loss_fn.autopar_loss_parallel = True` (its author vouches that it only reshapes,
  casts and calls `F.cross_entropy` on the logits);
- otherwise the head still holds its weight split but gathers the logits whole on every TP rank, so any loss sees
  exactly what it sees in one process: a model that computes its own loss, any other loss_fn, a float16 run (the
  loss scaler wraps the loss), and pipelining (stages pass plain tensors). The planner assumed split logits, so a
  warning names the extra activation memory.

A weight tied between embedding and head is split the same way in both (rows = vocabulary entries), but
`parallelize_module` makes a new parameter per module; `retie_split` points the aliases back at one tensor before
data parallelism wraps the model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from executor.errors import ExecutorError
from planner.model_profile import ModelProfile, ShardStyle, TensorParallelSpec, TPShard

log = logging.getLogger(__name__)

VOCAB_STYLES = (ShardStyle.VOCAB_ROWWISE, ShardStyle.VOCAB_COLWISE)


def split_spec(spec: TensorParallelSpec) -> tuple[TensorParallelSpec | None, list[TPShard]]:
    """A layer's spec without its vocabulary-parallel shards (None when nothing is left), and those shards."""
    vocab = [s for s in spec.shards if s.style in VOCAB_STYLES]
    rest = [s for s in spec.shards if s.style not in VOCAB_STYLES]
    if not vocab:
        return spec, []
    return (spec.model_copy(update={"shards": rest}) if rest else None), vocab


def _known_cross_entropy(loss_fn: Callable) -> bool:
    from profiler.zoo.gpt import gpt_loss
    from profiler.zoo.mlp import classification_loss
    from profiler.zoo.registry import ZooModel

    if isinstance(getattr(loss_fn, "__self__", None), ZooModel) and loss_fn.__func__ is ZooModel.loss:
        loss_fn = loss_fn.__self__.loss_fn  # `zoo_model.loss` calls the family's loss
    if getattr(loss_fn, "autopar_loss_parallel", False) is True:
        return True
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return loss_fn.label_smoothing == 0.0
    return loss_fn in (F.cross_entropy, gpt_loss, classification_loss)


def logits_layout(
    profile: ModelProfile, loss_fn: Callable | None, *, pp: int, tp: int, micro_batch: int,
    compute_dtype: torch.dtype | None,
) -> bool:
    """True: the vocabulary-parallel head leaves its logits split and the loss runs under `loss_parallel`.

    False (also when no head is vocabulary-parallel, or tp == 1): the head gathers its logits; a warning names why
    and the activation memory that costs beyond the plan.
    """
    head = next((x for x in profile.layers if x.tp is not None and x.tp.splits_output), None)
    if head is None or tp == 1:
        return False
    if pp > 1:
        why = "the model is pipelined (stages pass plain tensors to the loss)"
    elif loss_fn is None:
        why = "the model computes its own loss from the logits"
    elif compute_dtype == torch.float16:
        why = "float16 loss scaling wraps the loss"
    elif not _known_cross_entropy(loss_fn):
        why = (f"loss_fn {getattr(loss_fn, '__qualname__', type(loss_fn).__name__)} is not known to be a "
               "cross-entropy of the logits (set loss_fn.autopar_loss_parallel = True if it only reshapes, casts and "
               "calls F.cross_entropy on them)")
    else:
        return True
    extra = micro_batch * head.output_bytes * (1 - 1 / tp)
    log.warning(
        "vocabulary-parallel head '%s' gathers its logits whole on every TP rank because %s: about %.1f MiB more "
        "activation memory per rank and micro-batch than the plan assumed, plus an all-gather of the logits",
        head.name, why, extra / 2**20,
    )
    return False


def embedding_layers(profile: ModelProfile) -> set[str]:
    """Layers holding a vocabulary-parallel embedding: activation checkpointing leaves them out.

    Recomputing the masked lookup fails in torch (the `MaskPartial` placement's mask is released after the first
    all-reduce, and the recomputed forward reuses it), and it would save next to nothing (the layer keeps little
    more than its token ids).
    """
    return {x.name for x in profile.layers
            if x.tp is not None and any(s.style == ShardStyle.VOCAB_ROWWISE for s in x.tp.shards)}


def check_vocab_module(layer: nn.Module, layer_name: str, shard: TPShard, degree: int) -> nn.Module:
    """The module a vocabulary-parallel shard names, checked: an nn.Embedding (rows) or nn.Linear (outputs) with at
    least `degree` vocabulary entries."""
    try:
        sub = layer.get_submodule(shard.module)
    except AttributeError:
        raise ExecutorError(
            f"layer '{layer_name}': the plan shards '{shard.module}' but the layer has no such submodule; the plan "
            "was made for a different model - re-profile and re-plan it"
        ) from None
    want = nn.Embedding if shard.style == ShardStyle.VOCAB_ROWWISE else nn.Linear
    if not isinstance(sub, want):
        raise ExecutorError(
            f"layer '{layer_name}': '{shard.module or layer_name}' is a {type(sub).__name__}, but {shard.style.value} "
            f"shards an nn.{want.__name__}; re-profile the model"
        )
    rows = sub.num_embeddings if isinstance(sub, nn.Embedding) else sub.out_features
    if rows < degree:
        raise ExecutorError(
            f"layer '{layer_name}': {rows} vocabulary entries cannot be split over tp={degree}; plan with a smaller tp"
        )
    return sub


def retie_split(module: nn.Module, groups: list[list[str]]) -> None:
    """Point the aliases of each tied parameter back at one tensor after tensor parallelism (which makes a new
    parameter per module); the aliases must have been split the same way."""
    own = dict(module.named_parameters(remove_duplicate=False))
    for group in groups:
        present = [n for n in group if n in own]
        if len(present) < 2 or len({id(own[n]) for n in present}) == 1:
            continue
        layouts = {n: _layout(own[n]) for n in present}
        if len(set(layouts.values())) > 1:
            described = ", ".join(f"{n} {v}" for n, v in layouts.items())
            raise ExecutorError(
                f"a tied parameter is split differently by tensor parallelism ({described}); re-profile the model "
                "(the profiler splits a tied embedding and head alike) or untie the weight"
            )
        for alias in present[1:]:
            owner, _, attr = alias.rpartition(".")
            setattr(module.get_submodule(owner) if owner else module, attr, own[present[0]])


def _layout(t: torch.Tensor) -> str:
    return str(t.placements) if isinstance(t, DTensor) else "unsplit"


def loss_context(enabled: bool) -> contextlib.AbstractContextManager:
    """`loss_parallel()` when the logits stay split, else nothing."""
    return loss_parallel() if enabled else contextlib.nullcontext()


def local_loss(loss: Any) -> torch.Tensor:
    """The loss as a plain tensor (under `loss_parallel` it is a DTensor replicated over the TP group)."""
    return loss.to_local() if isinstance(loss, DTensor) else loss
