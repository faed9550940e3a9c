"""Config sections owned by training: run, model, train, deepspeed, tracking.

Each dataclass validates itself in `__post_init__` and raises
`ValueError("field: message")`; the loader adds the section path and file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class RunConfig:
    """Where a run lives and what makes it reproducible."""

    dir: str = "runs/default"
    name: str | None = None  # defaults to the basename of `dir`
    seed: int = 1234

    def __post_init__(self) -> None:
        _require(bool(self.dir), "dir: must not be empty")


@dataclass
class ArchConfig:
    """Sizes of a fresh GPT-2-style model (used when `model.name_or_path` is unset)."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_positions: int = 1024

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "n_positions"):
            _require(getattr(self, name) >= 1, f"{name}: must be >= 1, got {getattr(self, name)}")
        _require(
            self.n_embd % self.n_head == 0,
            f"n_embd: {self.n_embd} is not divisible by n_head={self.n_head}",
        )


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning: LoRA adapters on the pretrained base's layers.

    `target_modules: null` picks a per-architecture default (see `training.finetune`).
    """

    method: Literal["none", "lora"] = "none"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        _require(self.r >= 1, f"r: must be >= 1, got {self.r}")
        _require(self.alpha > 0, f"alpha: must be > 0, got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, f"dropout: must be in [0, 1), got {self.dropout}")
        _require(
            self.target_modules is None or (bool(self.target_modules) and all(self.target_modules)),
            "target_modules: must be a non-empty list of module names, or null for the default",
        )


@dataclass
class FreezeConfig:
    """Parameters kept fixed during training: embeddings, the first blocks, name globs."""

    embeddings: bool = False  # token and position embeddings (and a tied LM head)
    first_blocks: int = 0  # the first K decoder blocks
    patterns: list[str] = field(default_factory=list)  # fnmatch globs on parameter names

    def __post_init__(self) -> None:
        _require(self.first_blocks >= 0, f"first_blocks: must be >= 0, got {self.first_blocks}")
        _require(all(self.patterns), "patterns: must not contain empty patterns")


@dataclass
class ModelConfig:
    """The causal LM: a local pretrained HF directory or fresh GPT-2 sizes, and how much
    of it trains (`peft`, `freeze`); `add_tokens` extends its vocabulary."""

    name_or_path: str | None = None
    config: ArchConfig = field(default_factory=ArchConfig)
    dropout: float = 0.0
    activation_checkpointing: bool = False
    peft: PeftConfig = field(default_factory=PeftConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    add_tokens: list[str] | str | None = None  # tokens, or a file with one token per line

    def __post_init__(self) -> None:
        _require(0.0 <= self.dropout < 1.0, f"dropout: must be in [0, 1), got {self.dropout}")
        _require(
            self.peft.method == "none" or bool(self.name_or_path),
            f"peft.method: {self.peft.method} adapts a pretrained model; set model.name_or_path",
        )
        if isinstance(self.add_tokens, list):
            _require(
                bool(self.add_tokens) and all(self.add_tokens),
                "add_tokens: must be a non-empty list of tokens, a file path, or null",
            )
            dupes = sorted({t for t in self.add_tokens if self.add_tokens.count(t) > 1})
            _require(not dupes, f"add_tokens: {dupes[0]!r} is listed twice" if dupes else "")
        else:
            _require(self.add_tokens != "", "add_tokens: must be a list, a file path or null")


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
        _require(value is None or value >= 1, f"{key}: must be >= 1, got {value}")
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
        _require(
            g % (known * dp) == 0,
            f"global_batch_size: {g} is not divisible by {known_key} {known} × "
            f"data_parallel_size {dp}",
        )
        if m is None:
            m = g // (a * dp)
        else:
            a = g // (m * dp)
    _require(
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
    resume: str = "auto"  # auto | never | a checkpoint path
    resume_optimizer: bool = True  # false: a resume restores weights, step and data only
    early_stopping_patience: int | None = None

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "grad_accum_steps", "global_batch_size"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"{name}: must be >= 1, got {value}")
        budgets = [n for n in ("max_steps", "max_tokens", "epochs") if getattr(self, n) is not None]
        _require(
            len(budgets) <= 1,
            f"{budgets[-1] if budgets else 'max_steps'}: give only one of max_steps, "
            f"max_tokens, epochs (got {', '.join(budgets)})",
        )
        for name in ("max_steps", "max_tokens"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"{name}: must be >= 1, got {value}")
        _require(self.epochs is None or self.epochs > 0, f"epochs: must be > 0, got {self.epochs}")
        _require(self.learning_rate > 0, f"learning_rate: must be > 0, got {self.learning_rate}")
        _require(
            0 <= self.min_lr <= self.learning_rate,
            f"min_lr: must be in [0, learning_rate={self.learning_rate}], got {self.min_lr}",
        )
        _require(self.lr_warmup_steps >= 0, "lr_warmup_steps: must be >= 0")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"betas: must be two numbers in [0, 1), got {self.betas}",
        )
        _require(self.weight_decay >= 0, f"weight_decay: must be >= 0, got {self.weight_decay}")
        _require(self.grad_clip >= 0, f"grad_clip: must be >= 0 (0 = off), got {self.grad_clip}")
        for name in ("log_every", "eval_every", "eval_steps", "save_every", "keep_last"):
            _require(getattr(self, name) >= 1, f"{name}: must be >= 1, got {getattr(self, name)}")
        _require(bool(self.resume), "resume: must be auto, never or a checkpoint path")
        _require(
            self.early_stopping_patience is None or self.early_stopping_patience >= 1,
            "early_stopping_patience: must be >= 1 or null",
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
    """ZeRO stage, precision and offload. `extra` is merged last into the
    generated DeepSpeed JSON, for expert keys we do not model."""

    zero_stage: int = 2
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    offload_optimizer: bool = False
    offload_params: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.zero_stage in (0, 1, 2, 3), f"zero_stage: must be 0-3, got {self.zero_stage}")
        _require(
            not self.offload_params or self.zero_stage == 3,
            "offload_params: parameter offload needs zero_stage 3",
        )
        _require(
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
        _require(self.log_every >= 1, f"log_every: must be >= 1, got {self.log_every}")


@dataclass
class TrackingConfig:
    """Metrics: always `RUN_DIR/metrics.jsonl`, optionally W&B."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    peak_tflops: float | None = None  # overrides the per-device table for MFU

    def __post_init__(self) -> None:
        _require(
            self.peak_tflops is None or self.peak_tflops > 0,
            f"peak_tflops: must be > 0, got {self.peak_tflops}",
        )
