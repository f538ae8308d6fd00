"""What-if chart: tokens/s and cost per million tokens against GPU count, one line per cluster.

matplotlib is imported inside `draw_whatif`, so importing the planner never needs it.
"""

from __future__ import annotations

from pathlib import Path

from planner.chart import save_figure
from planner.evaluate import PlanError
from planner.whatif import CellStatus, WhatIf


def draw_whatif(result: WhatIf, path: str | Path) -> Path:
    """Write a PNG: tokens/s (left, each point annotated with its scaling efficiency) and cost per million tokens
    (right; step time when no price was given) against GPUs, one line per cluster; cells without a plan are listed
    under the plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlanError("--chart needs matplotlib: pip install 'autopar[chart]'") from None
    priced = any(c.cost_per_million_tokens is not None for c in result.cells)
    fig, (ax_t, ax_c) = plt.subplots(1, 2, figsize=(12, 4.8))
    clusters = list(dict.fromkeys(c.cluster for c in result.cells))
    for name in clusters:
        ok = sorted((c for c in result.cells if c.cluster == name and c.status == CellStatus.OK), key=lambda c: c.gpus)
        if not ok:
            continue
        xs = [c.gpus for c in ok]
        (line,) = ax_t.plot(xs, [c.tokens_per_second for c in ok], marker="o", label=name)
        for c in ok:
            ax_t.annotate(f"{c.scaling_efficiency:.0%}", (c.gpus, c.tokens_per_second), textcoords="offset points",
                          xytext=(0, 7), ha="center", fontsize=7, color=line.get_color())
        right = [c.cost_per_million_tokens if priced else c.step_seconds for c in ok]
        pts = [(x, y) for x, y in zip(xs, right) if y is not None]
        if pts:
            ax_c.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name, color=line.get_color())
    for ax in (ax_t, ax_c):
        ax.set_xscale("log", base=2)
        gpus = sorted({c.gpus for c in result.cells})
        ax.set_xticks(gpus, [str(g) for g in gpus])
        ax.set_xlabel("GPUs")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_ylabel("tokens / s")
    ax_t.margins(y=0.12)  # room for the efficiency labels above the top points
    ax_t.set_title("throughput (labels: scaling efficiency per GPU)", fontsize=10)
    ax_c.set_ylabel("$ per million tokens" if priced else "seconds per step")
    ax_c.set_title("cost per million tokens" if priced else "step time (no price given)", fontsize=10)
    missing = [f"{c.cluster} x {c.gpus}: {c.reason}" for c in result.cells if c.status != CellStatus.OK]
    seq = f", seq {result.seq_len}" if result.seq_len else ""
    fig.suptitle(f"what if: {result.model_name} ({result.dtype.value}{seq}), global batch {result.global_batch_size}")
    if missing:
        shown = [m if len(m) <= 110 else m[:107] + "..." for m in missing[:4]]
        more = f" (and {len(missing) - 4} more)" if len(missing) > 4 else ""
        fig.text(0.01, 0.01, "no plan: " + " | ".join(shown) + more, fontsize=6, va="bottom")
    fig.tight_layout(rect=(0, 0.05 if missing else 0, 1, 0.95))
    return save_figure(fig, path)
