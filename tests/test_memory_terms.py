"""The memory model's runtime, optimizer-temporary and output-buffer terms, each against an independent count."""

from __future__ import annotations

import mmap

import pytest
import torch

from planner.cluster import load_cluster
from planner.model_profile import LayerProfile
from planner.strategy import ParallelDims, StageSpec, Strategy, ZeroStage


def _layer(index: int, params: int, output_bytes: float = 0.0) -> LayerProfile:
    return LayerProfile(index=index, name=f"l{index}", module_type="L", param_count=params, param_bytes=4 * params,
                        fwd_flops=1e6, bwd_flops=2e6, fwd_bytes=1e3, bwd_bytes=1e3, saved_activation_bytes=0,
                        input_bytes=0, output_bytes=output_bytes)


def _allocations(prof, op: str) -> list[int]:
    """Bytes each call of `op` allocated on the CPU, as torch.profiler reports them (in call order)."""
    return [e.cpu_memory_usage for e in prof.events() if e.name == op]


def test_cpu_adamw_step_temporaries_are_two_copies_of_the_largest_tensor_as_the_profiler_sees():
    from planner.memory import estimate_optimizer_temp_bytes

    big, small = 300 * 200, 50 * 40  # one weight tensor per layer (no bias), so a layer's params are one tensor
    model = torch.nn.Sequential(torch.nn.Linear(200, 300, bias=False), torch.nn.Linear(50, 40, bias=False))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # the first step allocates the moments; the second allocates only temporaries
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    # The step allocates, per parameter, a square root and the quotient that reads it (alive together); nothing
    # else of parameter size.
    sqrt, div = _allocations(prof, "aten::sqrt"), _allocations(prof, "aten::div")
    assert len(sqrt) == len(div) == 2
    measured = max(a + b for a, b in zip(sqrt, div))
    const, per_elem = estimate_optimizer_temp_bytes([_layer(0, big), _layer(1, small)], tp=1, dp=1,
                                                    zero=ZeroStage.NONE, device_type="cpu")
    assert per_elem == 0 and const == 2 * 4 * big
    assert measured == const


def test_cuda_foreach_temporaries_are_one_fp32_copy_of_the_local_shard():
    from planner.memory import estimate_optimizer_temp_bytes

    layers = [_layer(0, 1000)]
    assert estimate_optimizer_temp_bytes(layers, tp=1, dp=4, zero=ZeroStage.NONE, device_type="cuda") == (0, 4.0)
    assert estimate_optimizer_temp_bytes(layers, tp=1, dp=4, zero=ZeroStage.FULL, device_type="cuda") == (0, 1.0)


def test_output_buffers_are_two_logits_of_one_micro_batch_by_hand_and_the_executor_keeps_no_more():
    from executor.apply import _SCHEDULE_TAKES_RETURN_OUTPUTS
    from planner.memory import estimate_output_buffer_bytes

    b, s, vocab = 3, 16, 1000
    head = _layer(0, 0, output_bytes=s * vocab * 4)  # fp32 logits per sample
    assert estimate_output_buffer_bytes(head, tp=1, micro_batch=b) == 2 * b * s * vocab * 4
    # A pipeline's last stage would keep every micro-batch's output for the schedule's merged return value; the
    # executor turns that off, which the planner's count assumes.
    assert _SCHEDULE_TAKES_RETURN_OUTPUTS


def _tiny_profile():
    import profiler

    return profiler.profile_zoo("gpt-tiny")


def test_calibrated_runtime_memory_reaches_every_rank_of_the_breakdown_and_it_sums_to_total():
    from planner import evaluate
    from planner.cluster_fit import build_cluster
    from tests.test_calibrate import _synthetic

    truth = load_cluster("cpu", gpus_per_node=2)
    m = _synthetic(truth, noise=0.0, seed=0).model_copy(update={"runtime_memory_bytes": 3.5e6,
                                                     "dtensor_runtime_memory_bytes": 2.0e6})
    cluster = build_cluster(m).cluster
    assert cluster.device.runtime_memory_bytes == 3_500_000
    assert cluster.device.dtensor_runtime_memory_bytes == 2_000_000
    profile = _tiny_profile()
    n = profile.num_layers
    whole = [StageSpec(start=0, stop=n)]
    dp = ParallelDims(dp=2, tp=1, pp=1, world_size=2)
    pp = ParallelDims(dp=1, tp=1, pp=2, world_size=2)
    cut = min(profile.cut_points, key=lambda k: abs(k - n / 2))
    plans = {
        "ddp": Strategy(dims=dp, micro_batch_size=2, num_micro_batches=1, stages=whole),
        "zero3": Strategy(dims=dp, zero_stage=ZeroStage.FULL, micro_batch_size=2, num_micro_batches=1, stages=whole),
        "pp": Strategy(dims=pp, micro_batch_size=1, num_micro_batches=4,
                       stages=[StageSpec(start=0, stop=cut), StageSpec(start=cut, stop=n)]),
    }
    runtime = {"ddp": 3_500_000, "zero3": 5_500_000, "pp": 3_500_000}  # FSDP2's parameters are DTensors
    for kind, st in plans.items():
        memory = evaluate(profile, cluster, st).memory
        for r, mb in enumerate(memory):
            assert mb.runtime == runtime[kind]
            parts = (mb.parameters + mb.gradients + mb.optimizer_state + mb.activations + mb.comm_buffers
                     + mb.runtime + mb.optimizer_temporaries + mb.output_buffers)
            assert mb.total == pytest.approx(parts, rel=1e-9, abs=8)  # whole-byte rounding of the search's sums
            assert (mb.output_buffers > 0) == (r == len(memory) - 1), (kind, r)  # only where the head runs


def test_cpu_memory_measure_counts_private_pages_not_file_pages(tmp_path):
    from executor.train import current_memory_bytes

    cpu = torch.device("cpu")
    path = tmp_path / "blob"
    size = 64 * 2**20
    path.write_bytes(b"\1" * size)
    before = current_memory_bytes(cpu)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        touched = sum(mm[i] for i in range(0, size, 4096))  # page in every page of the file
        file_delta = current_memory_bytes(cpu) - before
    assert touched == size // 4096
    held = bytearray(size)
    for i in range(0, size, 4096):
        held[i] = 1  # make every page resident
    anon_delta = current_memory_bytes(cpu) - before
    assert file_delta < size / 8  # the mapped file's pages are not counted
    assert anon_delta >= 0.9 * size  # private memory is
