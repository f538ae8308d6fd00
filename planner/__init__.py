"""autopar planner: from a `ModelProfile` and a `ClusterSpec` to the best parallel `Plan`.

This package never imports torch, so a plan can be made from a profile file alone.
"""

from planner.cluster import ClusterError, ClusterSpec, DeviceSpec, LinkSpec, load_cluster, preset_names
from planner.errors import AutoparError
from planner.evaluate import PlanError, evaluate
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
from planner.planning import PLANNER_VERSION, plan
from planner.search import Objective
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

__version__ = "0.1.0"

__all__ = [
    "PLANNER_VERSION",
    "AutoparError",
    "ClusterError",
    "ClusterSpec",
    "DType",
    "DeviceSpec",
    "InputSpec",
    "LayerEdge",
    "LayerProfile",
    "LinkSpec",
    "MeshAxis",
    "ModelProfile",
    "Objective",
    "ParallelDims",
    "Plan",
    "PlanError",
    "PlanKind",
    "Prediction",
    "ProfileMode",
    "Recompute",
    "Schedule",
    "ShardStyle",
    "StageSpec",
    "Strategy",
    "TPShard",
    "TensorParallelSpec",
    "TensorSpec",
    "ZeroStage",
    "evaluate",
    "load_cluster",
    "plan",
    "preset_names",
]
