"""Build a model on the meta device, then give each rank real memory for its own part only.

Initial values do not depend on the layout: every tensor is generated whole, on the CPU, by a rule that depends only
on the run seed and the tensor's name, and each rank keeps only its slice. A single-process run and any sharded run
therefore start from identical weights.

Where the values come from (an `InitRule`), in order of preference:
1. a model that was passed with real (non-meta) weights: its own values;
2. a root module with `init_parameter(name, tensor, generator)` (the zoo models have one): per tensor, with a
   generator seeded by (seed, name);
3. otherwise the model's own initialisation, per owning module, under an RNG seeded by (seed, owner name): on a
   private meta copy of the model, the owner's own tensors are given CPU memory filled with a sentinel (NaN, the
   integer minimum), then `reset_parameters()` of the owner and of each ancestor runs (owner first, as construction
   does), then, for a Hugging Face `PreTrainedModel`, its `_init_weights(module)` on the owner and each ancestor (what
   `initialize_weights` applies to every module). An ancestor's init may write into the owner's tensors (GPT-2
   scales `c_proj.weight` from its attention module); everything it touches elsewhere is on meta and costs nothing.
   Bias-free layers (None entries) and tensors owned directly by a non-leaf module or the root work the same way.
4. Fallback, for tensors no init wrote (still the sentinel, a bool buffer, or an init that raised): the model factory
   is called once on the CPU under `torch.manual_seed(seed)` and those tensors' values are taken from that build
   (an RMSNorm written as `nn.Parameter(torch.ones(d))`, a root-owned positional parameter, a rotary `inv_freq`
   buffer computed in `__init__`). It costs one whole model of host memory on every rank, which is logged as a
   warning naming the modules; without a factory (a bare meta module was passed) it is an `ExecutorError`.

Per tensor, memory is bounded by one owner's tensors at a time (plus the whole fallback build when it is used).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from executor.errors import ExecutorError
from executor.tp_rewrite import sharded_layout

log = logging.getLogger(__name__)

#: (canonical name, whole shape, dtype) -> the whole tensor on the CPU.
InitRule = Callable[[str, torch.Size, torch.dtype], torch.Tensor]
#: A function that builds the model; called on the meta device, and on the CPU for the fallback (see module docs).
ModelFactory = Callable[[], nn.Module]

#: How many module names an error or warning lists before summarising the rest as a count.
_NAMES_SHOWN = 6


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


def resolve_init_rule(model: nn.Module, seed: int, *, factory: ModelFactory | None = None) -> InitRule:
    """How whole initial values are made for `model` (see the module docstring for the order).

    `factory` is the function `model` was built with; it enables the fallback for tensors that no init writes.
    The rule never reads `model` again after this call, so `model` may be sharded in place afterwards.
    """
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
    return _ModuleInit(model, seed, factory)


def _hf_base() -> type | None:
    """Hugging Face's `PreTrainedModel` when transformers' modelling code is loaded (never imports it)."""
    module = sys.modules.get("transformers.modeling_utils")
    return getattr(module, "PreTrainedModel", None)


def _ancestry(name: str) -> list[str]:
    """A module name and its ancestors' names, innermost first: 'a.b' -> ['a.b', 'a', '']."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _sentinel(t: torch.Tensor) -> torch.Tensor | None:
    """CPU memory for `t` holding a value no init writes, or None for bool tensors (no such value)."""
    if t.dtype == torch.bool:
        return None
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return torch.full(t.shape, float("nan"), dtype=t.dtype)
    return torch.full(t.shape, torch.iinfo(t.dtype).min, dtype=t.dtype)


def _written(t: torch.Tensor) -> bool:
    """Whether an init replaced every sentinel entry of `t` (and moved it off meta, if it reassigned it)."""
    if t.device.type == "meta":
        return False
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return not bool(torch.isnan(t).any())
    return not bool((t == torch.iinfo(t.dtype).min).any())


def _describe(names: list[str], model: nn.Module) -> str:
    shown = [f"'{n}' ({type(model.get_submodule(n)).__name__})" if n else
             f"the root module ({type(model).__name__})" for n in names[:_NAMES_SHOWN]]
    more = len(names) - _NAMES_SHOWN
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _reset_method(module: nn.Module) -> Callable[[], None] | None:
    """`reset_parameters()`, or torch's private `_reset_parameters()` (MultiheadAttention, Transformer)."""
    for attr in ("reset_parameters", "_reset_parameters"):
        method = getattr(module, attr, None)
        if callable(method):
            return method
    return None


class _ModuleInit:
    """Rule 3 of the module docstring with rule 4 as its fallback."""

    def __init__(self, model: nn.Module, seed: int, factory: ModelFactory | None) -> None:
        self._seed = seed
        self._factory = factory
        # apply_plan shards `model` in place after resolving the rule: work on a copy that stays plain and on meta.
        self._model = copy.deepcopy(model)
        self._bytes = sum(t.numel() * t.element_size() for t in _tensors(self._model))
        hf = _hf_base()
        self._hf = {name: m for name, m in self._model.named_modules() if hf is not None and isinstance(m, hf)}
        self._cache: dict[str, dict[str, torch.Tensor | None]] = {}
        self._built: dict[str, torch.Tensor] | None = None
        self._reported: set[str] = set()
        no_init, flags = self._owners_needing_build()
        self._need_fallback(no_init, "no reset_parameters() on them or their parents, no Hugging Face _init_weights")
        self._need_fallback(flags, "bool buffers, which no initialisation can be seen to write")

    def _owners_needing_build(self) -> tuple[list[str], list[str]]:
        """Modules whose tensors can only come from the CPU build: those with no init, those with bool buffers."""
        no_init, flags = [], []
        for name, module in self._model.named_modules():
            own = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
            if not own:
                continue
            chain = [self._model.get_submodule(n) for n in _ancestry(name)]
            if not self._hf and all(_reset_method(m) is None for m in chain):
                no_init.append(name)
            elif any(t.dtype == torch.bool for t in own):
                flags.append(name)
        return no_init, flags

    def _need_fallback(self, owners: list[str], why: str) -> None:
        """Refuse without a factory; otherwise warn once per module that its values come from the CPU build."""
        fresh = [o for o in owners if o not in self._reported]
        if not fresh:
            return
        what = _describe(fresh, self._model)
        if self._factory is None:
            raise ExecutorError(
                f"cannot initialise the tensors of {what} on the meta device ({why}). Pass apply_plan the function "
                "that builds the model instead of a meta module (such tensors are then taken from one CPU build "
                "under the run seed), give those modules reset_parameters(), give the root module "
                "init_parameter(name, tensor, generator), or pass a model with real weights"
            )
        self._reported.update(fresh)
        log.warning(
            "the tensors of %s (%s) are taken from one build of the whole model on the CPU under "
            "torch.manual_seed(%d), which needs %.1f MiB of host memory on every rank; give those modules "
            "reset_parameters() or the model init_parameter(name, tensor, generator) to avoid it",
            what, why, self._seed, self._bytes / 2**20,
        )

    def __call__(self, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        owner, _, attr = name.rpartition(".")
        if owner not in self._cache:
            self._cache = {owner: self._init_owner(owner)}  # one owner at a time keeps memory bounded
        value = self._cache[owner].get(attr)
        if value is None:
            value = self._from_build(name)
        return value.to(dtype)

    @torch.no_grad()
    def _init_owner(self, owner_name: str) -> dict[str, torch.Tensor | None]:
        """The owner's own tensors after its and its ancestors' inits; None for those no init wrote."""
        owner = self._model.get_submodule(owner_name)
        params, buffers = dict(owner._parameters), dict(owner._buffers)
        own = [k for k, t in (*params.items(), *buffers.items()) if t is not None]  # None (no bias) stays None
        bare: set[str] = set()
        for key, t in params.items():
            if t is not None:
                owner._parameters[key] = nn.Parameter(_cpu_sentinel(t, key, bare), requires_grad=t.requires_grad)
        for key, t in buffers.items():
            if t is not None:
                owner._buffers[key] = _cpu_sentinel(t, key, bare)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(name_seed(self._seed, owner_name))
                failure = self._run_inits(owner_name)
            # Read back through the module: an init may assign a new tensor instead of writing in place.
            now = {k: owner._parameters.get(k) if k in params else owner._buffers.get(k) for k in own}
        finally:
            owner._parameters.update(params)
            owner._buffers.update(buffers)
        out = {k: t.detach() if failure is None and k not in bare and t is not None and _written(t) else None
               for k, t in now.items()}
        missing = sorted(k for k, v in out.items() if v is None)
        if failure is not None:
            self._need_fallback([owner_name], f"their initialisation raised {failure} on the CPU")
        elif missing:
            self._need_fallback([owner_name], f"their initialisation leaves {', '.join(missing)} unwritten")
        return out

    def _run_inits(self, owner_name: str) -> str | None:
        """Construction order: each module's reset_parameters(), owner first, then the Hugging Face pass."""
        chain = _ancestry(owner_name)
        try:
            for name in chain:
                reset = _reset_method(self._model.get_submodule(name))
                if reset is not None:
                    reset()
            for name in chain:
                # initialize_weights dispatches each module to the innermost PreTrainedModel that contains it.
                hf_owner = next((self._hf[a] for a in _ancestry(name) if a in self._hf), None)
                if hf_owner is not None:
                    hf_owner._init_weights(self._model.get_submodule(name))
        except Exception as exc:  # noqa: BLE001 - any failure of user init code means the same: use the fallback
            return f"{type(exc).__name__}: {exc}"
        return None

    def _from_build(self, name: str) -> torch.Tensor:
        if self._built is None:
            self._built = _build_on_cpu(self._factory, self._seed)
        if name not in self._built:
            raise ExecutorError(
                f"the model factory built a model without '{name}' on the CPU; it must build the same model every "
                "time it is called"
            )
        return self._built[name]


def _cpu_sentinel(t: torch.Tensor, key: str, bare: set[str]) -> torch.Tensor:
    value = _sentinel(t)
    if value is None:
        bare.add(key)
        value = torch.zeros(t.shape, dtype=t.dtype)
    return value


def _build_on_cpu(factory: ModelFactory, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of one CPU build of the model under `torch.manual_seed(seed)`, by name (aliases included)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("cpu"):
            model = factory()
    if is_meta(model):
        raise ExecutorError(
            "the model factory builds on the meta device itself, so tensors without an initialisation of their own "
            "cannot be taken from a CPU build; let the factory build on the default device (apply_plan puts it on "
            "meta), or give the model init_parameter(name, tensor, generator)"
        )
    return {
        k: v.detach().to("cpu")
        for k, v in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    }


def build_meta(factory: ModelFactory) -> nn.Module:
    """Call a model factory with the meta device as default, so no parameter memory is allocated."""
    with torch.device("meta"):
        return factory()


def build_initialized(model: nn.Module | ModelFactory, *, seed: int = 0, device: str | torch.device = "cpu"
                      ) -> nn.Module:
    """The whole model on `device` with the initial weights every plan starts from for `seed`.

    The single-process reference: `apply_plan` with any layout and the same seed materialises exactly these values.
    `model` is what `apply_plan` accepts: a factory, a meta module, or a module with real weights (returned moved).
    """
    factory = None
    if not isinstance(model, nn.Module):
        factory, model = model, build_meta(model)
    if not is_meta(model):
        return model.to(device)
    rule = resolve_init_rule(model, seed, factory=factory)
    materialize(model, rule, device=torch.device(device), aliases=canonical_names(model), groups=tie_groups(model))
    return model


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
        whole = sharded_layout(module, name, rule(key, t.shape, t.dtype))  # fused projections: permuted rows
        if tuple(whole.shape) != tuple(t.shape):
            raise ExecutorError(f"initial value for '{key}' has shape {tuple(whole.shape)}, expected {tuple(t.shape)}")
        if isinstance(t, DTensor):
            local_shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
            piece = whole[tuple(slice(o, o + s) for o, s in zip(offset, local_shape))]
            t.to_local().copy_(piece)
        else:
            t.copy_(whole)
    log.debug("materialised %d tensors on %s", len(seen), device)
