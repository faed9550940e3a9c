"""Pure pieces of training: DeepSpeed config generation, lr schedule, budget, checkpoints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from training.checkpoint import store as ckpt
from training.config import DeepSpeedConfig, TrainConfig, resolve_batch
from training.errors import TrainingError
from training.parallel.dist import dist_env
from training.parallel.ds_config import build_deepspeed_config
from training.schedule import lr_at, total_steps_for


def ds_config(stage: int = 2, **kwargs) -> dict:
    train = TrainConfig(micro_batch_size=4, grad_accum_steps=2, grad_clip=0.5)
    return build_deepspeed_config(
        DeepSpeedConfig(zero_stage=stage, **kwargs), train, resolve_batch(None, 4, 2, 3)
    )


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_ds_config_batch_and_stage(stage: int) -> None:
    cfg = ds_config(stage)
    assert cfg["train_batch_size"] == 24
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    gather = cfg["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save")
    assert bool(gather) == (stage == 3)


def test_ds_config_precision_offload_and_extra() -> None:
    extra = {"zero_optimization": {"stage3_prefetch_bucket_size": 123}}
    extra["wall_clock_breakdown"] = True
    cfg = ds_config(3, precision="fp16", offload_optimizer=True, offload_params=True, extra=extra)
    assert cfg["fp16"]["enabled"] and not cfg["bf16"]["enabled"]
    zero = cfg["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_prefetch_bucket_size"] == 123 and zero["stage"] == 3  # merged, kept
    assert cfg["wall_clock_breakdown"] is True
    fp32 = ds_config(1, precision="fp32")
    assert not fp32["bf16"]["enabled"] and not fp32["fp16"]["enabled"]


@pytest.mark.parametrize("key", ["train_batch_size", "gradient_accumulation_steps", "optimizer"])
def test_ds_extra_cannot_set_a_second_batch_size(key: str) -> None:
    with pytest.raises(ValueError, match=f"deepspeed.extra.{key}"):
        ds_config(2, extra={key: 1})


@pytest.mark.parametrize("key", ["gradient_predivide_factor", "prescale_gradients"])
def test_ds_extra_cannot_rescale_gradients(key: str) -> None:
    with pytest.raises(ValueError, match=f"deepspeed.extra.{key}: not supported"):
        ds_config(2, extra={key: 2.0})


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_ds_config_comm_settings_follow_the_device_unless_set(stage: int) -> None:
    train, layout = TrainConfig(micro_batch_size=4), resolve_batch(None, 4, 1, 2)
    gpu = build_deepspeed_config(DeepSpeedConfig(zero_stage=stage), train, layout, cuda=True)
    cpu = build_deepspeed_config(DeepSpeedConfig(zero_stage=stage), train, layout, cuda=False)
    assert gpu["zero_optimization"]["overlap_comm"] is True
    assert cpu["zero_optimization"]["overlap_comm"] is False
    chosen = DeepSpeedConfig(
        zero_stage=stage,
        overlap_comm=False,
        reduce_bucket_size=123,
        allgather_bucket_size=456,
        contiguous_gradients=False,
    )
    zero = build_deepspeed_config(chosen, train, layout, cuda=True)["zero_optimization"]
    assert (zero["overlap_comm"], zero["reduce_bucket_size"]) == (False, 123)
    assert zero["contiguous_gradients"] is False
    assert zero.get("allgather_bucket_size") == (456 if stage < 3 else None)


def test_ds_config_asserts_layout() -> None:
    from training.config import BatchLayout

    with pytest.raises(AssertionError):
        build_deepspeed_config(DeepSpeedConfig(), TrainConfig(), BatchLayout(10, 4, 2, 3))


def test_lr_schedule_warmup_then_cosine_to_min() -> None:
    kw = dict(max_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110, decay="cosine")
    assert lr_at(0, **kw) == pytest.approx(0.1)  # never 0 at the first step
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # halfway through the decay
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_lr_schedule_linear_and_constant() -> None:
    kw = dict(max_lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=100)
    assert lr_at(50, decay="linear", **kw) == pytest.approx(0.5)
    assert lr_at(50, decay="constant", **kw) == 1.0


def test_budget_in_steps_tokens_or_epochs() -> None:
    kw = dict(global_batch_size=8, seq_len=100, samples_per_epoch=1000)
    assert total_steps_for(max_steps=7, max_tokens=None, epochs=None, **kw) == 7
    assert total_steps_for(max_steps=None, max_tokens=8001, epochs=None, **kw) == 11
    assert total_steps_for(max_steps=None, max_tokens=None, epochs=2, **kw) == 250
    with pytest.raises(ValueError, match="max_steps: give a training budget"):
        total_steps_for(max_steps=None, max_tokens=None, epochs=None, **kw)


def test_dist_env_from_torchrun_variables() -> None:
    assert dist_env({}) == dist_env({"RANK": "0", "WORLD_SIZE": "1"})
    env = dist_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.is_main) == (3, 4, 1, False)
    with pytest.raises(ValueError, match="RANK=4"):
        dist_env({"RANK": "4", "WORLD_SIZE": "4"})


def sample_meta(step: int) -> ckpt.CheckpointMeta:
    """The meta of a checkpoint at `step` of a small run (what the trainer writes)."""
    return ckpt.CheckpointMeta(
        state=ckpt.TrainState(step=step, tokens=step * 512),
        loader={"epoch": 0, "consumed": step * 16},
        world_size=2,
        config={"run": {}},
        tokenizer_sha256="ab" * 32,
        model={"model_type": "gpt2", "n_layer": 2},
        hf_config={"model_type": "gpt2"},
        saved_at=1.7e9,
    )


def fake_save(root: Path, step: int, keep_last: int = 2, protect=()) -> Path:
    def write_shards(tmp: Path) -> None:
        (tmp / "shard.bin").write_bytes(b"x" * step)

    tmp = ckpt.begin_save(root, step, rank=0, barrier=lambda: None)
    write_shards(tmp)
    return ckpt.publish_checkpoint(tmp, sample_meta(step), keep_last=keep_last, protect=protect)


def test_checkpoints_are_atomic_pruned_and_resumable(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    assert ckpt.find_resume(root, "auto") is None
    for step in (10, 20, 30):
        fake_save(root, step)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_000020", "step_000030"]
    assert (root / "latest").read_text() == "step_000030"
    # An interrupted save: shards written, no meta.json, never renamed.
    (root / ".tmp_step_000040").mkdir()
    (root / "step_000050").mkdir()  # incomplete (no meta.json) and not pointed at
    assert ckpt.find_resume(root, "auto") == root / "step_000030"
    (root / "latest").write_text("step_000050")  # a pointer to something incomplete
    assert ckpt.find_resume(root, "auto") == root / "step_000030"
    assert ckpt.find_resume(root, "never") is None
    assert ckpt.find_resume(root, str(tmp_path)) == root / "step_000030"  # a run dir
    meta = ckpt.read_meta(root / "step_000030")
    assert meta == dataclasses.replace(sample_meta(30), files={"shard.bin": 30})  # for `verify`
    fake_save(root, 60)
    assert not (root / ".tmp_step_000040").exists()  # stale temp dirs are cleaned


def test_checkpoint_meta_round_trip_and_an_older_meta_json(tmp_path: Path) -> None:
    meta = dataclasses.replace(sample_meta(7), health={"skipped_steps": 1}, files={"a": 3})
    (tmp_path / "meta.json").write_text(meta.to_json())
    assert ckpt.read_meta(tmp_path) == meta
    # A meta.json written before the format field, health counts and file sizes existed.
    old = {
        k: v
        for k, v in json.loads(meta.to_json()).items()
        if k not in ("format", "health", "files")
    }
    old.update(step=7, tokens=7 * 512)  # older metas also held these twice
    (tmp_path / "meta.json").write_text(json.dumps({**old, "an_old_extra": 1}))
    loaded = ckpt.read_meta(tmp_path)
    assert (loaded.step, loaded.loader, loaded.health, loaded.files) == (7, meta.loader, {}, {})
    assert "step" not in json.loads(meta.to_json())  # written once: in `state`
    (tmp_path / "meta.json").write_text(json.dumps({**old, "format": 99}))
    with pytest.raises(TrainingError, match=r"meta.json: checkpoint meta format 99; .* format 1"):
        ckpt.read_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"step": 3}))
    with pytest.raises(TrainingError, match=r"not a gptrain checkpoint meta \(missing \["):
        ckpt.read_meta(tmp_path)


def test_keep_last_never_prunes_the_protected_best(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    fake_save(root, 1, keep_last=1)
    fake_save(root, 2, keep_last=1, protect=("step_000001",))
    fake_save(root, 3, keep_last=1, protect=("step_000001",))
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_000001", "step_000003"]


def test_find_step_and_bad_resume_path(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    fake_save(root, 5)
    assert ckpt.find_step(root, 5).name == "step_000005"
    assert ckpt.find_step(root, None).name == "step_000005"
    with pytest.raises(TrainingError, match=r"no complete checkpoint for step 7 \(have: 5\)"):
        ckpt.find_step(root, 7)
    with pytest.raises(TrainingError, match="train.resume: .* is not a complete checkpoint"):
        ckpt.find_resume(root, str(tmp_path / "nowhere"))


def test_progress_bar_on_a_terminal_and_none_off_it() -> None:
    import io
    import logging

    from rich.console import Console

    from training.observe.progress import ProgressBar

    out = io.StringIO()
    logger = logging.getLogger("gptrain")
    logger.setLevel(logging.INFO)
    bar = ProgressBar(10, 2, enabled=True, console=Console(file=out, force_terminal=True))
    logger.info("a log line")
    bar.update(5, 1.2345, 1000.0)
    bar.close()
    logger.handlers.clear()
    text = out.getvalue()
    assert "train" in text and "5/10" in text and "loss 1.2345" in text and "a log line" in text
    silent = ProgressBar(10, 0, enabled=False)
    silent.update(3, 1.0, 1.0)  # no bar on other ranks: a no-op
    assert silent.progress is None
