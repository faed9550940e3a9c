"""The one typed config tree: defaults → YAML file → `--set a.b=c` overrides.

Each component owns its section (a dataclass in its own package); this module
assembles the tree, converts plain YAML data into the dataclasses, and turns
every problem into a one-line `ConfigError` naming the file and dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sharding.config import DataConfig
from training.config import (
    BatchLayout,
    DeepSpeedConfig,
    ModelConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
    TrainJob,
)


class ConfigError(Exception):
    """A user's config is wrong; the message is one line naming file and key."""


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
        return self.train.batch_layout(self.launch.world_size)


# --- conversion from plain data ------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _parse_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Convert `value` to type `tp`, raising ConfigError-ready ValueErrors naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key)
            except ValueError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ValueError(f"{key}: must be one of {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _convert(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _parse_float(value)  # PyYAML reads 1e6 as a string, 1.0e6 as a float
        if number is not None and number.is_integer():
            return int(number)
    elif tp is float:
        number = _parse_float(value)  # PyYAML reads 3e-4 (no dot) as a string
        if number is not None:
            return number
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise TypeError(f"{key}: unsupported config type {tp!r}")
    raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys."""
    where = prefix or "top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(names)})"
            raise ValueError(f"{dotted}: unknown key{hint}")
        kwargs[key] = _convert(hints[key], value, dotted)
    try:
        return cls(**kwargs)
    except ValueError as exc:  # __post_init__ says "field: message"
        raise ValueError(f"{prefix}.{exc}" if prefix else str(exc)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data form of a config (or section), ready for YAML/JSON."""
    return dataclasses.asdict(cfg)


def train_job(cfg: Config) -> TrainJob:
    """The trainer's sections of `cfg`, plus the resolved tree it records."""
    return TrainJob(
        run=cfg.run, model=cfg.model, data=cfg.data, train=cfg.train,
        deepspeed=cfg.deepspeed, tracking=cfg.tracking, resolved=to_dict(cfg),
    )  # fmt: skip


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


def _apply_override(tree: dict[str, Any], path: list[str], value: Any, text: str) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {text!r}: {part} is not a section")
        node = child
    node[path[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file and, for syntax, the line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{p}:{line}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then each `a.b=c` override; validated."""
    tree = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(tree, keys, value, text)
    try:
        cfg = _build(Config, tree, "")
        try:
            cfg.batch_layout()
        except ValueError as exc:
            raise ValueError(f"train.{exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg
