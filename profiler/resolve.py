"""One model reference for every entry point: `autopar profile`, `autopar plan`, `autopar run [--plan-first]`, Python
`planner.plan()` and the service all turn what the user named into a profile here, so one reference with one set of
options gives one profile hash wherever it is used.

A reference is one of
- a zoo name (`gpt2-medium`, see `autopar profile --list`); options override its config (`seq_len=2048`);
- code: `path/to/file.py:factory` or `package.module:factory` (the contract is in `profiler.factory`); options are
  the factory's keyword arguments;
- a profile JSON written by `autopar profile --out` (takes no options);
- a Hugging Face config, `hf:path/to/config.json` (`profiler.hf_config`); options override config fields.

The precision is the caller's `dtype`, else `planner.precision.default_dtype` of the cluster (or of the device
profiled on): bfloat16 on GPUs, float32 on CPUs. The service passes `allow_code=False`: it never imports code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from planner.cluster import ClusterSpec
from planner.errors import AutoparError
from planner.model_profile import DType, ModelProfile
from planner.planning import read_profile
from planner.precision import default_dtype, parse_dtype
from profiler.core import ProgressFn, profile, profile_zoo
from profiler.errors import ProfileError
from profiler.factory import import_user_module, is_file_reference, load_factory
from profiler.loss import loss_name

FORMS = ("a zoo name (autopar profile --list), path/to/file.py:factory, package.module:factory, a profile JSON "
         "or hf:path/to/config.json")


class RefKind(str, Enum):
    """Which form a model reference has."""

    ZOO = "zoo"
    CODE = "code"
    PROFILE = "profile"
    HF = "hf"


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: its form, its target (file paths made absolute) and its options."""

    kind: RefKind
    target: str
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        """The reference as text that resolves to the same model from any working directory."""
        return f"hf:{self.target}" if self.kind == RefKind.HF else self.target


@dataclass(frozen=True)
class ResolvedProfile:
    """A profile and what it was made from (the reference, and the loss counted in its last layer, if any)."""

    profile: ModelProfile
    reference: ModelRef | None
    loss: str | None = None


def parse_reference(text: str, options: Mapping[str, Any] | None = None, *, allow_code: bool = True) -> ModelRef:
    """Which form `text` is (see the module docstring); file paths are made absolute. Raises a one-line error."""
    text = str(text).strip()
    opts = {k: v for k, v in (options or {}).items() if v is not None}
    if not text:
        raise ProfileError(f"no model given; name {FORMS}")
    if text.startswith("hf:"):
        path = Path(text[3:]).expanduser()
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ProfileError(f"Hugging Face config {path} does not exist; give hf:path/to/config.json")
        ref = ModelRef(RefKind.HF, str(path.resolve()), opts)
    elif ":" in text:
        module_part, _, attr = text.rpartition(":")
        if not module_part or not attr or not attr.isidentifier():
            raise ProfileError(f"'{text}' is not a model reference; give {FORMS}")
        if is_file_reference(module_part):
            module_part = str(Path(module_part).expanduser().resolve())
        ref = ModelRef(RefKind.CODE, f"{module_part}:{attr}", opts)
    elif text.endswith(".json") or Path(text).is_file() or Path(text).is_dir():
        path = Path(text)
        if path.suffix == ".py":
            raise ProfileError(f"{text} is a Python file; name its factory as {text}:factory")
        if not path.exists():
            raise ProfileError(f"profile file {text} does not exist; write it with `autopar profile MODEL --out "
                               f"{text}`, or give {FORMS}")
        if opts:
            raise ProfileError(f"{text} is a finished profile, so options ({', '.join(sorted(opts))}) cannot change "
                               "it; profile the model again with them (`autopar profile MODEL --option k=v --out`)")
        ref = ModelRef(RefKind.PROFILE, str(path), {})
    else:
        from profiler.zoo import list_models

        if text not in list_models():
            raise ProfileError(f"unknown model '{text}': not a zoo model (known models: {', '.join(list_models())}); "
                               f"give {FORMS}")
        ref = ModelRef(RefKind.ZOO, text, opts)
    if not allow_code and ref.kind in (RefKind.CODE, RefKind.HF):
        raise ProfileError(f"'{text}' names code, which this entry point does not import; give a zoo name or a "
                           "profile")
    return ref


def check_zoo_options(name: str, options: Mapping[str, Any]) -> Any:
    """The zoo model `name` with `options`, or a one-line error naming the option and the fix."""
    from profiler.zoo import ZooError, get_model

    try:
        zoo_model = get_model(name, **options)
    except ZooError as exc:
        raise ProfileError(f"{exc}; drop the option or use one of those (--option key=value)") from None
    config = zoo_model.config
    positions = getattr(config, "max_positions", None)
    seq_len = getattr(config, "seq_len", None)
    if positions is not None and seq_len is not None and seq_len > positions:
        raise ProfileError(f"seq_len {seq_len} is longer than {name}'s {positions} learned positions; use --seq-len "
                           f"{positions} or less, or add --option max_positions={seq_len} for a larger position "
                           "table")
    return zoo_model


def _precision(dtype: Any, cluster: ClusterSpec | None, device: str) -> DType:
    return parse_dtype(dtype) if dtype is not None else default_dtype(cluster, device=device)


def resolve_profile(
    model: Any,
    *,
    options: Mapping[str, Any] | None = None,
    example_inputs: Any = None,
    cluster: ClusterSpec | None = None,
    dtype: Any = None,
    batch_size: int = 1,
    device: str = "meta",
    cache: bool = True,
    cache_dir: str | Path | None = None,
    layers: list[str] | None = None,
    repeats: int = 5,
    progress: ProgressFn | None = None,
    allow_code: bool = True,
) -> ResolvedProfile:
    """The profile of `model`: a reference (text or `ModelRef`), an nn.Module with `example_inputs`, or a profile.

    dtype: precision to profile in (default: `default_dtype(cluster, device=device)`); a finished profile keeps its
    own and is refused when an explicit dtype differs. options: the reference's options (`seq_len` among them).
    """
    if isinstance(model, ModelProfile):
        _check_profile_dtype(model, dtype, str(model.name))
        return ResolvedProfile(model, None)
    precision = _precision(dtype, cluster, device).value
    common: dict[str, Any] = {"device": device, "dtype": precision, "cache": cache, "cache_dir": cache_dir,
                              "layers": layers, "repeats": repeats, "progress": progress}
    opts = {k: v for k, v in (options or {}).items() if v is not None}
    if isinstance(model, nn.Module):
        if example_inputs is None:
            raise ProfileError("planning an nn.Module needs example_inputs (one micro-batch of its inputs)")
        return ResolvedProfile(profile(model, example_inputs, seq_len=opts.get("seq_len"), **common), None)
    if not isinstance(model, (str, Path, ModelRef)):
        raise ProfileError(f"cannot profile a {type(model).__name__}; give {FORMS}, an nn.Module with "
                           "example_inputs, or a ModelProfile")
    ref = model if isinstance(model, ModelRef) else parse_reference(str(model), opts, allow_code=allow_code)
    if ref.kind == RefKind.PROFILE:
        loaded = read_profile(ref.target)
        _check_profile_dtype(loaded, dtype, ref.target)
        return ResolvedProfile(loaded, ref)
    if ref.kind == RefKind.ZOO:
        zoo_model = check_zoo_options(ref.target, ref.options)
        try:
            result = profile_zoo(ref.target, batch_size=batch_size, **common, **ref.options)
        except AutoparError:
            raise
        except ValueError as exc:
            if not _raised_in_zoo(exc):
                raise
            raise ProfileError(f"invalid options for {ref.target}: {exc}; change the options") from None
        return ResolvedProfile(result, ref, loss_name(zoo_model.loss_fn))
    if ref.kind == RefKind.HF:
        return _profile_hf(ref, batch_size, common)
    return _profile_code(ref, batch_size, common)


def _check_profile_dtype(loaded: ModelProfile, dtype: Any, where: str) -> None:
    if dtype is not None and parse_dtype(dtype) != loaded.dtype:
        asked = parse_dtype(dtype).value
        raise ProfileError(f"{where} was profiled in {loaded.dtype.value} but {asked} was asked for; drop --dtype "
                           f"(the profile's precision is used) or profile the model again with --dtype {asked}")


def _raised_in_zoo(exc: BaseException) -> bool:
    """Whether a ValueError came from a zoo model's constructor (an option combination it rejects)."""
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    return last is not None and "profiler/zoo/" in last.replace("\\", "/")


def _build_device(device: str) -> contextlib.AbstractContextManager:
    """Analytic profiles build the model on meta (no weights allocated); measured ones on the CPU, then move it."""
    return torch.device("meta") if device == "meta" else contextlib.nullcontext()


def _profile_code(ref: ModelRef, batch_size: int, common: dict[str, Any]) -> ResolvedProfile:
    options = dict(ref.options)
    seq_len = options.pop("seq_len", None)
    with _build_device(common["device"]):
        loaded = load_factory(ref.target, batch_size=batch_size, seq_len=seq_len, options=options)
    module_part = ref.target.rpartition(":")[0]
    source = import_user_module(module_part)
    declared = getattr(source, "seq_len", None)
    files = tuple(f for f in (getattr(source, "__file__", None),) if f)
    result = profile(loaded.module, loaded.inputs, name=str(ref), loss_fn=loaded.loss_fn, targets=loaded.targets,
                     seq_len=seq_len or (declared if isinstance(declared, int) else None), source_files=files,
                     **common)
    loss = loaded.loss_fn if loaded.loss_fn is not None else _labels_loss(loaded.module, loaded.inputs)
    return ResolvedProfile(result, ref, None if loss is None else loss_name(loss))


def _labels_loss(module: nn.Module, inputs: Any) -> Any:
    """The loss `profile` counted for a model that computes its own from `labels` (`profiler.hf`), or None."""
    from profiler import hf
    from profiler.partition import positional_inputs

    return hf.labels_as_targets(module, positional_inputs(module, inputs))[1]


def _profile_hf(ref: ModelRef, batch_size: int, common: dict[str, Any]) -> ResolvedProfile:
    from profiler.hf_config import hf_source

    source = hf_source(ref.target, ref.options)
    with _build_device(common["device"]):
        module = source.factory()
    inputs, _ = source.example_batch(batch_size)
    result = profile(module, inputs, name=str(ref), seq_len=source.seq_len, source_files=(source.config_file,),
                     **common)
    loss = _labels_loss(module, inputs)
    return ResolvedProfile(result, ref, None if loss is None else loss_name(loss))
