"""`autopar profile`: profile a zoo model or your own model per layer and print a table.

    autopar profile gpt2-medium --batch-size 8 --out gpt2m.profile.json            # analytic (meta device)
    autopar profile gpt-tiny --device cpu --batch-size 4                             # measured on the CPU
    autopar profile llama-70b --seq-len 2048 --dtype bfloat16
    autopar profile my_model.py:build --device cuda --layers embed,body,head
    autopar profile mypkg.models:make_model --no-cache --option width=512
    autopar profile hf:configs/llama/config.json --option num_hidden_layers=4 --seq-len 1024
    autopar profile gpt2-small --cluster dgx-h100                                     # in what the cluster trains in

MODEL is any model reference (`profiler.resolve`): a zoo name, path/to/file.py:factory, package.module:factory or
hf:path/to/config.json; `--option key=value` sets a zoo config field, a factory keyword argument or a Hugging Face
config field. The precision is --dtype, else what --cluster trains in, else that of --device (float32 on cpu,
bfloat16 on meta and cuda): `planner.precision.default_dtype`, as `autopar plan` and `autopar run` use it.

Zoo models are profiled with their training loss counted in the last layer (a GPT's cross-entropy keeps a float32
copy of the logits for backward); a factory's model only when the factory returns the loss too
(`(module, example_inputs, loss_fn[, targets])`). The table's caption says which. The cache lives in
$AUTOPAR_CACHE_DIR (default ~/.cache/autopar); its key includes the model's code (the factory's file and the files of
its module classes) and every option, so an edited model is profiled again; `--no-cache` profiles again regardless.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from planner.attention import describe_attention
from planner.errors import AutoparError
from planner.model_profile import ModelProfile

console = Console()


def _si(value: float, unit: str = "") -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


def _bytes(value: float) -> str:
    for factor, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= factor:
            return f"{value / factor:.2f} {unit}"
    return f"{value:.0f} B"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def render_profile(profile: ModelProfile, loss: str | None = None) -> Table:
    """The per-layer table with a totals row; batch-dependent columns are for the whole profiled batch.

    loss: qualified name of the training loss counted in the last layer, or None (the caption says which).
    """
    b = profile.input.batch_size
    measured = profile.layers[0].fwd_seconds is not None
    table = Table(
        title=f"{profile.name}: {profile.num_layers} layers, {profile.mode.value} on {profile.device}, "
              f"{profile.dtype.value}",
        caption=f"per batch of {b}" + (f" x {profile.input.seq_len} tokens" if profile.input.seq_len else "")
        + (f"; loss {loss.rsplit('.', 1)[-1]} counted in the last layer" if loss else "; no training loss counted")
        + f"; TP /d: tensor-parallel degree must divide d; pipeline cuts allowed before {len(profile.cut_points)} "
        "of the layers" + _attention_caption(profile),
    )
    table.add_column("layer", no_wrap=True)
    for col in ("params", "fwd FLOPs"):
        table.add_column(col, justify="right", no_wrap=True)
    if measured:
        table.add_column("fwd+bwd ms", justify="right", no_wrap=True)
    for col in ("saved act.", "output", "TP"):
        table.add_column(col, justify="right", no_wrap=True)
    for layer in profile.layers:
        row = [layer.name or "(model)", _si(layer.param_count), _si(layer.fwd_flops * b)]
        if measured:
            row.append(_ms((layer.fwd_seconds + layer.bwd_seconds) * b))
        row += [_bytes(layer.saved_activation_bytes * b), _bytes(layer.output_bytes * b),
                f"/{layer.tp.divisor}" if layer.tp else "-"]
        table.add_row(*row)
    total = ["total", _si(profile.param_count), _si(profile.fwd_flops * b)]
    if measured:
        total.append(_ms(sum(l.fwd_seconds + l.bwd_seconds for l in profile.layers) * b))
    total += [_bytes(profile.saved_activation_bytes * b), "", ""]
    table.add_row(*total, style="bold")
    return table


def _attention_caption(profile: ModelProfile) -> str:
    """Which kernel the model's scaled_dot_product_attention runs with on each device type ('' without SDPA)."""
    on = {device: describe_attention(profile, device) for device in ("cuda", "cpu")}
    if on["cuda"] is None:
        return ""
    return (f"; attention: {on['cuda']} on cuda, {on['cpu']} on cpu (the planner counts that kernel; this table "
            "counts math, scores saved)")


def _split_layers(layers: str | None) -> list[str] | None:
    if not layers:
        return None
    return [name.strip() for name in layers.split(",") if name.strip()]


def profile_command(
    model: Annotated[str, typer.Argument(help="Zoo name (see `autopar profile --list`), path/to/file.py:factory "
                                              "or package.module:factory.")] = "",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Samples per batch.")] = 1,
    seq_len: Annotated[int | None, typer.Option("--seq-len", min=1, help="Tokens per sample.")] = None,
    option: Annotated[list[str], typer.Option(
        "--option", help="Model option key=value (zoo config field, factory argument; repeatable).")] = [],  # noqa: B006
    device: Annotated[str, typer.Option(help="meta (analytic, no timing), cpu or cuda (measured).")] = "meta",
    dtype: Annotated[str | None, typer.Option(
        help="float32, bfloat16 or float16 (default: what --cluster trains in, else float32 on cpu and bfloat16 "
        "on meta / cuda).")] = None,
    cluster: Annotated[str | None, typer.Option(help="Profile in the precision this cluster trains in.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the profile JSON here.")] = None,
    no_cache: Annotated[bool, typer.Option(
        "--no-cache", help="Profile again even if cached (the cache key already includes the model's code).")] = False,
    layers: Annotated[str | None, typer.Option(help="Comma-separated layer module names (override).")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats per layer (measured mode).")] = 5,
    list_models: Annotated[bool, typer.Option("--list", help="List the zoo models and exit.")] = False,
) -> None:
    """Profile a model per layer: parameters, FLOPs, activation memory, the layer graph (and times off meta)."""
    from api.cli_plan import cluster_spec
    from api.cli_run import parse_options
    from profiler.resolve import resolve_profile
    from profiler.zoo import list_models as zoo_names

    if list_models or not model:
        console.print("zoo models: " + ", ".join(zoo_names()))
        if not model:
            console.print("usage: autopar profile MODEL [options]; see --help")
        return
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("loading model", total=1)

        def report(description: str, done: int, total: int) -> None:
            bar.update(task, description=description, completed=done, total=total)

        options = parse_options(option) | ({"seq_len": seq_len} if seq_len is not None else {})
        spec = cluster_spec(cluster) if cluster is not None else None
        resolved = resolve_profile(model, options=options, cluster=spec, dtype=dtype, batch_size=batch_size,
                                   device=device, cache=not no_cache, layers=_split_layers(layers), repeats=repeats,
                                   progress=report)
    result = resolved.profile
    console.print(render_profile(result, resolved.loss))
    if result.step is not None:
        layer_sum = sum(l.fwd_seconds + l.bwd_seconds for l in result.layers) * result.input.batch_size
        console.print(f"whole step (fwd+bwd): {result.step.fwd_bwd_seconds * 1e3:.2f} ms measured, "
                      f"{layer_sum * 1e3:.2f} ms as the sum of layers")
        if result.step.peak_memory_bytes is not None:
            console.print(f"peak memory: {_bytes(result.step.peak_memory_bytes)}")
    console.print(f"profiled in {result.profile_seconds:.2f} s in {result.dtype.value}; structure hash "
                  f"{result.structure_hash}, profile hash {result.profile_hash}")
    if out is not None:
        try:
            result.to_json(out)
        except OSError as exc:
            raise AutoparError(f"cannot write the profile to {out} ({exc.strerror or exc}: {exc.filename}); give a "
                               "file path in a writable directory") from None
        console.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add the command to the CLI."""
    app.command("profile")(profile_command)
