"""Every shipped config trains a few steps on 2 CPU ranks without a W&B key (tiny
overrides), and `evaluate` checks the tokenizer and counts each sample once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from tests.distributed.conftest import check, one_line_error, tiny_config, torchrun, write_corpus
from training.checkpoint.store import latest_checkpoint

pytestmark = pytest.mark.dist
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY_ARCH = {  # the shipped family, tiny
    "gpt2": "{n_layer: 1, n_head: 2, n_embd: 32, n_positions: 64}",
    "llama": "{type: llama, num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2, "
    "num_key_value_heads: 1, intermediate_size: 64, max_position_embeddings: 64}",
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, prepared: Path) -> Path:
    """A tiny random GPT-2 dir with the shards' tokenizer, for the configs that fine-tune."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sharding.manifest import load_manifest

    manifest = load_manifest(prepared)
    config = GPT2Config(
        vocab_size=manifest.vocab_size,
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=manifest.eos_id,
        eos_token_id=manifest.eos_id,
    )
    out = tmp_path_factory.mktemp("base") / "gpt2-tiny"
    GPT2LMHeadModel(config).save_pretrained(out)
    for file in manifest.tokenizer_dir.iterdir():
        shutil.copy(file, out / file.name)
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_config_trains_on_cpu_without_a_wandb_key(
    config: Path, tmp_path: Path, prepared: Path, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc either
    shipped = yaml.safe_load(config.read_text())
    run = tmp_path / "run"
    family = (shipped["model"].get("config") or {}).get("type", "gpt2")
    model = (
        [f"model.name_or_path={base}", "model.add_tokens=null"]
        if shipped["model"].get("name_or_path")
        else [f"model.config={TINY_ARCH[family]}"]
    )
    result = torchrun(
        2,
        config,
        f"run.dir={run}",
        f"data.sources=[{{path: {prepared}}}]",
        "data.seq_len=32",
        "data.num_workers=0",
        *model,
        "train.max_steps=2",
        "train.max_tokens=null",
        "train.epochs=null",
        "train.global_batch_size=null",
        "train.micro_batch_size=2",
        "train.grad_accum_steps=1",
        "train.eval_every=2",
        "train.eval_steps=1",
        "train.save_every=2",
        "launch.backend=local",
        "launch.nodes=1",
        "launch.nproc_per_node=2",
        env={"OMP_NUM_THREADS": "1"},
    )
    check(result)
    assert latest_checkpoint(run / "checkpoints").name == "step_000002"
    out = result.stdout
    assert out.count("lr_warmup_steps") == 1  # the shipped warmup is longer than 2 steps
    online = shipped["tracking"]["wandb"]["mode"] == "online"
    assert out.count("no W&B credentials") == (1 if online else 0), out[-3000:]
    if online:
        assert list((run / "wandb").glob("offline-run-*"))
    assert "Setting accelerator to CPU" not in out + result.stderr  # a debug-level notice
    kept = {p.name for p in (run / "tokenizer").iterdir()}
    assert not kept & {"model.safetensors", "pytorch_model.bin"}  # tokenizer files only


def test_evaluate_checks_the_tokenizer_and_counts_each_sample_once(
    tmp_path: Path, prepared: Path
) -> None:
    from sharding.config import DataConfig, SourceConfig
    from sharding.loader import build_loader
    from sharding.prepare import prepare

    config = tiny_config(tmp_path, prepared, train={"max_steps": 2, "save_every": 2})
    check(torchrun(2, config, env={"OMP_NUM_THREADS": "1"}))
    run = tmp_path / "run"
    result = run_cli("evaluate", str(run), "--data", str(prepared))
    check(result)
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    data = DataConfig(sources=[SourceConfig(str(prepared))], seq_len=32, shuffle=False)
    val = build_loader(data, split="val", rank=0, world_size=1, micro_batch_size=8, seed=0)
    samples = val.samples_per_epoch
    assert samples % 8  # a last, partial batch: neither repeated nor dropped
    assert scores["seq_len"] == 32  # the run's data.seq_len, not the model's 64 positions
    assert scores["samples"] == samples and scores["tokens"] == samples * 32
    other = tmp_path / "other"
    prepare(
        [str(write_corpus(tmp_path / "c.jsonl", documents=200, seed=1))],
        other,
        train_tokenizer_vocab=300,
        val_fraction=0.05,
        workers=1,
        seed=0,
        progress=False,
    )
    one_line_error(
        run_cli("evaluate", str(run), "--data", str(other)),
        "tokenized with another tokenizer",
        f"--tokenizer {run / 'tokenizer'}",
    )
