"""On a CUDA GPU: bf16 training with nccl; torch.compile gives eager's losses, under
ZeRO-2 and ZeRO-3, and a compiled run stopped by a signal resumes onto the same curve.

bf16 tolerance: compiled kernels fuse and reorder bf16 arithmetic, so losses of the
same run differ by rounding that compounds over steps; 20 steps of a tiny model stay
within 2e-2 absolute (a loss of ~6 → ~3), where a wrong gradient is off by > 0.1.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.distributed.conftest import check, compiled_graphs, losses, tiny_config, torchrun

pytestmark = pytest.mark.gpu
BF16_LOSS_ABS_TOL = 2e-2
STEPS = 20


def _gpu_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["DS_ACCELERATOR"] = "cuda"
    return env


def _config(tmp_path: Path, prepared: Path, name: str, stage: int, compile_: object) -> Path:
    return tiny_config(
        tmp_path,
        prepared,
        name,
        launch={"nproc_per_node": 1},
        model={
            "config": {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64},
            "dropout": 0.0,
            "activation_checkpointing": True,
            "compile": compile_,
        },
        train={
            "micro_batch_size": 4,
            "grad_accum_steps": 2,
            "max_steps": STEPS,
            "learning_rate": 3e-3,
            "min_lr": 3e-4,
            "lr_warmup_steps": 5,
            "log_every": 1,
            "eval_every": 100,
            "save_every": 100,
        },
        deepspeed={"zero_stage": stage, "precision": "bf16"},
    )


def test_gpu_bf16_zero2_trains(tmp_path: Path, prepared: Path) -> None:
    config = tiny_config(
        tmp_path,
        prepared,
        launch={"nproc_per_node": 1},
        deepspeed={"zero_stage": 2, "precision": "bf16"},
    )
    check(torchrun(1, config, env=_gpu_env()))
    curve = losses(tmp_path / "run")
    assert curve[30] < curve[1] - 1.5


@pytest.mark.parametrize("stage", [2, 3])
def test_compiled_training_matches_eager(tmp_path: Path, prepared: Path, stage: int) -> None:
    check(torchrun(1, _config(tmp_path, prepared, "eager", stage, False), env=_gpu_env()))
    run = torchrun(1, _config(tmp_path, prepared, "compiled", stage, True), env=_gpu_env())
    check(run)
    assert compiled_graphs(run.stdout), run.stdout[-3000:]  # no break (ZeRO-3: per block)
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(compiled) == list(range(1, STEPS + 1))
    assert eager[STEPS] < eager[1] - 1.0  # it trains at all
    for step in range(1, STEPS + 1):
        assert compiled[step] == pytest.approx(eager[step], abs=BF16_LOSS_ABS_TOL), step


def test_compiled_run_resumes_after_a_signal(tmp_path: Path, prepared: Path) -> None:
    full = _config(tmp_path, prepared, "full", 2, True)
    check(torchrun(1, full, env=_gpu_env()))
    split = _config(tmp_path, prepared, "split", 2, True)
    stopped = torchrun(1, split, env={**_gpu_env(), "GPTRAIN_FAULT_SIGNAL_AT_STEP": "0:8"})
    assert stopped.returncode != 0
    check(torchrun(1, split, env=_gpu_env()))
    a, b = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(9, STEPS + 1):
        assert b[step] == pytest.approx(a[step], abs=BF16_LOSS_ABS_TOL), step


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attention_runs_the_flash_kernel(family: str) -> None:
    """Which sdpa kernel runs: a window without a document boundary takes flash (is_causal,
    no mask); one with a boundary (data.document_mask) carries a block mask, which flash
    refuses, and runs the memory-efficient kernel."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoModelForCausalLM

    from launcher.config import load_config
    from training.models.build import load_hf_config

    cfg = load_config(None, ["train.micro_batch_size=1", f"model.config.type={family}"])
    hf_config = load_hf_config(cfg.model, vocab_size=1000, eos_id=0, seq_len=256)
    model = AutoModelForCausalLM.from_config(hf_config).to("cuda", torch.bfloat16).eval()
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(1, 1000, (2, 256), device="cuda")
    packed = torch.cat([torch.arange(100), torch.arange(156)]).repeat(2, 1).to("cuda")
    with torch.no_grad():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # "No available kernel" otherwise
            model(input_ids=ids)
            with pytest.raises(RuntimeError, match="No available kernel"):
                model(input_ids=ids, position_ids=packed)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            model(input_ids=ids, position_ids=packed)


def test_flex_attention_trains_as_sdpa_does(tmp_path: Path, prepared: Path) -> None:
    """model.attention: flex_attention (block-sparse document masking) gives sdpa's losses
    on packed documents, within the bf16 tolerance."""
    for attention in ("sdpa", "flex_attention"):
        config = _config(tmp_path, prepared, attention, 2, False)
        check(torchrun(1, config, f"model.attention={attention}", env=_gpu_env()))
    sdpa, flex = losses(tmp_path / "sdpa"), losses(tmp_path / "flex_attention")
    assert sorted(flex) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert flex[step] == pytest.approx(sdpa[step], abs=BF16_LOSS_ABS_TOL), step


@pytest.mark.parametrize("window", [None, 64])
def test_sequence_parallel_core_is_flex_with_the_document_mask(window: int | None) -> None:
    """On a GPU the SP core attention (training.parallel.sequence.document_attention) runs
    compiled flex_attention with a document block mask: forward and backward equal sdpa
    with the L × L document mask (fp32), grouped-query heads and sliding window included."""
    import torch
    import torch.nn.functional as F

    from training.parallel.sequence import document_attention, document_mask

    torch.manual_seed(0)
    lengths = [300, 17, 1, 706]
    positions = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    query = torch.randn(1, 8, 1024, 64, device="cuda", requires_grad=True)
    key = torch.randn(1, 2, 1024, 64, device="cuda", requires_grad=True)
    value = torch.randn(1, 2, 1024, 64, device="cuda", requires_grad=True)
    module = torch.nn.Module()
    module.sliding_window = window
    ours, _ = document_attention(module, query, key, value, None, position_ids=positions)
    grads = torch.autograd.grad(ours.square().sum(), (query, key, value))
    expected = F.scaled_dot_product_attention(
        query,
        key.repeat_interleave(4, dim=1),
        value.repeat_interleave(4, dim=1),
        attn_mask=document_mask(positions, window),
    ).transpose(1, 2)
    expected_grads = torch.autograd.grad(expected.square().sum(), (query, key, value))
    torch.testing.assert_close(ours, expected, rtol=2e-3, atol=2e-3)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def test_offloaded_checkpointing_keeps_block_inputs_off_the_gpu() -> None:
    """model.activation_checkpointing_offload: each checkpointed block's input lives in
    pinned host memory until backward, so the step's GPU peak drops by about the blocks'
    hidden states (8 blocks × 16K tokens × 512 × 4 bytes = 256 MiB), gradients unchanged."""
    import copy

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from training.models.build import decoder_blocks, offload_inputs

    config = AutoConfig.for_model(
        "llama",
        num_hidden_layers=8,
        hidden_size=512,
        intermediate_size=1024,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=1000,
        max_position_embeddings=16384,
    )
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").cuda()
    offloaded = copy.deepcopy(plain)
    for model in (plain, offloaded):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    for block in decoder_blocks(offloaded):
        block._gradient_checkpointing_func = offload_inputs(block._gradient_checkpointing_func)
    ids = torch.randint(0, 1000, (1, 16384), device="cuda")
    peaks, grads = [], []
    for model in (plain, offloaded):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model(input_ids=ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - before)
        grads.append([p.grad for p in model.parameters()])
    assert peaks[1] < peaks[0] - 128 * 2**20, [p / 2**20 for p in peaks]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
