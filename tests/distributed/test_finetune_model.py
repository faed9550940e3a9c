"""Fine-tuning a pretrained model on 2 CPU ranks: LoRA under ZeRO-2/3 (only adapters change,
resume, merged export == base + adapter), added tokens (single ids, resized model trains,
export round-trips them), frozen blocks stay bit-identical, and bad options fail early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.distributed.conftest import (
    check,
    losses,
    metrics,
    one_line_error,
    tiny_config,
    torchrun,
    write_corpus,
)
from training.checkpoint.store import latest_checkpoint

pytestmark = pytest.mark.dist
NEW_TOKENS = ["<clause>", "<party>", "indemnification"]


def _lora(**extra: object) -> dict:
    targets = ["c_attn", "c_proj", "c_fc"]
    return {"method": "lora", "r": 8, "alpha": 16, "target_modules": targets, **extra}


def _state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_trains_only_adapters_and_merges(
    tmp_path: Path, prepared: Path, base: Path, stage: int
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from training.checkpoint.consolidate import iter_fp32_weights
    from training.evaluate.inference import export

    config = tiny_config(
        tmp_path,
        prepared,
        model={"name_or_path": str(base), "peft": _lora()},
        train={
            "max_steps": 20,
            "save_every": 10,
            "eval_every": 100,
            "learning_rate": 2e-2,
            "min_lr": 2e-3,
        },
        deepspeed={"zero_stage": stage},
    )
    if stage == 3:  # stopped at step 10 (checkpoint), then resumed
        stopped = torchrun(2, config, env={"GPTRAIN_FAULT_SIGNAL_AT_STEP": "1:10"})
        assert stopped.returncode != 0
    result = torchrun(2, config)
    check(result)
    run = tmp_path / "run"
    curve = losses(run)
    assert sorted(curve) == list(range(1, 21))
    first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (18, 19, 20)) / 3
    assert last < first - 0.3, f"loss did not drop: {first:.3f} -> {last:.3f}"
    if stage == 3:
        assert "resumed from" in result.stdout
        assert abs(curve[11] - curve[10]) < 0.25 * (first - last), "adapters restored"
    counts = next(r for r in metrics(run) if "params_trainable" in r)
    assert 0 < counts["params_trainable"] < counts["params_total"] / 5

    step_dir = latest_checkpoint(run / "checkpoints")
    names = [name for name, _ in iter_fp32_weights(step_dir)]
    assert names and all(".lora_" in n for n in names), "checkpoint = adapters only"

    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    export(run, merged)
    exported = run_cli("export", str(run), "--out", str(adapter), "--adapter")
    assert exported.returncode == 0, exported.stderr
    assert (adapter / "adapter_config.json").is_file() and (adapter / "tokenizer.json").is_file()

    before, after = _state(base), _state(merged)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(
        n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for n in changed
    ), sorted(changed)
    ids = torch.arange(40).reshape(2, 20) % 300
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), adapter
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            plain(ids).logits, with_adapter(ids).logits, atol=1e-4, rtol=1e-4
        )
    if stage == 2:  # generate (and evaluate) load a LoRA run dir as base + adapters
        sample = run_cli("generate", str(run), "--prompt", "The cat", "--max-new-tokens", "5")
        assert sample.returncode == 0 and sample.stdout.startswith("The cat"), sample.stderr


def test_freezing_first_blocks_keeps_them_bit_identical(
    tmp_path: Path, prepared: Path, base: Path
) -> None:
    from training.evaluate.inference import export

    config = tiny_config(
        tmp_path,
        prepared,
        model={"name_or_path": str(base), "freeze": {"embeddings": True, "first_blocks": 1}},
        train={"max_steps": 8, "save_every": 100, "eval_every": 100},
        deepspeed={"zero_stage": 3, "precision": "bf16"},
    )
    result = torchrun(2, config)
    check(result)
    assert "trainable of" in result.stdout
    export(tmp_path / "run", tmp_path / "hf")
    before, after = _state(base), _state(tmp_path / "hf")
    frozen = [
        n
        for n in before
        if n.startswith(("transformer.h.0.", "transformer.wte", "transformer.wpe"))
    ]
    for name in frozen:
        assert torch.equal(before[name], after[name]), name
    trained = [n for n in before if n.startswith("transformer.h.1.") and n.endswith("weight")]
    assert trained and all(not torch.equal(before[n], after[n]) for n in trained)
    counts = next(r for r in metrics(tmp_path / "run") if "params_trainable" in r)
    frozen_numel = sum(before[n].numel() for n in frozen)
    assert counts["params_total"] - counts["params_trainable"] == frozen_numel


def _prepare_with_added_tokens(root: Path, prepared: Path) -> Path:
    """`prepare --tokenizer BASE --add-tokens NEW_TOKENS` of a corpus that uses them."""
    from sharding.manifest import load_manifest
    from sharding.prepare import prepare

    root.mkdir()
    corpus = write_corpus(root / "plain.jsonl", documents=400)
    with open(root / "corpus.jsonl", "w") as f:
        for i, line in enumerate(corpus.read_text().splitlines()):
            text = json.loads(line)["text"]
            f.write(
                json.dumps({"text": f"{NEW_TOKENS[i % 3]} {text} {NEW_TOKENS[(i + 1) % 3]}"}) + "\n"
            )
    out, tokenizer = root / "shards", load_manifest(prepared).tokenizer_dir
    prepare(
        [str(root / "corpus.jsonl")],
        out,
        tokenizer=str(tokenizer),
        add_tokens=NEW_TOKENS,
        val_fraction=0.05,
        workers=1,
        seed=0,
        progress=False,
    )
    return out


def test_added_tokens_resize_train_and_export(tmp_path: Path, prepared: Path, base: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sharding.manifest import load_manifest, read_split
    from training.evaluate.inference import export

    data = _prepare_with_added_tokens(tmp_path / "data", prepared)
    old_vocab, vocab = load_manifest(prepared).vocab_size, load_manifest(data).vocab_size
    assert vocab == old_vocab + len(NEW_TOKENS)
    assert int(read_split(data).max()) >= old_vocab, "the shards use the added ids"
    config = tiny_config(
        tmp_path,
        data,
        model={"name_or_path": str(base), "add_tokens": NEW_TOKENS},
        train={"max_steps": 12, "save_every": 100, "eval_every": 100},
        deepspeed={"zero_stage": 3},
    )
    result = torchrun(2, config)
    check(result)
    assert f"from {old_vocab} to {vocab} tokens" in result.stdout
    curve = losses(tmp_path / "run")
    assert curve[12] < curve[1] - 0.5

    export(tmp_path / "run", tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.vocab_size == len(tokenizer) == vocab
    new_ids = [tokenizer.encode(t) for t in NEW_TOKENS]
    assert all(len(ids) == 1 and ids[0] >= old_vocab for ids in new_ids), new_ids
    text = f"{NEW_TOKENS[0]} The cat sleeps near the old barn. {NEW_TOKENS[2]}"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    rows = model.get_input_embeddings().weight[old_vocab:]
    assert not torch.equal(rows[0], rows[1]), "the new rows (all the mean at first) trained"


def test_bad_finetune_options_fail_before_training(
    tmp_path: Path, prepared: Path, base: Path
) -> None:
    config = tiny_config(
        tmp_path,
        prepared,
        model={"name_or_path": str(base), "peft": _lora()},
        launch={"nproc_per_node": 1},
    )
    train = ("train", str(config))
    one_line_error(
        run_cli(*train, "--set", "model.peft.target_modules=[q_proj]"),
        "model.peft.target_modules: 'q_proj' matches no module of the gpt2 model",
        "c_attn",
    )
    one_line_error(
        run_cli(*train, "--set", "model.add_tokens=[<nope>]"),
        "model.add_tokens: '<nope>' is not a single token",
        "--add-tokens",
    )
    assert not (tmp_path / "run" / "checkpoints").exists()
