"""`autopar whatif`: plan one model across clusters and GPU counts, or re-plan a plan with nodes lost.

    autopar whatif gpt2-xl --global-batch 512 --cluster dgx-a100-80gb,dgx-h100 --gpus 8,16,32,64 --chart whatif.png
    autopar whatif gpt2-xl --global-batch 512 --cluster dgx-a100-80gb,dgx-h100 --gpus 8,16 \
        --price-per-gpu-hour dgx-a100-80gb=1.8,dgx-h100=3.9 --json whatif.json
    autopar whatif --plan plan.json --lose-nodes 1

The model is profiled once (on the meta device, in what the clusters train in, or --dtype) and every cell is planned
from that profile with a search budget of --time-limit seconds. A cell whose GPU count is not a whole number of the
cluster's nodes, whose global batch cannot be split, or whose model does not fit says why in the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from api.cli_plan import _positive, _write, cluster_spec
from planner.errors import AutoparError
from planner.model_profile import ModelProfile, write_text_atomic
from planner.whatif import CELL_TIME_LIMIT_S, CellStatus, NodeLoss, WhatIf, WhatIfCell

console = Console()
GB = 1e9


def parse_counts(text: str) -> list[int]:
    """'8,16,32' as GPU counts; anything else is a one-line error."""
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AutoparError(f"--gpus '{text}' is not a comma-separated list of GPU counts (e.g. --gpus 8,16,32)"
                           ) from None
    if not counts or any(n < 1 for n in counts):
        raise AutoparError(f"--gpus '{text}' needs GPU counts of at least 1 (e.g. --gpus 8,16,32)")
    return counts


def parse_prices(text: str | None, clusters: list[str]) -> float | dict[str, float] | None:
    """'2.1' (every cluster) or 'a=2.1,b=3.9' (per cluster) as prices per GPU-hour."""
    if text is None:
        return None
    fix = "give one price (--price-per-gpu-hour 2.1) or one per cluster (--price-per-gpu-hour a=2.1,b=3.9)"
    try:
        if "=" not in text:
            return float(text)
        prices = {}
        for item in text.split(","):
            name, _, value = item.partition("=")
            prices[name.strip()] = float(value)
    except ValueError:
        raise AutoparError(f"--price-per-gpu-hour '{text}' is not a price; {fix}") from None
    unknown = sorted(set(prices) - set(clusters))
    if unknown:
        raise AutoparError(f"--price-per-gpu-hour names {', '.join(unknown)}, not in --cluster "
                           f"({', '.join(clusters)}); {fix}")
    return prices


def _profile(model: str, specs: list, *, dtype: str | None, options: dict[str, object],
             profile_path: Path | None) -> ModelProfile:
    """The one profile every cell is planned from."""
    from planner.planning import load_profile, read_profile
    from planner.precision import parse_dtype
    from planner.whatif import grid_dtype

    source = profile_path or (Path(model) if Path(model).suffix == ".json" and not model.startswith("hf:") else None)
    if source is not None:
        if options:
            raise AutoparError(f"options ({', '.join(sorted(options))}) cannot change a finished profile; profile "
                               "the model again with them, or name the model itself")
        return read_profile(source)
    precision = grid_dtype(specs, parse_dtype(dtype) if dtype else None)
    console.print(f"[dim]profiling {model} once in {precision.value}...[/]")
    return load_profile(model, dtype=precision, model_options=options or None)


def _progress(cell: WhatIfCell) -> None:
    what = (f"{cell.strategy}: {cell.step_seconds:.4g} s/step" if cell.status == CellStatus.OK
            else f"no plan: {cell.reason}")
    console.print(f"  {cell.cluster} x {cell.gpus} GPUs ({cell.plan_seconds:.2f} s) {what}", highlight=False,
                  soft_wrap=True)


def print_whatif(result: WhatIf) -> None:
    """The what-if table: one row per cell, the reason in place of numbers for cells without a plan."""
    priced = any(c.cost_per_million_tokens is not None for c in result.cells)
    t = Table(title=f"what if: {result.model_name}, global batch {result.global_batch_size} "
                    f"({result.dtype.value}, planned in {result.seconds:.1f} s)", box=box.SIMPLE_HEAD)
    cols = ["cluster", "GPUs", "nodes", "strategy", "step s", "tokens/s", "MFU", "peak GB", "scaling"]
    for col in cols + (["$/M tok"] if priced else []):
        t.add_column(col, justify="left" if col in ("cluster", "strategy") else "right",
                     no_wrap=col != "strategy", min_width=24 if col == "strategy" else None)
    for c in result.cells:
        nodes = f"{c.nodes}x{c.gpus_per_node}" if c.nodes else "-"
        if c.status != CellStatus.OK:
            t.add_row(c.cluster, str(c.gpus), nodes, f"[red]no plan[/]: {c.reason}", *["-"] * (len(cols) - 4 + priced))
            continue
        cost = [f"{c.cost_per_million_tokens:.3g}" if c.cost_per_million_tokens is not None else "-"] if priced else []
        # The degrees and ZeRO stage: the full strategy is in the progress lines and the JSON.
        short = " ".join(c.strategy.split()[:4])
        t.add_row(c.cluster, str(c.gpus), nodes, short, f"{c.step_seconds:.3g}", f"{c.tokens_per_second:,.0f}",
                  f"{c.mfu:.0%}", f"{c.peak_memory_bytes / GB:.1f}", f"{c.scaling_efficiency:.0%}", *cost)
    # At least 120 columns, so the rows stay whole in a pipe or a narrow terminal.
    Console(width=max(console.width, 120)).print(t)


def print_node_loss(loss: NodeLoss) -> None:
    """Old against new plan: strategy, step time, tokens/s, and the slowdown."""
    t = Table(title=f"losing {loss.lost_nodes} node(s) at global batch {loss.after.strategy.global_batch_size}")
    for col in ("", "GPUs", "strategy", "step (s)", "tokens/s", "MFU"):
        t.add_column(col, justify="left" if col in ("", "strategy") else "right")
    for label, p in (("before", loss.before), ("after", loss.after)):
        c = p.provenance.cluster
        t.add_row(label, f"{c.world_size} ({c.nodes}x{c.gpus_per_node})", p.strategy.describe(),
                  f"{p.prediction.step_seconds:.4g}", f"{p.prediction.tokens_per_second:,.0f}",
                  f"{p.prediction.mfu:.1%}")
    console.print(t)
    fewer = 1 - loss.after.prediction.tokens_per_second / loss.before.prediction.tokens_per_second
    console.print(f"slowdown: {loss.slowdown:.2f}x step time ({fewer:.0%} fewer tokens/s)")


def _lose_nodes(plan_file: Path, k: int, profile_path: Path | None, time_limit: float) -> NodeLoss:
    from api.cli_export import read_plan
    from planner.planning import load_profile, read_profile
    from planner.whatif import check_lose_nodes, lose_nodes

    plan = read_plan(plan_file)
    prov = plan.provenance
    check_lose_nodes(prov.cluster, k)  # before profiling, which takes seconds
    if profile_path is not None:
        profile = read_profile(profile_path)
    else:
        try:
            profile = load_profile(prov.model_name, dtype=prov.dtype, model_options=dict(prov.model_options) or None)
        except AutoparError as exc:
            raise AutoparError(f"cannot profile the plan's model '{prov.model_name}' again ({str(exc).splitlines()[0]}"
                               "); give its profile with --profile PROFILE.json") from None
    if profile.profile_hash != prov.profile_hash:
        console.print(f"[yellow]warning[/]: the model profiles differently now (hash {profile.profile_hash}, the plan "
                      f"has {prov.profile_hash}); the 'before' numbers are the plan's own")
    return lose_nodes(plan, k, profile, time_limit_s=time_limit)


def register(app: typer.Typer) -> None:
    """Add `whatif` to the CLI."""

    @app.command("whatif")
    def whatif_cmd(
        model: Annotated[str | None, typer.Argument(help="Zoo name, path/to/file.py:factory, package.module:factory, "
                                                         "hf:path/to/config.json or a profile JSON (not with --plan)."
                                                    )] = None,
        global_batch: Annotated[int | None, typer.Option("--global-batch", min=1,
                                                         help="Samples per optimizer step.")] = None,
        cluster: Annotated[str | None, typer.Option("--cluster", help="Comma-separated presets or cluster files.")
                           ] = None,
        gpus: Annotated[str | None, typer.Option("--gpus", help="Comma-separated GPU counts, e.g. 8,16,32.")] = None,
        price: Annotated[str | None, typer.Option("--price-per-gpu-hour", help="One price for every cluster (2.1) "
                                                  "or one per cluster (a=2.1,b=3.9).")] = None,
        seq_len: Annotated[int | None, typer.Option("--seq-len", min=1, help="Tokens per sample (a model option).")
                           ] = None,
        option: Annotated[list[str] | None, typer.Option("--option", help="Model option key=value (repeatable).")
                          ] = None,
        dtype: Annotated[str | None, typer.Option("--dtype", help="Precision to profile in (default: what the "
                                                  "clusters train in).")] = None,
        profile: Annotated[Path | None, typer.Option("--profile", help="Use this profile JSON for the model.")] = None,
        time_limit: Annotated[float | None, typer.Option(
            "--time-limit", callback=lambda v: v if v is None else _positive(v),
            help=f"Search budget in seconds: per cell (default {CELL_TIME_LIMIT_S:g}), or for the re-plan with "
                 "--lose-nodes (default 10).")] = None,
        chart: Annotated[Path | None, typer.Option("--chart", help="Draw tokens/s and cost against GPUs (PNG).")
                         ] = None,
        json_out: Annotated[Path | None, typer.Option("--json", help="Write the table (or the node loss) as JSON.")
                            ] = None,
        plan_file: Annotated[Path | None, typer.Option("--plan", help="With --lose-nodes: the plan JSON to re-plan.")
                             ] = None,
        lose: Annotated[int | None, typer.Option("--lose-nodes", min=1, help="Re-plan --plan with this many nodes "
                                                 "fewer at the same global batch.")] = None,
    ) -> None:
        """Plan a model on every cluster x GPU count (table and chart), or re-plan a plan with nodes lost."""
        from api.cli_run import parse_options

        if lose is not None or plan_file is not None:
            if lose is None or plan_file is None:
                raise AutoparError("--lose-nodes and --plan go together: autopar whatif --plan plan.json "
                                   "--lose-nodes 1")
            given = [n for n, v in (("MODEL", model), ("--cluster", cluster), ("--gpus", gpus),
                                    ("--global-batch", global_batch), ("--chart", chart), ("--price-per-gpu-hour",
                                                                                           price)) if v is not None]
            if given:
                raise AutoparError(f"--lose-nodes re-plans the plan's own model, cluster and global batch; drop "
                                   f"{', '.join(given)}")
            loss = _lose_nodes(plan_file, lose, profile, time_limit or 10.0)
            print_node_loss(loss)
            if json_out is not None:
                _write("node loss", json_out, lambda: write_text_atomic(json_out, loss.model_dump_json(indent=2)))
            return
        missing = [n for n, v in (("MODEL", model), ("--global-batch", global_batch), ("--cluster", cluster),
                                  ("--gpus", gpus)) if v is None]
        if missing:
            raise AutoparError(f"missing {', '.join(missing)}: autopar whatif MODEL --global-batch 512 --cluster "
                               "dgx-a100-80gb,dgx-h100 --gpus 8,16,32 (or --plan plan.json --lose-nodes 1)")
        assert model is not None and global_batch is not None and cluster is not None and gpus is not None
        names = [n.strip() for n in cluster.split(",") if n.strip()]
        if not names:
            raise AutoparError(f"--cluster '{cluster}' names no cluster; e.g. --cluster dgx-a100-80gb,dgx-h100")
        counts = parse_counts(gpus)
        specs = [cluster_spec(n) for n in names]
        prices = parse_prices(price, [s.name for s in specs])
        options = parse_options(option or []) | ({"seq_len": seq_len} if seq_len is not None else {})
        source = _profile(model, specs, dtype=dtype, options=options, profile_path=profile)
        from planner.whatif import whatif

        console.print(f"planning {len(specs) * len(set(counts))} cells "
                      f"({time_limit or CELL_TIME_LIMIT_S:g} s search budget each):")
        result = whatif(source, specs, counts, global_batch, price_per_gpu_hour=prices,
                        cell_time_limit_s=time_limit or CELL_TIME_LIMIT_S, progress=_progress)
        print_whatif(result)
        if json_out is not None:
            _write("what-if table", json_out, lambda: write_text_atomic(json_out, result.model_dump_json(indent=2)))
            console.print(f"table written to {json_out}")
        if chart is not None:
            from planner.whatif_chart import draw_whatif

            console.print(f"chart written to {_write('chart', chart, lambda: draw_whatif(result, chart))}")
