"""TensorBoard event files (`tracking.tensorboard`): `tensorboard --logdir RUN_DIR/tensorboard`.

Every attempt of a run writes into the same directory with `purge_step` just after the
step it resumes from: TensorBoard's reader then hides what an interrupted attempt logged
past its checkpoint, so the curve continues with no step twice (a fresh run purges from
step 0: nothing of an earlier run in the directory shows).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from training.config import TensorBoardConfig
from training.observe.sinks import RunInfo, numeric_metrics


class TensorBoardSink:
    """Scalars under the tracker names (`train/loss`, `eval/loss`, …); the resolved config
    and the parameter counts at the attempt's first step; events as text."""

    name = "tensorboard"

    def __init__(self, cfg: TensorBoardConfig, info: RunInfo) -> None:
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(cfg.dir).expanduser() if cfg.dir else info.run_dir.tensorboard
        purge = 0 if info.resume_step is None else info.resume_step + 1
        self.writer = SummaryWriter(str(self.dir), purge_step=purge)
        self.step = info.start_step
        config = yaml.safe_dump(dict(info.config), sort_keys=False)
        indented = "".join(f"    {line}\n" for line in config.splitlines())  # markdown code
        self.writer.add_text("config", indented, self.step)
        self.log(self.step, info.params)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.step = step
        for name, value in numeric_metrics(metrics).items():
            self.writer.add_scalar(name, value, step)
        if "checkpoint_s" in metrics:
            # a resume starts after this checkpoint: what came before it must be on disk
            self.writer.flush()

    def alert(self, kind: str, message: str, level: str) -> None:
        self.writer.add_text(f"events/{kind}", f"**{level}** {message}", self.step)

    def finish(self) -> None:
        self.writer.close()
