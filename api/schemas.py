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
from planner.export import Format, Target
from planner.model_profile import DType, ModelProfile
from planner.run_record import RunRecord
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
    calibrated: StrictBool = Field(
        default=False, description="Fit the cluster's efficiency factors to this server's stored runs of the same "
                                   "cluster name (POST /v1/runs) before searching; the plan's provenance says so.")


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


#: Most (cluster, GPU count) cells one what-if request may ask for.
MAX_WHATIF_CELLS = 32
#: Most clusters, and most GPU counts, one what-if request may list.
MAX_WHATIF_AXIS = 16

PositivePrice = Annotated[StrictFloat, Field(gt=0, le=1e6)]


class WhatIfOptions(_Body):
    """Search options of a what-if grid."""

    cell_time_limit_s: StrictFloat | None = Field(
        default=None, gt=0, le=3600, description="Search budget of each cell (default 1 s); clamped so the whole grid "
        "stays within the server's solver cap.")
    seed: StrictInt = Field(default=0, ge=0, le=2**31 - 1, description="Solver seed.")


class WhatIfRequest(_Body):
    """Plan one model on every (cluster preset, GPU count) combination at one global batch."""

    model: Annotated[ZooModelRef | StoredProfileRef, Field(discriminator="kind")] = Field(
        description="Zoo model or stored profile id (tag: kind); profiled once for the whole grid.")
    clusters: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        min_length=1, max_length=MAX_WHATIF_AXIS, description="Cluster preset names (GET /v1/clusters); a cell "
        "uses whole nodes of the preset, or part of one node below a node.")
    gpus: list[Annotated[StrictInt, Field(ge=1, le=MAX_NODES * MAX_GPUS_PER_NODE)]] = Field(
        min_length=1, max_length=MAX_WHATIF_AXIS, description="Total GPU counts, e.g. [8, 16, 32].")
    global_batch_size: StrictInt = Field(ge=1, le=MAX_GLOBAL_BATCH, description="Samples per optimizer step.")
    price_per_gpu_hour: PositivePrice | dict[str, PositivePrice] | None = Field(
        default=None, description="Price of one GPU-hour, for every cluster or per cluster name: gives each cell "
        "its cost per million tokens.")
    options: WhatIfOptions = Field(default_factory=WhatIfOptions, description="Search options.")


class ExportRequest(_Body):
    """Export a stored plan as the configuration of a trainer."""

    target: Target = Field(description="torchtitan, megatron, deepspeed, accelerate or lightning.")
    format: Format | None = Field(default=None, description="torchtitan: args (default) or toml; the other targets "
                                  "have one format each.")


class ExportResponse(BaseModel):
    """A plan as a trainer's configuration (what `autopar export` writes)."""

    target: Target = Field(description="The trainer exported for.")
    format: Format = Field(description="The text's format.")
    text: str = Field(description="The configuration text.")
    file_name: str = Field(description="A file name to save the text under.")
    warnings: list[str] = Field(description="What the target cannot express of the plan, one line each.")


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


class StoredRun(BaseModel):
    """A stored run record."""

    id: str = Field(description="Run id.")
    plan_linked: bool = Field(description="True when the record's plan_id names a plan stored here.")
    record: RunRecord = Field(description="The record, as `autopar run` writes it.")


class RunSummary(BaseModel):
    """One line of the run list."""

    id: str = Field(description="Run id.")
    created: datetime = Field(description="When the run finished (UTC).")
    plan_id: str | None = Field(description="Service id of the plan that ran, if it was made here.")
    model_name: str = Field(description="Model reference the run built.")
    cluster_name: str = Field(description="Cluster the plan was made for.")
    strategy: str = Field(description="One-line strategy.")
    measured_step_seconds: float = Field(description="Measured median seconds per step.")
    predicted_step_seconds: float = Field(description="Predicted seconds per step.")
    step_time_ratio: float = Field(description="Measured over predicted step time.")


class RunPage(BaseModel):
    """A page of runs, newest first."""

    items: list[RunSummary] = Field(description="This page, newest first.")
    total: int = Field(description="Runs matching the filters.")
    limit: int = Field(description="Page size used.")
    offset: int = Field(description="Runs skipped before this page.")
    next_offset: int | None = Field(description="Offset of the next page, or null on the last one.")


class ErrorDetail(BaseModel):
    """What went wrong, and where."""

    code: str = Field(description="Stable machine-readable code, e.g. 'validation_error', 'not_found'.")
    message: str = Field(description="Human-readable explanation with the fix.")
    field: str | None = Field(description="Dotted path of the offending request field, when there is one.")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer has this shape."""

    error: ErrorDetail = Field(description="The error.")
