"""Model FLOPs per token and device peak FLOP/s, for MFU.

MFU = tokens/s × model FLOPs per token ÷ peak FLOP/s (PaLM appendix B): 6 FLOPs
per parameter per token for forward + backward, plus attention scores
12 · layers · hidden · seq_len. Recomputation (activation checkpointing) is not
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
    """Training FLOPs per token: 6·N + 12·L·H·T."""
    return 6.0 * n_params + 12.0 * n_layer * hidden * seq_len


def model_flops_per_token(hf_config: Any, n_params: int, seq_len: int) -> float:
    """`flops_per_token` with layers and hidden size read from an HF config."""
    layers = getattr(hf_config, "n_layer", None) or hf_config.num_hidden_layers
    hidden = getattr(hf_config, "n_embd", None) or hf_config.hidden_size
    return flops_per_token(n_params, layers, hidden, seq_len)


def peak_tflops(device_name: str) -> float | None:
    """Known peak for a device name like 'NVIDIA H100 80GB HBM3'; None if unknown (CPU)."""
    name = device_name.upper()
    if "H100" in name and "PCIE" in name:
        return 756.0
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops
    return None
