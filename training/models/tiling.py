"""Tiled MLPs for long windows (`model.tiled_mlp`).

At a long window the largest activations of a decoder block are its MLP's: the
intermediate of `seq × intermediate_size` (3.5× to 4× the hidden width, twice for a
gated MLP) that backward keeps. DeepSpeed's `TiledMLP` (its Arctic Long Sequence
Training, `deepspeed.runtime.sequence_parallel.ulysses_sp`) runs the MLP one slice of
the sequence at a time without keeping anything but its input, and recomputes each slice
in backward: the MLP's memory becomes one slice's, for one more MLP forward. It is exact
(the MLP treats tokens independently) and works under every ZeRO stage: it holds
DeepSpeed's gradient reduction until the last slice's gradient is in.

`tile_mlps` wraps the forward of each decoder block's MLP (`mlp`, or `feed_forward`),
which makes it family-independent: the MLP is whatever module the block calls on its
hidden states. A mixture-of-experts block is refused (its forward also returns router
logits, and its experts see a varying share of tokens), as is dropout inside the MLP
(the recompute would draw other masks).
"""

from __future__ import annotations

import math
import types
from typing import Any

from training.errors import TrainingError

MLP_NAMES = ("mlp", "feed_forward")  # a decoder block's MLP attribute, by family


def block_mlp(block: Any) -> Any:
    """The MLP module of decoder `block`, or None when it has none we know."""
    for name in MLP_NAMES:
        module = getattr(block, name, None)
        if module is not None:
            return module
    return None


def tile_count(rows: int, hidden_size: int, shards: int) -> int:
    """How many slices the MLP of `rows` tokens (the micro-batch's, flattened) runs in:
    `shards`, or with 0 (auto) one slice per `hidden_size` tokens, as DeepSpeed's ALST
    does (a slice's intermediate is then about the size of the block's weights). At most
    one per token, and a count `torch.chunk` really makes of `rows`: TiledMLP's backward
    releases DeepSpeed's gradient reduction at slice number `shards`, so fewer actual
    slices would never release it."""
    wanted = shards if shards > 0 else math.ceil(rows / hidden_size)
    n = max(1, min(wanted, rows))
    while n > 1 and math.ceil(rows / math.ceil(rows / n)) != n:
        n -= 1
    return n


def tile_mlps(blocks: list[Any], shards: int, moe: bool) -> int:
    """Run the MLP of every decoder block in `blocks` tiled along the sequence
    (`shards`: slices per forward, 0 = auto); the number of MLPs tiled. Raises
    TrainingError (naming `model.tiled_mlp`) for what it cannot tile."""
    import torch

    if moe:
        raise TrainingError(
            "model.tiled_mlp: tiles dense MLPs only; this model's MLP is a mixture of experts"
        )
    mlps = [block_mlp(block) for block in blocks]
    if not blocks or any(m is None for m in mlps):
        raise TrainingError(
            "model.tiled_mlp: no MLP found in the decoder blocks (looked for "
            f"{' / '.join(MLP_NAMES)})"
        )
    for mlp in mlps:
        if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in mlp.modules()):
            raise TrainingError(
                "model.tiled_mlp: the MLP has dropout, which its recompute in backward "
                "would draw anew; set model.dropout: 0"
            )
        mlp.forward = types.MethodType(_tiled(type(mlp).forward, shards), mlp)
    return len(mlps)


def _tiled(forward: Any, shards: int) -> Any:
    """`forward` (an MLP class's) run on slices of the micro-batch's tokens: under
    autograd through DeepSpeed's TiledMLP (recomputed per slice in backward), without
    grad slice by slice."""

    def tiled_forward(self: Any, x: Any) -> Any:
        import torch
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

        hidden = x.shape[-1]
        n = tile_count(x.numel() // hidden, hidden, shards)
        if n == 1:
            return forward(self, x)
        rows = x.reshape(-1, hidden)  # [tokens, hidden]: every slice contiguous
        if not torch.is_grad_enabled():
            out = torch.cat([forward(self, part) for part in rows.chunk(n)])
        else:
            params = [p for p in self.parameters() if p.requires_grad]
            out = TiledMLP.apply(forward, self, rows, n, params)
        return out.view(*x.shape[:-1], out.shape[-1])

    return tiled_forward
