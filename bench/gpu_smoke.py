"""GPU check: measured CUDA profile of GPT-2 medium, then `autopar run` of each layout the GPUs allow, in bf16.

    bash bench/gpu_smoke.sh            # all visible GPUs
    python bench/gpu_smoke.py --gpus 1 --steps 20 --global-batch 8

1. Profiles gpt2-medium (355M parameters, the ~350M GPT) on CUDA in bfloat16 with measured per-layer times.
2. Plans each layout from that profile on a cluster preset matching the GPU (H200, H100, A100 80/40 GB) restricted to
   one node of `--gpus` devices: DDP (ZeRO-0), FSDP2 (ZeRO-3), and, with two or more GPUs, tensor parallelism
   (tp = GPUs) and pipeline parallelism (pp = 2, 1F1B). With one GPU every layout is the single-device plan, run once.
3. Runs each plan with `autopar run ... --dtype bfloat16 --steps N` and prints one table: measured against predicted
   step time and peak memory (torch.cuda.max_memory_allocated) per layout.

Needs a CUDA build of torch and NCCL; nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))



def preset_for(device_name: str) -> str:
    """The cluster preset whose device is this GPU."""
    name = device_name.lower()
    if "h200" in name:
        return "hgx-h200"
    if "h100" in name:
        return "dgx-h100"
    if "a100" in name and "40" in name:
        return "dgx-a100-40gb"
    if "a100" in name:
        return "dgx-a100-80gb"
    print(f"warning: no preset for '{device_name}'; predicting with hgx-h200's figures", file=sys.stderr)
    return "hgx-h200"


def layouts(gpus: int) -> dict[str, dict]:
    """Search-space restrictions that pin each layout (planner.enumerate.SearchSpace fields)."""
    if gpus == 1:
        return {"single": {"tp_degrees": [1], "pp_degrees": [1]}}
    out = {
        "ddp": {"zero_stages": [0], "tp_degrees": [1], "pp_degrees": [1]},
        "fsdp2_zero3": {"zero_stages": [3], "tp_degrees": [1], "pp_degrees": [1]},
        f"tp{gpus}": {"tp_degrees": [gpus], "pp_degrees": [1]},
        "pp2_1f1b": {"pp_degrees": [2], "tp_degrees": [1], "schedules": ["1f1b"]},
    }
    return out


def main() -> int:
    import torch

    import planner
    import profiler
    from planner.cluster import load_cluster

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--global-batch", type=int, default=None, help="default: 4 per GPU")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--model", default="gpt2-medium", help="zoo model (default: the 355M GPT-2 medium)")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to check this script's plumbing")
    args = ap.parse_args()
    if args.device == "cuda" and (not torch.cuda.is_available() or args.gpus < 1):
        print("no CUDA device: this check needs a GPU", file=sys.stderr)
        return 2
    gbs = args.global_batch or 4 * args.gpus
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    preset = preset_for(device_name) if args.device == "cuda" else "cpu"
    print(f"{args.gpus} x {device_name}  preset {preset}  torch {torch.__version__}  global batch {gbs}")

    started = time.perf_counter()
    prof = profiler.profile_zoo(args.model, device=args.device, dtype="bfloat16", batch_size=max(1, gbs // args.gpus),
                                cache=False, seq_len=args.seq_len)
    layer_ms = sum((x.fwd_seconds or 0) + (x.bwd_seconds or 0) for x in prof.layers) * prof.input.batch_size * 1e3
    step_ms = prof.step.fwd_bwd_seconds * 1e3 if prof.step else float("nan")
    print(f"measured {args.device} profile of {args.model}: {time.perf_counter() - started:.1f} s; sum of layer times {layer_ms:.1f} ms, "
          f"whole fwd+bwd {step_ms:.1f} ms at batch {prof.input.batch_size}")

    cluster = load_cluster(preset, nodes=1, gpus_per_node=args.gpus)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
        for name, space in layouts(args.gpus).items():
            try:
                plan = planner.plan(prof, cluster, global_batch_size=gbs, time_limit_s=10, **space)
            except planner.AutoparError as exc:
                rows.append((name, "-", f"not planned: {exc}"))
                continue
            plan_path, report_path = Path(tmp) / f"{name}.json", Path(tmp) / f"{name}-report.json"
            plan.to_json(plan_path)
            cmd = [sys.executable, "-m", "api.cli", "run", str(plan_path), "--model", args.model, "--option",
                   f"seq_len={args.seq_len}", "--steps", str(args.steps), "--dtype", "bfloat16", "--report",
                   str(report_path)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
            if proc.returncode != 0 or not report_path.exists():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                rows.append((plan.strategy.describe(), "-", "FAILED: " + " | ".join(tail)))
                continue
            rep = json.loads(report_path.read_text())
            mem = max(rep["memory"], key=lambda m: m["peak_bytes"])
            rows.append((plan.strategy.describe(), f"{time.perf_counter() - t0:.0f}s", rep, mem))
    print()
    print(f"{'layout':58s} {'meas ms':>8s} {'pred ms':>8s} {'ratio':>6s} {'meas GiB':>9s} {'pred GiB':>9s} "
          f"{'ratio':>6s}  wall")
    for row in rows:
        if len(row) == 3:
            print(f"{row[0]:58s} {row[2]}")
            continue
        desc, wall, rep, mem = row
        meas, pred = rep["measured_step_seconds"], rep["predicted_step_seconds"]
        got, want = mem["peak_bytes"] / 2**30, (mem["predicted_bytes"] or 0) / 2**30
        print(f"{desc:58s} {meas * 1e3:8.1f} {pred * 1e3:8.1f} {meas / pred:6.2f} {got:9.2f} {want:9.2f} "
              f"{(got / want if want else float('nan')):6.2f}  {wall}")
    return 0 if all(len(r) == 4 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
