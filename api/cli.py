"""The `autopar` command line.

    autopar profile gpt2-medium --batch-size 8 --device meta --out gpt2m.profile.json
    autopar plan gpt2-medium --cluster dgx-a100-80gb --nodes 2 --global-batch 512 --out plan.json
    autopar show plan.json --chart plan.png
    autopar export plan.json --to torchtitan --format toml --out parallelism.toml
    autopar evaluate gpt2-xl --cluster dgx-a100-80gb --global-batch 512 --from megatron-args launch.sh
    autopar whatif gpt2-xl --global-batch 512 --cluster dgx-a100-80gb,dgx-h100 --gpus 8,16,32,64 --chart w.png
    autopar run plan.json --model gpt-tiny --steps 5 --nproc-per-node 2
    autopar calibrate --nproc-per-node 2 --quick --out cluster.yaml
    autopar runs --limit 5; autopar compare RUN_ID
    autopar plan gpt-tiny --cluster cpu --global-batch 16 --calibration .autopar/runs.db
    autopar serve --port 8000 --db plans.db
    autopar demo

Each command lives in its own module (`api.cli_*`); this one registers them on `app` and turns user mistakes
(`AutoparError`) into a one-line message and exit code 2 instead of a traceback.
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from typer.core import TyperGroup

from api import (
    cli_calibrate,
    cli_demo,
    cli_evaluate,
    cli_export,
    cli_plan,
    cli_profile,
    cli_run,
    cli_runs,
    cli_serve,
    cli_whatif,
)
from planner.errors import AutoparError


def _fail(message: str, hint: str = "") -> None:
    """Print `error: MESSAGE` as one line on stderr (never wrapped) and exit with code 2."""
    text = "; ".join(line.strip() for line in str(message).splitlines() if line.strip()) or "unknown error"
    typer.echo(f"error: {text}{hint}", err=True)
    sys.exit(2)


class _OneLineErrors(TyperGroup):
    """The contract of every command: a user mistake is one line naming the problem and the fix, and exit code 2.

    Covers both option parsing (a value out of its range, a missing argument) and `AutoparError` raised by a
    command, so the same holds whether `autopar` runs from the console script or from `CliRunner` in a test.
    """

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # typer's (vendored click) usage errors: bad option values and the like
            if type(exc).__name__ == "NoArgsIsHelpError":
                exc.show()  # type: ignore[attr-defined]  # `autopar` alone: the help text, as usual
                sys.exit(2)
            ctx = getattr(exc, "ctx", None)
            _fail(exc.format_message(), f" (see `{ctx.command_path} --help`)" if ctx is not None else "")
        except AutoparError as exc:
            _fail(str(exc))
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    name="autopar",
    help="Plan and run data / tensor / pipeline parallel training for PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _module in (cli_profile, cli_plan, cli_export, cli_run, cli_calibrate, cli_serve, cli_demo):
    _module.register(app)
cli_whatif.register(app)
cli_evaluate.register(app)
cli_runs.register(app)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except AutoparError as exc:  # only reached when a caller runs the app with standalone_mode=False
        _fail(str(exc))


if __name__ == "__main__":
    main()
