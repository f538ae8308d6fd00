"""Framework overhead per unit of work, as the executor runs it: the host-side costs of DTensor tensor parallelism,
FSDP2 units, the optimizer's per-tensor loop and torch.distributed.pipelining's schedule.

On small models (and on CPU) a step is mostly this bookkeeping, not FLOPs or bytes. Each figure is measured on a
tiny layer (so bytes do not matter) as the extra time over the same work on plain tensors, with the collectives the
cost model already charges (`planner.cost.CommModel`) timed alone and taken out, so nothing is counted twice:

- `tp_module_overhead_seconds`: a TP-sharded `nn.Linear` (ColwiseParallel / RowwiseParallel, as `executor.parallelize.
  apply_tp` shards) forward + backward less a plain Linear of the local shard's size (less the rowwise output's
  all-reduce), per module per pass (forward or backward: the pair divided by 2);
- `fsdp_unit_overhead_seconds` / `fsdp_tensor_overhead_seconds`: forward + backward of tiny `fully_shard` layers
  (reshard after forward, gradient sync every micro-batch: ZeRO-3 as `executor.parallelize.apply_fsdp` wraps)
  fitted against the number of units and of parameter tensors per unit, less the plain layers, less each unit's two
  all-gathers and one reduce-scatter: per unit, and per tensor of a unit, per micro-batch;
- `ddp_bucket_overhead_seconds`: forward + backward of tiny layers under DDP (one bucket) less the plain layers and
  the bucket's all-reduce (the per-tensor slope is printed as `ddp.per_tensor`; it stays within the noise here);
- `optimizer_tensor_seconds` / `optimizer_dtensor_seconds`: `torch.optim.AdamW` (the executor's default optimizer,
  `executor.sources`) step + zero_grad over many tiny parameters, per tensor, plain and FSDP2-sharded (DTensor);
- `pipeline_microbatch_overhead_seconds`: a 2-stage `Schedule1F1B` over tiny stages fitted against the micro-batch
  count, less each stage's plain forward + backward and its two point-to-point sends: per micro-batch per stage;
- `transcendental_element_seconds`: GELU / softmax / log-softmax / exp per element on a 1M-element tensor, less a
  multiply's memory traffic (`measure_transcendental`, one process);
- `op_dispatch_seconds`: one eager aten op that launches no kernel, a `view` of a tensor that requires grad (Python
  binding, dispatcher, autograd's view node): what each of a layer's views and aliases costs on the host (one process,
  no collectives).

Every rank calls `measure_framework_overhead` at the same time (the timings use collectives, so every rank runs the
same number of calls); each figure is the best of a few repeats. Used by `autopar calibrate` (executor.calibrate) and
bench/framework_overhead.py.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

#: torch >= 2.10 names them *_single (the old names warn), as executor.calibrate uses them.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_WIDTH = 8  # features of the tiny layers: every op is dispatch, not arithmetic


def lockstep_seconds(fn: Callable[[], object], *, iters: int, repeats: int, group=None) -> float:
    """Best of `repeats` mean seconds over `iters` calls of `fn`, every rank calling it the same number of times."""
    fn()
    best = math.inf
    for _ in range(repeats):
        if group is not False and dist.is_initialized():
            dist.barrier(group=group)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def _fwd_bwd(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        module(x).sum().backward()
    return step


def _slope(xs: list[int], ts: list[float]) -> float:
    """Least-squares slope of seconds against a count."""
    mx, mt = sum(xs) / len(xs), sum(ts) / len(ts)
    return sum((x - mx) * (t - mt) for x, t in zip(xs, ts)) / sum((x - mx) ** 2 for x in xs)


def measure_collective_latency(mesh, *, iters: int, repeats: int) -> dict[str, float]:
    """Seconds of a tiny all-reduce, all-gather, reduce-scatter and one-way send over `mesh` (the parts the cost
    model charges as communication, taken out of the framework figures)."""
    group, n = mesh.get_group(), mesh.size()
    full, part = torch.ones(_WIDTH * n), torch.ones(_WIDTH)
    out = {
        "all_reduce": lockstep_seconds(lambda: dist.all_reduce(full, group=group), iters=iters, repeats=repeats),
        "all_gather": lockstep_seconds(lambda: _all_gather(full, part, group=group), iters=iters, repeats=repeats),
        "reduce_scatter": lockstep_seconds(lambda: _reduce_scatter(part, full, group=group), iters=iters,
                                           repeats=repeats),
    }
    rank, peer = dist.get_rank(), dist.get_global_rank(group, 1)
    first = dist.get_global_rank(group, 0)

    def round_trip() -> None:
        if rank == first:
            dist.send(part, peer)
            dist.recv(part, peer)
        elif rank == peer:
            dist.recv(part, first)
            dist.send(part, first)

    out["send"] = lockstep_seconds(round_trip, iters=iters, repeats=repeats) / 2
    return out


def measure_tp_module(mesh, latency: dict[str, float], *, iters: int, repeats: int) -> float:
    """Extra seconds of a TP-sharded Linear per pass over a plain Linear of its local size (see module docs).

    A Megatron pair (colwise then rowwise) on a (batch, sequence, features) input that needs its gradient, as inside
    a model: its two all-reduces (the rowwise output in forward, the colwise input gradient in backward) are taken
    out, the rest is divided over two modules and two passes.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    n, w = mesh.size(), _WIDTH * mesh.size()
    x = torch.randn(2, 4, w, requires_grad=True)
    plain = lockstep_seconds(_fwd_bwd(nn.Sequential(nn.Linear(w, w // n), nn.Linear(w // n, w)), x), iters=iters,
                             repeats=repeats)
    pair = parallelize_module(nn.Sequential(nn.Linear(w, w), nn.Linear(w, w)), mesh,
                              {"0": ColwiseParallel(), "1": RowwiseParallel()})
    sharded = lockstep_seconds(_fwd_bwd(pair, x), iters=iters, repeats=repeats)
    return max((sharded - plain - 2 * latency["all_reduce"]) / 4, 0.0)


def _tiny_stack(layers: int, linears: int = 1) -> nn.Sequential:
    """`layers` units of `linears` tiny Linears each (two parameter tensors per Linear)."""
    return nn.Sequential(*[nn.Sequential(*[nn.Linear(_WIDTH, _WIDTH) for _ in range(linears)])
                           for _ in range(layers)])


def measure_fsdp_unit(mesh, latency: dict[str, float], *, iters: int, repeats: int) -> tuple[float, float]:
    """(seconds per `fully_shard` unit, seconds per parameter tensor of a unit) per micro-batch (ZeRO-3), the unit's
    two all-gathers and one reduce-scatter taken out (see module docs).

    Three layouts: 2 and 8 units of one Linear, and 2 units of 4 Linears; extra = units x (a + b x tensors) + c.
    """
    from torch.distributed.fsdp import fully_shard

    x = torch.randn(4, _WIDTH)
    extra = []
    for units, linears in ((2, 1), (8, 1), (2, 4)):
        plain = lockstep_seconds(_fwd_bwd(_tiny_stack(units, linears), x), iters=iters, repeats=repeats)
        model = _tiny_stack(units, linears)
        for layer in model:
            fully_shard(layer, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, reshard_after_forward=False)
        extra.append(lockstep_seconds(_fwd_bwd(model, x), iters=iters, repeats=repeats) - plain)
    per_tensor = max((extra[2] - extra[0]) / (2 * (8 - 2)), 0.0)  # 2 units, 2 -> 8 tensors each
    per_unit = (extra[1] - extra[0]) / (8 - 2) - 2 * per_tensor  # 2 -> 8 units of 2 tensors
    return max(per_unit - 2 * latency["all_gather"] - latency["reduce_scatter"], 0.0), per_tensor


def measure_ddp(mesh, latency: dict[str, float], *, iters: int, repeats: int) -> tuple[float, float]:
    """(seconds per step, seconds per parameter tensor) DDP adds to forward + backward of N tiny layers (one bucket)
    beyond the plain layers and its one all-reduce: the bucket's preparation and the autograd hook of each tensor."""
    from torch.nn.parallel import DistributedDataParallel

    counts, extra = (2, 8), []
    x = torch.randn(4, _WIDTH)
    for layers in counts:
        plain = lockstep_seconds(_fwd_bwd(_tiny_stack(layers), x), iters=iters, repeats=repeats)
        ddp = DistributedDataParallel(_tiny_stack(layers), process_group=mesh.get_group(),
                                      gradient_as_bucket_view=True)
        extra.append(lockstep_seconds(_fwd_bwd(ddp, x), iters=iters, repeats=repeats) - plain - latency["all_reduce"])
    per_tensor = _slope(list(counts), extra) / 2  # weight and bias per layer
    return max(extra[0] - per_tensor * 2 * counts[0], 0.0), max(per_tensor, 0.0)


def measure_optimizer(mesh, *, tensors: int, iters: int, repeats: int) -> tuple[float, float | None]:
    """(seconds per plain tensor, seconds per FSDP2-sharded tensor) of AdamW's step + zero_grad; the second is None
    without a mesh."""
    def per_tensor(params: list[torch.Tensor]) -> float:
        opt = torch.optim.AdamW(params, lr=1e-3)

        def step() -> None:
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
            opt.zero_grad(set_to_none=True)

        def grads_only() -> None:
            for p in params:
                p.grad = torch.ones_like(p)
            opt.zero_grad(set_to_none=True)

        t = lockstep_seconds(step, iters=iters, repeats=repeats, group=False)
        t0 = lockstep_seconds(grads_only, iters=iters, repeats=repeats, group=False)
        return max(t - t0, 0.0) / len(params)

    plain = per_tensor([nn.Parameter(torch.randn(_WIDTH * 2)) for _ in range(tensors)])
    if mesh is None:
        return plain, None
    from torch.distributed.fsdp import fully_shard

    model = _tiny_stack(tensors // 2)
    fully_shard(model, mesh=mesh)
    return plain, per_tensor(list(model.parameters()))


def measure_pipeline(mesh, latency: dict[str, float], *, iters: int, repeats: int) -> float:
    """Extra seconds per micro-batch per stage of a 2-stage `Schedule1F1B` (see module docs)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    rank = mesh.get_local_rank()
    group = mesh.get_group()
    counts, per_step = (2, 8), []
    for m in counts:
        stage_mod = _tiny_stack(1, 4)
        stage = PipelineStage(stage_mod, stage_index=rank, num_stages=2, device=torch.device("cpu"), group=group)
        sched = Schedule1F1B(stage, n_microbatches=m, loss_fn=lambda out, tgt: out.sum())
        x = torch.randn(m, 4, _WIDTH)

        def step(sched=sched, x=x) -> None:
            if rank == 0:
                sched.step(x)
            else:
                sched.step(target=x)

        per_step.append(lockstep_seconds(step, iters=iters, repeats=repeats, group=group))
    x1 = torch.randn(1, 4, _WIDTH, requires_grad=True)
    plain = lockstep_seconds(_fwd_bwd(_tiny_stack(1, 4), x1), iters=iters, repeats=repeats, group=False)
    # Per micro-batch the slowest stage does its forward and backward and makes its two sends (cost model's R).
    return max(_slope(list(counts), per_step) - plain - 2 * latency["send"], 0.0)


def measure_op_dispatch(*, iters: int, repeats: int) -> float:
    """Seconds of one cheap view op with autograd (`x.view(...)` of a tensor that requires grad), best of repeats."""
    x = torch.randn(_WIDTH, requires_grad=True)
    batch = 100  # views per timed call, so the loop and the clock are a small part of each sample

    def views() -> None:
        for _ in range(batch):
            x.view(2, _WIDTH // 2)

    return lockstep_seconds(views, iters=iters, repeats=repeats, group=False) / batch


def measure_transcendental(*, repeats: int, numel: int = 1 << 20) -> float:
    """Seconds per element of the ops that evaluate exp / log / tanh / erf (`profiler.transcendental`) beyond their
    memory traffic: GELU (tanh) forward and backward, softmax, log-softmax forward and backward and exp on a
    `numel`-element fp32 tensor (beyond the caches, like a layer's activations), each less a multiply of the same
    tensor per element (its reads and writes), best of repeats; their mean."""
    import torch.nn.functional as F

    x = torch.randn(numel // 1024, 1024)
    g = torch.randn_like(x)
    y = torch.log_softmax(x, -1)
    aten = torch.ops.aten
    ops = [lambda: F.gelu(x, approximate="tanh"), lambda: aten.gelu_backward(g, x, approximate="tanh"),
           lambda: torch.softmax(x, -1), lambda: torch.log_softmax(x, -1),
           lambda: aten._log_softmax_backward_data(g, y, -1, torch.float32), lambda: torch.exp(x)]
    base = lockstep_seconds(lambda: x * 1.5, iters=3, repeats=repeats, group=False)
    extra = [max(lockstep_seconds(op, iters=3, repeats=repeats, group=False) - base, 0.0) for op in ops]
    return sum(extra) / len(extra) / numel


def measure_framework_overhead(*, quick: bool = False) -> dict[str, float]:
    """This rank's framework overheads (module docs); every rank must call it. With one process only the plain
    optimizer's per-tensor cost and the per-op dispatch are measured. Keys are `planner.cluster.DeviceSpec` field names (plus the tiny
    collectives' seconds, prefixed `latency.`)."""
    iters, repeats = (10, 3) if quick else (20, 5)
    torch.manual_seed(0)
    world = dist.get_world_size() if dist.is_initialized() else 1
    mesh = None
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
    plain_opt, dtensor_opt = measure_optimizer(mesh, tensors=32 if quick else 64, iters=iters, repeats=repeats)
    out = {"optimizer_tensor_seconds": plain_opt,
           "op_dispatch_seconds": measure_op_dispatch(iters=iters, repeats=repeats * 2),
           "transcendental_element_seconds": measure_transcendental(repeats=repeats * 2)}
    if mesh is None:
        return out
    # Tiny collectives on a shared host vary several-fold from sample to sample: many samples, the best of them.
    latency = measure_collective_latency(mesh, iters=iters * 2, repeats=repeats * 4)
    out["optimizer_dtensor_seconds"] = dtensor_opt
    out["tp_module_overhead_seconds"] = measure_tp_module(mesh, latency, iters=iters, repeats=repeats)
    out["fsdp_unit_overhead_seconds"], out["fsdp_tensor_overhead_seconds"] = measure_fsdp_unit(
        mesh, latency, iters=iters, repeats=repeats * 2)  # a difference of differences: more samples
    out["ddp_bucket_overhead_seconds"], out["ddp.per_tensor"] = measure_ddp(mesh, latency, iters=iters,
                                                                            repeats=repeats)
    if world == 2:  # the schedule's stages are the two ranks
        out["pipeline_microbatch_overhead_seconds"] = measure_pipeline(mesh, latency, iters=iters, repeats=repeats)
    out.update({f"latency.{k}": v for k, v in latency.items()})
    log.info("framework overhead: %s", out)
    return out
