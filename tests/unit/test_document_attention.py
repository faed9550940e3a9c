"""The GPU core of document attention (flex_attention with a block mask), checked on the
CPU with torch's eager flex (forward only: torch has no flex backward on a CPU): it keeps
the same documents, causality, sliding window and grouped-query heads as sdpa with the
L × L document mask. tests/gpu/ checks the compiled kernel's forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.parallel.sequence import document_mask, flex_document_attention

# two rows of packed documents of uneven lengths (positions restart at each document)
LENGTHS = ([40, 7, 1, 48], [96])


def _positions() -> torch.Tensor:
    rows = [torch.cat([torch.arange(n) for n in lengths]) for lengths in LENGTHS]
    return torch.stack(rows)


@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_flex_core_keeps_documents_causality_window_and_gqa(
    window: int | None, kv_heads: int
) -> None:
    torch.manual_seed(0)
    positions = _positions()
    batch, length = positions.shape
    query = torch.randn(batch, 4, length, 16)
    key = torch.randn(batch, kv_heads, length, 16)
    value = torch.randn(batch, kv_heads, length, 16)
    ours = flex_document_attention(query, key, value, positions, window, None, compiled=False)
    groups = 4 // kv_heads
    expected = F.scaled_dot_product_attention(
        query,
        key.repeat_interleave(groups, dim=1),
        value.repeat_interleave(groups, dim=1),
        attn_mask=document_mask(positions, window),
    )
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    # a document's output does not see the others: changing the first document's
    # values leaves row 0's later documents unchanged
    value2 = value.clone()
    value2[0, :, :40] += 1.0
    again = flex_document_attention(query, key, value2, positions, window, None, compiled=False)
    torch.testing.assert_close(again[0, :, 40:], ours[0, :, 40:])
    assert not torch.allclose(again[0, :, :40], ours[0, :, :40])
