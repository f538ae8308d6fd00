"""Tensor-parallel shards for Hugging Face blocks whose config has no `base_model_tp_plan` (BERT, T5).

The plan comes from a per-class table of the transformers submodules autopar knows (`PART_PLANS`): attention
q / k / v colwise and its output projection rowwise, the MLP's input colwise and its output rowwise. Where the
submodule's forward reads a head count or width from an attribute (T5's `n_heads` builds the zero position bias of
cross-attention), the table names that attribute and the sharded copy holds its per-rank value
(`localize_attributes`); a per-head table (T5's `relative_attention_bias`, one column per head) is split by columns,
so the position bias a block hands to the next holds the rank's own heads, as every block's attention does.

Legality is proved, not assumed, as `profiler.hf_partition` proves pipeline cuts: on a reduced float64 copy of the
config, each block is run as tp=2 ranks in two threads of one process, each on its shards with the per-rank
attributes, the rowwise outputs summed across the ranks in forward and the colwise inputs' gradients summed in
backward (what DTensor's ColwiseParallel / RowwiseParallel communicate). Outputs, input gradients and parameter
gradients must equal the unsharded block's to 1e-5; otherwise the block gets no TP, with the reason. A block class
whose inputs and outputs carry per-head tensors between blocks (`HEAD_TENSORS`) is all-or-nothing per model: one
unsharded block would receive a sharded position bias.

Two more kinds of weight than `nn.Linear`:
- transformers' `Conv1D` (GPT-2: a Linear with its weight stored transposed, (in, out)), sharded the same way; the
  fused `c_attn` (q, k, v in one projection) is split per piece (`PartPlan.fused`: rank r holds [q_r, k_r, v_r]) and
  the forward's `split_size` holds the per-rank width;
- mixture-of-experts weight stacks (`EXPERT_PLANS`, Mixtral: `gate_up_proj` (experts, 2 x inter, hidden) and
  `down_proj` (experts, hidden, inter)): every expert's intermediate features are split over the ranks, as
  Megatron's expert tensor parallelism does, so each rank runs every routed token through its slice of every
  expert. The router stays whole; the experts' input and routing weights reach every rank whole (their gradients,
  partial per rank, are summed in backward) and the experts' output is summed across the ranks in forward
  (`run_experts_sharded`: the same function for the proof and the executor).
"""

from __future__ import annotations

import copy
import inspect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

#: Ranks emulated in the proof.
_PROOF_TP = 2
#: Seconds one emulated rank waits for the other at a collective before the proof gives up.
_PROOF_TIMEOUT_S = 60.0
_RESULTS: dict[str, dict[str, str | None]] = {}


@dataclass(frozen=True)
class PartPlan:
    """How autopar shards one transformers submodule class."""

    linears: dict[str, str]  # Linear (or Conv1D) path in the submodule -> 'colwise' | 'rowwise'
    per_rank: tuple[str, ...] = ()  # int attributes its forward reads, divided by the TP degree on a sharded copy
    head_tables: tuple[str, ...] = ()  # nn.Embedding with one column per head, split by columns
    # colwise projection -> the count of equal pieces its output holds, or the widths of its pieces from the module
    fused: tuple[tuple[str, int | Callable[[nn.Module], list[int]]], ...] = ()
    config_per_rank: tuple[str, ...] = ()  # int fields of `self.config` its forward reads (a per-rank config copy)


@dataclass(frozen=True)
class ExpertPlan:
    """How autopar shards one transformers class holding the weights of all experts as 3-D stacks."""

    colwise: str  # (experts, pieces x inter, hidden): the input projection(s), split along dim 1 per piece
    pieces: int  # 2 for gate and up projections concatenated along dim 1
    rowwise: str  # (experts, hidden, inter): the output projection, split along dim 2


PART_PLANS: dict[str, PartPlan] = {
    "BertSelfAttention": PartPlan({"query": "colwise", "key": "colwise", "value": "colwise"},
                                  per_rank=("num_attention_heads", "all_head_size")),
    "BertSelfOutput": PartPlan({"dense": "rowwise"}),
    "BertIntermediate": PartPlan({"dense": "colwise"}),
    "BertOutput": PartPlan({"dense": "rowwise"}),
    "T5Attention": PartPlan({"q": "colwise", "k": "colwise", "v": "colwise", "o": "rowwise"},
                            per_rank=("n_heads", "inner_dim"), head_tables=("relative_attention_bias",)),
    "T5DenseActDense": PartPlan({"wi": "colwise", "wo": "rowwise"}),
    "T5DenseGatedActDense": PartPlan({"wi_0": "colwise", "wi_1": "colwise", "wo": "rowwise"}),
    # GPT-2 self-attention (a cross-attention copy has a 2-piece c_attn and q_attn: the proof refuses it)
    "GPT2Attention": PartPlan({"c_attn": "colwise", "c_proj": "rowwise"}, fused=(("c_attn", 3),),
                              per_rank=("split_size", "num_heads", "embed_dim")),
    "GPT2MLP": PartPlan({"c_fc": "colwise", "c_proj": "rowwise"}),
    # Phi-3: q, k and v in one Linear sliced at `config.num_attention_heads * head_dim`; gate and up in one, chunked
    "Phi3Attention": PartPlan(
        {"qkv_proj": "colwise", "o_proj": "rowwise"}, per_rank=("num_key_value_heads",),
        config_per_rank=("num_attention_heads", "num_key_value_heads"),
        fused=(("qkv_proj", lambda a: [a.config.num_attention_heads * a.head_dim,
                                       a.num_key_value_heads * a.head_dim, a.num_key_value_heads * a.head_dim]),)),
    "Phi3MLP": PartPlan({"gate_up_proj": "colwise", "down_proj": "rowwise"}, fused=(("gate_up_proj", 2),)),
}
EXPERT_PLANS: dict[str, ExpertPlan] = {
    "MixtralExperts": ExpertPlan(colwise="gate_up_proj", pieces=2, rowwise="down_proj"),
}
#: The style autopar gives a module of `EXPERT_PLANS` (`planner.model_profile.ShardStyle.EXPERTS`).
EXPERTS = "experts"
#: A module kept whole on every rank, its parameter gradients summed over the group (`ShardStyle.REPLICATED`).
REPLICATED = "replicated"
#: Block class -> (forward parameters, output positions) holding one slice per attention head on dim 1.
HEAD_TENSORS: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    "T5Block": (("position_bias", "encoder_decoder_position_bias"), (1, 2)),
}


def _known(module: nn.Module, table: dict[str, Any]) -> Any:
    """The table entry of the first transformers class in `module`'s MRO that the table names (subclasses too: the
    proof catches a subclass whose forward does not run on shards)."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("transformers.") and cls.__name__ in table:
            return table[cls.__name__]
    return None


def is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D`: a Linear whose weight is stored (in, out) (GPT-2, GPT)."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers.") for c in type(module).__mro__)


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D; None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module) and module.weight.dim() == 2:
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


#: transformers' experts classes (`integrations.moe.use_experts_implementation`, which sets these flags) with Mixtral's
#: layout take Mixtral's plan: Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 and others. The proof checks each model.
_EXPERTS_LAYOUT = {"has_gate": True, "is_concatenated": True, "is_transposed": False, "has_bias": False,
                   "has_post_expert_norm": False}


def expert_plan(module: nn.Module) -> ExpertPlan | None:
    """How autopar shards `module`'s expert weight stacks (`EXPERT_PLANS` by class, else any transformers experts
    class laid out as Mixtral's), or None when it is not such a module."""
    plan = _known(module, EXPERT_PLANS)
    if plan is None and type(module).__module__.startswith("transformers.") and all(
            getattr(module, flag, None) is value for flag, value in _EXPERTS_LAYOUT.items()):
        plan = EXPERT_PLANS["MixtralExperts"]
    if plan is None or not getattr(module, "is_concatenated", True) or getattr(module, "is_transposed", False):
        return None
    up, down = getattr(module, plan.colwise, None), getattr(module, plan.rowwise, None)
    if not isinstance(up, nn.Parameter) or not isinstance(down, nn.Parameter) or up.dim() != 3 or down.dim() != 3:
        return None
    if up.shape[1] != plan.pieces * down.shape[2] or up.shape[2] != down.shape[1]:
        return None
    return plan


def derived_plan(layer: nn.Module) -> tuple[dict[str, str], int]:
    """{path in the layer: style} from `PART_PLANS` (Linears and Conv1Ds) and `EXPERT_PLANS` (experts modules,
    style `EXPERTS`), and the parameter count of its per-head tables."""
    styles: dict[str, str] = {}
    head_params = 0
    for path, sub in layer.named_modules():
        prefix = f"{path}." if path else ""
        if expert_plan(sub) is not None:
            styles[path] = EXPERTS
            continue
        plan = _known(sub, PART_PLANS)
        if plan is None:
            continue
        for rel, style in plan.linears.items():
            child = getattr(sub, rel, None)
            if isinstance(child, nn.Module) and linear_features(child) is not None:
                styles[prefix + rel] = style
        head_params += sum(getattr(sub, t).weight.numel() for t in plan.head_tables
                           if isinstance(getattr(sub, t, None), nn.Embedding))
    if not {"rowwise", EXPERTS} & set(styles.values()):
        return {}, 0
    return styles, head_params


def fused_segments(layer: nn.Module) -> dict[str, list[int]]:
    """{colwise path in the layer: widths of its pieces} for the fused projections `PART_PLANS` names; an experts
    module's input stack counts too (its dim 1 holds `ExpertPlan.pieces` equal pieces)."""
    out: dict[str, list[int]] = {}
    for path, sub in layer.named_modules():
        prefix = f"{path}." if path else ""
        experts = expert_plan(sub)
        if experts is not None:
            width = getattr(sub, experts.colwise).shape[1]
            out[path] = [width // experts.pieces] * experts.pieces
            continue
        plan = _known(sub, PART_PLANS)
        for rel, pieces in plan.fused if plan else ():
            features = linear_features(getattr(sub, rel, None)) if isinstance(getattr(sub, rel, None), nn.Module) \
                else None
            if features is None:
                continue
            widths = [features[1] // pieces] * pieces if isinstance(pieces, int) else [int(w) for w in pieces(sub)]
            if sum(widths) == features[1]:
                out[prefix + rel] = widths
    return out


def piece_order(segments: list[int], tp: int) -> torch.Tensor:
    """Index i of the permuted output dimension is index `order[i]` of the user's: rank r's slice is the r-th chunk
    of each piece, in piece order ([q_r, k_r, v_r])."""
    starts = [sum(segments[:i]) for i in range(len(segments))]
    return torch.cat([torch.arange(start + r * width // tp, start + (r + 1) * width // tp)
                      for r in range(tp) for start, width in zip(starts, segments)])


def run_experts_sharded(
    forward: Callable[..., torch.Tensor], module: nn.Module, args: tuple, kwargs: dict[str, Any], *,
    enter: Callable[[torch.Tensor], torch.Tensor], leave: Callable[[torch.Tensor], torch.Tensor],
    local: Callable[[nn.Parameter], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run an experts module's own `forward` on this rank's slices of its weight stacks.

    `enter` is applied to its floating-point inputs (the tokens and the routing weights: whole on every rank; their
    gradients, partial sums per rank, are added across the ranks in backward), `leave` to its output (each rank's
    partial sum over its intermediate features, added across the ranks in forward). `local` maps a weight stack to
    the tensor the forward computes with (the executor: a DTensor's local shard, `to_local()`, differentiable); the
    forward then reads those through the instance dictionary, which attribute lookup consults before the module's
    parameters, for the duration of the call only.
    """
    args = tuple(enter(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    kwargs = {k: enter(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    plan = expert_plan(module)
    names = (plan.colwise, plan.rowwise) if local is not None else ()
    shadow = vars(module)
    try:
        for n in names:
            shadow[n] = local(module._parameters[n])
        out = forward(*args, **kwargs)
    finally:
        for n in names:
            shadow.pop(n, None)
    return leave(out)


def localize_attributes(layer: nn.Module, degree: int) -> list[str]:
    """Divide the per-rank attributes `PART_PLANS` names on `layer`'s submodules by `degree`; the changed paths.
    Raises ValueError when the degree does not divide one of them."""
    changed = []
    for path, sub in layer.named_modules():
        plan = _known(sub, PART_PLANS)
        if plan and plan.config_per_rank and getattr(sub, "config", None) is not None:
            sub.config = copy.copy(sub.config)  # the model's config is shared by every module: this one's own copy
        targets = [(sub, attr, attr) for attr in plan.per_rank] if plan else []
        targets += [(sub.config, attr, f"config.{attr}") for attr in plan.config_per_rank] if plan else []
        for owner, attr, label in targets:
            value = getattr(owner, attr, None)
            if not isinstance(value, int):
                continue
            if value % degree:
                raise ValueError(f"'{path}.{label}' is {value}, not divisible by tp={degree}")
            setattr(owner, attr, value // degree)
            changed.append(f"{path}.{label}" if path else label)
    return changed


def head_tables(layer: nn.Module) -> list[str]:
    """Paths in `layer` of the per-head tables (`PartPlan.head_tables`) it holds."""
    out = []
    for path, sub in layer.named_modules():
        plan = _known(sub, PART_PLANS)
        for t in plan.head_tables if plan else ():
            if isinstance(getattr(sub, t, None), nn.Embedding):
                out.append(f"{path}.{t}" if path else t)
    return out


# --- the proof: tp=2 emulated in two threads -------------------------------------------------------------------


class _Group:
    """Sum-all-reduce between emulated ranks (threads), summing in rank order so every rank gets the same bits."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=_PROOF_TIMEOUT_S)
        self.slots: list[torch.Tensor | None] = [None] * size

    def all_reduce(self, rank: int, t: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = t.detach()
        self.barrier.wait()
        out = torch.stack([s for s in self.slots if s is not None]).sum(0)
        self.barrier.wait()
        return out


class _SumForward(torch.autograd.Function):
    """Rowwise output: partial sums added across ranks; the gradient reaches each partial unchanged."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: _Group, rank: int) -> torch.Tensor:
        return group.all_reduce(rank, x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return grad, None, None


class _SumBackward(torch.autograd.Function):
    """Colwise input: replicated in forward; its gradient (partial per rank) added across ranks in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: _Group, rank: int) -> torch.Tensor:
        ctx.group, ctx.rank = group, rank
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return ctx.group.all_reduce(ctx.rank, grad.contiguous()), None, None


class _ShardedLinear(nn.Linear):
    """One rank's shard of a Linear (or Conv1D), with the collectives of its style; a fused colwise projection's
    output features permuted first (`piece_order`)."""

    def __init__(self, full: nn.Module, style: str, group: _Group, rank: int, order: torch.Tensor | None) -> None:
        weight = full.weight.detach().t() if is_conv1d(full) else full.weight.detach()  # (out, in)
        bias = None if full.bias is None else full.bias.detach()
        if order is not None:
            weight = weight.index_select(0, order)
            bias = None if bias is None else bias.index_select(0, order)
        weight = weight.chunk(group.size, 0 if style == "colwise" else 1)[rank].clone()
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None,
                         dtype=weight.dtype, device=weight.device)
        self.style, self.group, self.rank = style, group, rank
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias.chunk(group.size)[rank] if style == "colwise" else bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "colwise":
            return F.linear(_SumBackward.apply(x, self.group, self.rank), self.weight, self.bias)
        out = _SumForward.apply(F.linear(x, self.weight), self.group, self.rank)
        return out if self.bias is None else out + self.bias


def _flatten(out: Any) -> list[Any]:
    if isinstance(out, torch.Tensor) or out is None:
        return [out]
    if isinstance(out, dict):
        return [v for item in out.values() for v in _flatten(item)]
    if isinstance(out, (tuple, list)):
        return [v for item in out for v in _flatten(item)]
    return [None]


def _close(a: torch.Tensor | None, b: torch.Tensor | None, tol: float = 1e-5) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape:
        return False
    if not b.numel():
        return True
    a, b = a.detach(), b.detach()
    return bool((a - b).abs().max() <= tol * max(1.0, float(b.abs().max())))


def _rank_copy(layer: nn.Module, styles: dict[str, str], group: _Group, rank: int) -> nn.Module:
    shard = copy.deepcopy(layer)
    segments = fused_segments(layer)
    for path, style in styles.items():
        order = piece_order(segments[path], group.size) if path in segments else None
        if style == REPLICATED:  # whole on every rank: its gradients are summed when checked
            continue
        if style == EXPERTS:
            _shard_experts(shard.get_submodule(path), group, rank, order)
            continue
        parent, _, leaf = path.rpartition(".")
        owner = shard.get_submodule(parent) if parent else shard
        setattr(owner, leaf, _ShardedLinear(layer.get_submodule(path), style, group, rank, order))
    for path in head_tables(shard):
        table = shard.get_submodule(path)
        table.weight = nn.Parameter(table.weight.detach().chunk(group.size, 1)[rank].clone())
    localize_attributes(shard, group.size)
    return shard


def _shard_experts(experts: nn.Module, group: _Group, rank: int, order: torch.Tensor | None) -> None:
    """Give an emulated rank's experts module its slices of the weight stacks and the collectives around them."""
    plan = expert_plan(experts)
    up = getattr(experts, plan.colwise).detach()
    up = up if order is None else up.index_select(1, order)
    setattr(experts, plan.colwise, nn.Parameter(up.chunk(group.size, 1)[rank].clone()))
    down = getattr(experts, plan.rowwise).detach()
    setattr(experts, plan.rowwise, nn.Parameter(down.chunk(group.size, 2)[rank].clone()))
    forward = type(experts).forward.__get__(experts)
    experts.forward = lambda *a, **k: run_experts_sharded(
        forward, experts, a, k, enter=lambda t: _SumBackward.apply(t, group, rank),
        leave=lambda t: _SumForward.apply(t, group, rank))


def unpermute(t: torch.Tensor, order: torch.Tensor | None, dim: int) -> torch.Tensor:
    """`t` held in `piece_order` along `dim`, back in the user's order (unchanged when `order` is None)."""
    if order is None:
        return t
    return torch.empty_like(t).index_copy_(dim, order.to(t.device), t)


def _whole_grad(module: nn.Module | None, leaf: str, style: str | None, grads: list[torch.Tensor],
                order: torch.Tensor | None, experts: ExpertPlan | None) -> torch.Tensor | None:
    """The ranks' gradients of one sharded parameter put back into the unsharded parameter's layout (None: the
    parameter is not sharded)."""
    if style == REPLICATED:  # partial on each rank (its own heads): the sum is the whole gradient
        return torch.stack(grads).sum(0)
    if style == EXPERTS and experts is not None:
        if leaf == experts.colwise:
            return unpermute(torch.cat(grads, 1), order, 1)
        return torch.cat(grads, 2) if leaf == experts.rowwise else None
    if style == "colwise":
        got = unpermute(torch.cat(grads, 0), order, 0)
    elif style == "rowwise" and leaf == "weight":
        got = torch.cat(grads, 1)
    else:
        return None
    return got.t() if leaf == "weight" and module is not None and is_conv1d(module) else got


def _leaf(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().clone().requires_grad_(True)
    return value


def prove_block(layer: nn.Module, args: tuple, kwargs: dict[str, Any], tp: int = _PROOF_TP,
                base: dict[str, str] | None = None) -> str | None:
    """Run `layer` (float64, eval) as `tp` emulated ranks against itself unsharded, sharded by `base` (the config's
    runnable plan for it, if any) and autopar's own plan; None when outputs and gradients agree to 1e-5, else why
    not."""
    styles = {**(base or {}), **derived_plan(layer)[0]}
    if not styles:
        return "no attention or MLP autopar knows how to shard"
    head_inputs, head_outputs = _known(layer, HEAD_TENSORS) or ((), ())
    bound = inspect.signature(layer.forward).bind(*args, **kwargs)
    call = dict(bound.arguments)
    full = copy.deepcopy(layer)
    inputs = {k: _leaf(v) for k, v in call.items()}
    ref = _flatten(full(**inputs))
    gen = torch.Generator().manual_seed(0)
    weights = [None if o is None else torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in ref]
    sum(((o * w).sum() for o, w in zip(ref, weights) if o is not None and o.requires_grad),
        torch.zeros((), dtype=torch.float64)).backward()

    group = _Group(tp)
    try:
        ranks = [_rank_copy(layer, styles, group, r) for r in range(tp)]
    except ValueError as exc:
        return str(exc)
    rank_inputs, outs, errors = [], [None] * tp, []

    def heads(t: Any, r: int) -> Any:
        return t.chunk(tp, 1)[r] if isinstance(t, torch.Tensor) else t

    for r in range(tp):
        rank_inputs.append({k: _leaf(heads(v, r) if k in head_inputs else v) for k, v in call.items()})

    def run(r: int) -> None:
        try:
            out = _flatten(ranks[r](**rank_inputs[r]))
            outs[r] = out
            loss = torch.zeros((), dtype=torch.float64)
            for i, (o, w) in enumerate(zip(out, weights)):
                if o is not None and w is not None and o.requires_grad:
                    loss = loss + (o * (heads(w, r) if i in head_outputs else w)).sum()
            loss.backward()
        except Exception as exc:  # noqa: BLE001 - any failure of the sharded run is the reason for no TP
            errors.append(f"{type(exc).__name__}: {exc}")
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        return f"its forward fails on shards ({errors[0][:200]})"
    for i, o in enumerate(ref):
        got = torch.cat([outs[r][i] for r in range(tp)], 1) if i in head_outputs and o is not None else outs[0][i]
        if not _close(got, o):
            return f"output {i} differs when sharded"
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.requires_grad:
            if k in head_inputs:
                got = None if v.grad is None else torch.cat([rank_inputs[r][k].grad for r in range(tp)], 1)
            else:
                got = rank_inputs[0][k].grad
            if (v.grad is None) != (got is None) or (got is not None and not _close(got, v.grad)):
                return f"the gradient of '{k}' differs when sharded"
    tables = set(head_tables(layer))
    segments = fused_segments(layer)
    rank_params = [dict(m.named_parameters()) for m in ranks]
    for name, p in full.named_parameters():
        module, _, leaf = name.rpartition(".")
        style = styles.get(module)
        grads = [rp[name].grad for rp in rank_params]
        if p.grad is None or any(g is None for g in grads):
            if p.grad is None and all(g is None for g in grads):
                continue
            return f"'{name}' gets a gradient on only one side"
        owner = full.get_submodule(module) if module else full
        order = piece_order(segments[module], tp) if module in segments else None
        got = torch.cat(grads, 1) if module in tables else _whole_grad(
            owner, leaf, style, grads, order, expert_plan(owner) if style == EXPERTS else None)
        if got is None:
            got = grads[0]
            if not all(_close(g, p.grad) for g in grads):
                return f"the gradient of '{name}' differs between ranks"
        if not _close(got, p.grad):
            return f"the gradient of '{name}' differs when sharded"
    return None


def prove_model(model: nn.Module, names: list[str], based: frozenset[str] = frozenset()) -> dict[str, str | None]:
    """For each block among `names` with a derived plan (or in `based`: the config's plan for it needs the proof):
    None when its tp=2 emulation on a reduced float64 copy of the config matches the unsharded block, else the
    reason (cached per class and config)."""
    from profiler import hf

    candidates = [n for n in names if n in based or derived_plan(model.get_submodule(n))[0]]
    if not candidates:
        return {}
    key = f"{type(model).__module__}.{type(model).__qualname__}:{model.config.to_json_string()}"
    if key not in _RESULTS:
        _RESULTS[key] = _prove_reduced(model, hf)
    proved = _RESULTS[key]
    out: dict[str, str | None] = {}
    for n in candidates:
        kind = _kind(n)
        out[n] = proved.get(kind, f"no block '{kind}' in the reduced copy to prove it on")
    return out


def _kind(name: str) -> str:
    """The reduced model's block standing for `name`: the same list, index 0 or 1 (block 0 of T5 holds the bias)."""
    head, _, index = name.rpartition(".")
    return f"{head}.{min(int(index), 1)}" if index.isdigit() else name


def _prove_reduced(model: nn.Module, hf: Any) -> dict[str, str | None]:
    from profiler.hf_partition import _reduced_config

    config = _reduced_config(model, 2, small=sum(p.numel() for p in model.parameters()) > 20_000_000)
    for attr in ("num_decoder_layers",):
        if isinstance(getattr(config, attr, None), int):
            setattr(config, attr, min(getattr(config, attr), 2))
    with torch.device("cpu"):
        torch.manual_seed(0)
        reduced = type(model)(config).double().eval()
    if hf._has_grouped_experts(reduced):  # torch's _grouped_mm refuses float64; the fallback kernel is the same GEMMs
        hf._use_meta_experts(reduced)
    calls: dict[str, tuple[tuple, dict]] = {}
    blocks: dict[str, nn.Module] = {}  # the first two blocks of each outermost list of blocks
    for n, m in reduced.named_modules():
        if isinstance(m, nn.ModuleList) and not any(n.startswith(b + ".") for b in blocks):
            blocks.update({f"{n}.{i}": b for i, b in enumerate(m[:2])})
    base = {n: styles for n, styles in hf.layer_tp_plans(reduced, list(blocks)).items() if styles}
    blocks = {n: b for n, b in blocks.items() if n in base or derived_plan(b)[0]}

    def record(name: str):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.setdefault(name, (tuple(args), {k: (None if hf._is_cache(v) else v) for k, v in kwargs.items()}))
        return hook

    handles = [m.register_forward_pre_hook(record(n), with_kwargs=True) for n, m in blocks.items()]
    vocab = int(getattr(config, "vocab_size", 2))
    ids = torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    extra = {"decoder_input_ids": ids[:, :5]} if getattr(config, "is_encoder_decoder", False) else {}
    try:
        with torch.no_grad():
            reduced(input_ids=ids, use_cache=False, **extra)
    finally:
        for h in handles:
            h.remove()
    results: dict[str, str | None] = {}
    for name, block in blocks.items():
        if name not in calls:
            results[name] = "the model's forward does not call it"
            continue
        args, kwargs = calls[name]
        args = tuple(None if hf._is_cache(a) else a for a in args)
        results[name] = prove_block(block, args, kwargs, base=base.get(name))
    shared = [n for n, m in blocks.items() if _known(m, HEAD_TENSORS)]
    failed = next((results[n] for n in shared if results[n] is not None), None)
    if failed is not None:  # blocks hand per-head tensors on: all sharded or none
        for n in shared:
            results[n] = results[n] or f"another block of the model cannot be sharded ({failed})"
    for n, why in results.items():
        if why is not None:
            logger.info("%s %s: no tensor parallelism (%s)", type(model).__name__, n, why)
    return results
