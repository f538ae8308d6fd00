"""Cut a model into pipeline stages at the plan's boundaries and build the schedule that runs them.

The stages are pieces of the model's own forward, traced with torch.fx (`profiler.partition`, the same definition of
a legal cut the profiler and the planner use): the code the model runs between its layers travels with the stage
that owns it, so the stages composed are the model. A Hugging Face transformers model is cut between its blocks
instead (`profiler.hf_partition`): each stage runs the model's own forward with other stages' layers passed through,
and its loss from `labels` (`profiler.hf.labels_loss`) runs on the last stage with the labels as targets; a T5-style
encoder-decoder's stages (`profiler.hf_encdec`) send several tensors each, and its first stage also gets the labels,
from which it makes the decoder's inputs. A stage module keeps the model's own parameter names, so
checkpoints and initial values are the same whatever the cut. A parameter shared by layers of two stages ends up as
one copy per stage module (each stage is cut from its own copy of the model); `executor.shared` keeps the copies
equal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    _PipelineSchedule,
)

from executor.batch import Batch
from executor.errors import ExecutorError
from executor.shared import check_tp_layouts, split_groups
from planner.model_profile import ModelProfile
from planner.strategy import Schedule, StageSpec, Strategy
from profiler.hf import LabelsLoss, is_hf_model, labels_loss
from profiler.hf_encdec import EncDecPartition
from profiler.partition import Partition, PartitionError, partition

log = logging.getLogger(__name__)


def check_pipelinable(
    model: nn.Module, profile: ModelProfile, stages: Sequence[StageSpec], *, tp: int = 1,
    example_inputs: tuple | None = None,
) -> Partition:
    """Refuse cuts the stages could not run exactly as the model does, naming the cut or parameter at fault.

    Every stage start must be a legal cut of this model's forward traced for meta `example_inputs` (positional;
    default: the profile's input shapes), see `profiler.partition`. A parameter shared by layers of different stages
    is fine (each stage gets a copy, see `executor.shared`) unless tensor parallelism (degree `tp`) would shard the
    copies differently. Returns the partition the stages are cut from.
    """
    names = [layer.name for layer in profile.layers]
    cuts = partition(model, names, example_inputs if example_inputs is not None else meta_inputs(profile))
    try:
        cuts.check([st.start for st in stages[1:]])
    except PartitionError as exc:
        raise ExecutorError(str(exc)) from None
    if tp > 1 and len(stages) > 1 and isinstance(cuts, EncDecPartition):
        # Each tp rank's stages would pass on its own heads of T5's position bias; untested, so refused.
        raise ExecutorError(f"{type(model).__name__} with both tensor (tp={tp}) and pipeline parallelism is not "
                            "supported (only one of them at a time is verified); plan with tp=1 or pp=1")
    stage_of_layer = {names[i]: s for s, st in enumerate(stages) for i in range(st.start, st.stop)}
    for aliases, _ in split_groups(model, names, stage_of_layer):
        check_tp_layouts(aliases, profile, tp)
    return cuts


def own_labels_loss(model: nn.Module) -> LabelsLoss | None:
    """The loss a transformers model computes from `labels`, as a loss of the last stage's logits (None otherwise)."""
    return labels_loss(model) if is_hf_model(model) else None


def inputs_to_targets(batch: Batch, key: str) -> Batch:
    """`batch` with its keyword input `key` (a transformers model's `labels`) moved to the targets."""
    kwargs = dict(batch.kwargs)
    targets = kwargs.pop(key, None)
    if not isinstance(targets, torch.Tensor):
        raise ExecutorError(f"the pipelined model computes its loss from '{key}' on its last stage, but the batch has "
                            f"no '{key}' tensor; add {key} to every batch, or give a loss_fn(output, targets)")
    return Batch(args=batch.args, kwargs=kwargs, targets=targets)


def without_all_ones_mask(batch: Batch) -> Batch:
    """`batch` without a keyword `attention_mask` of all ones, which changes nothing in a transformers model (it
    builds the same causal mask without one) and which later pipeline stages could not receive; a padded mask is
    refused (the stages pass on only the hidden state)."""
    mask = batch.kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor):
        return batch
    if not bool((mask == 1).all()):
        raise ExecutorError("the batch's attention_mask has padding, which later pipeline stages cannot receive (they "
                            "get only the hidden state); train on unpadded (packed) batches, or plan with pp=1")
    return Batch(args=batch.args, kwargs={k: v for k, v in batch.kwargs.items() if k != "attention_mask"},
                 targets=batch.targets)


def meta_inputs(profile: ModelProfile) -> tuple[torch.Tensor, ...]:
    """Meta tensors shaped like the profile's example inputs (positional), for tracing the model."""
    return tuple(torch.empty(t.shape, dtype=getattr(torch, t.dtype), device="meta") for t in profile.input.tensors)


def build_stage_modules(
    meta_model: nn.Module, cuts: Partition, strategy: Strategy, stage_indices: Sequence[int]
) -> list[nn.Module]:
    """This rank's stage modules, each cut from its own copy of the meta model (the model itself is untouched)."""
    bounds = [st.start for st in strategy.stages[1:]]
    return list(cuts.stage_modules(meta_model, bounds, stage_indices, copy_model=True))


def local_stage_indices(strategy: Strategy, pp_rank: int) -> list[int]:
    """Stages this pipeline rank runs: stage s runs on rank s % pp."""
    return [s for s in range(len(strategy.stages)) if strategy.stage_ranks(s) == pp_rank]


_SINGLE = {Schedule.GPIPE: ScheduleGPipe, Schedule.ONE_F_ONE_B: Schedule1F1B}


def build_schedule(
    modules: Sequence[nn.Module],
    stage_indices: Sequence[int],
    strategy: Strategy,
    *,
    device: torch.device,
    group: torch.distributed.ProcessGroup,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[list[PipelineStage], _PipelineSchedule]:
    """PipelineStages for this rank's stage modules and the plan's schedule over its micro-batches.

    Gradients are divided by the micro-batch count (loss_fn is a per-micro-batch mean), so a step's gradient is the
    mean over the whole batch, as in a single-process run.
    """
    n = len(strategy.stages)
    stages = [
        PipelineStage(m, stage_index=s, num_stages=n, device=device, group=group)
        for m, s in zip(modules, stage_indices)
    ]
    nmb = strategy.num_micro_batches
    try:
        if strategy.schedule == Schedule.INTERLEAVED_1F1B:
            schedule = ScheduleInterleaved1F1B(stages, n_microbatches=nmb, loss_fn=loss_fn, scale_grads=True)
        else:
            schedule = _SINGLE[strategy.schedule](stages[0], n_microbatches=nmb, loss_fn=loss_fn, scale_grads=True)
    except ValueError as exc:
        raise ExecutorError(f"the {strategy.schedule.value} schedule rejects this plan: {exc}") from None
    log.debug("pipeline: stages %s of %d, %s schedule, %d micro-batches", list(stage_indices), n,
              strategy.schedule.value, nmb)
    return stages, schedule
