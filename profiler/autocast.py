"""Autocast on the meta device: the dtypes CUDA autocast gives each op, so a 16-bit profile can count what training
under `torch.autocast` keeps for backward.

autopar trains 16-bit in one of two ways (`executor.optim.mixed_precision`): where FSDP2 or `replicate` holds the
parameters, `MixedPrecisionPolicy(param_dtype=...)` casts the parameters themselves, so every activation is 16-bit
(what the profile's own counts describe: the model traced in its 16-bit copy). Under DDP, plain pipelines, tensor
parallelism without data parallelism and on one device it runs `torch.autocast` over fp32 parameters instead, and
the activations come out in the dtype each op's autocast policy gives: the embedding's output and the residual
stream stay fp32 (the embedding is on no autocast list, and adding a 16-bit branch to an fp32 stream promotes),
LayerNorm / softmax / log-softmax (the loss) run and save in fp32, and each Linear saves the 16-bit copy autocast made
of its input.

Autocast is a dispatch key of real devices; on the meta device it does nothing (`torch.autocast` warns and the ops
keep their dtypes). `AutocastEmulation` is a `TorchFunctionMode` that applies CUDA autocast's policy to the torch
functions a model calls, casting the arguments exactly as the `Autocast` kernel would before the op reaches autograd,
so autograd saves the same tensors it saves on a GPU. The op lists are CUDA autocast's, from torch's
`ATen/autocast_mode.h` (`AT_FORALL_LOWER_PRECISION_FP`, `AT_FORALL_FP32`, `AT_FORALL_FP32_SET_OPT_DTYPE`,
`AT_FORALL_PROMOTE`, torch 2.13), by the names the Python functions carry; composite functions that reach a listed op
first (`cross_entropy` runs `log_softmax`) take that op's policy. As in autocast, the cast of a parameter (a leaf
that requires grad) is made once and reused (its weight-cast cache); those copies are state, not activations
(`planner.memory.estimate_state_bytes` counts them), and `param_casts` names their storages so counts can leave them
out. What it does not follow: a model's own `torch.autocast(enabled=False)` regions (Hugging Face rotary embeddings
compute cos / sin that way) are emulated like the rest, which changes those small tensors' dtype only.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from profiler import hf
from profiler.counting import LayerCost, estimate_layer_cost
from profiler.loss import TrainingLoss
from profiler.recording import cast_inputs, meta_copy, record_calls, tensors_of

logger = logging.getLogger(__name__)

#: Ops autocast runs in the 16-bit dtype: their floating-point arguments are cast down.
LOWER_PRECISION_OPS = frozenset({
    "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "convolution", "prelu", "addmm", "addmv", "addr", "matmul", "__matmul__", "__rmatmul__",
    "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot",
    "multi_dot", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell", "_thnn_fused_lstm_cell",
    "_thnn_fused_gru_cell", "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
})
#: Ops autocast runs in fp32 (cast up, or called with dtype=float32: the same for what they save). `cross_entropy`
#: and `cross_entropy_loss` start with `log_softmax`, `normalize` with `norm`.
FP32_OPS = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "native_layer_norm", "rms_norm",
    "group_norm", "frobenius_norm", "nuclear_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss",
    "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss",
    "mse_loss", "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d", "upsample_bilinear2d",
    "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d",
    "_upsample_nearest_exact3d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa", "interpolate",
    # AT_FORALL_FP32_SET_OPT_DTYPE
    "prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm", "linalg_matrix_norm", "sum",
    # composites whose first listed op is one of the above
    "cross_entropy", "cross_entropy_loss", "normalize", "norm",
})
#: Ops autocast runs in the widest floating dtype among their arguments.
PROMOTE_OPS = frozenset({"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler",
                         "grid_sample", "index_put", "tensordot", "scatter_add"})

_LOW = (torch.float16, torch.bfloat16)


class AutocastEmulation(TorchFunctionMode):
    """CUDA autocast's casts in `dtype` (bfloat16 or float16) for the torch functions called while it is active."""

    def __init__(self, dtype: torch.dtype) -> None:
        if dtype not in _LOW:
            raise ValueError(f"autocast emulation needs a 16-bit dtype, got {dtype}")
        super().__init__()
        self.dtype = dtype
        self._param_cache: dict[int, torch.Tensor] = {}
        #: storages (`untyped_storage()._cdata`, as `profiler.counting` keys them) of the parameters' 16-bit copies
        self.param_casts: set[int] = set()

    def _cast(self, value, target: torch.dtype, source: tuple[torch.dtype, ...]):
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v, target, source) for v in value)
        if not (isinstance(value, torch.Tensor) and value.dtype in source and value.dtype != target):
            return value
        # A parameter: autocast's weight-cast cache (it caches every leaf that requires grad; in training those are
        # the parameters, while a layer counted alone gets its inputs as such leaves, which must not be cached).
        if isinstance(value, nn.Parameter) and value.requires_grad:
            hit = self._param_cache.get(id(value))
            if hit is None or hit.dtype != target:
                hit = value.to(target)
                self._param_cache[id(value)] = hit
                self.param_casts.add(hit.untyped_storage()._cdata)
            return hit
        return value.to(target)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") or "out" in kwargs:
            return func(*args, **kwargs)  # in-place ops and out= calls do not autocast
        if name in LOWER_PRECISION_OPS:
            target, source = self.dtype, (torch.float32,)
        elif name in FP32_OPS and kwargs.get("dtype") is None:
            target, source = torch.float32, _LOW
        elif name in PROMOTE_OPS:
            floats = [t.dtype for t in tensors_of((args, kwargs)) if t.is_floating_point() and t.dtype != torch.float64]
            if not floats:
                return func(*args, **kwargs)
            target = torch.float32 if torch.float32 in floats else floats[0]
            source = tuple(d for d in (torch.float32, *_LOW) if d != target)
        else:
            return func(*args, **kwargs)
        args = tuple(self._cast(a, target, source) for a in args)
        kwargs = {k: self._cast(v, target, source) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def count_autocast_layers(model: nn.Module, inputs: tuple, names: list[str], layers: dict[str, str],
                          loss_fn, targets, dtype: torch.dtype) -> dict[str, LayerCost] | None:
    """Per layer signature (`layers`: signature -> the layer counted for it), what training under autocast in
    `dtype` keeps: the model copied to the meta device in fp32, one forward under `AutocastEmulation` recording each
    layer's arguments, then each layer's forward counted under it (`counting.estimate_layer_cost`, with `loss_fn`
    for the last of `names`): saved bytes with the parameters' 16-bit copies left out (they are state), the
    attention core's part, inputs and output, for math and fused attention.

    None when the model cannot run that way (user code that insists on one dtype, say): the planner then counts
    16-bit activations throughout, as before this count existed, and the log says why.
    """
    try:
        model32 = meta_copy(model, torch.float32)
        hf.prepare_copy(model32, torch.float32)
        inputs32 = cast_inputs(inputs, "meta", torch.float32)
        with AutocastEmulation(dtype):
            records = record_calls(model32, inputs32, names, clone=False)
        hf.drop_caches(records)
        loss = None if loss_fn is None else TrainingLoss.on_device(loss_fn, targets, "meta", torch.float32)
        return {sig: estimate_layer_cost(model32.get_submodule(n), records[n], loss if n == names[-1] else None,
                                         emulation=lambda: AutocastEmulation(dtype))
                for sig, n in layers.items()}
    except (RuntimeError, TypeError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        logger.warning("%s: activations under autocast not counted (%s); 16-bit activations are assumed for every "
                       "plan", type(model).__name__, reason[:200])
        return None
