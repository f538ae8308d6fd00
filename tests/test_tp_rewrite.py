"""Tensor parallelism for layers as users write them: a fused qkv projection split into q, k, v and forwards that
hard-code their sizes (`view(B, T, self.n_head, hs)`, `split(self.n_embd, dim=2)`, `view(B, T, C)`).

Detection (profiler) and the executor's rewrite share one analysis (profiler.tp_shapes); the 2-rank launch trains a
nanoGPT-style model at tp=2 against the single-process run and checks that a checkpoint of its permuted fused weight
resumes under the same tp and is refused under another. (FusedGPT under tp=2, dp2 x tp2 and pp2 x tp2 runs in
tests/test_executor_user_models.py.)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import executor_support as sup
import user_models as um

from planner.cost import device_param_count
from planner.model_profile import ShardStyle
from profiler import profile

TOL = 1e-5
STEPS = 3
LR = 0.1


class NanoBlock(nn.Module):
    """nanoGPT's Block, sizes hard-coded from the config, attention written out (causal mask, matmuls, softmax).

    (nanoGPT slices a registered mask buffer by T; torch.fx cannot trace a buffer sliced by a traced size.)
    """

    def __init__(self, n_embd: int = 16, n_head: int = 4) -> None:
        super().__init__()
        self.n_embd, self.n_head = n_embd, n_head
        self.ln_1 = nn.LayerNorm(n_embd)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd)

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # noqa: N806 - nanoGPT's names
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        causal = x.new_ones(T, T).tril().bool()
        att = att.masked_fill(~causal, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """Embeddings, two NanoBlocks, an untied head."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(um.VOCAB, 16)
        self.blocks = nn.ModuleList([NanoBlock(), NanoBlock()])
        self.head = nn.Linear(16, um.VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class NormedQBlock(NanoBlock):
    """A LayerNorm over q's whole width sits between the fused projection and the heads: not splittable."""

    def __init__(self) -> None:
        super().__init__()
        self.q_norm = nn.LayerNorm(self.n_embd)

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # noqa: N806
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (self.q_norm(q), k, v))
        return self.c_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))


class OffHeadSplitBlock(NanoBlock):
    """q is split again at width 6, which is not a multiple of the head width 4."""

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # noqa: N806
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q1, q2 = q.split([6, C - 6], dim=2)
        q = torch.cat([q1 * 2, q2], dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        return self.c_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))


def _tokens(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, um.VOCAB, (batch, um.SEQ), generator=torch.Generator().manual_seed(0))


def _block_tp(block: nn.Module):
    return profile(nn.Sequential(block, NanoBlock()), torch.randn(2, 8, 16), cache=False).layers[0].tp


def test_fused_gpt_block_shards_its_fused_qkv_per_head():
    p = profile(um.FusedGPT(dim=64, heads=8), _tokens(), cache=False)
    block = next(layer for layer in p.layers if layer.name == "blocks.0")
    shards = {s.module: s for s in block.tp.shards}
    assert shards["qkv"].style == ShardStyle.COLWISE and shards["qkv"].segments == [64, 64, 64]
    assert shards["proj"].style == ShardStyle.ROWWISE
    assert block.tp.divisor == 8  # heads
    # By hand: qkv 64x192, proj 64x64, fc 64x256, out 256x64 split 8 ways; the two RMSNorm weights (64 each) whole.
    sharded = 64 * 192 + 64 * 64 + 64 * 256 + 256 * 64
    assert block.param_count == sharded + 2 * 64
    assert device_param_count(block, 8) == sharded / 8 + 2 * 64


def test_nanogpt_block_with_hard_coded_sizes_is_offered_tp():
    tp = _block_tp(NanoBlock())
    styles = {s.module: (s.style, s.segments) for s in tp.shards}
    assert styles == {
        "c_attn": (ShardStyle.COLWISE, [16, 16, 16]), "c_fc": (ShardStyle.COLWISE, None),
        "c_proj": (ShardStyle.ROWWISE, None), "mlp_proj": (ShardStyle.ROWWISE, None),
    }
    assert tp.divisor == 4
    assert tp.sharded_param_count == 16 * 48 + 48 + 16 * 16 + 16 * 64 + 64 + 64 * 16


@pytest.mark.parametrize("block, op", [(NormedQBlock(), "q_norm"), (OffHeadSplitBlock(), "split")])
def test_attention_the_analysis_cannot_follow_is_refused_by_profiler_and_executor(block, op):
    from executor.errors import ExecutorError
    from executor.tp_rewrite import localize_layer
    from planner.model_profile import TensorParallelSpec, TPShard
    from profiler.recording import LayerCall

    tp = _block_tp(block)
    assert {s.module for s in tp.shards} == {"c_fc", "mlp_proj"}  # only the MLP is offered
    forged = TensorParallelSpec(
        shards=[TPShard(module="c_attn", style=ShardStyle.COLWISE, segments=[16, 16, 16]),
                TPShard(module="c_proj", style=ShardStyle.ROWWISE)],
        divisor=4, sharded_param_count=0, allreduces_per_forward=1, allreduce_bytes=0.0,
    )
    call = LayerCall(name="b", args=(torch.randn(2, 8, 16),), kwargs={}, output=None)
    with pytest.raises(ExecutorError, match=rf"layer 'blocks\.0'.*'{op}'"):
        localize_layer(block, "blocks.0", forged, call, 2)


def test_row_order_gives_each_rank_its_chunk_of_every_piece():
    from executor.tp_rewrite import row_order

    assert row_order([4, 4, 2], 2).tolist() == [0, 1, 4, 5, 8, 2, 3, 6, 7, 9]


# --- multi-process -------------------------------------------------------------------------------------------------

def _nano_factory() -> nn.Module:
    return NanoGPT()


def _batch(step: int, size: int):
    ids = torch.randint(0, um.VOCAB, (size, um.SEQ + 1), generator=torch.Generator().manual_seed(100 + step))
    return (ids[:, :-1],), ids[:, 1:]


def _reference() -> list[float]:
    from executor.init import build_initialized

    net = build_initialized(_nano_factory, seed=sup.SEED)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        inputs, targets = _batch(step, 4)
        loss = um.lm_loss(net(*inputs), targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _whole(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters gathered whole (in the layout they are held in), by name."""
    return {n: p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for n, p in module.named_parameters()}


def _worker(cases_path: str, out_path: str) -> None:
    import torch.distributed as dist

    from executor import ExecutorError, apply_plan, checkpoint, init_distributed
    from executor.worker import teardown
    from planner.model_profile import ModelProfile
    from planner.strategy import Strategy

    payload = json.loads(Path(cases_path).read_text())
    device = init_distributed("cpu")
    prof = ModelProfile.model_validate(payload["profile"])
    results: dict = {}

    def build(kw: dict):
        st = Strategy.model_validate(kw)
        pm = apply_plan(st, _nano_factory, prof, loss_fn=um.lm_loss, device=device, seed=sup.SEED,
                        example_inputs=_batch(0, st.micro_batch_size)[0])
        return st, pm, [torch.optim.SGD(p.parameters(), lr=LR) for p in pm.parts]

    st, pm, opts = build(payload["tp2"])
    losses = []
    for step in range(STEPS):
        local = pm.forward_backward(pm.local_batch(*_batch(step, st.global_batch_size)))
        for opt in opts:
            opt.step()
            opt.zero_grad()
        losses.append(pm.global_loss(local))
    results["tp2"] = losses
    state = checkpoint.TrainState(pm.parts, opts)
    state.step = STEPS
    saved = checkpoint.save(state, payload["ckpt"])
    weights = _whole(pm.parts[0])
    for name, kw in (("same_tp", payload["tp2"]), ("other_tp", payload["dp2"])):
        _, pm2, opts2 = build(kw)
        try:
            checkpoint.load(checkpoint.TrainState(pm2.parts, opts2), saved)
            got = _whole(pm2.parts[0])
            results[name] = max((got[n] - w).abs().max().item() for n, w in weights.items())
        except ExecutorError as exc:
            results[name] = str(exc)
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))
    teardown()


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_hard_coded_nanogpt_trains_under_tp2_and_its_checkpoint_keeps_to_its_tp(tmp_path):
    prof = profile(NanoGPT(), _batch(0, 2)[0], cache=False, loss_fn=um.lm_loss, targets=_batch(0, 2)[1])
    assert [s.segments for s in prof.layers[1].tp.shards if s.module == "c_attn"] == [[16, 16, 16]]
    payload = {
        "profile": prof.model_dump(mode="json"), "ckpt": str(tmp_path / "ckpt"),
        "tp2": sup.strategy(tp=2, num_layers=prof.num_layers).model_dump(mode="json"),
        "dp2": sup.strategy(dp=2, num_layers=prof.num_layers).model_dump(mode="json"),
    }
    sup.run_workers(__file__, 2, payload, tmp_path / "cases.json", tmp_path / "out.json", timeout=180)
    results = json.loads((tmp_path / "out.json").read_text())
    ref = _reference()
    assert max(abs(a - b) for a, b in zip(results["tp2"], ref)) <= TOL, (results["tp2"], ref)
    assert results["same_tp"] == 0.0
    assert "row order of tp=2" in results["other_tp"] and "tp=1" in results["other_tp"], results["other_tp"]


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
