"""The loss head: chunked, checkpointed cross-entropy equals the plain one, values and
gradients, for each model family; selective activation checkpointing picks blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sharding.loader import IGNORE_INDEX
from training.errors import TrainingError
from training.model_config import ModelConfig
from training.models import loss as loss_mod
from training.models.build import (
    blocks_to_compile,
    build_model,
    checkpointed_blocks,
    compile_target,
    decoder_blocks,
)

VOCAB = 97


def tiny_hf_config(family: str):
    from transformers import Gemma2Config, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    if family == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    # gemma2: its head soft-caps the logits (final_logit_softcapping 30), the chunks must too
    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    cls = {**classes, "gemma2": Gemma2Config}[family]
    return cls(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )


def reference_loss(lm, ids, labels):
    logits = lm(input_ids=ids).logits
    return F.cross_entropy(
        logits.float().reshape(-1, VOCAB),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 16), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[0, :5] = IGNORE_INDEX  # a masked prompt
    return ids, labels


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", "gemma2"])
def test_chunked_head_loss_and_gradients_equal_the_plain_loss(family, monkeypatch) -> None:
    torch.manual_seed(0)
    cfg = tiny_hf_config(family)
    monkeypatch.setattr(loss_mod, "LOSS_CHUNK_BYTES", 4 * VOCAB * 5)  # 5 rows: 10 chunks
    assert loss_mod.chunk_rows(VOCAB) == 5
    lm, _ = build_model(ModelConfig(), cfg, {"zero_optimization": {"stage": 0}})
    ids, labels = batch()

    ref = reference_loss(lm, ids, labels)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    ours = lm(input_ids=ids, labels=labels, token_loss=True)["loss"]
    ours.backward()

    assert ours.dtype == torch.float32 and ours.dim() == 0
    assert torch.allclose(ours, ref, rtol=1e-5), (float(ours), float(ref))
    for name, param in lm.named_parameters():
        assert torch.allclose(param.grad, ref_grads[name], rtol=1e-4, atol=1e-6), name


def test_model_forward_without_token_loss_is_the_hf_forward() -> None:
    torch.manual_seed(0)
    lm, _ = build_model(ModelConfig(), tiny_hf_config("gpt2"), {"zero_optimization": {"stage": 0}})
    ids, _ = batch()
    out = lm(input_ids=ids)
    assert out.logits.shape == (3, 16, VOCAB)


def test_token_loss_sum_chunks_the_upcast_exactly(monkeypatch) -> None:
    logits = torch.randn(4, 8, VOCAB, dtype=torch.bfloat16)
    labels = torch.randint(0, VOCAB, (4, 8))
    labels[1] = IGNORE_INDEX
    whole = F.cross_entropy(
        logits.float().reshape(-1, VOCAB),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    monkeypatch.setattr(loss_mod, "LOSS_CHUNK_BYTES", 4 * VOCAB * 3)
    assert torch.allclose(loss_mod.token_loss_sum(logits, labels), whole, rtol=1e-6)


def test_checkpointed_blocks_spread_the_fraction_evenly() -> None:
    assert checkpointed_blocks(4, 1.0) == [True] * 4
    assert checkpointed_blocks(6, 0.5) == [False, True] * 3
    assert checkpointed_blocks(6, 1 / 3) == [False, False, True] * 2
    for n in (1, 7, 20, 48):
        for fraction in (0.1, 0.25, 0.5, 0.75, 1.0):
            assert sum(checkpointed_blocks(n, fraction)) == int(n * fraction + 1e-9)


def test_compile_target_is_blocks_under_zero3() -> None:
    """auto compiles on CUDA only; ZeRO-3 compiles block by block (its hooks break graphs)."""
    assert compile_target("auto", cuda=False, zero_stage=2) == "off"
    assert compile_target("auto", cuda=True, zero_stage=2) == "model"
    assert compile_target("auto", cuda=True, zero_stage=3) == "blocks"
    assert compile_target(True, cuda=False, zero_stage=0) == "model"
    assert compile_target("blocks", cuda=True, zero_stage=1) == "blocks"
    assert compile_target(False, cuda=True, zero_stage=3) == "off"
    with pytest.raises(TrainingError, match=r"^model\.compile: Linear has no decoder blocks"):
        blocks_to_compile(torch.nn.Linear(2, 2))


def test_selective_activation_checkpointing_flags_the_chosen_blocks() -> None:
    cfg = tiny_hf_config("llama")
    cfg.num_hidden_layers = 4
    model = ModelConfig(activation_checkpointing=True, activation_checkpointing_fraction=0.5)
    lm, _ = build_model(model, cfg, {"zero_optimization": {"stage": 0}})
    assert [b.gradient_checkpointing for b in decoder_blocks(lm)] == [False, True, False, True]
    ids, labels = batch()
    lm(input_ids=ids, labels=labels, token_loss=True)["loss"].backward()  # trains with a mix
    assert all(p.grad is not None for p in lm.parameters())
