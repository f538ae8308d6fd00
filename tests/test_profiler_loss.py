"""The training loss counted in the last layer: saved logits by formula, FLOPs, cache key, errors, timing, CLI."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from api.cli import app
from profiler import ProfileError, profile
from profiler.zoo import get_model
from profiler.zoo.gpt import gpt_loss

B = 2  # two samples, so the targets are a storage of their own (with one, they are a view of the input ids)


def _gpt(name: str, **options):
    zoo = get_model(name, **options)
    inputs, targets = zoo.synthetic_batch(B, device="meta")
    return zoo.build(device="meta"), inputs, targets


@pytest.mark.parametrize(
    ("name", "dtype"), [("gpt-tiny", "float32"), ("gpt-tiny", "bfloat16"), ("gpt2-small", "float32")]
)
def test_cross_entropy_adds_float32_log_probs_and_targets_to_the_head_saved_bytes(name: str, dtype: str) -> None:
    model, inputs, targets = _gpt(name)
    plain = profile(model, inputs, dtype=dtype, cache=False)
    with_loss = profile(model, inputs, dtype=dtype, cache=False, loss_fn=gpt_loss, targets=targets)
    s, v = model.config.seq_len, model.config.vocab_size
    # gpt_loss = cross_entropy(logits.float(), targets) = nll_loss(log_softmax(fp32 logits)). Checked by hand with
    # saved_tensors_hooks: log_softmax keeps its float32 output (s x v x 4 bytes per sample, whatever the model's
    # dtype: the .float() copy itself is not kept), nll_loss keeps the int64 targets (8 s bytes per sample) and one
    # float32 total_weight scalar per batch (4 bytes / B). Nothing of it is a tensor the head already keeps.
    loss_saved = s * v * 4 + 8 * s + 4 / B
    head, head_plain = with_loss.layers[-1], plain.layers[-1]
    assert head.saved_activation_bytes == pytest.approx(head_plain.saved_activation_bytes + loss_saved, abs=1e-6)
    # Cross-entropy has no matmul and FLOPs are matmul / conv FLOPs (FlopCounterMode): the count does not move.
    assert head.fwd_flops == head_plain.fwd_flops and head.bwd_flops == head_plain.bwd_flops
    # Bytes do: log_softmax alone reads the logits and writes the log-probabilities, both s x v in float32 (reading
    # 16-bit logits costs 2 bytes each, so 6 s v is the floor across dtypes).
    assert head.fwd_bytes - head_plain.fwd_bytes >= 6 * s * v
    assert head.bwd_bytes > head_plain.bwd_bytes
    # The output sent on (the logits) and every other layer stay as they were.
    assert head.output_bytes == head_plain.output_bytes
    assert with_loss.layers[:-1] == plain.layers[:-1]


def test_gpt_head_without_loss_saves_only_what_its_norm_and_projection_keep() -> None:
    # LayerNorm keeps its input (s h) and per-token mean and rstd (2 s floats); lm_head keeps the normed input (s h).
    model, inputs, _ = _gpt("gpt-tiny")
    s, h = model.config.seq_len, model.config.hidden
    assert profile(model, inputs, cache=False).layers[-1].saved_activation_bytes == 2 * s * h * 4 + 2 * s * 4


def test_loss_without_targets_is_called_on_the_output_alone() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    x = torch.randn(B, 16)
    seen = []

    def energy(out: torch.Tensor) -> torch.Tensor:
        seen.append(out.shape)
        return out.pow(2).mean()

    plain = profile(model, x, cache=False)
    p = profile(model, x, cache=False, loss_fn=energy)
    assert seen == [torch.Size([B, 10])]
    # pow(2) keeps its input, the 10 output floats per sample, which the last Linear itself does not keep.
    assert p.layers[-1].saved_activation_bytes == plain.layers[-1].saved_activation_bytes + 10 * 4
    assert p.layers[0] == plain.layers[0]


def test_identical_last_layer_is_not_merged_with_its_twin_when_it_carries_the_loss() -> None:
    # Layers 1 and 2 have the same structure and inputs, so without the loss they would share one count.
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    p = profile(model, torch.randn(B, 8), cache=False, loss_fn=lambda out: out.pow(2).sum())
    assert p.layers[2].saved_activation_bytes == p.layers[1].saved_activation_bytes + 8 * 4


def test_cache_key_tells_which_loss_was_counted(tmp_path, monkeypatch) -> None:
    model, inputs, targets = _gpt("gpt-tiny")
    plain = profile(model, inputs, cache_dir=tmp_path)
    with_loss = profile(model, inputs, cache_dir=tmp_path, loss_fn=gpt_loss, targets=targets)
    assert with_loss != plain and len(list(tmp_path.glob("*.profile.json"))) == 2

    def boom(*_a, **_k):
        raise AssertionError("profiled again")

    monkeypatch.setattr("profiler.core.estimate_layer_cost", boom)
    assert profile(model, inputs, cache_dir=tmp_path, loss_fn=gpt_loss, targets=targets) == with_loss
    assert profile(model, inputs, cache_dir=tmp_path) == plain

    def other_loss(logits, tgt):
        return gpt_loss(logits, tgt)

    with pytest.raises(AssertionError, match="profiled again"):
        profile(model, inputs, cache_dir=tmp_path, loss_fn=other_loss, targets=targets)


def test_bad_loss_functions_are_user_errors() -> None:
    model = nn.Sequential(nn.Linear(8, 4))
    x = torch.randn(B, 8)
    with pytest.raises(ProfileError, match="must return a scalar"):
        profile(model, x, cache=False, loss_fn=lambda out: out * 2)
    with pytest.raises(ProfileError, match="must be callable"):
        profile(model, x, cache=False, loss_fn="mse")
    with pytest.raises(ProfileError, match="failed on the meta device"):
        profile(model, x, cache=False, loss_fn=lambda out: out.sum() * float(out.sum().item()))


class _Scaled(nn.Module):
    """The forward changes the last layer's output, so the loss cannot be counted with that layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)) * 2


def test_loss_needs_the_last_layer_to_return_the_model_output() -> None:
    with pytest.raises(ProfileError, match="does not return it"):
        profile(_Scaled(), torch.randn(B, 8), cache=False, loss_fn=lambda out: out.sum())


def test_measured_mode_runs_the_loss_with_the_last_layer_and_in_the_step() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    targets = torch.tensor([0, 2])
    calls: list[str] = []

    def loss(out, tgt):
        calls.append(out.device.type)
        assert tgt.device == out.device  # the targets travel with the output
        return F.cross_entropy(out, tgt)

    p = profile(model, torch.randn(B, 8), device="cpu", cache=False, warmup=0, repeats=1, loss_fn=loss,
                targets=targets)
    # Once on meta (counting), then on the CPU once in the one timing round of the last layer and once in the step
    # (with no warm-up and one repeat, the step runs in that same round).
    assert calls == ["meta", "cpu", "cpu"]
    assert p.step is not None and p.layers[-1].fwd_seconds is not None


def test_cli_counts_the_zoo_loss_and_a_factory_loss_only_when_it_returns_one(tmp_path) -> None:
    result = CliRunner().invoke(app, ["profile", "gpt-tiny", "--no-cache"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "loss gpt_loss counted in the last layer" in " ".join(result.output.split())
    source = tmp_path / "my_model.py"
    source.write_text(
        "import torch\nimport torch.nn.functional as F\nfrom torch import nn\n\n"
        "def plain(batch_size):\n"
        "    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5)), (torch.randn(batch_size, 8),)\n\n"
        "def with_loss(batch_size):\n"
        "    model, inputs = plain(batch_size)\n"
        "    return model, inputs, F.cross_entropy, torch.zeros(batch_size, dtype=torch.long)\n"
    )
    outputs = {}
    for factory in ("plain", "with_loss"):
        out = tmp_path / f"{factory}.json"
        result = CliRunner().invoke(app, ["profile", f"{source}:{factory}", "-b", "2", "--no-cache", "--out",
                                             str(out)], terminal_width=200)
        assert result.exit_code == 0, result.output
        outputs[factory] = " ".join(result.output.split())
    assert "no training loss counted" in outputs["plain"]
    assert "loss cross_entropy counted in the last layer" in outputs["with_loss"]
