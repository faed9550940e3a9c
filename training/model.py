"""Build the causal LM: a local pretrained HF directory or a fresh GPT-2.

Under ZeRO-3 an `HfDeepSpeedConfig` must be alive while the model is built so
transformers constructs it already partitioned (a model bigger than one rank's
memory never exists whole); the caller keeps the returned handle.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from training.config import ModelConfig
from training.errors import TrainingError
from training.finetune import apply_finetune, check_added_tokens, check_finetune, resize_vocab

_DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "attention_dropout")


def _positions(config: Any) -> int | None:
    for key in ("n_positions", "max_position_embeddings"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return None


def _tokenizer_vocab(path: Path) -> dict[str, int] | None:
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    return json.loads(file.read_text())["model"].get("vocab")


def load_hf_config(model: ModelConfig, *, vocab_size: int, eos_id: int, seq_len: int) -> Any:
    """The HF config of the model to train, checked against the data it will see and the
    fine-tuning options. With `model.add_tokens` a smaller pretrained vocabulary is the
    one `build_model` resizes to the tokenizer's `vocab_size`."""
    from transformers import AutoConfig, GPT2Config

    if model.name_or_path:
        path = Path(model.name_or_path)
        if not (path / "config.json").is_file():
            raise TrainingError(
                f"model.name_or_path: {path} is not a local HF model directory (no config.json)"
            )
        config = AutoConfig.from_pretrained(path)
        if config.vocab_size < vocab_size and model.add_tokens is None:
            raise TrainingError(
                f"model.name_or_path: {path} has vocab_size {config.vocab_size} but the shards' "
                f"tokenizer has {vocab_size} tokens; prepare the data with --tokenizer {path} "
                "(or set model.add_tokens to the tokens prepare --add-tokens added)"
            )
        config.vocab_size = max(config.vocab_size, vocab_size)
        for key in _DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(config, key, model.dropout)
    else:
        arch = model.config
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=arch.n_positions,
            n_embd=arch.n_embd,
            n_layer=arch.n_layer,
            n_head=arch.n_head,
            resid_pdrop=model.dropout,
            embd_pdrop=model.dropout,
            attn_pdrop=model.dropout,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
        )
    positions = _positions(config)
    if positions is not None and seq_len > positions:
        raise TrainingError(
            f"data.seq_len: {seq_len} is longer than the model's {positions} positions; "
            f"lower data.seq_len (or model.config.n_positions for a fresh model)"
        )
    config.use_cache = False
    check_finetune(model, config)
    return config


def check_tokenizer(model: ModelConfig, tokenizer_dir: Path) -> None:
    """A pretrained model dir's own tokenizer must be the one the shards were made with
    (tokens added by prepare --add-tokens aside), and `model.add_tokens` must be in it."""
    check_added_tokens(model, tokenizer_dir)
    if not model.name_or_path:
        return
    theirs = _tokenizer_vocab(Path(model.name_or_path))
    ours = _tokenizer_vocab(tokenizer_dir)
    if theirs is not None and ours is not None and theirs != ours:
        raise TrainingError(
            f"model.name_or_path: the tokenizer in {model.name_or_path} differs from the one "
            f"the shards were made with ({tokenizer_dir}); re-run gptrain prepare with "
            f"--tokenizer {model.name_or_path}"
        )


def build_model(model: ModelConfig, hf_config: Any, ds_config: dict[str, Any]) -> tuple[Any, Any]:
    """(model, keepalive): the HF causal LM, sharded at construction under ZeRO-3, its
    vocabulary grown to `hf_config.vocab_size`, LoRA-wrapped / partly frozen as configured."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    keepalive = None
    if ds_config["zero_optimization"]["stage"] == 3:
        keepalive = HfDeepSpeedConfig(ds_config)
    if model.name_or_path:
        base_config = copy.deepcopy(hf_config)  # the checkpoint's own vocabulary size
        base_config.vocab_size = AutoConfig.from_pretrained(model.name_or_path).vocab_size
        lm = AutoModelForCausalLM.from_pretrained(model.name_or_path, config=base_config)
        resize_vocab(lm, hf_config.vocab_size)
    else:
        lm = AutoModelForCausalLM.from_config(hf_config)
    if model.activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # from_pretrained returns eval mode: without train() dropout would be off and HF
    # would skip gradient checkpointing until the first evaluation switched it back.
    lm.train()
    return apply_finetune(lm, model), keepalive


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices, not biases, norms or other 1-D parameters."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 params are flattened
        (decay if len(shape) >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def model_fingerprint(hf_config: Any) -> dict[str, Any]:
    """The shape-defining part of a model config, to refuse a foreign checkpoint."""
    keys = ("model_type", "vocab_size", "n_layer", "n_head", "n_embd", "n_positions",
            "num_hidden_layers", "hidden_size", "num_attention_heads")  # fmt: skip
    return {k: getattr(hf_config, k) for k in keys if getattr(hf_config, k, None) is not None}
