"""Property-based fuzzing of the CLI's error contract: whatever the command, flags and values, a refused invocation
is one line on the terminal, exit code 2, and no traceback.

Commands and their flags are read from the real `api.cli.app` (so a new flag is fuzzed without editing this test);
values come from a pool of hostile and valid ones (numbers out of range, NaN, huge, negative, garbage, directories,
missing, truncated and wrong-kind files, valid profiles and plans). `run` and `calibrate` stop where they would launch
processes and `serve` where it would bind a port: reaching that point means the input was accepted. `demo` takes no
input.
"""

from __future__ import annotations

import importlib
import json

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_support import tiny_profile
from typer.testing import CliRunner

import api.server
from api.cli import app
from planner.errors import AutoparError

_COMMANDS = {name: cmd for name, cmd in typer.main.get_command(app).commands.items() if name != "demo"}


class _Launched(Exception):
    """`autopar run` got as far as starting workers: its input was accepted."""


def _launch(*_, **__):
    raise _Launched


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("fuzz")
    profile = tmp / "tiny.json"
    tiny_profile().to_json(profile)
    truncated = tmp / "truncated.json"
    truncated.write_text(profile.read_text()[:200])
    garbage = tmp / "garbage.json"
    garbage.write_bytes(b"\x00\xff not json at all")
    nan_cluster = tmp / "nan.yaml"
    nan_cluster.write_text("preset: cpu\ncompute_efficiency: .nan\n")
    plan = tmp / "plan.json"
    r = CliRunner().invoke(app, ["plan", str(profile), "--cluster", "cpu", "--global-batch", "8", "--time-limit", "1",
                                 "--out", str(plan)])
    assert r.exit_code == 0, r.output
    listed = tmp / "list.json"
    listed.write_text(json.dumps([1, 2, 3]))
    return {"profile": str(profile), "truncated": str(truncated), "garbage": str(garbage), "dir": str(tmp),
            "missing": str(tmp / "missing.json"), "nan_cluster": str(nan_cluster), "plan": str(plan),
            "list": str(listed), "unwritable": "/proc/autopar-fuzz/out.json", "out": str(tmp / "out" / "x.json")}


_LITERALS = ["", "0", "-3", "1", "8", "2", "1e309", "nan", "inf", "-inf", "abc", "99999999999999999999", "0.001",
             "gpt-tiny", "cpu", "dgx-a100-80gb", "float32", "bogus=1", "seq_len=0", "x=", ":", "hf:",
             "no-such-model", "torch.nn:Linear", "é\u202e", "--", "-"]
_FILES = ["profile", "truncated", "garbage", "dir", "missing", "nan_cluster", "plan", "list", "unwritable", "out"]


@st.composite
def invocations(draw, files: dict[str, str]) -> list[str]:
    """A command, about as many positional values as it takes, its required options (mostly) and up to four more
    of its options, with drawn values."""
    name = draw(st.sampled_from(sorted(_COMMANDS)))
    command = _COMMANDS[name]
    value = st.one_of(st.sampled_from(_LITERALS), st.sampled_from(_FILES).map(files.__getitem__),
                      st.integers(-2**70, 2**70).map(str), st.floats(allow_nan=True).map(repr))
    # Mostly as many positionals as the command takes, and its required options, so most draws get past parsing.
    arguments = sum(1 for p in command.params if isinstance(p, typer.core.TyperArgument))
    argv = [name, *draw(st.lists(value, min_size=max(0, arguments - 1), max_size=arguments + 1))]
    options = [p for p in command.params if isinstance(p, typer.core.TyperOption) and "--help" not in p.opts]
    required = [p for p in options if p.required and draw(st.integers(0, 9)) > 0]
    chosen = draw(st.lists(st.sampled_from(options), max_size=4, unique_by=lambda p: p.name))
    for option in [*required, *(p for p in chosen if p not in required)]:
        flag = draw(st.sampled_from(option.opts + option.secondary_opts))
        if option.is_flag:
            argv.append(flag)
        else:
            argv += [flag, draw(value)]
    if draw(st.booleans()):
        argv.append(draw(st.sampled_from(["--no-such-flag", "--time-limit", "extra-arg"])))
    return argv


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_every_refused_cli_invocation_is_one_line_and_exit_2(data, files, monkeypatch, tmp_path_factory):
    launcher = importlib.import_module("executor.launch")  # the module (the package re-exports a function of its name)
    monkeypatch.setattr(launcher, "launch", _launch)
    monkeypatch.setattr(launcher, "slurm_launch", _launch)
    monkeypatch.setattr(importlib.import_module("executor.calibrate"), "launch_calibration", _launch)
    monkeypatch.setattr(api.server, "run_server", lambda config: None)
    monkeypatch.setenv("AUTOPAR_CACHE_DIR", files["dir"] + "/cache")
    monkeypatch.chdir(files["dir"])
    argv = data.draw(invocations(files))
    result = CliRunner().invoke(app, argv)
    if isinstance(result.exception, _Launched):
        return  # accepted: `run` was about to start its workers
    text = result.output
    assert "Traceback" not in text, (argv, text)
    assert not isinstance(result.exception, AutoparError), (argv, text)
    assert result.exit_code in (0, 2), (argv, result.exit_code, text, result.exception)
    if result.exit_code == 2:
        lines = [line for line in text.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, text)
