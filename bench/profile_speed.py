"""How long profiling takes: analytic Llama-70B and a 1T-parameter GPT, measured GPT-2 small on this CPU.

    .venv/bin/python bench/profile_speed.py                # default sizes, prints a table
    .venv/bin/python bench/profile_speed.py --seq-len 512  # GPT-2 small measured at another sequence length
    .venv/bin/python bench/profile_speed.py --threads 1    # steadier on a machine shared with other jobs

Goals (issue 2): Llama-70B analytic < 60 s; GPT-2 small measured on CPU < 30 s.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from profiler import profile_zoo


def _run(label: str, goal: float | None, **kwargs) -> list[str]:
    started = time.perf_counter()
    p = profile_zoo(cache=False, **kwargs)
    seconds = time.perf_counter() - started
    check = ""
    if p.step is not None:
        layer_sum = sum(layer.fwd_seconds + layer.bwd_seconds for layer in p.layers) * p.input.batch_size
        check = f"layers {layer_sum * 1e3:.0f} ms / step {p.step.fwd_bwd_seconds * 1e3:.0f} ms"
    verdict = "-" if goal is None else ("yes" if seconds < goal else "NO")
    return [label, f"{p.param_count / 1e9:.2f} B", f"{p.num_layers}", f"{seconds:.2f}",
            "-" if goal is None else f"< {goal:.0f}", verdict, check]


def main() -> None:
    """Print the benchmark table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=128, help="GPT-2 small measured: tokens per sample")
    parser.add_argument("--batch-size", type=int, default=1, help="GPT-2 small measured: samples")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = [
        _run("llama-70b, analytic (meta), b=1, s=4096", 60, name="llama-70b"),
        _run("GPT 1T (h=25600, 128 layers), analytic, b=1, s=2048", None, name="gpt2-small", num_layers=128,
             hidden=25600, heads=160, vocab_size=51200, seq_len=2048, max_positions=2048),
        _run(f"gpt2-small, measured on cpu, b={args.batch_size}, s={args.seq_len}", 30, name="gpt2-small",
             device="cpu", batch_size=args.batch_size, seq_len=args.seq_len),
    ]
    table = Table(title=f"profile speed (torch {torch.__version__}, {torch.get_num_threads()} CPU threads)")
    for col in ("run", "params", "layers", "seconds", "goal", "met", "measured check"):
        table.add_column(col, justify="left" if col in ("run", "measured check") else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
