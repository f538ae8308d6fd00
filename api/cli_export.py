"""`autopar export`: a saved plan as the configuration of the trainer a team already uses.

    autopar export plan.json --to torchtitan
    autopar export plan.json --to torchtitan --format toml --out parallelism.toml
    autopar export plan.json --to megatron --out launch.sh
    autopar export plan.json --to deepspeed --out ds_config.json
    autopar export plan.json --to accelerate --out accelerate.yaml
    autopar export plan.json --to lightning --out trainer.py

The configuration goes to --out (written atomically) or to stdout; what the target cannot express is printed as
`warning:` lines on stderr (and kept as comments in formats that have them), never dropped silently.
"""

from __future__ import annotations

from pathlib import Path

import typer

from planner.errors import AutoparError
from planner.export import Export, Target, export_plan
from planner.model_profile import write_text_atomic
from planner.strategy import Plan


def read_plan(path: Path) -> Plan:
    """A plan JSON written by `autopar plan --out`, with every way it can be unusable as one line."""
    if not path.exists():
        raise AutoparError(f"plan file {path} does not exist; write one with `autopar plan MODEL --cluster C "
                           f"--global-batch N --out {path}`")
    if path.is_dir():
        raise AutoparError(f"{path} is a directory; give a plan JSON written by `autopar plan --out`")
    try:
        return Plan.from_json(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise AutoparError(f"cannot read plan file {path} ({exc}); give a readable plan JSON") from None
    except ValueError as exc:
        lines = str(exc).splitlines()
        raise AutoparError(f"{path} is not a valid plan: {lines[0] if lines else type(exc).__name__}; make it again "
                           "with `autopar plan ... --out`") from None


def write_export(result: Export, out: Path) -> None:
    """Write the exported text to `out` atomically; a path that cannot be written is a one-line error."""
    try:
        write_text_atomic(out, result.text)
    except IsADirectoryError:
        raise AutoparError(f"cannot write the {result.target.value} config to {out}: it is a directory; give a file "
                           "path") from None
    except OSError as exc:
        raise AutoparError(f"cannot write the {result.target.value} config to {out} ({exc.strerror or exc}); give a "
                           "path in a writable directory") from None


def register(app: typer.Typer) -> None:
    """Add `export` to the CLI."""

    @app.command("export")
    def export_cmd(
        plan_file: Path = typer.Argument(..., help="A plan JSON written by `autopar plan --out`."),
        to: Target = typer.Option(..., "--to", help="The trainer to export for."),
        fmt: str | None = typer.Option(None, "--format", help="torchtitan: args (default) or toml; the other "
                                                              "targets have one format each."),
        out: Path | None = typer.Option(None, "--out", help="Write the configuration here (default: stdout)."),
    ) -> None:
        """Export a plan as torchtitan, Megatron-LM, DeepSpeed, accelerate or Lightning configuration."""
        result = export_plan(read_plan(plan_file), to, fmt)
        if out is None:
            typer.echo(result.text, nl=False)
        else:
            write_export(result, out)
            typer.echo(f"{result.target.value} {result.format.value} written to {out}")
        for warning in result.warnings:
            typer.echo(f"warning: {result.target.value}: {warning}", err=True)
