"""Memory costs: training state per parameter by ZeRO stage, activations per micro-batch, micro-batches in flight.

All sizes are whole bytes so that the search (integer CP-SAT constraints) and `evaluate` agree exactly on what fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.cost import device_param_count
from planner.model_profile import DType, LayerProfile
from planner.strategy import Recompute, Schedule, ZeroStage

#: Gradient buckets that DDP / ZeRO keep in flight (PyTorch DDP's default bucket is 25 MiB; two overlap).
DP_BUCKET_BYTES = 2 * 25 * 1024**2


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


def estimate_state_bytes(dtype: DType, zero: ZeroStage, dp: int) -> StateBytes:
    """AdamW training state per parameter, sharded over `dp` by the ZeRO stage.

    16/32-bit mixed precision: low-precision parameters and gradients plus an fp32 master copy and two fp32 moments
    (2 + 2 + 12 bytes). fp32 / tf32 training: no separate master copy (4 + 4 + 8 bytes).
    """
    e = dtype.itemsize
    optimizer = 8.0 + (4.0 if e < 4 else 0.0)
    return StateBytes(
        parameters=e / (dp if zero >= ZeroStage.FULL else 1),
        gradients=e / (dp if zero >= ZeroStage.GRADIENTS else 1),
        optimizer=optimizer / (dp if zero >= ZeroStage.OPTIMIZER else 1),
    )


def optimizer_bytes_touched(dtype: DType) -> float:
    """Bytes AdamW reads and writes per parameter element in one step (for its memory-bound time)."""
    e = dtype.itemsize
    master = 4.0 if e < 4 else 0.0
    # read param, grad, two moments (+ master); write param, two moments (+ master)
    return 2 * e + e + 2 * (8.0 + master)


def estimate_layer_activation_bytes(layer: LayerProfile, *, tp: int, micro_batch: int, recompute: Recompute) -> int:
    """Activation bytes one device keeps for `layer` per micro-batch between its forward and backward.

    Under TP the block's inputs and outputs (LayerNorm inputs, residual, dropout masks) stay whole on each rank and
    the rest is split, as in Korthikanti et al.'s accounting. Full recompute keeps only the layer input.
    """
    if recompute == Recompute.FULL:
        return math.ceil(micro_batch * layer.input_bytes)
    saved = layer.saved_activation_bytes
    if recompute == Recompute.SELECTIVE:
        saved = max(0.0, saved - layer.selective_saved_bytes)
    if layer.tp is None or tp == 1:
        return math.ceil(micro_batch * saved)
    whole = min(saved, 2 * (layer.input_bytes + layer.output_bytes))
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
        if zero >= ZeroStage.FULL:  # the gathered layer being used plus the next one prefetched
            total += 2 * max(device_param_count(x, tp) for x in layers) * dtype.itemsize
        else:
            total += DP_BUCKET_BYTES
    return math.ceil(total)
