"""Measure the devices and links of the cluster a plan is for: the timings behind `autopar calibrate`.

The launcher (`launch_calibration`, called by api/cli_calibrate.py on every node) starts `python -m executor.calibrate
SPEC.json` on each rank through torchrun, as `autopar run` starts its workers; gloo on CPU, NCCL on CUDA. Every rank
then measures the runtime's own memory (`executor.runtime_memory`) and times, at the same time as the others (so that ranks sharing a host's cores or memory see the load training
would put on them):

- GEMMs of a range of shapes in each requested dtype (`measure_gemms`),
- a large copy (memory bandwidth) and chains of tiny ops, with and without autograd (the fixed per-kernel cost);
- on CPU, the framework overheads of DTensor TP, FSDP2 units, the optimizer per tensor and the pipeline schedule
  (`executor.overhead`);

and rank 0 keeps the median over ranks. Then the communication: all-reduce, all-gather and reduce-scatter over
groups of 2..nproc ranks of node 0 and, with several nodes, over groups spanning them, plus point-to-point
ping-pong inside and across nodes, at several message sizes. Rank 0 writes the raw `Measurements` as JSON beside
the spec; `planner.cluster_fit` turns them into a `ClusterSpec`. Device timings are the best of a few repeats, so
other load on the machine counts as little as possible. Collectives and sends are timed as a training step issues
them: each call alone, after every rank has computed for a moment (`_BURST_SECONDS`), the median of several calls;
back-to-back calls in a loop are faster than any a step makes on a host whose ranks share cores.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field

from executor.errors import ExecutorError
from executor.mesh import init_distributed
from planner.cluster_fit import MEASURED_DEVICE_FIELDS, Collective, CommSample, GemmSample, Measurements
from planner.model_profile import DType, write_text_atomic

log = logging.getLogger(__name__)

MEASUREMENTS_FILE = "measurements.json"
PROGRESS_FILE = "progress.txt"

#: Square GEMM sizes per device type (quick, full); large enough to reach the ceiling, small enough to show the ramp.
_GEMM_SIZES = {"cpu": ((64, 128, 256, 512, 1024), (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536)),
               "cuda": ((256, 512, 1024, 2048, 4096, 8192), (128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096,
                                                             6144, 8192))}
#: Message sizes in bytes per member for collectives (quick, full): up to where bandwidth dominates the latency.
_COMM_BYTES = {"cpu": ((2**12, 2**16, 2**20, 2**23), tuple(2**k for k in range(10, 26, 2)) + (2**25,)),
               "cuda": ((2**16, 2**20, 2**24, 2**28), tuple(2**k for k in range(12, 31, 2)))}
_COPY_BYTES = {"cpu": 64 * 2**20, "cuda": 2 * 2**30}


class CalibrationError(ExecutorError):
    """The calibration could not run or measure (what failed and what to do)."""


class CalibrateSpec(BaseModel):
    """What every rank of a calibration run measures."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_type: str = Field(description="'cuda' or 'cpu'.")
    dtypes: list[DType] = Field(min_length=1, description="GEMM precisions to time; the first sets the GEMM ramp.")
    nnodes: int = Field(ge=1)
    nproc_per_node: int = Field(ge=1)
    quick: bool = Field(default=False, description="Fewer shapes, sizes and repeats (about a minute on 2 CPU cores).")
    framework: bool = Field(default=True, description="On CPU, also measure the executor's framework overheads "
                            "(executor.overhead: DTensor, FSDP2, optimizer, pipeline; ~40 s on 2 cores).")
    timeout_s: float = Field(default=300.0, gt=0, description="Longest wait of a collective for a peer.")


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def best_seconds(fn: Callable[[], object], *, sync: Callable[[], None] = lambda: None, repeats: int = 5,
                 sample_seconds: float = 0.02) -> float:
    """Seconds of one call of `fn`: the best of `repeats` samples, each enough calls to last ~`sample_seconds`."""
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    inner = max(1, min(10_000, int(sample_seconds / max(time.perf_counter() - t0, 1e-7))))
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def _torch_dtype(dtype: DType, device: torch.device) -> torch.dtype:
    if dtype == DType.TF32:
        if device.type != "cuda":
            raise CalibrationError("tf32 exists only on CUDA devices; calibrate float32 / bfloat16 on CPU")
        return torch.float32
    return getattr(torch, dtype.value)


def gemm_shapes(device_type: str, quick: bool) -> list[tuple[int, int, int]]:
    """(m, n, k) shapes timed per dtype: squares, plus thin ones as TP-split and small-batch GEMMs are."""
    sizes = _GEMM_SIZES[device_type][0 if quick else 1]
    thin = [(sizes[-2], sizes[1], sizes[-2]), (sizes[-2], sizes[-2], sizes[1])]
    return [(s, s, s) for s in sizes] + thin


def measure_gemms(dtypes: list[DType], device: torch.device, *, quick: bool,
                  progress: Callable[[str], None] = lambda what: None) -> list[GemmSample]:
    """Best-of-repeats seconds of `torch.mm` over `gemm_shapes` in each dtype."""
    sync = _sync(device)
    out = []
    for dtype in dtypes:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = dtype == DType.TF32
        td = _torch_dtype(dtype, device)
        for m, n, k in gemm_shapes(device.type, quick):
            a, b = torch.randn(m, k, device=device, dtype=td), torch.randn(k, n, device=device, dtype=td)
            t = best_seconds(lambda a=a, b=b: torch.mm(a, b), sync=sync, repeats=3 if quick else 5)
            out.append(GemmSample(dtype=dtype, m=m, n=n, k=k, seconds=t))
        progress(f"GEMMs {dtype.value}")
    return out


def _copy_bytes_per_second(device: torch.device, sync: Callable[[], None], repeats: int) -> float:
    src = torch.empty(_COPY_BYTES[device.type] // 4, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / best_seconds(lambda: dst.copy_(src), sync=sync, repeats=repeats)


def measure_memory(device: torch.device, *, quick: bool) -> tuple[float, float, float]:
    """(copy bytes/s, dispatch seconds, kernel overhead seconds): a large copy (bytes read + written), a tiny op
    alone, and a chain of tiny ops forward and backward with autograd (per kernel)."""
    sync = _sync(device)
    repeats = 3 if quick else 7
    copy = _copy_bytes_per_second(device, sync, repeats)
    tiny = torch.randn(4, device=device)
    dispatch = best_seconds(lambda: tiny * 1.0001, sync=sync, repeats=repeats)
    p = torch.randn(4, device=device, requires_grad=True)

    def chain() -> None:
        v = p
        for _ in range(100):
            v = v * 1.0001
        v.sum().backward()

    overhead = best_seconds(chain, sync=sync, repeats=repeats) / 200  # 100 forward + 100 backward kernels
    return copy, dispatch, overhead


def measure_device(dtypes: tuple[DType, ...] = (DType.FP32, DType.BF16), *, quick: bool = False) -> dict[str, float]:
    """This process's device constants on one thread (the `cpu` preset's figures; bench/fidelity_cpu.py --measure)."""
    from planner.cluster_fit import fit_gemm

    torch.set_num_threads(1)
    device = torch.device("cpu")
    gemms = measure_gemms(list(dtypes), device, quick=quick)
    copy, dispatch, overhead = measure_memory(device, quick=quick)
    fits = [fit_gemm(gemms, d) for d in dtypes]
    out = {f"peak_flops.{f.dtype.value}": f.ceiling for f in fits}
    out.update(memory_bandwidth=copy, kernel_overhead_seconds=overhead,
               gemm_ramp_seconds=max(fits[0].intercept - dispatch, 0.0))
    return out


def _groups(spec: CalibrateSpec) -> list[tuple[list[int], int, int]]:
    """(ranks, per_node, nodes) of every group to time: 2..nproc ranks of node 0, then groups spanning nodes."""
    p, q = spec.nproc_per_node, spec.nnodes
    sizes = sorted({2, p}) if spec.quick else list(range(2, p + 1))
    out = [(list(range(s)), s, 1) for s in sizes if 2 <= s <= p]
    if q > 1:
        out.append(([node * p for node in range(q)], 1, q))
        if p > 1:
            out.append((list(range(p * q)), p, q))
    return out


#: Seconds of GEMMs every rank runs before each timed collective or send. A training step issues its collectives
#: between kernels, not back to back, and on a host whose ranks share cores one that follows compute costs more the
#: longer the compute ran: on the 2-core development host (2 gloo ranks, median of 15) a 4-byte all-reduce took 0.67 /
#: 2.0 / 2.0 / 1.1 / 4.1 ms after 2 / 5 / 10 / 20 / 50 ms of GEMMs, a 1 MiB one 1.9 / 3.0 / 5.6 / 3.7 / 5.8 ms, where
#: back to back they take 0.2 and 1.2-1.7 ms; the CPU steps of bench/fidelity_cpu.py leave 3-100 ms between their
#: collectives (gpt-tiny's TP step about 4 ms, its DDP step 10 ms before the first bucket). 10 ms stands for that. On
#: CUDA the host's compute does not delay the device's collectives, so no burst.
_BURST_SECONDS = {"cpu": 10e-3, "cuda": 0.0}


def _compute_burst(device: torch.device) -> Callable[[], None]:
    """A call that keeps this rank computing for `_BURST_SECONDS` (nothing on CUDA)."""
    seconds = _BURST_SECONDS.get(device.type, 0.0)
    if seconds <= 0:
        return lambda: None
    a = torch.randn(128, 128, device=device)

    def burst() -> None:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.mm(a, a)

    return burst


def _median_after_compute(call: Callable[[], None], device: torch.device, repeats: int,
                          before: Callable[[], None] = lambda: None) -> float:
    """Median seconds of `call` timed alone, each time after `before` (a barrier) and a compute burst, as a step
    issues it; 3 x `repeats` single calls (more than best-of needs, as each is one call)."""
    burst, sync = _compute_burst(device), _sync(device)
    times = []
    for _ in range(3 * repeats):
        before()
        burst()
        t0 = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


#: torch >= 2.10 names it reduce_scatter_single (reduce_scatter_tensor warns); older torch has only the old name.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _time_collective(kind: Collective, nbytes: int, group, size: int, device: torch.device, repeats: int) -> float:
    n = max(1, nbytes // 4 // size) * size  # float32 elements, a multiple of the group size
    full = torch.ones(n, device=device)
    part = torch.ones(n // size, device=device)
    call = {
        Collective.ALL_REDUCE: lambda: dist.all_reduce(full, group=group),
        Collective.ALL_GATHER: lambda: _all_gather(full, part, group=group),
        Collective.REDUCE_SCATTER: lambda: _reduce_scatter(part, full, group=group),
    }[kind]
    call()
    _sync(device)()
    return _median_after_compute(call, device, repeats, before=lambda: dist.barrier(group=group))


def _time_ping_pong(peer: int, nbytes: int, device: torch.device, repeats: int) -> float | None:
    """One-way seconds of a send between rank 0 and `peer` (half a round trip); None on the other ranks."""
    rank = dist.get_rank()
    if rank not in (0, peer):
        return None
    buf = torch.ones(max(1, nbytes // 4), device=device)
    other = peer if rank == 0 else 0

    def round_trip() -> None:
        if rank == 0:
            dist.send(buf, other)
            dist.recv(buf, other)
        else:
            dist.recv(buf, other)
            dist.send(buf, other)

    round_trip()
    return _median_after_compute(round_trip, device, repeats) / 2


def measure_comms(spec: CalibrateSpec, device: torch.device,
                  progress: Callable[[str], None] = lambda what: None) -> list[CommSample]:
    """Collective and point-to-point timings (rank 0's, which is in every group); every rank must call this."""
    rank, repeats = dist.get_rank(), 3 if spec.quick else 5
    sizes = _COMM_BYTES[device.type][0 if spec.quick else 1]
    out: list[CommSample] = []
    for ranks, per_node, nodes in _groups(spec):
        group = dist.new_group(ranks)
        for kind in (Collective.ALL_REDUCE, Collective.ALL_GATHER, Collective.REDUCE_SCATTER):
            for nbytes in sizes:
                if rank in ranks:
                    t = _time_collective(kind, nbytes, group, len(ranks), device, repeats)
                    if rank == 0:
                        n = max(1, nbytes // 4 // len(ranks)) * len(ranks) * 4
                        out.append(CommSample(collective=kind, nbytes=n, size=len(ranks), per_node=per_node,
                                              nodes=nodes, seconds=t))
                dist.barrier()
            progress(f"{kind.value} over {len(ranks)} ranks on {nodes} node(s)")
    peers = [(1, False)] if spec.nproc_per_node > 1 else []
    if spec.nnodes > 1:
        peers.append((spec.nproc_per_node, True))
    for peer, across in peers:
        for nbytes in sizes:
            t = _time_ping_pong(peer, nbytes, device, repeats)
            if rank == 0 and t is not None:
                out.append(CommSample(collective=Collective.P2P, nbytes=max(1, nbytes // 4) * 4, size=2,
                                      per_node=1 if across else 2, nodes=2 if across else 1, seconds=t))
            dist.barrier()
        progress(f"point-to-point {'across nodes' if across else 'inside a node'}")
    return out


def total_steps(spec: CalibrateSpec) -> int:
    """Progress steps a calibration reports: one per dtype, memory, framework overhead, each collective per group,
    each p2p link."""
    return len(spec.dtypes) + 2 + 3 * len(_groups(spec)) + (spec.nproc_per_node > 1) + (spec.nnodes > 1)


def _device_memory_bytes(device: torch.device, nproc: int) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // nproc)


def _median_over_ranks(values: list) -> list:
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, values)
    return [statistics.median(col) for col in zip(*everyone, strict=True)]


def run_rank(spec: CalibrateSpec, workdir: Path, *, local_rank: int) -> Measurements | None:
    """Measure on this rank (the process group is joined here); rank 0 writes and returns the measurements."""
    device = init_distributed(spec.device_type, local_rank=local_rank, timeout_s=spec.timeout_s)
    rank, done = dist.get_rank(), [0]
    total = total_steps(spec)

    def progress(what: str) -> None:
        done[0] += 1
        if rank == 0:
            write_text_atomic(workdir / PROGRESS_FILE, f"{done[0]} {total} {what}")

    torch.manual_seed(rank)
    from executor.runtime_memory import measure_runtime_memory  # first: before other work leaves freed memory

    runtime, dtensor_runtime = _median_over_ranks(list(measure_runtime_memory(device)))
    gemms = measure_gemms(spec.dtypes, device, quick=spec.quick, progress=progress)
    medians = _median_over_ranks([g.seconds for g in gemms])
    gemms = [g.model_copy(update={"seconds": s}) for g, s in zip(gemms, medians, strict=True)]
    copy, dispatch, overhead = _median_over_ranks(list(measure_memory(device, quick=spec.quick)))
    progress("memory bandwidth and kernel overhead")
    framework: dict[str, float] = {}
    if device.type == "cpu" and spec.framework:  # on CUDA the host's bookkeeping hides behind queued kernels
        from executor.overhead import measure_framework_overhead

        figures = measure_framework_overhead(quick=spec.quick)
        framework = {k: figures[k] for k in MEASURED_DEVICE_FIELDS if k in figures}
        framework = dict(zip(framework, _median_over_ranks(list(framework.values())), strict=True))
    progress("framework overhead")
    comms = measure_comms(spec, device, progress)
    if rank != 0:
        return None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (gloo)"
    m = Measurements(
        device_name=name, device_type=device.type, memory_bytes=_device_memory_bytes(device, spec.nproc_per_node),
        nodes=spec.nnodes, gpus_per_node=spec.nproc_per_node, gemms=gemms, copy_bytes_per_second=copy,
        dispatch_seconds=dispatch, kernel_overhead_seconds=overhead, comms=comms, framework=framework,
        runtime_memory_bytes=runtime, dtensor_runtime_memory_bytes=dtensor_runtime,
        provenance={"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": socket.gethostname(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "backend": dist.get_backend(), "threads per rank": str(torch.get_num_threads()),
                    "launch": f"{spec.nnodes} node(s) x {spec.nproc_per_node} processes"},
    )
    write_text_atomic(workdir / MEASUREMENTS_FILE, m.model_dump_json(indent=1))
    return m


def _poll_progress(path: Path, stop: threading.Event, on_progress: Callable[[int, int, str], None]) -> None:
    last = ""
    while not stop.wait(0.2):
        try:
            text = path.read_text()
        except OSError:
            continue
        if text != last:
            last = text
            done, total, what = text.split(" ", 2)
            on_progress(int(done), int(total), what)


def launch_calibration(
    spec: CalibrateSpec, *, node_rank: int | None = None, rdzv_endpoint: str | None = None,
    run_id: str | None = None, on_progress: Callable[[int, int, str], None] = lambda done, total, what: None,
) -> Measurements | None:
    """Start this node's ranks, wait for them, and return the measurements (None on nodes other than node 0).

    `on_progress(done, total, what)` is called from a helper thread as rank 0 finishes each step.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from executor.launch import torchrun_args  # here: the ranks need none of the training stack it imports

    with tempfile.TemporaryDirectory(prefix="autopar-calibrate-") as tmp:
        workdir = Path(tmp)
        spec_path = workdir / "calibrate_spec.json"
        write_text_atomic(spec_path, spec.model_dump_json())
        argv = torchrun_args(spec_path, nnodes=spec.nnodes, nproc_per_node=spec.nproc_per_node, node_rank=node_rank,
                             rdzv_endpoint=rdzv_endpoint, run_id=run_id or "autopar-calibrate",
                             module="executor.calibrate")
        log.info("torchrun %s", " ".join(argv))
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        stop = threading.Event()
        poller = threading.Thread(target=_poll_progress, args=(workdir / PROGRESS_FILE, stop, on_progress),
                                  daemon=True)
        poller.start()
        try:
            torchrun.run(torchrun.parse_args(argv))
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            data = failure.error_file_data or {}
            message = data.get("message", {}) if isinstance(data, dict) else {}
            detail = message.get("message", "") if isinstance(message, dict) else str(message)
            raise CalibrationError(f"rank {rank} failed during calibration (exit code {failure.exitcode}): "
                                   f"{str(detail).strip().splitlines()[-1] if detail else 'no error recorded'}; "
                                   "check that every node runs the same command and can reach the others") from None
        finally:
            stop.set()
            poller.join()
        result = workdir / MEASUREMENTS_FILE
        return Measurements.model_validate_json(result.read_text()) if result.exists() else None


def main(argv: list[str] | None = None) -> None:
    """Rank entry point: `python -m executor.calibrate SPEC.json` (under torchrun)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    from executor.worker import teardown  # the shutdown sequence every rank entry point uses

    spec_path = Path((sys.argv[1:] if argv is None else argv)[0])
    spec = CalibrateSpec.model_validate_json(spec_path.read_text())
    record(lambda: run_rank(spec, spec_path.parent, local_rank=int(os.environ.get("LOCAL_RANK", "0"))))()
    teardown(0)


if __name__ == "__main__":
    main()
