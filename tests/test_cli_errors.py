"""The CLI's error contract: every user mistake is one line naming the problem and the fix, and exit code 2.

Each case drives the real `api.cli.app` with bad input (a file that is not what it should be, an option out of
range, a path that cannot be written) and checks the answer is that line, never a traceback or a silent success.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from api.cli import app
from planner.gpt_formula import gpt_profile


def _profile(tmp: Path) -> Path:
    path = tmp / "gpt.json"
    if not path.exists():
        gpt_profile(num_layers=4, hidden=256, heads=4, seq_len=128, vocab_size=1000).to_json(path)
    return path


def _plan_file(tmp: Path) -> Path:
    path = tmp / "plan.json"
    if not path.exists():
        r = CliRunner().invoke(app, ["plan", str(_profile(tmp)), "--cluster", "dgx-a100-40gb", "--global-batch", "8",
                                     "--time-limit", "5", "--out", str(path)])
        assert r.exit_code == 0, r.output
    return path


def _truncated_profile(tmp: Path) -> Path:
    text = _profile(tmp).read_text()
    path = tmp / "truncated.json"
    path.write_text(text[: len(text) // 2])
    return path


def _zero_profile(tmp: Path) -> Path:
    data = json.loads(_profile(tmp).read_text())
    for layer in data["layers"]:
        for key, value in layer.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "index":
                layer[key] = 0
    path = tmp / "zero.json"
    path.write_text(json.dumps(data))
    return path


def _nan_cluster(tmp: Path) -> Path:
    path = tmp / "nan.yaml"
    path.write_text("preset: dgx-a100-40gb\ncompute_efficiency: .nan\n")
    return path


def _a_file(tmp: Path) -> Path:
    path = tmp / "a_file"
    path.write_text("not a directory")
    return path


def _garbage_db(tmp: Path) -> Path:
    path = tmp / "garbage.db"
    path.write_bytes(b"this is not an sqlite database at all\n" * 200)
    return path


def _truncated_db(tmp: Path) -> Path:
    import sqlite3

    path = tmp / "full.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x TEXT)")
        conn.executemany("INSERT INTO t VALUES (?)", [("x" * 500,)] * 200)
    conn.close()
    cut = tmp / "truncated.db"
    cut.write_bytes(path.read_bytes()[:1000])
    return cut


def _factory(tmp: Path, body: str) -> str:
    """A model file whose `build` factory has `body` (indented) as its code; the reference to it."""
    path = tmp / "user_model.py"
    path.write_text("import torch\nfrom torch import nn\n\ndef build(batch_size=1):\n    " + body + "\n")
    return f"{path}:build"


def _plan_args(model: str, *extra: str) -> list[str]:
    return ["plan", model, "--cluster", "dgx-a100-40gb", "--global-batch", "8", "--time-limit", "5", *extra]


# Each case: (id, argv builder taking the temp dir, a word the one line must contain).
CASES = [
    ("serve-db-directory", lambda t: ["serve", "--db", str(t)], "directory"),
    ("serve-db-garbage", lambda t: ["serve", "--db", str(_garbage_db(t))], "database"),
    ("serve-db-truncated", lambda t: ["serve", "--db", str(_truncated_db(t))], "database"),
    ("serve-db-unwritable", lambda t: ["serve", "--db", str(_a_file(t) / "plans.db")], "plans.db"),
    ("serve-host-garbage", lambda t: ["serve", "--host", "bad host!!", "--db", str(t / "p.db")], "--host"),
    ("serve-host-not-ours", lambda t: ["serve", "--host", "192.0.2.1", "--db", str(t / "p.db")], "cannot listen"),
    ("plan-truncated-profile", lambda t: _plan_args(str(_truncated_profile(t))), "truncated.json"),
    ("plan-plan-as-model", lambda t: _plan_args(str(_plan_file(t))), "plan.json"),
    ("plan-all-zero-profile", lambda t: _plan_args(str(_zero_profile(t))), "zero.json"),
    ("plan-nan-cluster", lambda t: ["plan", str(_profile(t)), "--cluster", str(_nan_cluster(t)), "--global-batch", "8"],
     "compute_efficiency"),
    ("plan-cluster-directory", lambda t: ["plan", str(_profile(t)), "--cluster", str(t), "--global-batch", "8"],
     "directory"),
    ("plan-top-k-negative", lambda t: _plan_args(str(_profile(t)), "--top-k", "-3"), "--top-k"),
    ("plan-top-k-zero", lambda t: _plan_args(str(_profile(t)), "--top-k", "0"), "--top-k"),
    ("plan-time-limit-negative", lambda t: _plan_args(str(_profile(t)), "--time-limit", "-5"), "--time-limit"),
    ("plan-seq-len-zero", lambda t: _plan_args("gpt2", "--seq-len", "0"), "--seq-len"),
    ("plan-global-batch-zero", lambda t: ["plan", str(_profile(t)), "--cluster", "cpu", "--global-batch", "0"],
     "--global-batch"),
    ("plan-out-unwritable", lambda t: _plan_args(str(_profile(t)), "--out", str(_a_file(t) / "p.json")), "p.json"),
    ("plan-chart-unwritable", lambda t: _plan_args(str(_profile(t)), "--chart", str(_a_file(t) / "p.png")), "p.png"),
    ("show-directory", lambda t: ["show", str(t)], "directory"),
    ("profile-seq-len-past-positions", lambda t: ["profile", "gpt2-small", "--seq-len", "2048"], "max_positions=2048"),
    ("plan-seq-len-past-positions", lambda t: _plan_args("gpt2-small", "--seq-len", "2048"), "--seq-len 1024"),
    ("plan-unknown-zoo-option", lambda t: _plan_args("llama-7b", "--option", "max_positions=4096"), "max_positions"),
    ("plan-unknown-reference-form", lambda t: _plan_args("no/such/model"), "hf:path/to/config.json"),
    ("plan-python-file-without-factory", lambda t: _plan_args(_factory(t, "pass").rpartition(":")[0]),
     "user_model.py:factory"),
    ("plan-options-on-a-profile", lambda t: _plan_args(str(_profile(t)), "--option", "seq_len=8"), "profile"),
    ("profile-factory-raises", lambda t: ["profile", _factory(t, "raise RuntimeError('no GPU here')")],
     "fix the factory"),
    ("profile-factory-unknown-option", lambda t: ["profile", _factory(t, "return nn.Linear(2, 2), (torch.ones(1, 2),)"),
                                                  "--option", "width=3"], "takes no option width"),
    ("profile-unknown-dtype", lambda t: ["profile", "gpt-tiny", "--dtype", "float8"], "--dtype"),
    ("run-a-profile-as-model", lambda t: ["run", "--plan-first", str(_profile(t)), "--global-batch", "8"],
     "not a model a run can build"),
    ("run-nproc-zero", lambda t: ["run", str(_plan_file(t)), "--model", "gpt-tiny", "--nproc-per-node", "0"],
     "--nproc-per-node"),
    ("run-collective-timeout-zero", lambda t: ["run", str(_plan_file(t)), "--collective-timeout", "0"],
     "'--collective-timeout': Input should be greater"),
]


@pytest.mark.parametrize(("argv", "word"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line_and_exit_code_2(tmp_path, argv, word):
    r = CliRunner().invoke(app, argv(tmp_path))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert word in lines[0], lines[0]


def test_out_onto_a_directory_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "plan.json"
    target.mkdir()
    r = CliRunner().invoke(app, _plan_args(str(_profile(tmp_path)), "--out", str(target)))
    assert r.exit_code == 2, r.output
    assert "plan.json" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt.json", "plan.json"]
    assert target.is_dir() and not any(target.iterdir())


def test_the_service_takes_numbers_and_flags_only_as_their_own_json_types(tmp_path):
    from service_support import TestClient, make_app, profile_request, zoo_request

    body = profile_request()
    with TestClient(make_app(tmp_path / "plans.db")) as c:
        as_bool = c.post("/v1/plans", json={**body, "global_batch_size": True})
        as_text = c.post("/v1/plans", json={**body, "options": {"top_k": "2"}})
        flag_as_text = c.post("/v1/plans", json=zoo_request(tie_embeddings="yes"))
        proper = c.post("/v1/plans", json=body)
    assert as_bool.status_code == 422, as_bool.text
    assert "global_batch_size" in as_bool.text
    assert as_text.status_code == 422 and "top_k" in as_text.text
    assert flag_as_text.status_code == 422 and "tie_embeddings" in flag_as_text.text
    assert proper.status_code in (200, 201), proper.text


@pytest.mark.parametrize("source", ["file", "env"])
def test_serve_takes_the_api_key_from_a_file_or_the_environment(tmp_path, monkeypatch, source):
    from service_support import TestClient

    import api.server

    served = []
    monkeypatch.setattr(api.server, "run_server", lambda config: served.append(config.app))  # keep the port
    monkeypatch.delenv("AUTOPAR_API_KEYS", raising=False)
    argv = ["serve", "--db", str(tmp_path / "plans.db")]
    if source == "file":
        key_file = tmp_path / "keys"
        key_file.write_text("# service keys\ns3cret-from-file\n")
        argv += ["--api-key-file", str(key_file)]
        key = "s3cret-from-file"
    else:
        monkeypatch.setenv("AUTOPAR_API_KEYS", "s3cret-from-env")
        key = "s3cret-from-env"
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 0, r.output
    assert key not in " ".join(argv) and "api keys required" in " ".join(r.output.split())
    with TestClient(served[0]) as c:
        missing = c.get("/v1/clusters")
        right = c.get("/v1/clusters", headers={"X-API-Key": key})
    assert missing.status_code == 401 and right.status_code == 200


def test_an_api_key_file_without_a_key_is_a_one_line_error(tmp_path):
    empty = tmp_path / "keys"
    empty.write_text("\n# nothing yet\n")
    r = CliRunner().invoke(app, ["serve", "--db", str(tmp_path / "plans.db"), "--api-key-file", str(empty)])
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "holds no key" in r.stderr
