"""Process group and device mesh for a strategy: one named mesh axis per parallel dimension.

The mesh follows `Strategy.mesh_order` (outermost first, `pp, dp, tp` by default), so the last axis gets consecutive
ranks and tensor-parallel groups stay inside a node.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from executor.errors import ExecutorError
from planner.strategy import MeshAxis, Strategy

log = logging.getLogger(__name__)


def backend_for(device_type: str) -> str:
    """The collective backend for a device type: NCCL on CUDA, gloo on CPU."""
    if device_type == "cuda":
        return "nccl"
    if device_type == "cpu":
        return "gloo"
    raise ExecutorError(f"device type '{device_type}' is not supported; use a cluster whose device type is cuda or cpu")


def device_for(device_type: str, local_rank: int) -> torch.device:
    """The device this process computes on."""
    return torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")


def init_distributed(device_type: str, *, local_rank: int = 0, timeout_s: float = 600.0) -> torch.device:
    """Join the process group (env:// rendezvous as torchrun sets it up); a no-op when already joined.

    Returns the device of this process. `timeout_s` bounds how long a collective may wait for a dead peer.
    """
    device = device_for(device_type, local_rank)
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise ExecutorError("the plan is for CUDA devices but this process sees none; run a CPU plan or use GPUs")
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device_type == "cuda" else {}
        dist.init_process_group(backend_for(device_type), timeout=timedelta(seconds=timeout_s), **kwargs)
    return device


def build_mesh(strategy: Strategy, device_type: str) -> DeviceMesh:
    """A DeviceMesh with one named axis per entry of `strategy.mesh_order` (size-1 axes included)."""
    world = dist.get_world_size()
    if world != strategy.dims.world_size:
        raise ExecutorError(
            f"the plan needs {strategy.dims.world_size} processes but {world} were launched; launch "
            f"nnodes * nproc_per_node = {strategy.dims.world_size}"
        )
    names = tuple(axis.value for axis in strategy.mesh_order)
    shape = tuple(strategy.dims.degree(axis) for axis in strategy.mesh_order)
    log.debug("device mesh %s of shape %s", names, shape)
    return init_device_mesh(device_type, shape, mesh_dim_names=names)


def axis_rank(mesh: DeviceMesh, axis: MeshAxis) -> int:
    """This process's coordinate along one mesh axis."""
    return mesh[axis.value].get_local_rank()
