"""Framework overhead on this host: the per-unit host costs the cost model charges on top of FLOPs and bytes.

    .venv/bin/python bench/framework_overhead.py            # 2 gloo processes, one thread each (~1 minute)
    .venv/bin/python bench/framework_overhead.py --quick

Runs `executor.overhead.measure_framework_overhead` (what `autopar calibrate` runs on each rank) on 2 gloo processes
and prints rank 0's figures with the machine's load: the extra seconds of a DTensor tensor-parallel Linear per pass,
of an FSDP2 unit and of each of its parameter tensors per micro-batch, of a DDP bucket, of AdamW per parameter tensor
(plain and DTensor), of a pipeline stage per micro-batch, and of one eager view op with autograd (the per-op
dispatch charged for each dispatched op that launches no kernel), each with the collectives the cost model already
charges taken out (the `latency.*` rows). Also the plain per-kernel overhead (`executor.calibrate.measure_memory`)
for scale. Each figure is the best of repeats; other jobs on the 2 cores make them larger, and runs minutes apart
differ by up to 2x on this shared host (the `cpu` preset takes the median of 3 runs).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rank(rank: int, world: int, port: int, quick: bool, out: str) -> None:
    import json

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from executor.calibrate import measure_memory
    from executor.overhead import measure_framework_overhead

    figures = measure_framework_overhead(quick=quick)
    figures["kernel_overhead_seconds"] = measure_memory(torch.device("cpu"), quick=quick)[2]
    if rank == 0:
        Path(out).write_text(json.dumps(figures))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    import json

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "figures.json")
        os.environ["OMP_NUM_THREADS"] = "1"
        mp.spawn(_rank, args=(2, port, args.quick, out), nprocs=2, join=True)
        figures = json.loads(Path(out).read_text())
    load_after = os.getloadavg()[0]
    print(f"{'figure':40s} {'us':>9s}")
    for key, value in figures.items():
        print(f"{key:40s} {value * 1e6:9.1f}")
    print(f"load average (1 min) {load_before:.2f} before, {load_after:.2f} after, on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
