"""The config tree: defaults → YAML → --set, and one-line errors naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.config import Config, ConfigError, dump_yaml, load_config, parse_override
from training.config import resolve_batch

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    layout = cfg.batch_layout()
    assert layout.global_batch_size == (
        layout.micro_batch_size * layout.grad_accum_steps * cfg.launch.world_size
    )


def test_shipped_configs_exist() -> None:
    assert {p.name for p in SHIPPED} >= {
        "demo-cpu.yaml",
        "gpt2-124m.yaml",
        "gpt2-xl-zero3-multinode.yaml",
    }


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "train: {micro_batch_size: 4, max_steps: 10}\n")
    cfg = load_config(
        path,
        ["train.max_steps=20", "deepspeed.extra={wall_clock_breakdown: true}", "run.dir=runs/x"],
    )
    assert cfg.train.max_steps == 20
    assert cfg.train.micro_batch_size == 4
    assert cfg.deepspeed.extra == {"wall_clock_breakdown": True}
    assert cfg.run.dir == "runs/x"
    assert cfg.deepspeed.zero_stage == 2  # default kept


def test_types_are_converted(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "train: {micro_batch_size: 2, learning_rate: 3e-4, max_tokens: 1e6}\n"
        "data: {sources: [{path: a}, {path: b, weight: 2}]}\n",
    )
    cfg = load_config(path)
    assert cfg.train.learning_rate == pytest.approx(3e-4)  # "3e-4" is a str to PyYAML
    assert cfg.train.max_tokens == 1_000_000 and isinstance(cfg.train.max_tokens, int)
    assert [s.path for s in cfg.data.sources] == ["a", "b"]
    assert cfg.data.sources[1].weight == 2.0


def test_multinode_config_resumes_on_fewer_nodes_with_the_same_global_batch() -> None:
    cfg = load_config(ROOT / "configs" / "gpt2-xl-zero3-multinode.yaml")
    for nodes, accum in ((4, 4), (2, 8), (1, 16)):
        layout = cfg.train.batch_layout(nodes * cfg.launch.nproc_per_node)
        assert (layout.global_batch_size, layout.grad_accum_steps) == (512, accum)


def test_resolved_yaml_round_trips(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "gpt2-xl-zero3-multinode.yaml")
    again = load_config(write(tmp_path, dump_yaml(cfg)))
    assert again == cfg
    assert isinstance(again, Config)


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        (
            "train: {lerning_rate: 1.0e-4}\n",
            [],
            "train.lerning_rate: unknown key (did you mean 'learning_rate'?)",
        ),
        ("train: {learning_rate: abc}\n", [], "train.learning_rate: expected float, got 'abc'"),
        ("train: {lr: abc}\n", [], "train.lr: unknown key"),
        ("train: {micro_batch_size: -2}\n", [], "train.micro_batch_size: must be >= 1, got -2"),
        (
            "train: {micro_batch_size: 4, grad_accum_steps: 2, global_batch_size: 10}\n",
            [],
            "train.global_batch_size: 10 != micro_batch_size 4 × grad_accum_steps 2",
        ),
        (
            "train: {micro_batch_size: 4}\n",
            ["deepspeed.zero_stage=5"],
            "deepspeed.zero_stage: must be 0-3",
        ),
        ("train: {micro_batch_size: 4}\n", ["launch.nodes=0"], "launch.nodes: must be >= 1, got 0"),
        (
            "train: {micro_batch_size: 4}\n",
            ["deepspeed.precision=fp8"],
            "deepspeed.precision: must be one of",
        ),
        (
            "model: {config: {n_layer: 0, n_head: 3}}\n",
            [],
            "model.config.n_layer: must be >= 1, got 0",
        ),
        ("data: {sources: [{path: a, weight: -1}]}\n", [], "data.sources[0].weight: must be > 0"),
        ("train: [1, 2]\n", [], "train: expected a mapping"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path: Path, text, overrides, expected) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "run:\n  dir: x\ntrain:\n  max_steps: [1, 2\n  lr: 3\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: line 5: malformed YAML"):
        load_config(path)


@pytest.mark.parametrize("bad", ["train.max_steps", "=3", "train..x=1"])
def test_set_needs_key_equals_value(bad: str) -> None:
    with pytest.raises(ConfigError, match="--set"):
        parse_override(bad)


def test_override_into_scalar_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "train: {micro_batch_size: 4}\n")
    with pytest.raises(ConfigError, match="train.micro_batch_size.x"):
        load_config(path, ["train.micro_batch_size.x=1"])


@pytest.mark.parametrize(
    "given, dp, expected",
    [
        ((None, 4, 2), 2, (16, 4, 2)),
        ((32, None, 2), 2, (32, 8, 2)),
        ((32, 4, None), 2, (32, 4, 4)),
        ((32, 4, 4), 2, (32, 4, 4)),
        ((None, 4, None), 3, (12, 4, 1)),
        ((512, 4, 4), 32, (512, 4, 4)),
    ],
)
def test_resolve_batch_derives_the_third(given, dp, expected) -> None:
    layout = resolve_batch(*given, data_parallel_size=dp)
    assert (layout.global_batch_size, layout.micro_batch_size, layout.grad_accum_steps) == expected
    assert layout.data_parallel_size == dp


@pytest.mark.parametrize(
    "given, dp, key",
    [
        ((30, 4, None), 2, "global_batch_size: 30 is not divisible by micro_batch_size 4"),
        ((30, None, 4), 2, "global_batch_size: 30 is not divisible by grad_accum_steps 4"),
        ((32, 4, 2), 2, "global_batch_size: 32 != micro_batch_size 4"),
        ((32, None, None), 2, "micro_batch_size: give it"),
        ((None, 0, None), 2, "micro_batch_size: must be >= 1"),
    ],
)
def test_resolve_batch_errors(given, dp, key) -> None:
    with pytest.raises(ValueError, match=key):
        resolve_batch(*given, data_parallel_size=dp)
