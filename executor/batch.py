"""Training batches and losses the way users have them.

A batch's inputs are a tuple (`model(*inputs)`), a dict (`model(**inputs)`, a Hugging Face batch) or one tensor; the
targets are a tensor, or None when the model computes its own loss. Every tensor is split along dim 0 (samples);
anything else (a flag such as `use_cache=False`) goes unchanged to every shard.

The loss of an output is, in order: `loss_fn(output, targets)` when a loss function is given (`loss_fn(output)`
without targets); the output's `.loss` (a Hugging Face `ModelOutput`, or a dict's "loss"); the first element of a
tuple output when it is a scalar; the output itself when it is a scalar.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from executor.errors import ExecutorError

LossFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Batch:
    """Positional inputs, keyword inputs and targets of some samples."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    targets: Any = None

    @classmethod
    def of(cls, inputs: Any, targets: Any = None) -> Batch:
        """A batch from inputs as a data source gives them: tuple, list, dict or a single tensor."""
        if isinstance(inputs, Batch):
            return inputs
        if isinstance(inputs, Mapping):
            return cls(args=(), kwargs=dict(inputs), targets=targets)
        if isinstance(inputs, (tuple, list)):
            return cls(args=tuple(inputs), kwargs={}, targets=targets)
        return cls(args=(inputs,), kwargs={}, targets=targets)

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(where, tensor) for every tensor of the batch, `where` naming it for error messages."""
        out = [(f"input {i}", t) for i, t in enumerate(self.args) if isinstance(t, torch.Tensor)]
        out += [(f"input '{k}'", t) for k, t in self.kwargs.items() if isinstance(t, torch.Tensor)]
        out += [("targets", t) for t in tree_flatten(self.targets)[0] if isinstance(t, torch.Tensor)]
        return out

    @property
    def size(self) -> int:
        """Samples in the batch (dim 0 of its tensors, which must agree)."""
        sizes = {where: t.shape[0] for where, t in self.tensors() if t.dim() > 0}
        if not sizes:
            raise ExecutorError("the batch holds no tensor with a sample dimension; give inputs as tensors")
        if len(set(sizes.values())) > 1:
            described = ", ".join(f"{w}: {n}" for w, n in sizes.items())
            raise ExecutorError(f"the batch's tensors disagree on the number of samples ({described}); dim 0 of "
                                "every tensor must be the sample")
        return next(iter(sizes.values()))

    def map(self, fn: Callable[[torch.Tensor], Any]) -> Batch:
        """Apply `fn` to every tensor (with a sample dimension), keeping everything else."""

        def visit(v: Any) -> Any:
            return fn(v) if isinstance(v, torch.Tensor) and v.dim() > 0 else v

        return Batch(args=tuple(tree_map(visit, self.args)), kwargs=tree_map(visit, self.kwargs),
                     targets=tree_map(visit, self.targets))

    def select(self, start: int, stop: int) -> Batch:
        """Samples [start, stop)."""
        return self.map(lambda t: t[start:stop])

    def chunks(self, n: int) -> list[Batch]:
        """`n` equal consecutive shares (the size must divide by n)."""
        size = self.size
        if size % n:
            raise ExecutorError(f"a batch of {size} samples cannot be split into {n} equal micro-batches")
        step = size // n
        return [self.select(i * step, (i + 1) * step) for i in range(n)]

    @classmethod
    def cat(cls, batches: list[Batch]) -> Batch:
        """The samples of `batches` one after another (they must share one structure)."""
        first, rest = batches[0], batches[1:]

        def join(*values: Any) -> Any:
            return torch.cat(values) if isinstance(values[0], torch.Tensor) and values[0].dim() > 0 else values[0]

        return Batch(args=tuple(tree_map(join, first.args, *(b.args for b in rest))),
                     kwargs=tree_map(join, first.kwargs, *(b.kwargs for b in rest)),
                     targets=tree_map(join, first.targets, *(b.targets for b in rest)))

    def to(self, device: torch.device) -> Batch:
        """Every tensor moved to `device`."""
        return self.map(lambda t: t.to(device))

    def inputs(self) -> Any:
        """The inputs the way they were given: a dict for keyword inputs, else the positional tuple."""
        if self.kwargs and not self.args:
            return dict(self.kwargs)
        if self.kwargs:
            raise ExecutorError("a batch with both positional and keyword inputs has no single inputs value")
        return self.args

    def call(self, module: torch.nn.Module) -> Any:
        """`module(*args, **kwargs)`."""
        return module(*self.args, **self.kwargs)


def training_loss(output: Any, targets: Any, loss_fn: LossFn | None) -> torch.Tensor:
    """The scalar training loss of one forward (see the module docstring for the order of the rules)."""
    if loss_fn is not None:
        loss = loss_fn(output) if targets is None else loss_fn(output, targets)
    else:
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, Mapping):
            loss = output.get("loss")
        if loss is None and isinstance(output, (tuple, list)) and output and _is_scalar(output[0]):
            loss = output[0]
        if loss is None and _is_scalar(output):
            loss = output
        if loss is None:
            raise ExecutorError(
                f"cannot find a loss in the model's output ({type(output).__name__}): it has no .loss, is not a "
                "scalar and does not start with one; give a loss function loss_fn(output, targets), or pass the "
                "labels the model needs to compute its own loss (e.g. labels= for a Hugging Face model)"
            )
    if not _is_scalar(loss):
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ExecutorError(f"the training loss must be a scalar tensor, got {shape}; reduce it (e.g. .mean())")
    return loss


def _is_scalar(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 0 and x.is_floating_point()


def synthetic_like(example: Batch, batch_size: int, *, seed: int) -> Batch:
    """Random batches shaped like `example`: integer tensors drawn in the example's value range (token ids, labels,
    an all-ones attention mask stays all ones; negative ignore indices are not drawn), booleans as the example's, floats as standard normal noise."""
    gen = torch.Generator().manual_seed(seed)

    def draw(t: torch.Tensor) -> torch.Tensor:
        shape = (batch_size, *t.shape[1:])
        if t.dtype == torch.bool:
            return t[:1].expand(shape).clone() if t.numel() else torch.zeros(shape, dtype=torch.bool)
        if t.is_floating_point():
            return torch.randn(shape, generator=gen, dtype=torch.float32).to(t.dtype)
        if t.device.type == "meta" or t.numel() == 0:
            return torch.zeros(shape, dtype=t.dtype)
        lo, hi = int(t.min()), int(t.max())
        if hi >= 0:
            lo = max(lo, 0)  # an ignore index such as -100 is not drawn
        return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int64).to(t.dtype)

    return example.map(draw)
