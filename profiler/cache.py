"""On-disk cache of profiles, keyed by what determines a profile: structure, inputs, dtype, device, layer choice,
and the training loss counted in the last layer (if any).

The cache directory is always passed in by the caller (the top-level `profile` function or the CLI decides it);
a corrupt or outdated entry is treated as a miss and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from pydantic import ValidationError

from planner.model_profile import InputSpec, ModelProfile

logger = logging.getLogger(__name__)

#: Bumped whenever the profiler counts something differently, so old cache entries stop matching.
PROFILER_VERSION = 5


def cache_key(
    structure: str,
    inputs: InputSpec,
    dtype: str,
    device: str,
    layers: list[str] | None,
    timing: tuple[int, int],
    loss: dict | None = None,
) -> str:
    """Hex key of one profile request; the timing settings only matter off the meta device.

    loss: None when no loss was counted, else {"fn": qualified name, "targets": target shapes and dtypes}.
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
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def load(cache_dir: Path, key: str) -> ModelProfile | None:
    """The cached profile for `key`, or None."""
    path = cache_dir / f"{key}.profile.json"
    if not path.is_file():
        return None
    try:
        return ModelProfile.from_json(path)
    except (ValidationError, ValueError, OSError) as exc:
        logger.info("ignoring unreadable cache entry %s (%s)", path, exc)
        return None


def store(cache_dir: Path, key: str, profile: ModelProfile) -> None:
    """Write atomically; a cache that cannot be written is only logged."""
    try:
        profile.to_json(cache_dir / f"{key}.profile.json")
    except OSError as exc:
        logger.warning("could not write the profile cache in %s (%s)", cache_dir, exc)

