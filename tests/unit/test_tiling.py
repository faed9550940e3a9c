"""Tiled MLPs (`model.tiled_mlp`): the same loss and gradients as the plain model, in
slices that DeepSpeed's gradient reduction can follow; refused where they would be wrong."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.tiny import tiny_arch
from training.errors import TrainingError
from training.model_config import ModelConfig, PeftConfig
from training.models.build import decoder_blocks, offload_inputs
from training.models.tiling import block_mlp, tile_count, tile_mlps


def _model(family: str, **overrides: object) -> torch.nn.Module:
    arch = tiny_arch(family, **overrides)
    config = AutoConfig.for_model(arch.pop("type"), **arch)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_tiled_mlps_give_the_same_loss_and_gradients(family: str) -> None:
    plain = _model(
        family,
        **({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} if family == "gpt2" else {}),
    )
    tiled = copy.deepcopy(plain)
    assert tile_mlps(decoder_blocks(tiled), shards=4, moe=False) == 2
    ids = torch.randint(0, plain.config.vocab_size, (2, 48))
    # the first projection of block 0's MLP: called once per slice, again in backward
    calls = []
    first = next(iter(block_mlp(decoder_blocks(tiled)[0]).children()))
    first.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    losses, grads = [], []
    for model in (plain, tiled):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert calls == [24] * 8  # 2 x 48 tokens in 4 slices, forward and recompute
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # eval (no autograd) slices too, and gives the same logits
    with torch.no_grad():
        torch.testing.assert_close(tiled(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_tile_count_is_a_count_torch_chunk_makes() -> None:
    assert tile_count(16384, 4096, 0) == 4  # auto: one slice per hidden-size tokens
    assert tile_count(100, 4096, 0) == 1
    assert tile_count(96, 32, 4) == 4
    assert tile_count(3, 32, 8) == 3  # at most one per token
    # 10 rows in 4 slices would be torch.chunk's 3+3+3+1 (4), in 6 its 2+2+2+2+2 (5):
    # only counts it really makes are used
    assert tile_count(10, 32, 4) == 4
    assert tile_count(10, 32, 6) == 5
    for rows in range(1, 64):
        for shards in range(1, 20):
            n = tile_count(rows, 32, shards)
            assert len(torch.arange(rows).chunk(n)) == n


def test_what_cannot_be_tiled_is_refused_in_one_line() -> None:
    with pytest.raises(TrainingError, match="tiled_mlp: tiles dense MLPs only"):
        tile_mlps(decoder_blocks(_model("llama")), shards=0, moe=True)
    dropout = _model("gpt2", resid_pdrop=0.1)
    with pytest.raises(TrainingError, match="the MLP has dropout"):
        tile_mlps(decoder_blocks(dropout), shards=0, moe=False)
    with pytest.raises(ValueError, match="tiled_mlp: recomputes the MLP in backward"):
        ModelConfig(tiled_mlp=True, dropout=0.1)
    lora = PeftConfig(method="lora", dropout=0.05)
    with pytest.raises(ValueError, match="dropout masks in its LoRA adapters"):
        ModelConfig(tiled_mlp=True, name_or_path="model", peft=lora)
    with pytest.raises(ValueError, match="tiled_mlp_shards: must be >= 0"):
        ModelConfig(tiled_mlp_shards=-1)
    with pytest.raises(ValueError, match="activation_checkpointing_offload: offloads what"):
        ModelConfig(activation_checkpointing_offload=True)


def test_offloaded_checkpointing_gives_the_same_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What goes through save_on_cpu's pack hook: exactly each checkpointed block's input
    # (on a CPU the offload moves nothing, so count what it would move).
    packed: list[tuple[int, ...]] = []
    real = torch.autograd.graph.save_on_cpu

    class Counting(real):
        def __init__(self, pin_memory: bool = False, device_type: str = "cuda") -> None:
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook

            def counted(tensor: torch.Tensor) -> object:
                packed.append(tuple(tensor.shape))
                return pack(tensor)

            self.pack_hook = counted

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Counting)
    plain = _model("llama")
    offloaded = copy.deepcopy(plain)
    for model in (plain, offloaded):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for block in decoder_blocks(offloaded):
        block._gradient_checkpointing_func = offload_inputs(block._gradient_checkpointing_func)
    ids = torch.randint(0, plain.config.vocab_size, (2, 48))
    grads = []
    for model in (plain, offloaded):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a)
    # 2 blocks, each keeping its [2, 48, hidden] input (and the small rotary tables)
    hidden = plain.config.hidden_size
    assert packed.count((2, 48, hidden)) == 2, packed
