"""One deadline and one cancellation flag bound the whole `planner.plan` call, graph preparation included."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
from service_support import HIDDEN, SEQ, _layer, tiny_profile

import planner
from planner.budget import Budget, PlanCancelled, PlanTimeout
from planner.cluster import load_cluster
from planner.evaluate import prepare
from planner.model_profile import DType, InputSpec, LayerEdge, ModelProfile, ProfileMode, TensorSpec
from planner.search import search


@pytest.fixture(scope="module")
def wide_profile() -> ModelProfile:
    """512 layers and 65k distinct long-range edges (each first-half layer feeds each second-half one): summing
    what each pipeline cut sends touches ~16M (edge, cut) pairs, seconds of CPU, like the issue's 5.5 MiB profile."""
    n = 512
    layers = [_layer(i, f"blocks.{i}", 12 * HIDDEN * HIDDEN) for i in range(n)]
    names = ["<input>", *(x.name for x in layers), "<output>"]
    edges = [LayerEdge(src=a, dst=b, bytes=1.0) for a, b in itertools.pairwise(names)]
    half = n // 2
    edges += [LayerEdge.model_construct(src=names[1 + a], dst=names[1 + half + b], bytes=1.0)
              for a in range(half) for b in range(half)]
    return ModelProfile(
        name="wide", structure_hash="0123456789abcdef", dtype=DType.FP32, device="meta", mode=ProfileMode.ANALYTIC,
        input=InputSpec(batch_size=1, seq_len=SEQ, tensors=[TensorSpec(shape=[1, SEQ], dtype="int64")]),
        layers=layers, edges=edges, cut_points=list(range(1, n)), profile_seconds=0.0,
    )


def test_graph_preparation_stops_at_the_budgets_hard_deadline(wide_profile):
    cluster = load_cluster("cpu")
    started = time.perf_counter()
    with pytest.raises(PlanTimeout, match=r"time limit of 0.5 s \(plus 0 s of grace\) ran out while .*larger time"):
        prepare(wide_profile, cluster, Budget(0.5, grace_s=0))
    # Unbounded, this preparation takes seconds; the budget stops it at 0.5 s plus one check interval.
    assert time.perf_counter() - started < 1.5


def test_cancel_flag_stops_graph_preparation_from_another_thread(wide_profile):
    cancel = threading.Event()
    timer = threading.Timer(0.2, cancel.set)
    timer.start()
    started = time.perf_counter()
    try:
        with pytest.raises(PlanCancelled, match="abandoned by its caller"):
            planner.plan(wide_profile, "cpu", global_batch_size=8, time_limit_s=60, cancel=cancel)
    finally:
        timer.cancel()
    assert time.perf_counter() - started < 2.0


def test_cancelled_budget_stops_the_search_before_any_solve():
    cluster = load_cluster("cpu")
    view = prepare(tiny_profile(), cluster)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(PlanCancelled, match="abandoned"):
        search(view, cluster, global_batch_size=8, budget=Budget(60, cancel))


def test_an_unset_cancel_flag_changes_nothing():
    profile = tiny_profile()
    plain = planner.plan(profile, "cpu", global_batch_size=8, time_limit_s=2)
    flagged = planner.plan(profile, "cpu", global_batch_size=8, time_limit_s=2, cancel=threading.Event())
    assert flagged.strategy == plain.strategy
    assert flagged.prediction == plain.prediction
