"""Apply a plan to a model on this rank and get back the parallelised pieces: the entry point for own training loops.

    import torch.distributed as dist
    from executor import apply_plan, init_distributed
    from planner.strategy import Plan

    device = init_distributed("cuda", local_rank=int(os.environ["LOCAL_RANK"]))   # under torchrun
    pm = apply_plan(Plan.from_json("plan.json"), zoo_model, profile, loss_fn=zoo_model.loss, device=device)
    optimizers = [torch.optim.AdamW(part.parameters(), lr=3e-4) for part in pm.parts]
    for step in range(steps):
        inputs, targets = pm.local_batch(*global_batch(step))       # this data-parallel replica's share
        loss = pm.forward_backward(inputs, targets)                 # None on ranks that hold no last stage
        for opt in optimizers: opt.step(); opt.zero_grad()

`pm.parts` are the local modules (one stage, several when interleaved, or the whole model), `pm.schedule` the
pipeline schedule (None without pipelining), `pm.mesh` the DeviceMesh with axes named pp/dp/tp.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import _PipelineSchedule
from torch.nn.parallel import DistributedDataParallel

from executor import init as minit
from executor import parallelize, pipeline, shared
from executor.errors import ExecutorError
from executor.mesh import axis_rank, build_mesh
from planner.model_profile import ModelProfile
from planner.strategy import MeshAxis, Plan, Strategy, ZeroStage

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ParallelModel:
    """A plan applied on this rank."""

    strategy: Strategy
    mesh: DeviceMesh
    device: torch.device
    #: Local modules: one per local pipeline stage, or the whole (wrapped) model without pipelining.
    parts: list[nn.Module]
    loss_fn: LossFn
    stage_indices: list[int]
    stages: list[PipelineStage] = field(default_factory=list)
    schedule: _PipelineSchedule | None = None
    autocast_dtype: torch.dtype | None = None
    #: Copies of parameters shared across pipeline stages, whose gradients are summed after each backward.
    shared_copies: shared.SharedCopies = field(default_factory=shared.SharedCopies)

    @property
    def dp_rank(self) -> int:
        """Coordinate along the data-parallel axis."""
        return axis_rank(self.mesh, MeshAxis.DP)

    @property
    def has_first_stage(self) -> bool:
        """Whether this rank feeds the model's inputs."""
        return 0 in self.stage_indices

    @property
    def has_last_stage(self) -> bool:
        """Whether this rank computes the loss."""
        return len(self.strategy.stages) - 1 in self.stage_indices or self.schedule is None

    @property
    def local_batch_size(self) -> int:
        """Samples per step on one data-parallel replica."""
        return self.strategy.micro_batch_size * self.strategy.num_micro_batches

    def local_batch(
        self, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """This replica's contiguous share of a global batch, moved to the device."""
        expected = self.strategy.global_batch_size
        if targets.shape[0] != expected:
            raise ExecutorError(f"the data source gave {targets.shape[0]} samples, the plan's global batch is {expected}")
        lo = self.dp_rank * self.local_batch_size
        sl = slice(lo, lo + self.local_batch_size)
        return tuple(t[sl].to(self.device) for t in inputs), targets[sl].to(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward_backward(self, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor) -> torch.Tensor | None:
        """Forward and backward over this replica's batch in micro-batches; gradients end up synchronised.

        Returns the mean loss over the replica's micro-batches on ranks that compute the loss, else None.
        """
        if self.schedule is not None:
            loss = self._pipelined(inputs, targets)
            # After the schedule (and with it FSDP's / replicate's reduction) has finished, before the optimizer.
            self.shared_copies.sync_grads()
            return loss
        part = self.parts[0]
        nmb = self.strategy.num_micro_batches
        xs = [t.chunk(nmb) for t in inputs]
        ys = targets.chunk(nmb)
        total = torch.zeros((), device=self.device)
        for i in range(nmb):
            last = i == nmb - 1
            sync = contextlib.nullcontext()
            if isinstance(part, DistributedDataParallel) and not last:
                sync = part.no_sync()
            elif isinstance(part, FSDPModule):
                part.set_requires_gradient_sync(last)
            with sync:
                with self._autocast():
                    loss = self.loss_fn(part(*(x[i] for x in xs)), ys[i])
                (loss / nmb).backward()
            total += loss.detach()
        return total / nmb

    def _pipelined(self, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor) -> torch.Tensor | None:
        losses: list[torch.Tensor] = []
        kwargs = {"target": targets, "losses": losses} if self.has_last_stage else {}
        args = inputs if self.has_first_stage else ()
        with self._autocast():
            self.schedule.step(*args, **kwargs)
        if not self.has_last_stage:
            return None
        return torch.stack([loss.detach() for loss in losses]).mean()

    def global_loss(self, local: torch.Tensor | None) -> float:
        """Mean loss over the global batch (one all-reduce of a scalar over all ranks)."""
        dims = self.strategy.dims
        value = torch.zeros((), device=self.device) if local is None else local.detach().float() / (dims.dp * dims.tp)
        if dims.world_size > 1:
            dist.all_reduce(value)
        return float(value)


def _shared_layers(model: nn.Module, layer_names: list[str]) -> set[str]:
    """Layers holding a parameter that is shared with another layer (FSDP must wrap them together)."""
    out: set[str] = set()
    for group in minit.tie_groups(model):
        owners = {shared.layer_of(n, layer_names) for n in group}
        if len(owners) > 1:
            out |= {o for o in owners if o is not None}
    return out


def apply_plan(
    plan: Plan | Strategy,
    model: nn.Module | Callable[[], nn.Module],
    profile: ModelProfile,
    *,
    loss_fn: LossFn,
    device: torch.device,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> ParallelModel:
    """Parallelise `model` on this rank as `plan` says; the process group must be initialised.

    `model` is a factory (called on the meta device), a module on the meta device, or a module with real weights
    (whose values become the initial weights). Initial weights never depend on the layout (see `executor.init`).
    """
    strategy = plan.strategy if isinstance(plan, Plan) else plan
    if strategy.stages[-1].stop != profile.num_layers:
        raise ExecutorError(
            f"the plan's stages cover {strategy.stages[-1].stop} layers but the profile has {profile.num_layers}; "
            "the plan was made for another model - re-plan it"
        )
    if not isinstance(model, nn.Module):
        model = minit.build_meta(model)
    rule = minit.resolve_init_rule(model, seed)
    aliases, groups = minit.canonical_names(model), minit.tie_groups(model)
    meta = model if minit.is_meta(model) else _meta_copy(model, groups)
    names = [layer.name for layer in profile.layers]
    for name in names:
        try:
            meta.get_submodule(name)
        except AttributeError:
            raise ExecutorError(f"the profile names layer '{name}' but the model has no such module; re-profile it") from None
    mesh = build_mesh(strategy, device.type)
    dims = strategy.dims

    if dims.pp > 1:
        pipeline.check_pipelinable(meta, profile, strategy.stages, tp=dims.tp)
        stage_indices = pipeline.local_stage_indices(strategy, axis_rank(mesh, MeshAxis.PP))
        layer_sets = [names[strategy.stages[s].start:strategy.stages[s].stop] for s in stage_indices]
        parts: list[nn.Module] = [pipeline.build_stage_module(meta, ls) for ls in layer_sets]
    else:
        stage_indices, layer_sets, parts = [0], [names], [meta]

    use_ddp = dims.dp > 1 and dims.pp == 1 and dims.tp == 1 and strategy.zero_stage == ZeroStage.NONE
    for part, layer_names in zip(parts, layer_sets):
        layers = {n: part.get_submodule(n) for n in layer_names}
        if dims.tp > 1:
            for layer in profile.layers:
                if layer.name in layers and layer.tp is not None:
                    parallelize.apply_tp(layers[layer.name], layer.name, layer.tp, mesh[MeshAxis.TP.value])
        parallelize.apply_ac(list(layers.values()), strategy.recompute)
        tied = _shared_layers(part, layer_names)  # within this part: a cut has already untied the others
        unit_layers = [m for n, m in layers.items() if n not in tied]
        if dims.dp > 1 and not use_ddp:
            dp_mesh = mesh[MeshAxis.DP.value]
            if strategy.zero_stage >= ZeroStage.OPTIMIZER:
                parallelize.apply_fsdp(part, unit_layers, dp_mesh, strategy.zero_stage)
            else:
                parallelize.apply_replicate(part, unit_layers, dp_mesh)
        minit.materialize(part, rule, device=device, aliases=aliases, groups=groups)
    if use_ddp:
        parts = [parallelize.apply_ddp(parts[0], mesh[MeshAxis.DP.value], device)]

    pm = ParallelModel(
        strategy=strategy, mesh=mesh, device=device, parts=parts, loss_fn=loss_fn, stage_indices=stage_indices,
        autocast_dtype=autocast_dtype,
    )
    if dims.pp > 1:
        pm.shared_copies = shared.build_shared_copies(meta, profile, strategy, mesh, parts, stage_indices)
        pm.stages, pm.schedule = pipeline.build_schedule(
            parts, stage_indices, strategy, device=device, group=mesh[MeshAxis.PP.value].get_group(), loss_fn=loss_fn
        )
    log.info("applied %s: stages %s on this rank", strategy.describe(), stage_indices)
    return pm


def _meta_copy(model: nn.Module, groups: list[list[str]]) -> nn.Module:
    """A structural copy of a real model on the meta device (its values are read from the original)."""
    clone = copy.deepcopy(model).to("meta")
    minit.retie(clone, groups)
    return clone
