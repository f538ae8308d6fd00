"""Pipeline cuts of a T5-style Hugging Face encoder-decoder (T5ForConditionalGeneration, MT5ForConditionalGeneration).

Its layers are `encoder.embed_tokens, encoder.block.0..E-1, encoder.final_layer_norm, decoder.embed_tokens,
decoder.block.0..D-1, decoder.final_layer_norm, lm_head`. A stage may start before every block but the first of
each stack, before each stack's final norm and at the boundary between the stacks (`decoder.embed_tokens`). Stage s
is a copy of the model (other stages' layers removed in place, so parameter names stay the model's) whose forward
walks its own layers the way T5's forward and T5Stack's loop do, with the glue between them (embedding and
final-norm dropouts, the decoder output scale) on the stage of the layer it follows. The state crossing a cut is
more than one tensor, each sent by `torch.distributed.pipelining` with its gradient where it has one:

- inside the encoder: the hidden state, the relative position bias block 0 computed (it requires grad, so block 0's
  `relative_attention_bias` gets its gradient from every later block) and the decoder's input ids;
- before the encoder's final norm: the hidden state and the decoder's input ids;
- between the stacks: the encoder's output and the decoder's input ids;
- inside the decoder: the hidden state, the decoder's self-attention position bias and the encoder's output;
- before the decoder's final norm: the hidden state.

Attention masks (built from shapes only: a batch mask is refused) and the cross-attention bias (zeros without a
mask) are made again on each stage. The first stage takes `input_ids` and `decoder_input_ids`, or `labels`, which
it shifts right into the decoder's inputs as the model does (`prepare_decoder_input_ids_from_labels`); the executor
gives the first stage the labels beside the last stage's loss. The `shared` embedding tied to both embeddings and
the head stays on every stage that holds one of them (`executor.shared` sums the copies' gradients) and is left out
elsewhere.

Legality is proved as in `profiler.hf_partition`: the stages of a reduced copy of the same config class (up to 3
blocks a stack, small widths when large) composed at every cut reproduce the full model's logits in train mode from
one RNG seed and in eval mode, and their summed parameter gradients equal the full model's; any difference, or a
model that is not laid out this way, means no cuts with the reason. The profile's layer graph gives each carried
tensor one edge over the cuts it crosses, so the planner's cut bytes count all of them; the decoder's input ids, a
model input only the first stage receives, appear as an edge from the first layer (`relayed_by`).
"""

from __future__ import annotations

import copy
import inspect
import logging
import operator
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from profiler.hf_partition import HFPartition, _replace, _verified, bound_inputs
from profiler.partition import PartitionError, _Cut

logger = logging.getLogger(__name__)

#: Batch tensors the first stage may take; `labels` also serve as the loss's targets.
_STAGE0_INPUTS = ("input_ids", "decoder_input_ids", "labels")
#: What crosses a cut before a layer of each kind (kinds without an entry are not cut points).
_CARRIED = {
    "enc_block": ("hidden", "bias", "decoder_ids"),
    "enc_norm": ("hidden", "decoder_ids"),
    "dec_embed": ("encoder_out", "decoder_ids"),
    "dec_block": ("hidden", "bias", "encoder_out"),
    "dec_norm": ("hidden",),
}
_CHECK_BLOCKS = 3
_SMALL_PARAMS = 20_000_000


class _Absent(nn.Module):
    """Stands where a layer of another stage was (never called: the stage program skips it)."""

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a layer of another pipeline stage was called")


@dataclass(frozen=True)
class EncDecRole:
    """What a stage copy runs (read by its forward override)."""

    steps: tuple[tuple[str, str], ...]  # (kind, layer name) of this stage's layers, in order
    receives: tuple[str, ...]  # state names of the positional inputs (empty on the first stage)
    sends: tuple[str, ...]  # state names of the outputs (empty on the last stage, which returns the logits)


@dataclass
class EncDecPartition(HFPartition):
    """A T5-style encoder-decoder's legal cuts and stage programs (see the module docstring)."""

    #: Kind of each layer: enc_embed, enc_block, enc_norm, dec_embed, dec_block, dec_norm or head.
    kinds: list[str] = field(default_factory=list)

    def carried(self, k: int) -> tuple[str, ...]:
        """Names of the state a cut before layer k sends (in the order the next stage receives them)."""
        return _CARRIED[self.kinds[k]]

    def stage_modules(self, model: nn.Module, bounds: Sequence[int], stages: Sequence[int] | None = None,
                      *, copy_model: bool = True) -> list[nn.Module]:
        """Stage copies of `model` between `bounds` (inner stage starts), optionally only those in `stages`.

        Stage 0 takes the batch's `input_ids` and `decoder_input_ids` or `labels` by name or position, every later
        stage the previous stage's state tensors positionally; the last returns the logits.
        """
        if self.trace_error is not None:
            raise PartitionError(self.why_illegal(1))
        self.check(bounds)
        names = self.layer_names
        edges = [0, *bounds, len(names)]
        wanted = list(range(len(edges) - 1) if stages is None else stages)
        if not copy_model and len(wanted) > 1:
            raise ValueError("stage_modules without copy_model builds one stage only")
        out = []
        for s in wanted:
            lo, hi = edges[s], edges[s + 1]
            root = copy.deepcopy(model) if copy_model else model
            own = names[lo:hi]
            _drop_unused_ties(root, names, own)
            for name in names:
                if name not in own:
                    _replace(root, name, _Absent())
            root.autopar_stage = EncDecRole(
                steps=tuple((self.kinds[k], names[k]) for k in range(lo, hi)),
                receives=self.carried(lo) if lo > 0 else (), sends=self.carried(hi) if hi < len(names) else ())
            root.forward = types.MethodType(_stage_forward, root)
            out.append(root)
        return out


def _drop_unused_ties(root: nn.Module, names: Sequence[str], own: Sequence[str]) -> None:
    """Remove a module outside every layer whose only parameter is tied to layers of other stages only (T5's
    `shared`), so a stage holds no copy it never uses."""
    by_id: dict[int, list[str]] = {}
    for name, p in root.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    inside = tuple(f"{n}." for n in names)
    mine = tuple(f"{n}." for n in own)
    for aliases in by_id.values():
        outside = [a for a in aliases if not a.startswith(inside)]
        if len(outside) == len(aliases) or any(a.startswith(mine) for a in aliases):
            continue
        for alias in outside:
            holder = alias.rpartition(".")[0]
            if holder and len(list(root.get_submodule(holder).parameters())) == 1:
                _replace(root, holder, _Absent())


def _stage_forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Forward of a stage copy: its layers and their glue over the state received (or made from the batch)."""
    role: EncDecRole = self.autopar_stage
    if role.receives:
        state = dict(zip(role.receives, args, strict=True))
    else:
        bound = inspect.signature(type(self).forward).bind(self, *args, **kwargs).arguments
        ids = bound.get("decoder_input_ids")
        if ids is None:  # what the model's own forward does with labels and no decoder inputs
            ids = self.prepare_decoder_input_ids_from_labels(labels=bound["labels"])
        if "decoder_ids" in role.sends:  # a later stage clamps what it receives (see `_dec_embed`)
            vocab = self.get_submodule("encoder.embed_tokens").num_embeddings
            if bool(((ids < 0) | (ids >= vocab)).any()):
                raise ValueError(f"the decoder's input ids must lie in [0, {vocab}); the batch has others")
        state = {"input_ids": bound["input_ids"], "decoder_ids": ids}
    for kind, name in role.steps:
        _STEPS[kind](self, self.get_submodule(name), state)
    if not role.sends:
        return state["logits"]
    return tuple(state[k].contiguous() for k in role.sends)  # gloo sends contiguous tensors only (T5's bias is not)


def _enc_embed(model: nn.Module, layer: nn.Module, st: dict) -> None:
    st["hidden"] = model.encoder.dropout(layer(st.pop("input_ids")))


def _enc_block(model: nn.Module, layer: nn.Module, st: dict) -> None:
    from transformers.masking_utils import create_bidirectional_mask

    if "enc_mask" not in st:
        st["enc_mask"] = create_bidirectional_mask(config=model.encoder.config, inputs_embeds=st["hidden"],
                                                   attention_mask=None)
    st["hidden"], st["bias"], _ = layer(st["hidden"], st["enc_mask"], st.get("bias"), None, None, None)


def _enc_norm(model: nn.Module, layer: nn.Module, st: dict) -> None:
    st["encoder_out"] = model.encoder.dropout(layer(st["hidden"]))
    for key in ("hidden", "bias", "enc_mask"):
        st.pop(key, None)


def _dec_embed(model: nn.Module, layer: nn.Module, st: dict) -> None:
    # torch.distributed.pipelining infers a stage's outputs by running it once on uninitialised inputs: received ids
    # are clamped into the vocabulary so that run cannot index out of range (the first stage checked the real ones).
    st["hidden"] = model.decoder.dropout(layer(st.pop("decoder_ids").clamp(0, layer.num_embeddings - 1)))


def _dec_block(model: nn.Module, layer: nn.Module, st: dict) -> None:
    from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

    if "dec_masks" not in st:
        config, hidden = model.decoder.config, st["hidden"]
        st["dec_masks"] = (
            create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=None, cache=None),
            create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=None,
                                      encoder_hidden_states=st["encoder_out"]),
        )
    causal, cross = st["dec_masks"]
    st["hidden"], st["bias"], st["cross_bias"] = layer(st["hidden"], causal, st.get("bias"), st["encoder_out"],
                                                       cross, st.get("cross_bias"))


def _dec_norm(model: nn.Module, layer: nn.Module, st: dict) -> None:
    out = model.decoder.dropout(layer(st["hidden"]))
    if getattr(model.config, "scale_decoder_outputs", False):
        out = out * (model.model_dim ** -0.5)
    st.clear()
    st["hidden"] = out


def _head(model: nn.Module, layer: nn.Module, st: dict) -> None:
    st["logits"] = layer(st.pop("hidden"))


_STEPS = {"enc_embed": _enc_embed, "enc_block": _enc_block, "enc_norm": _enc_norm, "dec_embed": _dec_embed,
          "dec_block": _dec_block, "dec_norm": _dec_norm, "head": _head}


def _expected_names(encoder_blocks: int, decoder_blocks: int) -> list[tuple[str, str]]:
    return [("enc_embed", "encoder.embed_tokens"), *(("enc_block", f"encoder.block.{i}") for i in range(encoder_blocks)),
            ("enc_norm", "encoder.final_layer_norm"), ("dec_embed", "decoder.embed_tokens"),
            *(("dec_block", f"decoder.block.{j}") for j in range(decoder_blocks)),
            ("dec_norm", "decoder.final_layer_norm"), ("head", "lm_head")]


def _layout(model: nn.Module, names: list[str]) -> list[str] | str:
    """Each layer's kind, or why the model is not laid out as T5 is."""
    cls = type(model).__name__
    stacks = [getattr(getattr(model, s, None), "block", None) for s in ("encoder", "decoder")]
    if not all(isinstance(b, nn.ModuleList) for b in stacks) or not hasattr(model, "prepare_decoder_input_ids_from_labels"):
        return (f"{cls} is an encoder-decoder model not laid out as T5 (encoder.block / decoder.block); pipeline "
                "cuts are supported for T5-style models only, train it with pp=1")
    expected = _expected_names(len(stacks[0]), len(stacks[1]))
    if names != [n for _, n in expected]:
        return (f"{cls}'s layers are not T5's (encoder.embed_tokens, encoder.block.N, encoder.final_layer_norm, "
                "decoder.embed_tokens, decoder.block.N, decoder.final_layer_norm, lm_head); train it with pp=1")
    return [k for k, _ in expected]


def _inputs(model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[dict, dict] | str:
    """(batch tensors by name, non-tensor constants), or why the stages could not be fed this batch."""
    split = bound_inputs(model, args, kwargs)
    if isinstance(split, str):
        return split
    tensors, constants = split
    for name in tensors:
        if name not in _STAGE0_INPUTS:
            return (f"the batch's '{name}' would be needed by later pipeline stages, which receive only the "
                    f"hidden states; leave '{name}' out of the batch (an all-ones mask changes nothing) or "
                    "train with pp=1")
    if "input_ids" not in tensors or not {"decoder_input_ids", "labels"} & set(tensors):
        return ("the batch must give input_ids and labels (or decoder_input_ids) for the pipeline stages of an "
                "encoder-decoder model; add them or train with pp=1")
    return tensors, constants


def partition_encdec(model: nn.Module, layer_names: Sequence[str], args: Sequence[Any] = (),
                     kwargs: Mapping[str, Any] | None = None) -> EncDecPartition:
    """The legal cuts of a T5-style model called as `model(*args, **kwargs)` (see the module docstring)."""
    names = list(layer_names)
    part = EncDecPartition(layer_names=names)
    kinds = _layout(model, names)
    inputs = _inputs(model, args, kwargs or {})
    reason = kinds if isinstance(kinds, str) else inputs if isinstance(inputs, str) else None
    if reason is None:
        part.kinds = kinds
        tensors, part.constants = inputs
        part.inputs = [n for n in tensors if n != "labels"]
        stream = "decoder_input_ids" if "decoder_input_ids" in tensors else "labels"
        reason = _verified(model, part, lambda: _check_reduced(model, part, stream), f"encdec:{stream}")
    if reason is not None:
        part.trace_error = reason
        logger.info("no pipeline cuts for %s: %s", type(model).__name__, reason)
        return part
    part.graph, nodes = _layer_graph(model, names, kinds, args)
    legal = _candidates(kinds)
    for k in range(1, len(names)):
        if k in legal:
            part.cuts[k] = _Cut(position=k, value=nodes[k - 1], nbytes=_state_bytes(model, tensors, kinds[k]))
        else:
            part.reasons[k] = (f"{type(model).__name__} may be cut only before a block other than the first of a "
                               "stack, before a stack's final norm and between the stacks")
    return part


def _candidates(kinds: Sequence[str]) -> list[int]:
    """Layer indices a stage may start at: a kind with carried state, but not a stack's first block (right after
    its embedding)."""
    return [k for k in range(1, len(kinds)) if kinds[k] in _CARRIED and not kinds[k - 1].endswith("embed")]


def _state_bytes(model: nn.Module, tensors: Mapping[str, torch.Tensor], kind: str) -> int:
    """Bytes a cut before a layer of `kind` sends at the traced batch (position biases are [1, heads, T, T])."""
    ids = tensors["input_ids"]
    dec = tensors.get("decoder_input_ids", tensors.get("labels"))
    batch, length = ids.shape[0], ids.shape[-1] if kind.startswith("enc") else dec.shape[-1]
    item = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32).itemsize
    width, heads = int(model.config.d_model), int(model.config.num_heads)
    sizes = {"hidden": batch * length * width * item, "bias": heads * length * length * item,
             "encoder_out": batch * ids.shape[-1] * width * item, "decoder_ids": dec.numel() * dec.element_size()}
    return sum(sizes[name] for name in _CARRIED[kind])


def _layer_graph(model: nn.Module, names: list[str], kinds: list[str], args: Sequence[Any]) -> tuple[fx.Graph, list]:
    """The layer-level dataflow for `profiler.graph`: each carried tensor is one edge over the cuts it crosses (the
    position bias and hidden state from block to block, the encoder's output into the last decoder block, the
    decoder's ids from the first layer, which relays them), so the planner's cut bytes count each once."""
    graph = fx.Graph()
    params = [p for p in inspect.signature(type(model).forward).parameters if p != "self"]
    holders = {}
    for i in range(len(args)):
        name = params[i] if i < len(params) else f"input_{i}"
        holders[name] = graph.placeholder(name)
    ids = holders.get("decoder_input_ids", holders.get("labels"))
    if ids is not None:
        ids.meta["relayed_by"] = names[0]
    nodes: list[fx.Node] = []
    hidden = bias = encoder_out = None
    last_block = max(i for i, k in enumerate(kinds) if k == "dec_block")
    for i, (name, kind) in enumerate(zip(names, kinds)):
        if kind == "enc_embed":
            node = graph.call_module(name, tuple(n for n in [holders.get("input_ids")] if n is not None))
            hidden = node
        elif kind == "dec_embed":
            node = graph.call_module(name, tuple(n for n in [ids] if n is not None))
            hidden, bias = node, None
        elif kind in ("enc_block", "dec_block"):
            extra = (encoder_out,) if i == last_block else ()
            node = graph.call_module(name, tuple(n for n in (hidden, bias) if n is not None) + extra)
            hidden, bias = (graph.call_function(operator.getitem, (node, j)) for j in (0, 1))
        else:
            node = graph.call_module(name, (hidden,))
            hidden = node
            if kind == "enc_norm":
                encoder_out, bias = node, None
        nodes.append(node)
    graph.output(hidden)
    return graph, nodes


def _reduced_config(model: nn.Module) -> Any:
    config = copy.deepcopy(model.config)
    config.num_layers = min(int(config.num_layers), _CHECK_BLOCKS)
    config.num_decoder_layers = min(int(config.num_decoder_layers), _CHECK_BLOCKS)
    blocks = len(model.encoder.block) + len(model.decoder.block)
    per_block = sum(p.numel() for p in model.parameters()) / max(blocks, 1)
    if per_block * (config.num_layers + config.num_decoder_layers + 2) > _SMALL_PARAMS:
        heads = int(config.num_heads)
        for key, value in (("d_model", heads * 8), ("d_kv", 8), ("d_ff", heads * 16), ("vocab_size", 1024)):
            setattr(config, key, min(int(getattr(config, key)), value))
        for key in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            if isinstance(getattr(config, key, None), int) and getattr(config, key) >= config.vocab_size:
                setattr(config, key, 0)
    return config


def _check_reduced(model: nn.Module, part: EncDecPartition, stream: str) -> str | None:
    cls = type(model)
    config = _reduced_config(model)
    with torch.device("cpu"):
        torch.manual_seed(0)
        reduced = cls(config).float()
    expected = _expected_names(len(reduced.encoder.block), len(reduced.decoder.block))
    checker = EncDecPartition(layer_names=[n for _, n in expected], kinds=[k for k, _ in expected])
    bounds = _candidates(checker.kinds)
    checker.cuts = {k: _Cut(position=k, value=None, nbytes=0) for k in bounds}  # type: ignore[arg-type]
    stages = checker.stage_modules(reduced, bounds)
    gen = torch.Generator().manual_seed(0)
    vocab = int(config.vocab_size)
    # Different encoder and decoder lengths, so a tensor of the wrong stack cannot pass for the right one.
    batch = {"input_ids": torch.randint(1, vocab, (2, 8), generator=gen),
             stream: torch.randint(1, vocab, (2, 6), generator=gen)}
    weights = torch.randn(2, 6, vocab, generator=gen)
    for mode in ("train", "eval"):
        for m in (reduced, *stages):
            m.train(mode == "train")
            m.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(mode == "eval"):  # gradients are compared once, without dropout
            torch.manual_seed(1)
            full = reduced(**batch, **part.constants).logits
            torch.manual_seed(1)
            x = stages[0](**batch)
            for stage in stages[1:]:
                x = stage(*x)
        if x.shape != full.shape or not torch.allclose(x, full, rtol=1e-6, atol=1e-6 * float(full.detach().abs().max())):
            return (f"stages do not reproduce {cls.__name__}'s forward in {mode} mode (code between its layers "
                    "differs from T5's); train with pp=1")
        if mode == "eval":
            (full * weights).sum().backward()
            (x * weights).sum().backward()
            if (mismatch := _grad_mismatch(reduced, stages)) is not None:
                return (f"the pipeline stages of {cls.__name__} do not give its parameter gradients ({mismatch}); "
                        "train with pp=1")
    return None


def _grad_mismatch(full: nn.Module, stages: Sequence[nn.Module]) -> str | None:
    """The first parameter whose gradient, summed over the stage copies, differs from the full model's."""
    summed: dict[str, torch.Tensor] = {}
    for stage in stages:
        for name, p in stage.named_parameters():
            if p.grad is not None:
                summed[name] = summed[name] + p.grad if name in summed else p.grad
    for name, p in full.named_parameters():
        want, got = p.grad, summed.get(name)
        if want is None and got is None:
            continue
        if want is None or got is None or not torch.allclose(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max())):
            return name
    return None
