"""Plan chart: the pipeline timeline (forward / backward per rank per micro-batch) and per-rank memory bars.

matplotlib is imported inside `draw_plan`, so importing the planner never needs it.
"""

from __future__ import annotations

from pathlib import Path

from planner.cluster import ClusterSpec
from planner.evaluate import PlanError
from planner.pipeline import build_timeline
from planner.strategy import Plan, Schedule

GB = 1e9
MAX_MICRO_BATCHES_DRAWN = 16


def draw_plan(plan: Plan, path: str | Path, cluster: ClusterSpec | None = None) -> Path:
    """Write a PNG with the plan's pipeline timeline (top) and per-rank memory breakdown (bottom)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlanError("--chart needs matplotlib: pip install 'autopar[chart]'") from None
    s, p = plan.strategy, plan.prediction
    pp, v = s.dims.pp, s.virtual_stages
    m = min(s.num_micro_batches, MAX_MICRO_BATCHES_DRAWN if s.schedule != Schedule.INTERLEAVED_1F1B
            else max(pp, MAX_MICRO_BATCHES_DRAWN // pp * pp))
    # Per-chunk times: each rank's forward and backward per micro-batch as the cost model counted them, split evenly
    # over its chunks. Plans made before `rank_times` existed get forward = a third of compute, and say so.
    if p.rank_times:
        fwd = [[t.forward / v] * v for t in p.rank_times]
        bwd = [[t.backward / v] * v for t in p.rank_times]
        note = ""
    else:
        per_mb = (p.time.compute + p.time.recompute) / s.num_micro_batches
        fwd_share = p.time.compute / 3 / s.num_micro_batches
        fwd = [[fwd_share / v] * v for _ in range(pp)]
        bwd = [[(per_mb - fwd_share) / v] * v for _ in range(pp)]
        note = " (old plan: per-rank times approximated)"
    slots = build_timeline(fwd, bwd, schedule=s.schedule, num_micro_batches=m)

    fig, (ax_t, ax_m) = plt.subplots(2, 1, figsize=(11, 3 + 0.5 * pp + 3), gridspec_kw={"height_ratios": [pp + 1, 3]})
    for sl in slots:
        color = ("#f4a261" if sl.backward else "#2a9d8f")
        ax_t.barh(sl.rank, sl.end - sl.start, left=sl.start, color=color, edgecolor="white", linewidth=0.5)
        if m <= 16:
            ax_t.text((sl.start + sl.end) / 2, sl.rank, str(sl.micro_batch), ha="center", va="center", fontsize=6)
    ax_t.set_yticks(range(pp), [f"rank {r}" for r in range(pp)])
    ax_t.invert_yaxis()
    ax_t.set_xlabel("seconds (forward green, backward orange; numbers are micro-batches)")
    shown = f" (first {m} of {s.num_micro_batches} micro-batches)" if m < s.num_micro_batches else ""
    ax_t.set_title(f"{plan.kind.value}: {s.describe()}{shown}{note}")

    parts = ["parameters", "gradients", "optimizer_state", "activations", "comm_buffers", "runtime",
             "optimizer_temporaries", "output_buffers"]
    bottom = [0.0] * len(p.memory)
    for name in parts:
        vals = [getattr(mb, name) / GB for mb in p.memory]
        ax_m.bar(range(len(vals)), vals, bottom=bottom, label=name.replace("_", " "))
        bottom = [a + b for a, b in zip(bottom, vals)]
    ax_m.axhline(p.memory[0].capacity / GB, color="red", linestyle="--", label="usable memory")
    ax_m.set_xticks(range(len(p.memory)), [f"rank {r}" for r in range(len(p.memory))])
    ax_m.set_ylabel("GB per device")
    ax_m.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG atomically (a temporary file renamed into place) and close it."""
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
