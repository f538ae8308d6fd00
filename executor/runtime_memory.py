"""The runtime's own per-rank memory once training runs: what `autopar calibrate` measures for
`DeviceSpec.runtime_memory_bytes` and `DeviceSpec.dtensor_runtime_memory_bytes`.

A process that has joined the process group grows by more than its model's tensors the first time it trains: the
autograd engine's worker threads and their stacks, the optimizer's per-parameter state objects, the gloo (or NCCL)
communicators' buffers of the device mesh, Python objects of the modules and hooks; on CUDA, the CUDA context and
NCCL's buffers, which `torch.cuda.max_memory_allocated` never sees; and the one-time state each kind of kernel sets up
the first time it runs (on CPU, about 1 MiB of private memory for a transformer's cross-entropy, attention and their
backward beyond what Linears and AdamW set up). `measure_runtime_memory` trains a negligible transformer-shaped model
(an embedding, LayerNorm, Linears, causal scaled_dot_product_attention, GELU and a cross-entropy loss, so that those
kernels run; its tensors are a few KiB) for a few steps as the executor would, measured by the same measure the run
report uses (`executor.train`: private RSS on CPU; on CUDA the device memory in use less what the caching allocator
reserved):

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

_WIDTH, _HEADS, _VOCAB, _SEQ, _LAYERS, _STEPS = 8, 2, 16, 4, 2, 3


class _Block(nn.Module):
    """Pre-norm attention and GELU MLP, each with a residual add (a few hundred parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(_WIDTH)
        self.qkv, self.proj = nn.Linear(_WIDTH, 3 * _WIDTH), nn.Linear(_WIDTH, _WIDTH)
        self.fc = nn.Linear(_WIDTH, _WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(self.ln(x)).view(b, s, 3, _HEADS, _WIDTH // _HEADS).transpose(1, 3).unbind(2)
        attn = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, _WIDTH))
        return x + self.fc(nn.functional.gelu(x, approximate="tanh"))


def _model(device: torch.device) -> nn.Sequential:
    """Embedding, blocks and a vocabulary head: the kernels a transformer's step runs, on negligible tensors."""
    layers = [nn.Embedding(_VOCAB, _WIDTH), *[_Block() for _ in range(_LAYERS)], nn.Linear(_WIDTH, _VOCAB)]
    return nn.Sequential(*layers).to(device)


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
    ids = torch.randint(0, _VOCAB, (2, _SEQ + 1), device=device)
    for _ in range(_STEPS):
        logits = model(ids[:, :-1])
        nn.functional.cross_entropy(logits.reshape(-1, _VOCAB), ids[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def measure_runtime_memory(device: torch.device) -> tuple[float, float]:
    """(runtime bytes, DTensor extra bytes) of this rank: the growth of training a negligible model under DDP, and
    the further growth under FSDP2 (module docstring). Call on every rank at once, right after joining the group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from executor.train import restart_peak_window

    dist.barrier()
    restart_peak_window(device, keep=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = _device_in_use(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    ids = [device.index] if device.type == "cuda" else None
    _train(DistributedDataParallel(_model(device), device_ids=ids, process_group=mesh.get_group(),
                                   gradient_as_bucket_view=True), device)
    dist.barrier()
    runtime = max(_device_peak(device) - start, 0)
    restart_peak_window(device, keep=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    middle = _device_in_use(device)
    model = _model(device)
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _train(model, device)
    dist.barrier()
    dtensor = max(_device_peak(device) - middle, 0)
    return float(runtime), float(dtensor)
