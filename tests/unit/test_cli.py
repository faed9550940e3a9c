"""The `gptrain` command line: help, dispatch, lazy imports and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, run_cli

SUBCOMMANDS = [
    "prepare",
    "train",
    "launch",
    "status",
    "logs",
    "cancel",
    "evaluate",
    "generate",
    "export",
    "plot",
    "config",
]


def test_help_lists_every_subcommand() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert f"    {name}" in result.stdout
    config_help = run_cli("config", "--help")
    assert "show" in config_help.stdout and "validate" in config_help.stdout


def test_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys\n"
        "from launcher.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'deepspeed', 'transformers', 'wandb', 'datasets')"
        " if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "HEAVY []" in out


def test_config_validate_all_shipped() -> None:
    configs = sorted(str(p) for p in (ROOT / "configs").glob("*.yaml"))
    result = run_cli("config", "validate", *configs)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": ok") == len(configs)


def test_config_show_prints_resolved_yaml_with_overrides() -> None:
    result = run_cli("config", "show", "configs/demo-cpu.yaml", "--set", "train.max_steps=7")
    assert result.returncode == 0, result.stderr
    assert "max_steps: 7" in result.stdout
    assert "# batch: global 32 = micro 8 × accum 2 × data_parallel 2" in result.stdout


def _one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    _one_line_error(
        run_cli("config", "validate", str(tmp_path / "missing.yaml")), "config file not found"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lerning_rate: 1.0\n")
    _one_line_error(
        run_cli("config", "validate", str(bad)), str(bad), "train.lerning_rate", "learning_rate"
    )
    bad.write_text("train:\n  micro_batch_size: 4\n  max_steps: [\n")
    _one_line_error(run_cli("config", "show", str(bad)), "line 4", "malformed YAML")
    _one_line_error(
        run_cli("config", "show", "configs/demo-cpu.yaml", "--set", "train.max_steps"),
        "expected KEY=VALUE",
    )
    _one_line_error(
        run_cli("config", "show", "configs/demo-cpu.yaml", "--set", "train.global_batch_size=33"),
        "train.global_batch_size: 33 != micro_batch_size 8",
    )
    _one_line_error(
        run_cli("config", "show", "configs/demo-cpu.yaml", "--set", "train.learning_rate=abc"),
        "train.learning_rate: expected float, got 'abc'",
    )


def test_a_config_that_is_not_a_yaml_mapping_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    for content, fragment in (
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not a text file (byte 0 is not UTF-8)"),
        (b"run:\x00\n", "not a text file (it holds NUL bytes)"),
        (b"- a\n- b\n", "expected a YAML mapping of sections"),
        (b"just words\n", "got a str"),
    ):
        config.write_bytes(content)
        _one_line_error(run_cli("config", "validate", str(config)), str(config), fragment)
