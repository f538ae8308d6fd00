"""Tensor parallelism for Hugging Face transformers layers, whose forward torch.fx cannot trace.

The profiler takes these layers' shards from the model's own `base_model_tp_plan` (`profiler.hf`): plain colwise /
rowwise Linears, never a fused projection. transformers' attention infers local sizes itself
(`view(*input_shape, -1, head_dim)`, `reshape(*input_shape, -1)`, KV groups as a ratio of heads), so the layer's
forward runs on shards unchanged and `ColwiseParallel` / `RowwiseParallel` alone train the same function; the
shape rewrite of `executor.tp_rewrite` (which needs an fx trace) is not needed.

Blocks without a config plan (BERT, T5, GPT-2) were given autopar's own per-class plan (`profiler.hf_tp_derived`,
proved on a reduced copy): the same Linear shards, plus what that table lists for the sharded copy: the attributes
the forward reads a head count or width from hold their per-rank values (T5's `n_heads`, GPT-2's `split_size`), and
per-head tables (T5's `relative_attention_bias`) are split by columns, so the position bias a block returns holds
the rank's heads. GPT-2's Conv1D projections and Mixtral's experts stacks are sharded by `executor.tp_styles`; a
fused projection (GPT-2's `c_attn`, the experts' gate / up stack) is held in the piece order of its split
(`executor.tp_rewrite.mark_fused`).
"""

from __future__ import annotations

import logging

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

from executor.errors import ExecutorError
from executor.parallelize import apply_tp
from planner.model_profile import ShardStyle, TensorParallelSpec
from profiler.hf import is_hf_model, is_hf_module
from profiler.hf_tp_derived import head_tables, localize_attributes

log = logging.getLogger(__name__)

__all__ = ["apply_hf_tp", "is_hf_model", "runs_on_shards_unchanged"]


def runs_on_shards_unchanged(layer: nn.Module, spec: TensorParallelSpec) -> bool:
    """Whether `layer` is a transformers module whose shards autopar's per-class tables or the config's plan name
    (see the module docstring): plain colwise / rowwise Linears or Conv1Ds (a fused one split per piece, the
    forward's own widths per rank) and experts stacks."""
    return is_hf_module(layer) and all(
        s.style in (ShardStyle.COLWISE, ShardStyle.ROWWISE, ShardStyle.EXPERTS, ShardStyle.REPLICATED)
        for s in spec.shards
    )


def apply_hf_tp(layer: nn.Module, layer_name: str, spec: TensorParallelSpec, tp_mesh: DeviceMesh) -> None:
    """Shard a transformers layer's Linears as the profile lists them (`parallelize.apply_tp`'s checks), with the
    layer's own forward unchanged."""
    apply_tp(layer, layer_name, spec, tp_mesh, localize=False)
    tables = head_tables(layer)
    if tables:  # split by heads (columns), the lookup's output local: the rank's heads of the position bias
        parallelize_module(layer, tp_mesh, {t: ColwiseParallel() for t in tables})
    try:
        changed = localize_attributes(layer, tp_mesh.size())
    except ValueError as exc:
        raise ExecutorError(f"layer '{layer_name}': {exc}; plan a tp degree that divides the attention heads") from None
    log.info("layer '%s': %d Linears%s sharded over tp=%d%s", layer_name, len(spec.shards),
             f" and {', '.join(tables)}" if tables else "", tp_mesh.size(),
             f" ({', '.join(changed)} per rank)" if changed else "")
