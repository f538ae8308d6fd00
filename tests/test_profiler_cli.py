"""`autopar profile`: a table on screen, a profile file on disk, one-line errors for user mistakes."""

from __future__ import annotations

from typer.testing import CliRunner

from api.cli import app
from planner.model_profile import ModelProfile


def test_cli_profile_prints_a_layer_table_and_writes_a_loadable_json(tmp_path) -> None:
    out = tmp_path / "tiny.json"
    result = CliRunner().invoke(app, ["profile", "gpt-tiny", "--batch-size", "2", "--out", str(out), "--no-cache"],
                                terminal_width=120)
    assert result.exit_code == 0, result.output
    assert "blocks.3" in result.output and "total" in result.output
    loaded = ModelProfile.from_json(out)
    assert loaded.num_layers == 6 and loaded.input.batch_size == 2 and loaded.name == "gpt-tiny"


def test_cli_profiles_a_factory_from_a_file(tmp_path) -> None:
    source = tmp_path / "my_model.py"
    source.write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build(batch_size):\n"
        "    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))\n"
        "    return model, (torch.randn(batch_size, 8),)\n"
    )
    out = tmp_path / "p.json"
    result = CliRunner().invoke(app, ["profile", f"{source}:build", "-b", "3", "--out", str(out), "--no-cache"])
    assert result.exit_code == 0, result.output
    assert ModelProfile.from_json(out).input.batch_size == 3


def test_cli_unknown_zoo_name_is_a_user_error_listing_known_models() -> None:
    result = CliRunner().invoke(app, ["profile", "gpt-5", "--no-cache"])
    assert result.exit_code == 2, result.output  # the CLI prints the AutoparError as one line
    assert "gpt2-medium" in result.stderr and "llama-70b" in result.stderr


def test_cli_factory_that_fails_to_import_says_which_part_failed(tmp_path) -> None:
    source = tmp_path / "broken.py"
    source.write_text("import not_a_real_package\n")
    result = CliRunner().invoke(app, ["profile", f"{source}:build", "--no-cache"])
    assert result.exit_code == 2, result.output  # the CLI prints the AutoparError as one line
    assert "importing" in result.stderr and "not_a_real_package" in result.stderr
    result = CliRunner().invoke(app, ["profile", "json:no_such_factory", "--no-cache"])
    assert "has no attribute 'no_such_factory'" in result.stderr
