"""Logits of the DeepSpeed engine restored from a run's latest checkpoint (2 ranks).

torchrun --standalone --nproc-per-node 2 tests/distributed/engine_logits.py CONFIG OUT.pt
"""

from __future__ import annotations

import os
import sys

import torch

from launcher.config import load_config, to_dict
from training.dist import dist_env, init_distributed
from training.steps import StepRunner, preflight
from training.trainer import TrainJob


def main(config: str, out: str) -> None:
    cfg = load_config(config)
    job = TrainJob(cfg.run, cfg.model, cfg.data, cfg.train, cfg.deepspeed, cfg.tracking,
                   to_dict(cfg))  # fmt: skip
    env = dist_env(os.environ)
    layout = cfg.train.batch_layout(env.world_size)
    pre = preflight(job, layout)
    init_distributed()
    runner = StepRunner.setup(job, env, layout, pre)
    input_ids = torch.arange(32).reshape(2, 16) % pre.manifest.vocab_size
    runner.engine.eval()
    with torch.no_grad():
        logits = runner.engine(input_ids=input_ids.to(runner.engine.device)).logits
    if env.is_main:
        torch.save({"input_ids": input_ids, "logits": logits.float().cpu()}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
