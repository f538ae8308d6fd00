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
from planner.tp_comm import runs_sequence_parallel

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


#: Element accesses per parameter of one step of `torch.optim.AdamW` as the executor builds it (default arguments:
#: weight decay 0.01, no amsgrad; the single-tensor loop on CPU and the foreach lists on CUDA make the same passes,
#: torch/optim/adamw.py -> adam.py `_single_tensor_adam` / `_multi_tensor_adam`): decay `param.mul_` (read, write),
#: `exp_avg.lerp_(grad)` (3), `exp_avg_sq.mul_` (2), `.addcmul_(grad, grad)` (3), `exp_avg_sq.sqrt()` (2), the
#: division by the bias correction (2), `.add_(eps)` (2) and `param.addcdiv_(exp_avg, denom)` (4). A fused kernel
#: (`fused=True`, which the executor does not ask for) would make 7. Counted op by op on a real step (torch 2.13).
ADAMW_ELEMENT_ACCESSES = 20


def optimizer_bytes_touched(dtype: DType) -> float:
    """Bytes AdamW reads and writes per parameter element in one step (for its memory-bound time).

    Every tensor the step touches is fp32 whatever the compute dtype (master parameters, gradients, moments and the
    temporaries: `estimate_state_bytes`), so `dtype` does not change it: 4 bytes per access.
    """
    del dtype  # the optimizer runs on the fp32 master state
    return 4.0 * ADAMW_ELEMENT_ACCESSES


def estimate_layer_activation_bytes(layer: LayerProfile, *, tp: int, micro_batch: int, recompute: Recompute,
                                    sequence_parallel: bool = False) -> int:
    """Activation bytes one device keeps for `layer` per micro-batch between its forward and backward.

    Under TP the block's inputs and outputs (LayerNorm inputs, residual, dropout masks) stay whole on each rank and
    the rest is split, as in Korthikanti et al.'s accounting (`tp_whole_bytes`; a vocabulary-parallel head's logits
    are split). With sequence parallelism only the regions' gathered inputs stay whole (the colwise Linears keep
    them: `executor.parallelize.apply_tp`; Megatron gathers them again in backward instead, so its 34 s b h / t
    keeps even those split). Full recompute keeps only the layer input (a sequence shard of it).
    """
    sp = runs_sequence_parallel(layer, tp, sequence_parallel)
    if recompute == Recompute.FULL:
        return math.ceil(micro_batch * layer.input_bytes / (tp if sp else 1))
    saved = layer.saved_activation_bytes
    if recompute == Recompute.SELECTIVE:
        saved = max(0.0, saved - layer.selective_saved_bytes)
    if layer.tp is None or tp == 1:
        return math.ceil(micro_batch * saved)
    whole = min(saved, tp_whole_bytes(layer, sequence_parallel=sp))
    return math.ceil(micro_batch * (whole + (saved - whole) / tp))


def estimate_working_set_bytes(layers: list[LayerProfile], *, tp: int, micro_batch: int, recompute: Recompute,
                               sequence_parallel: bool = False) -> int:
    """Transient activations of the layer being recomputed (full recompute): the largest layer's full set.

    Taken over all layers (not only a stage's) so that a stage's memory stays a linear function of its layers.
    """
    if recompute != Recompute.FULL:
        return 0
    return max(estimate_layer_activation_bytes(x, tp=tp, micro_batch=micro_batch, recompute=Recompute.NONE,
                                               sequence_parallel=sequence_parallel) for x in layers)


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
        if zero == ZeroStage.NONE and pp == 1:
            pass  # DDP with gradient_as_bucket_view (executor.parallelize.apply_ddp): its buckets are the gradients
        elif zero >= ZeroStage.FULL:
            # the gathered layer being used plus the next one prefetched, and one layer's fp32 gradients before their
            # reduce-scatter
            largest = max(device_param_count(x, tp) for x in layers)
            total += 2 * largest * dtype.itemsize + largest * GRAD_REDUCE_BYTES
        else:
            total += DP_BUCKET_BYTES
    return math.ceil(total)


def estimate_optimizer_temp_bytes(layers: list[LayerProfile], *, tp: int, dp: int, zero: ZeroStage,
                                  device_type: str) -> tuple[int, float]:
    """Temporaries of one `torch.optim.AdamW` step: (bytes per device, bytes per parameter element it updates).

    torch picks the implementation by device (torch/optim/optimizer.py `_default_to_fused_or_foreach`: foreach only
    for CUDA-like devices). On CPU `_single_tensor_adam` (torch/optim/adam.py) builds the denominator
    `(exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)` one parameter at a time: the square root and the quotient
    of the largest parameter tensor live at once, 2 x 4 bytes per element of it (bounded here by the largest layer's
    local parameters; the profile does not list tensors). On CUDA `_multi_tensor_adam` keeps
    `exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs)`, one fp32 list the size of the parameters it updates: 4
    bytes per element of the local shard.
    """
    shard = dp if (dp > 1 and zero >= ZeroStage.OPTIMIZER) else 1
    if device_type == "cuda":
        return 0, 4.0 / shard
    largest = max((device_param_count(x, tp) for x in layers), default=0)
    return math.ceil(2 * 4 * largest / shard), 0.0


def estimate_output_buffer_bytes(last: LayerProfile, *, tp: int, micro_batch: int) -> int:
    """Bytes the model's output (a language model's logits) holds beyond the saved activations, on the device running
    the last layer.

    In backward the loss's gradient with respect to the output and the gradient flowing on from it (for
    cross-entropy: d loss / d log-probabilities and d loss / d logits, b x s x V x 4 bytes each) live at once: 2
    outputs of one micro-batch. A pipeline's last stage keeps no more: the executor steps its schedule with
    `return_outputs=False` (executor.apply), so `torch.distributed.pipelining` does not keep every micro-batch's
    output for a merged return value. A vocabulary-parallel head's output stays split over tp.
    """
    out = micro_batch * last.output_bytes / (tp if (last.tp is not None and last.tp.splits_output and tp > 1) else 1)
    return math.ceil(out * 2)
