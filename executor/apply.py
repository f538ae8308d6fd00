"""Apply a plan to a model on this rank and get back the parallelised pieces: the entry point for own training loops.

    import torch.distributed as dist
    from executor import apply_plan, init_distributed
    from planner.strategy import Plan

    device = init_distributed("cuda", local_rank=int(os.environ["LOCAL_RANK"]))   # under torchrun
    pm = apply_plan(Plan.from_json("plan.json"), zoo_model, profile, loss_fn=zoo_model.loss, device=device)
    optimizers = [torch.optim.AdamW(part.parameters(), lr=3e-4) for part in pm.parts]
    for step in range(steps):
        batch = pm.local_batch(*global_batch(step))     # this replica's share: (inputs tuple/dict, targets or None)
        loss = pm.forward_backward(batch)                # None on ranks that hold no last stage
        for opt in optimizers: opt.step(); opt.zero_grad()

`pm.parts` are the local modules (one stage, several when interleaved, or the whole model), `pm.schedule` the
pipeline schedule (None without pipelining), `pm.mesh` the DeviceMesh with axes named pp/dp/tp.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import _PipelineSchedule
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_map

from executor import (
    hf_tp,
    optim,
    parallelize,
    pipeline,
    sequence_parallel,
    shared,
    tp_rewrite,
    tp_styles,
    vocab_parallel,
)
from executor import init as minit
from executor.batch import Batch, training_loss
from executor.errors import ExecutorError
from executor.mesh import axis_rank, build_mesh
from planner.model_profile import ModelProfile
from planner.strategy import MeshAxis, Plan, Strategy, ZeroStage
from profiler.hf_encdec import EncDecPartition

#: Recent torch schedules take `return_outputs`; with it off, the last stage does not keep every micro-batch's output
#: until the step ends (older torch keeps them; planner.memory.estimate_output_buffer_bytes counts what is kept here).
_SCHEDULE_TAKES_RETURN_OUTPUTS = "return_outputs" in inspect.signature(_PipelineSchedule.step).parameters

log = logging.getLogger(__name__)

LossFn = Callable[..., torch.Tensor]


@dataclass
class ParallelModel:
    """A plan applied on this rank."""

    strategy: Strategy
    mesh: DeviceMesh
    device: torch.device
    #: Local modules: one per local pipeline stage, or the whole (wrapped) model without pipelining.
    parts: list[nn.Module]
    loss_fn: LossFn | None
    stage_indices: list[int]
    stages: list[PipelineStage] = field(default_factory=list)
    schedule: _PipelineSchedule | None = None
    autocast_dtype: torch.dtype | None = None
    #: Loss scaler of a float16 run (autocast, whole gradients): the loss's backward is scaled by it already; the
    #: training loop unscales before clipping, steps through it and updates it (see `executor.optim.loss_scaling`).
    grad_scaler: torch.amp.GradScaler | None = None
    #: Copies of parameters shared across pipeline stages, whose gradients are summed after each backward.
    shared_copies: shared.SharedCopies = field(default_factory=shared.SharedCopies)
    #: Modules kept whole under TP whose gradients are summed over their TP group after each backward (tp_styles).
    partial_grads: list = field(default_factory=list)
    #: Pipelined: the forward's arguments that are not tensors, fixed at their traced values (see profiler.partition).
    fixed_inputs: dict[str, Any] = field(default_factory=dict)
    #: The head's logits stay split over the TP group and the loss runs under `loss_parallel` (executor.vocab_parallel).
    loss_parallel: bool = False
    #: Pipelined transformers model: the batch input (`labels`) that becomes the targets of its own loss on the last
    #: stage (`executor.pipeline.own_labels_loss`).
    targets_key: str | None = None
    #: Pipelined encoder-decoder: its first stage also takes those targets, from which it makes the decoder's inputs
    #: as the model does (`profiler.hf_encdec`).
    targets_to_first_stage: bool = False

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

    def local_batch(self, inputs: Any, targets: Any = None) -> Batch:
        """This replica's contiguous share of a global batch, moved to the device.

        `inputs`: a tuple, a dict (keyword inputs) or one tensor; `targets`: a tensor, or None when the loss comes
        from the model's output (see `executor.batch`).
        """
        batch = Batch.of(inputs, targets)
        expected = self.strategy.global_batch_size
        if batch.size != expected:
            raise ExecutorError(f"the data source gave {batch.size} samples, the plan's global batch is {expected}")
        lo = self.dp_rank * self.local_batch_size
        return batch.select(lo, lo + self.local_batch_size).to(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward_backward(self, batch: Batch | Any, targets: Any = None) -> torch.Tensor | None:
        """Forward and backward over this replica's batch in micro-batches; gradients end up synchronised.

        `batch`: from `local_batch` (or inputs, with `targets`). Returns the mean loss over the replica's
        micro-batches on ranks that compute the loss, else None.
        """
        batch = Batch.of(batch, targets)
        if self.schedule is not None:
            loss = self._pipelined(batch)
            # After the schedule (and with it FSDP's / replicate's reduction) has finished, before the optimizer.
            self.shared_copies.sync_grads()
            tp_styles.sum_partial_grads(self.partial_grads)
            return loss
        part = self.parts[0]
        nmb = self.strategy.num_micro_batches
        total = torch.zeros((), device=self.device)
        for i, micro in enumerate(batch.chunks(nmb)):
            last = i == nmb - 1
            sync = contextlib.nullcontext()
            if isinstance(part, DistributedDataParallel) and not last:
                sync = part.no_sync()
            elif isinstance(part, FSDPModule):
                # ZeRO-2/3 reduce-scatter every micro-batch so gradients stay sharded (as planned, planner.memory);
                # ZeRO-1 and replicate accumulate whole gradients and sync once.
                part.set_requires_gradient_sync(last or self.strategy.zero_stage >= ZeroStage.GRADIENTS)
            with sync, vocab_parallel.loss_context(self.loss_parallel):  # forward and backward of the loss
                with self._autocast():
                    loss = training_loss(micro.call(part), micro.targets, self.loss_fn)
                (loss / nmb).backward()
            total += vocab_parallel.local_loss(loss.detach())
        tp_styles.sum_partial_grads(self.partial_grads)  # per-head modules kept whole under TP (executor.tp_styles)
        return total / nmb

    def _pipelined(self, batch: Batch) -> torch.Tensor | None:
        if self.targets_key is not None:
            batch = pipeline.inputs_to_targets(pipeline.without_all_ones_mask(batch), self.targets_key)
        for name, value in batch.kwargs.items():
            if not isinstance(value, torch.Tensor) and name in self.fixed_inputs and value != self.fixed_inputs[name]:
                raise ExecutorError(
                    f"the batch passes {name}={value!r}, but the pipeline stages were traced with "
                    f"{name}={self.fixed_inputs[name]!r} (non-tensor inputs are fixed in the traced stages); give "
                    "example_inputs with the same value, or keep it constant"
                )
        losses: list[torch.Tensor] = []
        kwargs = {"target": batch.targets, "losses": losses} if self.has_last_stage else {}
        if self.has_first_stage:
            # Stage 0's program takes the batch's tensors by the forward's own parameter names.
            kwargs |= {k: v for k, v in batch.kwargs.items() if isinstance(v, torch.Tensor)}
            if self.targets_to_first_stage and self.targets_key is not None:
                kwargs[self.targets_key] = batch.targets
        args = tuple(a for a in batch.args if isinstance(a, torch.Tensor)) if self.has_first_stage else ()
        if _SCHEDULE_TAKES_RETURN_OUTPUTS:  # the losses are all we use: do not keep every micro-batch's output
            kwargs["return_outputs"] = False
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
    loss_fn: LossFn | None = None,
    device: torch.device,
    seed: int = 0,
    example_inputs: Any = None,
    autocast_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
    sync_batchnorm: bool = False,
) -> ParallelModel:
    """Parallelise `model` on this rank as `plan` says; the process group must be initialised.

    `model` is a factory (called on the meta device, and once on the CPU for tensors no init of the model writes), a
    module on the meta device, or a module with real weights (whose values become the initial weights). Initial
    weights never depend on the layout (see `executor.init`).

    `compute_dtype` (bfloat16 / float16; None: float32): FSDP2 `MixedPrecisionPolicy` where FSDP2 / `replicate`
    holds the parameters, else autocast; float16 also gets a loss scaler (`pm.grad_scaler`) and is refused where it
    cannot run (see `executor.optim.mixed_precision`). `autocast_dtype` forces autocast instead. `sync_batchnorm`:
    BatchNorm statistics over the data-parallel group (else, with dp > 1, a warning names the BatchNorm layers).

    `loss_fn(output, targets)`, or None when the loss is the output's `.loss` / first element (see
    `executor.batch`); a pipeline needs a loss_fn, except for a transformers model given `labels`, whose own loss
    runs on the last stage with the labels as targets. `example_inputs` (a tuple or dict, any device; default: tensors
    shaped as the profile's inputs) fixes how the model is called, which the pipeline's stages are traced for.
    """
    strategy = plan.strategy if isinstance(plan, Plan) else plan
    if strategy.stages[-1].stop != profile.num_layers:
        raise ExecutorError(
            f"the plan's stages cover {strategy.stages[-1].stop} layers but the profile has {profile.num_layers}; "
            "the plan was made for another model - re-plan it"
        )
    factory = None
    if not isinstance(model, nn.Module):
        # Kept: tensors that no init of the model writes are taken from one CPU build (see executor.init).
        factory, model = model, minit.build_meta(model)
    rule = minit.resolve_init_rule(model, seed, factory=factory)
    aliases, groups = minit.canonical_names(model), minit.tie_groups(model)
    meta = model if minit.is_meta(model) else _meta_copy(model, groups)
    names = [layer.name for layer in profile.layers]
    for name in names:
        try:
            meta.get_submodule(name)
        except AttributeError:
            raise ExecutorError(f"the profile names layer '{name}' but the model has no such module; re-profile it") from None
    sequence_parallel.check_sequence_parallel(strategy, profile, hf_model=hf_tp.is_hf_model(meta))
    sp_layers = sequence_parallel.sequence_parallel_layers(profile, strategy)
    mesh = build_mesh(strategy, device.type)
    dims = strategy.dims
    tp_calls = {}  # what each TP layer receives: its forward is made to run on shards (executor.tp_rewrite)
    if dims.tp > 1 and not hf_tp.is_hf_model(meta):  # transformers layers need no shape rewrite (executor.hf_tp)
        tp_calls = tp_rewrite.record_tp_calls(
            meta, profile, pipeline.meta_inputs(profile) if example_inputs is None else _to_meta(meta, example_inputs)
        )

    targets_key = None  # a transformers model's own loss from its `labels`, on the pipeline's last stage
    if dims.pp > 1 and loss_fn is None and (own := pipeline.own_labels_loss(meta)) is not None:
        loss_fn, targets_key = own, "labels"
    if dims.pp > 1:
        if loss_fn is None:
            raise ExecutorError(
                "a pipeline computes the loss on its last stage from the output and the targets; give a "
                "loss_fn(output, targets) and targets, or plan with pp=1 for a model that computes its own loss"
            )
        traced = pipeline.meta_inputs(profile) if example_inputs is None else _to_meta(meta, example_inputs)
        cuts = pipeline.check_pipelinable(meta, profile, strategy.stages, tp=dims.tp, example_inputs=traced)
        stage_indices = pipeline.local_stage_indices(strategy, axis_rank(mesh, MeshAxis.PP))
        layer_sets = [names[strategy.stages[s].start:strategy.stages[s].stop] for s in stage_indices]
        parts: list[nn.Module] = pipeline.build_stage_modules(meta, cuts, strategy, stage_indices)
    else:
        stage_indices, layer_sets, parts = [0], [names], [meta]

    fsdp2 = optim.uses_fsdp2(strategy)  # else plain DDP (dp > 1) or no data parallelism
    use_ddp = dims.dp > 1 and not fsdp2
    mp_policy, mp_autocast = optim.mixed_precision(strategy, compute_dtype, fsdp2=fsdp2)
    split_logits = vocab_parallel.logits_layout(profile, loss_fn, pp=dims.pp, tp=dims.tp,
                                                micro_batch=strategy.micro_batch_size, compute_dtype=compute_dtype)
    grad_scaler = None
    if compute_dtype == torch.float16:
        grad_scaler, loss_fn = optim.loss_scaling(loss_fn, device)
    if dims.dp > 1:
        parallelize.apply_batchnorm_policy(parts, mesh[MeshAxis.DP.value], sync=sync_batchnorm)
    for part, layer_names in zip(parts, layer_sets):
        layers = {n: part.get_submodule(n) for n in layer_names}
        if dims.tp > 1:
            for layer in profile.layers:
                if layer.name in layers and layer.tp is not None:
                    spec, vocab = vocab_parallel.split_spec(layer.tp)
                    if spec is not None and hf_tp.runs_on_shards_unchanged(layers[layer.name], spec):
                        hf_tp.apply_hf_tp(layers[layer.name], layer.name, spec, mesh[MeshAxis.TP.value])
                    elif spec is not None:
                        parallelize.apply_tp(layers[layer.name], layer.name, spec, mesh[MeshAxis.TP.value],
                                             example_call=tp_calls.get(layer.name),
                                             sequence_parallel=layer.name in sp_layers)
                    if vocab:
                        parallelize.apply_vocab_parallel(layers[layer.name], layer.name, vocab,
                                                         mesh[MeshAxis.TP.value], split_logits=split_logits)
            vocab_parallel.retie_split(part, groups)  # before data parallelism wraps the tied tensor
        no_ac = vocab_parallel.embedding_layers(profile) if dims.tp > 1 else set()
        parallelize.apply_ac([m for n, m in layers.items() if n not in no_ac], strategy.recompute)
        if sp_layers:  # sequence shards start after the embedding, end before the head; after AC: recomputed too
            sequence_parallel.apply_boundaries(part, profile, layer_names, sp_layers, mesh[MeshAxis.TP.value])
        tied = _shared_layers(part, layer_names)  # within this part: a cut has already untied the others
        unit_layers = [m for n, m in layers.items() if n not in tied]
        if fsdp2:
            dp_mesh = mesh[MeshAxis.DP.value]
            if strategy.zero_stage >= ZeroStage.OPTIMIZER:
                parallelize.apply_fsdp(part, unit_layers, dp_mesh, strategy.zero_stage, mp_policy)
            else:
                parallelize.apply_replicate(part, unit_layers, dp_mesh, mp_policy)
        minit.materialize(part, rule, device=device, aliases=aliases, groups=groups)
    if use_ddp:
        parts = [parallelize.apply_ddp(parts[0], mesh[MeshAxis.DP.value], device)]

    pm = ParallelModel(
        strategy=strategy, mesh=mesh, device=device, parts=parts, loss_fn=loss_fn, stage_indices=stage_indices,
        autocast_dtype=mp_autocast or autocast_dtype, grad_scaler=grad_scaler, loss_parallel=split_logits,
        targets_key=targets_key, partial_grads=tp_styles.partial_grad_modules(parts),
    )
    if dims.pp > 1:
        pm.shared_copies = shared.build_shared_copies(meta, profile, strategy, mesh, parts, stage_indices)
        pm.fixed_inputs = dict(cuts.constants)
        pm.targets_to_first_stage = isinstance(cuts, EncDecPartition)
        pm.stages, pm.schedule = pipeline.build_schedule(
            parts, stage_indices, strategy, device=device, group=mesh[MeshAxis.PP.value].get_group(), loss_fn=loss_fn
        )
    log.info("applied %s: stages %s on this rank", strategy.describe(), stage_indices)
    return pm


def _to_meta(model: nn.Module, example_inputs: Any) -> tuple:
    """Example inputs as meta tensors in the model's positional order (see `profiler.partition.positional_inputs`)."""
    from profiler.errors import ProfileError
    from profiler.hf import meta_safe_inputs
    from profiler.partition import positional_inputs

    args = positional_inputs(model, example_inputs)
    try:  # a transformers model's all-ones attention_mask is dropped, as the profiler does (profiler.hf)
        args = meta_safe_inputs(model, tuple(args))
    except ProfileError as exc:
        raise ExecutorError(str(exc)) from None
    return tuple(tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, list(args)))


def _meta_copy(model: nn.Module, groups: list[list[str]]) -> nn.Module:
    """A structural copy of a real model on the meta device (its values are read from the original)."""
    clone = copy.deepcopy(model).to("meta")
    minit.retie(clone, groups)
    return clone
