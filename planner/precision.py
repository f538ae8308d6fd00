"""The one rule for the precision a model is profiled, planned and trained in when nobody says otherwise.

Training runs in what the devices are built for: bfloat16 on GPUs (float16 on a GPU without bfloat16 rates, e.g. a
V100 cluster file), float32 on CPUs. Every entry point (`autopar profile`, `autopar plan`, `autopar run`, Python
`planner.plan`, the service) asks `default_dtype`, so one request gives one profile hash wherever it is made.
"""

from __future__ import annotations

from planner.cluster import ClusterSpec
from planner.errors import AutoparError
from planner.model_profile import DType

#: The precisions `autopar run` can train in, by the name its `--dtype` flag takes.
RUN_DTYPES = {DType.FP32: "float32", DType.TF32: "float32", DType.BF16: "bfloat16", DType.FP16: "float16"}

_NAMES = {
    "float32": DType.FP32, "fp32": DType.FP32, "float": DType.FP32, "tf32": DType.TF32,
    "bfloat16": DType.BF16, "bf16": DType.BF16, "float16": DType.FP16, "fp16": DType.FP16, "half": DType.FP16,
}


def default_dtype(cluster: ClusterSpec | None = None, *, device: str | None = None) -> DType:
    """What the devices train in: the cluster's when given, else that of the device profiled on.

    A cluster of CPU workers trains in float32; a GPU cluster in bfloat16 when its device lists a bfloat16 peak
    rate, else float16, else float32. Without a cluster, 'cpu' means float32 and 'cuda' / 'meta' (an analytic
    profile, made to plan for GPUs) bfloat16.
    """
    if cluster is not None:
        if cluster.device.type == "cpu":
            return DType.FP32
        rates = cluster.device.peak_flops
        return next((d for d in (DType.BF16, DType.FP16) if d in rates), DType.FP32)
    return DType.FP32 if str(device or "meta") == "cpu" else DType.BF16


def parse_dtype(name: str | DType, flag: str = "--dtype") -> DType:
    """A precision by name (float32, bfloat16, float16, tf32 and their short forms); `flag` names it in errors."""
    if isinstance(name, DType):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in _NAMES:
        raise AutoparError(f"unknown precision '{name}' for {flag}; use float32, bfloat16 or float16")
    return _NAMES[key]
