"""Elements a pass evaluates a transcendental function on (exp, log, tanh, erf): what their cost is on a CPU.

An elementwise op costs its memory traffic on a GPU, whose special-function units evaluate exp / tanh far faster
than memory feeds them. One CPU core evaluates them in software at several nanoseconds per element (measured on the
2-core Xeon this project is tested on, one thread: GELU with the tanh approximation ~2.6 ns per element, log-softmax
of a 256 x 50257 matrix ~3.9 ns, against ~0.25 ns per element of an addition), so there these ops are compute-bound
and the bytes-only roofline undercounts them. The profiler counts, per pass, the elements such ops evaluate
(`LayerProfile.fwd_transcendental_elements`); the cost model charges `DeviceSpec.transcendental_element_seconds`
for each (`planner.cost.estimate_pass_seconds`).

Counted: the output elements of each op below, and for fused attention kernels the scores they exponentiate
(batch x heads x q_len x kv_len, the causal share only when causal), forward and again in backward (the kernels
recompute the probabilities from the saved log-sum-exp). The math path of attention counts its softmax instead.
"""

from __future__ import annotations

import math

import torch

from profiler.attention import _FUSED_OPS, causal_fraction

aten = torch.ops.aten

#: Ops whose kernel evaluates exp, log, tanh or erf once per output element (torch's CPU kernels: aten/src/ATen/
#: native/cpu/Activation.cpp for gelu / silu / sigmoid, SoftMax.cpp for softmax and log-softmax; the backward of
#: log-softmax computes exp(output), that of softmax and tanh only multiplies, so they are not listed).
TRANSCENDENTAL_OPS = frozenset({
    aten.exp, aten.exp_, aten.log, aten.log_, aten.tanh, aten.tanh_, aten.erf, aten.erf_, aten.sigmoid, aten.sigmoid_,
    aten.gelu, aten.gelu_, aten.gelu_backward, aten.silu, aten.silu_, aten.silu_backward, aten.softplus,
    aten.log_sigmoid_forward, aten._softmax, aten._log_softmax, aten._log_softmax_backward_data, aten.logsumexp,
})


def transcendental_elements(func, args: tuple, kwargs: dict, outs: list[torch.Tensor]) -> float:
    """Elements one dispatched op evaluates a transcendental function on (0 for any other op)."""
    packet = func._overloadpacket
    if packet in _FUSED_OPS:
        bound = dict(zip((a.name for a in func._schema.arguments), args)) | kwargs
        q, k = bound["query"], bound["key"]
        scores = math.prod(q.shape[:-1]) * k.shape[-2]
        return float(scores * (causal_fraction(q.shape[-2], k.shape[-2]) if bound.get("is_causal") else 1.0))
    if packet in TRANSCENDENTAL_OPS and outs:
        return float(outs[0].numel())
    return 0.0
