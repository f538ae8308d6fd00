"""Parameters shared by layers that a pipeline cut puts in different stages (e.g. GPT-2's tied embedding and head).

Megatron's embedding group, on stock PyTorch: every stage that uses a shared parameter holds its own copy (each stage
module is a separate pruned copy of the model, so the tie is undone there by construction), all copies start from the
value generated for the canonical name (the first name `named_parameters()` reports), and after each step's backward
the copies' gradients are summed over exactly the ranks that hold a copy with the same data/tensor-parallel
coordinates. The sum is the gradient the single tied tensor would have received, so with identical gradients and
optimizer states the copies stay bit-identical.

The sum runs after the pipeline schedule and the FSDP / replicate reduction have finished: each copy's gradient is
then already averaged over data-parallel replicas and, under FSDP, sharded the same way on every copy (same shape,
same mesh), so the local shards are added directly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from executor.errors import ExecutorError
from executor.init import tie_groups
from planner.model_profile import ModelProfile
from planner.strategy import MeshAxis, Strategy

log = logging.getLogger(__name__)


def layer_of(param_name: str, layer_names: Sequence[str]) -> str | None:
    """The profiled layer that owns a parameter name, or None."""
    for layer in layer_names:
        if param_name.startswith(layer + "."):
            return layer
    return None


def split_groups(
    model: nn.Module, layer_names: Sequence[str], stage_of_layer: dict[str, int]
) -> list[tuple[list[str], list[int]]]:
    """Tie groups whose names fall in more than one stage: (names, sorted stages), in `named_parameters` order."""
    out = []
    for names in tie_groups(model):
        # A name outside every layer is used by glue, which `profiler.partition` keeps within one stage.
        owners = {layer_of(n, layer_names) for n in names} - {None}
        stages = sorted({stage_of_layer[o] for o in owners})
        if len(stages) > 1:
            out.append((names, stages))
    return out


def check_tp_layouts(names: Sequence[str], profile: ModelProfile, tp: int) -> None:
    """Refuse copies that tensor parallelism would shard differently (their gradients could not be added)."""
    if tp == 1:
        return
    layers = {layer.name: layer for layer in profile.layers}
    styles = {}
    for name in names:
        owner = layer_of(name, list(layers))
        module = name[len(owner) + 1:].rpartition(".")[0]
        spec = layers[owner].tp
        style = next((s.style.value for s in spec.shards if s.module == module), None) if spec else None
        # A vocabulary-parallel embedding and head both split the weight's rows (vocabulary entries).
        styles[name] = "vocab rows" if style in ("vocab_rowwise", "vocab_colwise") else style or "unsharded"
    if len(set(styles.values())) > 1:
        described = ", ".join(f"{n} {s}" for n, s in styles.items())
        raise ExecutorError(
            f"shared parameter copies are laid out differently under tensor parallelism ({described}), so their "
            "gradients cannot be summed; put the layers sharing it in one stage, untie it, or plan with tp=1"
        )


@dataclass
class _Copies:
    canonical: str
    #: (local stage module, parameter name in it) for every copy on this rank, one per distinct tensor.
    local: list[tuple[nn.Module, str]]
    #: Ranks holding the other copies for this rank's (dp, tp) coordinates; None when every copy is local.
    group: dist.ProcessGroup | None


@dataclass
class SharedCopies:
    """The shared-parameter copies on this rank and the process groups that keep their gradients summed."""

    copies: list[_Copies] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.copies)

    @torch.no_grad()
    def sync_grads(self) -> None:
        """Give every copy the sum of all copies' gradients (collective over each copy group)."""
        for c in self.copies:
            params = [part.get_parameter(name) for part, name in c.local]
            grads = [_local(_grad_as_param(p)) if p.grad is not None else None for p in params]
            present = [g for g in grads if g is not None]
            total = torch.zeros_like(_local(params[0])) if not present else present[0].clone()
            for g in present[1:]:
                total += g
            if c.group is not None:
                dist.all_reduce(total, group=c.group)
            for p, g in zip(params, grads):
                if g is not None:
                    g.copy_(total)
                else:
                    p.grad = _like_param(p, total.clone())


def _grad_as_param(p: torch.Tensor) -> torch.Tensor:
    """p's gradient laid out as p (a vocabulary-parallel embedding's gradient can come back with other placements,
    e.g. partial sums), so the copies' local pieces line up."""
    g = p.grad
    if isinstance(p, DTensor) and isinstance(g, DTensor) and tuple(g.placements) != tuple(p.placements):
        p.grad = g = g.redistribute(p.device_mesh, p.placements)
    return g


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _like_param(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    if isinstance(p, DTensor):
        return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    return local


def _pp_columns(mesh: DeviceMesh) -> torch.Tensor:
    """Global ranks as a (pp, rest) table: column j lists the pipeline ranks of one (dp, tp) coordinate."""
    ranks = mesh.mesh
    pp_dim = mesh.mesh_dim_names.index(MeshAxis.PP.value)
    return ranks.movedim(pp_dim, 0).reshape(ranks.shape[pp_dim], -1)


def build_shared_copies(
    model: nn.Module,
    profile: ModelProfile,
    strategy: Strategy,
    mesh: DeviceMesh,
    parts: Sequence[nn.Module],
    stage_indices: Sequence[int],
) -> SharedCopies:
    """Find the shared parameters the cut splits and create their copy groups (collective: every rank calls it).

    `model` is the whole (meta) model the stage modules were cut from; `parts` this rank's stage modules.
    """
    names = [layer.name for layer in profile.layers]
    stage_of_layer = {names[i]: s for s, st in enumerate(strategy.stages) for i in range(st.start, st.stop)}
    split = split_groups(model, names, stage_of_layer)
    if not split:
        return SharedCopies()
    table = _pp_columns(mesh)
    me = dist.get_rank()
    made: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
    result = SharedCopies()
    for aliases, stages in split:
        pp_ranks = tuple(sorted({strategy.stage_ranks(s) for s in stages}))
        if pp_ranks not in made:
            mine = None
            if len(pp_ranks) > 1:
                # new_group is collective over the whole world: every rank creates every group, in the same order.
                for col in range(table.shape[1]):
                    ranks = [int(table[p, col]) for p in pp_ranks]
                    group = dist.new_group(ranks)
                    if me in ranks:
                        mine = group
            made[pp_ranks] = mine
        local: list[tuple[nn.Module, str]] = []
        for part, s in zip(parts, stage_indices):
            seen: set[int] = set()
            for alias in aliases:
                owner = layer_of(alias, names)
                if owner is None or stage_of_layer[owner] != s:
                    continue
                p = part.get_parameter(alias)
                if id(p) not in seen:  # two names in one stage are still one tensor there
                    seen.add(id(p))
                    local.append((part, alias))
        if local:
            result.copies.append(_Copies(canonical=aliases[0], local=local, group=made[pp_ranks]))
            log.info("shared parameter %s: %d local cop%s, stages %s", aliases[0], len(local),
                     "y" if len(local) == 1 else "ies", stages)
    return result
