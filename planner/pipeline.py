"""Pipeline schedules: step time from per-rank times, and the timeline the chart draws.

Step time with unequal ranks. Let R_r be the time pipeline rank r spends on one micro-batch (forward + backward of
all its layers, with its sends), R_max the slowest rank and S = sum_r R_r. The slowest rank is busy m * R_max per
step. Before its first forward can start, the micro-batch has to pass through the ranks before it, and after its
last backward the gradient has to flow back through them; in the warm-up and drain every other rank contributes its
own time once (a flow shop of m identical jobs: makespan = S + (m - 1) R_max). So

    step = m * R_max + (S - R_max)          (GPipe and 1F1B; equal ranks give the familiar (m + p - 1) R)

and the bubble is S - R_max, i.e. (p - 1) stage-times for equal stages. With interleaving each rank holds v model
chunks and the warm-up / drain pass through chunks (1/v of a rank) instead of whole ranks:

    step = m * R_max + (S - R_max) / v.

GPipe and 1F1B take the same time; 1F1B holds fewer micro-batches (see `planner.memory.in_flight`).
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.strategy import Schedule


def estimate_pipeline_seconds(rank_seconds: list[float], *, num_micro_batches: int, virtual_stages: int) -> float:
    """Forward + backward wall time of all micro-batches, from per-rank per-micro-batch times."""
    slowest = max(rank_seconds)
    return num_micro_batches * slowest + (sum(rank_seconds) - slowest) / virtual_stages


@dataclass(frozen=True)
class Slot:
    """One box of the timeline: `rank` runs the forward (or backward) of `micro_batch` on model chunk `chunk`."""

    rank: int
    chunk: int
    micro_batch: int
    backward: bool
    start: float
    end: float


def build_timeline(
    fwd: list[list[float]], bwd: list[list[float]], *, schedule: Schedule, num_micro_batches: int
) -> list[Slot]:
    """Simulate the schedule with per-(rank, chunk) forward / backward times; returns every slot (for the chart).

    `fwd[r][c]` is the forward time of chunk c on rank r for one micro-batch. The simulation orders each rank's
    work as the schedule does (GPipe: all forwards then all backwards; 1F1B: p - r warm-up forwards then
    alternating; interleaved: chunks round-robin) and starts each slot when its input is ready.
    """
    pp, v, m = len(fwd), len(fwd[0]), num_micro_batches
    n = pp * v
    orders = [_rank_order(r, pp, v, m, schedule) for r in range(pp)]
    done: dict[tuple[int, int, bool], float] = {}  # (stage, micro_batch, backward) -> finish time
    free = [0.0] * pp
    pos = [0] * pp
    slots: list[Slot] = []
    while any(pos[r] < len(orders[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while pos[r] < len(orders[r]):
                c, mb, back = orders[r][pos[r]]
                stage = c * pp + r
                if back:
                    dep = (stage + 1, mb, True) if stage < n - 1 else (stage, mb, False)
                else:
                    dep = (stage - 1, mb, False) if stage > 0 else None
                if dep is not None and dep not in done:
                    break
                start = max(free[r], done[dep] if dep is not None else 0.0)
                end = start + (bwd[r][c] if back else fwd[r][c])
                done[(stage, mb, back)] = end
                free[r] = end
                slots.append(Slot(rank=r, chunk=c, micro_batch=mb, backward=back, start=start, end=end))
                pos[r] += 1
                progressed = True
        if not progressed:  # cannot happen for the schedules above; guards against an endless loop
            raise RuntimeError("pipeline timeline deadlocked")
    return slots


def _rank_order(r: int, pp: int, v: int, m: int, schedule: Schedule) -> list[tuple[int, int, bool]]:
    """(chunk, micro_batch, backward) in the order rank r executes them."""
    if schedule == Schedule.GPIPE:
        return [(0, i, False) for i in range(m)] + [(0, i, True) for i in range(m)]
    # Forward and backward work units in schedule order; chunks advance every pp micro-batches (Megatron).
    fwd_units = [((k // pp) % v, (k // (pp * v)) * pp + k % pp, False) for k in range(m * v)]
    bwd_units = [(v - 1 - (k // pp) % v, (k // (pp * v)) * pp + k % pp, True) for k in range(m * v)]
    warm = min(m * v, (pp - r) if v == 1 else 2 * (pp - r - 1) + (v - 1) * pp + 1)
    order = fwd_units[:warm]
    f, b = warm, 0
    while b < m * v:
        order.append(bwd_units[b])
        b += 1
        if f < m * v:
            order.append(fwd_units[f])
            f += 1
    return order
