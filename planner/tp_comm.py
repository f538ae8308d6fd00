"""The tensor-parallel collectives of one layer per micro-batch, with and without sequence parallelism.

One home for them: `planner.candidate.layer_table` prices them (and through its tables the bounds of
`planner.enumerate` and the CP-SAT model of `planner.stages`), `planner.evaluate` lists them in a prediction.

Plain TP (DTensor `ColwiseParallel` / `RowwiseParallel`, `executor.parallelize.apply_tp`): an all-reduce of each
rowwise output in forward and of each colwise input gradient in backward (`TensorParallelSpec.allreduces_per_step`).

Sequence parallel (`executor.parallelize.apply_tp` with the layer's `SequenceParallelSpec`): each region gathers its
input (all-gather) and reduce-scatters its rowwise output in forward; backward runs the mirror images (the
gather's backward is a reduce-scatter of the input gradient, the reduce-scatter's an all-gather). On a ring an
all-reduce of S bytes over n ranks is a reduce-scatter plus an all-gather, 2 (n-1)/n S / B each pass pair
(Korthikanti et al. 2022, section 4.2.2; `planner.cost.CommModel.all_reduce`), so one region costs
2 * (all-gather + reduce-scatter) = 2 all-reduces' time per micro-batch, where plain TP pays one per rowwise and
one per colwise Linear. Where a sequence-parallel layer follows one that is not (the embedding), its input is cut
to the local tokens (free) and its gradient all-gathered in backward; where a layer that is not follows one that
is (the head), its input is all-gathered in forward (its gradient is cut locally in backward).
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.model_profile import LayerProfile


def runs_sequence_parallel(layer: LayerProfile | None, tp: int, sequence_parallel: bool) -> bool:
    """Whether `layer` runs sequence-parallel under a strategy with this tp degree and `sequence_parallel` flag."""
    return (sequence_parallel and tp > 1 and layer is not None and layer.tp is not None
            and layer.tp.sequence_parallel is not None)


@dataclass(frozen=True)
class TPCollective:
    """`count` collectives of `nbytes` bytes per sample each (whole-tensor bytes), per micro-batch."""

    collective: str  #: all_reduce, all_gather or reduce_scatter
    count: int
    nbytes: float


def tp_collectives(layer: LayerProfile, previous: LayerProfile | None, *, tp: int, sequence_parallel: bool,
                   recompute_forward: bool) -> list[TPCollective]:
    """The TP collectives `layer` issues per micro-batch (forward, backward, and the forward again under full
    recompute), `previous` being the layer that runs before it (None for the first)."""
    if tp == 1:
        return []
    sp = runs_sequence_parallel(layer, tp, sequence_parallel)
    before = runs_sequence_parallel(previous, tp, sequence_parallel)
    out = []
    if sp:
        regions = len(layer.tp.sequence_parallel.regions)
        passes = 3 if recompute_forward else 2
        out += [TPCollective("all_gather", regions * passes, layer.tp.allreduce_bytes),
                TPCollective("reduce_scatter", regions * passes, layer.tp.allreduce_bytes)]
    elif layer.tp is not None:
        n = layer.tp.allreduces_per_step(recompute_forward=recompute_forward)
        if n:
            out.append(TPCollective("all_reduce", n, layer.tp.allreduce_bytes))
    if sp != before and previous is not None:
        out.append(TPCollective("all_gather", 1, layer.input_bytes))  # the boundary of sequence sharding
    return out
