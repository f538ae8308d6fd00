"""Save and resume training with torch.distributed.checkpoint (DCP): model, optimizer, and the step reached.

Every rank writes its own shards in parallel. Model and optimizer entries are keyed by parameter name (the optimizer
state flattened per parameter), so the keys do not depend on how the model was cut into stages. The data position is
the step: data sources are functions of the step index, so a resumed run sees the batches the uninterrupted run
would have seen.

Layout: SAVE_DIR/step_00000010/ (one directory per save, complete once DCP has written its `.metadata`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from executor.errors import ExecutorError

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class TrainState(Stateful):
    """The local model parts, one optimizer per part, and the number of steps done, as one DCP state."""

    def __init__(self, parts: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]) -> None:
        if len(parts) != len(optimizers):
            raise ValueError("give one optimizer per model part")
        self.parts = list(parts)
        self.optimizers = list(optimizers)
        self.step = 0
        self._keys: list[tuple[set[str], set[str]]] = []

    def state_dict(self) -> dict:
        """Model and optimizer entries of all local parts merged (names are disjoint across stages)."""
        model_sd: dict = {}
        optim_sd: dict = {}
        self._keys = []
        for part, opt in zip(self.parts, self.optimizers):
            m, o = get_state_dict(part, opt, options=_OPTIONS)
            self._keys.append((set(m), set(o)))
            model_sd.update(m)
            optim_sd.update(o)
        return {"model": model_sd, "optim": optim_sd, "step": torch.tensor(self.step)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Hand each part back its own entries."""
        for (mkeys, okeys), part, opt in zip(self._keys, self.parts, self.optimizers):
            set_state_dict(
                part, opt,
                model_state_dict={k: state_dict["model"][k] for k in mkeys},
                optim_state_dict={k: state_dict["optim"][k] for k in okeys},
                options=_OPTIONS,
            )
        self.step = int(state_dict["step"])


def step_dir(save_dir: str | Path, step: int) -> Path:
    """Directory of the checkpoint taken after `step` steps."""
    return Path(save_dir) / f"step_{step:08d}"


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The most advanced complete checkpoint under `save_dir`, or None."""
    root = Path(save_dir)
    if not root.is_dir():
        return None
    done = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / ".metadata").exists()]
    return max(done)[1] if done else None


def save(state: TrainState, save_dir: str | Path) -> Path:
    """Write a checkpoint of `state` (collective: every rank calls it)."""
    path = step_dir(save_dir, state.step)
    dcp.save({"train": state}, checkpoint_id=path)
    log.info("saved checkpoint %s", path)
    return path


def load(state: TrainState, path: str | Path) -> None:
    """Restore `state` in place from a checkpoint directory (collective)."""
    path = Path(path)
    if not (path / ".metadata").exists():
        raise ExecutorError(f"{path} is not a complete checkpoint (no .metadata); pick another or start afresh")
    dcp.load({"train": state}, checkpoint_id=path)
    log.info("resumed from %s at step %d", path, state.step)
