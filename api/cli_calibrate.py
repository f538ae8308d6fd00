"""`autopar calibrate`: measure the cluster a plan is for and write it as a cluster file the planner reads.

    autopar calibrate --nproc-per-node 2 --quick --out cluster.yaml          # this host, ~1 minute on 2 CPU cores
    autopar plan gpt-tiny --cluster cluster.yaml --global-batch 16           # plan with the measured figures
    autopar calibrate --nproc-per-node 8 --dtype bfloat16 --dtype float32 --reference dgx-h100 --out h100.yaml
    autopar calibrate --nnodes 2 --node-rank 0 --master-addr node0 --master-port 29500 --nproc-per-node 8 \
        --out cluster.yaml                                                   # the same on every node (node rank 1 ...)

Ranks start through torchrun as `autopar run` starts them (gloo on CPU, NCCL on CUDA) and time GEMMs, a large copy,
tiny ops and collectives (executor/calibrate.py); `planner.cluster_fit` fits the timings to the cost model's
constants and writes a `ClusterSpec` YAML with a `#` provenance block (date, host, torch version, what was measured,
the fits' residuals). Only node 0 writes the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from planner.errors import AutoparError

console = Console()


def _print_summary(cluster, path: Path) -> None:
    d = cluster.device
    table = Table(title=f"calibrated: {cluster.nodes} x {cluster.gpus_per_node} {d.name} -> {path}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for dtype, peak in d.peak_flops.items():
        table.add_row(f"peak {dtype.value} (x compute_efficiency {cluster.compute_efficiency:.2f})",
                      f"{peak / 1e9:,.1f} GFLOP/s")
    table.add_row("gemm ramp", f"{d.gemm_ramp_seconds * 1e6:.1f} us")
    table.add_row("memory bandwidth", f"{d.memory_bandwidth / 1e9:.2f} GB/s")
    table.add_row("kernel overhead", f"{d.kernel_overhead_seconds * 1e6:.1f} us")
    for label, link in (("intra-node", cluster.intra_node), ("inter-node", cluster.inter_node)):
        table.add_row(f"{label} bandwidth / step latency",
                      f"{link.bandwidth / 1e9:.2f} GB/s / {link.latency * 1e6:.1f} us")
    table.add_row("collective latency", f"{cluster.collective_latency * 1e6:.1f} us")
    console.print(table)


def calibrate_command(
    out: Annotated[Path, typer.Option(help="Cluster YAML to write (node 0 only).")] = Path("cluster.yaml"),
    nproc_per_node: Annotated[int, typer.Option(min=1, help="Processes (devices) on this node.")] = 2,
    nnodes: Annotated[int, typer.Option(min=1, help="Nodes taking part; run the same command on each.")] = 1,
    node_rank: Annotated[int | None, typer.Option(min=0, help="This node's rank (with --nnodes > 1).")] = None,
    master_addr: Annotated[str | None, typer.Option(help="Host of node 0 (with --nnodes > 1).")] = None,
    master_port: Annotated[int, typer.Option(min=1, max=65535, help="Rendezvous port on node 0.")] = 29500,
    dtype: Annotated[list[str], typer.Option(
        help="GEMM precision to time (repeatable); the first sets the GEMM ramp and, with --reference, "
        "compute_efficiency. Default: float32 and bfloat16 on CPU, bfloat16 float16 float32 tf32 on CUDA."
    )] = [],  # noqa: B006
    quick: Annotated[bool, typer.Option(
        help="Fewer shapes, sizes and repeats (about a minute on 2 CPU cores).")] = False,
    framework: Annotated[bool, typer.Option(
        help="On CPU, also measure the executor's framework overheads (DTensor, FSDP2 units, optimizer per tensor, "
        "pipeline schedule; about 40 s on 2 cores). Without them the file copies --reference's, else has none.")] = True,
    reference: Annotated[str | None, typer.Option(
        help="Preset or file with the hardware's datasheet peaks: the file then keeps those peaks and records "
        "measured / datasheet as the efficiencies, and copies links it could not measure.")] = None,
    name: Annotated[str, typer.Option(help="Name of the calibrated cluster.")] = "calibrated",
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when this node has GPUs).")] = None,
    raw: Annotated[Path | None, typer.Option(help="Also write the raw timings (JSON) here, for refitting.")] = None,
) -> None:
    """Measure compute, memory and links across the ranks and write a cluster file for `autopar plan --cluster`."""
    import torch

    from executor.calibrate import CalibrateSpec, launch_calibration, total_steps
    from planner.cluster import load_cluster
    from planner.cluster_fit import build_cluster, write_cluster_file
    from planner.model_profile import write_text_atomic
    from planner.precision import parse_dtype

    device_type = device or ("cuda" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "cpu")
    if device_type not in ("cpu", "cuda"):
        raise AutoparError(f"--device {device_type} is not supported; give cpu or cuda")
    if device_type == "cuda" and torch.cuda.device_count() < nproc_per_node:
        raise AutoparError(f"--nproc-per-node {nproc_per_node} but this node has {torch.cuda.device_count()} CUDA "
                           "devices; lower --nproc-per-node or pass --device cpu")
    if nproc_per_node * nnodes < 2:
        raise AutoparError("calibrating the links needs at least 2 processes; add --nproc-per-node 2")
    if nnodes > 1 and (node_rank is None or master_addr is None):
        raise AutoparError("a multi-node calibration needs --node-rank R and --master-addr HOST on every node")
    if node_rank is not None and node_rank >= nnodes:
        raise AutoparError(f"--node-rank {node_rank} is not below --nnodes {nnodes}; number nodes 0..{nnodes - 1}")
    defaults = ["float32", "bfloat16"] if device_type == "cpu" else ["bfloat16", "float16", "float32", "tf32"]
    dtypes = list(dict.fromkeys(parse_dtype(d) for d in (dtype or defaults)))
    if device_type == "cpu" and any(d.value == "tf32" for d in dtypes):
        raise AutoparError("tf32 exists only on CUDA devices; calibrate float32 or bfloat16 on CPU")
    ref = load_cluster(reference) if reference else None
    if out.is_dir() or not out.parent.is_dir():
        raise AutoparError(f"--out {out} is a directory, or its directory does not exist; give a file path such as "
                           "cluster.yaml in an existing directory")
    spec = CalibrateSpec(device_type=device_type, dtypes=dtypes, nnodes=nnodes, nproc_per_node=nproc_per_node,
                         quick=quick, framework=framework)
    endpoint = f"{master_addr}:{master_port}" if nnodes > 1 else None
    with Progress(TextColumn("[bold]calibrating[/]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task(f"starting {nnodes} x {nproc_per_node} {device_type} ranks", total=total_steps(spec))
        measurements = launch_calibration(
            spec, node_rank=node_rank if nnodes > 1 else None, rdzv_endpoint=endpoint,
            run_id=f"autopar-calibrate-{master_port}",
            on_progress=lambda done, total, what: bar.update(task, completed=done, total=total, description=what))
    if measurements is None:
        console.print(f"node {node_rank}: measurements done; node 0 writes the cluster file")
        return
    if raw is not None:
        write_text_atomic(raw, measurements.model_dump_json(indent=1))
    cal = build_cluster(measurements, name=name, reference=ref)
    cluster = write_cluster_file(out, cal, measurements)
    _print_summary(cluster, out)
    for note in cal.notes:
        console.print(f"note: {note}")


def register(app: typer.Typer) -> None:
    """Add the command to the CLI."""
    app.command("calibrate")(calibrate_command)
