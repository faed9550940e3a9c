"""`gptrain launch`: one config, run locally under torchrun (or planned for SLURM).

    gptrain launch configs/demo-cpu.yaml --backend local --nproc-per-node 2
    gptrain launch configs/gpt2-xl-zero3-multinode.yaml --dry-run

The resolved config is written to `RUN_DIR/launch/config.yaml` and every rank
runs `gptrain train` on it, so what runs is exactly what `--dry-run` shows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from launcher.config import Config, LaunchConfig, batch_layout, dump_yaml, train_job
from launcher.errors import LaunchError
from launcher.jobs import JobRecord, load_job
from launcher.ranks import EXIT_REQUEUE, EXIT_STOPPED
from launcher.slurm import sbatch_script, submit
from sharding.atomic import atomic_write
from training.run import failures
from training.run.paths import JobState, RunDir

STOP_TIMEOUT_S = 120  # ranks finish the step and save a checkpoint before this


def torchrun_command(launch: LaunchConfig, config_file: Path) -> list[str]:
    """The single-node torchrun command that runs `gptrain train` on every rank (through
    `launcher.ranks`: torchrun, quiet, ending with the ranks' stop or requeue code)."""
    run_dir = config_file.parent.parent  # RUN_DIR/launch/config.yaml
    return [
        sys.executable,
        "-m",
        "launcher.ranks",
        "--run-dir",
        str(run_dir),
        "--standalone",
        f"--nproc-per-node={launch.nproc_per_node}",
        "-m",
        "launcher.cli",
        "train",
        str(config_file),
    ]


def world_layout(launch: LaunchConfig) -> list[str]:
    """Human-readable rank placement, one line per node."""
    n = launch.nproc_per_node
    return [f"node {i}: ranks {i * n}-{i * n + n - 1}" for i in range(launch.nodes)]


def dry_run_text(cfg: Config) -> str:
    """Everything `launch` would do, without doing it."""
    from training.parallel.ds_config import build_deepspeed_config

    layout = cfg.batch_layout()
    launch = cfg.launch
    config_file = RunDir(cfg.run.dir).launch_config
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
        lines += ["", "# sbatch script (as submitit will submit it)", sbatch_script(cfg).rstrip()]
        lines += [
            f"# each task: launcher.slurm.SlurmTrainTask, the trainer on {config_file.resolve()}"
        ]
    return "\n".join(lines)


def preflight(cfg: Config) -> None:
    """What a launch checks here before any rank starts (or sbatch is called); each problem
    one line naming the key: the batch arithmetic for this world size, every data source's
    manifest, tokenizer and shard sizes (`sharding.loader.open_sources`, as the loader
    does), the pretrained model dir, and that model and data agree.
    Each check is the function its package owns, the one the ranks call too."""
    from sharding.loader import open_sources
    from training.models.build import check_tokenizer, load_hf_config, pretrained_config_file

    batch_layout(cfg)
    # manifests, tokenizers, shard sizes, seq_len vs the data; hashing (data.verify): ranks
    manifests, _ = open_sources(dataclasses.replace(cfg.data, verify=False))
    pretrained_config_file(cfg.model)  # before transformers is imported for the rest
    first = manifests[0]
    load_hf_config(
        cfg.model, vocab_size=first.vocab_size, eos_id=first.eos_id, seq_len=cfg.data.seq_len
    )
    check_tokenizer(cfg.model, first.tokenizer_dir)


def launch(cfg: Config, follow: bool = False) -> int:
    """Check the inputs (`preflight`), then run the config (local) or submit it (slurm);
    returns the exit code."""
    if cfg.launch.backend == "local" and cfg.launch.nodes != 1:
        raise LaunchError(
            f"launch.nodes: the local backend runs on one node, got {cfg.launch.nodes}; "
            "use --backend slurm for several nodes"
        )
    preflight(cfg)
    if cfg.launch.backend == "slurm":
        record = submit(cfg)
        print(
            f"submitted job {record.job_ids[0]}: {record.run_dir} "
            f"({cfg.launch.nodes} node(s) × {cfg.launch.nproc_per_node} ranks)"
        )
        print(f"watch it: gptrain status {record.run_dir} | gptrain logs {record.run_dir} --follow")
        if follow:
            from launcher.status import follow_log

            follow_log(RunDir(record.run_dir).rank_log(0), Path(record.run_dir))
        return 0
    return run_local(cfg)


def run_local(cfg: Config) -> int:
    """torchrun with `nproc_per_node` ranks. The launcher owns the run dir while it runs
    (`training.run.rundir`); Ctrl-C or SIGTERM stops every rank after a checkpoint (exit 76)."""
    from training.run import rundir

    run_dir = Path(cfg.run.dir)
    token = f"launch:{socket.gethostname()}:{os.getpid()}"
    rundir.acquire(run_dir, token)  # before anything is written: a live run is refused
    previous = os.environ.get(rundir.OWNER_ENV)
    os.environ[rundir.OWNER_ENV] = token  # the ranks' checks below and in torchrun: ours
    try:
        _rank_preflight(cfg)  # the ranks' own checks (run dir, resume), before any write
        cfg = _fresh_run_dir(cfg, run_dir)
        failures.clear(run_dir)
        return _run_torchrun(cfg, run_dir, token)
    finally:
        rundir.release(run_dir, token)
        if previous is None:
            os.environ.pop(rundir.OWNER_ENV, None)


def _rank_preflight(cfg: Config) -> None:
    from training.checkpoint.resume import preflight as rank_preflight

    rank_preflight(train_job(cfg), cfg.batch_layout())


def _fresh_run_dir(cfg: Config, run_dir: Path) -> Config:
    """`never` into a used run dir was refused (preflight); `overwrite` archives the old
    run. Either way the ranks then run with `auto`, so a restart resumes this run."""
    resume = cfg.train.resume
    if resume not in ("never", "overwrite"):
        return cfg
    if resume == "overwrite":
        from training.run import rundir

        moved = rundir.archive(run_dir)
        if moved is not None:
            print(f"moved the old run in {run_dir} to {moved}")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume="auto"))


def _run_torchrun(cfg: Config, run_dir: Path, token: str) -> int:
    from training.run import rundir

    config_file = RunDir(run_dir).launch_config
    config_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(config_file, dump_yaml(cfg))
    command = torchrun_command(cfg.launch, config_file)
    record = JobRecord(
        backend="local",
        run_dir=str(run_dir),
        command=command,
        nodes=1,
        nproc_per_node=cfg.launch.nproc_per_node,
        group_leader=False,
    )
    # Own session, so a terminal's Ctrl-C reaches only this process; it is relayed (as
    # SIGTERM) through launcher.ranks, which stops the ranks after a checkpoint.
    proc = subprocess.Popen(
        command, start_new_session=True, env={**os.environ, rundir.OWNER_ENV: token}
    )
    record.pid, record.state = proc.pid, JobState.RUNNING
    record.save()
    print(f"launched {run_dir} (local, {cfg.launch.nproc_per_node} ranks, pid {proc.pid})")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        code = _stop(proc)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code == EXIT_REQUEUE and _record_hangs(run_dir, record.submit_time):
        code = 1  # the watchdog's requeue code, but locally nobody requeues: a failure
    final = load_job(run_dir) or record
    if final.state != JobState.CANCELLED:
        final.state = _final_state(code)
    final.exit_code, final.end_time = code, time.time()
    final.save()
    if code not in (0, EXIT_REQUEUE, EXIT_STOPPED):
        raise LaunchError(
            failure_report(run_dir, failures.failures(run_dir, record.submit_time), code)
        )
    if code in (EXIT_REQUEUE, EXIT_STOPPED):
        print(f"stopped {run_dir} after a checkpoint; launch it again to resume")
    return code


def _record_hangs(run_dir: Path, since: float) -> bool:
    """Record each rank's watchdog hang (`events.jsonl`) since `since` as its failure;
    whether there was one."""
    from training.observe.events import read_events

    hangs = [e for e in read_events(run_dir) if e["kind"] == "hang" and e["time"] >= since]
    for event in hangs:
        line = event["message"].split("; stacks")[0]  # the stacks are in the rank's log
        failures.write_failure(run_dir, event["rank"], line, event["time"])
    return bool(hangs)


def failure_report(run_dir: Path, found: list[dict[str, Any]], code: int) -> str:
    """What a failed launch tells the user, from the ranks' recorded failures (first in
    time first): the first error, its ranks and where its log is, then one line for each
    further distinct error (mostly peers that lost the failed rank)."""
    if not found:
        return f"{run_dir}: training failed (exit code {code}); see gptrain logs {run_dir}"
    ranks_of: dict[str, list[int]] = {}
    for entry in found:
        ranks_of.setdefault(entry["error"], []).append(entry["rank"])
    lines: list[str] = []
    for error, ranks in ranks_of.items():
        listed = ", ".join(map(str, sorted(ranks)))
        who = f"rank {listed}" if len(ranks) == 1 else f"ranks {listed}"
        if not lines:
            lines.append(
                f"{run_dir}: training failed ({who}: {error}); "
                f"see gptrain logs {run_dir} --rank {ranks[0]}"
            )
        else:
            lines.append(f"  and {who}: {error}")
    return "\n".join(lines)


def _final_state(code: int) -> str:
    return {
        0: JobState.COMPLETED,
        EXIT_STOPPED: JobState.STOPPED,
        EXIT_REQUEUE: JobState.PREEMPTED,
    }.get(code, JobState.FAILED)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _stop(proc: subprocess.Popen) -> int:
    print("\nstopping: every rank saves a checkpoint first (Ctrl-C again to kill)", flush=True)
    proc.send_signal(signal.SIGTERM)  # launcher.ranks relays it to the ranks
    try:
        return proc.wait(timeout=STOP_TIMEOUT_S)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()
