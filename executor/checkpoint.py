"""Save and resume training with torch.distributed.checkpoint (DCP): model, optimizer, and the step reached.

Every rank writes its own shards in parallel. Model and optimizer entries are keyed by parameter name (the optimizer
state flattened per parameter), so the keys do not depend on how the model was cut into stages. The data position is
the step: data sources are functions of the step index, so a resumed run sees the batches the uninterrupted run
would have seen.

Layout: SAVE_DIR/step_00000010/ holds DCP's shard files (`__RANK_N.distcp`), its `.metadata`, and `MANIFEST.json`
(the sha256 and size of every other file). A save writes into `step_00000010.partial/`; once DCP is done, each rank
hashes the shards it wrote, rank 0 writes the manifest and renames the directory into place. A crash mid-save
therefore leaves only a `.partial` directory, which is never taken for a checkpoint. A load checks every file against
the manifest (the ranks share the hashing) before DCP reads anything, and checks that every loaded value is finite.
A state holding NaN or inf is never saved.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from executor.errors import ExecutorError
from executor.tp_rewrite import fused_layouts

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_PARTIAL = ".partial"
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class CheckpointError(ExecutorError):
    """A checkpoint that cannot be used (incomplete, damaged, or holding non-finite values); names the file."""


class StateDiverged(ExecutorError):
    """The weights or optimizer state became NaN or infinite although the loss was still finite; nothing was saved."""

    def __init__(self, step: int, entry: str) -> None:
        self.step, self.entry = step, entry
        super().__init__(
            f"the training state became non-finite at step {step} ({entry}) while the loss was still finite; the "
            "run was stopped and this state was not saved. Lower the learning rate, add --clip-grad, or resume "
            "from the last checkpoint"
        )


class FileDigest(BaseModel):
    """One file of a checkpoint directory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(description="Hex sha256 of the file's bytes.")
    bytes: int = Field(ge=0, description="File size.")


class Manifest(BaseModel):
    """`MANIFEST.json`: what a complete checkpoint directory holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: int = Field(ge=0, description="Steps done when the checkpoint was taken.")
    world_size: int = Field(ge=1, description="Ranks that wrote it.")
    files: dict[str, FileDigest] = Field(description="File name (inside the directory) -> digest; all but this one.")
    fused_tp: dict[str, int] = Field(
        default_factory=dict,
        description="Fused projections (Linear path) saved in the row order of a tp degree (executor.tp_rewrite); "
        "such a checkpoint resumes only under the same degree.",
    )


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

    def first_non_finite(self) -> str | None:
        """Name of the first local model or optimizer entry holding NaN or inf, or None (local, no collective)."""
        sd = self.state_dict()
        for group in ("model", "optim"):
            for name, value in sd[group].items():
                if isinstance(value, DTensor):
                    value = value.to_local()
                if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                    return f"{group}.{name}"
        return None


# --- collectives that also work without a process group (single-process use) ---------------------------------

def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _gather(obj: object) -> list:
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _first_problem(mine: str | None) -> str | None:
    """Every rank's finding agreed on: the first rank's problem, so all ranks raise the same error together."""
    return next((p for p in _gather(mine) if p is not None), None)


# --- layout --------------------------------------------------------------------------------------------------

def step_dir(save_dir: str | Path, step: int) -> Path:
    """Directory of the checkpoint taken after `step` steps."""
    return Path(save_dir) / f"step_{step:08d}"


def checkpoints(save_dir: str | Path) -> list[Path]:
    """Complete-looking checkpoints under `save_dir` (a manifest is written last), most advanced first."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / MANIFEST).exists()]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The most advanced complete checkpoint under `save_dir`, or None."""
    found = checkpoints(save_dir)
    return found[0] if found else None


def _sha256(path: Path) -> FileDigest:
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return FileDigest(sha256=digest, bytes=path.stat().st_size)


# --- save ----------------------------------------------------------------------------------------------------

def save(state: TrainState, save_dir: str | Path) -> Path:
    """Write a checkpoint of `state` (collective: every rank calls it); raise `StateDiverged` if it is not finite."""
    bad = _first_problem(state.first_non_finite())
    if bad is not None:
        raise StateDiverged(state.step - 1, bad)
    final = step_dir(save_dir, state.step)
    partial = final.with_name(final.name + _PARTIAL)
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left by a save that crashed
    _barrier()
    # Returns once every rank's shards and rank 0's .metadata are written.
    dcp.save({"train": state}, checkpoint_id=partial, no_dist=not dist.is_initialized())
    rank = _rank()
    mine = {p.name: _sha256(p) for p in sorted(partial.glob(f"__{rank}_*.distcp"))}
    layouts = _fused_layouts(state)
    everyone = _gather(mine)
    if rank == 0:
        files = {name: d for part in everyone for name, d in part.items()}
        for file in sorted(partial.iterdir()):  # .metadata, and any file DCP names otherwise than __RANK_*
            if file.name not in files:
                files[file.name] = _sha256(file)
        manifest = Manifest(step=state.step, world_size=_world(), files=files, fused_tp=layouts)
        with (partial / MANIFEST).open("w") as f:
            f.write(manifest.model_dump_json(indent=1))
            f.flush()
            os.fsync(f.fileno())
        _replace_dir(partial, final)
    _barrier()
    log.info("saved checkpoint %s", final)
    return final


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, moving an older `dst` (e.g. a damaged one a fallback resume skipped) out of the way."""
    old = None
    if dst.exists():
        old = dst.with_name(f"{dst.name}.replaced-{uuid.uuid4().hex[:8]}")
        dst.rename(old)
    src.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- load ----------------------------------------------------------------------------------------------------

def _check_files(path: Path) -> str | None:
    """This rank's share of the verification of `path`: a sentence naming the first bad file, or None."""
    manifest_path = path / MANIFEST
    try:
        manifest = Manifest.model_validate_json(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        return f"{manifest_path} cannot be read ({type(exc).__name__})"
    names = sorted(manifest.files)
    for name in names:  # cheap checks on every rank: all files there, with the recorded sizes
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != manifest.files[name].bytes:
            return f"{file} has {file.stat().st_size} bytes, the manifest says {manifest.files[name].bytes}"
    for name in names[_rank()::_world()]:
        if _sha256(path / name).sha256 != manifest.files[name].sha256:
            return f"{path / name} does not match its sha256 in {MANIFEST} (damaged)"
    return None


def verify(path: str | Path) -> None:
    """Check every file of checkpoint `path` against its manifest (collective); raise `CheckpointError` if bad."""
    problem = _first_problem(_check_files(Path(path)))
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is unusable: {problem}")


def _fused_layouts(state: TrainState) -> dict[str, int]:
    """Every rank's fused projections in tp row order, merged (collective: pipeline stages hold different ones)."""
    return {k: v for part in _gather(fused_layouts(state.parts)) for k, v in part.items()}


def load(state: TrainState, path: str | Path) -> None:
    """Verify checkpoint `path`, restore `state` from it in place, and check that what was loaded is finite
    (collective; raises `CheckpointError` naming the bad file or entry)."""
    path = Path(path)
    verify(path)
    saved = Manifest.model_validate_json((path / MANIFEST).read_text()).fused_tp
    now = _fused_layouts(state)
    if saved != now:
        differ = sorted(n for n in {*saved, *now} if saved.get(n) != now.get(n))
        raise CheckpointError(
            f"checkpoint {path} holds fused projections ({', '.join(differ)}) in the row order of tp="
            f"{saved.get(differ[0], 1)}, and this run uses tp={now.get(differ[0], 1)}; resume it with the tensor-"
            "parallel degree it was saved with"
        )
    dcp.load({"train": state}, checkpoint_id=path, no_dist=not dist.is_initialized())
    bad = _first_problem(state.first_non_finite())
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is unusable: it holds non-finite values ({bad})")
    log.info("resumed from %s at step %d", path, state.step)


def resume(state: TrainState, save_dir: str | Path, *, fallback: bool = False) -> Path | None:
    """Load the most advanced checkpoint under `save_dir` into `state` (collective); None if there is none.

    A damaged or non-finite checkpoint raises `CheckpointError`, unless `fallback`: then it is skipped (logged with
    the reason) and the next older one is tried.
    """
    found = checkpoints(save_dir)
    for path in found:
        try:
            load(state, path)
            return path
        except CheckpointError as exc:
            if not fallback:
                raise CheckpointError(f"{exc}; resume with --resume-fallback to use the newest good checkpoint "
                                      "before it, or delete it") from None
            if _rank() == 0:
                log.warning("%s; skipping it for an older one", exc)
    if found:
        raise CheckpointError(f"no usable checkpoint in {save_dir}: all {len(found)} are damaged; start afresh")
    return None
