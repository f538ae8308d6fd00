#!/usr/bin/env bash
# GPU check for a maintainer on a machine with one or more CUDA GPUs (under 5 minutes):
# measured CUDA profile of GPT-2 medium, then `autopar run` of DDP, FSDP2 (ZeRO-3), TP and PP plans of it in bf16,
# with measured vs predicted step time and peak memory in one table. See bench/gpu_smoke.py.
#   bash bench/gpu_smoke.sh [--gpus N] [--steps 20] [--global-batch B]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_smoke: $PY has no CUDA torch (or no GPU is visible); install a CUDA build of torch first" >&2
  exit 2
fi
# The project itself without touching the CUDA torch that is already there.
if ! "$PY" -c "import planner, profiler, executor, api, ortools, networkx, typer" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps -e .
  "$PY" -m pip install -q networkx ortools "pydantic>=2.5,<3" fastapi uvicorn typer rich pyyaml numpy
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 290 "$PY" bench/gpu_smoke.py "$@"
