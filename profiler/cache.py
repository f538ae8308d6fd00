"""On-disk cache of profiles, keyed by what determines a profile: structure, inputs, dtype, device, layer choice,
the training loss counted in the last layer (if any), every other override, and the model's code: the source files
of its module classes and of its loss, plus any file the caller names (the factory's), so an edited model is profiled
again without deleting the cache by hand (`autopar profile --no-cache` skips the cache altogether).

The cache directory is always passed in by the caller (the top-level `profile` function or the CLI decides it);
a corrupt or outdated entry is treated as a miss and overwritten. The directory is bounded: after each write the
least recently used entries (a hit refreshes an entry's mtime) are deleted until the cache holds at most
`MAX_CACHE_BYTES` (or the `max_bytes` the caller gives).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import ValidationError
from torch import nn

from planner.model_profile import InputSpec, ModelProfile

logger = logging.getLogger(__name__)

#: Bumped whenever the profiler counts something differently, so old cache entries stop matching.
PROFILER_VERSION = 18  # 6: kernel counts and weight-GEMM shapes per layer; 7: vocabulary-parallel embedding and head;
# 8: uneven vocabulary splits say so (`uneven_max`); 9: Hugging Face models cut between blocks (profiler.hf_partition);
# 10: parameter tensors per layer (`param_tensors`, the optimizer's per-tensor cost); 11: dispatched ops per pass
# (`fwd_ops` / `bwd_ops`, views included) and TP all-reduces per backward (`allreduces_per_backward`)
# 12: sequence-parallel layers (`TensorParallelSpec.sequence_parallel`: norms, regions, gathered bytes)
# 13: T5-style encoder-decoders cut between blocks and stacks, every carried tensor in the layer graph (hf_encdec)
# 14: elements each pass evaluates exp / log / tanh / erf on (`fwd_transcendental_elements`, profiler.transcendental)
# 15: BERT / T5 blocks get TP shards from autopar's own proved per-class plan (profiler.hf_tp_derived)
# 16: GPT-2 (Conv1D, fused c_attn) and Mixtral experts tensor-parallel; Conv1D / experts GEMMs record N, K per weight
# 17: experts of every transformers MoE class with Mixtral's layout; `replicated` shards (per-head q / k norms);
# Phi-3's fused projections per piece
# 18: 16-bit profiles count each layer again as torch.autocast runs it (`LayerProfile.autocast`, profiler.autocast)

#: Default bound on the cache directory's profile files; the least recently used go first past it.
MAX_CACHE_BYTES = 256 * 1024 * 1024

# (path, mtime_ns, size) -> sha256 of the file's bytes: each source file is read once per process and edit.
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(path: str) -> str:
    try:
        stat = Path(path).stat()
    except OSError:
        return "missing"
    stamp = (path, stat.st_mtime_ns, stat.st_size)
    if stamp not in _FILE_DIGESTS:
        _FILE_DIGESTS[stamp] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return _FILE_DIGESTS[stamp]


def _source_file(obj: object) -> str | None:
    try:
        return inspect.getsourcefile(obj)  # type: ignore[arg-type]
    except (TypeError, OSError):
        return None  # a builtin, or a class defined in an interactive session


def code_fingerprint(model: nn.Module, loss_fn: Callable | None = None, files: Iterable[str] = ()) -> str:
    """Hash of the code that computes the model: the files defining its module classes and its loss, and `files`.

    Whole files are hashed (not just the class bodies) so that a module-level constant or helper a class uses counts
    too; an edit anywhere in those files makes a new key.
    """
    paths = {_source_file(type(m)) for m in model.modules()}
    if loss_fn is not None:
        paths.add(_source_file(getattr(loss_fn, "__func__", loss_fn)))
    paths.update(str(Path(f).resolve()) for f in files)
    h = hashlib.sha256()
    for path in sorted(p for p in paths if p):
        h.update(f"{path} {_file_digest(path)}\n".encode())
    return h.hexdigest()[:24]


def cache_key(
    structure: str,
    inputs: InputSpec,
    dtype: str,
    device: str,
    layers: list[str] | None,
    timing: tuple[int, int],
    loss: dict | None = None,
    code: str | None = None,
    overrides: dict | None = None,
) -> str:
    """Hex key of one profile request; the timing settings only matter off the meta device.

    loss: None when no loss was counted, else {"fn": qualified name, "targets": target shapes and dtypes}.
    code: `code_fingerprint` of the model; overrides: any other setting that changes the profile (JSON data).
    """
    key = {
        "v": PROFILER_VERSION,
        "structure": structure,
        "inputs": inputs.model_dump(mode="json"),
        "dtype": dtype,
        "device": device,
        "layers": layers,
        "timing": list(timing) if device != "meta" else None,
        "loss": loss,
        "code": code,
        "overrides": overrides,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def load(cache_dir: Path, key: str) -> ModelProfile | None:
    """The cached profile for `key`, or None."""
    path = cache_dir / f"{key}.profile.json"
    if not path.is_file():
        return None
    try:
        profile = ModelProfile.from_json(path)
    except (ValidationError, ValueError, OSError) as exc:
        logger.info("ignoring unreadable cache entry %s (%s)", path, exc)
        return None
    try:
        os.utime(path)  # a hit makes the entry the most recently used
    except OSError:
        pass
    return profile


def store(cache_dir: Path, key: str, profile: ModelProfile, max_bytes: int = MAX_CACHE_BYTES) -> None:
    """Write atomically, then evict least recently used entries past `max_bytes`; a cache that cannot be written is
    only logged."""
    path = cache_dir / f"{key}.profile.json"
    try:
        profile.to_json(path)
    except OSError as exc:
        logger.warning("could not write the profile cache in %s (%s)", cache_dir, exc)
        return
    evict(cache_dir, max_bytes, keep=path)


def evict(cache_dir: Path, max_bytes: int, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used profile files until the directory holds at most `max_bytes` of them (never
    `keep`, the entry just written); the deleted paths."""
    entries = []
    for path in Path(cache_dir).glob("*.profile.json"):
        try:
            stat = path.stat()
        except OSError:
            continue  # removed meanwhile by another process
        entries.append((stat.st_mtime_ns, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, path in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if keep is not None and path == keep:
            continue
        try:
            path.unlink()
        except OSError:
            continue
        total -= size
        removed.append(path)
    if removed:
        logger.info("profile cache %s: evicted %d least recently used entries", cache_dir, len(removed))
    return removed

