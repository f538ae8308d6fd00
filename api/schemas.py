"""Request and response bodies of the HTTP service, kept apart from the domain types they carry.

A request names a model in one of three ways (a tagged union on `kind`): a zoo name with size options, a full
`ModelProfile`, or the id of a stored profile. A cluster is a preset name (+ nodes) or a full `ClusterSpec`. Nothing
in a request is ever imported or executed: zoo names go through the registry, profiles are data.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from planner.cluster import ClusterSpec, preset_names
from planner.model_profile import DType, ModelProfile
from planner.search import Objective
from planner.strategy import Plan, Prediction, Strategy

# Absolute bounds on zoo size options: generous for real models, small enough that a request cannot ask the
# profiler for a graph that takes minutes to trace or a parameter count that overflows the cost model.
MAX_LAYERS = 512
MAX_HIDDEN = 65536
MAX_HEADS = 1024
MAX_SEQ_LEN = 1 << 20
MAX_VOCAB = 1 << 21
MAX_NODES = 1024
MAX_GPUS_PER_NODE = 64
MAX_GLOBAL_BATCH = 1 << 24
MAX_TOP_K = 50


class _Body(BaseModel):
    # Numbers and flags are strict (StrictInt / StrictBool / StrictFloat): `true` is not a batch size of 1 and
    # `"yes"` is not a flag, so a client's type mistake is a 422 rather than a silently different request.
    model_config = ConfigDict(extra="forbid")


def _zoo_names_in_schema(schema: dict[str, Any]) -> None:
    # Called when the OpenAPI document is built, not at import: the zoo imports torch, the client must not.
    from profiler.zoo import list_models

    schema["enum"] = list_models()


def _preset_names_in_schema(schema: dict[str, Any]) -> None:
    schema["enum"] = preset_names()


class ZooOptions(_Body):
    """Size options of a zoo model; each omitted one keeps the preset's value. A family rejects options it lacks."""

    num_layers: StrictInt | None = Field(default=None, ge=1, le=MAX_LAYERS, description="Transformer blocks.")
    hidden: StrictInt | None = Field(default=None, ge=1, le=MAX_HIDDEN, description="Model width.")
    heads: StrictInt | None = Field(
        default=None, ge=1, le=MAX_HEADS, description="Attention heads (must divide hidden)."
    )
    seq_len: StrictInt | None = Field(default=None, ge=1, le=MAX_SEQ_LEN, description="Tokens per sample.")
    max_positions: StrictInt | None = Field(default=None, ge=1, le=MAX_SEQ_LEN, description="Context length.")
    vocab_size: StrictInt | None = Field(default=None, ge=1, le=MAX_VOCAB, description="Vocabulary size.")
    mlp_ratio: StrictInt | None = Field(default=None, ge=1, le=64, description="MLP width over model width.")
    tie_embeddings: StrictBool | None = Field(
        default=None, description="Share the token embedding with the output head."
    )
    kv_heads: StrictInt | None = Field(default=None, ge=1, le=MAX_HEADS, description="Key/value heads (Llama GQA).")
    ffn_hidden: StrictInt | None = Field(
        default=None, ge=1, le=4 * MAX_HIDDEN, description="SwiGLU inner width (Llama)."
    )
    in_features: StrictInt | None = Field(default=None, ge=1, le=MAX_HIDDEN, description="Input features (MLP).")
    num_classes: StrictInt | None = Field(default=None, ge=2, le=MAX_VOCAB, description="Output classes (MLP, ResNet).")
    depth: Literal[18, 34, 50, 101, 152] | None = Field(default=None, description="ResNet depth.")
    image_size: StrictInt | None = Field(default=None, ge=32, le=4096, description="Square input image side (ResNet).")
    width: StrictInt | None = Field(default=None, ge=1, le=1024, description="Channels of the first ResNet stage.")


class ZooModelRef(_Body):
    """A model from the built-in zoo, profiled by the server on the meta device (no weights are allocated)."""

    kind: Literal["zoo"] = Field(description="Union tag.")
    name: str = Field(
        min_length=1, max_length=100, description="Zoo name, see `autopar profile --help`.",
        json_schema_extra=_zoo_names_in_schema,
    )
    options: ZooOptions = Field(default_factory=ZooOptions, description="Size options overriding the preset.")
    dtype: DType | None = Field(default=None, description="Precision of parameters and activations (default: what "
                                "the cluster's devices train in: bfloat16 on GPUs, float32 on CPUs).")


class ProfileModelRef(_Body):
    """A full `ModelProfile` (e.g. the output of `autopar profile`) sent inline."""

    kind: Literal["profile"] = Field(description="Union tag.")
    profile: ModelProfile = Field(description="The profile JSON `autopar profile --out` writes.")


class StoredProfileRef(_Body):
    """A profile uploaded earlier with `POST /v1/profiles`."""

    kind: Literal["profile_id"] = Field(description="Union tag.")
    profile_id: str = Field(min_length=1, max_length=100, description="Id answered by POST /v1/profiles.")


ModelRef = Annotated[ZooModelRef | ProfileModelRef | StoredProfileRef, Field(discriminator="kind")]


class PresetClusterRef(_Body):
    """A built-in cluster preset, optionally resized."""

    kind: Literal["preset"] = Field(description="Union tag.")
    name: str = Field(
        min_length=1, max_length=100, description="Preset name, see GET /v1/clusters.",
        json_schema_extra=_preset_names_in_schema,
    )
    nodes: StrictInt | None = Field(
        default=None, ge=1, le=MAX_NODES, description="Number of nodes (preset's if omitted)."
    )
    gpus_per_node: StrictInt | None = Field(
        default=None, ge=1, le=MAX_GPUS_PER_NODE, description="Devices per node (preset's if omitted)."
    )


class SpecClusterRef(_Body):
    """A full cluster description."""

    kind: Literal["spec"] = Field(description="Union tag.")
    spec: ClusterSpec = Field(description="A cluster description, as in a cluster YAML/JSON file.")


ClusterRef = Annotated[PresetClusterRef | SpecClusterRef, Field(discriminator="kind")]


class PlanOptions(_Body):
    """Search options."""

    objective: Objective = Field(
        default=Objective.THROUGHPUT,
        description="'throughput': shortest step; 'memory': least peak memory among strategies that fit.",
    )
    top_k: StrictInt = Field(default=5, ge=1, le=MAX_TOP_K, description="Alternatives to keep besides the chosen plan.")
    time_limit_s: StrictFloat | None = Field(
        default=None, gt=0, le=3600,
        description="Solver time limit; clamped to the server's cap, server default when omitted.",
    )
    seed: StrictInt = Field(
        default=0, ge=0, le=2**31 - 1, description="Solver seed (plans are deterministic per seed)."
    )


class PlanRequest(_Body):
    """Ask for the best plan for a model on a cluster."""

    model: ModelRef = Field(description="Zoo model, inline profile, or stored profile id (tag: kind).")
    cluster: ClusterRef = Field(description="Preset (+ nodes) or full cluster spec (tag: kind).")
    global_batch_size: StrictInt = Field(ge=1, le=MAX_GLOBAL_BATCH, description="Samples per optimizer step.")
    options: PlanOptions = Field(default_factory=PlanOptions, description="Search options.")


class PlanResponse(BaseModel):
    """A stored plan."""

    id: str = Field(description="Plan id, for GET/DELETE /v1/plans/{id}.")
    created_at: datetime = Field(description="When the plan was first computed (UTC).")
    cached: bool = Field(description="True when the answer came from the store without a new search.")
    request_key: str = Field(description="Content hash of the normalised request; equal requests share it.")
    plan: Plan = Field(description="The plan, as `autopar plan --out` writes it.")


class PlanSummary(BaseModel):
    """One line of the plan list."""

    id: str = Field(description="Plan id.")
    created_at: datetime = Field(description="When the plan was computed (UTC).")
    model_name: str = Field(description="Zoo name or profile name.")
    cluster_name: str = Field(description="Cluster preset or spec name.")
    world_size: int = Field(description="Devices in the cluster.")
    strategy: str = Field(description="One-line strategy, e.g. 'dp=4 tp=2 pp=1 ...'.")
    step_seconds: float = Field(description="Predicted seconds per training step.")


class PlanPage(BaseModel):
    """A page of plans, newest first."""

    items: list[PlanSummary] = Field(description="This page, newest first.")
    total: int = Field(description="Plans stored in all.")
    limit: int = Field(description="Page size used.")
    offset: int = Field(description="Plans skipped before this page.")
    next_offset: int | None = Field(description="Offset of the next page, or null on the last one.")


class EvaluateRequest(_Body):
    """Score a strategy the caller chose (what-if), without searching or storing."""

    model: ModelRef = Field(description="Zoo model, inline profile, or stored profile id (tag: kind).")
    cluster: ClusterRef = Field(description="Preset (+ nodes) or full cluster spec (tag: kind).")
    strategy: Strategy = Field(description="The strategy to score; its world size must match the cluster.")


class EvaluateResponse(BaseModel):
    """The cost model's prediction for the given strategy."""

    strategy: Strategy = Field(description="The strategy scored.")
    prediction: Prediction = Field(description="Step time, throughput and per-rank memory.")
    cached: bool = Field(default=False, description="Answered from the server's cache of equal what-if requests.")


class ProfileCreated(BaseModel):
    """Where an uploaded profile is stored."""

    id: str = Field(description="Content id: uploading the same profile again answers the same id.")
    name: str = Field(description="The profile's model name.")
    num_layers: int = Field(description="Layers in the profile.")
    param_count: int = Field(description="Parameters in the profile.")
    created: bool = Field(description="False when this profile was already stored.")


class StoredProfile(BaseModel):
    """A stored profile."""

    id: str = Field(description="Content id.")
    created_at: datetime = Field(description="When it was first stored (UTC).")
    profile: ModelProfile = Field(description="The stored profile.")


class ClusterList(BaseModel):
    """The built-in cluster presets."""

    presets: list[ClusterSpec] = Field(description="Every preset, at its default size.")


class Health(BaseModel):
    """Liveness / readiness answer."""

    status: str = Field(description="'ok', 'ready', or what is wrong.")
    version: str = Field(description="autopar version.")
    schema_version: int | None = Field(default=None, description="Database schema version (readiness only).")


class ErrorDetail(BaseModel):
    """What went wrong, and where."""

    code: str = Field(description="Stable machine-readable code, e.g. 'validation_error', 'not_found'.")
    message: str = Field(description="Human-readable explanation with the fix.")
    field: str | None = Field(description="Dotted path of the offending request field, when there is one.")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer has this shape."""

    error: ErrorDetail = Field(description="The error.")
