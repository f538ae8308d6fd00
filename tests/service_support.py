"""Shared helpers of the service tests: a hand-written tiny profile, request bodies, an app on a temp db."""

from __future__ import annotations

import itertools
import threading
import warnings
from pathlib import Path
from typing import Any

from api.app import create_app
from api.settings import Settings
from planner.cluster import load_cluster
from planner.model_profile import (
    DType,
    InputSpec,
    LayerEdge,
    LayerProfile,
    ModelProfile,
    ProfileMode,
    TensorSpec,
)
from planner.strategy import (
    MemoryBreakdown,
    ParallelDims,
    Plan,
    PlanKind,
    Prediction,
    Provenance,
    StageSpec,
    Strategy,
    TimeBreakdown,
)

with warnings.catch_warnings():
    # Starlette's notice that its TestClient will move to httpx2 (not installed here) is not about this project.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: F401  (re-exported for the tests)

SEQ = 32
HIDDEN = 64


def _layer(index: int, name: str, params: int) -> LayerProfile:
    # Per-sample figures of a hidden-64, seq-32 layer: 2 FLOPs per MAC per token, backward twice forward.
    fwd = 2.0 * params * SEQ
    act = 4.0 * SEQ * HIDDEN
    return LayerProfile(
        index=index, name=name, module_type="Block" if name.startswith("blocks") else name.title(),
        param_count=params, param_bytes=4 * params, fwd_flops=fwd, bwd_flops=2 * fwd, fwd_bytes=2 * act,
        bwd_bytes=4 * act, saved_activation_bytes=6 * act, input_bytes=act, output_bytes=act,
    )


def tiny_profile(name: str = "hand-tiny") -> ModelProfile:
    """A 4-layer float32 profile written by hand (embed, two blocks, head): no profiler involved."""
    layers = [
        _layer(0, "embed", 512 * HIDDEN + 64 * HIDDEN),
        _layer(1, "blocks.0", 12 * HIDDEN * HIDDEN),
        _layer(2, "blocks.1", 12 * HIDDEN * HIDDEN),
        _layer(3, "head", HIDDEN * 512),
    ]
    names = ["<input>"] + [layer.name for layer in layers] + ["<output>"]
    edges = [LayerEdge(src=a, dst=b, bytes=4.0 * SEQ * HIDDEN) for a, b in itertools.pairwise(names)]
    return ModelProfile(
        name=name, structure_hash="0123456789abcdef", dtype=DType.FP32, device="meta", mode=ProfileMode.ANALYTIC,
        input=InputSpec(batch_size=1, seq_len=SEQ, tensors=[TensorSpec(shape=[1, SEQ], dtype="int64")]),
        layers=layers, edges=edges, cut_points=[1, 2, 3], profile_seconds=0.0,
    )


def zoo_request(batch: int = 8, *, nodes: int = 1, time_limit_s: float = 2.0, **options: Any) -> dict[str, Any]:
    """A plan request for gpt-tiny on the cpu preset."""
    return {
        "model": {"kind": "zoo", "name": "gpt-tiny", "options": options, "dtype": "float32"},
        "cluster": {"kind": "preset", "name": "cpu", "nodes": nodes},
        "global_batch_size": batch,
        "options": {"time_limit_s": time_limit_s, "top_k": 2},
    }


def profile_request(profile: ModelProfile | None = None, batch: int = 8) -> dict[str, Any]:
    """A plan request carrying the hand-written profile inline."""
    return {
        "model": {"kind": "profile", "profile": (profile or tiny_profile()).model_dump(mode="json")},
        "cluster": {"kind": "preset", "name": "cpu"},
        "global_batch_size": batch,
        "options": {"time_limit_s": 2.0, "top_k": 2},
    }


def make_app(db: Path, **settings: Any):
    """An app on a fresh database file with test-sized limits."""
    defaults = {"max_solver_seconds": 5.0, "request_timeout_s": 60.0, "profile_cache_dir": Path(db).parent / "cache"}
    return create_app(Settings(db_path=db, **{**defaults, **settings}))


def canned_plan(profile: ModelProfile, cluster_name: str = "cpu", *, batch: int = 8) -> Plan:
    """A valid plain data-parallel plan, for tests that replace the search (not a prediction of anything)."""
    cluster = load_cluster(cluster_name)
    world = cluster.world_size
    strategy = Strategy(
        dims=ParallelDims(dp=world, tp=1, pp=1, world_size=world), micro_batch_size=max(1, batch // world),
        num_micro_batches=1, stages=[StageSpec(start=0, stop=profile.num_layers)],
    )
    memory = MemoryBreakdown(parameters=1, gradients=1, optimizer_state=2, activations=1, comm_buffers=0, total=5,
                             capacity=cluster.device.memory_bytes)
    prediction = Prediction(
        step_seconds=1.0, time=TimeBreakdown(compute=1, recompute=0, bubble=0, exposed_comm=0, optimizer=0),
        samples_per_second=batch, tokens_per_second=batch * SEQ, model_flops_per_gpu=1.0,
        hardware_flops_per_gpu=1.0, mfu=0.1, memory=[memory], fits=True,
    )
    return Plan(
        kind=PlanKind.DATA, strategy=strategy, prediction=prediction,
        explanation="canned plan for a service test",
        provenance=Provenance(model_name=profile.name, profile_hash=profile.profile_hash, cluster=cluster,
                              planner_version="test", search_seconds=0.0, solver_status="OPTIMAL",
                              candidates_evaluated=1),
    )


class BlockingSearch:
    """Stands in for planner.plan: counts calls and, when asked, holds each search until released."""

    def __init__(self, *, block: bool = False) -> None:
        self.calls = 0
        self.started = threading.Event()
        self.release = threading.Event()
        if not block:
            self.release.set()
        self._lock = threading.Lock()

    def __call__(self, model: ModelProfile, cluster: Any, *, global_batch_size: int, **_: Any) -> Plan:
        with self._lock:
            self.calls += 1
        self.started.set()
        if not self.release.wait(timeout=30):
            raise TimeoutError("test search was never released")
        return canned_plan(model, cluster.name, batch=global_batch_size)
