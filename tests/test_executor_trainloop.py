"""Training-loop basics under every layout: whole-model gradient clipping, the LR schedule, mixed precision
(FSDP2 policy / autocast + loss scaling), TensorBoard scalars, and synchronised BatchNorm under data parallelism.

As in test_executor_dist.py, each world size is one torchrun launch running every case (this file is also the
worker program); each case's losses are compared with a single-process run computed here with stock torch
(`clip_grad_norm_`, autocast, `GradScaler`, plain BatchNorm over the whole batch) and the schedule written out below.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import executor_support as sup

from executor.errors import ExecutorError
from executor.optim import LRSchedule, build_lr_schedulers, mixed_precision

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5
LR = 1.0
#: Below every step's gradient norm in these runs (0.7-1.6), so clipping changes every update.
CLIP = 0.25
SCHEDULE = {"kind": "cosine", "warmup": 1, "min_lr": 0.1}
#: A ResNet-18 layout small enough for tests: BatchNorm in every block.
RESNET = ("resnet18", (("width", 4), ("image_size", 64), ("num_classes", 10)))
RESNET_LAYERS = 10
#: Significand bits (with the implicit one) of the reduced-precision dtypes.
SIGNIFICAND = {"bfloat16": 8, "float16": 11}


def rounding_tol(losses: list[float], dtype: str) -> float:
    """One rounding (half the spacing) of `dtype` at the size of the largest loss.

    Reduced-precision runs are compared with a single-process autocast run in the same dtype; the two round in
    different places (FSDP2's policy casts every parameter and activation, autocast only the operands of matmuls and
    convolutions; DDP sums the batch's gradient in two halves), so they agree to about one rounding of the dtype at
    the loss's size, not to fp32 precision. Whether compute really ran in the dtype is checked separately (the
    output's dtype, the loss scale).
    """
    exponent = math.floor(math.log2(max(abs(x) for x in losses)))
    return 2.0 ** (exponent - SIGNIFICAND[dtype])


# name -> (model, strategy keyword arguments, training options)
TWO_RANK = {
    "zero3_clip_cosine_tb": ("gpt", {"dp": 2, "zero_stage": 3}, {"clip": CLIP, "schedule": SCHEDULE, "tb": True}),
    "pp2_1f1b_clip": ("gpt", {"pp": 2, "cuts": (3,), "schedule": "1f1b", "num_micro_batches": 4}, {"clip": CLIP}),
    "tp2_clip": ("gpt", {"tp": 2}, {"clip": CLIP}),
    # The tied head split from the embedding: the two copies must count once in the norm.
    "tied_pp2_clip": ("tied", {"pp": 2, "cuts": (2,), "schedule": "1f1b", "num_micro_batches": 4, "num_layers": 4},
                      {"clip": CLIP}),
    "zero3_bf16": ("gpt", {"dp": 2, "zero_stage": 3}, {"dtype": "bfloat16"}),
    "ddp_fp16": ("gpt", {"dp": 2}, {"dtype": "float16"}),
    # bf16 parameters would meet BatchNorm's fp32 statistics: its layers keep fp32 parameters. Compared with the same
    # layout under autocast (the BatchNorm layers then see what they see here: bf16 input, fp32 parameters).
    "zero3_bf16_sync_bn": ("resnet", {"dp": 2, "zero_stage": 3, "num_micro_batches": 1, "micro_batch_size": 4,
                                      "num_layers": RESNET_LAYERS}, {"sync_bn": True, "lr": 0.01, "dtype": "bfloat16"}),
    "zero3_autocast_bf16_sync_bn": ("resnet", {"dp": 2, "zero_stage": 3, "num_micro_batches": 1,
                                               "micro_batch_size": 4, "num_layers": RESNET_LAYERS},
                                    {"sync_bn": True, "lr": 0.01, "autocast": "bfloat16"}),
    "ddp_sync_bn": ("resnet", {"dp": 2, "num_micro_batches": 1, "micro_batch_size": 4, "num_layers": RESNET_LAYERS},
                    {"sync_bn": True, "lr": 0.1}),
    "zero3_sync_bn_clip": ("resnet", {"dp": 2, "zero_stage": 3, "num_micro_batches": 1, "micro_batch_size": 4,
                                      "num_layers": RESNET_LAYERS}, {"sync_bn": True, "clip": 1.0}),
    "ddp_unsynced_bn": ("resnet", {"dp": 2, "num_micro_batches": 1, "micro_batch_size": 4,
                                   "num_layers": RESNET_LAYERS}, {"lr": 0.1}),
}
FOUR_RANK = {
    "dp2xtp2_fsdp_clip": ("gpt", {"dp": 2, "tp": 2, "zero_stage": 3}, {"clip": CLIP}),
    "dp2xpp2_zero3_clip": ("gpt", {"dp": 2, "pp": 2, "cuts": (3,), "schedule": "gpipe", "zero_stage": 3},
                           {"clip": CLIP, "schedule": SCHEDULE}),
}
#: BatchNorm buffers compared with the single-process run after training.
BN_BUFFERS = ("stem.bn.running_mean", "stem.bn.running_var", "blocks.7.bn2.running_var")


def _zoo(kind: str):
    from profiler.zoo import get_model

    return {"gpt": lambda: get_model("gpt-tiny"), "tied": lambda: get_model(sup.TIED[0], **dict(sup.TIED[1])),
            "resnet": lambda: get_model(RESNET[0], **dict(RESNET[1]))}[kind]()


def expected_lr(step: int, total: int, *, base: float, kind: str, warmup: int, min_lr: float) -> float:
    """The schedule as documented, written out independently of executor.optim."""
    if step < warmup:
        return base * (step + 1) / warmup
    if kind == "constant":
        return base
    p = min(1.0, (step - warmup) / (total - warmup))
    decay = (1 + math.cos(math.pi * p)) / 2 if kind == "cosine" else 1 - p
    return min_lr + (base - min_lr) * decay


# --- the worker program -------------------------------------------------------------------------------------

class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def _run_case(name: str, kind: str, st, opts: dict, profile, device, tmp: Path) -> dict:
    import torch.distributed as dist

    from executor import apply_plan, train

    zoo = _zoo(kind)
    handler = _Records()
    logging.getLogger("executor").addHandler(handler)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(opts.get("dtype"))
    autocast = {"bfloat16": torch.bfloat16}.get(opts.get("autocast"))
    pm = apply_plan(st, functools.partial(zoo.build, "meta"), profile, loss_fn=zoo.loss, device=device,
                    seed=sup.SEED, compute_dtype=dtype, autocast_dtype=autocast,
                    sync_batchnorm=opts.get("sync_bn", False))
    logging.getLogger("executor").removeHandler(handler)
    out: dict = {"warnings": handler.messages}
    if kind == "resnet":
        inner = pm.parts[0].module if hasattr(pm.parts[0], "module") else pm.parts[0]
        out["names"] = sorted(n for n, _ in inner.named_parameters()) + sorted(n for n, _ in inner.named_buffers())
        out["bn_classes"] = sorted({type(m).__name__ for m in inner.modules() if "BatchNorm" in type(m).__name__})
    if dtype is not None:
        seen = []
        pm.parts[0].register_forward_hook(lambda m, a, o: seen.append(str(o.dtype)))
    opts_ = [torch.optim.SGD(p.parameters(), lr=opts.get("lr", LR)) for p in pm.parts]
    schedule = LRSchedule(**opts["schedule"]) if "schedule" in opts else LRSchedule()
    scheds = build_lr_schedulers(opts_, schedule, total_steps=sup.STEPS)
    tb = tmp / f"tb_{name}" if opts.get("tb") else None

    def data(step: int, batch: int):
        return zoo.synthetic_batch(batch, seed=sup.DATA_SEED + step)

    records = train(pm, opts_, data, steps=sup.STEPS, schedulers=scheds, clip_grad=opts.get("clip"),
                    tensorboard_dir=tb)
    out |= {"losses": [r.loss for r in records], "lrs": [r.lr for r in records],
            "norms": [r.grad_norm for r in records], "tb": str(tb) if tb else None}
    if dtype is not None:
        out["output_dtype"] = seen[0]
        out["param_dtypes"] = sorted({str(p.dtype) for part in pm.parts for p in part.parameters()})
        out["scale"] = pm.grad_scaler.get_scale() if pm.grad_scaler is not None else None
    if kind == "resnet":
        inner = pm.parts[0].module if hasattr(pm.parts[0], "module") else pm.parts[0]
        mine = {b: _full(inner.get_buffer(b)).tolist() for b in BN_BUFFERS}
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        out["buffers"] = everyone
    return out


def _worker(cases_path: str, out_path: str) -> None:
    """Run every case in the file on this rank; rank 0 writes {case: results}."""
    import torch.distributed as dist

    from executor import init_distributed
    from executor.worker import teardown
    from planner.model_profile import ModelProfile
    from planner.strategy import Strategy

    payload = json.loads(Path(cases_path).read_text())
    profiles = {k: ModelProfile.model_validate(v) for k, v in payload["profiles"].items()}
    device = init_distributed("cpu")
    results = {}
    for name, (kind, raw, opts) in payload["cases"].items():
        results[name] = _run_case(name, kind, Strategy.model_validate(raw), opts, profiles[kind], device,
                                  Path(cases_path).parent)
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))
    teardown()


# --- launching and the single-process reference -------------------------------------------------------------

@functools.cache
def _profile(kind: str):
    return {"gpt": sup.tiny_profile, "tied": lambda: sup.tiny_profile(*sup.TIED),
            "resnet": lambda: sup.tiny_profile(*RESNET)}[kind]()


def _launch(nproc: int, cases: dict, tmp: Path) -> dict:
    cases_path, out_path = tmp / f"cases{nproc}.json", tmp / f"out{nproc}.json"
    kinds = {kind for kind, _, _ in cases.values()}
    payload = {
        "profiles": {k: _profile(k).model_dump(mode="json") for k in kinds},
        "cases": {n: (kind, sup.strategy(**kw).model_dump(mode="json"), opts) for n, (kind, kw, opts) in cases.items()},
    }
    sup.run_workers(__file__, nproc, payload, cases_path, out_path, timeout=170)
    return json.loads(out_path.read_text())


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory) -> dict:
    return _launch(2, TWO_RANK, tmp_path_factory.mktemp("loop2"))


@pytest.fixture(scope="module")
def four_rank(tmp_path_factory) -> dict:
    return _launch(4, FOUR_RANK, tmp_path_factory.mktemp("loop4"))


def reference(kind: str, global_batch: int, *, clip: float | None = None, schedule: dict | None = None,
              dtype: str | None = None, steps: int = sup.STEPS, data_seed: int = sup.DATA_SEED,
              lr: float = LR) -> dict:
    """One process, the whole model and batch, stock torch: clip_grad_norm_, autocast, GradScaler, plain BN."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two busy cores run tens of times slower
    try:
        return _reference(kind, global_batch, clip=clip, schedule=schedule, dtype=dtype, steps=steps,
                          data_seed=data_seed, lr=lr)
    finally:
        torch.set_num_threads(threads)


def _reference(kind: str, global_batch: int, *, clip: float | None, schedule: dict | None, dtype: str | None,
               steps: int, data_seed: int, lr: float) -> dict:
    from executor.init import name_seed

    zoo = _zoo(kind)
    net = zoo.build("cpu")
    with torch.no_grad():
        for name, p in net.named_parameters():
            net.init_parameter(name, p, torch.Generator().manual_seed(name_seed(sup.SEED, name)))
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    amp = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    scaler = torch.amp.GradScaler("cpu") if amp == torch.float16 else None
    out: dict = {"losses": [], "lrs": [], "norms": []}
    for step in range(steps):
        step_lr = expected_lr(step, steps, base=lr, **schedule) if schedule else lr
        for group in opt.param_groups:
            group["lr"] = step_lr
        inputs, targets = zoo.synthetic_batch(global_batch, seed=data_seed + step)
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            loss = zoo.loss(net(*inputs), targets)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip if clip else math.inf)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
        out["losses"].append(loss.item())
        out["lrs"].append(step_lr)
        out["norms"].append(norm.item())
    if kind == "resnet":
        out["buffers"] = {b: net.get_buffer(b).tolist() for b in BN_BUFFERS}
    return out


def _ref_for(cases: dict, name: str, **override) -> dict:
    kind, kw, opts = cases[name]
    gbs = sup.strategy(**kw).global_batch_size
    args = {"clip": opts.get("clip"), "schedule": opts.get("schedule"), "dtype": opts.get("dtype"),
            "lr": opts.get("lr", LR)} | override
    return reference(kind, gbs, **args)


def _close(a: list[float], b: list[float], tol: float) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= tol


# --- whole-model gradient clipping --------------------------------------------------------------------------

CLIPPED_2 = ["zero3_clip_cosine_tb", "pp2_1f1b_clip", "tp2_clip", "tied_pp2_clip"]


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", CLIPPED_2)
def test_clipped_update_of_two_rank_layout_equals_single_process(two_rank, case):
    got, ref = two_rank[case], _ref_for(TWO_RANK, case)
    assert _close(got["losses"], ref["losses"], TOL), (got["losses"], ref["losses"])
    # The norm before clipping is the whole model's (every stage, every shard, a tied weight once).
    assert all(abs(a - b) <= 1e-5 * b for a, b in zip(got["norms"], ref["norms"])), (got["norms"], ref["norms"])
    assert min(ref["norms"]) > CLIP  # clipping really acted on every step...
    unclipped = _ref_for(TWO_RANK, case, clip=None)
    assert not _close(unclipped["losses"], ref["losses"], 1e-3)  # ...and changed the losses


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", sorted(FOUR_RANK))
def test_clipped_update_of_four_rank_layout_equals_single_process(four_rank, case):
    got, ref = four_rank[case], _ref_for(FOUR_RANK, case)
    assert _close(got["losses"], ref["losses"], TOL), (got["losses"], ref["losses"])
    assert all(abs(a - b) <= 1e-5 * b for a, b in zip(got["norms"], ref["norms"])), (got["norms"], ref["norms"])


# --- learning-rate schedule ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["constant", "cosine", "linear"])
def test_schedule_follows_warmup_then_decay_formula(kind):
    sched = LRSchedule(kind=kind, warmup=3, min_lr=0.01)
    total = 13
    got = [sched.lr_at(s, base_lr=0.5, total_steps=total) for s in range(total + 2)]
    want = [expected_lr(s, total, base=0.5, kind=kind, warmup=3, min_lr=0.01) for s in range(total + 2)]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[:3] == pytest.approx([0.5 / 3, 1.0 / 3, 0.5])  # linear warmup reaches the peak at its last step
    if kind != "constant":
        assert got[3] == pytest.approx(0.5) and got[total] == pytest.approx(0.01)  # peak, then the floor
        assert got[total - 1] > 0.01 and got[-1] == pytest.approx(0.01)  # floor reached after the run, then kept


def test_lambda_schedulers_step_once_per_step_and_resume_continues_the_curve():
    sched = LRSchedule(kind="cosine", warmup=2, min_lr=0.05)
    total, base = 10, 0.4

    def run(start: int, stop: int, lr_in_state: float) -> list[float]:
        opts = [torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=lr_in_state) for _ in range(2)]
        scheds = build_lr_schedulers(opts, sched, total_steps=total, start_step=start, base_lr=base)
        lrs = []
        for _ in range(start, stop):
            lrs.append([o.param_groups[0]["lr"] for o in opts])
            for o, s in zip(opts, scheds):
                o.step()
                s.step()
        return lrs

    whole = run(0, total, base)
    # A resumed optimizer state carries the last scheduled rate, not the peak: the resumed curve must not care.
    resumed = run(6, total, lr_in_state=whole[5][0])
    want = [expected_lr(s, total, base=base, kind="cosine", warmup=2, min_lr=0.05) for s in range(total)]
    assert [a for a, _ in whole] == pytest.approx(want, rel=1e-12)
    assert all(a == b for a, b in whole)  # one scheduler per optimizer, all in step
    assert resumed == whole[6:]


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_two_rank_run_follows_the_schedule(two_rank):
    lrs = two_rank["zero3_clip_cosine_tb"]["lrs"]
    assert lrs == pytest.approx([expected_lr(s, sup.STEPS, base=LR, **SCHEDULE) for s in range(sup.STEPS)], rel=1e-9)


# --- mixed precision ----------------------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_bf16_zero3_runs_bf16_compute_with_fp32_master_weights_close_to_autocast(two_rank):
    got = two_rank["zero3_bf16"]
    ref = _ref_for(TWO_RANK, "zero3_bf16")
    assert all(math.isfinite(x) for x in got["losses"])
    assert got["output_dtype"] == "torch.bfloat16"  # the FSDP2 policy computes in bf16...
    assert got["param_dtypes"] == ["torch.float32"]  # ...and keeps fp32 sharded parameters
    assert _close(got["losses"], ref["losses"], rounding_tol(ref["losses"], "bfloat16")), (got["losses"], ref["losses"])


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_bf16_fsdp_keeps_batchnorm_parameters_fp32_and_matches_autocast(two_rank):
    got = two_rank["zero3_bf16_sync_bn"]
    assert got["output_dtype"] == "torch.bfloat16"
    assert all(math.isfinite(x) for x in got["losses"])
    # Same layout under autocast: the same roundings (bf16 weights and activations, fp32 BatchNorm parameters and
    # gradient reduction), so the same numbers.
    assert _close(got["losses"], two_rank["zero3_autocast_bf16_sync_bn"]["losses"], TOL)
    # Against one process only the first forward: with 4-sample BatchNorm one update moves this loss by ~10%,
    # which turns the different rounding of a gradient summed in two halves into loss differences beyond one
    # bf16 rounding by the third step (fp32 runs agree to 1e-5, see the sync tests).
    ref = _ref_for(TWO_RANK, "zero3_bf16_sync_bn")
    assert abs(got["losses"][0] - ref["losses"][0]) <= rounding_tol(ref["losses"], "bfloat16")


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_fp16_ddp_scales_the_loss_and_matches_single_process_grad_scaler(two_rank):
    got = two_rank["ddp_fp16"]
    ref = _ref_for(TWO_RANK, "ddp_fp16")
    assert got["output_dtype"] == "torch.float16"
    assert got["scale"] == torch.amp.GradScaler("cpu").get_scale()  # finite steps: the scale was never cut
    assert _close(got["losses"], ref["losses"], rounding_tol(ref["losses"], "float16")), (got["losses"], ref["losses"])


def test_fp16_is_refused_where_gradients_are_sharded_and_bf16_uses_the_fsdp2_policy():
    zero3 = sup.strategy(dp=2, zero_stage=3)
    with pytest.raises(ExecutorError, match="ZeRO stage 3.*bfloat16"):
        mixed_precision(zero3, torch.float16, fsdp2=True)
    with pytest.raises(ExecutorError, match="pp=2"):
        mixed_precision(sup.strategy(pp=2, cuts=(3,)), torch.float16, fsdp2=False)
    policy, autocast = mixed_precision(zero3, torch.bfloat16, fsdp2=True)
    assert (policy.param_dtype, policy.reduce_dtype, autocast) == (torch.bfloat16, torch.float32, None)
    assert mixed_precision(sup.strategy(dp=2), torch.float16, fsdp2=False) == (None, torch.float16)  # DDP


# --- TensorBoard --------------------------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_tensorboard_events_hold_the_reported_scalars(two_rank):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    got = two_rank["zero3_clip_cosine_tb"]
    files = list(Path(got["tb"]).glob("events.out.tfevents.*"))
    assert len(files) == 1  # rank 0 only
    acc = EventAccumulator(str(files[0]))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/step_seconds", "train/tokens_per_second",
            "train/grad_norm"} <= set(acc.Tags()["scalars"])
    for tag, key in (("train/loss", "losses"), ("train/lr", "lrs"), ("train/grad_norm", "norms")):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == list(range(sup.STEPS))
        assert [e.value for e in events] == pytest.approx(got[key], rel=1e-6)  # stored as float32


def test_tensorboard_missing_is_an_error_naming_pip_install(monkeypatch):
    from executor.train import check_tensorboard

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what an environment without the package imports
    with pytest.raises(ExecutorError, match="pip install tensorboard"):
        check_tensorboard()


# --- BatchNorm ----------------------------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", ["ddp_sync_bn", "zero3_sync_bn_clip"])
def test_synced_batchnorm_under_dp2_equals_single_process(two_rank, case):
    got, ref = two_rank[case], _ref_for(TWO_RANK, case)
    assert _close(got["losses"], ref["losses"], TOL), (got["losses"], ref["losses"])
    for rank_buffers in got["buffers"]:  # running statistics: of the whole batch, on every rank
        for name in BN_BUFFERS:
            assert rank_buffers[name] == pytest.approx(ref["buffers"][name], abs=1e-5), name
    plain = _zoo("resnet").build("meta")
    assert got["names"] == sorted(n for n, _ in plain.named_parameters()) + sorted(n for n, _ in plain.named_buffers())
    assert got["bn_classes"] == ["SyncedBatchNorm2d"]
    assert not got["warnings"]


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_unsynced_batchnorm_under_dp_warns_naming_the_layers(two_rank):
    got = two_rank["ddp_unsynced_bn"]
    ref = _ref_for(TWO_RANK, "ddp_unsynced_bn")
    warning = next(m for m in got["warnings"] if "BatchNorm" in m)
    assert "stem.bn" in warning and "blocks.7.bn2" in warning and "--sync-batchnorm" in warning
    assert not _close(got["losses"], ref["losses"], 1e-3)  # per-replica statistics: why the warning exists
    assert got["bn_classes"] == ["BatchNorm2d"]


# --- autopar run: the flags reach every rank ----------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_autopar_run_flags_clip_schedule_sync_batchnorm_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from executor.launch import read_report

    st = sup.strategy(dp=2, num_micro_batches=1, micro_batch_size=4, num_layers=RESNET_LAYERS)
    plan_path, report_path, tb = tmp_path / "plan.json", tmp_path / "report.json", tmp_path / "tb"
    sup.make_plan(st, _profile("resnet")).to_json(plan_path)
    schedule = {"kind": "linear", "warmup": 1, "min_lr": 0.1}
    options = [a for k, v in RESNET[1] for a in ("--option", f"{k}={v}")]
    proc = subprocess.run(
        [sys.executable, "-c", "from api.cli import main; main()", "run", str(plan_path), "--model", RESNET[0],
         *options, "--steps", str(sup.STEPS), "--optimizer", "sgd", "--lr", str(LR), "--seed", str(sup.SEED),
         "--clip-grad", "1.0", "--lr-schedule", "linear", "--warmup", "1", "--min-lr", "0.1", "--sync-batchnorm",
         "--tensorboard", str(tb), "--report", str(report_path)],
        check=False, capture_output=True, text=True, timeout=150, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = read_report(report_path).steps
    # synthetic data: the batch of step s is drawn with seed (run seed + s)
    ref = reference("resnet", st.global_batch_size, clip=1.0, schedule=schedule, data_seed=sup.SEED)
    assert _close([r.loss for r in steps], ref["losses"], TOL), ([r.loss for r in steps], ref["losses"])
    assert [r.lr for r in steps] == pytest.approx(ref["lrs"], rel=1e-9)
    assert [r.grad_norm for r in steps] == pytest.approx(ref["norms"], rel=1e-5)
    files = list(tb.glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = EventAccumulator(str(files[0]))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r.loss for r in steps], rel=1e-6)


# --- options checked before launch --------------------------------------------------------------------------

def _spec(**kw):
    from executor.launch import RunSpec

    st = kw.pop("strategy", sup.strategy(dp=2))
    return RunSpec(plan=sup.make_plan(st, sup.tiny_profile()), profile=sup.tiny_profile(), model="gpt-tiny",
                   steps=kw.pop("steps", 10), **kw)


@pytest.mark.parametrize(("kw", "words"), [
    ({"lr_schedule": {"kind": "cosine", "min_lr": 1.0}}, "--min-lr"),
    ({"lr_schedule": {"kind": "linear", "warmup": 10}}, "--warmup"),
    ({"dtype": "float16", "strategy": sup.strategy(pp=2, cuts=(3,))}, "bfloat16"),
    ({"clip_grad": 0.0}, "clip_grad"),
])
def test_run_options_that_cannot_run_are_refused_naming_the_fix(kw, words):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=words):
        _spec(**kw)


def test_run_options_that_can_run_are_accepted():
    spec = _spec(dtype="float16", clip_grad=1.0, lr_schedule={"kind": "cosine", "warmup": 2, "min_lr": 1e-5},
                 sync_batchnorm=True, tensorboard="tb")
    assert spec.lr_schedule.kind == "cosine" and spec.clip_grad == 1.0


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
