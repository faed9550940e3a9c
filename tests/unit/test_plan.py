"""`gptrain plan`: the formulas against hand-computed cases, the CLI, and launch's refusal."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from tests.conftest import ROOT, run_cli
from training import plan as P
from training.models import shape as S

XL = "configs/gpt2-xl-zero3-multinode.yaml"
# GPT-2 XL (1.5B): V=50257, P=1024, h=1600, L=48, a=25
GPT2_XL_FILE = {
    "model_type": "gpt2",
    "n_layer": 48,
    "n_embd": 1600,
    "n_head": 25,
    "vocab_size": 50257,
    "n_positions": 1024,
}
GPT2_XL = S.shape_from_hf_config(GPT2_XL_FILE)
# Llama-2-7B's config.json
LLAMA_7B = S.shape_from_hf_config(
    {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 11008,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    }
)


def setup(**kw) -> P.Setup:
    base = dict(
        zero_stage=0,
        precision="bf16",
        world_size=32,
        ranks_per_node=8,
        micro_batch_size=1,
        grad_accum_steps=1,
        seq_len=1024,
        activation_checkpointing=False,
        ds_zero={"reduce_bucket_size": 5e7},
    )
    return P.Setup(**{**base, **kw})


def test_parameter_counts_match_the_published_models() -> None:
    # V·h + P·h + L·(12h² + 13h) + 2h; GPT-2 XL is 1,557,611,200
    assert GPT2_XL.n_params == 50257 * 1600 + 1024 * 1600 + 48 * (12 * 1600**2 + 13 * 1600) + 3200
    assert GPT2_XL.n_params == 1_557_611_200
    # 2·V·h + L·(4h² + 3·h·f + 2h) + h
    per_layer = 4 * 4096**2 + 3 * 4096 * 11008 + 8192
    assert LLAMA_7B.n_params == 2 * 32000 * 4096 + 32 * per_layer + 4096
    assert LLAMA_7B.n_params == 6_738_415_616
    # what the activation formulas read, derived from the built modules
    assert (GPT2_XL.gated_mlp, GPT2_XL.rms_norm, GPT2_XL.block_norms) == (False, False, 2)
    assert (GPT2_XL.ffn_hidden, GPT2_XL.n_positions, GPT2_XL.tied_embeddings) == (6400, 1024, True)
    assert (LLAMA_7B.gated_mlp, LLAMA_7B.rms_norm, LLAMA_7B.block_norms) == (True, True, 2)
    assert (LLAMA_7B.ffn_hidden, LLAMA_7B.n_positions, LLAMA_7B.tied_embeddings) == (
        11008,
        0,
        False,
    )
    h = 1600  # one GPT-2 block: ln_1, c_attn, c_proj, ln_2, c_fc, mlp.c_proj (weight, bias)
    block = [h, h, h * 3 * h, 3 * h, h * h, h, h, h, h * 4 * h, 4 * h, 4 * h * h, h]
    assert GPT2_XL.layer_numels() == block
    assert GPT2_XL.active_params == GPT2_XL.n_params  # dense


def test_model_states_per_zero_stage_gpt2_xl_bf16_on_32_ranks() -> None:
    psi, n = 1_557_611_200, 32
    expect = {  # (params, grads, optimizer) = ZeRO paper's 2Ψ + 2Ψ + 12Ψ, partitioned
        0: (2 * psi, 2 * psi, 12 * psi),
        1: (2 * psi, 2 * psi, 12 * psi / n),
        2: (2 * psi, 2 * psi / n, 12 * psi / n),
        # ZeRO-3 keeps tensors < 1e5 elements whole: 48 layers × 20,800 (norms, biases) + ln_f
        3: (2 * psi / n + 2 * (48 * 20_800 + 3200), 2 * psi / n, 12 * psi / n),
    }
    for stage, (params, grads, optimizer) in expect.items():
        got = P.model_state_bytes(GPT2_XL, setup(zero_stage=stage))
        assert (got["params"], got["grads"], got["optimizer"]) == (
            round(params),
            round(grads),
            round(optimizer),
        ), stage
    # 16Ψ = 24.9 GB: the ZeRO paper's "GPT-2 1.5B needs at least 24 GB" without ZeRO
    assert sum(P.model_state_bytes(GPT2_XL, setup()).values()) == 16 * psi


def test_fp32_has_no_master_copy_at_stage_0_but_deepspeed_clones_one_from_stage_1() -> None:
    psi = GPT2_XL.n_params
    s0 = P.model_state_bytes(GPT2_XL, setup(precision="fp32", world_size=2))
    assert (s0["params"], s0["grads"], s0["optimizer"]) == (4 * psi, 4 * psi, 8 * psi)
    s1 = P.model_state_bytes(GPT2_XL, setup(precision="fp32", world_size=2, zero_stage=1))
    assert s1["optimizer"] == 12 * psi / 2


def test_llama_7b_zero3_on_8_ranks_and_offload() -> None:
    psi = 6_738_415_616
    s = setup(zero_stage=3, world_size=8, seq_len=4096)
    got = P.model_state_bytes(LLAMA_7B, s)
    assert got["params"] == 2 * psi / 8 + 2 * 65 * 4096  # 65 RMSNorm weights stay whole
    assert got["grads"] == 2 * psi / 8
    assert got["optimizer"] == 12 * psi / 8
    off = P.model_state_bytes(LLAMA_7B, replace(s, offload_optimizer=True, offload_params=True))
    assert off["optimizer"] == off["grads"] == 0
    assert off["params"] == 2 * 65 * 4096
    assert off["offload_cpu"] == round(12 * psi / 8 + 4 * psi / 8 + 2 * psi / 8)


def test_activations_gpt2_xl_by_hand() -> None:
    s, b, h, v, layers = 1024, 1, 1600, 50257, 48
    sbh = s * b * h
    layer = 56 * sbh  # bf16: 2·(2 norms + 5 attention + 1 + 5·4 MLP)
    # the loss head's one chunk: 256 MiB of fp32 logits = 1335 rows > s·b = 1024 rows,
    # held as bf16 head output + fp32 upcast, log-probabilities and gradient (2 + 12 B)
    loss = 14 * 1024 * v
    off = layers * layer + 4 * sbh + max(loss, 16 * sbh)
    assert P.activation_bytes(GPT2_XL, setup()) == off == 5_131_057_152
    on = layers * 2 * sbh + 4 * sbh + max(loss, layer + 16 * sbh)
    assert P.activation_bytes(GPT2_XL, setup(activation_checkpointing=True)) == on
    assert on == 884_324_352
    # selective: half the blocks (every second one) recompute
    half = setup(activation_checkpointing=True, activation_checkpointing_fraction=0.5)
    assert P.activation_bytes(GPT2_XL, half) == 24 * layer + 24 * 2 * sbh + 4 * sbh + max(
        loss, layer + 16 * sbh
    )
    # eager attention keeps the a·s² softmax output per layer
    eager = replace(GPT2_XL, attention="eager")
    assert P.activation_bytes(eager, setup()) - off == layers * 2 * 25 * s * s * b
    # the layers grow linearly in the micro-batch; the loss chunk stops at 1335 rows
    four = 4 * (layers * layer + 4 * sbh) + 14 * 1335 * v
    assert P.activation_bytes(GPT2_XL, setup(micro_batch_size=4)) == four


def test_tiled_mlps_and_offloaded_checkpoints_by_hand() -> None:
    s, h, f, layers = 16384, 4096, 11008, 32
    sbh = s * h
    one = setup(seq_len=s, activation_checkpointing=True)
    base = P.activation_bytes(LLAMA_7B, one)
    loss = 14 * 2097 * 32000
    per_layer = 2 * (4 + 2) + 2 * (3 + 2) + 2 * (1 + 4 * f / h)
    assert base == round(layers * 2 * sbh + 8 * sbh + max(loss, per_layer * sbh + 4 * f / h * sbh))
    # tiled: a recomputed layer keeps its MLP's input only, the transient is one of the
    # 16384 / 4096 = 4 slices'
    tiled = replace(one, tiled_mlp=True)
    per_tiled = 2 * (4 + 2) + 2 * (3 + 2) + 2
    assert P.activation_bytes(LLAMA_7B, tiled) == round(
        layers * 2 * sbh + 8 * sbh + max(loss, per_tiled * sbh + 4 * f / h * sbh / 4)
    )
    # offloaded: one block input on the device instead of 32
    offload = replace(one, activation_checkpointing_offload=True)
    assert P.activation_bytes(LLAMA_7B, offload) == base - 31 * 2 * sbh
    # ... which wait in host memory: 32 block inputs per rank
    host = P.make_plan(LLAMA_7B, offload, device_bytes=None).offload_cpu_bytes_per_node
    assert host == 32 * 2 * sbh * one.ranks_per_node
    # too few tokens to slice (auto: one slice per 4096-token hidden size): nothing saved
    short = replace(tiled, seq_len=4096)
    assert P.activation_bytes(LLAMA_7B, short) == P.activation_bytes(
        LLAMA_7B, replace(short, tiled_mlp=False)
    )
    # both are suggested when activations do not fit
    total = P.make_plan(LLAMA_7B, one, device_bytes=2**50).total_bytes
    advice = P.alternatives(LLAMA_7B, one, budget_bytes=total - 1)
    assert any(a.startswith("model.tiled_mlp=true") for a in advice), advice
    assert any(a.startswith("model.activation_checkpointing_offload=true") for a in advice)


def test_activations_llama_7b_by_hand() -> None:
    sbh = 4096 * 4096
    per_layer = 2 * (4 + 2) + 2 * (3 + 2) + 2 * (1 + 4 * 11008 / 4096)  # = 45.5
    loss = 14 * 2097 * 32000  # a chunk: 256 MiB / (4 B × 32000) = 2097 rows
    expect = 32 * per_layer * sbh + 8 * sbh + max(loss, 10.75 * sbh)
    assert P.activation_bytes(LLAMA_7B, setup(seq_len=4096)) == round(expect) == 25_501_300_224


def test_comm_step_time_and_the_plan_of_gpt2_xl_on_4x8_h100() -> None:
    s = setup(zero_stage=3, micro_batch_size=4, grad_accum_steps=4, activation_checkpointing=True)
    psi = GPT2_XL.n_params
    assert P.comm_bytes_per_step(GPT2_XL, s, 0) == round(31 / 32 * 2 * psi * 2)
    assert P.comm_bytes_per_step(GPT2_XL, s, 2) == round(31 / 32 * 5 * psi * 2)
    assert P.comm_bytes_per_step(GPT2_XL, s) == round(31 / 32 * 4 * 3 * psi * 2)
    assert P.comm_bytes_per_step(GPT2_XL, replace(s, world_size=1)) == 0
    tokens = 4 * 4 * 32 * 1024
    flops = (6 * (psi - 1024 * 1600) + 12 * 48 * 1600 * 1024) * tokens  # positions: lookups
    assert P.step_time_s(GPT2_XL, s, 989, 0.4) == pytest.approx(flops / (32 * 989e12 * 0.4))
    plan = P.make_plan(
        GPT2_XL,
        s,
        device_bytes=81559 * 2**20,
        reserve_bytes=2 * P.GIB,
        peak_tflops=989,
        total_steps=1000,
    )
    assert plan.fits and plan.max_micro_batch_size > 4
    assert plan.time_to_budget_s == pytest.approx(1000 * plan.step_time_s)


def test_verdict_and_largest_micro_batch() -> None:
    s = setup(micro_batch_size=8)
    fixed = sum(P.model_state_bytes(GPT2_XL, s)[k] for k in ("params", "grads", "optimizer"))
    one = P.activation_bytes(GPT2_XL, s, micro_batch_size=1)
    device = fixed + 5 * one + one // 2  # room for 5.5 samples
    plan = P.make_plan(GPT2_XL, s, device_bytes=device)
    assert plan.fits is False and plan.max_micro_batch_size == 5
    assert P.make_plan(GPT2_XL, replace(s, micro_batch_size=5), device_bytes=device).fits
    assert P.make_plan(GPT2_XL, s, device_bytes=fixed // 2).max_micro_batch_size == 0
    assert P.make_plan(GPT2_XL, s, device_bytes=None).fits is None
    advice = P.alternatives(GPT2_XL, s, device)
    assert advice[0].startswith("model.activation_checkpointing=true")
    assert any(a.startswith("deepspeed.zero_stage=") for a in advice)
    assert advice[-1].startswith("train.micro_batch_size<=5")


def test_trainable_parameters_for_lora_and_freezing() -> None:
    r, h, layers = 8, 1600, 48
    xl = S.config_from_dict(GPT2_XL_FILE, "config.json")
    # default: every linear layer of a block, attention (c_attn, c_proj) and MLP (c_fc, c_proj)
    per_block = r * (h + 3 * h) + r * (h + h) + r * (h + 4 * h) + r * (4 * h + h)
    assert S.lora_params(xl, r) == layers * per_block
    llama = S.config_from_dict(
        {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
         "num_attention_heads": 32, "intermediate_size": 11008, "vocab_size": 32000},
        "config.json",
    )  # fmt: skip
    assert S.lora_params(llama, 16, ["q_proj", "v_proj"]) == 32 * 2 * 16 * (4096 + 4096)
    embeddings = 50257 * 1600 + 1024 * 1600
    assert S.unfrozen_params(GPT2_XL, True, 0) == GPT2_XL.n_params - embeddings
    assert S.unfrozen_params(GPT2_XL, False, 2) == GPT2_XL.n_params - 2 * (12 * h * h + 13 * h)
    lora = setup(zero_stage=2, world_size=8, trainable_params=S.lora_params(xl, r))
    got = P.model_state_bytes(GPT2_XL, lora)
    assert got["params"] == 2 * GPT2_XL.n_params  # the frozen base stays in bf16
    assert got["optimizer"] == round(12 * lora.trainable_params / 8)


# --- CLI -----------------------------------------------------------------------------------


def test_plan_json_for_the_multinode_config_on_h100() -> None:
    result = run_cli(
        "plan", XL, "--nodes", "4", "--gpus-per-node", "8", "--gpu", "H100-80GB", "--json"
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["model"]["n_params"] == 1_557_611_200
    assert out["setup"]["world_size"] == 32 and out["setup"]["zero_stage"] == 3
    assert out["device"]["name"] == "H100-80GB" and out["device"]["peak_tflops"] == 989.0
    plan = out["plan"]
    assert plan["fits"] is True and plan["max_micro_batch_size"] >= 4
    assert plan["time_to_budget_s"] > 0 and set(plan["comm_bytes_per_step"]) == {"0", "1", "2", "3"}
    table = run_cli("plan", XL, "--gpu", "h100-80gb").stdout
    assert "-> fits" in table and "largest micro-batch that fits" in table


def test_plan_on_cpu_uses_host_ram_and_tiny_configs_fit() -> None:
    result = run_cli("plan", "configs/demo-cpu.yaml", "--json", env={"DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["device"]["name"].startswith("CPU") and out["plan"]["fits"] is True
    assert out["plan"]["step_time_s"] is None  # no honest CPU peak


def test_plan_user_errors_are_one_line() -> None:
    for args, fragment in (
        (["--gpu", "TPU"], "--gpu TPU: unknown GPU"),
        (["--gpu-memory-gb", "0"], "--gpu-memory-gb: must be > 0"),
        (["--mfu", "2"], "--mfu: must be in (0, 1]"),
    ):
        result = run_cli("plan", XL, *args)
        assert result.returncode == 2 and fragment in result.stderr
        assert result.stderr.strip().count("\n") == 0


def test_planning_arithmetic_imports_no_heavy_library() -> None:
    """The formulas and the CLI's plan module import no torch; a plan builds the model on
    the meta device (torch, transformers) but never imports DeepSpeed."""
    code = (
        "import sys\n"
        "import training.plan, launcher.plan\n"
        "print([m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules])\n"
        "from launcher.config import load_config\n"
        "from launcher.plan import build_report, format_report\n"
        f"format_report(build_report(load_config('{XL}'), 'x', gpu='A100-40GB'))\n"
        "print('deepspeed' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["[]", "False"]


def test_launch_refuses_a_config_that_cannot_fit_unless_forced() -> None:
    # 2 "nodes" on the local backend: a launch that passes the plan fails right after it
    # with its own error, so --force is seen to skip the refusal without training anything
    args = ("launch", "configs/demo-cpu.yaml", "--nodes", "2", "--gpu-memory-gb", "0.05")
    refused = run_cli(*args)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    for fragment in ("does not fit", "GiB per rank", "activations", "try ", "--force"):
        assert fragment in refused.stderr, refused.stderr
    forced = run_cli(*args, "--force")
    assert forced.returncode == 2 and "does not fit" not in forced.stderr
    assert "launch.nodes: the local backend runs on one node" in forced.stderr
    dry = run_cli("launch", "configs/demo-cpu.yaml", "--dry-run", "--gpu-memory-gb", "0.05")
    assert dry.returncode == 0 and "# plan" in dry.stdout and "DOES NOT FIT" in dry.stdout


def test_launch_of_the_multinode_config_without_a_known_gpu_is_not_refused() -> None:
    dry = run_cli("launch", XL, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "memory unknown (pass --gpu NAME or --gpu-memory-gb G)" in dry.stdout


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mistral"])
def test_fresh_model_shape_and_flops_are_the_built_models(family: str) -> None:
    """`gptrain plan` of a fresh `model.config` (GQA, SwiGLU width, untied head, Qwen2's
    q/k/v biases) counts the parameters transformers builds, and its FLOPs per token are
    the trainer's MFU numerator (`training.models.flops`) for that model."""
    import torch
    from transformers import AutoModelForCausalLM

    from launcher.config import load_config
    from launcher.plan import model_shape
    from tests.tiny import tiny_arch
    from training.models.build import fresh_hf_config
    from training.models.flops import model_flops_per_token

    arch = tiny_arch(family, **({} if family == "gpt2" else {"tie_word_embeddings": False}))
    cfg = load_config(None, ["train.micro_batch_size=1", f"model.config={json.dumps(arch)}"])
    shape, _ = model_shape(cfg, [])
    assert shape.vocab_size == 50257 and shape.tied_embeddings == (family == "gpt2")
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(
            fresh_hf_config(cfg.model, vocab_size=shape.vocab_size, eos_id=0)
        )
    assert shape.n_params == sum(p.numel() for p in lm.parameters())
    s = setup(world_size=1, micro_batch_size=1, seq_len=32)
    assert P.step_flops(shape, s) == pytest.approx(
        32 * model_flops_per_token(lm.config, shape.n_params, 32)
    )
    lookups = shape.vocab_size * 32 if family != "gpt2" else 64 * 32  # untied input / wpe
    assert model_flops_per_token(lm.config, shape.n_params, 32) == pytest.approx(
        6 * (shape.n_params - lookups) + 12 * 2 * 32 * 32
    )


def test_sequence_parallel_divides_activations_and_adds_the_all_to_all() -> None:
    one = setup(zero_stage=3, world_size=8, seq_len=32768)
    sp = replace(one, sp_size=8)
    # every activation term is per local token: 32768 / 8 on each rank (sdpa: no scores)
    assert P.activation_bytes(LLAMA_7B, sp) == P.activation_bytes(
        LLAMA_7B, replace(one, seq_len=4096)
    )
    assert P.model_state_bytes(LLAMA_7B, sp) == P.model_state_bytes(LLAMA_7B, one)  # ZeRO: all 8
    assert P.step_flops(LLAMA_7B, sp) == pytest.approx(P.step_flops(LLAMA_7B, one) / 8)  # 1 stream
    # q, k, v and output (4 × 4096 wide) of 4096 local tokens, 7/8 sent, forward and backward
    per_layer = 4096 * 4 * 4096 * 7 / 8
    assert P.sequence_comm_bytes_per_step(LLAMA_7B, sp) == round(2 * per_layer * 32 * 2)
    assert P.sequence_comm_bytes_per_step(LLAMA_7B, one) == 0


def test_plan_refuses_what_sequence_parallelism_cannot_split(tmp_path) -> None:  # noqa: ANN001
    config = tmp_path / "sp.yaml"
    config.write_text(
        "model: {config: {type: llama, num_hidden_layers: 2, hidden_size: 256, "
        "num_attention_heads: 4, num_key_value_heads: 2, intermediate_size: 512}}\n"
        "data: {seq_len: 4096}\ntrain: {max_steps: 10, micro_batch_size: 1}\n"
        "deepspeed: {sequence_parallel_size: 8}\nlaunch: {nproc_per_node: 8}\n"
    )
    for sets, fragment in (
        ([], "deepspeed.sequence_parallel_size: 8 must divide the model's 4 attention heads"),
        (
            ["data.seq_len=4098", "deepspeed.sequence_parallel_size=4"],
            "does not divide data.seq_len 4098",
        ),
        (["deepspeed.sequence_parallel_size=3"], "3 does not divide the world size 8"),
    ):
        result = run_cli("plan", str(config), *(f"--set={s}" for s in sets))
        assert result.returncode == 2 and fragment in result.stderr, result.stderr
        assert result.stderr.strip().count("\n") == 0
    ok = run_cli("plan", str(config), "--set=deepspeed.sequence_parallel_size=4")
    assert ok.returncode == 0 and "split over 4 ranks (sequence parallel)" in ok.stdout
    assert "sequence parallel all-to-all per step per rank" in ok.stdout
