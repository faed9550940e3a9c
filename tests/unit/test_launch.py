"""Launch planning without running anything: dry-run, sbatch parameters, preflight, bad
input, and what a failed launch reports."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from launcher.backends.local import failure_report, torchrun_command
from launcher.config import Config, ConfigError, load_config
from launcher.launch import preflight, world_layout
from sharding.errors import DataError
from tests.conftest import ROOT, run_cli
from training.errors import TrainingError
from training.run.paths import RunDir

XL = ROOT / "configs" / "gpt2-xl-zero3-multinode.yaml"


def test_dry_run_of_the_multinode_config_shows_32_ranks_and_sbatch() -> None:
    result = run_cli("launch", str(XL), "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "# world: 4 node(s) × 8 = 32 ranks" in out
    assert "global batch 512 = micro 4 × accum 4 × 32" in out
    assert "#   node 3: ranks 24-31" in out
    for line in (
        "--nodes=4",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--partition=gpu",
        "--time=1440",
        "--signal=USR2@90",
        "--exclusive",
        "--mem=480GB",
    ):
        assert f"#SBATCH {line}\n" in out  # submitit's own script (tests/unit/test_slurm_params.py)
    assert '"stage": 3' in out  # the generated DeepSpeed config
    assert "zero_stage: 3" in out  # the resolved config


def test_world_layout() -> None:
    cfg = load_config(XL)
    assert world_layout(cfg.launch)[0] == "node 0: ranks 0-7"


def test_local_dry_run_is_the_torchrun_command(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "demo-cpu.yaml", [f"run.dir={tmp_path}/r"])
    command = torchrun_command(cfg.launch, Path("r"))
    assert "--standalone" in command and "--nproc-per-node=2" in command
    assert command[-3:] == ["launcher.cli", "train", str(RunDir("r").launch_config)]
    out = run_cli(
        "launch",
        "configs/demo-cpu.yaml",
        "--dry-run",
        "--nproc-per-node",
        "3",
        "--set",
        f"run.dir={tmp_path}/r",
    ).stdout
    assert "--nproc-per-node=3" in out and "1 node(s) × 3 = 3 ranks" in out
    assert f"{tmp_path}/r" in out  # the dry run is of that run dir ...
    assert not (tmp_path / "r").exists()  # ... and writes nothing there


def test_bad_launches_are_one_line_errors(tmp_path: Path) -> None:
    for args, fragment in (
        (["--nodes", "0"], "launch.nodes: must be >= 1, got 0"),
        (["--nodes", "2"], "launch.nodes: the local backend runs on one node"),
        (["--set", "launch.slurm.env={WANDB_API_KEY: x}"], "pass secrets through the environment"),
    ):
        result = run_cli("launch", "configs/demo-cpu.yaml", *args)
        assert result.returncode == 2
        assert result.stderr.strip().count("\n") == 0 and fragment in result.stderr
    result = run_cli("status", str(tmp_path))
    assert result.returncode == 2 and "no job.json" in result.stderr


def test_slurm_backend_without_sbatch(tmp_path: Path, prepared: Path) -> None:
    import sys

    env = {"PATH": str(Path(sys.executable).parent)}  # python, but no Slurm commands
    result = run_cli(
        "launch",
        "configs/demo-cpu.yaml",
        "--backend",
        "slurm",
        "--set",
        f"run.dir={tmp_path}/r",
        "--set",
        f"data.sources=[{{path: {prepared}}}]",
        env=env,
    )
    assert result.returncode == 2
    assert "sbatch not found" in result.stderr and result.stderr.strip().count("\n") == 0


# --- preflight: what `launch` checks before any rank starts (or sbatch is called) ----------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sharding.prepare import prepare

    root = tmp_path_factory.mktemp("launch-data")
    corpus = root / "corpus.jsonl"
    corpus.write_text(
        "".join(f'{{"text": "the cat {i} sat on the mat {i % 7}."}}\n' for i in range(200))
    )
    prepare(
        [str(corpus)],
        root / "data",
        train_tokenizer_vocab=300,
        val_fraction=0.0,
        workers=1,
        seed=0,
        progress=False,
    )
    return root / "data"


def _cfg(tmp_path: Path, data: Path, *overrides: str) -> Config:
    return load_config(
        ROOT / "configs" / "demo-cpu.yaml",
        [
            f"run.dir={tmp_path}/run",
            f"data.sources=[{{path: {data}}}]",
            "data.seq_len=32",
            *overrides,
        ],
    )


def test_preflight_passes_a_good_config_and_writes_nothing(tmp_path: Path, prepared: Path) -> None:
    preflight(_cfg(tmp_path, prepared))
    assert not (tmp_path / "run").exists()


def test_preflight_names_the_data_source_without_a_manifest(tmp_path: Path, prepared: Path) -> None:
    with pytest.raises(DataError, match=r"^data\.sources\[0\]\.path: .*missing: no manifest"):
        preflight(_cfg(tmp_path, tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    two = f"data.sources=[{{path: {prepared}}}, {{path: {tmp_path / 'empty'}}}]"
    with pytest.raises(DataError, match=r"^data\.sources\[1\]\.path: .*no manifest\.json"):
        preflight(_cfg(tmp_path, prepared, two))


def test_preflight_finds_the_tokenizer_gone(tmp_path: Path, prepared: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    shutil.rmtree(data / "tokenizer")
    with pytest.raises(DataError, match=r"^data\.sources\[0\]\.path: .*tokenizer .* is missing"):
        preflight(_cfg(tmp_path, data))


def test_preflight_finds_a_cut_shard_and_a_seq_len_past_the_data(
    tmp_path: Path, prepared: Path
) -> None:
    """A shard truncated by a full disk is found before any rank starts."""
    import json
    import shutil

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    shard = (
        data
        / json.loads((data / "manifest.json").read_text())["splits"]["train"]["shards"][0]["file"]
    )
    with pytest.raises(DataError, match=r"seq_len 100000 is longer than the data"):
        preflight(_cfg(tmp_path, data, "data.seq_len=100000"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(DataError, match=rf"{shard.name}: \d+ bytes, manifest.json says \d+"):
        preflight(_cfg(tmp_path, data))


def test_preflight_checks_the_pretrained_model_dir(tmp_path: Path, prepared: Path) -> None:
    with pytest.raises(TrainingError, match=r"^model\.name_or_path: .*nope .*no such directory"):
        preflight(_cfg(tmp_path, prepared, f"model.name_or_path={tmp_path / 'nope'}"))
    (tmp_path / "weights").mkdir()
    with pytest.raises(TrainingError, match=r"^model\.name_or_path: .*no config\.json"):
        preflight(_cfg(tmp_path, prepared, f"model.name_or_path={tmp_path / 'weights'}"))


def test_preflight_checks_the_batch_for_the_world_size(tmp_path: Path, prepared: Path) -> None:
    cfg = _cfg(tmp_path, prepared, "train.global_batch_size=32", "train.grad_accum_steps=null")
    preflight(cfg)  # 32 = micro 8 × accum 2 × 2 ranks
    three = dataclasses.replace(cfg, launch=dataclasses.replace(cfg.launch, nproc_per_node=3))
    with pytest.raises(ConfigError, match="train.global_batch_size: 32 is not divisible"):
        preflight(three)


def test_launch_preflight_errors_are_one_line_before_any_write(
    tmp_path: Path, prepared: Path
) -> None:
    run = tmp_path / "run"
    base = ("launch", "configs/demo-cpu.yaml", "--set", f"run.dir={run}")
    result = run_cli(*base, "--set", f"data.sources=[{{path: {tmp_path / 'none'}}}]")
    _one_line(result, "data.sources[0].path", "no manifest.json — run gptrain prepare")
    assert not run.exists()  # refused before the run dir was taken
    binary = tmp_path / "config.yaml"
    binary.write_bytes(bytes(range(256)))
    _one_line(run_cli("launch", str(binary)), str(binary), "not a text file")
    listing = tmp_path / "list.yaml"
    listing.write_text("- run\n- train\n")
    _one_line(run_cli("launch", str(listing)), str(listing), "expected a YAML mapping", "list")


def _one_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[0].startswith("gptrain launch: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_failure_report_one_line_per_distinct_error() -> None:
    run = Path("runs/x")
    nothing_recorded = failure_report(run, [], 1)
    assert nothing_recorded == "runs/x: training failed (exit code 1); see gptrain logs runs/x"
    found = [
        {"rank": 1, "error": "DataError: shard_00000.bin is short", "time": 1.0},
        {"rank": 0, "error": "RuntimeError: connection reset by peer", "time": 2.0},
        {"rank": 2, "error": "RuntimeError: connection reset by peer", "time": 2.5},
        {"rank": 3, "error": "DataError: shard_00000.bin is short", "time": 3.0},
    ]
    assert failure_report(run, found, 1).splitlines() == [
        "runs/x: training failed (ranks 1, 3: DataError: shard_00000.bin is short); "
        "see gptrain logs runs/x --rank 1",
        "  and ranks 0, 2: RuntimeError: connection reset by peer",
    ]


def test_a_launched_ranks_user_error_is_recorded_not_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under `gptrain launch` each rank would print the same line; the launcher shows it once."""
    from launcher.cli import main
    from training.run.failures import failures
    from training.run.rundir import OWNER_ENV

    monkeypatch.setenv(OWNER_ENV, "launch:test")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "configs/demo-cpu.yaml",
            "--set",
            f"run.dir={run}",
            "--set",
            f"data.sources=[{{path: {tmp_path / 'none'}}}]",
        ]
    )
    assert code == 2 and capsys.readouterr().err == ""
    (entry,) = failures(run)
    assert entry["rank"] == 1 and entry["error"].startswith("data.sources[0].path: "), entry
    assert "no manifest.json" in entry["error"]
    assert "Traceback" in (run / "logs" / "rank1.log").read_text()
