"""Model families (gpt2, llama, qwen2, mistral): `model.config` builds each through its
transformers config class, bad sizes are one line, and document masking keeps attention
inside each packed document: a document's logits packed after another equal its logits
alone, for every family (and differ without the mask, so the test can fail)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.config import ConfigError, load_config
from sharding.loader import build_loader, document_positions
from sharding.shards import write_dataset
from training.errors import TrainingError
from training.models.build import FAMILIES, fingerprint_diff, load_hf_config, model_fingerprint

EOS = 1
TINY = {
    "gpt2": {"n_layer": 2, "n_head": 4, "n_embd": 32, "n_positions": 64},
    "llama": {
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    },
}


def tiny(family: str) -> dict:
    """`model.config` of a tiny model of `family`."""
    return {"type": family, **TINY["gpt2" if family == "gpt2" else "llama"]}


def hf_config(family: str, vocab_size: int = 50) -> object:
    cfg = load_config(
        None, ["train.micro_batch_size=1", f"model.config={json.dumps(tiny(family))}"]
    )
    return load_hf_config(cfg.model, vocab_size=vocab_size, eos_id=EOS, seq_len=32)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fresh_config_is_the_family_class(family: str) -> None:
    config = hf_config(family)
    assert config.model_type == family and config.vocab_size == 50
    assert type(config).__name__ == FAMILIES[family]
    if family != "gpt2":
        assert (config.num_key_value_heads, config.intermediate_size) == (2, 64)
        assert config.rope_parameters["rope_theta"] == 10000.0


def test_llama_defaults_derive_kv_heads_and_swiglu_width() -> None:
    arch = load_config(None, ["train.micro_batch_size=1", "model.config.type=llama"]).model.config
    assert arch.num_key_value_heads == arch.num_attention_heads == 12
    assert arch.intermediate_size == 2048 and arch.n_layer is None  # 8/3 · 768 → 256s


def test_fingerprint_tells_kv_heads_and_swiglu_width_apart() -> None:
    base = model_fingerprint(hf_config("llama"))
    fewer_kv = {**tiny("llama"), "num_key_value_heads": 1}
    cfg = load_config(None, ["train.micro_batch_size=1", f"model.config={json.dumps(fewer_kv)}"])
    other = model_fingerprint(load_hf_config(cfg.model, vocab_size=50, eos_id=EOS, seq_len=32))
    assert fingerprint_diff(base, other) == {"num_key_value_heads": (2, 1)}
    # a checkpoint saved before a key was recorded is not refused for lacking it
    older = {k: v for k, v in base.items() if k != "intermediate_size"}
    assert fingerprint_diff(older, base) == {}
    # a size the checkpoint set and the config leaves to its default is a difference
    assert fingerprint_diff({**base, "n_inner": 3000}, base) == {"n_inner": (3000, None)}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["model.config.type=llama", "model.config.n_embd=64"],
            "model.config.n_embd: not a llama key (did you mean 'hidden_size'?)",
        ),
        (["model.config.rope_theta=5e5"], "model.config.rope_theta: not a gpt2 key; its keys are"),
        (
            ["model.config.type=qwen2", "model.config.num_kv_heads=2"],
            "model.config.num_kv_heads: unknown key (did you mean 'num_key_value_heads'?)",
        ),
        (
            [
                "model.config.type=mistral",
                "model.config.num_attention_heads=12",
                "model.config.num_key_value_heads=5",
            ],
            "model.config.num_key_value_heads: 5 does not divide num_attention_heads=12",
        ),
        (["model.config.type=gemma"], "model.config.type: must be one of 'gpt2' | 'llama'"),
    ],
)
def test_bad_family_keys_are_one_line(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.micro_batch_size=1", *overrides])
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_pretrained_dir_of_another_family_is_refused(tmp_path: Path) -> None:
    from transformers import OPTConfig

    OPTConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2
    ).save_pretrained(tmp_path)
    cfg = load_config(None, ["train.micro_batch_size=1", f"model.name_or_path={tmp_path}"])
    with pytest.raises(TrainingError) as info:
        load_hf_config(cfg.model, vocab_size=50, eos_id=EOS, seq_len=32)
    assert f"model.name_or_path: {tmp_path} is a 'opt' model; gptrain trains gpt2, llama" in str(
        info.value
    )


def test_document_positions_restart_after_each_eos() -> None:
    inputs = np.array([[5, EOS, 3, 4, EOS, EOS, 7, 8], [EOS, 2, 2, 2, 2, 2, 2, EOS]])
    assert document_positions(inputs, EOS).tolist() == [
        [0, 1, 0, 1, 2, 0, 0, 1],
        [0, 0, 1, 2, 3, 4, 5, 6],
    ]


def test_loader_yields_document_positions_only_when_asked(tmp_path: Path) -> None:
    from sharding.config import DataConfig, SourceConfig

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    tokens = np.tile(np.array([3, 4, 5, EOS], dtype=np.int64), 40)
    write_dataset(
        tmp_path / "ds",
        {"train": tokens, "val": tokens},
        tokenizer_dir=tmp_path / "tok",
        vocab_size=8,
        eos_id=EOS,
        shard_tokens=64,
    )
    for mask in (True, False):
        data = DataConfig(
            sources=[SourceConfig(str(tmp_path / "ds"))],
            seq_len=8,
            shuffle=False,
            document_mask=mask,
        )
        batch = next(
            iter(
                build_loader(data, split="train", rank=0, world_size=1, micro_batch_size=2, seed=0)
            )
        )
        if not mask:
            assert set(batch) == {"input_ids", "labels"}
            continue
        ids, positions = batch["input_ids"].numpy(), batch["position_ids"].numpy()
        assert positions.tolist() == document_positions(ids, EOS).tolist()
        assert positions.max() == 3 and (positions[:, 1:] == 0).sum() >= 2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_document_mask_isolates_packed_documents(family: str) -> None:
    """Document B packed after A: B's logits equal B alone with per-document positions
    (transformers' sdpa path builds the block-diagonal causal mask from them), and differ
    without them (plain causal attention over the window)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(family)).eval()
    first = torch.tensor([7, 8, 9, 10, 11, EOS])
    second = torch.tensor([20, 21, 22, 23, 24, 25, 26, EOS])
    packed = torch.cat([first, second])[None]
    positions = torch.from_numpy(document_positions(packed.numpy(), EOS))
    with torch.no_grad():
        alone = model(input_ids=second[None]).logits[0]
        masked = model(input_ids=packed, position_ids=positions).logits[0, len(first) :]
        unmasked = model(input_ids=packed).logits[0, len(first) :]
        first_alone = model(input_ids=first[None]).logits[0]
        first_masked = model(input_ids=packed, position_ids=positions).logits[0, : len(first)]
    torch.testing.assert_close(masked, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(first_masked, first_alone, atol=1e-5, rtol=1e-4)
    assert (unmasked - alone).abs().max() > 1e-3, "without the mask B sees A"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_token_loss_of_packed_documents_is_the_sum_alone(family: str) -> None:
    """Through the training forward (chunked head): the summed loss of a packed window
    with document positions is the sum of each document's loss alone."""
    from transformers import AutoModelForCausalLM

    from training.models.loss import attach_token_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(family)).eval()
    attach_token_loss(model)
    docs = [torch.tensor([7, 8, 9, EOS, 3]), torch.tensor([20, 21, 22, 23, EOS, 5])]
    packed = torch.cat([d[:-1] for d in docs])[None]  # inputs; labels are the next tokens
    labels = torch.cat([d[1:] for d in docs])[None]
    positions = torch.from_numpy(document_positions(packed.numpy(), EOS))

    def loss(ids: torch.Tensor, targets: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, labels=targets, token_loss=True, **kw)

    with torch.no_grad():
        together = loss(packed, labels, position_ids=positions)
        apart = sum(loss(d[None, :-1], d[None, 1:]) for d in docs)
    torch.testing.assert_close(together, apart, atol=1e-4, rtol=1e-5)


def test_flex_attention_is_a_choice_that_trains_on_cuda_only() -> None:
    from training.models.build import check_attention

    model = load_config(None, ["train.micro_batch_size=1", "model.attention=flex_attention"]).model
    check_attention(model, cuda=True)
    with pytest.raises(TrainingError, match=r"^model.attention: flex_attention trains on CUDA"):
        check_attention(model, cuda=False)
    with pytest.raises(ConfigError, match=r"model.attention: must be one of 'sdpa'"):
        load_config(None, ["train.micro_batch_size=1", "model.attention=flash"])
