"""Config sections owned by training: run, train, deepspeed, tracking (the model's
section: `training.model_config`), and `TrainJob`, what the trainer receives.

Each dataclass validates itself in `__post_init__` and raises
`ValueError("field: message")`; the loader adds the section path and file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from sharding.config import DataConfig
from training.errors import require
from training.model_config import ModelConfig


@dataclass
class RunConfig:
    """Where a run lives and what makes it reproducible."""

    dir: str = "runs/default"
    name: str | None = None  # defaults to the basename of `dir`
    seed: int = 1234

    def __post_init__(self) -> None:
        require(bool(self.dir), "dir: must not be empty")


@dataclass
class BatchLayout:
    """The resolved batch arithmetic: global = micro × accum × data_parallel."""

    global_batch_size: int
    micro_batch_size: int
    grad_accum_steps: int
    data_parallel_size: int


def resolve_batch(
    global_batch_size: int | None,
    micro_batch_size: int | None,
    grad_accum_steps: int | None,
    data_parallel_size: int,
) -> BatchLayout:
    """Derive the missing batch figure from the other two, or check all three agree.

    Only `micro_batch_size` given means no accumulation. Raises
    `ValueError("key: message")` naming the offending key.
    """
    g, m, a, dp = global_batch_size, micro_batch_size, grad_accum_steps, data_parallel_size
    for key, value in (("global_batch_size", g), ("micro_batch_size", m), ("grad_accum_steps", a)):
        require(value is None or value >= 1, f"{key}: must be >= 1, got {value}")
    if m is not None and g is None and a is None:
        a = 1
    if [g, m, a].count(None) > 1:
        raise ValueError(
            "micro_batch_size: give it (or global_batch_size and grad_accum_steps); "
            "any two of the three batch sizes determine the third"
        )
    if g is None:
        g = m * a * dp
    elif m is None or a is None:
        known_key, known = ("grad_accum_steps", a) if m is None else ("micro_batch_size", m)
        require(
            g % (known * dp) == 0,
            f"global_batch_size: {g} is not divisible by {known_key} {known} × "
            f"data_parallel_size {dp}",
        )
        if m is None:
            m = g // (a * dp)
        else:
            a = g // (m * dp)
    require(
        g == m * a * dp,
        f"global_batch_size: {g} != micro_batch_size {m} × grad_accum_steps {a} × "
        f"data_parallel_size {dp} (= {m * a * dp}); fix one of them or leave one unset",
    )
    return BatchLayout(g, m, a, dp)


@dataclass
class TrainConfig:
    """Optimisation, budget, evaluation and checkpointing of the training loop.

    Give any two of the three batch sizes (or only `micro_batch_size`, meaning no
    accumulation); the third is derived for the actual data-parallel size
    (see `resolve_batch`).
    """

    micro_batch_size: int | None = None
    grad_accum_steps: int | None = None
    global_batch_size: int | None = None
    max_steps: int | None = None
    max_tokens: int | None = None
    epochs: float | None = None
    learning_rate: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_steps: int = 100
    lr_decay: Literal["cosine", "linear", "constant"] = "cosine"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 500
    eval_steps: int = 20
    save_every: int = 1000
    keep_last: int = 3
    # Checkpoint files written in the background: the step loop waits only for a copy of
    # the state in host memory (training/checkpoint/writer.py); false: wait for the write.
    async_save: bool = True
    resume: str = "auto"  # auto | never | overwrite (archive the old run first) | a path
    resume_optimizer: bool = True  # false: a resume restores weights, step and data only
    early_stopping_patience: int | None = None
    # Run health (training/observe/health.py): optimizer steps skipped for a non-finite loss or
    # gradient norm (or a loss over spike_factor × its running mean, if set) are counted;
    # after max_bad_steps in a row the run rolls back to its last checkpoint or stops.
    max_bad_steps: int = 3
    on_bad_steps: Literal["rollback", "stop"] = "rollback"
    spike_factor: float | None = None  # e.g. 3.0; costs one host sync per step
    # MoE: alert when the busiest expert gets more than this share of a layer's tokens
    # (metric expert_load_max; balanced is top_k / experts, collapsed 1.0); null: never.
    expert_load_alert: float | None = 0.9
    # A rank with no progress for hang_timeout_s dumps its stacks and exits to requeue;
    # collectives give up after collective_timeout_s (keep it above hang_timeout_s).
    hang_timeout_s: float = 600.0
    collective_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "grad_accum_steps", "global_batch_size"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"{name}: must be >= 1, got {value}")
        budgets = [n for n in ("max_steps", "max_tokens", "epochs") if getattr(self, n) is not None]
        require(
            len(budgets) <= 1,
            f"{budgets[-1] if budgets else 'max_steps'}: give only one of max_steps, "
            f"max_tokens, epochs (got {', '.join(budgets)})",
        )
        for name in ("max_steps", "max_tokens"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"{name}: must be >= 1, got {value}")
        require(self.epochs is None or self.epochs > 0, f"epochs: must be > 0, got {self.epochs}")
        require(self.learning_rate > 0, f"learning_rate: must be > 0, got {self.learning_rate}")
        require(
            0 <= self.min_lr <= self.learning_rate,
            f"min_lr: must be in [0, learning_rate={self.learning_rate}], got {self.min_lr}",
        )
        require(self.lr_warmup_steps >= 0, "lr_warmup_steps: must be >= 0")
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"betas: must be two numbers in [0, 1), got {self.betas}",
        )
        require(self.weight_decay >= 0, f"weight_decay: must be >= 0, got {self.weight_decay}")
        require(self.grad_clip >= 0, f"grad_clip: must be >= 0 (0 = off), got {self.grad_clip}")
        for name in ("log_every", "eval_every", "eval_steps", "save_every", "keep_last"):
            require(getattr(self, name) >= 1, f"{name}: must be >= 1, got {getattr(self, name)}")
        require(bool(self.resume), "resume: must be auto, never, overwrite or a checkpoint path")
        require(
            self.early_stopping_patience is None or self.early_stopping_patience >= 1,
            "early_stopping_patience: must be >= 1 or null",
        )
        require(self.max_bad_steps >= 1, f"max_bad_steps: must be >= 1, got {self.max_bad_steps}")
        require(
            self.spike_factor is None or self.spike_factor > 1,
            f"spike_factor: must be > 1 or null, got {self.spike_factor}",
        )
        require(
            self.expert_load_alert is None or 0 < self.expert_load_alert <= 1,
            f"expert_load_alert: must be in (0, 1] or null, got {self.expert_load_alert}",
        )
        require(self.hang_timeout_s > 0, f"hang_timeout_s: must be > 0, got {self.hang_timeout_s}")
        require(
            self.collective_timeout_s > self.hang_timeout_s,
            f"collective_timeout_s: {self.collective_timeout_s:g} must exceed hang_timeout_s "
            f"{self.hang_timeout_s:g}, or a hung collective fails before the watchdog fires",
        )

    def batch_layout(self, data_parallel_size: int) -> BatchLayout:
        """The resolved batch sizes for `data_parallel_size` ranks."""
        return resolve_batch(
            self.global_batch_size,
            self.micro_batch_size,
            self.grad_accum_steps,
            data_parallel_size,
        )


@dataclass
class DeepSpeedConfig:
    """ZeRO stage, precision, offload and gradient communication. `extra` is merged
    last into the generated DeepSpeed JSON, for expert keys we do not model."""

    zero_stage: int = 2
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    offload_optimizer: bool = False
    offload_params: bool = False
    # Reduce gradients (stages 1-3) while backward still runs; null: on with CUDA only
    # (it needs a second bucket and a side stream; on CPU/gloo it only costs memory).
    overlap_comm: bool | None = None
    contiguous_gradients: bool = True  # copy gradients into one buffer as they arrive
    reduce_bucket_size: int = 50_000_000  # elements per gradient reduce (stages 1-3)
    allgather_bucket_size: int = 50_000_000  # elements per parameter all-gather (1-2)
    # DeepSpeed-Ulysses: each window split over this many ranks (training/parallel/
    # sequence.py); data-parallel replicas = world size / this. 1: off.
    sequence_parallel_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self.zero_stage in (0, 1, 2, 3), f"zero_stage: must be 0-3, got {self.zero_stage}")
        require(
            self.sequence_parallel_size >= 1,
            f"sequence_parallel_size: must be >= 1, got {self.sequence_parallel_size}",
        )
        for name in ("reduce_bucket_size", "allgather_bucket_size"):
            value = getattr(self, name)
            require(value >= 1, f"{name}: must be >= 1 elements, got {value}")
        require(
            not self.offload_params or self.zero_stage == 3,
            "offload_params: parameter offload needs zero_stage 3",
        )
        require(
            not self.offload_optimizer or self.zero_stage >= 1,
            "offload_optimizer: optimizer offload needs zero_stage >= 1",
        )


@dataclass
class WandbConfig:
    """Weights & Biases: one run per job, continued across requeues."""

    mode: Literal["online", "offline", "disabled"] = "disabled"
    project: str = "gptrain"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    log_every: int = 10

    def __post_init__(self) -> None:
        require(self.log_every >= 1, f"log_every: must be >= 1, got {self.log_every}")


@dataclass
class TensorBoardConfig:
    """TensorBoard event files of rank 0's metrics (`tensorboard --logdir DIR`); a resumed
    run continues the same directory."""

    enabled: bool = False
    dir: str | None = None  # null: RUN_DIR/tensorboard

    def __post_init__(self) -> None:
        require(
            self.dir is None or bool(self.dir.strip()),
            "dir: must not be empty (null: the run dir's tensorboard/)",
        )


@dataclass
class MlflowConfig:
    """MLflow: one run per job, continued across requeues. On when `enabled` or a
    `tracking_uri` is given; no URI: $MLFLOW_TRACKING_URI, else a `file:` store in the run
    dir. Servers and `file:` stores work with mlflow-skinny; `sqlite:` needs `mlflow`."""

    enabled: bool = False
    tracking_uri: str | None = None  # e.g. file:/shared/mlruns, sqlite:///m.db, http://host:5000
    experiment: str = "gptrain"  # created when missing
    run_name: str | None = None  # default: run.name, else the run dir's name

    @property
    def on(self) -> bool:
        """Whether the run is tracked in MLflow."""
        return self.enabled or self.tracking_uri is not None

    def __post_init__(self) -> None:
        require(
            self.tracking_uri is None or bool(self.tracking_uri.strip()),
            "tracking_uri: must not be empty (null: $MLFLOW_TRACKING_URI, else the run dir)",
        )
        require(bool(self.experiment.strip()), "experiment: must not be empty")


@dataclass
class TrackingConfig:
    """Metrics: always `RUN_DIR/metrics.jsonl`; W&B, TensorBoard and MLflow when enabled
    (`training.observe.sinks`, rank 0 only)."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    peak_tflops: float | None = None  # overrides the per-device table for MFU

    def __post_init__(self) -> None:
        require(
            self.peak_tflops is None or self.peak_tflops > 0,
            f"peak_tflops: must be > 0, got {self.peak_tflops}",
        )


@dataclass
class TrainJob:
    """The config sections the trainer receives, plus the resolved tree to record."""

    run: RunConfig
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    deepspeed: DeepSpeedConfig
    tracking: TrackingConfig
    resolved: dict[str, Any] = field(default_factory=dict)
