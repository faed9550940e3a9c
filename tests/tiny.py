"""Tiny sizes of any causal LM, for tests: 2 layers, hidden 32, 4 heads (2 kv heads),
MLP 64, 64 positions, 4 experts with 2 per token, under every common spelling of those
keys; a type takes the ones its transformers config class has."""

from __future__ import annotations

from typing import Any

from training import model_registry as registry

TINY_SIZES: dict[str, Any] = {
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "head_dim": 8,
    # GPT-2 and other older spellings
    "n_layer": 2,
    "n_head": 4,
    "n_embd": 32,
    "n_positions": 64,
    "n_ctx": 64,
    "d_model": 32,
    "num_layers": 2,
    "num_heads": 4,
    "ffn_dim": 64,
    # mixture of experts
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
}


def tiny_arch(model_type: str, **overrides: Any) -> dict[str, Any]:
    """`model.config` of a tiny `model_type`: the `TINY_SIZES` keys its config class has
    (its own fields, no aliases), then `overrides`."""
    fields = set(registry.config_fields(registry.config_class(model_type)))
    return {
        "type": model_type,
        **{k: v for k, v in TINY_SIZES.items() if k in fields},
        **overrides,
    }
