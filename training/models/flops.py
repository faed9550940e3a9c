"""Model FLOPs per token and device peak FLOP/s, for MFU.

MFU = tokens/s × model FLOPs per token ÷ peak FLOP/s (PaLM appendix B): 6 FLOPs
per multiplying parameter per token for forward + backward, plus attention scores
12 · layers · query width · seq_len. Parameters that are only looked up (an untied input
embedding, GPT-2's learned positions) do no FLOPs; grouped-query attention's narrower
K/V projections and a gated MLP's third matrix are simply fewer/more parameters; the
query width is heads × head dim. Recomputation (activation checkpointing) is not
counted: MFU measures useful work.
"""

from __future__ import annotations

from typing import Any

# Dense bf16 peak TFLOP/s per device (no sparsity), from the vendors' datasheets.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; PCIe is 756
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "V100": 125.0,  # fp16 tensor cores
}


def flops_per_token(n_params: int, n_layer: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6·N + 12·L·H·T (N: multiplying parameters, H: query width)."""
    return 6.0 * n_params + 12.0 * n_layer * hidden * seq_len


def lookup_params(vocab_size: int, hidden: int, *, tied: bool, positions: int = 0) -> int:
    """Parameters only looked up, never multiplied: the input embedding unless the LM head
    shares it, and learned position embeddings (`positions` rows; 0 for rotary)."""
    return (0 if tied else vocab_size * hidden) + positions * hidden


def model_flops_per_token(hf_config: Any, n_params: int, seq_len: int) -> float:
    """`flops_per_token` of an HF model of `n_params` parameters, shape from its config
    (GPT-2 or Llama-style keys)."""
    layers = getattr(hf_config, "n_layer", None) or hf_config.num_hidden_layers
    hidden = getattr(hf_config, "n_embd", None) or hf_config.hidden_size
    heads = getattr(hf_config, "n_head", None) or hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    lookups = lookup_params(
        hf_config.vocab_size,
        hidden,
        tied=bool(getattr(hf_config, "tie_word_embeddings", True)),
        positions=getattr(hf_config, "n_positions", 0) if hf_config.model_type == "gpt2" else 0,
    )
    return flops_per_token(n_params - lookups, layers, heads * head_dim, seq_len)


def peak_tflops(device_name: str) -> float | None:
    """Known peak for a device name like 'NVIDIA H100 80GB HBM3'; None if unknown (CPU)."""
    name = device_name.upper()
    if "H100" in name and "PCIE" in name:
        return 756.0
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops
    return None
