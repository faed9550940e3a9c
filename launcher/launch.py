"""`gptrain launch`: one config, run locally under torchrun (or planned for SLURM).

    gptrain launch configs/demo-cpu.yaml --backend local --nproc-per-node 2
    gptrain launch configs/gpt2-xl-zero3-multinode.yaml --dry-run

The resolved config is written to `RUN_DIR/launch/config.yaml` and every rank
runs `gptrain train` on it, so what runs is exactly what `--dry-run` shows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from launcher.config import Config, LaunchConfig, dump_yaml
from launcher.jobs import JobRecord, load_job

STOP_TIMEOUT_S = 120  # ranks finish the step and save a checkpoint before this


class LaunchError(Exception):
    """A launch that cannot start; one line for the user."""


def torchrun_command(launch: LaunchConfig, config_file: Path) -> list[str]:
    """The single-node torchrun command that runs `gptrain train` on every rank."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={launch.nproc_per_node}", "-m", "launcher.cli", "train",
        str(config_file),
    ]  # fmt: skip


def sbatch_parameters(launch: LaunchConfig) -> dict[str, Any]:
    """sbatch options for one task per GPU over `launch.nodes` nodes (what submitit sets)."""
    slurm = launch.slurm
    params: dict[str, Any] = {
        "nodes": launch.nodes,
        "ntasks-per-node": launch.nproc_per_node,
        "cpus-per-task": slurm.cpus_per_task,
        "time": slurm.time_min,
        "signal": "USR2@90",  # time to checkpoint before the time limit
        "requeue": True,
    }
    if slurm.gpus_per_node:
        params["gpus-per-node"] = slurm.gpus_per_node
    if slurm.mem_gb is not None:
        params["mem"] = f"{int(slurm.mem_gb)}G"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(slurm, key):
            params[key] = getattr(slurm, key)
    if slurm.exclusive:
        params["exclusive"] = True
    params.update(slurm.sbatch_extra)
    return params


def world_layout(launch: LaunchConfig) -> list[str]:
    """Human-readable rank placement, one line per node."""
    n = launch.nproc_per_node
    return [f"node {i}: ranks {i * n}-{i * n + n - 1}" for i in range(launch.nodes)]


def dry_run_text(cfg: Config) -> str:
    """Everything `launch` would do, without doing it."""
    from training.ds_config import build_deepspeed_config

    layout = cfg.batch_layout()
    launch = cfg.launch
    config_file = Path(cfg.run.dir) / "launch" / "config.yaml"
    lines = ["# resolved config", dump_yaml(cfg).rstrip(), "", "# DeepSpeed config"]
    lines.append(json.dumps(build_deepspeed_config(cfg.deepspeed, cfg.train, layout), indent=2))
    lines += [
        "",
        f"# world: {launch.nodes} node(s) × {launch.nproc_per_node} = {launch.world_size} ranks; "
        f"global batch {layout.global_batch_size} = micro {layout.micro_batch_size} × "
        f"accum {layout.grad_accum_steps} × {layout.data_parallel_size}",
        *(f"#   {line}" for line in world_layout(launch)),
    ]
    if launch.backend == "local":
        lines += ["", "# command", " ".join(torchrun_command(launch, config_file))]
    else:
        params = sbatch_parameters(launch)
        lines += ["", "# sbatch parameters"]
        lines += [
            f"#SBATCH --{k}" if v is True else f"#SBATCH --{k}={v}" for k, v in params.items()
        ]
        lines += [f"# each task: gptrain train {config_file}"]
    return "\n".join(lines)


def launch(cfg: Config, follow: bool = False) -> int:
    """Run the config (local) or submit it (slurm); returns the exit code."""
    if cfg.launch.backend == "slurm":
        from launcher.slurm import submit

        record = submit(cfg)
        print(f"submitted job {record.job_ids[0]}: {record.run_dir} "
              f"({cfg.launch.nodes} node(s) × {cfg.launch.nproc_per_node} ranks)")  # fmt: skip
        print(f"watch it: gptrain status {record.run_dir} | gptrain logs {record.run_dir} --follow")
        if follow:
            from launcher.status import follow_log

            follow_log(Path(record.run_dir) / "logs" / "rank0.log", Path(record.run_dir))
        return 0
    if cfg.launch.nodes != 1:
        raise LaunchError(
            f"launch.nodes: the local backend runs on one node, got {cfg.launch.nodes}; "
            "use --backend slurm for several nodes"
        )
    return run_local(cfg)


def run_local(cfg: Config) -> int:
    """torchrun with `nproc_per_node` ranks; Ctrl-C stops every rank after a checkpoint."""
    run_dir = Path(cfg.run.dir)
    config_file = run_dir / "launch" / "config.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(dump_yaml(cfg))
    command = torchrun_command(cfg.launch, config_file)
    record = JobRecord(
        backend="local", run_dir=str(run_dir), command=command, nodes=1,
        nproc_per_node=cfg.launch.nproc_per_node,
    )  # fmt: skip
    # Own session: a Ctrl-C here is forwarded as SIGTERM so ranks can save first.
    proc = subprocess.Popen(command, start_new_session=True)
    record.pid, record.state = proc.pid, "RUNNING"
    record.save()
    print(f"launched {run_dir} (local, {cfg.launch.nproc_per_node} ranks, pid {proc.pid})")
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        code = _stop(proc)
    final = load_job(run_dir) or record
    if final.state != "CANCELLED":
        final.state = "COMPLETED" if code == 0 else "FAILED"
    final.exit_code, final.end_time = code, time.time()
    final.save()
    return code


def _stop(proc: subprocess.Popen) -> int:
    print("\nstopping: every rank saves a checkpoint first (Ctrl-C again to kill)", flush=True)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=STOP_TIMEOUT_S)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()
