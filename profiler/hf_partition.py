"""Pipeline cuts between the blocks of Hugging Face transformers models, which torch.fx cannot trace.

A decoder-style transformers model has pre-block layers (embeddings), one `nn.ModuleList` of N repeated blocks and
post-block layers (final norm, head). Stage s's program is the model's OWN forward, run on a stage copy in which:

- every layer another stage owns is replaced, at the same attribute or list index (so every kept parameter keeps
  its fully qualified name), by a stand-in: a block or a post-block layer returns its hidden-state input unchanged;
  a pre-block layer returns the floating-point tensor it is given (BERT's embeddings called with `inputs_embeds`)
  or, given only ids (GPT-2's `wpe(position_ids)`), a 0-dim zero that adds nothing and promotes no dtype;
- every stage but the first calls the model with `inputs_embeds=<received activation>` instead of `input_ids`, and
  its dropout modules outside every layer (GPT-2's embedding dropout, which ran on the first stage) are identities;
- every stage returns the output's main tensor (`logits`, else `last_hidden_state`): on all but the last stage the
  head and final norm are stand-ins, so that tensor is the hidden state, the one floating tensor crossing the cut.

Legal cuts are the boundaries before blocks 1..N-1 and before the first post-block layer. Legality is proved, not
assumed: the stage programs of a reduced copy of the same config class (3 blocks, small widths when the model is
large, dropouts as configured) are run on the CPU in float32 against the full model, in train mode from one RNG
seed and in eval mode. Any difference (glue that runs again on a later stage: Gemma's embedding scale, a functional
dropout in the forward's own code) means no cuts, with the reason. So does a batch tensor later stages would
need (`attention_mask`, `position_ids`, `token_type_ids`; `labels` are the loss's targets) and a model whose blocks
are not one list.

An encoder-decoder model (`config.is_encoder_decoder`) goes to `profiler.hf_encdec` instead: T5-style models get cuts
between the blocks of each stack and between the stacks, with several tensors crossing each cut (the hidden state,
T5's relative position bias, the encoder's output, the decoder's input ids), proved the same way; any other layout
gets no cuts, with the reason.
"""

from __future__ import annotations

import copy
import inspect
import logging
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from profiler.partition import Partition, PartitionError, _Cut

logger = logging.getLogger(__name__)

#: Forward parameters that carry the token stream stage 0 receives; `labels` are the loss's targets.
_STREAM_INPUTS = ("input_ids", "inputs_embeds")
_TARGETS = ("labels",)
#: Blocks in the reduced copy the stage programs are checked on.
_CHECK_BLOCKS = 3
#: Above this many parameters in the reduced copy, its widths are made small as well.
_SMALL_PARAMS = 20_000_000
_RESULTS: dict[str, str | None] = {}


class _PassThrough(nn.Module):
    """Stands for a block or post-block layer another stage runs: returns its hidden-state input."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class _Skipped(nn.Module):
    """Stands for a pre-block layer on a later stage: the hidden state it is given, else a 0-dim zero."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        floats = [t for t in tensors if t.is_floating_point()]
        if floats:
            return floats[0]
        return torch.zeros((), device=tensors[0].device if tensors else None)


@dataclass(frozen=True)
class StageRole:
    """What a stage copy of a transformers model runs (read by its forward override)."""

    first: bool
    last: bool
    #: Non-tensor forward arguments of the example call, passed on every stage (e.g. use_cache=False).
    constants: dict[str, Any] = field(default_factory=dict)


def _main_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return output[0]


def _stage_forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Forward of a stage copy: the model's own forward, fed the batch (stage 0) or the received hidden state."""
    role: StageRole = self.autopar_stage
    forward = type(self).forward
    if role.first:
        return _main_tensor(forward(self, *args, **kwargs, **role.constants))
    (hidden,) = args
    return _main_tensor(forward(self, inputs_embeds=hidden, **role.constants))


@dataclass
class HFPartition(Partition):
    """A transformers model's legal cuts and stage programs (see the module docstring)."""

    pre: list[str] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    post: list[str] = field(default_factory=list)

    def why_illegal(self, k: int) -> str:
        """Why a stage cannot start at layer k (empty when it can)."""
        if k in self.cuts:
            return ""
        if self.trace_error is not None:
            return self.trace_error
        if not 0 < k < len(self.layer_names):
            return f"layer index {k} is not between 1 and {len(self.layer_names) - 1}"
        return self.reasons.get(k, "not a legal cut")

    def stage_modules(self, model: nn.Module, bounds: Sequence[int], stages: Sequence[int] | None = None,
                      *, copy_model: bool = True) -> list[nn.Module]:
        """Stage copies of `model` between `bounds` (inner stage starts), optionally only those in `stages`.

        Stage 0 takes the batch's tensors by the forward's own names (without `labels`); every later stage takes
        the previous stage's hidden state; every stage returns one tensor (the last: the logits). Parameter names are
        the model's own. Without `copy_model` the one requested stage is made from `model` itself.
        """
        if self.trace_error is not None:
            raise PartitionError(self.why_illegal(1))
        self.check(bounds)
        edges = [0, *bounds, len(self.layer_names)]
        wanted = list(range(len(edges) - 1) if stages is None else stages)
        if not copy_model and len(wanted) > 1:
            raise ValueError("stage_modules without copy_model builds one stage only")
        out = []
        for s in wanted:
            root = copy.deepcopy(model) if copy_model else model
            own = set(self.layer_names[edges[s]:edges[s + 1]])
            if s > 0:  # dropout in the glue before the blocks already ran on stage 0 (GPT-2's embedding dropout)
                for name in _glue_dropouts(root, self.layer_names):
                    _replace(root, name, nn.Identity())
            for name in self.layer_names:
                if name not in own:
                    _replace(root, name, _Skipped() if name in self.pre else _PassThrough())
            root.autopar_stage = StageRole(first=s == 0, last=s == len(edges) - 2, constants=dict(self.constants))
            root.forward = types.MethodType(_stage_forward, root)
            out.append(root)
        return out


def _glue_dropouts(root: nn.Module, layer_names: Sequence[str]) -> list[str]:
    """Dropout modules the forward calls outside every layer (in the glue between them)."""
    inside = tuple(f"{n}." for n in layer_names)
    return [name for name, m in root.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)
            and name not in layer_names and not name.startswith(inside)]


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _structure(model: nn.Module, names: list[str]) -> tuple[list[str], list[str], list[str]] | str:
    """(pre, blocks, post) layer names, or why the model is not one stack of blocks."""
    lists: dict[str, list[str]] = {}
    for name in names:
        parent, _, index = name.rpartition(".")
        if index.isdigit() and parent and isinstance(model.get_submodule(parent), nn.ModuleList):
            lists.setdefault(parent, []).append(name)
    cls = type(model).__name__
    if len(lists) != 1:
        found = ", ".join(lists) or "none"
        return f"{cls}'s layers hold {len(lists)} lists of blocks ({found}), not one; train it with pp=1"
    (parent, blocks), = lists.items()
    first, last = names.index(blocks[0]), names.index(blocks[-1])
    if blocks != [f"{parent}.{i}" for i in range(len(model.get_submodule(parent)))] or last - first + 1 != len(blocks):
        return f"{cls}'s blocks {parent}.N are not all layers, in order, one after another; train it with pp=1"
    return names[:first], blocks, names[last + 1:]


def bound_inputs(model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any], *,
                 skip: Sequence[str] = ()) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | str:
    """`model(*args, **kwargs)` bound to its forward: (tensor arguments by name, in the forward's order; non-tensor
    arguments that differ from the forward's defaults), leaving out `skip` and None, or why the call does not bind."""
    sig = inspect.signature(type(model).forward)
    try:
        bound = sig.bind(model, *args, **kwargs).arguments
    except TypeError as exc:
        return f"{type(model).__name__} cannot be called with the example inputs ({exc})"
    tensors, constants = {}, {}
    for name, value in bound.items():
        if name == "self" or value is None or name in skip:
            continue
        if sig.parameters[name].kind == inspect.Parameter.VAR_KEYWORD:
            continue
        if isinstance(value, torch.Tensor):
            tensors[name] = value
        elif value != sig.parameters[name].default:
            constants[name] = value
    return tensors, constants


def _inputs(model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[dict, dict] | str:
    """(tensor inputs by name, non-tensor constants), or why a later stage would need more than the hidden state."""
    split = bound_inputs(model, args, kwargs, skip=_TARGETS)
    if isinstance(split, str):
        return split
    if "inputs_embeds" not in inspect.signature(type(model).forward).parameters:
        return f"{type(model).__name__}.forward takes no inputs_embeds, through which later stages would receive"
    tensors, constants = split
    for name in tensors:
        if name not in _STREAM_INPUTS:
            return (f"the batch's '{name}' would be needed by every stage, but later pipeline stages receive "
                    f"only the hidden state; leave '{name}' out of the batch (an all-ones attention_mask "
                    "changes nothing) or train with pp=1")
    if len(tensors) != 1:
        return f"the batch gives {len(tensors)} of input_ids / inputs_embeds; give exactly one"
    return tensors, constants


def partition_hf(model: nn.Module, layer_names: Sequence[str], args: Sequence[Any] = (),
                 kwargs: Mapping[str, Any] | None = None) -> HFPartition:
    """The legal cuts of a transformers model called as `model(*args, **kwargs)` (see the module docstring)."""
    names = list(layer_names)
    part = HFPartition(layer_names=names)
    if len(names) < 2:
        return part
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        from profiler.hf_encdec import partition_encdec  # T5-style: several tensors cross each cut

        return partition_encdec(model, names, args, kwargs)
    shape = _structure(model, names)
    inputs = _inputs(model, args, kwargs or {})
    reason = shape if isinstance(shape, str) else inputs if isinstance(inputs, str) else None
    if reason is None:
        part.pre, part.blocks, part.post = shape
        tensors, part.constants = inputs
        part.inputs = list(tensors)
        reason = _verified(model, part)
    if reason is not None:
        part.trace_error = reason
        logger.info("no pipeline cuts for %s: %s", type(model).__name__, reason)
        return part
    part.graph, nodes = _chain_graph(model, names, args)
    stream = next(iter(tensors.values()))
    width = int(getattr(model.config, "hidden_size", 0) or 0)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    nbytes = stream.shape[0] * stream.shape[1] * width * dtype.itemsize if stream.dim() >= 2 else 0
    first = names.index(part.blocks[0])
    candidates = list(range(first + 1, first + len(part.blocks))) + ([first + len(part.blocks)] if part.post else [])
    for k in range(1, len(names)):
        if k in candidates:
            part.cuts[k] = _Cut(position=k, value=nodes[k - 1], nbytes=nbytes)
        else:
            part.reasons[k] = ("only the boundaries between blocks and before the final layers carry just the hidden "
                               f"state in {type(model).__name__}")
    return part


def _chain_graph(model: nn.Module, names: list[str], args: Sequence[Any]) -> tuple[fx.Graph, list[fx.Node]]:
    """The layer-level dataflow at cut granularity: each layer's output is what the next layer receives (for the
    profiler's layer graph, `profiler.graph`). Placeholders follow the forward's positional inputs."""
    graph = fx.Graph()
    params = [p for p in inspect.signature(type(model).forward).parameters if p != "self"]
    holders = [graph.placeholder(params[i] if i < len(params) else f"input_{i}") for i in range(len(args))]
    stream = next((h for h, a in zip(holders, args) if isinstance(a, torch.Tensor)), None)
    nodes = []
    previous = stream
    for name in names:
        previous = graph.call_module(name, (previous,) if previous is not None else ())
        nodes.append(previous)
    graph.output(previous)
    return graph, nodes


def _verified(model: nn.Module, part: HFPartition, check: Callable[[], str | None] | None = None,
              detail: str = "") -> str | None:
    """None when the stage programs of a reduced copy compose to its forward, else why not (memoised per config).

    `check` (default: this module's check of `part`) runs the comparison; `detail` tells its variants apart."""
    try:
        key = (f"{type(model).__qualname__}:{model.config.to_json_string(use_diff=False)}:{part.pre}:{part.post}:"
               f"{detail}")
    except (TypeError, ValueError):
        key = None
    if key is None or key not in _RESULTS:
        try:
            result = check() if check is not None else _check_reduced(model, part)
        except Exception as exc:  # noqa: BLE001 - the model raises many types; every one means "no cuts"
            text = " ".join(str(exc).split())[:200]
            result = (f"the pipeline stages of a small {type(model).__name__} could not be checked against its "
                      f"forward ({type(exc).__name__}: {text}); train it with pp=1")
        if key is None:
            return result
        _RESULTS[key] = result
    return _RESULTS[key]


def _reduced_config(model: nn.Module, blocks: int, *, small: bool) -> Any:
    config = copy.deepcopy(model.config)
    old = int(config.num_hidden_layers)
    for key, value in list(vars(config).items()):  # per-layer lists (layer_types, ...) follow the block count
        if isinstance(value, list) and len(value) == old and key != "architectures":
            setattr(config, key, value[:blocks])
    config.num_hidden_layers = blocks
    if small:
        heads = int(getattr(config, "num_attention_heads", 1) or 1)
        for key, value in (("head_dim", 8), ("hidden_size", heads * 8), ("intermediate_size", heads * 16),
                           ("n_inner", heads * 16), ("moe_intermediate_size", heads * 8), ("vocab_size", 1024)):
            if isinstance(getattr(config, key, None), int) and getattr(config, key) > value:
                setattr(config, key, value)
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if isinstance(getattr(config, key, None), int) and getattr(config, key) >= config.vocab_size:
                setattr(config, key, 0)
    return config


def _check_reduced(model: nn.Module, part: HFPartition) -> str | None:
    cls = type(model)
    blocks = min(len(part.blocks), _CHECK_BLOCKS)
    config = _reduced_config(model, blocks, small=False)
    per_block = sum(p.numel() for p in model.get_submodule(part.blocks[0]).parameters())
    rest = sum(p.numel() for p in model.parameters()) - per_block * len(part.blocks)
    small = rest + blocks * per_block > _SMALL_PARAMS
    if small:
        config = _reduced_config(model, blocks, small=True)
    with torch.device("cpu"):
        torch.manual_seed(0)
        reduced = cls(config).float()
    names = _reduced_names(part, blocks)
    checker = HFPartition(layer_names=names, pre=part.pre, post=part.post, constants=dict(part.constants),
                          inputs=list(part.inputs), blocks=[n for n in names if n not in part.pre + part.post])
    first = len(part.pre)
    bounds = list(range(first + 1, first + blocks)) + ([first + blocks] if part.post else [])
    checker.cuts = {k: _Cut(position=k, value=None, nbytes=0) for k in bounds}  # type: ignore[arg-type]
    stages = checker.stage_modules(reduced, bounds)
    positions = next((getattr(config, f) for f in ("max_position_embeddings", "n_positions")
                      if isinstance(getattr(config, f, None), int)), 8)
    vocab = int(getattr(config, "vocab_size", 2))
    ids = torch.randint(0, vocab, (2, max(2, min(8, positions))), generator=torch.Generator().manual_seed(0))
    stream = {part.inputs[0]: ids if part.inputs[0] == "input_ids" else reduced.get_input_embeddings()(ids).detach()}
    for mode in ("train", "eval"):
        for m in (reduced, *stages):
            m.train(mode == "train")
        torch.manual_seed(1)
        with torch.no_grad():
            full = _main_tensor(reduced(**stream, **part.constants))
        torch.manual_seed(1)
        with torch.no_grad():
            x = stages[0](**stream)
            for stage in stages[1:]:
                x = stage(x)
        if x.shape != full.shape or not torch.allclose(x, full, rtol=1e-6, atol=1e-6 * float(full.abs().max())):
            return _mismatch(cls.__name__, config, mode)
    return None


def _reduced_names(part: HFPartition, blocks: int) -> list[str]:
    parent = part.blocks[0].rpartition(".")[0]
    return [*part.pre, *(f"{parent}.{i}" for i in range(blocks)), *part.post]


def _mismatch(cls: str, config: Any, mode: str) -> str:
    if mode == "eval":
        return (f"stages do not reproduce {cls}'s forward: code between its layers (e.g. an embedding scale) runs "
                "again on later stages; train with pp=1")
    knobs = [f"{k}=0" for k, v in config.to_dict().items()
             if "drop" in k and ("emb" in k or "embd" in k) and isinstance(v, (int, float)) and v > 0]
    fix = f"set {' and '.join(knobs)}" if knobs else "set its probability to 0"
    return (f"stages do not reproduce {cls}'s forward: a dropout between its layers (e.g. the embedding dropout) "
            f"runs again on later stages; {fix} or train with pp=1")
