"""The profile contract: what each layer of a model costs, as plain JSON-serialisable data.

`profiler.profile(...)` produces a `ModelProfile`; the planner reads it without importing torch. Every quantity
that grows with the batch is stored *per sample* (one sequence of `input.seq_len` tokens, or one image), so the
planner can rescale it to any micro-batch size. Sizes are in bytes, times in seconds, FLOPs are counted the way
`torch.utils.flop_counter.FlopCounterMode` counts them (2 per multiply-accumulate).
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from pathlib import Path

from pydantic import Field, ValidationError, model_validator

from planner.errors import AutoparError
from planner.validation import Contract, check_fields

PROFILE_SCHEMA_VERSION = 2
#: Versions this autopar still reads: 1 (before `LayerProfile.attention`) loads with no attention calls recorded.
READABLE_PROFILE_SCHEMA_VERSIONS = (1, 2)

#: Node names that stand for the model's inputs and outputs in `ModelProfile.edges`.
INPUT_NODE = "<input>"
OUTPUT_NODE = "<output>"


class DType(str, Enum):
    """Floating-point precision of a profile's parameters and activations (and of a cluster's peak rate)."""

    FP32 = "float32"
    TF32 = "tf32"
    BF16 = "bfloat16"
    FP16 = "float16"

    @property
    def itemsize(self) -> int:
        """Bytes per element as stored in memory (tf32 is stored as fp32)."""
        return 4 if self in (DType.FP32, DType.TF32) else 2


class ProfileMode(str, Enum):
    """How a profile was made: times measured on a device, or only counted on the meta device."""

    MEASURED = "measured"
    ANALYTIC = "analytic"


class ShardStyle(str, Enum):
    """How a tensor-parallel shard splits a Linear (Megatron): by output features or by input features.

    The vocabulary-parallel styles (Megatron's embedding and output layer): `vocab_rowwise` splits an nn.Embedding's
    rows (a masked lookup, then one all-reduce of its output); `vocab_colwise` splits the output head's Linear by
    vocabulary entry and leaves the logits split, the loss reducing per token only (torch's `loss_parallel`).

    `experts` (Megatron's expert tensor parallelism) names a module holding every expert's weights as 3-D stacks:
    each expert's intermediate features are split over the ranks (its input projection colwise, per piece when
    gate and up are concatenated; its output projection rowwise), and the module's output is summed across the
    group, as a rowwise Linear's is.

    `replicated` names a module that stays whole on every rank while it runs on the rank's own attention heads (a
    per-head norm of q or k after a colwise projection: Qwen3's, Gemma 3's `q_norm` / `k_norm`); each rank's gradient
    of its parameters is a partial sum, added across the group after backward (transformers'
    `replicated_with_grad_allreduce`).
    """

    COLWISE = "colwise"
    ROWWISE = "rowwise"
    VOCAB_ROWWISE = "vocab_rowwise"
    VOCAB_COLWISE = "vocab_colwise"
    EXPERTS = "experts"
    REPLICATED = "replicated"


class _Strict(Contract):
    @model_validator(mode="after")
    def _physical_ranges(self) -> _Strict:
        check_fields(self)  # finite, and FLOPs / bytes / seconds within planner.validation's bounds
        return self


class ProfileError(AutoparError):
    """A profile file or text that is not a valid profile, with what to change."""


class TensorSpec(_Strict):
    """One example input tensor: its full shape (batch dim first) and dtype name as torch spells it."""

    shape: list[int] = Field(description="Full shape, batch dimension first.")
    dtype: str = Field(description="torch dtype name without the 'torch.' prefix, e.g. 'int64', 'float32'.")


class InputSpec(_Strict):
    """The example inputs the model was profiled with."""

    batch_size: int = Field(ge=1, description="Batch size the profile was taken at.")
    seq_len: int | None = Field(default=None, ge=1, description="Tokens per sample; None for non-sequence inputs.")
    tensors: list[TensorSpec] = Field(default_factory=list, description="Positional example inputs.")


class TPShard(_Strict):
    """One Linear inside a layer that tensor parallelism may shard."""

    module: str = Field(description="Path of the nn.Linear (or transformers Conv1D, or experts module) relative to the "
                                    "layer, e.g. 'attn.q_proj'.")
    style: ShardStyle = Field(description="colwise: split output features; rowwise: split input features.")
    segments: list[int] | None = Field(
        default=None,
        description="Colwise (and experts) only: a fused projection (one Linear whose output is split into q, k, v, "
        "...; an experts stack with gate and up concatenated) lists the width of each piece in order; each piece is "
        "split across the TP ranks separately. None: not fused.",
    )


class SequenceParallelSpec(_Strict):
    """How a TP layer runs sequence-parallel (Megatron `--sequence-parallel`, torchtitan's `SequenceParallel`).

    Between its TP regions the layer (norms, dropout, residual adds) runs on the tokens of its sequence shard: the
    layer's input and output stay split over the TP group along dim 1. Each region gathers its input whole (an
    all-gather) and its rowwise Linears reduce-scatter their outputs back to sequence shards, in place of one
    all-reduce.
    """

    norms: list[str] = Field(description="Modules (paths relative to the layer) with parameters that run on sequence "
                                         "shards (LayerNorm / RMSNorm): torch's `SequenceParallel()`.")
    regions: list[str] = Field(description="Modules (paths relative to the layer) that each hold one colwise-to-"
                                           "rowwise group and whose one input is gathered whole.")
    gathered_bytes: float = Field(ge=0, description="Bytes per sample of the regions' gathered inputs, which the "
                                                    "colwise Linears keep whole for backward.")


class TensorParallelSpec(_Strict):
    """Where and how a layer can be split Megatron-style across a tensor-parallel group."""

    shards: list[TPShard] = Field(description="Linears to shard; colwise ones feed rowwise ones.")
    divisor: int = Field(ge=1, description="TP degree must divide this (attention heads, or KV heads with GQA).")
    sharded_param_count: int = Field(ge=0, description="Parameters split across the TP group (the rest replicate).")
    allreduces_per_forward: int = Field(
        ge=0, description="All-reduces per forward: the output of each rowwise Linear (and of a vocabulary-parallel "
                          "embedding), a vocabulary-parallel loss's reductions."
    )
    allreduces_per_backward: int | None = Field(
        default=None, ge=0,
        description="All-reduces per backward: the input gradient of each colwise Linear, as DTensor's "
                    "ColwiseParallel issues them (separate q, k and v projections: three; a fused qkv: one, as "
                    "Megatron). None (profiles before it was counted): as many as in forward.",
    )
    allreduce_bytes: float = Field(ge=0, description="Bytes per sample of each of those all-reduces (their mean).")
    uneven_max: int | None = Field(
        default=None, ge=1,
        description="Set when the shards may be uneven (a vocabulary split by DTensor): any TP degree up to this "
                    "works, and `divisor` is not a constraint. None: the degree must divide `divisor`.",
    )

    sequence_parallel: SequenceParallelSpec | None = Field(
        default=None, description="Set when the layer can also run sequence-parallel (profiles before it: None).")

    def allreduces_per_step(self, *, recompute_forward: bool) -> int:
        """All-reduces of one micro-batch's forward and backward (the forward's twice under full recompute)."""
        bwd = self.allreduces_per_forward if self.allreduces_per_backward is None else self.allreduces_per_backward
        return self.allreduces_per_forward * (2 if recompute_forward else 1) + bwd

    def allows(self, tp: int) -> bool:
        """Whether the layer can be split over `tp` ranks."""
        return tp <= self.uneven_max if self.uneven_max is not None else self.divisor % tp == 0

    @property
    def splits_output(self) -> bool:
        """Whether the layer's output stays split over the TP group (a vocabulary-parallel head's logits)."""
        return any(s.style == ShardStyle.VOCAB_COLWISE for s in self.shards)


class AttentionMask(str, Enum):
    """The attn_mask a scaled_dot_product_attention call got: none, boolean, or an additive float bias."""

    NONE = "none"
    BOOL = "bool"
    FLOAT = "float"


class AttentionCall(_Strict):
    """One `F.scaled_dot_product_attention` call of a layer: what decides which kernel a device runs it with."""

    heads: int = Field(ge=1, description="Query heads per sample (the call's batch x heads over the batch size).")
    kv_heads: int = Field(ge=1, description="Key/value heads per sample (fewer than heads: grouped-query).")
    q_len: int = Field(ge=1, description="Query sequence length.")
    kv_len: int = Field(ge=1, description="Key/value sequence length.")
    head_dim: int = Field(ge=1, description="Query/key head dimension.")
    v_head_dim: int = Field(ge=1, description="Value head dimension.")
    causal: bool = Field(description="is_causal=True.")
    mask: AttentionMask = Field(description="The attn_mask given.")
    dropout: float = Field(ge=0, description="dropout_p of the call (training).")
    dtype: DType = Field(description="dtype of the query.")


class FusedAttentionCosts(_Strict):
    """A layer's counted costs (per sample, same meaning as the `LayerProfile` fields of the same names) when its
    scaled_dot_product_attention calls run as fused kernels: no scores stored, a log-sum-exp per query row saved,
    scores recomputed in backward, causal FLOPs limited to the kept entries."""

    fwd_flops: float = Field(ge=0, description="As LayerProfile.fwd_flops.")
    bwd_flops: float = Field(ge=0, description="As LayerProfile.bwd_flops.")
    fwd_bytes: float = Field(ge=0, description="As LayerProfile.fwd_bytes.")
    bwd_bytes: float = Field(ge=0, description="As LayerProfile.bwd_bytes.")
    saved_activation_bytes: float = Field(ge=0, description="As LayerProfile.saved_activation_bytes.")
    selective_saved_bytes: float = Field(ge=0, description="As LayerProfile.selective_saved_bytes (0: no scores).")
    selective_fwd_flops: float = Field(ge=0, description="As LayerProfile.selective_fwd_flops.")
    fwd_actmm_flops: float = Field(ge=0, description="As LayerProfile.fwd_actmm_flops.")
    fwd_actmm_bytes: float = Field(ge=0, description="As LayerProfile.fwd_actmm_bytes.")
    fwd_membound_bytes: float = Field(ge=0, description="As LayerProfile.fwd_membound_bytes.")
    fwd_membound_fused_bytes: float = Field(ge=0, description="As LayerProfile.fwd_membound_fused_bytes.")
    bwd_actmm_flops: float = Field(ge=0, description="As LayerProfile.bwd_actmm_flops.")
    bwd_actmm_bytes: float = Field(ge=0, description="As LayerProfile.bwd_actmm_bytes.")
    bwd_membound_bytes: float = Field(ge=0, description="As LayerProfile.bwd_membound_bytes.")
    bwd_membound_fused_bytes: float = Field(ge=0, description="As LayerProfile.bwd_membound_fused_bytes.")
    fwd_kernels: int = Field(default=0, ge=0, description="As LayerProfile.fwd_kernels.")
    bwd_kernels: int = Field(default=0, ge=0, description="As LayerProfile.bwd_kernels.")
    fwd_ops: int = Field(default=0, ge=0, description="As LayerProfile.fwd_ops.")
    bwd_ops: int = Field(default=0, ge=0, description="As LayerProfile.bwd_ops.")
    fwd_transcendental_elements: float = Field(default=0.0, ge=0,
                                               description="As LayerProfile.fwd_transcendental_elements.")
    bwd_transcendental_elements: float = Field(default=0.0, ge=0,
                                               description="As LayerProfile.bwd_transcendental_elements.")


class AutocastActivations(_Strict):
    """A 16-bit profile's layer as `torch.autocast` over fp32 parameters runs it (per sample; same meaning as the
    `LayerProfile` fields of the same names). The profile's own fields count the layer in its 16-bit copy, as FSDP2's
    `MixedPrecisionPolicy` runs it; under autocast (DDP, plain pipelines, TP without DP, one device:
    `executor.optim.mixed_precision`) the residual stream and the embedding's output stay fp32, LayerNorm, softmax and
    the loss's log-softmax run and save in fp32, and each Linear saves the 16-bit copy of its input
    (`profiler.autocast`)."""

    saved_activation_bytes: float = Field(ge=0, description="As LayerProfile.saved_activation_bytes.")
    selective_saved_bytes: float = Field(default=0.0, ge=0, description="As LayerProfile.selective_saved_bytes.")
    input_bytes: float = Field(ge=0, description="As LayerProfile.input_bytes.")
    output_bytes: float = Field(ge=0, description="As LayerProfile.output_bytes.")
    fused_saved_activation_bytes: float | None = Field(
        default=None, ge=0, description="saved_activation_bytes with the SDPA calls as fused kernels (None: no call, "
                                        "or one no fused kernel takes).")
    fused_selective_saved_bytes: float | None = Field(
        default=None, ge=0, description="selective_saved_bytes with the SDPA calls as fused kernels.")


class WeightGemm(_Strict):
    """The GEMMs of one weight matrix in a layer: out[M, N] = in[M, K] @ W[N, K]^T in forward, and in backward the
    input gradient (M x K, inner N) and the weight gradient (N x K, inner M), each 2*M*N*K FLOPs.

    M grows with the batch and is stored per sample; N and K are the weight's output and input features (a
    convolution's weight flattened to N = out channels, K = the rest), which TP divides (colwise: N, rowwise: K)."""

    module: str = Field(description="Path of the module owning the weight, relative to the layer ('' = the layer).")
    m: float = Field(gt=0, description="Rows per sample (tokens, or output pixels of a convolution).")
    n: int = Field(ge=1, description="Output features of the weight.")
    k: int = Field(ge=1, description="Input features of the weight.")
    fwd_count: int = Field(ge=0, description="GEMMs of this shape per forward call.")
    bwd_count: int = Field(ge=0, description="GEMMs of this shape per backward call (input and weight gradients).")


class LayerProfile(_Strict):
    """Cost of one pipeline-cuttable unit of the model. Batch-dependent fields are per sample.

    The cost fields count scaled_dot_product_attention as the math kernel (matmul-softmax-matmul, scores saved);
    `fused_attention` holds them for fused kernels, and `planner.attention` picks per target device.
    """

    index: int = Field(ge=0, description="Position in execution order.")
    name: str = Field(description="Module path in the model, e.g. 'blocks.3'.")
    module_type: str = Field(description="Class name of the module.")
    param_count: int = Field(ge=0, description="Parameters owned by this layer (a shared parameter counts once).")
    param_bytes: int = Field(ge=0, description="Bytes of those parameters in the profiled dtype.")
    buffer_bytes: int = Field(default=0, ge=0, description="Bytes of registered buffers.")
    shared_param_count: int = Field(
        default=0, ge=0,
        description="Parameters this layer uses that an earlier layer owns (a tied weight); a pipeline stage "
        "without that owner holds its own copy, with gradients and optimizer state.",
    )
    active_param_count: int | None = Field(
        default=None, ge=0,
        description="Of param_count, the parameters one token uses when the layer holds mixture-of-experts weights "
        "(each token runs its top-k experts); None: every parameter is used.",
    )
    fwd_flops: float = Field(ge=0, description="Forward FLOPs per sample.")
    bwd_flops: float = Field(ge=0, description="Backward FLOPs per sample.")
    fwd_bytes: float = Field(
        ge=0, description="Activation bytes read + written by forward ops per sample (roofline); weights excluded."
    )
    bwd_bytes: float = Field(ge=0, description="Activation bytes read + written by backward ops per sample.")
    saved_activation_bytes: float = Field(ge=0, description="Bytes autograd keeps for backward, per sample.")
    input_bytes: float = Field(ge=0, description="Bytes of the layer's inputs per sample (kept under full recompute).")
    output_bytes: float = Field(ge=0, description="Bytes of the layer's output per sample (what a cut after it sends).")
    selective_saved_bytes: float = Field(
        default=0.0, ge=0,
        description="Part of saved_activation_bytes that selective recompute drops (attention scores), per sample.",
    )
    selective_fwd_flops: float = Field(
        default=0.0, ge=0, description="Forward FLOPs per sample that selective recompute repeats (attention core)."
    )
    # Roofline classes (parts of fwd_flops / fwd_bytes and bwd_flops / bwd_bytes): kernels of different arithmetic
    # intensity do not overlap, so the cost model sums one roofline per class. What is left of the totals is the
    # weight-GEMM class. All zero (older profiles, hand-made ones) = the whole layer is one roofline.
    fwd_actmm_flops: float = Field(
        default=0.0, ge=0,
        description="Forward FLOPs per sample of matmuls between two activations (attention QK^T and scores x V).",
    )
    fwd_actmm_bytes: float = Field(default=0.0, ge=0, description="Activation bytes those forward matmuls move.")
    fwd_membound_bytes: float = Field(
        default=0.0, ge=0,
        description="Forward bytes per sample of ops with no FLOPs (layernorm, GELU, softmax, dropout, adds, copies).",
    )
    fwd_membound_fused_bytes: float = Field(
        default=0.0, ge=0,
        description="fwd_membound_bytes when chains of memory-bound ops run fused: an intermediate that only "
                    "memory-bound ops read, that autograd does not save and that stays inside the layer is never "
                    "written or read.",
    )
    bwd_actmm_flops: float = Field(default=0.0, ge=0, description="Backward FLOPs per sample of activation matmuls.")
    bwd_actmm_bytes: float = Field(default=0.0, ge=0, description="Activation bytes those backward matmuls move.")
    bwd_membound_bytes: float = Field(default=0.0, ge=0, description="Backward bytes per sample of ops with no FLOPs.")
    bwd_membound_fused_bytes: float = Field(
        default=0.0, ge=0, description="bwd_membound_bytes with chains of memory-bound ops fused (as forward)."
    )
    fwd_seconds: float | None = Field(default=None, ge=0, description="Measured forward time per sample, or None.")
    bwd_seconds: float | None = Field(default=None, ge=0, description="Measured backward time per sample, or None.")
    tp: TensorParallelSpec | None = Field(default=None, description="How the layer shards under TP; None = cannot.")
    attention: list[AttentionCall] = Field(
        default_factory=list, description="The layer's scaled_dot_product_attention calls, in call order."
    )
    fused_attention: FusedAttentionCosts | None = Field(
        default=None,
        description="The cost fields with those calls as fused kernels; None: no call, or one no fused kernel takes.",
    )
    autocast: AutocastActivations | None = Field(
        default=None,
        description="The memory fields under torch.autocast over fp32 parameters (16-bit profiles since profiler "
                    "version 18); None: an fp32 profile, an older one, or a model the emulation could not run.",
    )
    # Kernel-level detail (empty / 0 in profiles made before it: the cost model then uses one efficiency for all
    # weight-GEMM FLOPs and no per-kernel cost).
    fwd_kernels: int = Field(
        default=0, ge=0, description="Kernels one forward call launches (aten ops that move data; views excluded)."
    )
    bwd_kernels: int = Field(default=0, ge=0, description="Kernels one backward call launches.")
    fwd_ops: int = Field(
        default=0, ge=0,
        description="Aten ops one forward call dispatches on the host, views, aliases and allocations included (a "
                    "superset of fwd_kernels); 0 in profiles made before they were counted: no per-op cost.",
    )
    bwd_ops: int = Field(default=0, ge=0, description="Aten ops one backward call dispatches (as fwd_ops).")
    fwd_transcendental_elements: float = Field(
        default=0.0, ge=0,
        description="Elements per sample one forward evaluates exp / log / tanh / erf on (GELU, softmax, fused "
                    "attention's scores; profiler.transcendental); 0 in profiles made before they were counted.",
    )
    bwd_transcendental_elements: float = Field(
        default=0.0, ge=0, description="As fwd_transcendental_elements, for one backward call.",
    )
    param_tensors: int = Field(
        default=0, ge=0,
        description="Parameter tensors this layer owns (the optimizer's per-tensor loop runs over them); 0 in "
                    "profiles made before it was counted: the cost model then charges no per-tensor optimizer cost.",
    )
    gemms: list[WeightGemm] = Field(
        default_factory=list, description="The layer's weight GEMMs by shape (their FLOPs are the weight-GEMM class)."
    )


class LayerEdge(_Strict):
    """Data flowing from one layer (or the model input) to another (or the model output)."""

    src: str = Field(description="Layer name, or '<input>'.")
    dst: str = Field(description="Layer name, or '<output>'.")
    bytes: float = Field(ge=0, description="Bytes per sample crossing the edge.")


class StepMeasurement(_Strict):
    """A whole training step (forward + backward) measured at the profiled batch, to check the per-layer sum."""

    fwd_bwd_seconds: float = Field(ge=0, description="Median wall time of forward + backward for the whole batch.")
    peak_memory_bytes: int | None = Field(default=None, ge=0, description="Peak device memory, when measurable.")


class ModelProfile(_Strict):
    """Everything the planner needs to know about a model, JSON round-trippable without loss."""

    schema_version: int = Field(default=PROFILE_SCHEMA_VERSION, description="Bumped on incompatible changes.")
    name: str = Field(description="Model name (zoo name or factory path).")
    structure_hash: str = Field(description="Hash of module tree, parameter shapes and dtypes.")
    input: InputSpec
    dtype: DType
    device: str = Field(description="'cpu', 'cuda' or 'meta'.")
    device_name: str | None = Field(default=None, description="e.g. 'NVIDIA H100 80GB HBM3' when measured on CUDA.")
    mode: ProfileMode
    layers: list[LayerProfile]
    edges: list[LayerEdge]
    cut_points: list[int] = Field(
        description="k in this list means a pipeline stage may start at layer k (the cut is between k-1 and k)."
    )
    step: StepMeasurement | None = Field(default=None, description="Whole-step measurement (measured mode only).")
    profile_seconds: float = Field(ge=0, description="Wall time the profiler took.")
    torch_version: str | None = None

    @model_validator(mode="after")
    def _check_consistency(self) -> ModelProfile:
        if self.schema_version not in READABLE_PROFILE_SCHEMA_VERSIONS:
            raise ValueError(
                f"profile schema_version {self.schema_version} is not supported (this autopar reads "
                f"{', '.join(map(str, READABLE_PROFILE_SCHEMA_VERSIONS))}); re-create the profile with `autopar profile`"
            )
        if not self.layers:
            raise ValueError("a profile needs at least one layer")
        for i, layer in enumerate(self.layers):
            if layer.index != i:
                raise ValueError(f"layers[{i}] has index {layer.index}; layers must be listed in execution order")
        names = {layer.name for layer in self.layers}
        if len(names) != len(self.layers):
            raise ValueError("layer names must be unique")
        known = names | {INPUT_NODE, OUTPUT_NODE}
        for e in self.edges:
            if e.src not in known or e.dst not in known:
                raise ValueError(f"edge {e.src} -> {e.dst} names a layer that is not in the profile")
        for k in self.cut_points:
            if not 0 < k < len(self.layers):
                raise ValueError(f"cut point {k} is outside 1..{len(self.layers) - 1}")
        return self

    # Totals are derived, never stored, so they cannot disagree with the layers.
    @property
    def num_layers(self) -> int:
        """Number of layers."""
        return len(self.layers)

    @property
    def param_count(self) -> int:
        """Total parameters."""
        return sum(layer.param_count for layer in self.layers)

    @property
    def active_param_count(self) -> int:
        """Parameters one token uses (mixture of experts: its top-k experts); equals param_count for dense models."""
        return sum(layer.param_count if layer.active_param_count is None else layer.active_param_count
                   for layer in self.layers)

    @property
    def param_bytes(self) -> int:
        """Total parameter bytes."""
        return sum(layer.param_bytes for layer in self.layers)

    @property
    def fwd_flops(self) -> float:
        """Forward FLOPs per sample."""
        return sum(layer.fwd_flops for layer in self.layers)

    @property
    def bwd_flops(self) -> float:
        """Backward FLOPs per sample."""
        return sum(layer.bwd_flops for layer in self.layers)

    @property
    def saved_activation_bytes(self) -> float:
        """Saved activations per sample."""
        return sum(layer.saved_activation_bytes for layer in self.layers)

    @property
    def tokens_per_sample(self) -> int:
        """Tokens in one sample (1 for non-sequence models)."""
        return self.input.seq_len or 1

    @property
    def profile_hash(self) -> str:
        """Identifies what a plan was made for: structure, input shape per sample and dtype (not the batch)."""
        key = {
            "structure": self.structure_hash,
            "seq_len": self.input.seq_len,
            "inputs": [t.shape[1:] for t in self.input.tensors],
            "dtype": self.dtype.value,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise; also write atomically to `path` when given."""
        text = self.model_dump_json(indent=1)
        if path is not None:
            write_text_atomic(Path(path), text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> ModelProfile:
        """Load from a file path or a JSON string."""
        p = Path(path_or_text) if not str(path_or_text).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(path_or_text)
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or '(top level)'}: {e['msg']}"
                                 for e in exc.errors()[:3])
            more = f" (and {exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
            raise ProfileError(f"{p or 'the text'} is not a valid profile: {problems}{more}; fix those fields or "
                               "re-create it with `autopar profile`") from None


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. `path` is a directory: fail without leaving the temporary file behind
        raise
