"""Model families end to end on 2 CPU ranks, in two torchrun invocations
(`train_many.py`): for gpt2, llama, qwen2 and mistral a fresh tiny model trains (loss
drops) under ZeRO-2 and ZeRO-3 with document masking; qwen3, gemma3_text, phi3, olmo2 and
the MoE mixtral and qwen3_moe train fresh under ZeRO-3 with activation checkpointing in
fp32 and export to a plain HF model whose logits equal the engine's (MoE runs log the
router's aux loss and expert load every step; an alert fires over the threshold); and a
tiny pretrained dir (saved here) of gpt2, llama, qwen2, mistral, qwen3 and qwen3_moe
LoRA-tunes under ZeRO-3 with its default targets, is stopped by a signal, resumes,
exports with --merge to a model whose logits are the engine's, generates and evaluates."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import ROOT, run_cli
from tests.distributed.conftest import losses, metrics, tiny_config, torchrun_command
from tests.unit.test_families import tiny

pytestmark = pytest.mark.dist
FAMILIES = ["gpt2", "llama", "qwen2", "mistral"]
ANY = ["qwen3", "gemma3_text", "phi3", "olmo2", "mixtral", "qwen3_moe"]  # ZeRO-3, fp32, export
MOE = ["mixtral", "qwen3_moe"]
LORA = [*FAMILIES, "qwen3", "qwen3_moe"]
STEPS, STOP_AT = 12, 4  # fresh runs' steps; the LoRA runs stop after STOP_AT, resume to 8
EXIT_STOPPED = 76


def _pretrained(root: Path, family: str, data: Path) -> Path:
    """A tiny random model of `family` saved as an HF dir with the shards' tokenizer."""
    from transformers import AutoModelForCausalLM

    from launcher.config import load_config
    from sharding.manifest import load_manifest
    from training.models.build import fresh_hf_config

    manifest = load_manifest(data)
    arch = f"model.config={json.dumps(tiny(family))}"
    model = load_config(None, ["train.micro_batch_size=1", arch]).model
    torch.manual_seed(0)
    config = fresh_hf_config(model, vocab_size=manifest.vocab_size, eos_id=manifest.eos_id)
    out = root / f"{family}-tiny"
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for file in manifest.tokenizer_dir.iterdir():
        shutil.copy(file, out / file.name)
    return out


def _train_many(out: Path, specs: list[str]) -> dict[str, int]:
    cmd = torchrun_command(
        2,
        "-m",
        "tests.distributed.train_many",
        str(out),
        *specs,
    )
    result = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, prepared: Path) -> dict[str, Any]:
    """Run every family's configs: fresh ZeRO-2, fresh ZeRO-3, LoRA stopped; then the LoRA
    runs resumed, with the restored engine's logits. Returns the run dirs and exit codes."""
    root = tmp_path_factory.mktemp("families")
    small = {
        "micro_batch_size": 4,
        "grad_accum_steps": 1,
        "max_steps": STEPS,
        "eval_every": 100,
        "save_every": 100,
        "lr_warmup_steps": 2,
    }
    dirs, first, second = {}, [], []
    for family in FAMILIES:
        for stage in (2, 3):
            name = f"{family}-zero{stage}"
            config = tiny_config(
                root,
                prepared,
                name,
                model={"config": tiny(family)},
                train=small,
                deepspeed={"zero_stage": stage},
            )
            dirs[name] = root / name
            first.append(str(config))
    name = "qwen3_moe-zero2"  # an MoE under ZeRO-2 too (bf16): ranks route differently
    config = tiny_config(root, prepared, name, model={"config": tiny("qwen3_moe")}, train=small)
    dirs[name] = root / name
    first.append(str(config))
    for family in ANY:
        name = f"{family}-any"
        config = tiny_config(
            root,
            prepared,
            name,
            model={"config": tiny(family), "activation_checkpointing": True},
            # mixtral's alert threshold is crossed at once, qwen3_moe's alert is off
            train={**small, "expert_load_alert": 0.05 if family == "mixtral" else None},
            deepspeed={"zero_stage": 3, "precision": "fp32"},
        )
        dirs[name] = root / name
        first.append(f"{config}|logits")
    for family in LORA:
        name = f"{family}-lora"
        lora = {"method": "lora", "r": 8, "alpha": 16, "target_modules": None}
        config = tiny_config(
            root,
            prepared,
            name,
            model={"name_or_path": str(_pretrained(root, family, prepared)), "peft": lora},
            train={**small, "max_steps": 8, "save_every": STOP_AT, "learning_rate": 2e-2},
            deepspeed={"zero_stage": 3},
        )
        dirs[name] = root / name
        first.append(f"{config}|fault=1:{STOP_AT}")
        second.append(f"{config}|logits")
    first.sort(key=lambda spec: "zero3" in spec or "lora" in spec)  # ZeRO-2 runs first
    codes = {**_train_many(root / "first.json", first), **_train_many(root / "second.json", second)}
    return {"dirs": dirs, "codes": codes}


@pytest.mark.parametrize("family", [*FAMILIES, "qwen3_moe"])
def test_fresh_model_trains_under_zero2_and_zero3(runs: dict[str, Any], family: str) -> None:
    for stage in (2, 3):
        name = f"{family}-zero{stage}" if f"{family}-zero{stage}" in runs["dirs"] else None
        if name is None:  # qwen3_moe's ZeRO-3 run is its fp32 "-any" run
            name = f"{family}-any"
        run = runs["dirs"][name]
        curve = losses(run)
        assert sorted(curve) == list(range(1, STEPS + 1)), curve
        first = sum(curve[s] for s in (1, 2, 3)) / 3
        last = sum(curve[s] for s in (STEPS - 2, STEPS - 1, STEPS)) / 3
        assert last < first - 0.5, f"{family} ZeRO-{stage}: {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("family", ANY)
def test_any_family_trains_under_zero3_and_exports_the_engines_logits(
    runs: dict[str, Any], family: str, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    run = runs["dirs"][f"{family}-any"]
    curve = losses(run)
    assert sorted(curve) == list(range(1, STEPS + 1)), curve
    first = sum(curve[s] for s in (1, 2, 3)) / 3
    last = sum(curve[s] for s in (STEPS - 2, STEPS - 1, STEPS)) / 3
    assert last < first - 0.5, f"{family}: {first:.3f} -> {last:.3f}"
    exported = run_cli("export", str(run), "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert model.config.model_type == family
    engine = torch.load(run / "engine_logits.pt")
    with torch.no_grad():
        logits = model(input_ids=engine["input_ids"]).logits
    torch.testing.assert_close(logits, engine["logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", MOE)
def test_moe_runs_log_aux_loss_and_expert_load_and_alert(runs: dict[str, Any], family: str) -> None:
    from training.observe.events import read_events

    run = runs["dirs"][f"{family}-any"]
    train = [r for r in metrics(run) if "loss" in r and "step" in r]
    assert len(train) == STEPS
    for record in train:
        assert 0 < record["aux_loss"] < 10 and 0.5 <= record["expert_load_max"] <= 1.0
    alerts = [e for e in read_events(run) if e["kind"] == "expert_collapse"]
    assert bool(alerts) == (family == "mixtral"), alerts
    if alerts:  # at most one alert per kind in ALERT_INTERVAL_S; the event each time
        assert "busiest expert got" in alerts[0]["message"] and alerts[0]["level"] == "WARN"


@pytest.mark.parametrize("family", LORA)
def test_pretrained_lora_stops_resumes_exports_and_generates(
    runs: dict[str, Any], family: str, tmp_path: Path, prepared: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from training.evaluate.inference import evaluate, generate

    run = runs["dirs"][f"{family}-lora"]
    stopped = [c for spec, c in runs["codes"].items() if f"{family}-lora.yaml|fault" in spec]
    assert stopped == [EXIT_STOPPED]
    assert "resumed from" in (run / "logs" / "rank0.log").read_text()
    curve = losses(run)
    assert sorted(curve) == list(range(1, 9)) and curve[8] < curve[1]

    merged = tmp_path / "merged"
    exported = run_cli("export", str(run), "--out", str(merged), "--merge")
    assert exported.returncode == 0, exported.stderr
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert model.config.model_type == family
    engine = torch.load(run / "engine_logits.pt")
    with torch.no_grad():
        logits = model(input_ids=engine["input_ids"]).logits
    torch.testing.assert_close(logits, engine["logits"], atol=0.1, rtol=0.05)  # engine: bf16

    (text,) = generate(merged, "The cat", max_new_tokens=5)
    assert text.startswith("The cat")
    scores = evaluate(merged, prepared, seq_len=32, batch_size=4, max_batches=2)
    assert scores["tokens"] > 0 and 0 < scores["loss"] < curve[1] + 0.5
