"""Hugging Face transformers models as the profiler sees them: layers, tensor parallelism, MoE and inputs.

torch.fx cannot trace transformers 5 models, so what the profiler learns from a trace elsewhere comes from the
model's own declarations here:

- Layers: every `nn.ModuleList` of identical blocks the forward calls (`model.layers.N`, `transformer.h.N`,
  `bert.encoder.layer.N`, T5's `encoder.block.N` and `decoder.block.N`), each block one layer, plus the modules
  called around them (embeddings, final norm, head). Helpers without parameters (`rotary_emb`, an embedding
  dropout) are not layers: their work runs in the glue between layers, and the blocks receive what they compute.
- Tensor parallelism: the config's `base_model_tp_plan` (module-path patterns, `*` for the block index). The
  Megatron styles `colwise` / `rowwise` become the layer's `autopar_tp_plan` (see `profiler.tensor_parallel`),
  with the divisor the KV heads (or heads). Any other style in a layer (`packed_colwise`, `moe_tp_experts`,
  `replicated_with_grad_allreduce`, ...) means no TP for that layer, logged: half a plan would train a different
  function or be costed as sharded when it is not. Blocks the config's plan does not cover (BERT, T5) get autopar's
  own per-class plan where a tp=2 emulation on a reduced copy proves it (`profiler.hf_tp_derived`).
- Layers are counted and timed without the key/value cache object the model's forward creates and hands to every
  layer (`drop_caches`): a training step uses none, and kept in a layer's recorded call, each recount or timing of
  the layer appended to it (attention over a growing key length, then "backward through the graph a second time").
  The whole model keeps `use_cache` as configured: without a cache, transformers reads position values to look for
  packed sequences, which meta cannot.
- Mixture of experts: grouped-matmul experts count on meta in any precision (transformers' fallback kernel, whose
  FLOPs `profiler.flop_formulas` counts), and `active_param_count` gives the parameters one token uses (top-k
  experts).
- `attention_mask`: transformers reads its values to build the mask, which the meta device cannot; an all-ones mask
  is dropped (transformers skips it as well), a padded one is refused with the fix.
- Loss: a model given `labels` computes its loss inside its own forward, in glue no layer holds. When the profiler
  knows that loss (`LabelsLoss`: the model's `loss_function` for causal and masked LMs, the plain cross-entropy of
  BERT- and T5-style heads), the labels become the targets of a loss on the logits, counted and timed with the head
  like any `loss_fn` (its float32 logits copy included); a sequence-to-sequence model gets the decoder inputs it
  would have made from the labels. Other losses (a router auxiliary loss, classification heads) stay uncounted.
- Blocks: one class whose parameters agree except for submodules only some blocks have (T5's first block of each
  stack holds the relative position bias) count as repeated blocks.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from profiler import hf_tp_derived
from profiler.errors import ProfileError
from profiler.recording import LayerCall

logger = logging.getLogger(__name__)

_SUPPORTED_STYLES = ("colwise", "rowwise")
#: transformers' style for a module run on the rank's heads with whole parameters (autopar: `replicated`)
_REPLICATED_STYLE = "replicated_with_grad_allreduce"
_META_EXPERTS = "autopar_meta_grouped_mm"
#: Guards transformers' module-global grouped-matmul switch (`_use_meta_experts`): [callers inside, saved switch].
_EXPERTS_SWITCH = threading.Lock()
_EXPERTS_INSIDE: list = [0]


def is_hf_model(model: nn.Module) -> bool:
    """Whether `model` is a transformers `PreTrainedModel` (checked without importing transformers)."""
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
               for c in type(model).__mro__)


def is_hf_module(module: nn.Module) -> bool:
    """Whether `module`'s class comes from transformers (a decoder layer, an attention block, ...)."""
    return type(module).__module__.startswith("transformers.")


def _is_cache(value: Any) -> bool:
    return any(c.__module__.startswith("transformers.") and c.__name__ == "Cache" for c in type(value).__mro__)


def drop_caches(records: dict[str, LayerCall]) -> None:
    """Replace every transformers `Cache` object in the recorded layer calls by None (see the module docstring)."""
    for call in records.values():
        call.args = tuple(None if _is_cache(v) else v for v in call.args)
        call.kwargs = {k: None if _is_cache(v) else v for k, v in call.kwargs.items()}


def prepare_copy(model: nn.Module, dtype: torch.dtype) -> None:
    """Let a meta copy the profiler owns count grouped-matmul experts in any dtype; no-op for other models."""
    if not is_hf_model(model):
        return
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    if on_meta and dtype != torch.bfloat16 and _has_grouped_experts(model):
        _use_meta_experts(model)


def _has_grouped_experts(model: nn.Module) -> bool:
    return any(getattr(getattr(m, "config", None), "_experts_implementation", None) == "grouped_mm"
               for m in model.modules() if hasattr(m, "num_experts"))


def _use_meta_experts(model: nn.Module) -> None:
    """Grouped-matmul experts through transformers' fallback kernel: torch's `_grouped_mm` refuses anything but
    bfloat16 on meta, the fallback takes every dtype and costs the same GEMMs."""
    from transformers.integrations import moe

    if _META_EXPERTS not in moe.ALL_EXPERTS_FUNCTIONS:
        def forward(self, *args, **kwargs):
            # The switch is module-global and the TP proof runs two ranks' experts in two threads at once: it stays
            # off until the last caller inside has returned (an unguarded save / restore let one thread restore it
            # while the other was still running, which then reached torch's float32-only kernel with float64).
            with _EXPERTS_SWITCH:
                if not _EXPERTS_INSIDE[0]:
                    _EXPERTS_INSIDE.append(moe._can_use_grouped_mm)
                    moe._can_use_grouped_mm = lambda *_a, **_k: False
                _EXPERTS_INSIDE[0] += 1
            try:
                return moe.grouped_mm_experts_forward(self, *args, **kwargs)
            finally:
                with _EXPERTS_SWITCH:
                    _EXPERTS_INSIDE[0] -= 1
                    if not _EXPERTS_INSIDE[0]:
                        moe._can_use_grouped_mm = _EXPERTS_INSIDE.pop()

        moe.ExpertsInterface.register(_META_EXPERTS, forward)
    for m in model.modules():
        config = getattr(m, "config", None)
        if hasattr(m, "num_experts") and getattr(config, "_experts_implementation", None) == "grouped_mm":
            config._experts_implementation_internal = _META_EXPERTS
    from profiler import flop_formulas

    flop_formulas.register_transformers_fallback()


def meta_safe_inputs(model: nn.Module, inputs: tuple) -> tuple:
    """`inputs` (positional, as `forward` takes them) with an all-ones `attention_mask` left out (see the module
    docstring); a padded or unreadable mask raises a one-line `ProfileError` naming the fix."""
    if not is_hf_model(model):
        return inputs
    try:
        names = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return inputs
    if "attention_mask" not in names or names.index("attention_mask") >= len(inputs):
        return inputs
    i = names.index("attention_mask")
    mask = inputs[i]
    if not isinstance(mask, torch.Tensor):
        return inputs
    if mask.device.type == "meta":
        raise ProfileError("the example attention_mask is on the meta device, whose values transformers reads to "
                           "build the mask; pass it as a real tensor (all ones) or leave it out")
    if not bool((mask == 1).all()):
        raise ProfileError("the example attention_mask has padding, which transformers reads tensor values for and "
                           "the meta device used for counting cannot; profile with an unpadded batch (no mask, or "
                           "all ones): padding does not change the work counted")
    return (*inputs[:i], None, *inputs[i + 1:])


class LabelsLoss:
    """The loss a transformers model computes from `labels` in its forward, as `loss(output, labels)` of its logits
    (`output` the model's output object or the head's logits tensor)."""

    def __init__(self, model: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], what: str,
                 post: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """`fn(logits, labels)`; `what` names it (part of the profile's cache key). `post`: what the model's forward
        does to the head's output before its loss (Granite's logit scaling, Gemma 2's soft cap), applied here to a
        head's logits tensor; the model's output object holds them done already."""
        self.fn, self.post = fn, post
        self.__qualname__ = f"{type(model).__name__}(labels).{what}"  # read by profiler.loss.loss_name

    def reads(self, output: Any) -> Any:
        """What the loss is a function of: the logits."""
        return output if isinstance(output, torch.Tensor) else getattr(output, "logits", output)

    def __call__(self, output: Any, labels: torch.Tensor) -> torch.Tensor:
        """The scalar loss of `output` against `labels`."""
        logits = self.reads(output)
        if self.post is not None and isinstance(output, torch.Tensor):
            logits = self.post(logits)
        return self.fn(logits, labels)


def _after_head(model: nn.Module, source: str) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str]:
    """The elementwise transform `model`'s forward applies to the head's logits before its loss, when it is one
    autopar knows by its source line (transformers' Granite and Gemma 2 / 3), and a name for it."""
    config = model.config
    if "logits = logits / self.config.logits_scaling" in source:
        scale = float(config.logits_scaling)
        return (lambda logits: logits / scale), f"scaled{scale:g}"
    cap = getattr(config, "final_logit_softcapping", None)
    if "self.config.final_logit_softcapping" in source and cap is not None:
        cap = float(cap)
        return (lambda logits: torch.tanh(logits / cap) * cap), f"softcap{cap:g}"
    return None, ""


def labels_loss(model: nn.Module) -> LabelsLoss | None:
    """The loss `model` computes from `labels`, when the profiler knows it (see the module docstring), else None."""
    if not is_hf_model(model):
        return None
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return None
    config = getattr(model, "config", None)
    if getattr(config, "output_router_logits", False):
        return None  # the router's auxiliary loss needs more than the logits
    if "self.loss_function(" in source:
        from transformers.loss.loss_utils import LOSS_MAPPING

        kind = getattr(model, "loss_type", None)
        fn = getattr(model, "_loss_function", None) or LOSS_MAPPING.get(kind or "ForCausalLM")
        if fn not in (LOSS_MAPPING["ForCausalLM"], LOSS_MAPPING["ForMaskedLM"]):
            return None
        vocab = int(config.vocab_size)
        post, post_name = _after_head(model, source)
        return LabelsLoss(model, lambda logits, labels: fn(logits, labels, vocab_size=vocab),
                          f"{fn.__name__}.{post_name}" if post_name else fn.__name__, post)
    if "CrossEntropyLoss(" in source and "labels.view(-1)" in source:
        def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1))

        return LabelsLoss(model, cross_entropy, "cross_entropy")
    return None


def labels_as_targets(model: nn.Module, inputs: tuple) -> tuple[tuple, LabelsLoss | None, Any]:
    """`(inputs without labels, loss, labels)` for a model whose labels loss `labels_loss` knows; else `inputs`
    unchanged with no loss. `inputs` are positional, as `forward` takes them."""
    loss = labels_loss(model)
    if loss is None:
        return inputs, None, None
    names = list(inspect.signature(model.forward).parameters)
    at = names.index("labels") if "labels" in names else len(inputs)
    labels = inputs[at] if at < len(inputs) else None
    if not isinstance(labels, torch.Tensor):
        return inputs, None, None
    out = list(inputs)
    out[at] = None
    if "decoder_input_ids" in names:
        d = names.index("decoder_input_ids")
        if out[d] is None:  # the model would have shifted the labels into its decoder inputs
            make = getattr(model, "prepare_decoder_input_ids_from_labels", None)
            if make is None:
                return inputs, None, None
            out[d] = make(labels=labels)
    return tuple(out), loss, labels


def _same_blocks(blocks: list[nn.Module]) -> bool:
    """One class, and parameters that agree except for submodules only some of the blocks have."""
    if len({type(b) for b in blocks}) != 1:
        return False
    params = [{n: tuple(p.shape) for n, p in b.named_parameters()} for b in blocks]
    common = set.intersection(*(set(p.items()) for p in params))
    everywhere = set.intersection(*({n for n, _ in b.named_modules()} for b in blocks))
    return all(name.rpartition(".")[0] not in everywhere
               for p in params for name, shape in p.items() if (name, shape) not in common)


def _block_lists(model: nn.Module, called: dict[str, int]) -> list[str]:
    """Outermost ModuleLists of repeated blocks (`_same_blocks`) that the forward calls, in model order."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(f + ".") for f in found):
            continue
        children = list(module.named_children())
        if _same_blocks([m for _, m in children]) and all(f"{name}.{c}" in called for c, _ in children):
            found.append(name)
    return found


def layer_names(model: nn.Module, called: dict[str, int]) -> list[str] | None:
    """The layers of a transformers model (see the module docstring), unordered; None for other models or when no
    repeated blocks are found. `called`: module name -> position of its first call in one forward."""
    if not is_hf_model(model):
        return None
    lists = _block_lists(model, called)
    if not lists:
        return None
    blocks: set[str] = set()
    names: list[str] = []

    def collect(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            if name in lists:
                members = [f"{name}.{c}" for c, _ in child.named_children()]
                blocks.update(members)
                names.extend(members)
            elif any(b.startswith(name + ".") for b in lists) or name not in called:
                collect(child, name + ".")
            else:
                names.append(name)

    collect(model, "")
    helpers = [n for n in names if n not in blocks and not any(True for _ in model.get_submodule(n).parameters())]
    if helpers:
        logger.info("%s: %s have no parameters and are not layers of their own", type(model).__name__,
                    ", ".join(helpers))
    return [n for n in names if n not in helpers]


def _base_prefix(model: nn.Module) -> str | None:
    base = getattr(model, "base_model", None)
    if base is None:
        return None
    return next((n for n, m in model.named_modules() if m is base), None)


def _pattern(key: str) -> re.Pattern:
    return re.compile(re.escape(key).replace(r"\*", r"\d+"))


def layer_tp_plans(model: nn.Module, names: list[str]) -> dict[str, dict[str, str] | None]:
    """Per layer that the config's `base_model_tp_plan` covers: {Linear path in the layer: 'colwise'|'rowwise'},
    or None when the plan gives it a style autopar cannot run (logged). Layers it does not cover are left out."""
    config = getattr(model, "config", None)
    plan = getattr(config, "base_model_tp_plan", None)
    prefix = _base_prefix(model)
    if not is_hf_model(model) or not plan or prefix is None:
        return {}
    patterns = [(_pattern(key), key, style) for key, style in plan.items()]
    out: dict[str, dict[str, str] | None] = {}
    for name in names:
        if prefix and not name.startswith(prefix + "."):
            continue
        relative = name[len(prefix) + 1:] if prefix else name
        layer = model.get_submodule(name)
        paths = {sub: m for sub, m in layer.named_modules() if sub}
        paths.update({sub: p for sub, p in layer.named_parameters()})
        # experts autopar shards itself (profiler.hf_tp_derived.EXPERT_PLANS): the plan's entries on them are not
        # refusals; `annotate_tp` adds autopar's experts shard and proves the layer
        own = [sub for sub, m in layer.named_modules() if sub and hf_tp_derived.expert_plan(m) is not None]
        styles: dict[str, str] = {}
        refused: list[str] = []
        for sub, target in paths.items():
            if any(sub == o or sub.startswith(o + ".") for o in own):
                continue
            for regex, key, style in patterns:
                if not regex.fullmatch(f"{relative}.{sub}"):
                    continue
                if style == _REPLICATED_STYLE and isinstance(target, nn.Module) and any(
                        True for _ in target.parameters(recurse=False)):
                    styles[sub] = hf_tp_derived.REPLICATED
                elif style not in _SUPPORTED_STYLES:
                    refused.append(f"'{key}': '{style}'")
                elif hf_tp_derived.linear_features(target) is None:
                    refused.append(f"'{key}': '{style}' on a {type(target).__name__}")
                else:
                    styles[sub] = style
        if refused:
            logger.info("%s: its config's tp plan has %s, which autopar's TP shards do not express; the layer gets "
                        "autopar's own per-class plan if it has one, else no tensor parallelism",
                        name, ", ".join(sorted(set(refused))))
            out[name] = None
        elif styles:
            out[name] = styles
    return out


def tp_divisor(model: nn.Module, layer: nn.Module, styles: dict[str, str]) -> int:
    """What the TP degree must divide: the KV heads (else the heads), every split Linear width and every piece of a
    fused projection (an experts module's intermediate width)."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None) or 0
    widths = []
    for path, style in styles.items():
        features = hf_tp_derived.linear_features(layer.get_submodule(path))
        if features is not None:
            widths.append(features[1] if style == "colwise" else features[0])
    widths += [w for pieces in hf_tp_derived.fused_segments(layer).values() for w in pieces]
    return math.gcd(int(heads), *widths)


def annotate_tp(model: nn.Module, names: list[str]) -> None:
    """Give each layer of a profiler-owned copy its tp plan as `autopar_tp_plan` / `autopar_tp_divisor` /
    `autopar_tp_segments` (read by `profiler.tensor_parallel`); a plan the user set on a layer's class wins.

    A layer the config's `base_model_tp_plan` covers takes it as it is, unless it holds experts autopar shards
    itself or modules the plan keeps whole with summed gradients (`replicated`); those layers, and layers the config
    does not cover, get autopar's own plan on top of the config's (`profiler.hf_tp_derived`), proved on a reduced
    copy."""
    planned = layer_tp_plans(model, names)
    own = [n for n in names if is_hf_model(model) and (
        n not in planned or (planned[n] is None and hf_tp_derived.derived_plan(model.get_submodule(n))[0]) or (
            planned[n] is not None and (
                hf_tp_derived.REPLICATED in planned[n].values()
                or hf_tp_derived.EXPERTS in hf_tp_derived.derived_plan(model.get_submodule(n))[0].values())))]
    for n in own:  # a config plan autopar cannot run (None) gives way to autopar's own table
        if planned.get(n, "") is None:
            del planned[n]
    based = frozenset(n for n in own if planned.get(n))  # the config's plan needs the proof (experts, replicated)
    derived = hf_tp_derived.prove_model(model, own, based) if own else {}
    for name in dict.fromkeys([*planned, *derived]):
        layer = model.get_submodule(name)
        if hasattr(type(layer), "autopar_tp_plan"):
            continue
        if name in derived:  # autopar's own table (on top of the config's plan), proved on a reduced copy
            own_styles, head_params = hf_tp_derived.derived_plan(layer)
            styles = {**(planned.get(name) or {}), **own_styles} if derived[name] is None else None
            layer.autopar_tp_head_params = head_params
        else:
            styles = planned[name]
        layer.autopar_tp_plan = styles
        if styles is not None:
            layer.autopar_tp_divisor = tp_divisor(model, layer, styles)
            layer.autopar_tp_segments = {p: w for p, w in hf_tp_derived.fused_segments(layer).items() if p in styles}


def active_param_count(layer: nn.Module, params: list[nn.Parameter]) -> int | None:
    """Parameters of `params` (the layer's own) that one token uses, when the layer holds experts of which each token
    runs top-k: the experts' weights count k / num_experts. None when the layer has no experts."""
    ids = {id(p) for p in params}
    expert_total = active = 0
    for m in layer.modules():
        experts = getattr(m, "num_experts", None)
        config = getattr(m, "config", None)
        top_k = getattr(m, "top_k", None) or getattr(config, "num_experts_per_tok", None)
        own = [p for p in m.parameters(recurse=False) if id(p) in ids and p.dim() == 3]
        if not isinstance(experts, int) or not isinstance(top_k, int) or not own or experts < 1:
            continue
        n = sum(p.numel() for p in own)
        expert_total += n
        active += n * min(top_k, experts) // experts
    if not expert_total:
        return None
    return sum(p.numel() for p in params) - expert_total + active
