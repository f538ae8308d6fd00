"""`autopar evaluate`: score a team's existing trainer configuration against autopar's best plan.

    autopar evaluate gpt2-xl --cluster dgx-a100-80gb --nodes 2 --global-batch 512 --from megatron-args launch.sh
    autopar evaluate gpt2-xl --cluster dgx-h100 --global-batch 256 --from ds-config ds_config.json --json eval.json
    autopar evaluate gpt2-xl --cluster dgx-h100 --nodes 4 --global-batch 512 --from torchtitan parallelism.toml

MODEL is any model reference `autopar plan` accepts. The configuration (Megatron-LM launch arguments, a DeepSpeed
ds_config JSON, torchtitan TOML or `--section.field value` overrides) is read into an autopar strategy and scored
with the same cost model as the plan; the output puts its step time, tokens/s, MFU and memory per pipeline rank
beside the best plan's and says, per component of the step, why they differ. What autopar had to assume or cannot
express is printed as notes, settings it did not read as `ignored`.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from api.cli_plan import cluster_spec
from planner.errors import AutoparError
from planner.import_configs import ImportConfigError, Source, TrainerSettings, parse_config
from planner.import_strategy import Comparison, GiB, Imported, compare, to_strategy
from planner.model_profile import write_text_atomic
from planner.strategy import Plan, Prediction, Strategy


def read_config(kind: str, path: Path) -> tuple[Source, str]:
    """The configuration kind and the file's text; a missing or unreadable file is a one-line error."""
    try:
        source = Source(kind)
    except ValueError:
        raise ImportConfigError(f"--from takes megatron-args, ds-config or torchtitan, got '{kind}'") from None
    if not path.exists():
        raise ImportConfigError(f"configuration file {path} does not exist; give the {source.value} file to score")
    if path.is_dir():
        raise ImportConfigError(f"{path} is a directory; give the {source.value} file to score")
    try:
        return source, path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ImportConfigError(f"cannot read configuration file {path} ({exc}); give a readable text file") from None


def _memory(p: Prediction) -> str:
    """Peak memory per pipeline rank, or where it does not fit."""
    over = [(r, m.total - m.capacity) for r, m in enumerate(p.memory) if m.total > m.capacity]
    if over:
        rank, nbytes = max(over, key=lambda x: x[1])
        return f"does not fit: {nbytes / GiB:.1f} GiB over on stage {rank}"
    return ", ".join(f"{m.total / GiB:.1f}" for m in p.memory) + f" GiB of {p.memory[0].capacity / GiB:.1f} usable"


def print_comparison(label: str, team_strategy: Strategy, team: Prediction, best: Plan, why: Comparison,
                     imported: Imported) -> None:
    """The team's configuration beside the best plan, the verdict, the differences, then notes and ignored settings."""
    b = best.prediction
    rows = [("strategy", team_strategy.describe(), best.strategy.describe()),
            ("step time", f"{team.step_seconds:.4g} s", f"{b.step_seconds:.4g} s"),
            ("tokens/s", f"{team.tokens_per_second:,.0f}", f"{b.tokens_per_second:,.0f}"),
            ("MFU", f"{team.mfu:.1%}", f"{b.mfu:.1%}"),
            ("memory per pipeline rank", _memory(team), _memory(b))]
    width = max(len(r[1]) for r in rows + [("", f"yours ({label})", "")]) + 3
    typer.echo(f"{'':26}{'yours (' + label + ')':<{width}}autopar's best plan")
    for name, yours, ours in rows:
        typer.echo(f"{name:<26}{yours:<{width}}{ours}")
    typer.echo("")
    typer.echo(why.verdict)
    if why.differences:
        typer.echo("why they differ (yours minus best, and as a share of your step), largest first:")
        for d in why.differences:
            typer.echo(f"  {d.component:<10}{d.seconds:+9.3g} s  {d.share:+7.2%} of your step: {d.text}")
    for note in imported.notes:
        typer.echo(f"note: {note}")
    if imported.ignored:
        typer.echo(f"ignored (not parallelism settings autopar reads): {', '.join(imported.ignored)}")


def evaluation_json(source: Source, path: Path, imported: Imported, team: Prediction, best: Plan,
                    why: Comparison) -> str:
    """The whole evaluation as JSON: the team's strategy and prediction, the best plan and the differences."""
    return json.dumps({
        "source": source.value, "file": str(path),
        "team": {"strategy": imported.strategy.model_dump(mode="json"), "prediction": team.model_dump(mode="json"),
                 "notes": imported.notes, "ignored": imported.ignored},
        "best": best.model_dump(mode="json"),
        "verdict": why.verdict,
        "differences": [{"component": d.component, "team_seconds": d.team_seconds, "best_seconds": d.best_seconds,
                         "seconds": d.seconds, "share_of_team_step": d.share, "text": d.text}
                        for d in why.differences],
    }, indent=1)


def _profile_for(model: str, settings: TrainerSettings, cluster: object, dtype: str | None, options: dict):
    """The model's profile, in --dtype, else in the configuration's precision when it states one."""
    from planner.planning import load_profile

    is_profile = Path(model).suffix == ".json" and not model.startswith("hf:")
    want = dtype or (settings.dtype.value if settings.dtype is not None and not is_profile else None)
    return load_profile(model, cluster=cluster, dtype=want, model_options=options or None)


def register(app: typer.Typer) -> None:
    """Add `evaluate` to the CLI."""

    @app.command("evaluate")
    def evaluate_cmd(
        model: str = typer.Argument(..., help="Any model reference `autopar plan` takes (zoo name, file.py:factory, "
                                              "hf:config.json, a profile JSON)."),
        cluster: str = typer.Option(..., "--cluster", help="Preset name or a YAML/JSON cluster file."),
        global_batch: int = typer.Option(..., "--global-batch", min=1, help="Samples per optimizer step."),
        source: tuple[str, Path] = typer.Option(..., "--from", help="KIND FILE: megatron-args, ds-config or "
                                                                    "torchtitan, and the file holding it."),
        nodes: int | None = typer.Option(None, "--nodes", min=1, help="Override the cluster's node count."),
        gpus_per_node: int | None = typer.Option(None, "--gpus-per-node", min=1, help="Override GPUs per node."),
        seq_len: int | None = typer.Option(None, "--seq-len", min=1, help="Tokens per sample (a model option)."),
        option: list[str] = typer.Option([], "--option", help="Model option key=value (repeatable)."),
        dtype: str | None = typer.Option(None, "--dtype", help="Precision to profile in (default: the "
                                                               "configuration's, else the cluster's)."),
        time_limit: float = typer.Option(10.0, "--time-limit", min=0.5, max=3600.0,
                                         help="Search budget for the best plan, in seconds."),
        json_out: Path | None = typer.Option(None, "--json", help="Also write the evaluation as JSON here."),
    ) -> None:
        """Score an existing Megatron-LM, DeepSpeed or torchtitan configuration against autopar's best plan."""
        from api.cli_run import parse_options
        from planner import evaluate, plan

        kind, path = source
        src, text = read_config(kind, path)
        spec = cluster_spec(cluster, nodes=nodes, gpus_per_node=gpus_per_node)
        settings = parse_config(src, text, world_size=spec.world_size)
        options = parse_options(option) | ({"seq_len": seq_len} if seq_len is not None else {})
        profile = _profile_for(model, settings, spec, dtype, options)
        imported = to_strategy(settings, profile, global_batch_size=global_batch)
        team = evaluate(profile, spec, imported.strategy)
        try:
            best = plan(profile, spec, global_batch_size=global_batch, time_limit_s=time_limit)
        except AutoparError as exc:
            raise AutoparError(f"autopar found no plan to compare with: {exc}") from None
        why = compare(imported.strategy, team, best.strategy, best.prediction, spec)
        print_comparison(f"{src.value} {path.name}", imported.strategy, team, best, why, imported)
        if json_out is not None:
            text_out = evaluation_json(src, path, imported, team, best, why)
            try:
                write_text_atomic(json_out, text_out)
            except OSError as exc:
                raise AutoparError(f"cannot write the evaluation to {json_out} ({exc.strerror or exc}); give a file "
                                   "path in a writable directory") from None
            typer.echo(f"evaluation written to {json_out}")
