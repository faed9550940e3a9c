"""`gptrain plan` for any causal LM: the meta-device shape is the built model's, published
models' sizes come out of their config.json alone (dense and MoE, total and active),
LoRA counts are peft's, and a bad config.json is one line naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.tiny import tiny_arch
from training import model_registry as registry
from training.errors import TrainingError
from training.models import shape as S

TYPES = ["gpt2", "llama", "qwen3", "mixtral", "qwen3_moe", "gemma3_text"]

# config.json of published models, as on the Hugging Face Hub.
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


def tiny_config(model_type: str):
    return registry.fresh_config(tiny_arch(model_type), vocab_size=96, eos_id=0)


def pretrained_dir(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / data.get("model_type", "model")
    path.mkdir()
    (path / "config.json").write_text(json.dumps(data))
    return path


def report_of(model_dir: Path):
    from launcher.config import load_config
    from launcher.plan import build_report

    cfg = load_config(None, ["train.micro_batch_size=1", f"model.name_or_path={model_dir}"])
    return build_report(cfg, "x", gpu="H100-80GB")


@pytest.mark.parametrize("model_type", TYPES)
def test_meta_device_counts_are_the_real_models(model_type: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    shape = S.shape_of(config)
    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(config)
    assert shape.n_params == sum(p.numel() for p in real.parameters())
    assert shape.param_numels() == [p.numel() for p in real.parameters()]
    assert shape.n_layer == 2 and shape.hidden == 32
    sizes = registry.moe(config)
    assert bool(shape.n_experts) == (sizes is not None)
    if sizes is not None:  # routed experts: 3 matrices (gate, up, down) of h × f each
        assert shape.expert_params == 2 * 4 * 3 * 32 * shape.ffn_hidden // 2
        assert shape.active_params == shape.n_params - shape.expert_params // 2


def test_published_models_from_their_config_json(tmp_path: Path) -> None:
    from launcher.plan import format_report

    expect = {  # (total, active, tolerance)
        "qwen3": (QWEN3_8B, 8.19e9, 8.19e9, 0.01),
        "mixtral": (MIXTRAL_8X7B, 46.7e9, 12.9e9, 0.02),
        "qwen3_moe": (QWEN3_30B_A3B, 30.5e9, 3.35e9, 0.02),
    }
    for name, (data, total, active, tolerance) in expect.items():
        report = report_of(pretrained_dir(tmp_path, data))
        shape = report.shape
        assert shape.n_params == pytest.approx(total, rel=tolerance), name
        assert shape.active_params == pytest.approx(active, rel=tolerance), name
        assert report.plan.n_params == shape.n_params  # memory from the total
        text = format_report(report)
        moe = f"active ({data.get('num_experts_per_tok')} of" in text
        assert moe == (name != "qwen3"), text.splitlines()[1]
    assert shape.gated_mlp and shape.rms_norm and shape.ffn_hidden == 8 * 768  # per token


def test_moe_flops_count_the_active_parameters(tmp_path: Path) -> None:
    """The trainer's MFU numerator and the plan's step time: 6 FLOPs per active
    parameter that multiplies (an MoE token uses 2 of Mixtral's 8 experts)."""
    from training import plan as P
    from training.models.flops import model_flops_per_token

    config = S.config_from_dict(MIXTRAL_8X7B, "config.json")
    shape = S.shape_of(config)
    per_token = model_flops_per_token(config, shape.n_params, 4096)
    lookups = 32000 * 4096  # the untied input embedding
    assert per_token == pytest.approx(6 * (shape.active_params - lookups) + 12 * 32 * 4096 * 4096)
    s = report_of(pretrained_dir(tmp_path, MIXTRAL_8X7B)).setup
    tokens = s.seq_len * s.micro_batch_size * s.grad_accum_steps * s.world_size
    assert P.step_flops(shape, s) == pytest.approx(
        model_flops_per_token(config, shape.n_params, s.seq_len) * tokens
    )


@pytest.mark.parametrize("model_type", ["gpt2", "qwen3_moe"])
def test_lora_counts_are_peft_s(model_type: str) -> None:
    """Default targets (every linear layer of a block, router aside), and LoRA on fused
    experts through `target_parameters`: what peft allocates."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    real = AutoModelForCausalLM.from_config(config)
    targets = registry.lora_targets(real)
    params = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if model_type != "gpt2" else []
    lora = LoraConfig(
        r=4,
        target_modules=targets,
        target_parameters=params or None,
        fan_in_fan_out=registry.uses_conv1d(real, targets),
    )
    peft_model = get_peft_model(real, lora)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert S.lora_params(config, 4, None, params or None) == trainable
    one, fan_out = ("c_attn", 96) if model_type == "gpt2" else ("q_proj", 32)
    assert S.lora_params(config, 4, [one]) == 2 * 4 * (32 + fan_out)


def test_freezing_counts_the_embeddings_and_first_blocks() -> None:
    config = tiny_config("qwen3_moe")
    shape = S.shape_of(config)
    lm = S.meta_model(config)
    embed = sum(p.numel() for p in lm.get_input_embeddings().parameters())
    block = sum(p.numel() for p in lm.model.layers[0].parameters())
    assert S.unfrozen_params(shape, True, 1) == shape.n_params - embed - block


def test_a_bad_config_json_is_one_line_naming_the_file(tmp_path: Path) -> None:
    from launcher.config import load_config
    from launcher.plan import model_shape

    cases = {
        "vit": ({"model_type": "vit", "hidden_size": 64}, "is not a causal LM"),
        "missing": ({"hidden_size": 64, "num_hidden_layers": 2}, "no 'model_type'"),
    }
    for name, (data, fragment) in cases.items():
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(data))
        cfg = load_config(None, ["train.micro_batch_size=1", f"model.name_or_path={path}"])
        with pytest.raises(TrainingError) as err:
            model_shape(cfg, [])
        message = str(err.value)
        assert fragment in message and str(path / "config.json") in message, message
        assert "\n" not in message
    result = run_cli("plan", "configs/demo-cpu.yaml", "--set", f"model.name_or_path={path}")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "no 'model_type'" in result.stderr


def test_plan_cli_prints_total_and_active_params(tmp_path: Path) -> None:
    model_dir = pretrained_dir(tmp_path, QWEN3_30B_A3B)
    args = ("plan", "configs/demo-cpu.yaml", "--set", f"model.name_or_path={model_dir}")
    result = run_cli(*args, "--gpu", "H100-80GB", "--json")
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)["model"]
    assert model["n_params"] == pytest.approx(30.5e9, rel=0.02)
    assert model["active_params"] == pytest.approx(3.35e9, rel=0.02)
    assert (model["n_experts"], model["top_k"]) == (128, 8)
    table = run_cli(*args, "--gpu", "H100-80GB").stdout
    assert "qwen3_moe 30.5B params, 3.35B active (8 of 128 experts per token)" in table
