"""Sequence parallelism around the TP layers that the profile marks (`TensorParallelSpec.sequence_parallel`).

Inside a layer, `executor.parallelize.apply_tp` applies torchtitan's plan: `SequenceParallel()` on the norms, a
`PrepareModuleInput(Shard(1) -> Replicate())` on each TP region (its input all-gathered), and
`RowwiseParallel(output_layouts=Shard(1))` on the rowwise Linears (their outputs reduce-scattered). Between
sequence-parallel layers the activations stay local sequence shards (batch, seq / tp, ...). Where sharding starts
(after the embedding) the layer's input is cut to the local tokens, and where it ends (before the head) it is
gathered whole again, each as a DTensor redistribution so that backward does the mirror image (`apply_boundaries`).

`check_sequence_parallel` refuses, before any rank starts, what cannot run so exactly; each message names the fix
(plan without sequence parallelism).
"""

from __future__ import annotations

from planner.model_profile import INPUT_NODE, OUTPUT_NODE, ModelProfile
from planner.strategy import Strategy

_FIX = "plan without sequence parallelism (sequence_parallel false, `autopar plan` with sequence_parallel=[False])"


def sequence_parallel_layers(profile: ModelProfile, strategy: Strategy) -> set[str]:
    """Names of the layers that run sequence-parallel under `strategy` (none without it or with tp = 1)."""
    if not strategy.sequence_parallel or strategy.dims.tp == 1:
        return set()
    return {x.name for x in profile.layers if x.tp is not None and x.tp.sequence_parallel is not None}


def check_sequence_parallel(strategy: Strategy, profile: ModelProfile, *, hf_model: bool = False) -> None:
    """Raise `ExecutorError` (one line naming the fix) when `strategy`'s sequence parallelism cannot run exactly."""
    from executor.errors import ExecutorError

    layers = sequence_parallel_layers(profile, strategy)
    if not strategy.sequence_parallel:
        return
    tp, seq = strategy.dims.tp, profile.input.seq_len
    problem = None
    if not layers:
        problem = "no layer of this model's profile can run sequence-parallel"
    elif hf_model:
        problem = "transformers models run tensor parallelism through their own layers (executor.hf_tp), not so"
    elif seq is None or seq % tp:
        problem = f"the sequence length {seq} is not divisible by tp={tp}"
    else:
        for edge in profile.edges:  # sequence shards must pass from one layer straight to the next
            if (edge.src in layers or edge.dst in layers) and not _chained(profile, edge.src, edge.dst):
                problem = f"layer '{edge.dst}' takes '{edge.src}''s output, not its predecessor's"
                break
    if problem:
        raise ExecutorError(f"sequence parallelism cannot run this plan: {problem}; {_FIX}")


def _chained(profile: ModelProfile, src: str, dst: str) -> bool:
    names = [x.name for x in profile.layers]
    order = {n: i for i, n in enumerate(names)}
    if src == INPUT_NODE:
        return dst == names[0]
    if dst == OUTPUT_NODE:
        return src == names[-1]
    return order.get(dst, -1) == order.get(src, -2) + 1


def apply_boundaries(part, profile: ModelProfile, layer_names: list[str], sp_layers: set[str], tp_mesh) -> None:
    """Forward pre-hooks where sequence sharding starts or ends, and a post-hook when the model ends sharded.

    A layer that runs sequence-parallel after one that does not gets the local tokens of its (replicated) input; a
    layer that does not, after one that does, gets its input gathered whole. DTensor redistributions, so backward
    gathers (resp. cuts) the gradient.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def convert(src, dst):
        def hook(_module, args):
            x, *rest = args
            d = DTensor.from_local(x, tp_mesh, [src], run_check=False).redistribute(tp_mesh, [dst])
            return (d.to_local(), *rest)
        return hook

    names = [x.name for x in profile.layers]
    held = set(layer_names)
    for i, name in enumerate(names):
        if name not in held:
            continue
        before = i > 0 and names[i - 1] in sp_layers
        if (name in sp_layers) != before:
            layer = part.get_submodule(name)
            hook = convert(Replicate(), Shard(1)) if name in sp_layers else convert(Shard(1), Replicate())
            layer.register_forward_pre_hook(hook)
    if names[-1] in sp_layers and names[-1] in held:  # the model's output is gathered whole
        gather = convert(Shard(1), Replicate())
        part.get_submodule(names[-1]).register_forward_hook(lambda m, a, out: gather(m, (out,))[0])
