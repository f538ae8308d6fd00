"""Fit measured timings to the cost model's cluster constants and write them as a `ClusterSpec` file.

`autopar calibrate` (executor/calibrate.py measures, api/cli_calibrate.py drives) hands its raw timings here; this
module is plain arithmetic (numpy, no torch), so the fits can be checked on synthetic timings with known constants.

The fits invert the cost model's own formulas (planner/cost.py), so a file written here predicts the timings it was
measured from:

- GEMMs: the cost model charges a GEMM of W FLOPs W / (peak * e_max) + ramp seconds (`estimate_gemm_efficiency`:
  efficiency e_max * W / (W + peak * e_max * ramp)). A least-squares line through (W, seconds), weighted to relative
  error, gives the slope 1 / (peak * e_max) (the ceiling large GEMMs reach) and the intercept; the ramp is the
  intercept less the dispatch cost of any op (which the cost model charges as `kernel_overhead_seconds`).
- Collectives: `CommModel` charges a ring pass over a group of n members, k per node on q nodes,
  collective_latency + (n - q) * intra.latency + (q - 1) * inter.latency
  + (k - 1) / k * B / bw_intra + (q - 1) / q * (B / k) / bw_inter seconds, with bw = link bandwidth * comm_efficiency
  (the bus bandwidth); an all-reduce is two passes, a point-to-point send one link latency plus B / bw. That is
  linear in (1 / bw_intra, 1 / bw_inter, collective_latency, intra.latency, inter.latency): one non-negative least
  squares over every collective, group and size measured (relative error again) gives all five at once.
- Framework overheads (`FRAMEWORK_FIELDS`): measured directly as the cost model charges them (executor.overhead),
  copied as they are.

Only the products peak * e_max, bandwidth * memory_efficiency and link bandwidth * comm_efficiency are measurable.
Without a `reference` cluster the efficiencies are 1.0 and the rates are the measured ones (as the `cpu` preset
does); with one (the datasheet preset of the same hardware) the peaks stay the datasheet's and the efficiencies are
measured / datasheet, capped at 1.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field

from planner.cluster import ClusterError, ClusterSpec, load_cluster
from planner.cost import Group
from planner.model_profile import DType, write_text_atomic

#: The `DeviceSpec` framework-overhead fields `autopar calibrate` measures (executor.overhead).
FRAMEWORK_FIELDS = ("tp_module_overhead_seconds", "fsdp_unit_overhead_seconds", "fsdp_tensor_overhead_seconds",
                    "ddp_bucket_overhead_seconds", "optimizer_tensor_seconds", "optimizer_dtensor_seconds",
                    "pipeline_microbatch_overhead_seconds", "op_dispatch_seconds")
#: Every per-unit `DeviceSpec` figure measured by executor.overhead: the framework overheads (which run_fit scales by
#: one factor) and the per-element cost of exp / log / tanh / erf (compute, not framework work).
MEASURED_DEVICE_FIELDS = (*FRAMEWORK_FIELDS, "transcendental_element_seconds")


class Collective(str, Enum):
    """The communication operations `autopar calibrate` times."""

    ALL_REDUCE = "all_reduce"
    ALL_GATHER = "all_gather"
    REDUCE_SCATTER = "reduce_scatter"
    P2P = "p2p"


class GemmSample(BaseModel):
    """Seconds one GEMM of `flops` FLOPs took (best of repeats)."""

    model_config = ConfigDict(frozen=True)

    dtype: DType = Field(description="Precision of the operands.")
    m: int = Field(ge=1, description="Rows of the output.")
    n: int = Field(ge=1, description="Columns of the output.")
    k: int = Field(ge=1, description="Reduction dimension.")
    seconds: float = Field(gt=0, description="Wall seconds of one GEMM.")

    @property
    def flops(self) -> float:
        """2 * m * n * k."""
        return 2.0 * self.m * self.n * self.k


class CommSample(BaseModel):
    """Seconds one collective (or one send) of `nbytes` took over a group placed as `size` / `per_node` / `nodes`."""

    model_config = ConfigDict(frozen=True)

    collective: Collective = Field(description="Which operation.")
    nbytes: float = Field(gt=0, description="Bytes per member (the full buffer, as `CommModel` counts them).")
    size: int = Field(ge=2, description="Members of the group (2 for a point-to-point send).")
    per_node: int = Field(ge=1, description="Members on each node.")
    nodes: int = Field(ge=1, description="Nodes the group spans.")
    seconds: float = Field(gt=0, description="Wall seconds of one call.")


class Measurements(BaseModel):
    """Everything one `autopar calibrate` run measured on a device (medians over ranks)."""

    model_config = ConfigDict(frozen=True)

    device_name: str = Field(description="What the devices are (CUDA device name or 'CPU (gloo)').")
    device_type: str = Field(description="'cuda' or 'cpu'.")
    memory_bytes: int = Field(gt=0, description="Usable memory of one device (one rank's share of host RAM on CPU).")
    nodes: int = Field(ge=1)
    gpus_per_node: int = Field(ge=1)
    gemms: list[GemmSample] = Field(description="GEMM timings over shapes and dtypes.")
    copy_bytes_per_second: float = Field(gt=0, description="Bytes read + written per second by a large copy.")
    dispatch_seconds: float = Field(ge=0, description="Seconds of a tiny op without autograd (eager dispatch).")
    kernel_overhead_seconds: float = Field(ge=0, description="Seconds per tiny op in a forward+backward chain.")
    comms: list[CommSample] = Field(default_factory=list, description="Collective and send timings.")
    framework: dict[str, float] = Field(
        default_factory=dict,
        description="Framework overheads by `DeviceSpec` field name (executor.overhead; CPU runs only), copied into "
                    "the device as measured. Empty in measurements made before they were timed.",
    )
    runtime_memory_bytes: float = Field(
        default=0.0, ge=0, description="Growth of a rank training a negligible model under DDP "
                                       "(executor.runtime_memory); 0 in measurements made before it.")
    dtensor_runtime_memory_bytes: float = Field(
        default=0.0, ge=0, description="Further growth of the same model under FSDP2 (DTensor parameters).")
    provenance: dict[str, str] = Field(default_factory=dict, description="Host, date, torch version, backend.")


@dataclass(frozen=True)
class GemmFit:
    """Per-dtype GEMM fit: seconds = flops / ceiling + intercept."""

    dtype: DType
    ceiling: float  # FLOP/s large GEMMs reach (peak * compute_efficiency)
    intercept: float  # seconds every GEMM costs beyond flops / ceiling
    residual_rms: float  # root-mean-square relative error of the fit
    residual_max: float


@dataclass(frozen=True)
class CommFit:
    """Link constants fitted to all communication timings (None: no timing informed that term)."""

    intra_bandwidth: float | None  # bus bandwidth inside a node, bytes/s (link bandwidth * comm_efficiency)
    inter_bandwidth: float | None
    collective_latency: float | None
    intra_latency: float | None  # seconds per ring step inside a node
    inter_latency: float | None
    residual_rms: float  # of the collectives
    residual_max: float
    p2p_residual_rms: float | None = None  # of the sends (their bandwidth is not fitted: see `fit_comm`)
    all_gather_passes: float | None = None  # ring passes an all-gather costs (an all-reduce: 2); None: not measured
    reduce_scatter_passes: float | None = None


def _residuals(pred: np.ndarray, meas: np.ndarray) -> tuple[float, float]:
    rel = pred / meas - 1.0
    return float(np.sqrt(np.mean(rel**2))), float(np.max(np.abs(rel)))


def _nnls_relative(a: np.ndarray, t: np.ndarray) -> np.ndarray:
    """argmin ||(A x - t) / t|| subject to x >= 0, by trying every set of free unknowns (there are at most five)."""
    w = a / t[:, None]
    ones = np.ones_like(t)
    cols = [j for j in range(a.shape[1]) if np.any(a[:, j] != 0)]
    best, best_err = np.zeros(a.shape[1]), math.inf
    for r in range(len(cols), 0, -1):
        for free in itertools.combinations(cols, r):
            sol, *_ = np.linalg.lstsq(w[:, free], ones, rcond=None)
            if np.any(sol < 0):
                continue
            x = np.zeros(a.shape[1])
            x[list(free)] = sol
            err = float(np.sum((w @ x - ones) ** 2))
            if err < best_err - 1e-15:
                best, best_err = x, err
    return best


def fit_gemm(samples: list[GemmSample], dtype: DType) -> GemmFit:
    """Ceiling (FLOP/s) and per-GEMM intercept of `dtype` from timings over a range of shapes (module docstring)."""
    rows = [s for s in samples if s.dtype == dtype]
    if len({s.flops for s in rows}) < 2:
        raise ClusterError(f"fitting {dtype.value} GEMMs needs timings of at least two sizes, got {len(rows)}")
    w = np.array([s.flops for s in rows])
    t = np.array([s.seconds for s in rows])
    slope, intercept = _nnls_relative(np.stack([w, np.ones_like(w)], axis=1), t)
    if slope <= 0:
        raise ClusterError(f"{dtype.value} GEMM timings do not grow with size; measure again on an idle machine")
    rms, worst = _residuals(w * slope + intercept, t)
    return GemmFit(dtype=dtype, ceiling=1.0 / slope, intercept=float(intercept), residual_rms=rms, residual_max=worst)


def comm_row(sample: CommSample) -> list[float]:
    """Coefficients of (1/bw_intra, 1/bw_inter, collective_latency, intra.latency, inter.latency) in `CommModel`'s
    time for `sample` (module docstring)."""
    b = sample.nbytes
    if sample.collective == Collective.P2P:
        across = sample.nodes > 1
        return [0.0 if across else b, b if across else 0.0, 0.0, 0.0 if across else 1.0, 1.0 if across else 0.0]
    g = Group(size=sample.size, per_node=sample.per_node, nodes=sample.nodes)
    passes = 2.0 if sample.collective == Collective.ALL_REDUCE else 1.0
    k, q = g.per_node, g.nodes
    return [passes * (k - 1) / k * b, passes * (q - 1) / q * b / k, passes, passes * (g.size - q), passes * (q - 1)]


def fit_comm(samples: list[CommSample]) -> CommFit:
    """Bus bandwidths and latencies, inside and across nodes, and each collective's ring passes, from all
    communication timings.

    Stages, because gloo's collectives run at about half the bandwidth of its plain sends (the model has one
    bandwidth per link): the point-to-point timings give the per-step link latencies; then the all-reduces (two ring
    passes by definition), with those latencies fixed, give the bus bandwidths and the per-call `collective_latency`;
    then each of all-gather and reduce-scatter gets the number of passes that fits its timings best (least squares
    on log error: NCCL's rings give 1, gloo's all-gather about 2 and its reduce-scatter more). Without all-reduces
    every collective counts as NCCL's and all terms come from them at once; without sends the latencies come from
    the collectives too.
    """
    if not samples:
        raise ClusterError("no communication timings to fit; calibrate with at least 2 processes (--nproc-per-node 2)")
    sends = [s for s in samples if s.collective == Collective.P2P]
    reduces = [s for s in samples if s.collective == Collective.ALL_REDUCE]
    others = [s for s in samples if s.collective in (Collective.ALL_GATHER, Collective.REDUCE_SCATTER)]
    if reduces and others:
        base = _fit_links(sends + reduces)
        passes = {kind: _passes(base, [s for s in others if s.collective == kind])
                  for kind in (Collective.ALL_GATHER, Collective.REDUCE_SCATTER)}
        return dataclasses.replace(base, all_gather_passes=passes[Collective.ALL_GATHER],
                                   reduce_scatter_passes=passes[Collective.REDUCE_SCATTER])
    return _fit_links(samples)


def _passes(fit: CommFit, samples: list[CommSample]) -> float | None:
    """Ring passes that best explain `samples` (geometric mean of measured over one predicted pass)."""
    if not samples:
        return None
    x = np.array([1 / (fit.intra_bandwidth or np.inf), 1 / (fit.inter_bandwidth or np.inf),
                  fit.collective_latency or 0.0, fit.intra_latency or 0.0, fit.inter_latency or 0.0])
    one_pass = np.array([comm_row(s.model_copy(update={"collective": Collective.REDUCE_SCATTER})) for s in samples]) @ x
    keep = one_pass > 0
    if not np.any(keep):
        return None
    measured = np.array([s.seconds for s in samples])[keep]
    return float(np.exp(np.mean(np.log(measured / one_pass[keep]))))


def _fit_links(samples: list[CommSample]) -> CommFit:
    """The link terms from `samples` (sends first for the latencies, as `fit_comm` says)."""
    sends = [s for s in samples if s.collective == Collective.P2P]
    colls = [s for s in samples if s.collective != Collective.P2P] or sends
    a = np.array([comm_row(s) for s in colls])
    t = np.array([s.seconds for s in colls])
    x = np.zeros(5)
    if sends and colls is not sends:
        a_p = np.array([comm_row(s) for s in sends])
        x_p = _nnls_relative(a_p, np.array([s.seconds for s in sends]))
        for j in (3, 4):
            if np.any(a_p[:, j] != 0):
                x[j] = x_p[j]
                t = t - a[:, j] * x[j]
                a[:, j] = 0.0
    a_all = np.array([comm_row(s) for s in samples])
    if np.any(t <= 0):  # noisy timings: a collective faster than the sends' latency; fit everything at once
        x = _nnls_relative(a_all, np.array([s.seconds for s in samples]))
    else:
        x += _nnls_relative(a, t)
    informed = [bool(np.any(a_all[:, j] != 0)) for j in range(5)]
    pred, meas = a_all @ x, np.array([s.seconds for s in samples])
    is_send = np.array([s.collective == Collective.P2P for s in samples])
    rms, worst = _residuals(pred[~is_send], meas[~is_send]) if np.any(~is_send) else _residuals(pred, meas)
    p2p_rms = _residuals(pred[is_send], meas[is_send])[0] if np.any(is_send) else None

    def bandwidth(j: int) -> float | None:
        return 1.0 / x[j] if informed[j] and x[j] > 0 else None

    return CommFit(intra_bandwidth=bandwidth(0), inter_bandwidth=bandwidth(1),
                   collective_latency=float(x[2]) if informed[2] else None,
                   intra_latency=float(x[3]) if informed[3] else None,
                   inter_latency=float(x[4]) if informed[4] else None, residual_rms=rms, residual_max=worst,
                   p2p_residual_rms=p2p_rms)


@dataclass(frozen=True)
class Calibration:
    """A fitted cluster and what it was fitted from, for the file's provenance block."""

    cluster: ClusterSpec
    gemm_fits: list[GemmFit]
    comm_fit: CommFit | None
    notes: list[str]


def _links(comm: CommFit | None, reference: ClusterSpec | None, notes: list[str]) -> tuple[dict, dict, float]:
    """(intra_node, inter_node, comm_efficiency): measured where measured, else the reference's or the other link's."""
    measured = {
        "intra": {"bandwidth": comm.intra_bandwidth, "latency": comm.intra_latency or 0.0}
        if comm is not None and comm.intra_bandwidth else None,
        "inter": {"bandwidth": comm.inter_bandwidth, "latency": comm.inter_latency or 0.0}
        if comm is not None and comm.inter_bandwidth else None,
    }
    if measured["intra"] is None and measured["inter"] is None and reference is None:
        raise ClusterError("no communication was measured; calibrate with at least 2 processes (--nproc-per-node 2)")
    comm_eff = 1.0
    if reference is not None:
        key = "intra" if measured["intra"] else "inter"
        link = reference.intra_node if key == "intra" else reference.inter_node
        comm_eff = min(1.0, measured[key]["bandwidth"] / link.bandwidth) if measured[key] else reference.comm_efficiency
    out = {}
    for key, other in (("intra", "inter"), ("inter", "intra")):
        if measured[key] is not None:
            out[key] = {**measured[key], "bandwidth": measured[key]["bandwidth"] / comm_eff}
        elif reference is not None:
            notes.append(f"{key}-node link not measured: copied from the reference cluster")
            out[key] = getattr(reference, f"{key}_node").model_dump()
        else:
            notes.append(f"{key}-node link not measured: set to the {other}-node figures")
            out[key] = {**measured[other], "bandwidth": measured[other]["bandwidth"] / comm_eff}
    return out["intra"], out["inter"], comm_eff


def build_cluster(m: Measurements, *, name: str = "calibrated", reference: ClusterSpec | None = None) -> Calibration:
    """The `ClusterSpec` the measurements imply (module docstring); `reference` supplies datasheet peaks, and the
    links that were not measured (inter-node on one node)."""
    notes: list[str] = []
    dtypes = list(dict.fromkeys(s.dtype for s in m.gemms))
    if not dtypes:
        raise ClusterError("no GEMM timings to fit; calibrate with at least one --dtype")
    fits = [fit_gemm(m.gemms, d) for d in dtypes]
    primary = fits[0]
    ref_peak = reference.device.peak_flops.get(primary.dtype) if reference is not None else None
    compute_eff = min(1.0, primary.ceiling / ref_peak) if ref_peak else 1.0
    peaks = {f.dtype: f.ceiling / compute_eff for f in fits}
    mem_eff = min(1.0, m.copy_bytes_per_second / reference.device.memory_bandwidth) if reference else 1.0
    comm = fit_comm(m.comms) if m.comms else None
    intra, inter, comm_eff = _links(comm, reference, notes)
    data = {
        "name": name, "nodes": m.nodes, "gpus_per_node": m.gpus_per_node,
        "device": {
            "name": m.device_name, "type": m.device_type, "memory_bytes": m.memory_bytes,
            "peak_flops": {d.value: p for d, p in peaks.items()},
            "memory_bandwidth": m.copy_bytes_per_second / mem_eff,
            "kernel_overhead_seconds": m.kernel_overhead_seconds,
            "gemm_ramp_seconds": max(primary.intercept - m.dispatch_seconds, 0.0),
            **({k: getattr(reference.device, k) for k in MEASURED_DEVICE_FIELDS} if reference is not None else {}),
            **{k: v for k, v in m.framework.items() if k in MEASURED_DEVICE_FIELDS},
            **({"runtime_memory_bytes": int(m.runtime_memory_bytes),
                "dtensor_runtime_memory_bytes": int(m.dtensor_runtime_memory_bytes)}
               if m.runtime_memory_bytes or m.dtensor_runtime_memory_bytes else {}),
        },
        "intra_node": intra, "inter_node": inter,
        "compute_efficiency": compute_eff, "memory_efficiency": mem_eff, "comm_efficiency": comm_eff,
        "collective_latency": comm.collective_latency if comm and comm.collective_latency is not None
        else (reference.collective_latency if reference else 0.0),
        "collective_passes": {"all_reduce": 2.0,
                              "all_gather": comm.all_gather_passes if comm and comm.all_gather_passes else 1.0,
                              "reduce_scatter": comm.reduce_scatter_passes if comm and comm.reduce_scatter_passes
                              else 1.0},
        # Compute and gloo share the host's cores: gradient communication cannot hide behind the backward pass.
        "overlap_dp_comm": m.device_type != "cpu",
    }
    try:
        cluster = ClusterSpec.model_validate(data)
    except ValueError as exc:
        raise ClusterError(f"the measured figures do not make a valid cluster ({exc}); measure again on an idle "
                           "machine") from None
    return Calibration(cluster=cluster, gemm_fits=fits, comm_fit=comm, notes=notes)


def provenance_lines(cal: Calibration, m: Measurements) -> list[str]:
    """The provenance block of a calibrated cluster file: where each figure came from and how well it fits."""
    lines = ["Written by `autopar calibrate`: every figure below was measured on this cluster."]
    lines += [f"{k}: {v}" for k, v in sorted(m.provenance.items())]
    for f in cal.gemm_fits:
        lines.append(f"GEMM {f.dtype.value}: {sum(s.dtype == f.dtype for s in m.gemms)} shapes, ceiling "
                     f"{f.ceiling:.4g} FLOP/s, intercept {f.intercept:.3g} s; residual rms {f.residual_rms:.1%}, "
                     f"max {f.residual_max:.1%}")
    lines.append(f"memory bandwidth: large copy, {m.copy_bytes_per_second:.4g} bytes/s (read + written)")
    lines.append(f"kernel overhead: tiny ops forward + backward, {m.kernel_overhead_seconds:.3g} s each "
                 f"(dispatch alone {m.dispatch_seconds:.3g} s, subtracted from the GEMM ramp)")
    if m.runtime_memory_bytes or m.dtensor_runtime_memory_bytes:
        lines.append(f"runtime memory (executor.runtime_memory, a negligible model trained 3 steps): "
                     f"{m.runtime_memory_bytes / 2**20:.2f} MiB under DDP, {m.dtensor_runtime_memory_bytes / 2**20:.2f} "
                     "MiB more under FSDP2")
    if m.framework:
        lines.append("framework overhead (executor.overhead, collectives taken out): " + ", ".join(
            f"{k} {v:.3g} s" for k, v in m.framework.items() if k in MEASURED_DEVICE_FIELDS))
    elif m.device_type == "cpu":
        lines.append("framework overhead: not measured (--no-framework); the reference cluster's figures if one "
                     "was given, else none")
    if cal.comm_fit is not None:
        kinds = sorted({s.collective.value for s in m.comms})
        sizes = sorted({s.size for s in m.comms})
        lines.append(f"communication: {len(m.comms)} timings of {', '.join(kinds)} over group sizes {sizes}; "
                     f"collectives' fit residual rms {cal.comm_fit.residual_rms:.1%}, max "
                     f"{cal.comm_fit.residual_max:.1%}")
        if cal.comm_fit.all_gather_passes or cal.comm_fit.reduce_scatter_passes:
            lines.append(f"ring passes (an all-reduce: 2): all-gather {cal.comm_fit.all_gather_passes or 1.0:.2f}, "
                         f"reduce-scatter {cal.comm_fit.reduce_scatter_passes or 1.0:.2f}")
        if cal.comm_fit.p2p_residual_rms is not None:
            lines.append(f"point-to-point: latency fitted to the sends, bandwidth from the collectives; sends' "
                         f"residual rms {cal.comm_fit.p2p_residual_rms:.1%}")
    lines += cal.notes
    return lines


def write_cluster_file(path: str | Path, cal: Calibration, m: Measurements) -> ClusterSpec:
    """Write the cluster as YAML with a `#` provenance block on top, and check `load_cluster` reads it back."""
    header = "".join(f"# {line}\n" for line in provenance_lines(cal, m))
    body = yaml.safe_dump(cal.cluster.model_dump(mode="json"), sort_keys=False)
    write_text_atomic(Path(path), header + body)
    return load_cluster(path)
