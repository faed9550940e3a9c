"""Pure parts of fine-tuning: LoRA target defaults and checks, freeze selection, added
tokens, mean-initialised vocabulary growth, and the config section."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from launcher.config import ConfigError, load_config
from training.errors import TrainingError
from training.model_config import FreezeConfig, ModelConfig, PeftConfig
from training.models.finetune import (
    added_tokens,
    check_finetune,
    param_counts,
    resize_vocab,
    select_frozen,
    target_modules,
)

NAMES = [
    "transformer.wte.weight",
    "transformer.wpe.weight",
    *(
        f"transformer.h.{i}.{p}"
        for i in range(3)
        for p in ("ln_1.weight", "attn.c_attn.weight", "mlp.c_fc.weight")
    ),
    "transformer.ln_f.weight",
]
BLOCKS = ("transformer.h", 3)
EMBEDDINGS = {"transformer.wte.weight", "transformer.wpe.weight"}


def _gpt2(**kwargs: object):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=3, n_head=2, **kwargs)


def _tiny(model_type: str, **sizes: object):
    from transformers import AutoModelForCausalLM

    from training.model_registry import fresh_config

    arch = {"type": model_type, **sizes}
    return AutoModelForCausalLM.from_config(fresh_config(arch, vocab_size=50, eos_id=1))


LLAMA_SIZES = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 32}


def test_default_targets_are_the_blocks_linear_layers_found_on_the_model() -> None:
    from transformers import AutoModelForCausalLM

    lora = PeftConfig(method="lora")
    gpt2 = AutoModelForCausalLM.from_config(_gpt2())
    assert target_modules(lora, gpt2) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    attention = [f"self_attn.{p}_proj" for p in "qkvo"]
    mlp = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert target_modules(lora, _tiny("llama", **LLAMA_SIZES)) == attention + mlp
    moe = _tiny("qwen3_moe", **LLAMA_SIZES, num_experts=4, num_experts_per_tok=2)
    assert target_modules(lora, moe) == attention  # fused experts aside, the router too
    chosen = PeftConfig(method="lora", target_modules=["c_fc"])
    assert target_modules(chosen, gpt2) == ["c_fc"]


def test_lora_on_fused_experts_names_target_parameters() -> None:
    from training.models.build import load_hf_config

    sizes = {**LLAMA_SIZES, "num_experts": 4, "num_experts_per_tok": 2, "type": "qwen3_moe"}
    experts = PeftConfig(method="lora", target_modules=["experts"])
    model = ModelConfig(name_or_path="x", peft=experts, config=sizes)
    fresh = ModelConfig(config=sizes)
    config = load_hf_config(fresh, vocab_size=50, eos_id=1, seq_len=16)
    with pytest.raises(TrainingError) as err:
        check_finetune(model, config)
    assert str(err.value) == (
        "model.peft.target_modules: 'experts' holds fused expert weights (3-D parameters), "
        "not linear layers; adapt them with model.peft.target_parameters="
        "[experts.down_proj, experts.gate_up_proj]"
    )
    fixed = PeftConfig(method="lora", target_parameters=["experts.gate_up_proj"])
    check_finetune(ModelConfig(name_or_path="x", peft=fixed, config=sizes), config)
    typo = PeftConfig(method="lora", target_parameters=["experts.up"])
    with pytest.raises(TrainingError, match=r"target_parameters: 'experts.up' matches no param"):
        check_finetune(ModelConfig(name_or_path="x", peft=typo, config=sizes), config)


def test_freeze_selection() -> None:
    sel = select_frozen(NAMES, FreezeConfig(first_blocks=2), blocks=BLOCKS, embeddings=EMBEDDINGS)
    assert sel == {n for n in NAMES if n.startswith(("transformer.h.0.", "transformer.h.1."))}
    sel = select_frozen(
        NAMES,
        FreezeConfig(embeddings=True, patterns=["*.ln_*"]),
        blocks=None,
        embeddings=EMBEDDINGS,
    )
    assert sel == EMBEDDINGS | {n for n in NAMES if ".ln_" in n}
    with pytest.raises(TrainingError, match="model.freeze.first_blocks: 4 but the model has 3"):
        select_frozen(NAMES, FreezeConfig(first_blocks=4), blocks=BLOCKS, embeddings=EMBEDDINGS)
    with pytest.raises(TrainingError, match=r"model.freeze.patterns: '\*.bias' matches no"):
        select_frozen(NAMES, FreezeConfig(patterns=["*.bias"]), blocks=None, embeddings=set())


def test_check_finetune_on_a_meta_model() -> None:
    lora = ModelConfig(name_or_path="x", peft=PeftConfig(method="lora"))
    check_finetune(lora, _gpt2())  # default targets exist
    bad = ModelConfig(name_or_path="x", peft=PeftConfig(method="lora", target_modules=["q_proj"]))
    with pytest.raises(TrainingError) as err:
        check_finetune(bad, _gpt2())
    message = str(err.value)
    assert message.startswith("model.peft.target_modules: 'q_proj' matches no module of the gpt2")
    assert "c_attn" in message and "\n" not in message
    norm = PeftConfig(method="lora", target_modules=["ln_1"])
    not_linear = ModelConfig(name_or_path="x", peft=norm)
    with pytest.raises(TrainingError, match="'ln_1' matches no linear layer"):
        check_finetune(not_linear, _gpt2())
    with pytest.raises(TrainingError, match="first_blocks: 5 but the model has 3 blocks"):
        check_finetune(ModelConfig(freeze=FreezeConfig(first_blocks=5)), _gpt2())


def test_lora_freeze_and_counts_on_a_real_tiny_model() -> None:
    from transformers import AutoModelForCausalLM

    from training.models.finetune import apply_finetune

    lm = AutoModelForCausalLM.from_config(_gpt2())
    total = sum(p.numel() for p in lm.parameters())
    frozen = apply_finetune(lm, ModelConfig(freeze=FreezeConfig(first_blocks=1)))
    block = sum(p.numel() for p in lm.transformer.h[0].parameters())
    assert param_counts(frozen) == {"params_trainable": total - block, "params_total": total}
    lora = apply_finetune(
        AutoModelForCausalLM.from_config(_gpt2()),
        ModelConfig(name_or_path="x", peft=PeftConfig(method="lora", r=2)),
    )
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 3 * 4 * 2  # 3 blocks × (c_attn, c_proj twice, c_fc) × (A, B)


def test_resize_vocab_new_rows_are_the_mean() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    for tied in (True, False):
        lm = AutoModelForCausalLM.from_config(_gpt2(tie_word_embeddings=tied))
        old = lm.get_input_embeddings().weight.detach().clone()
        resize_vocab(lm, 53)
        new = lm.get_input_embeddings().weight
        assert new.shape == (53, 16) and lm.config.vocab_size == 53
        torch.testing.assert_close(new[:50], old, rtol=0, atol=0)
        for row in new[50:]:
            torch.testing.assert_close(row, old.mean(dim=0))
        head = lm.get_output_embeddings().weight
        assert head.shape == (53, 16) and (head is new) == tied
        resize_vocab(lm, 40)  # never shrinks
        assert lm.get_input_embeddings().weight.shape[0] == 53


def test_added_tokens_inline_or_file(tmp_path: Path) -> None:
    assert added_tokens(ModelConfig(add_tokens=["<a>", "<b>"])) == ["<a>", "<b>"]
    file = tmp_path / "tokens.txt"
    file.write_text("<a>\n\n  <b>  \n")
    assert added_tokens(ModelConfig(add_tokens=str(file))) == ["<a>", "<b>"]
    assert added_tokens(ModelConfig(add_tokens="<a>,<b>,<a>")) == ["<a>", "<b>"]
    with pytest.raises(TrainingError, match="model.add_tokens: .*nope.txt: no such file"):
        added_tokens(ModelConfig(add_tokens=str(tmp_path / "nope.txt")))


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.peft.method=lora", "model.peft.method: lora adapts a pretrained model"),
        ("model.peft.r=0", "model.peft.r: must be >= 1"),
        ("model.peft.method=qlora", "model.peft.method: must be one of 'none' | 'lora'"),
        ("model.freeze.first_blocks=-1", "model.freeze.first_blocks: must be >= 0"),
        ("model.add_tokens=[a, a]", "model.add_tokens: 'a' is listed twice"),
    ],
)
def test_finetune_config_errors(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)


def test_finetune_config_loads() -> None:
    batch = "train.micro_batch_size=1"
    cfg = load_config(
        None,
        [
            batch,
            "model.name_or_path=m",
            "model.add_tokens=tokens.txt",
            "model.peft={method: lora, alpha: 32}",
        ],
    )
    assert cfg.model.peft == PeftConfig(method="lora", alpha=32.0)
    assert cfg.model.add_tokens == "tokens.txt"
    assert load_config(None, [batch, "model.add_tokens=[x, y]"]).model.add_tokens == ["x", "y"]


def test_export_merges_unless_adapter_is_asked_for() -> None:
    from launcher.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["export", "runs/x", "--out", "hf"]).adapter is False
    assert parse(["export", "runs/x", "--out", "hf", "--merge"]).adapter is False
    assert parse(["export", "runs/x", "--out", "hf", "--adapter"]).adapter is True


def test_a_checkpoints_config_sections_are_read_by_the_config_converter() -> None:
    from tests.unit.test_training_pure import sample_meta

    saved = load_config(
        None, ["train.micro_batch_size=1", "model.peft.r=4", "deepspeed.zero_stage=3"]
    )
    as_recorded = dataclasses.asdict(saved)
    meta = dataclasses.replace(sample_meta(2), config=as_recorded)
    assert meta.model_config == saved.model and meta.deepspeed_config == saved.deepspeed
    older = {k: v for k, v in as_recorded["model"].items() if k not in ("compile", "freeze")}
    meta.config = {**as_recorded, "model": older}
    assert meta.model_config.compile == ModelConfig().compile  # a default
    meta.config = {**as_recorded, "model": {**older, "peft": {**older["peft"], "r": "four"}}}
    with pytest.raises(TrainingError, match=r"checkpoint config: model.peft.r: expected int"):
        _ = meta.model_config


def test_lora_on_fused_experts_trains_through_peft_target_parameters() -> None:
    """peft's LoRA on the 3-D expert parameters of an MoE (`target_parameters`): only the
    adapters train, and the loss head's backward reaches them."""
    import torch

    from training.models.finetune import apply_finetune
    from training.models.loss import attach_token_loss

    torch.manual_seed(0)
    moe = _tiny("qwen3_moe", **LLAMA_SIZES, num_experts=4, num_experts_per_tok=2)
    attach_token_loss(moe)
    peft = PeftConfig(method="lora", r=2, target_parameters=["experts.gate_up_proj"])
    lora = apply_finetune(moe, ModelConfig(name_or_path="x", peft=peft))
    trainable = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    assert any("experts" in n for n in trainable) and all("lora_" in n for n in trainable)
    ids = torch.randint(2, 50, (2, 8))
    lora(input_ids=ids, labels=ids, token_loss=True)["loss"].backward()
    grads = {n: p.grad for n, p in trainable.items() if "experts" in n}
    # B starts at zero (LoRA's init), so only B's gradient is nonzero at the first step
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
