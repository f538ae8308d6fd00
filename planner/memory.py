"""Memory costs: training state per parameter by ZeRO stage, activations per micro-batch, micro-batches in flight.

All sizes are whole bytes so that the search (integer CP-SAT constraints) and `evaluate` agree exactly on what fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from planner.cost import device_param_count, tp_whole_bytes
from planner.dp_comm import DDP_BUCKET_BYTES, GRAD_REDUCE_BYTES
from planner.model_profile import DType, LayerProfile
from planner.strategy import Recompute, Schedule, ZeroStage

#: Gradient buckets that DDP / ZeRO keep in flight (two of DDP's default bucket overlap).
DP_BUCKET_BYTES = 2 * DDP_BUCKET_BYTES


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter element held by one device for parameters, gradients and optimizer state."""

    parameters: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        """Sum of the three."""
        return self.parameters + self.gradients + self.optimizer


@lru_cache(maxsize=4096)
def estimate_state_bytes(
    dtype: DType, zero: ZeroStage, dp: int, *, pipelined: bool = False, micro_batches: int = 1
) -> StateBytes:
    """AdamW training state per parameter element held by one device, as autopar's executor keeps it.

    Master parameters, gradients and AdamW's two moments are fp32 whatever the compute dtype (4 + 4 + 8 bytes);
    16-bit compute adds a 16-bit copy of the parameters that lives through forward and backward (autocast's casts,
    which autograd saves for backward, or FSDP2's unsharded `param_dtype` parameters), counted under `parameters`.
    By ZeRO stage (FSDP2, `executor.parallelize`):
    - 0: nothing sharded (DDP with gradients as bucket views, or `replicate`).
    - 1, 2 (`reshard_after_forward=False`): fp32 parameters, gradients and moments sharded over dp; the unsharded
      compute-dtype parameters stay whole from forward to the end of backward (fp32 training: a whole fp32 copy).
    - 3: everything sharded; one layer's unsharded parameters at a time (`estimate_comm_buffer_bytes`), except in a
      pipeline, whose schedule keeps parameters unsharded after backward (`set_reshard_after_backward(False)`).
    Gradients stay whole between micro-batches where their sync waits for the last one: ZeRO-1 (synchronised once
    per step) and every stage inside a pipeline (torch's schedule defers the sync).
    """
    low = dtype.itemsize < 4
    copy = float(dtype.itemsize)  # the unsharded compute-dtype parameters, where they are kept whole
    if zero == ZeroStage.NONE or dp == 1:
        return StateBytes(parameters=4.0 + (copy if low else 0.0), gradients=GRAD_REDUCE_BYTES, optimizer=8.0)
    whole_grads = micro_batches > 1 and (zero == ZeroStage.OPTIMIZER or pipelined)
    if zero == ZeroStage.FULL:
        params = 4.0 / dp + (copy if pipelined else 0.0)
    else:
        params = 4.0 / dp + copy
    grads = GRAD_REDUCE_BYTES if whole_grads else GRAD_REDUCE_BYTES / dp
    return StateBytes(parameters=params, gradients=grads, optimizer=8.0 / dp)


def optimizer_bytes_touched(dtype: DType) -> float:
    """Bytes AdamW reads and writes per parameter element in one step (for its memory-bound time)."""
    e = dtype.itemsize
    master = 4.0 if e < 4 else 0.0
    # read param, grad, two moments (+ master); write param, two moments (+ master)
    return 2 * e + e + 2 * (8.0 + master)


def estimate_layer_activation_bytes(layer: LayerProfile, *, tp: int, micro_batch: int, recompute: Recompute) -> int:
    """Activation bytes one device keeps for `layer` per micro-batch between its forward and backward.

    Under TP the block's inputs and outputs (LayerNorm inputs, residual, dropout masks) stay whole on each rank and
    the rest is split, as in Korthikanti et al.'s accounting (`tp_whole_bytes`; a vocabulary-parallel head's logits
    are split). Full recompute keeps only the layer input.
    """
    if recompute == Recompute.FULL:
        return math.ceil(micro_batch * layer.input_bytes)
    saved = layer.saved_activation_bytes
    if recompute == Recompute.SELECTIVE:
        saved = max(0.0, saved - layer.selective_saved_bytes)
    if layer.tp is None or tp == 1:
        return math.ceil(micro_batch * saved)
    whole = min(saved, tp_whole_bytes(layer))
    return math.ceil(micro_batch * (whole + (saved - whole) / tp))


def estimate_working_set_bytes(layers: list[LayerProfile], *, tp: int, micro_batch: int, recompute: Recompute) -> int:
    """Transient activations of the layer being recomputed (full recompute): the largest layer's full set.

    Taken over all layers (not only a stage's) so that a stage's memory stays a linear function of its layers.
    """
    if recompute != Recompute.FULL:
        return 0
    return max(estimate_layer_activation_bytes(x, tp=tp, micro_batch=micro_batch, recompute=Recompute.NONE)
               for x in layers)


def in_flight(schedule: Schedule, *, pp: int, rank: int, num_micro_batches: int, virtual_stages: int) -> int:
    """Activation sets a pipeline rank holds at its peak, in units of 1/virtual_stages of the rank's layers.

    GPipe keeps all m micro-batches; 1F1B keeps p - rank (at most m); interleaved 1F1B (Megatron) runs
    2 (p - rank - 1) + (v - 1) p warm-up forwards of one model chunk each, plus the one in progress.
    """
    m, v = num_micro_batches, virtual_stages
    if schedule == Schedule.GPIPE:
        return m * v
    if schedule == Schedule.ONE_F_ONE_B:
        return min(m, pp - rank) * v
    return min(m * v, 2 * (pp - rank - 1) + (v - 1) * pp + 1)


def estimate_comm_buffer_bytes(
    layers: list[LayerProfile], cut_bytes: list[float], *, dtype: DType, dp: int, tp: int, pp: int,
    zero: ZeroStage, micro_batch: int,
) -> int:
    """Communication buffers per device: pipeline send/receive, one TP all-reduce, DP buckets or ZeRO-3 gathers."""
    total = 0.0
    if pp > 1:
        total += 2 * micro_batch * max(cut_bytes)
    if tp > 1:
        total += micro_batch * max((x.tp.allreduce_bytes for x in layers if x.tp is not None), default=0.0)
    if dp > 1:
        if zero >= ZeroStage.FULL:
            # the gathered layer being used plus the next one prefetched, and one layer's fp32 gradients before their
            # reduce-scatter
            largest = max(device_param_count(x, tp) for x in layers)
            total += 2 * largest * dtype.itemsize + largest * GRAD_REDUCE_BYTES
        else:
            total += DP_BUCKET_BYTES
    return math.ceil(total)
