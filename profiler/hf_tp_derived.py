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
"""

from __future__ import annotations

import copy
import inspect
import logging
import threading
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

    linears: dict[str, str]  # Linear path in the submodule -> 'colwise' | 'rowwise'
    per_rank: tuple[str, ...] = ()  # int attributes its forward reads, divided by the TP degree on a sharded copy
    head_tables: tuple[str, ...] = ()  # nn.Embedding with one column per head, split by columns


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
}
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


def derived_plan(layer: nn.Module) -> tuple[dict[str, str], int]:
    """{Linear path in the layer: style} from `PART_PLANS`, and the parameter count of its per-head tables."""
    styles: dict[str, str] = {}
    head_params = 0
    for path, sub in layer.named_modules():
        plan = _known(sub, PART_PLANS)
        if plan is None:
            continue
        prefix = f"{path}." if path else ""
        for rel, style in plan.linears.items():
            if isinstance(getattr(sub, rel, None), nn.Linear):
                styles[prefix + rel] = style
        head_params += sum(getattr(sub, t).weight.numel() for t in plan.head_tables
                           if isinstance(getattr(sub, t, None), nn.Embedding))
    if "rowwise" not in styles.values():
        return {}, 0
    return styles, head_params


def localize_attributes(layer: nn.Module, degree: int) -> list[str]:
    """Divide the per-rank attributes `PART_PLANS` names on `layer`'s submodules by `degree`; the changed paths.
    Raises ValueError when the degree does not divide one of them."""
    changed = []
    for path, sub in layer.named_modules():
        plan = _known(sub, PART_PLANS)
        for attr in plan.per_rank if plan else ():
            value = getattr(sub, attr, None)
            if not isinstance(value, int):
                continue
            if value % degree:
                raise ValueError(f"'{path}.{attr}' is {value}, not divisible by tp={degree}")
            setattr(sub, attr, value // degree)
            changed.append(f"{path}.{attr}" if path else attr)
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
    """One rank's shard of a Linear, with the collectives of its style."""

    def __init__(self, full: nn.Linear, style: str, group: _Group, rank: int) -> None:
        dim = 0 if style == "colwise" else 1
        weight = full.weight.detach().chunk(group.size, dim)[rank].clone()
        super().__init__(weight.shape[1], weight.shape[0], bias=full.bias is not None,
                         dtype=weight.dtype, device=weight.device)
        self.style, self.group, self.rank = style, group, rank
        with torch.no_grad():
            self.weight.copy_(weight)
            if full.bias is not None:
                b = full.bias.detach()
                self.bias.copy_(b.chunk(group.size)[rank] if style == "colwise" else b)

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
    for path, style in styles.items():
        parent, _, leaf = path.rpartition(".")
        owner = shard.get_submodule(parent) if parent else shard
        setattr(owner, leaf, _ShardedLinear(layer.get_submodule(path), style, group, rank))
    for path in head_tables(shard):
        table = shard.get_submodule(path)
        table.weight = nn.Parameter(table.weight.detach().chunk(group.size, 1)[rank].clone())
    localize_attributes(shard, group.size)
    return shard


def _leaf(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().clone().requires_grad_(True)
    return value


def prove_block(layer: nn.Module, args: tuple, kwargs: dict[str, Any], tp: int = _PROOF_TP) -> str | None:
    """Run `layer` (float64, eval) as `tp` emulated ranks against itself unsharded; None when outputs and gradients
    agree to 1e-5, else why not."""
    styles, _ = derived_plan(layer)
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
    rank_params = [dict(m.named_parameters()) for m in ranks]
    for name, p in full.named_parameters():
        module, _, leaf = name.rpartition(".")
        style = styles.get(module)
        grads = [rp[name].grad for rp in rank_params]
        if p.grad is None or any(g is None for g in grads):
            if p.grad is None and all(g is None for g in grads):
                continue
            return f"'{name}' gets a gradient on only one side"
        if module in tables:
            got = torch.cat(grads, 1)
        elif style == "colwise":
            got = torch.cat(grads, 0)
        elif style == "rowwise" and leaf == "weight":
            got = torch.cat(grads, 1)
        else:
            got = grads[0]
            if not all(_close(g, p.grad) for g in grads):
                return f"the gradient of '{name}' differs between ranks"
        if not _close(got, p.grad):
            return f"the gradient of '{name}' differs when sharded"
    return None


def prove_model(model: nn.Module, names: list[str]) -> dict[str, str | None]:
    """For each block among `names` with a derived plan: None when its tp=2 emulation on a reduced float64 copy of
    the config matches the unsharded block, else the reason (cached per class and config)."""
    from profiler import hf

    candidates = [n for n in names if derived_plan(model.get_submodule(n))[0]]
    if not candidates:
        return {}
    key = f"{type(model).__module__}.{type(model).__qualname__}:{model.config.to_json_string()}"
    if key not in _RESULTS:
        _RESULTS[key] = _prove_reduced(model, hf)
    proved = _RESULTS[key]
    out = {}
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
    calls: dict[str, tuple[tuple, dict]] = {}
    blocks: dict[str, nn.Module] = {}  # the first two blocks of each outermost list of blocks
    for n, m in reduced.named_modules():
        if isinstance(m, nn.ModuleList) and not any(n.startswith(b + ".") for b in blocks):
            blocks.update({f"{n}.{i}": b for i, b in enumerate(m[:2]) if derived_plan(b)[0]})

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
        results[name] = prove_block(block, args, kwargs)
    shared = [n for n, m in blocks.items() if _known(m, HEAD_TENSORS)]
    failed = next((results[n] for n in shared if results[n] is not None), None)
    if failed is not None:  # blocks hand per-head tensors on: all sharded or none
        for n in shared:
            results[n] = results[n] or f"another block of the model cannot be sharded ({failed})"
    for n, why in results.items():
        if why is not None:
            logger.info("%s %s: no tensor parallelism (%s)", type(model).__name__, n, why)
    return results
