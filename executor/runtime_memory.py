"""The runtime's own per-rank memory once training runs: what `autopar calibrate` measures for
`DeviceSpec.runtime_memory_bytes` and `DeviceSpec.dtensor_runtime_memory_bytes`.

A process that has joined the process group grows by more than its model's tensors the first time it trains: the
autograd engine's worker threads and their stacks, the optimizer's per-parameter state objects, the gloo (or NCCL)
communicators' buffers of the device mesh, Python objects of the modules and hooks; on CUDA, the CUDA context and
NCCL's buffers, which `torch.cuda.max_memory_allocated` never sees. `measure_runtime_memory` trains a negligible
model (tiny Linears, so its tensors are a few KiB) for a few steps as the executor would, measured by the same
measure the run report uses (`executor.train`: private RSS on CPU; on CUDA the device memory in use less what the
caching allocator reserved):

1. DDP (the executor's plain data-parallel path, which pipeline stages and plain tensors share): the growth is the
   runtime's fixed memory;
2. the same model under FSDP2 (`fully_shard`: DTensor parameters, as ZeRO and tensor parallelism use): the further
   growth is DTensor's and FSDP2's own (sharding-propagation caches, per-parameter FSDP state and its hooks).

Every rank runs it at the same time, first thing after joining the group (before other measurements leave freed
memory behind for these steps to reuse).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

_WIDTH, _LAYERS, _STEPS = 8, 4, 3


def _device_in_use(device: torch.device) -> int:
    """Bytes this process holds on its device by the run report's measure, CUDA context and NCCL included."""
    from executor.train import current_memory_bytes

    if device.type == "cuda":  # device memory used by the process beyond the caching allocator's reserve
        free, total = torch.cuda.mem_get_info(device)
        return int(total - free)
    return current_memory_bytes(device)


def _device_peak(device: torch.device) -> int:
    from executor.train import peak_memory_bytes

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(total - free - torch.cuda.memory_reserved(device) + torch.cuda.max_memory_allocated(device))
    return peak_memory_bytes(device)


def _train(model: nn.Module, device: torch.device) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(4, _WIDTH, device=device)
    for _ in range(_STEPS):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def measure_runtime_memory(device: torch.device) -> tuple[float, float]:
    """(runtime bytes, DTensor extra bytes) of this rank: the growth of training a negligible model under DDP, and
    the further growth under FSDP2 (module docstring). Call on every rank at once, right after joining the group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from executor.train import restart_peak_window

    def stack() -> nn.Sequential:
        return nn.Sequential(*[nn.Linear(_WIDTH, _WIDTH) for _ in range(_LAYERS)]).to(device)

    dist.barrier()
    restart_peak_window(device, keep=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = _device_in_use(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    ids = [device.index] if device.type == "cuda" else None
    _train(DistributedDataParallel(stack(), device_ids=ids, process_group=mesh.get_group(),
                                   gradient_as_bucket_view=True), device)
    dist.barrier()
    runtime = max(_device_peak(device) - start, 0)
    restart_peak_window(device, keep=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    middle = _device_in_use(device)
    model = stack()
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _train(model, device)
    dist.barrier()
    dtensor = max(_device_peak(device) - middle, 0)
    return float(runtime), float(dtensor)
