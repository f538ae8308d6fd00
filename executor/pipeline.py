"""Cut a model into pipeline stages at the plan's boundaries and build the schedule that runs them.

A stage module keeps the model's own parameter names (it adopts the model's top-level children, with every layer of
other stages removed), so checkpoints and initial values are the same whatever the cut. It calls its layers in the
profile's order, one tensor in and one out: the profile's edges must show that nothing but the previous layer's
output crosses a cut. A parameter shared by layers of two stages ends up as one copy per stage module (each is a
separate pruned copy of the model); `executor.shared` keeps the copies equal.
"""

from __future__ import annotations

import copy
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

from executor.errors import ExecutorError
from executor.shared import check_tp_layouts, layer_of, split_groups
from planner.model_profile import INPUT_NODE, OUTPUT_NODE, ModelProfile
from planner.strategy import Schedule, StageSpec, Strategy

log = logging.getLogger(__name__)


class StageModule(nn.Module):
    """Layers [start, stop) of a model, run in order; parameter names are those of the whole model."""

    def __init__(self, pruned_root: nn.Module, layer_names: Sequence[str]) -> None:
        super().__init__()
        for name, child in pruned_root.named_children():
            self.add_module(name, child)
        self.layer_names = tuple(layer_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.layer_names:
            x = self.get_submodule(name)(x)
        return x


def check_pipelinable(model: nn.Module, profile: ModelProfile, stages: Sequence[StageSpec], *, tp: int = 1) -> None:
    """Refuse cuts the stage modules could not run correctly, naming the parameter or edge at fault.

    A parameter shared by layers of different stages is fine (each stage gets a copy, see `executor.shared`) unless
    tensor parallelism (degree `tp`) would shard the copies differently.
    """
    names = [layer.name for layer in profile.layers]
    stage_of_layer = {names[i]: s for s, st in enumerate(stages) for i in range(st.start, st.stop)}
    for pname, _ in model.named_parameters(remove_duplicate=False):
        if layer_of(pname, names) is None:
            raise ExecutorError(
                f"parameter '{pname}' belongs to no profiled layer, so no pipeline stage can hold it; move it into a "
                "layer or run without pipeline parallelism (pp=1)"
            )
    for aliases, _ in split_groups(model, names, stage_of_layer):
        check_tp_layouts(aliases, profile, tp)
    index = {n: i for i, n in enumerate(names)} | {INPUT_NODE: -1, OUTPUT_NODE: len(names)}
    for cut in (st.start for st in stages[1:]):
        for e in profile.edges:
            if index[e.src] < cut <= index[e.dst] and (index[e.src], index[e.dst]) != (cut - 1, cut):
                raise ExecutorError(
                    f"the cut before layer '{names[cut]}' would carry {e.src} -> {e.dst}; a pipeline stage passes "
                    "only the previous layer's output. Plan with cuts from the profile's cut_points"
                )


def _prune(root: nn.Module, keep: set[str]) -> None:
    """Drop every submodule that is not a kept layer, inside one, or an ancestor of one."""

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            path = prefix + name
            if path in keep:
                continue
            if any(k.startswith(path + ".") for k in keep):
                visit(child, path + ".")
            else:
                module._modules[name] = None

    visit(root, "")


def build_stage_module(meta_model: nn.Module, layer_names: Sequence[str]) -> StageModule:
    """A stage holding only `layer_names` (a copy of the meta model is pruned; the model itself is untouched)."""
    root = copy.deepcopy(meta_model)
    _prune(root, set(layer_names))
    return StageModule(root, layer_names)


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
