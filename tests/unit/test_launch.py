"""Launch planning without running anything: dry-run, sbatch parameters, bad input."""

from __future__ import annotations

from pathlib import Path

from launcher.config import load_config
from launcher.launch import sbatch_parameters, torchrun_command, world_layout
from tests.conftest import ROOT, run_cli

XL = ROOT / "configs" / "gpt2-xl-zero3-multinode.yaml"


def test_dry_run_of_the_multinode_config_shows_32_ranks_and_sbatch() -> None:
    result = run_cli("launch", str(XL), "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "# world: 4 node(s) × 8 = 32 ranks" in out
    assert "global batch 512 = micro 4 × accum 4 × 32" in out
    assert "#   node 3: ranks 24-31" in out
    for line in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu",
                 "--time=1440", "--signal=USR2@90", "--exclusive", "--mem=480G"):  # fmt: skip
        assert f"#SBATCH {line}" in out
    assert '"stage": 3' in out  # the generated DeepSpeed config
    assert "zero_stage: 3" in out  # the resolved config


def test_sbatch_parameters_and_layout() -> None:
    cfg = load_config(XL, ["launch.slurm.account=proj", "launch.slurm.sbatch_extra={comment: x}"])
    params = sbatch_parameters(cfg.launch)
    assert params["account"] == "proj" and params["comment"] == "x"
    assert "qos" not in params
    assert world_layout(cfg.launch)[0] == "node 0: ranks 0-7"


def test_local_dry_run_is_the_torchrun_command(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "demo-cpu.yaml", [f"run.dir={tmp_path}/r"])
    command = torchrun_command(cfg.launch, Path("c.yaml"))
    assert "--standalone" in command and "--nproc-per-node=2" in command
    assert command[-3:] == ["launcher.cli", "train", "c.yaml"]
    out = run_cli("launch", "configs/demo-cpu.yaml", "--dry-run", "--nproc-per-node", "3").stdout
    assert "--nproc-per-node=3" in out and "1 node(s) × 3 = 3 ranks" in out
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


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


def test_slurm_backend_without_sbatch(tmp_path: Path) -> None:
    import sys

    env = {"PATH": str(Path(sys.executable).parent)}  # python, but no Slurm commands
    result = run_cli("launch", "configs/demo-cpu.yaml", "--backend", "slurm",
                     "--set", f"run.dir={tmp_path}/r", env=env)  # fmt: skip
    assert result.returncode == 2
    assert "sbatch not found" in result.stderr and result.stderr.strip().count("\n") == 0
