"""The `autopar` command line.

    autopar profile gpt2-medium --batch-size 8 --device meta --out gpt2m.profile.json
    autopar plan gpt2-medium --cluster dgx-a100-80gb --nodes 2 --global-batch 512 --out plan.json
    autopar show plan.json --chart plan.png
    autopar run plan.json --model gpt-tiny --steps 5 --nproc-per-node 2
    autopar serve --port 8000 --db plans.db
    autopar demo

Each command lives in its own module (`api.cli_*`); this one registers them on `app` and turns user mistakes
(`AutoparError`) into a one-line message and exit code 2 instead of a traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from api import cli_demo, cli_plan, cli_profile, cli_run, cli_serve
from planner.errors import AutoparError

app = typer.Typer(
    name="autopar",
    help="Plan and run data / tensor / pipeline parallel training for PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)

for _module in (cli_profile, cli_plan, cli_run, cli_serve, cli_demo):
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except AutoparError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
