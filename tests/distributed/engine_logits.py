"""Logits of the DeepSpeed engine restored from a run's latest checkpoint (2 ranks).

torchrun --standalone --nproc-per-node 2 tests/distributed/engine_logits.py CONFIG OUT.pt
"""

from __future__ import annotations

import sys

import torch

from launcher.config import load_config, train_job
from training.trainer import build_components


def main(config: str, out: str) -> None:
    cfg = load_config(config)
    run = build_components(train_job(cfg))
    input_ids = torch.arange(32).reshape(2, 16) % run.pre.manifest.vocab_size
    with run.engine.evaluating():
        logits = run.engine.ds(input_ids=input_ids.to(run.engine.ds.device)).logits
    if run.env.is_main:
        torch.save({"input_ids": input_ids, "logits": logits.float().cpu()}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
