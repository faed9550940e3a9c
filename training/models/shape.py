"""A decoder's shape for the plan: sizes, per-tensor parameter counts, and what LoRA or
freezing leaves trainable (`training.plan` turns them into bytes and FLOPs)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on: an HF GPT-2 or Llama-style decoder's sizes."""

    family: Literal["gpt2", "llama"]
    n_layer: int
    hidden: int
    n_head: int
    vocab_size: int
    n_positions: int
    ffn_hidden: int
    n_kv_head: int
    tied_embeddings: bool = True
    attention: Literal["sdpa", "eager"] = "sdpa"
    # Llama-style biases: Qwen2 has them on q, k, v; `attention_bias: true` on all four.
    attention_bias: Literal["none", "qkv", "all"] = "none"

    def layer_numels(self) -> list[int]:
        """Element count of each parameter tensor of one decoder block."""
        h, f = self.hidden, self.ffn_hidden
        if self.family == "gpt2":
            return [h, h, h * 3 * h, 3 * h, h * h, h, h, h, h * f, f, f * h, h]
        kv = self.n_kv_head * (h // self.n_head)
        biases = {"none": [], "qkv": [h, kv, kv], "all": [h, kv, kv, h]}[self.attention_bias]
        return [h, h * h, h * kv, h * kv, h * h, h, h * f, h * f, f * h, *biases]

    def param_numels(self) -> list[int]:
        """Element count of every parameter tensor, in module order."""
        h, v = self.hidden, self.vocab_size
        head = [v * h, self.n_positions * h] if self.family == "gpt2" else [v * h]
        tail = [h, h] if self.family == "gpt2" else [h]
        lm_head = [] if self.tied_embeddings else [v * h]
        return head + self.layer_numels() * self.n_layer + tail + lm_head

    @property
    def n_params(self) -> int:
        return sum(self.param_numels())


def gpt2_shape(
    n_layer: int,
    n_embd: int,
    n_head: int,
    vocab_size: int,
    n_positions: int,
    n_inner: int | None = None,
) -> ModelShape:
    """A fresh GPT-2 (`model.config`), tied embeddings."""
    return ModelShape(
        "gpt2", n_layer, n_embd, n_head, vocab_size, n_positions, n_inner or 4 * n_embd, n_head
    )


def shape_from_hf_config(data: dict[str, Any]) -> ModelShape:
    """The shape in an HF `config.json`: GPT-2 keys (`n_embd`, ...) or the Llama-style
    `hidden_size`, `num_hidden_layers`, ... of Llama, Qwen2 (q/k/v biases) and Mistral
    (any other decoder is planned as Llama-style: RMSNorm, gated MLP, no biases).
    KeyError names a missing key."""
    attention = "eager" if data.get("_attn_implementation") == "eager" else "sdpa"
    if data.get("model_type") == "gpt2" or "n_embd" in data:
        shape = gpt2_shape(
            data["n_layer"],
            data["n_embd"],
            data["n_head"],
            data["vocab_size"],
            data.get("n_positions", 1024),
            data.get("n_inner"),
        )
        return replace(
            shape, tied_embeddings=data.get("tie_word_embeddings", True), attention=attention
        )
    hidden, heads = data["hidden_size"], data["num_attention_heads"]
    return ModelShape(
        family="llama",
        n_layer=data["num_hidden_layers"],
        hidden=hidden,
        n_head=heads,
        vocab_size=data["vocab_size"],
        n_positions=data.get("max_position_embeddings", 0),
        ffn_hidden=data.get("intermediate_size") or 4 * hidden,
        n_kv_head=data.get("num_key_value_heads") or heads,
        tied_embeddings=data.get("tie_word_embeddings", False),
        attention=attention,
        attention_bias="all"
        if data.get("attention_bias")
        else "qkv"
        if data.get("model_type") == "qwen2"
        else "none",
    )


# --- trainable parameters ------------------------------------------------------------------


def _projections(shape: ModelShape) -> dict[str, list[tuple[int, int]]]:
    """(in, out) features of each LoRA-adaptable linear layer of one block, by name."""
    h, f = shape.hidden, shape.ffn_hidden
    if shape.family == "gpt2":
        return {
            "c_attn": [(h, 3 * h)],
            "attn.c_proj": [(h, h)],
            "c_fc": [(h, f)],
            "mlp.c_proj": [(f, h)],
            "c_proj": [(h, h), (f, h)],
        }
    kv = shape.n_kv_head * (h // shape.n_head)
    return {
        "q_proj": [(h, h)],
        "k_proj": [(h, kv)],
        "v_proj": [(h, kv)],
        "o_proj": [(h, h)],
        "gate_proj": [(h, f)],
        "up_proj": [(h, f)],
        "down_proj": [(f, h)],
    }


def lora_params(shape: ModelShape, rank: int, target_modules: list[str] | None) -> int:
    """LoRA adapter parameters: r·(in + out) per adapted linear layer (the base is frozen).
    `target_modules` None: the attention projections (`training.models.finetune`'s default)."""
    from training.models.finetune import DEFAULT_TARGET_MODULES

    default = DEFAULT_TARGET_MODULES["gpt2" if shape.family == "gpt2" else "llama"]
    projections = _projections(shape)
    per_block = sum(
        rank * (i + o) for name in (target_modules or default) for i, o in projections.get(name, [])
    )
    return per_block * shape.n_layer


def unfrozen_params(shape: ModelShape, embeddings: bool, first_blocks: int) -> int:
    """Parameters left trainable after freezing the embeddings and/or the first blocks."""
    numels = shape.param_numels()
    head = 2 if shape.family == "gpt2" else 1
    per_block = (
        len(numels)
        - head
        - (2 if shape.family == "gpt2" else 1)
        - (0 if shape.tied_embeddings else 1)
    ) // shape.n_layer
    frozen = sum(numels[:head]) if embeddings else 0
    frozen += sum(numels[head : head + per_block * min(first_blocks, shape.n_layer)])
    return shape.n_params - frozen
