"""Use a trained model: export to a plain HF directory, generate text, evaluate.

Each accepts a run directory (its latest or a chosen checkpoint, any ZeRO
stage) or a plain HF model directory.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

from training import checkpoint as ckpt
from training.errors import TrainingError


def is_run_dir(path: Path) -> bool:
    """Whether `path` is a gptrain run directory (it has checkpoints/)."""
    return (path / "checkpoints").is_dir()


def load_model_and_tokenizer(
    path: str | Path, step: int | None = None, merge: bool = True
) -> tuple[Any, Any]:
    """(fp32 model in eval mode, tokenizer) from a run directory or an HF model directory.

    A LoRA run's adapters are merged into its base, or with `merge=False` the model is
    the `peft.PeftModel`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.consolidate import model_from_checkpoint

    path = Path(path)
    if is_run_dir(path):
        model, _ = model_from_checkpoint(ckpt.find_step(path / "checkpoints", step), merge)
        tokenizer_dir = path / "tokenizer"
    elif (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tokenizer_dir = path
    else:
        raise TrainingError(f"{path}: neither a run directory (checkpoints/) nor an HF model dir")
    if not tokenizer_dir.is_dir():
        raise TrainingError(f"{tokenizer_dir}: tokenizer missing")
    return model, AutoTokenizer.from_pretrained(tokenizer_dir)


def export(
    run_dir: str | Path, out_dir: str | Path, step: int | None = None, adapter: bool = False
) -> Path:
    """Write checkpoint `step` (default latest) of a run as safetensors + config + tokenizer.

    A LoRA run exports its base with the adapters merged in (a plain HF model), or with
    `adapter=True` the adapter alone, for `peft.PeftModel.from_pretrained(base, out_dir)`.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise TrainingError(f"--out {out}: exists and is not empty; choose a new directory")
    if not is_run_dir(Path(run_dir)):
        raise TrainingError(f"{run_dir}: not a run directory (no checkpoints/)")
    model, tokenizer = load_model_and_tokenizer(run_dir, step, merge=not adapter)
    if adapter and not hasattr(model, "peft_config"):
        raise TrainingError(
            f"--adapter: {run_dir} is not a LoRA run (model.peft.method: none); export the "
            "full model without --adapter"
        )
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def generate(
    model_path: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 0.95,
    seed: int = 0,
    num_return_sequences: int = 1,
) -> list[str]:
    """Sample continuations of `prompt` (prompt included in each returned text)."""
    import torch

    if temperature <= 0:
        raise TrainingError(f"--temperature: must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise TrainingError(f"--top-p: must be in (0, 1], got {top_p}")
    model, tokenizer = load_model_and_tokenizer(model_path)
    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt")
    positions = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    max_new_tokens = min(max_new_tokens, positions - inputs["input_ids"].shape[1])
    with torch.no_grad():
        out = model.generate(
            **inputs, do_sample=True, max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=top_k, top_p=top_p, num_return_sequences=num_return_sequences,
            pad_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
    return [tokenizer.decode(seq, skip_special_tokens=True) for seq in out]


def evaluate(
    model_path: str | Path, data_dir: str | Path, *, split: str = "val", seq_len: int | None = None,
    batch_size: int = 8, max_batches: int | None = None,
) -> dict[str, float]:  # fmt: skip
    """Loss and perplexity over one pass of a prepared split."""
    import torch

    from sharding.config import DataConfig, SourceConfig
    from sharding.loader import build_loader
    from training.loss import target_count, token_loss_sum

    model, _ = load_model_and_tokenizer(model_path)
    positions = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    seq_len = seq_len or min(positions, 1024)
    data = DataConfig(sources=[SourceConfig(str(data_dir))], seq_len=seq_len, shuffle=False)
    loader = build_loader(data, split=split, rank=0, world_size=1, micro_batch_size=batch_size,
                          seed=0)  # fmt: skip
    batches = max(1, loader.samples_per_epoch // batch_size)  # no wrap into a 2nd epoch
    if max_batches is not None:
        batches = min(batches, max_batches)
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for _, batch in zip(range(batches), loader, strict=False):
            logits = model(input_ids=batch["input_ids"]).logits
            loss_sum += float(token_loss_sum(logits, batch["labels"]))
            tokens += target_count(batch["labels"])
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}
