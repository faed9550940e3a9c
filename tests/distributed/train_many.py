"""Train several configs one after another in ONE torchrun (one process group, one set of
imports): many small runs without paying a torchrun start-up each.

torchrun --standalone --nproc-per-node 2 tests/distributed/train_many.py OUT.json SPEC...

SPEC is `CONFIG`, optionally followed by `|fault=R:S` (rank R gets SIGUSR1 after step S:
GPTRAIN_FAULT_SIGNAL_AT_STEP, the run saves and stops) and `|logits` (then the engine is
rebuilt from the run's latest checkpoint and its logits saved as RUN_DIR/engine_logits.pt,
see `engine_logits.py`). Rank 0 writes {SPEC: exit code} to OUT.json.

A run ends by leaving the process group (`Components.close`); here the group stays until
the last run, since DeepSpeed caches its groups and cannot join a new one in-process.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from launcher.config import load_config, train_job
from sharding import faults
from tests.distributed import engine_logits
from training.trainer import train

FAULT = faults.SIGNAL_AT_STEP


def run(spec: str) -> int:
    config, *options = spec.split("|")
    faults = [o.removeprefix("fault=") for o in options if o.startswith("fault=")]
    os.environ.pop(FAULT, None)
    os.environ.update({FAULT: faults[0]} if faults else {})
    cfg = load_config(config)
    code = train(train_job(cfg))
    os.environ.pop(FAULT, None)
    gc.collect()  # a ZeRO-3 run's HfDeepSpeedConfig must not outlive it
    if "logits" in options:
        engine_logits.main(config, str(Path(cfg.run.dir) / "engine_logits.pt"))
        gc.collect()
    return code


def main(out: str, specs: list[str]) -> None:
    leave = dist.destroy_process_group
    dist.destroy_process_group = lambda *args, **kwargs: None
    try:
        codes = {spec: run(spec) for spec in specs}
    finally:
        dist.destroy_process_group = leave
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps(codes))
    leave()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
