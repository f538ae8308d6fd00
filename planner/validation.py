"""Physical ranges every number of a profile, cluster or plan must lie in, shared by the contracts' validators.

The pydantic models in `planner.model_profile`, `planner.cluster` and `planner.strategy` call `check_fields` from a
model validator, so the CLI, the Python API and the service refuse the same inputs: NaN, infinities, and values so
large (or, for rates, so small) that no real model or machine has them and the cost model would overflow.
"""

from __future__ import annotations

import math

from pydantic import BaseModel

#: FLOPs of one sample through one layer (or the whole model); 1e21 is ~1000x a trillion-parameter model's token.
MAX_FLOPS = 1e21
#: Bytes of anything one device holds or moves per sample (1 EB).
MAX_BYTES = 1e18
#: Seconds any measured or predicted span may last (~115 days).
MAX_SECONDS = 1e7
#: Bytes/s of a link or of device memory: 1 kB/s .. 1 PB/s.
BANDWIDTH_RANGE = (1e3, 1e15)
#: Dense peak FLOP/s of one device: 1 MFLOP/s .. 1 EFLOP/s.
PEAK_FLOPS_RANGE = (1e6, 1e18)


def check_number(field: str, value: float, low: float | None = None, high: float | None = None,
                 unit: str = "") -> float:
    """`value` if finite and within [low, high) when given; a ValueError naming `field` and the fix otherwise."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{field} is {value}; every number must be finite: give the counted or measured value")
    if (low is not None and value < low) or (high is not None and value >= high):
        span = f"[{low if low is not None else -math.inf:g}, {high if high is not None else math.inf:g})"
        raise ValueError(f"{field} = {value:g} is outside the physical range {span}{' ' + unit if unit else ''}; "
                         "check its units (bytes, seconds, FLOPs, bytes/s) and give a real value")
    return value


def _range_for(name: str) -> tuple[float, float, str] | None:
    if name.endswith("flops"):
        return 0.0, MAX_FLOPS, "FLOPs"
    if name == "bytes" or name.endswith("_bytes"):
        return 0.0, MAX_BYTES, "bytes"
    if name.endswith("seconds"):
        return 0.0, MAX_SECONDS, "s"
    return None


def check_fields(model: BaseModel, *, bounded: bool = True) -> None:
    """Check every float field of `model` is finite and, when `bounded`, every FLOPs / bytes / seconds field
    (by its name's suffix) lies in its physical range. Nested models check themselves."""
    for name, value in model:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        rng = _range_for(name) if bounded else None
        if rng is None:
            check_number(name, value)
        else:
            check_number(name, value, rng[0], rng[1], rng[2])
