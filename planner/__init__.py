"""autopar planner: from a `ModelProfile` and a `ClusterSpec` to the best parallel `Plan`.

This package never imports torch, so a plan can be made from a profile file alone.
"""

from planner.errors import AutoparError
from planner.cluster import ClusterError, ClusterSpec, DeviceSpec, LinkSpec, load_cluster, preset_names
from planner.model_profile import (
    DType,
    InputSpec,
    LayerEdge,
    LayerProfile,
    ModelProfile,
    ProfileMode,
    ShardStyle,
    TensorParallelSpec,
    TensorSpec,
    TPShard,
)
from planner.strategy import (
    MeshAxis,
    ParallelDims,
    Plan,
    PlanKind,
    Prediction,
    Recompute,
    Schedule,
    StageSpec,
    Strategy,
    ZeroStage,
)

from planner.evaluate import PlanError, evaluate
from planner.planning import PLANNER_VERSION, plan
from planner.search import Objective

__version__ = "0.1.0"

__all__ = [
    "AutoparError", "ClusterError", "ClusterSpec", "DeviceSpec", "LinkSpec", "load_cluster", "preset_names",
    "DType", "InputSpec", "LayerEdge", "LayerProfile", "ModelProfile", "ProfileMode", "ShardStyle",
    "TensorParallelSpec", "TensorSpec", "TPShard",
    "MeshAxis", "ParallelDims", "Plan", "PlanKind", "Prediction", "Recompute", "Schedule", "StageSpec", "Strategy",
    "ZeroStage", "plan", "evaluate", "PlanError", "Objective", "PLANNER_VERSION",
]
