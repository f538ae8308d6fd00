"""Physical ranges every number of a profile, cluster or plan must lie in, shared by the contracts' validators.

The pydantic models in `planner.model_profile`, `planner.cluster` and `planner.strategy` call `check_fields` from a
model validator, so the CLI, the Python API and the service refuse the same inputs: NaN, infinities, and values so
large (or, for rates, so small) that no real model or machine has them and the cost model would overflow.
"""

from __future__ import annotations

import functools
import math
import types
import typing

from pydantic import BaseModel, ConfigDict, model_validator

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


def _scalar_kind(annotation: object) -> tuple[str, str] | None:
    """(container, scalar) for fields of JSON scalars pydantic's lax mode would coerce: container is 'one', 'list'
    or 'dict', scalar 'number' (int / float) or 'bool'; None for anything else."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in (int, float):
        return "one", "number"
    if annotation is bool:
        return "one", "bool"
    if origin in (typing.Union, types.UnionType):
        kinds = {_scalar_kind(a) for a in args if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    inner = _scalar_kind(args[0]) if origin in (list, tuple) and args else None
    if inner is not None and inner[0] == "one":
        return "list", inner[1]
    inner = _scalar_kind(args[1]) if origin is dict and len(args) == 2 else None
    if inner is not None and inner[0] == "one":
        return "dict", inner[1]
    return None


def _wrong(value: object, scalar: str) -> bool:
    if scalar == "bool":
        return not isinstance(value, bool)
    return isinstance(value, bool) or not isinstance(value, int | float)


@functools.cache
def _scalar_fields(model: type[BaseModel]) -> tuple[tuple[str, str, str], ...]:
    """(field, container, scalar) for the fields of `model` that hold JSON scalars (see `_scalar_kind`)."""
    out = []
    for name, field in model.model_fields.items():
        kind = _scalar_kind(field.annotation)
        if kind is not None:
            out.append((name, *kind))
    return tuple(out)


def reject_lax_scalars(model: type[BaseModel], data: object) -> object:
    """Refuse values pydantic's lax mode would coerce: true / false or a string where a contract wants a number,
    0 / 1 or a string where it wants a boolean. Called from the contracts' `mode="before"` validators (Python and
    JSON input alike), so the CLI, the Python API and the service refuse the same inputs.
    """
    if not isinstance(data, dict):
        return data
    for name, container, scalar in _scalar_fields(model):
        value = data.get(name)
        if value is None:
            continue
        if container == "one":
            if type(value) in (int, float) and scalar == "number" or type(value) is bool and scalar == "bool":
                continue  # the common case, decided without building a list
            items = [value]
        elif container == "dict":
            items = list(value.values()) if isinstance(value, dict) else []
        else:
            items = list(value) if isinstance(value, list | tuple) else []
        bad = next((v for v in items if _wrong(v, scalar)), _NOTHING)
        if bad is not _NOTHING:
            want = "true or false" if scalar == "bool" else "a number"
            raise ValueError(f"{name} holds {bad!r} where {want} is expected; give {want}")
    return data


_NOTHING = object()


class Contract(BaseModel):
    """Base of the planner's JSON contracts (profile, cluster, strategy and plan): unknown fields refused, instances
    frozen, and no lax coercion of scalars (`reject_lax_scalars`). Each contract module adds its own range checks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_lax_scalars(cls, data: object) -> object:
        return reject_lax_scalars(cls, data)
