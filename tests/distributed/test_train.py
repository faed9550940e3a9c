"""Training on 2 CPU ranks (torchrun, DeepSpeed, gloo): every ZeRO stage trains, resume is
exact, a crash mid-save loses nothing, export matches the engine, accumulation is exact."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_cli
from tests.distributed.conftest import (
    check,
    losses,
    metrics,
    one_line_error,
    tiny_config,
    torchrun,
    torchrun_command,
)
from training.checkpoint.store import latest_checkpoint, read_meta

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_zero_stage_trains(tmp_path: Path, prepared: Path, stage: int) -> None:
    """bf16 + activation checkpointing + grad accum 2 + clipping: the loss drops."""
    config = tiny_config(tmp_path, prepared, deepspeed={"zero_stage": stage, "precision": "bf16"})
    result = torchrun(2, config)
    check(result)
    curve = losses(tmp_path / "run")
    assert sorted(curve) == list(range(1, 31))
    first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (28, 29, 30)) / 3
    assert last < first - 1.5, f"loss did not drop: {first:.3f} -> {last:.3f}"
    records = metrics(tmp_path / "run")
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert all(math.isclose(r["eval_ppl"], math.exp(r["eval_loss"])) for r in evals)
    step = [r for r in records if "loss" in r][-1]
    for key in ("lr", "grad_norm", "tokens_per_s", "samples_per_s", "step_time_s", "memory_gb"):
        assert key in step
    final = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert final is not None and final.name == "step_000030"
    meta = read_meta(final)
    assert meta.tokens == 30 * 16 * 32  # global batch 16 × seq_len 32, no padding
    assert (tmp_path / "run" / "logs" / "rank1.log").is_file()


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path, prepared: Path) -> None:
    """Stop by signal at step 7 (checkpoint saved), resume → the same losses and data."""
    full = tiny_config(tmp_path, prepared, "full", train={"max_steps": 12, "save_every": 100})
    check(torchrun(2, full))
    split = tiny_config(tmp_path, prepared, "split", train={"max_steps": 12, "save_every": 100})
    stopped = torchrun(2, split, env={"GPTRAIN_FAULT_SIGNAL_AT_STEP": "1:7"})
    assert stopped.returncode != 0
    checkpoint = latest_checkpoint(tmp_path / "split" / "checkpoints")
    assert checkpoint is not None and checkpoint.name == "step_000007"
    check(torchrun(2, split))
    a, b = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(b) == list(range(1, 13)), "each step logged exactly once"
    for step in range(1, 13):
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-4), f"step {step}"
    meta_a = read_meta(latest_checkpoint(tmp_path / "full" / "checkpoints"))
    meta_b = read_meta(latest_checkpoint(tmp_path / "split" / "checkpoints"))
    assert meta_a.loader == meta_b.loader

    # The 2-rank checkpoint at step 7 resumes on 1 rank (accumulating 4 micro-batches, so
    # the global batch is the same) with the unseen samples and the optimizer's moments:
    # the losses follow the uninterrupted run (a fresh Adam would be off by ~0.3 at step 9).
    one = tiny_config(tmp_path, prepared, "one", train={"max_steps": 12, "save_every": 100})
    (tmp_path / "one" / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, tmp_path / "one" / "checkpoints" / checkpoint.name)
    result = torchrun(1, one, "launch.nproc_per_node=1", "train.grad_accum_steps=4")
    check(result)
    c = losses(tmp_path / "one")
    assert sorted(c) == list(range(8, 13))
    for step in range(8, 13):  # bf16: 1 and 2 ranks sum gradients in another order
        assert c[step] == pytest.approx(a[step], abs=2e-3), f"step {step}"
    consumed_at_7 = read_meta(checkpoint).loader["consumed"]
    final = read_meta(latest_checkpoint(tmp_path / "one" / "checkpoints"))
    assert final.loader["consumed"] == consumed_at_7 + 5 * 16  # 1 rank × 4 × accum 4
    assert final.world_size == 1


def test_zero3_resumes_on_another_world_size_with_its_optimizer_state(
    tmp_path: Path, prepared: Path
) -> None:
    """A ZeRO-3 fp32 checkpoint of 2 ranks, resumed on 1 rank via DeepSpeed's universal
    checkpoint, continues exactly as the 2-rank run did (weights, moments, step count
    and per-group weight decay all restored)."""
    sections = {
        "train": {"max_steps": 10, "save_every": 7, "eval_every": 100},
        "deepspeed": {"zero_stage": 3, "precision": "fp32"},
    }
    check(torchrun(2, tiny_config(tmp_path, prepared, "two", **sections)))
    checkpoint = tmp_path / "two" / "checkpoints" / "step_000007"
    one = tiny_config(tmp_path, prepared, "one", **sections)
    (tmp_path / "one" / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, tmp_path / "one" / "checkpoints" / checkpoint.name)
    result = torchrun(1, one, "launch.nproc_per_node=1", "train.grad_accum_steps=4")
    check(result)
    assert "weights and optimizer state restored" in result.stdout + result.stderr
    a, b = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert sorted(b) == [8, 9, 10]
    for step in (8, 9, 10):
        assert b[step] == pytest.approx(a[step], rel=1e-5), f"step {step}"
    converted = tmp_path / "one" / "checkpoints" / "step_000007"
    assert (converted / "ds_universal").is_dir()
    assert sorted(p.name for p in converted.iterdir() if p.name.startswith((".", "latest"))) == []

    # train.resume_optimizer=false: the same weights, but Adam starts over.
    fresh = tiny_config(tmp_path, prepared, "fresh", **sections)
    (tmp_path / "fresh" / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, tmp_path / "fresh" / "checkpoints" / checkpoint.name)
    overrides = ("launch.nproc_per_node=1", "train.grad_accum_steps=4")
    check(torchrun(1, fresh, *overrides, "train.resume_optimizer=false"))
    c = losses(tmp_path / "fresh")
    assert c[8] == pytest.approx(a[8], rel=1e-5)
    assert abs(c[9] - a[9]) > 0.01


def test_kill_9_during_save_keeps_the_previous_checkpoint(tmp_path: Path, prepared: Path) -> None:
    config = tiny_config(tmp_path, prepared, train={"max_steps": 12, "save_every": 4})
    crashed = torchrun(2, config, env={"GPTRAIN_FAULT_KILL_IN_SAVE": "1:8"})
    assert crashed.returncode != 0
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text() == "step_000004"
    assert not (root / "step_000008").exists()
    assert latest_checkpoint(root).name == "step_000004"
    result = torchrun(2, config)
    check(result)
    assert "resumed from" in result.stdout and "step_000004" in result.stdout
    assert sorted(losses(tmp_path / "run")) == list(range(1, 13))


@pytest.mark.parametrize("stage", [2, 3])
def test_export_gives_the_engines_logits(tmp_path: Path, prepared: Path, stage: int) -> None:
    config = tiny_config(
        tmp_path, prepared, train={"max_steps": 6}, deepspeed={"zero_stage": stage}
    )
    check(torchrun(2, config))
    out = tmp_path / "hf"
    exported = run_cli("export", str(tmp_path / "run"), "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    engine_out = tmp_path / "engine.pt"
    logits_script = Path(__file__).with_name("engine_logits.py")
    script = torchrun_command(
        2,
        str(logits_script),
        str(config),
        str(engine_out),
    )
    subprocess.run(script, cwd=ROOT, check=True, capture_output=True, timeout=300)
    engine = torch.load(engine_out)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = model(input_ids=engine["input_ids"]).logits.float()
    torch.testing.assert_close(logits, engine["logits"], atol=2e-2, rtol=2e-2)
    fp32 = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits32 = fp32(input_ids=engine["input_ids"]).logits
    torch.testing.assert_close(logits32, engine["logits"], atol=0.1, rtol=0.05)


def test_generate_and_evaluate_from_run_and_export(tmp_path: Path, prepared: Path) -> None:
    config = tiny_config(tmp_path, prepared, train={"max_steps": 30, "eval_every": 100})
    check(torchrun(2, config))
    run, hf = tmp_path / "run", tmp_path / "hf"
    assert run_cli("export", str(run), "--out", str(hf)).returncode == 0
    sample = ("--prompt", "The cat", "--max-new-tokens", "12", "--seed", "3")
    texts = [run_cli("generate", str(path), *sample) for path in (run, hf, hf)]
    for result in texts:
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("The cat")
    assert texts[1].stdout == texts[2].stdout  # seeded
    assert texts[0].stdout == texts[1].stdout  # the run's latest == its export
    two = run_cli("generate", str(hf), *sample, "--num-return-sequences", "2", "--top-k", "5")
    assert two.stdout.count("--- sample") == 2
    scores = [
        json.loads(run_cli("evaluate", str(p), "--data", str(prepared), "--seq-len", "32").stdout)
        for p in (run, hf)
    ]
    assert scores[0]["loss"] == pytest.approx(scores[1]["loss"], rel=1e-5)
    assert scores[0]["perplexity"] == pytest.approx(math.exp(scores[0]["loss"]))
    assert scores[0]["loss"] < 3.5  # trained: well below ln(vocab) ≈ 5.9
    bad = run_cli("generate", str(tmp_path), "--prompt", "x")
    assert bad.returncode == 2 and "neither a run directory" in bad.stderr


def test_early_stopping_keeps_the_best_checkpoint(tmp_path: Path, prepared: Path) -> None:
    """A learning rate that diverges: eval gets worse, training stops, best survives pruning."""
    config = tiny_config(
        tmp_path,
        prepared,
        train={
            "max_steps": 40,
            "learning_rate": 0.5,
            "min_lr": 0.5,
            "lr_warmup_steps": 0,
            "grad_clip": 0.0,
            "eval_every": 2,
            "save_every": 100,
            "keep_last": 1,
            "early_stopping_patience": 2,
        },
        launch={"nproc_per_node": 1},
    )
    result = torchrun(1, config)
    check(result)
    assert "early stopping" in result.stdout
    root = tmp_path / "run" / "checkpoints"
    evals = [r for r in metrics(tmp_path / "run") if "eval_loss" in r]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert evals[-1]["step"] < 40
    assert (root / "best").read_text() == f"step_{best['step']:06d}"
    assert (root / f"step_{best['step']:06d}" / "meta.json").is_file()


def test_fine_tune_from_a_pretrained_directory(tmp_path: Path, prepared: Path) -> None:
    """The real from_pretrained path: an HF dir written here, then fine-tuned."""
    base = tiny_config(tmp_path, prepared, "base", train={"max_steps": 20})
    check(torchrun(2, base))
    hf = tmp_path / "hf"
    assert run_cli("export", str(tmp_path / "base"), "--out", str(hf)).returncode == 0
    tune = tiny_config(
        tmp_path, prepared, "tune", model={"name_or_path": str(hf)}, train={"max_steps": 3}
    )
    check(torchrun(2, tune))
    fresh_start = losses(tmp_path / "base")[1]
    tuned_start = losses(tmp_path / "tune")[1]
    assert tuned_start < fresh_start - 1.0, (fresh_start, tuned_start)


def test_grad_accumulation_is_exact(tmp_path: Path, prepared: Path) -> None:
    """Global batch 8 as 1 rank × accum 4, 2 × 2 and 4 × 1: same losses and grad norms."""
    curves = {}
    for nproc, accum in ((1, 4), (2, 2), (4, 1)):
        name = f"w{nproc}"
        config = tiny_config(
            tmp_path,
            prepared,
            name,
            train={
                "micro_batch_size": 2,
                "grad_accum_steps": accum,
                "max_steps": 3,
                "eval_every": 100,
                "save_every": 100,
            },
            deepspeed={"zero_stage": 2, "precision": "fp32"},
            launch={"nproc_per_node": nproc},
        )
        check(torchrun(nproc, config))
        curves[name] = [r for r in metrics(tmp_path / name) if "loss" in r]
    for name in ("w2", "w4"):
        for ref, other in zip(curves["w1"], curves[name], strict=True):
            assert other["loss"] == pytest.approx(ref["loss"], rel=1e-5), name
            assert other["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), name


def test_bad_inputs_fail_before_training(tmp_path: Path, prepared: Path) -> None:
    from transformers import GPT2Config

    config = tiny_config(tmp_path, prepared, launch={"nproc_per_node": 1})
    train = ("train", str(config))
    one_line_error(
        run_cli(*train, "--set", f"model.name_or_path={tmp_path / 'nope'}"),
        "model.name_or_path",
        "not a local HF model directory",
    )
    small = tmp_path / "small-vocab"
    GPT2Config(vocab_size=100, n_layer=1, n_embd=32, n_head=2).save_pretrained(small)
    vocab = json.loads((prepared / "manifest.json").read_text())["vocab_size"]
    one_line_error(
        run_cli(*train, "--set", f"model.name_or_path={small}"),
        "vocab_size 100",
        f"{vocab} tokens",
    )
    one_line_error(run_cli(*train, "--set", "data.seq_len=128"), "data.seq_len: 128", "64")
    one_line_error(
        run_cli(
            *train,
            "--set",
            "train.global_batch_size=12",
            "--set",
            "train.grad_accum_steps=null",
            env={"WORLD_SIZE": "8", "RANK": "0"},
        ),
        "train.global_batch_size: 12 is not divisible by micro_batch_size 4 × data_parallel_size 8",
    )
    one_line_error(
        run_cli(*train, "--set", f"data.sources=[{{path: {tmp_path}}}]"),
        "data.sources[0].path",
        "no manifest.json",
    )
    check(torchrun(1, config, "train.max_steps=2"))
    one_line_error(run_cli(*train, "--set", "model.config.n_layer=3"), "different model", "n_layer")
    assert read_meta(latest_checkpoint(tmp_path / "run" / "checkpoints")).step == 2
