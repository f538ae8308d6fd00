"""Build a model on the meta device, then give each rank real memory for its own part only.

Initial values do not depend on the layout: every parameter is generated whole, on the CPU, from a generator seeded by
the run seed and the parameter's name, and each rank keeps only its slice. A single-process run and any sharded run
therefore start from identical weights, and at most one whole parameter exists at a time on a rank.

Where the values come from (an `InitRule`), in order of preference:
1. a model that was passed with real (non-meta) weights: its own values;
2. a root module with `init_parameter(name, tensor, generator)` (the zoo GPT has one);
3. otherwise the owning leaf module's `reset_parameters()` run on a CPU twin under a name-seeded RNG.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from executor.errors import ExecutorError

log = logging.getLogger(__name__)

#: (canonical name, whole shape, dtype) -> the whole tensor on the CPU.
InitRule = Callable[[str, torch.Size, torch.dtype], torch.Tensor]


def name_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the run seed and a parameter name (stable across processes and Python runs)."""
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:15], 16)


def is_meta(module: nn.Module) -> bool:
    """Whether any parameter or buffer of the module still lives on the meta device."""
    return any(t.device.type == "meta" for t in _tensors(module))


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def tie_groups(module: nn.Module) -> list[list[str]]:
    """Names of parameters that are one shared tensor, each group in registration order (first = canonical)."""
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def canonical_names(module: nn.Module) -> dict[str, str]:
    """Map every alias of a shared parameter to the name `named_parameters()` reports for it."""
    return {alias: group[0] for group in tie_groups(module) for alias in group[1:]}


def resolve_init_rule(model: nn.Module, seed: int) -> InitRule:
    """How whole initial values are made for `model` (see the module docstring for the order)."""
    if not is_meta(model):
        state = {
            k: v.detach()
            for k, v in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        }
        return lambda name, shape, dtype: state[name].to("cpu", dtype)
    init_parameter = getattr(model, "init_parameter", None)
    if callable(init_parameter):

        def from_method(name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
            t = torch.empty(shape, dtype=torch.float32)
            init_parameter(name, t, torch.Generator().manual_seed(name_seed(seed, name)))
            return t.to(dtype)

        return from_method
    return _LeafReset(model, seed)


class _LeafReset:
    """Runs the owning module's `reset_parameters()` on a CPU twin holding only that module's own tensors."""

    def __init__(self, model: nn.Module, seed: int) -> None:
        self._model = model
        self._seed = seed
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        owner_name, _, attr = name.rpartition(".")
        if owner_name not in self._cache:
            self._cache = {owner_name: self._reset(owner_name)}  # one owner at a time keeps memory bounded
        return self._cache[owner_name][attr].to(dtype)

    def _reset(self, owner_name: str) -> dict[str, torch.Tensor]:
        owner = self._model.get_submodule(owner_name)
        reset = getattr(owner, "reset_parameters", None)
        if not callable(reset):
            raise ExecutorError(
                f"cannot initialise '{owner_name}' ({type(owner).__name__}) built on the meta device: it has no "
                "reset_parameters(); give the model an init_parameter(name, tensor, generator) method or pass a "
                "model with real weights"
            )
        twin = copy.copy(owner)
        twin._modules = {}
        twin._parameters = {k: nn.Parameter(torch.empty_like(v, device="cpu")) for k, v in owner._parameters.items()
                            if v is not None}
        twin._buffers = {k: torch.zeros_like(v, device="cpu") for k, v in owner._buffers.items() if v is not None}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(name_seed(self._seed, owner_name))
            with torch.no_grad():
                twin.reset_parameters()
        return {k: v.detach() for k, v in (*twin._parameters.items(), *twin._buffers.items())}


def build_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Call a model factory with the meta device as default, so no parameter memory is allocated."""
    with torch.device("meta"):
        return factory()


def retie(module: nn.Module, groups: list[list[str]]) -> None:
    """Point every alias of a shared parameter back at one tensor (moving off meta creates one tensor per alias)."""
    own = dict(module.named_parameters(remove_duplicate=False))
    for group in groups:
        present = [n for n in group if n in own]
        for alias in present[1:]:
            owner, _, attr = alias.rpartition(".")
            setattr(module.get_submodule(owner) if owner else module, attr, own[present[0]])


@torch.no_grad()
def materialize(
    module: nn.Module,
    rule: InitRule,
    *,
    device: torch.device,
    aliases: dict[str, str],
    groups: list[list[str]],
) -> None:
    """Allocate this rank's part of `module` on `device` and fill it from `rule`, slice by slice.

    Works on plain tensors and on DTensors (tensor-parallel and/or FSDP-sharded): each local shard is cut from the
    whole value at the offset its placements give.
    """
    module.to_empty(device=device)
    retie(module, groups)
    seen: set[int] = set()
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        key = aliases.get(name, name)
        whole = rule(key, t.shape, t.dtype)
        if tuple(whole.shape) != tuple(t.shape):
            raise ExecutorError(f"initial value for '{key}' has shape {tuple(whole.shape)}, expected {tuple(t.shape)}")
        if isinstance(t, DTensor):
            local_shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
            piece = whole[tuple(slice(o, o + s) for o, s in zip(offset, local_shape))]
            t.to_local().copy_(piece)
        else:
            t.copy_(whole)
    log.debug("materialised %d tensors on %s", len(seen), device)
