"""Timing layers and whole steps on a real device: warm-up, then the median of repeats.

Each layer runs alone on the arguments it received in a real forward pass: forward, then backward with a gradient
of ones on its outputs, with fresh leaf inputs and cleared parameter gradients every repeat so that every repeat
does the same work as a training step's first micro-batch. The whole step (the model's forward, then backward with
a gradient of ones) is timed the same way, so the sum of the layers can be checked against it. With a training loss,
the last layer's forward and the step's forward end with the loss and backward starts from it. On CUDA, events
time the kernels; on CPU, wall time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from profiler.loss import TrainingLoss
from profiler.recording import LayerCall, fresh_leaf_args, tensors_of


class _Stopwatch:
    """Times a callable on one device; CUDA events on GPU, perf_counter elsewhere."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def time(self, fn: Callable[[], object]) -> tuple[float, object]:
        """Seconds `fn` took, and what it returned."""
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            stop.record()
            torch.cuda.synchronize()
            return start.elapsed_time(stop) / 1e3, result
        t0 = time.perf_counter()
        result = fn()
        return time.perf_counter() - t0, result


def _clear_grads(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def _backward(outputs: object) -> None:
    needs_grad = [t for t in tensors_of(outputs) if t.requires_grad]
    if needs_grad:
        torch.autograd.backward(needs_grad, [torch.ones_like(t) for t in needs_grad])


def _time_layer_once(
    watch: _Stopwatch, module: nn.Module, call: LayerCall, loss: TrainingLoss | None
) -> tuple[float, float]:
    _clear_grads(module)
    args, kwargs = fresh_leaf_args(call)
    if watch.cuda:
        torch.cuda.synchronize()

    def forward() -> object:
        output = module(*args, **kwargs)
        return output if loss is None else loss(output)

    with torch.enable_grad():
        t_fwd, output = watch.time(forward)
    t_bwd, _ = watch.time(lambda: _backward(output))
    return t_fwd, t_bwd


def _time_step_once(
    watch: _Stopwatch, model: nn.Module, inputs: tuple, loss: TrainingLoss | None
) -> tuple[float, int | None]:
    _clear_grads(model)
    if watch.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with torch.enable_grad():
            output = model(*inputs)
            _backward(output if loss is None else loss(output))

    seconds, _ = watch.time(step)
    return seconds, int(torch.cuda.max_memory_allocated()) if watch.cuda else None


@dataclass(frozen=True)
class Timings:
    """Median seconds per layer key (forward, backward) and of a whole step, for the whole batch."""

    layers: dict[str, tuple[float, float]]
    step_seconds: float
    peak_memory_bytes: int | None


def estimate_times(
    model: nn.Module,
    inputs: tuple,
    layers: dict[str, tuple[nn.Module, LayerCall]],
    *,
    device: str,
    warmup: int,
    repeats: int,
    progress: Callable[[int, int], None] | None = None,
    loss: tuple[str, TrainingLoss] | None = None,
) -> Timings:
    """Time every layer (keyed as given) and a whole forward + backward, in interleaved rounds.

    Each round runs every layer once and then one whole step, so a slowdown from other work on the machine hits
    the layer times and the step time alike; the medians over the timed rounds are returned. The step, the most
    expensive part and only a check on the layers, runs in the last `min(repeats, 3)` rounds plus one warm-up
    step before them. `loss` = (layer key, loss): that layer's timing and every step include the loss.
    """
    watch = _Stopwatch(device)
    samples: dict[str, list[tuple[float, float]]] = {key: [] for key in layers}
    steps: list[float] = []
    peak: int | None = None
    rounds = warmup + repeats
    step_repeats = min(repeats, 3)
    for i in range(rounds):
        if progress is not None:
            progress(i, rounds)
        for key, (module, call) in layers.items():
            t = _time_layer_once(watch, module, call, loss[1] if loss is not None and loss[0] == key else None)
            if i >= warmup:
                samples[key].append(t)
        if i < rounds - step_repeats - 1:
            continue
        seconds, peak_i = _time_step_once(watch, model, inputs, None if loss is None else loss[1])
        if i >= rounds - step_repeats:
            steps.append(seconds)
            if peak_i is not None:
                peak = max(peak or 0, peak_i)
    for module, _ in layers.values():
        _clear_grads(module)
    _clear_grads(model)
    medians = {
        key: (statistics.median(f for f, _ in ts), statistics.median(b for _, b in ts)) for key, ts in samples.items()
    }
    return Timings(layers=medians, step_seconds=statistics.median(steps), peak_memory_bytes=peak)
