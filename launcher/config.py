"""The one typed config tree: defaults → YAML file → `--set a.b=c` overrides.

Each component owns its section (a dataclass in its own package); this module
assembles the tree, converts plain YAML data into the dataclasses, and turns
every problem into a one-line `ConfigError` naming the file and dotted key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from sharding.config import DataConfig
from training.config import (
    BatchLayout,
    DeepSpeedConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
    TrainJob,
)
from training.errors import first_line
from training.model_config import ModelConfig
from training.parallel.sequence import ParallelDims
from training.typed import from_data


class ConfigError(Exception):
    """A user's config is wrong; the message is one line naming file and key."""


T = TypeVar("T")
_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


@dataclass
class SlurmConfig:
    """sbatch parameters for `launch.backend: slurm` (submitted through submitit)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 60
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float | None = None
    constraint: str | None = None
    exclusive: bool = False
    sbatch_extra: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.time_min < 1:
            raise ValueError(f"time_min: must be >= 1, got {self.time_min}")
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node: must be >= 0, got {self.gpus_per_node}")
        if self.cpus_per_task < 1:
            raise ValueError(f"cpus_per_task: must be >= 1, got {self.cpus_per_task}")
        secret = [k for k in self.env if any(w in k.upper() for w in _SECRET_WORDS)]
        if secret:
            raise ValueError(
                f"env.{secret[0]}: looks like a secret; pass secrets through the environment "
                "of `gptrain launch` (sbatch exports it), never in a config file"
            )


@dataclass
class LaunchConfig:
    """Where the ranks run: `nodes × nproc_per_node` processes, one per GPU."""

    backend: Literal["local", "slurm"] = "local"
    nodes: int = 1
    nproc_per_node: int = 1
    max_requeues: int = 3
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"nodes: must be >= 1, got {self.nodes}")
        if self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node: must be >= 1, got {self.nproc_per_node}")
        if self.max_requeues < 0:
            raise ValueError(f"max_requeues: must be >= 0, got {self.max_requeues}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


@dataclass
class Config:
    """The whole tree. Components receive only their own section."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def batch_layout(self) -> BatchLayout:
        """Batch sizes for the launch layout's world size."""
        dims = ParallelDims(self.launch.world_size, self.deepspeed.sequence_parallel_size)
        return self.train.batch_layout(dims.dp_size)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data form of a config (or section), ready for YAML/JSON."""
    return dataclasses.asdict(cfg)


def train_job(cfg: Config) -> TrainJob:
    """The trainer's sections of `cfg`, plus the resolved tree it records."""
    return TrainJob(
        run=cfg.run,
        model=cfg.model,
        data=cfg.data,
        train=cfg.train,
        deepspeed=cfg.deepspeed,
        tracking=cfg.tracking,
        resolved=to_dict(cfg),
    )


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


# --- loading -------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` → (["a", "b"], c) with c parsed as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(
            f"--set {text!r}: expected KEY=VALUE, e.g. --set train.learning_rate=1e-4"
        )
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key must be dotted names like train.max_steps")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(
    tree: dict[str, Any], overrides: Sequence[str], only: str | None = None
) -> None:
    """Apply each `a.b=c` to the plain-data `tree` in place; `only`: the one section that
    may be set (e.g. "launch" for `gptrain prepare`)."""
    for text in overrides:
        path, value = parse_override(text)
        if only is not None and path[0] != only:
            raise ConfigError(f"--set {text}: this command takes {only}.* settings only")
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value


def build_section(cls: type[T], data: Any, key: str, source: str) -> T:
    """Config dataclass `cls` (the section at dotted `key`) from plain data; a ConfigError
    naming `source` (the file, or `--set`) and the dotted key when it is wrong."""
    try:
        return from_data(cls, data, key)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file and, for syntax, the line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the config file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{p}: not a text file (byte {exc.start} is not UTF-8); a config is a YAML mapping"
        ) from None
    if "\x00" in text:
        raise ConfigError(f"{p}: not a text file (it holds NUL bytes); a config is a YAML mapping")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}: line {mark.line + 1}" if mark is not None else str(p)
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p}: expected a YAML mapping of sections (run:, model:, data:, ...) at the top "
            f"level, got a {type(data).__name__}"
        )
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file, then each `a.b=c` override; validated."""
    tree = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    apply_overrides(tree, overrides)
    cfg = build_section(Config, tree, "", source)
    batch_layout(cfg, source)
    return cfg


def batch_layout(cfg: Config, source: str = "config") -> BatchLayout:
    """`cfg.batch_layout()`, its arithmetic error a ConfigError naming `source` and the key."""
    try:
        return cfg.batch_layout()
    except ValueError as exc:  # ParallelDims names its key; the batch arithmetic does not
        key = "" if str(exc).startswith("deepspeed.") else "train."
        raise ConfigError(f"{source}: {key}{exc}") from None
