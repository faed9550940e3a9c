"""Any causal LM: `model.config` builds each type through its transformers config class
(keys checked against it, ids from the tokenizer), bad input is one line, and document
masking keeps attention inside each packed document: a token's loss does not change when
an earlier document of its window changes (and does without the mask, so the test can
fail), for every tested family."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.config import ConfigError, load_config
from sharding.loader import document_positions
from tests.tiny import tiny_arch
from training import model_registry as registry
from training.errors import TrainingError
from training.models.build import fingerprint_diff, load_hf_config, model_fingerprint

EOS = 1
# The families the acceptance matrix trains (tests/distributed/test_families.py).
FAMILIES = ["gpt2", "llama", "qwen2", "mistral", "qwen3", "gemma3_text", "phi3", "olmo2"]
MOE = ["mixtral", "qwen3_moe"]


def tiny(family: str) -> dict:
    """`model.config` of a tiny model of `family` (tests.tiny)."""
    return tiny_arch(family)


def hf_config(family: str, vocab_size: int = 50) -> object:
    cfg = load_config(
        None, ["train.micro_batch_size=1", f"model.config={json.dumps(tiny(family))}"]
    )
    return load_hf_config(cfg.model, vocab_size=vocab_size, eos_id=EOS, seq_len=32)


@pytest.mark.parametrize("family", FAMILIES + MOE)
def test_fresh_config_is_the_type_class_with_the_tokenizers_ids(family: str) -> None:
    config = hf_config(family)
    assert type(config) is registry.config_class(family)
    assert config.vocab_size == 50 and config.eos_token_id == config.bos_token_id == EOS
    assert config.pad_token_id is None  # a family default (phi3: 32000) would not fit
    if family != "gpt2":
        assert (config.num_key_value_heads, config.num_hidden_layers) == (2, 2)
    assert (registry.moe(config) is not None) == (family in MOE)


def test_llama_defaults_derive_kv_heads_and_swiglu_width() -> None:
    config = hf_config("llama")
    small = load_config(None, ["train.micro_batch_size=1", "model.config.type=llama"]).model
    default = load_hf_config(small, vocab_size=50, eos_id=EOS, seq_len=32)
    assert default.num_key_value_heads == default.num_attention_heads == 12
    assert default.intermediate_size == 2048 and default.hidden_size == 768  # 8/3 · 768 → 256s
    assert config.head_dim == 32 // 4


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
            "model.config.n_embd: not a llama config key",
        ),
        (
            ["model.config.type=qwen2", "model.config.num_kv_heads=2"],
            "model.config.num_kv_heads: not a qwen2 config key (did you mean "
            "'num_key_value_heads'?)",
        ),
        (
            [
                "model.config.type=mistral",
                "model.config.num_attention_heads=12",
                "model.config.num_key_value_heads=5",
            ],
            "model.config.num_key_value_heads: 5 does not divide num_attention_heads=12",
        ),
        (["model.config.n_embd=100"], "model.config.n_embd: 100 is not divisible by n_head=12"),
        (["model.config.type=qwen4"], "model.config.type: unknown model type 'qwen4' (did you"),
        (["model.config.type=t5"], "model.config.type: 't5' is not a causal LM"),
        (["model.config.vocab_size=10"], "model.config.vocab_size: set by the run"),
    ],
)
def test_bad_model_config_is_one_line(overrides: list[str], expected: str) -> None:
    cfg = load_config(None, ["train.micro_batch_size=1", *overrides])
    with pytest.raises(TrainingError) as info:
        load_hf_config(cfg.model, vocab_size=50, eos_id=EOS, seq_len=32)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_size_that_is_not_a_count_fails_at_load() -> None:
    with pytest.raises(ConfigError, match=r"model.config.n_layer: must be >= 1, got 0"):
        load_config(None, ["train.micro_batch_size=1", "model.config.n_layer=0"])


def test_pretrained_dir_that_is_not_a_causal_lm_is_refused(tmp_path: Path) -> None:
    from transformers import T5Config

    T5Config(vocab_size=50, d_model=16, num_layers=1, num_heads=2).save_pretrained(tmp_path)
    cfg = load_config(None, ["train.micro_batch_size=1", f"model.name_or_path={tmp_path}"])
    with pytest.raises(TrainingError) as info:
        load_hf_config(cfg.model, vocab_size=50, eos_id=EOS, seq_len=32)
    assert f"model.name_or_path: {tmp_path}: 't5' is not a causal LM" in str(info.value)


def test_remote_code_needs_the_opt_in(tmp_path: Path) -> None:
    data = {"model_type": "my_lm", "auto_map": {"AutoModelForCausalLM": "modeling_my.MyLM"}}
    (tmp_path / "config.json").write_text(json.dumps(data))
    cfg = load_config(None, ["train.micro_batch_size=1", f"model.name_or_path={tmp_path}"])
    with pytest.raises(
        TrainingError, match=r"ships its own model code .* model.trust_remote_code=true"
    ):
        load_hf_config(cfg.model, vocab_size=50, eos_id=EOS, seq_len=32)


def test_document_positions_restart_after_each_eos() -> None:
    inputs = np.array([[5, EOS, 3, 4, EOS, EOS, 7, 8], [EOS, 2, 2, 2, 2, 2, 2, EOS]])
    assert document_positions(inputs, EOS).tolist() == [
        [0, 1, 0, 1, 2, 0, 0, 1],
        [0, 0, 1, 2, 3, 4, 5, 6],
    ]


@pytest.mark.parametrize("family", FAMILIES + MOE)
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


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3_moe"])
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
        return model(input_ids=ids, labels=targets, token_loss=True, **kw)["ce_sum"]

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


@pytest.mark.parametrize("family", FAMILIES + MOE)
def test_a_tokens_loss_ignores_earlier_documents_of_its_window(family: str) -> None:
    """Through the training forward (chunked head, per-document positions): the loss of
    the last document's tokens is the same whatever document precedes it in the window,
    and changes with it when the positions are left out (so the test can fail)."""
    from transformers import AutoModelForCausalLM

    from sharding.loader import IGNORE_INDEX
    from training.models.loss import attach_token_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(family)).eval()
    attach_token_loss(model)
    last = torch.tensor([20, 21, 22, 23, 24, 25, EOS])
    losses = {}
    for name, first in (("a", [7, 8, 9, 10, EOS]), ("b", [30, 12, 41, 5, EOS])):
        window = torch.cat([torch.tensor(first), last])
        ids, labels = window[None, :-1], window[None, 1:].clone()
        labels[0, : len(first)] = IGNORE_INDEX  # only tokens predicted inside the last document
        positions = torch.from_numpy(document_positions(ids.numpy(), EOS))
        with torch.no_grad():
            masked = model(input_ids=ids, labels=labels, position_ids=positions, token_loss=True)
            plain = model(input_ids=ids, labels=labels, token_loss=True)
        losses[name] = (float(masked["ce_sum"]), float(plain["ce_sum"]))
    assert losses["a"][0] == pytest.approx(losses["b"][0], rel=1e-5, abs=1e-5)
    assert abs(losses["a"][1] - losses["b"][1]) > 1e-4, "without positions it sees A"


@pytest.mark.parametrize("family", MOE)
def test_moe_aux_loss_is_the_models_own_added_once(family: str) -> None:
    """The objective is the summed token loss + coef · aux · targets, with aux the model's
    own load-balancing loss: divided by the targets it is HF's own training loss."""
    from transformers import AutoModelForCausalLM

    from training.models.loss import attach_token_loss

    torch.manual_seed(0)
    config = hf_config(family)
    model = AutoModelForCausalLM.from_config(config).eval()
    attach_token_loss(model)
    window = torch.randint(2, 50, (2, 17))
    ids, labels = window[:, :-1], window[:, 1:].contiguous()
    with torch.no_grad():
        ours = model(input_ids=ids, labels=labels, token_loss=True)
        theirs = model(input_ids=ids, labels=labels, shift_labels=labels, output_router_logits=True)
    coef = registry.moe(config).aux_loss_coef
    assert coef > 0 and float(ours["aux_loss"]) == pytest.approx(float(theirs.aux_loss), 1e-5)
    assert float(ours["loss"]) / labels.numel() == pytest.approx(float(theirs.loss), 1e-5)
    assert float(ours["ce_sum"]) / labels.numel() == pytest.approx(
        float(theirs.loss) - coef * float(theirs.aux_loss), 1e-5
    )


def test_expert_load_shows_a_collapsed_router() -> None:
    """A router forced onto the same experts for every token: the busiest gets every token
    (share 1.0, over the default alert threshold); a random router stays near top_k /
    experts."""
    from transformers import AutoModelForCausalLM

    from training.config import TrainConfig
    from training.models.loss import attach_token_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config("qwen3_moe")).eval()
    attach_token_loss(model)
    ids = torch.randint(2, 50, (2, 16))
    with torch.no_grad():
        balanced = float(model(input_ids=ids, labels=ids, token_loss=True)["expert_load_max"])
        for layer in model.model.layers:  # every token scores every expert alike: the
            layer.mlp.gate.weight.zero_()  # top-k picks the same experts for all of them
        collapsed = model(input_ids=ids, labels=ids, token_loss=True)["expert_load_max"]
    assert 0.5 <= balanced < 1.0  # top_k / experts = 0.5 when balanced
    assert float(collapsed) == 1.0 > TrainConfig().expert_load_alert


@pytest.mark.parametrize("family", ["gpt2", "qwen3", "qwen3_moe"])
def test_flattened_windows_keep_documents_apart(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flash_attention_2 sees a micro-batch as one flattened row (its variable-length path
    needs a batch of one); with sdpa standing in, the loss is the unflattened one."""
    from transformers import AutoModelForCausalLM

    from training.models import loss as loss_mod

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(family)).eval()
    loss_mod.attach_token_loss(model)
    window = torch.randint(2, 50, (3, 17))
    window[:, 5] = EOS
    window[1, 11] = EOS
    ids, labels = window[:, :-1], window[:, 1:].contiguous()
    positions = torch.from_numpy(document_positions(ids.numpy(), EOS))
    with torch.no_grad():
        rows = model(input_ids=ids, labels=labels, position_ids=positions, token_loss=True)
        monkeypatch.setattr(loss_mod, "_varlen", lambda config: True)
        flat = model(input_ids=ids, labels=labels, position_ids=positions, token_loss=True)
    assert float(flat["ce_sum"]) == pytest.approx(float(rows["ce_sum"]), rel=1e-5)
    assert loss_mod.flatten_windows({"input_ids": ids}) is None  # no positions: as is
