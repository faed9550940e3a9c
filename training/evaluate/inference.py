"""Use a trained model: export to a plain HF directory, generate text, evaluate.

Each accepts a run directory (its latest or a chosen checkpoint, any ZeRO
stage) or a plain HF model directory.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sharding.atomic import atomic_dir
from training.checkpoint import store as ckpt
from training.errors import TrainingError, first_line
from training.run.paths import RunDir


def is_run_dir(path: Path) -> bool:
    """Whether `path` is a gptrain run directory (it has checkpoints/)."""
    return RunDir(path).checkpoints.is_dir()


def load_model_and_tokenizer(
    path: str | Path, step: int | None = None, merge: bool = True
) -> tuple[Any, Any]:
    """(fp32 model in eval mode, tokenizer) from a run directory or an HF model directory.

    A LoRA run's adapters are merged into its base, or with `merge=False` the model is
    the `peft.PeftModel`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if is_run_dir(path):
        model = _model_from_run(path, step, merge)
        tokenizer_dir = RunDir(path).tokenizer
    elif (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tokenizer_dir = path
    else:
        raise TrainingError(f"{path}: neither a run directory (checkpoints/) nor an HF model dir")
    if not tokenizer_dir.is_dir():
        raise TrainingError(f"{tokenizer_dir}: tokenizer missing")
    return model, AutoTokenizer.from_pretrained(tokenizer_dir)


def _model_from_run(run_dir: Path, step: int | None, merge: bool) -> Any:
    """The checkpoint's model, after checking its files (`checkpoint.verify`); a damaged
    or unreadable checkpoint is one line naming its step."""
    import pickle
    import zipfile

    from training.checkpoint.consolidate import model_from_checkpoint

    step_dir = ckpt.find_step(RunDir(run_dir).checkpoints, step)
    why = ckpt.verify(step_dir)
    if why is not None:
        raise ckpt.damaged_error(step_dir, why)
    try:
        model, _ = model_from_checkpoint(step_dir, merge)
    except (
        RuntimeError,
        OSError,
        EOFError,
        KeyError,
        zipfile.BadZipFile,
        pickle.UnpicklingError,
    ) as exc:
        raise ckpt.damaged_error(step_dir, first_line(exc)) from None
    return model


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
    with atomic_dir(out) as tmp:  # `out` is absent or empty (checked above)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
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
    step: int | None = None,
) -> list[str]:
    """Sample continuations of `prompt` (prompt included in each returned text)."""
    import torch

    if temperature <= 0:
        raise TrainingError(f"--temperature: must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise TrainingError(f"--top-p: must be in (0, 1], got {top_p}")
    model, tokenizer = load_model_and_tokenizer(model_path, step)
    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt")
    positions = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    max_new_tokens = min(max_new_tokens, positions - inputs["input_ids"].shape[1])
    with torch.no_grad():
        out = model.generate(
            **inputs,
            do_sample=True,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            num_return_sequences=num_return_sequences,
            pad_token_id=tokenizer.eos_token_id,
        )
    return [tokenizer.decode(seq, skip_special_tokens=True) for seq in out]


def evaluate(
    model_path: str | Path,
    data_dir: str | Path,
    *,
    split: str = "val",
    seq_len: int | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    step: int | None = None,
) -> dict[str, float]:
    """Loss and perplexity over one pass of a prepared split: every sample counted once.
    The data must be tokenized with the model's tokenizer; `seq_len` defaults to the
    run's `data.seq_len` (a plain model dir: its positions, at most 1024)."""
    import torch

    from sharding.config import DataConfig, SourceConfig
    from sharding.loader import build_loader, document_positions
    from sharding.manifest import load_manifest
    from training.models.loss import target_count, token_loss_sum

    model, tokenizer = load_model_and_tokenizer(model_path, step)
    check_same_tokenizer(tokenizer, load_manifest(data_dir).tokenizer_dir, model_path, data_dir)
    seq_len = seq_len or _default_seq_len(Path(model_path), model)
    data = DataConfig(sources=[SourceConfig(str(data_dir))], seq_len=seq_len, shuffle=False)
    loader = build_loader(
        data, split=split, rank=0, world_size=1, micro_batch_size=batch_size, seed=0
    )
    remaining = loader.samples_per_epoch  # the last batch is cut here: no sample twice
    if max_batches is not None:
        remaining = min(remaining, max_batches * batch_size)
    loss_sum, tokens, samples = 0.0, 0, 0
    with torch.no_grad():
        for batch in loader:
            if remaining <= 0:
                break
            rows = min(remaining, batch["input_ids"].shape[0])
            labels = batch["labels"][:rows]
            ids = batch["input_ids"][:rows]
            positions = (
                document_positions(ids, loader.document_eos) if loader.document_eos else None
            )
            logits = model(input_ids=ids, position_ids=positions).logits
            loss_sum += float(token_loss_sum(logits, labels))
            tokens += target_count(labels)
            remaining, samples = remaining - rows, samples + rows
    loss = loss_sum / max(tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "tokens": tokens,
        "samples": samples,
        "seq_len": seq_len,
    }


def _default_seq_len(path: Path, model: Any) -> int:
    """The run's `data.seq_len`; for a plain model dir its positions, at most 1024."""
    if is_run_dir(path) and RunDir(path).config.is_file():
        import yaml

        seq_len = (
            (yaml.safe_load(RunDir(path).config.read_text()) or {}).get("data", {}).get("seq_len")
        )
        if seq_len:
            return int(seq_len)
    positions = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    return min(positions, 1024)


def check_same_tokenizer(
    tokenizer: Any, data_tokenizer_dir: Path, model_path: str | Path, data_dir: str | Path
) -> None:
    """TrainingError unless the data was tokenized with the model's tokenizer (same
    vocabulary, ids and EOS): another tokenizer's ids give a meaningless loss."""
    from transformers import AutoTokenizer

    data_tok = AutoTokenizer.from_pretrained(data_tokenizer_dir)
    if data_tok.get_vocab() != tokenizer.get_vocab() or data_tok.eos_token != tokenizer.eos_token:
        raise TrainingError(
            f"--data {data_dir}: tokenized with another tokenizer ({data_tokenizer_dir}, "
            f"{len(data_tok)} tokens) than {model_path}'s ({len(tokenizer)} tokens); prepare it "
            f"with --tokenizer {_tokenizer_dir_of(Path(model_path))}"
        )


def _tokenizer_dir_of(path: Path) -> Path:
    return RunDir(path).tokenizer if is_run_dir(path) else path
