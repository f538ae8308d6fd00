"""What if: the best plan of one model on every (cluster, GPU count) cell, and what losing nodes costs.

`whatif(profile, clusters, gpus, global_batch)` plans each cell with `planner.plan` from the one profile it is given
(the caller profiles once) and tabulates step time, tokens/s, MFU, peak memory, scaling efficiency and, given a
price per GPU-hour, the cost per million tokens. A cell that cannot be planned (its GPU count is not a whole number
of nodes, the global batch cannot be split over it, the model does not fit) carries the reason instead of failing
the table. `lose_nodes(plan, k, profile)` re-plans a plan on its cluster with `k` nodes fewer at the same global
batch. Pure: no I/O, no torch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from enum import Enum

from pydantic import BaseModel, Field

from planner.budget import PlanCancelled
from planner.cluster import ClusterSpec
from planner.errors import AutoparError
from planner.model_profile import DType, ModelProfile
from planner.planning import plan as make_plan
from planner.precision import default_dtype
from planner.strategy import Plan

log = logging.getLogger(__name__)

#: Search budget of one cell, in seconds: a grid of 8 cells of a 1.5B-parameter model plans within 20 s on 2 cores
#: (most cells close their search well before it); `autopar plan` keeps its own 10 s default.
CELL_TIME_LIMIT_S = 1.0


class WhatIfError(AutoparError):
    """A what-if request that cannot be answered as asked (the message names the fix)."""


class CellStatus(str, Enum):
    """How a cell ended."""

    OK = "ok"  #: planned: the numbers are the best plan's
    NO_PLAN = "no_plan"  #: the planner found no strategy (does not fit, or the batch cannot be split); see reason
    INVALID = "invalid"  #: the GPU count does not map to whole nodes of the cluster; see reason


class WhatIfCell(BaseModel):
    """One (cluster, GPU count) combination and its best plan's prediction (numbers are None unless status is ok)."""

    cluster: str = Field(description="Cluster preset or spec name.")
    gpus: int = Field(ge=1, description="GPUs asked for.")
    nodes: int | None = Field(default=None, description="Nodes used (None when the count does not map to nodes).")
    gpus_per_node: int | None = Field(default=None, description="GPUs used on each node.")
    status: CellStatus = Field(description="ok, no_plan or invalid.")
    reason: str | None = Field(default=None, description="Why the cell has no plan (one line), else None.")
    strategy: str | None = Field(default=None, description="The best strategy in one line (Strategy.describe).")
    dp: int | None = Field(default=None, description="Data-parallel degree of the best strategy.")
    tp: int | None = Field(default=None, description="Tensor-parallel degree of the best strategy.")
    pp: int | None = Field(default=None, description="Pipeline-parallel degree of the best strategy.")
    step_seconds: float | None = Field(default=None, description="Predicted seconds per optimizer step.")
    tokens_per_second: float | None = Field(default=None, description="Predicted training tokens per second.")
    mfu: float | None = Field(default=None, description="Model FLOPs utilisation (0..1).")
    peak_memory_bytes: float | None = Field(default=None, description="Largest per-device memory of the plan.")
    scaling_efficiency: float | None = Field(
        default=None, description="Tokens/s per GPU over that of the same cluster's smallest planned GPU count.")
    scaling_baseline_gpus: int | None = Field(default=None, description="GPU count the efficiency is relative to.")
    price_per_gpu_hour: float | None = Field(default=None, description="Price used for the cost, when given.")
    cost_per_million_tokens: float | None = Field(
        default=None, description="price x gpus / 3600 / tokens_per_second x 1e6, when a price is given.")
    plan_seconds: float = Field(default=0.0, ge=0, description="Wall-clock seconds planning this cell took.")


class WhatIf(BaseModel):
    """The what-if table: one cell per (cluster, GPU count), clusters outer, GPU counts ascending inner."""

    model_name: str = Field(description="The profile's model name.")
    profile_hash: str = Field(description="Hash of the profile every cell was planned from.")
    dtype: DType = Field(description="Precision of that profile.")
    seq_len: int | None = Field(default=None, description="Tokens per sample.")
    global_batch_size: int = Field(ge=1, description="Samples per optimizer step in every cell.")
    cell_time_limit_s: float = Field(gt=0, description="Search budget each cell had.")
    cells: list[WhatIfCell] = Field(description="The cells, clusters outer, GPU counts ascending inner.")
    seconds: float = Field(default=0.0, ge=0, description="Wall-clock seconds the whole grid took.")

    def cell(self, cluster: str, gpus: int) -> WhatIfCell:
        """The cell of `cluster` at `gpus` GPUs (KeyError when the grid has none)."""
        for c in self.cells:
            if c.cluster == cluster and c.gpus == gpus:
                return c
        raise KeyError(f"no cell for {cluster} at {gpus} GPUs")


def cell_shape(cluster: ClusterSpec, gpus: int) -> tuple[int, int]:
    """(nodes, GPUs per node) for `gpus` GPUs of `cluster`'s nodes: whole nodes, or part of one node below a node.

    A count above one node that is not a multiple of it raises WhatIfError with the reason in one line.
    """
    per = cluster.gpus_per_node
    if gpus <= per:
        return 1, gpus
    if gpus % per:
        raise WhatIfError(f"{gpus} GPUs is not a whole number of {per}-GPU {cluster.name} nodes; use a multiple of "
                          f"{per}")
    return gpus // per, per


def grid_dtype(clusters: Sequence[ClusterSpec], dtype: DType | None = None) -> DType:
    """The one precision to profile a grid's model in: `dtype`, else what every cluster trains in.

    Clusters that train in different precisions (a CPU preset beside GPU ones) need `dtype` given explicitly.
    """
    if dtype is not None:
        return dtype
    found = {c.name: default_dtype(c) for c in clusters}
    kinds = set(found.values())
    if len(kinds) > 1:
        pairs = ", ".join(f"{name} trains in {d.value}" for name, d in found.items())
        raise WhatIfError(f"the clusters train in different precisions ({pairs}); give the precision to compare "
                          "them in (--dtype / model.dtype)")
    return kinds.pop() if kinds else DType.BF16


def _price_for(price: float | Mapping[str, float] | None, cluster: str) -> float | None:
    if price is None or isinstance(price, (int, float)):
        return price
    return price.get(cluster)


def _plan_cell(profile: ModelProfile, cluster: ClusterSpec, gpus: int, global_batch: int, time_limit_s: float,
               seed: int, cancel: threading.Event | None) -> WhatIfCell:
    started = time.perf_counter()
    try:
        nodes, per = cell_shape(cluster, gpus)
    except WhatIfError as exc:
        return WhatIfCell(cluster=cluster.name, gpus=gpus, status=CellStatus.INVALID, reason=str(exc))
    base = {"cluster": cluster.name, "gpus": gpus, "nodes": nodes, "gpus_per_node": per}
    try:
        spec = cluster.with_overrides(nodes=nodes, gpus_per_node=per)
        best = make_plan(profile, spec, global_batch_size=global_batch, top_k=1, time_limit_s=time_limit_s, seed=seed,
                    cancel=cancel)
    except PlanCancelled:
        raise  # the caller abandoned the whole grid
    except AutoparError as exc:
        reason = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        return WhatIfCell(**base, status=CellStatus.NO_PLAN, reason=reason,
                          plan_seconds=time.perf_counter() - started)
    p, d = best.prediction, best.strategy.dims
    return WhatIfCell(
        **base, status=CellStatus.OK, strategy=best.strategy.describe(), dp=d.dp, tp=d.tp, pp=d.pp,
        step_seconds=p.step_seconds, tokens_per_second=p.tokens_per_second, mfu=p.mfu,
        peak_memory_bytes=max(m.total for m in p.memory), plan_seconds=time.perf_counter() - started,
    )


def _with_economics(cells: list[WhatIfCell], price: float | Mapping[str, float] | None) -> list[WhatIfCell]:
    """Scaling efficiency against each cluster's smallest planned count, and cost per million tokens."""
    baseline: dict[str, WhatIfCell] = {}
    for c in sorted((c for c in cells if c.status == CellStatus.OK), key=lambda c: c.gpus):
        baseline.setdefault(c.cluster, c)
    out = []
    for c in cells:
        if c.status != CellStatus.OK:
            out.append(c)
            continue
        ref = baseline[c.cluster]
        assert c.tokens_per_second is not None and ref.tokens_per_second is not None
        update: dict[str, object] = {
            "scaling_efficiency": (c.tokens_per_second / c.gpus) / (ref.tokens_per_second / ref.gpus),
            "scaling_baseline_gpus": ref.gpus,
        }
        rate = _price_for(price, c.cluster)
        if rate is not None:
            update["price_per_gpu_hour"] = rate
            update["cost_per_million_tokens"] = rate * c.gpus / 3600 / c.tokens_per_second * 1e6
        out.append(c.model_copy(update=update))
    return out


def whatif(profile: ModelProfile, clusters: Sequence[ClusterSpec], gpus: Sequence[int], global_batch: int, *,
           price_per_gpu_hour: float | Mapping[str, float] | None = None,
           cell_time_limit_s: float = CELL_TIME_LIMIT_S, seed: int = 0, cancel: threading.Event | None = None,
           progress: Callable[[WhatIfCell], None] | None = None) -> WhatIf:
    """The best plan of `profile` on every (cluster, GPU count) cell, at `global_batch` samples per step.

    `clusters` are specs whose device, links and `gpus_per_node` define a node (their `nodes` is replaced per
    cell); `gpus` are total GPU counts (`cell_shape` maps them to nodes). `price_per_gpu_hour` is one price for every
    cluster or a price per cluster name (clusters without one get no cost). Each cell's search gets
    `cell_time_limit_s` (see `planner.plan`'s `time_limit_s`); `cancel` stops the grid with `PlanCancelled`;
    `progress` is called with each cell as it is planned (before efficiency and cost, which need the whole row).
    """
    if global_batch < 1:
        raise WhatIfError(f"the global batch must be >= 1, got {global_batch}")
    if not clusters or not gpus:
        raise WhatIfError("a what-if grid needs at least one cluster and one GPU count")
    if any(n < 1 for n in gpus):
        raise WhatIfError(f"GPU counts must be >= 1, got {sorted(gpus)}")
    names = [c.name for c in clusters]
    if len(set(names)) != len(names):
        raise WhatIfError(f"cluster names repeat ({', '.join(names)}); give each cluster once")
    if isinstance(price_per_gpu_hour, Mapping):
        unknown = sorted(set(price_per_gpu_hour) - set(names))
        if unknown:
            raise WhatIfError(f"prices given for clusters not in the grid: {', '.join(unknown)}; price only "
                              f"{', '.join(names)}")
        prices = list(price_per_gpu_hour.values())
    else:
        prices = [] if price_per_gpu_hour is None else [price_per_gpu_hour]
    if any(not 0 < p < float("inf") for p in prices):
        raise WhatIfError(f"a price per GPU-hour must be a positive number, got {prices}")
    started = time.perf_counter()
    cells = []
    for cluster in clusters:
        for n in sorted(set(gpus)):
            if cancel is not None and cancel.is_set():
                raise PlanCancelled("the what-if request was abandoned by its caller; its work was stopped")
            cell = _plan_cell(profile, cluster, n, global_batch, cell_time_limit_s, seed, cancel)
            log.info("what-if %s x %d: %s", cluster.name, n, cell.strategy or cell.reason)
            if progress is not None:
                progress(cell)
            cells.append(cell)
    return WhatIf(model_name=profile.name, profile_hash=profile.profile_hash, dtype=profile.dtype,
                  seq_len=profile.input.seq_len, global_batch_size=global_batch, cell_time_limit_s=cell_time_limit_s,
                  cells=_with_economics(cells, price_per_gpu_hour), seconds=time.perf_counter() - started)


class NodeLoss(BaseModel):
    """A plan and its re-plan with `lost_nodes` nodes fewer at the same global batch."""

    lost_nodes: int = Field(ge=1, description="Nodes taken away.")
    before: Plan = Field(description="The plan as given.")
    after: Plan = Field(description="The best plan on the smaller cluster.")

    @property
    def slowdown(self) -> float:
        """How many times longer a step takes after the loss (after / before step time)."""
        return self.after.prediction.step_seconds / self.before.prediction.step_seconds


def check_lose_nodes(cluster: ClusterSpec, k: int) -> None:
    """Refuse (WhatIfError, one line) to take `k` nodes from `cluster` unless at least one node is left."""
    if k < 1:
        raise WhatIfError(f"--lose-nodes must be >= 1, got {k}")
    if k >= cluster.nodes:
        raise WhatIfError(f"the plan's cluster has {cluster.nodes} node(s) of {cluster.gpus_per_node} GPUs: losing "
                          f"{k} leaves none; give --lose-nodes below {cluster.nodes}")


def lose_nodes(plan: Plan, k: int, profile: ModelProfile, *, time_limit_s: float = 10.0, seed: int = 0,
               cancel: threading.Event | None = None) -> NodeLoss:
    """Re-plan `plan`'s model (`profile`, profiled as the plan's provenance says) on its cluster with `k` nodes fewer
    at the plan's global batch; `time_limit_s` is the search budget (`planner.plan`'s default)."""
    cluster = plan.provenance.cluster
    check_lose_nodes(cluster, k)
    smaller = cluster.with_overrides(nodes=cluster.nodes - k)
    after = make_plan(profile, smaller, global_batch_size=plan.strategy.global_batch_size, time_limit_s=time_limit_s,
                      seed=seed, cancel=cancel, model_options=dict(plan.provenance.model_options) or None)
    return NodeLoss(lost_nodes=k, before=plan, after=after)
