"""Model FLOPs per token and device peak FLOP/s, for MFU.

MFU = tokens/s × model FLOPs per token ÷ peak FLOP/s (PaLM appendix B): 6 FLOPs
per multiplying parameter per token for forward + backward, plus attention scores
12 · layers · query width · seq_len. Parameters that are only looked up (an untied input
embedding, learned positions) do no FLOPs; a mixture-of-experts token multiplies by the
top_k experts it is routed to (the active parameters), not by all of them; grouped-query
attention's narrower K/V projections and a gated MLP's third matrix are simply
fewer/more parameters; the query width is heads × head dim. Recomputation (activation
checkpointing) is not counted: MFU measures useful work.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("gptrain")

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


def model_flops_per_token(hf_config: Any, n_params: int, seq_len: int) -> float:
    """`flops_per_token` of an HF model of `n_params` parameters (as the engine counts
    them; LoRA adapters included): its lookup-only embeddings and, for a mixture of
    experts, the routed experts a token is not sent to are taken off (the model's
    shape, `training.models.shape.shape_of`, built once on the meta device)."""
    from training.models.shape import shape_of

    try:
        shape = shape_of(hf_config)
    except Exception as exc:  # an MFU figure must never stop a run
        log.warning("MFU counts all %d parameters as dense: no model shape (%s)", n_params, exc)
        text = hf_config.get_text_config()
        layers = getattr(text, "num_hidden_layers", None) or 0
        hidden = getattr(text, "hidden_size", None) or 0
        heads = getattr(text, "num_attention_heads", None) or 0
        head_dim = getattr(text, "head_dim", None) or (hidden // heads if heads else 0)
        return flops_per_token(n_params, layers, heads * head_dim, seq_len)
    return flops_per_token(
        active_params(shape, n_params) - shape.lookup_params,
        shape.n_layer,
        shape.query_width,
        seq_len,
    )


def active_params(shape: Any, n_params: int) -> int:
    """Of `n_params` (a `ModelShape`'s model, perhaps with adapters), those one token
    uses: all but the routed experts it is not sent to."""
    return n_params - (shape.n_params - shape.active_params)


def peak_tflops(device_name: str) -> float | None:
    """Known peak for a device name like 'NVIDIA H100 80GB HBM3'; None if unknown (CPU)."""
    name = device_name.upper()
    if "H100" in name and "PCIE" in name:
        return 756.0
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops
    return None
