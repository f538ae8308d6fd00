"""Launch one plan on this node's processes and read back what it measured: what `autopar run` and
`autopar plan --verify-top-k` (and `autopar run --verify-top-k`) both call.

    ref = runnable_reference("gpt-tiny", {})
    profile = run_profile(ref, plan, dtype=None)
    spec = make_spec(plan, profile, model=str(ref), model_options={}, steps=5)
    report = launch_plan(spec, nproc_per_node=2)       # executor.train.RunReport (None on nodes other than 0)

`launch_plan` lets the launcher's `WorkerError` (an error every rank raised together), `RankFailed` (a crashed rank)
and interrupts through: the caller decides whether one failed run ends the command (`autopar run`) or only rules one
candidate out (verification).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from planner.errors import AutoparError

log = logging.getLogger(__name__)


def runnable_reference(model: str, options: dict[str, Any]) -> Any:
    """The `profiler.resolve` reference of a model a run can build (its `str()` has file paths made absolute, since
    the workers may start elsewhere); a profile JSON is refused: a run needs the model itself."""
    from profiler.resolve import RefKind, parse_reference

    ref = parse_reference(model, options)
    if ref.kind == RefKind.PROFILE:
        raise AutoparError(f"{model} is a file (a profile?), not a model a run can build; give the model itself "
                           "(zoo name, path/to/file.py:factory, package.module:factory or hf:path/to/config.json)")
    return ref


def run_profile(ref: Any, plan: Any, dtype: str | None) -> Any:
    """The meta-device profile of the model to run, in the precision to train in: `dtype`, else the plan's.

    A plan that does not record its precision (older plan files) is matched by its profile hash against each
    precision; a `dtype` the plan was not made for is refused with the flag that fits.
    """
    from planner.model_profile import DType
    from planner.precision import RUN_DTYPES, default_dtype, parse_dtype
    from profiler.resolve import resolve_profile

    wanted = parse_dtype(dtype) if dtype else (plan.provenance.dtype or default_dtype(plan.provenance.cluster))
    profile = resolve_profile(ref, dtype=wanted).profile
    if profile.profile_hash == plan.provenance.profile_hash:
        return profile
    fits = next((d for d in DType if profile.model_copy(update={"dtype": d}).profile_hash
                 == plan.provenance.profile_hash), None)
    if fits is None:
        return profile  # another model or shape: `check_launch` says so
    if dtype:
        raise AutoparError(f"the plan was made for {fits.value} training but --dtype {dtype} was given; add --dtype "
                           f"{RUN_DTYPES[fits]} (or re-plan with --dtype {dtype})")
    return resolve_profile(ref, dtype=fits).profile


def make_spec(plan: Any, profile: Any, *, model: str, model_options: dict[str, Any], steps: int,
              **fields: Any) -> Any:
    """The `executor.launch.RunSpec` of a run; `fields` are its other fields (data, seed, optimizer, dtype, ...).
    Options the spec refuses become one AutoparError naming each."""
    from executor.launch import RunSpec

    try:
        return RunSpec(plan=plan, profile=profile, model=model, model_options=model_options, steps=steps, **fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise AutoparError(f"invalid run options: {problems}") from None


def launch_plan(spec: Any, *, nproc_per_node: int, nnodes: int = 1, node_rank: int | None = None,
                rdzv_endpoint: str | None = None, run_id: str | None = None) -> Any:
    """Run `spec` through torchrun on this node and return the `RunReport` rank 0 wrote (to `spec.report_path`,
    else to a temporary file); None on a node that holds no rank 0 (no report is written there)."""
    from executor.launch import launch, read_report

    with tempfile.TemporaryDirectory(prefix="autopar-run-") as tmp:
        if spec.report_path is None:
            spec = spec.model_copy(update={"report_path": str(Path(tmp) / "report.json")})
        log.info("launching %d x %d processes: %s", nnodes, nproc_per_node, spec.plan.strategy.describe())
        launch(spec, nnodes=nnodes, nproc_per_node=nproc_per_node, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
               run_id=run_id, workdir=tmp)
        path = Path(spec.report_path)
        return read_report(path) if path.exists() else None
