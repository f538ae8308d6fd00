"""A plain hand-written DDP training script: the baseline `executor_overhead.py` compares `autopar run` against.

    torchrun --standalone --nproc-per-node 2 bench/scripts/ddp_baseline.py --steps 30 --batch-per-rank 8 --out times.json

Same model (zoo gpt-tiny with the given size options), AdamW, synthetic token batches; rank 0 writes its per-step
(wall, CPU) times (each step ends with the loss read back, as a script that logs its loss does).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from profiler.zoo import get_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-per-rank", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    zoo = get_model("gpt-tiny", hidden=args.hidden, num_layers=args.layers)
    torch.manual_seed(0)
    model = DistributedDataParallel(zoo.build("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    times = []
    for step in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        inputs, targets = zoo.synthetic_batch(args.batch_per_rank, seed=step * world + rank)
        loss = zoo.loss(model(*inputs), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        times.append((time.perf_counter() - start, time.process_time() - cpu_start))
        if rank == 0 and step % 10 == 0:
            print(f"step {step} loss {value:.4f}", flush=True)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(times, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
