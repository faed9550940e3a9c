"""Sequence parallelism (DeepSpeed-Ulysses, `training.parallel.sequence`) on 2 CPU ranks.

One torchrun runs every case (this file is also its worker:
`python -m torch.distributed.run --nproc-per-node 2 -m tests.distributed.test_sequence_parallel
OUT.json`): with SP=2, a packed batch (several documents per window, EOS-separated, positions
restarting) gives the unsharded model's loss and gradients, and the same losses over three
AdamW steps, under ZeRO-2 and ZeRO-3, for gpt2, llama, qwen3 and mistral (sliding window 8);
a token's loss does not change when an earlier document of its window does, while
DeepSpeed's stock sdpa wrapper lets it (so the check can fail); an SP checkpoint names
one model shard and reloads. The single-process tests check the pure pieces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import ROOT
from tests.distributed.conftest import torchrun_command
from tests.tiny import tiny_arch
from training.parallel import sequence as sp

pytestmark = pytest.mark.dist

EOS, VOCAB, SEQ, BATCH, STEPS, LR = 1, 64, 64, 2, 3, 1e-3
FAMILIES = {"gpt2": {}, "llama": {}, "qwen3": {}, "mistral": {"sliding_window": 8}}
LEAK_FAMILIES = ["gpt2", "llama", "qwen3"]
# on in both runs (DeepSpeed's default is 1.0, not off): the steps then also check the
# gradient norm DeepSpeed computes from the SP ranks' partial gradients
CLIP = 0.5
FIRST_DOC_END = 23  # the EOS that ends the first document of the leak batch


def hf_config(family: str) -> Any:
    from training import model_registry as registry

    config = registry.fresh_config(
        tiny_arch(family, **FAMILIES[family]), vocab_size=VOCAB, eos_id=EOS
    )
    config.use_cache = False
    return config


def packed_batch(seed: int) -> dict[str, torch.Tensor]:
    """[BATCH, SEQ] windows of 3-4 documents each; HF-style labels (= input_ids)."""
    from sharding.loader import document_positions

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (BATCH, SEQ), generator=g)
    for row in range(BATCH):
        ids[row, torch.randperm(SEQ - 2, generator=g)[:3] + 1] = EOS
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": document_positions(ids, EOS)}


# --- single process -----------------------------------------------------------------------


def test_parallel_dims_layout_is_deepspeeds() -> None:
    dims = sp.ParallelDims(world_size=8, sp_size=4)
    assert dims.dp_size == 2
    assert [dims.sp_rank(r) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [dims.dp_rank(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert dims.sp_group_ranks(6) == [4, 5, 6, 7]
    assert sp.ParallelDims(world_size=3).dp_size == 3
    with pytest.raises(ValueError, match="deepspeed.sequence_parallel_size: 3 does not divide"):
        sp.ParallelDims(world_size=8, sp_size=3)
    with pytest.raises(ValueError, match="outside world size"):
        dims.sp_rank(8)


def test_deepspeed_averages_over_world_over_sp_except_zero3() -> None:
    dims = sp.ParallelDims(world_size=8, sp_size=2)
    assert dims.grad_average_size({"zero_optimization": {"stage": 2}}) == 4
    assert dims.grad_average_size({"zero_optimization": {"stage": 3}}) == 8
    assert dims.backward_scale(2, 100.0, {"zero_optimization": {"stage": 1}}) == 2 * 4 / 100
    with pytest.raises(ValueError, match="reduce_scatter"):
        dims.grad_average_size({"zero_optimization": {"stage": 3, "reduce_scatter": False}})


def test_shards_make_up_the_window_and_its_loss() -> None:
    batch = packed_batch(0)
    dims = sp.ParallelDims(world_size=2, sp_size=2)
    shards = [sp.shard_batch(batch, dims, rank) for rank in (0, 1)]
    for key in ("input_ids", "position_ids"):
        assert torch.equal(torch.cat([s[key] for s in shards], dim=1), batch[key])
    targets = torch.cat([s["shift_labels"] for s in shards], dim=1)
    assert torch.equal(targets[:, :-1], batch["labels"][:, 1:])
    assert (targets[:, -1] == sp.IGNORE_INDEX).all()
    logits = torch.randn(BATCH, SEQ, VOCAB)
    halves = [logits[:, : SEQ // 2], logits[:, SEQ // 2 :]]
    summed = sum(
        sp.shard_loss_sum(h, s["shift_labels"]) for h, s in zip(halves, shards, strict=True)
    )
    torch.testing.assert_close(summed, sp.shard_loss_sum(logits, targets))
    # gptrain's loader labels are next-token targets already
    shifted = {**batch, "labels": targets}
    again = sp.shard_batch(shifted, dims, 1, labels_shifted=True)
    assert torch.equal(again["shift_labels"], shards[1]["shift_labels"])
    with pytest.raises(ValueError, match="data.seq_len: 63 is not divisible"):
        sp.shard_batch({k: v[:, :63] for k, v in batch.items()}, dims, 0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_document_attention_alone_is_transformers_packed_masking(family: str) -> None:
    """Without SP the core equals sdpa given packed position_ids (transformers' own
    document mask, sliding window included)."""
    from transformers import AutoModelForCausalLM

    sp.register_document_attention()
    config = hf_config(family)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ours = AutoModelForCausalLM.from_config(config, attn_implementation=sp.DOC_ATTENTION).eval()
    ours.load_state_dict(ref.state_dict())
    batch = packed_batch(1)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, ref(**inputs).logits)


def test_heads_must_split_over_the_sp_group() -> None:
    sp.check_heads(hf_config("llama"), 2)  # 4 heads, 2 kv heads
    sp.check_heads(hf_config("llama"), 4)  # kv heads replicated
    with pytest.raises(ValueError, match="deepspeed.sequence_parallel_size: 3 must divide"):
        sp.check_heads(hf_config("gpt2"), 3)


# --- 2 ranks ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("sp") / "results.json"
    cmd = torchrun_command(
        2,
        "-m",
        "tests.distributed.test_sequence_parallel",
        str(out),
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_sp2_gives_the_unsharded_loss_gradients_and_steps(
    results: dict[str, Any], family: str, stage: int
) -> None:
    case = results[f"equal/{family}/zero{stage}"]
    ref, ours = case["reference"]["losses"], case["sp"]["losses"]
    assert abs(ours[0] - ref[0]) <= 1e-5 * ref[0], case
    assert case["grad_rel_err"] < 1e-5, case
    for a, b in zip(ours, ref, strict=True):
        assert abs(a - b) <= 1e-5 * b, case
    for a, b in zip(case["sp"]["norms"], case["reference"]["norms"], strict=True):
        assert abs(a - b) <= 1e-5 * b and b > CLIP, case  # equal, and clipping was on
    assert ref[2] < ref[0] - 1e-3  # the same batch after two steps: they did something


@pytest.mark.parametrize("family", LEAK_FAMILIES)
def test_earlier_document_does_not_reach_later_tokens_under_sp2(
    results: dict[str, Any], family: str
) -> None:
    case = results[f"leak/{family}"]
    # per SP rank: max change of a later-document token's loss when the first doc changes
    assert max(case["document"]) < 1e-5, case
    # DeepSpeed's sdpa core (causal only): rank 1 holds no token of the first document,
    # yet its tokens' losses move
    assert case["plain"][1] > 1e-3, case


def test_deepspeeds_own_registration_leaks_too(results: dict[str, Any]) -> None:
    """`UlyssesSPAttentionHF.register_with_transformers` itself, given a config holder."""
    case = results["leak/llama/deepspeed"]
    assert case["plain"][1] > 1e-3, case


def test_sp_checkpoint_has_one_model_shard_and_reloads(results: dict[str, Any]) -> None:
    case = results["checkpoint"]
    assert case["model_files"] == ["mp_rank_00_model_states.pt"], case
    assert abs(case["loaded_loss"] - case["saved_loss"]) <= 1e-6 * case["saved_loss"], case


def test_deepspeed_still_reads_the_sp_group_as_tensor_parallel(results: dict[str, Any]) -> None:
    """Canary of the two SP repairs in training/parallel/ds_repairs.py (recording and
    loading checkpoints as if the SP group were tensor parallel): DeepSpeed still slips
    where the version gate says so (else drop the repairs and narrow the gate). The
    repairs themselves: test_sequence_parallel_train's resumes across SP sizes."""
    from training.parallel.ds_repairs import SP_AS_TP_SLIPS

    case = results["slips"]
    slipped = case["recorded_tp"] == 2 and not case["has_tp_world_size"]
    assert slipped == case["version"].startswith(SP_AS_TP_SLIPS), case
    # the worker ran without the trainer: nothing repaired, DeepSpeed as it is
    assert not case["repaired_record"] and not case["repaired_load"], case


# --- the torchrun worker ------------------------------------------------------------------


def _reference(config: Any, batches: list[dict]) -> tuple[dict, list[float], dict]:
    """Unsharded model (plain sdpa, transformers' packed-sequence mask): initial state,
    loss per step, first step's gradients."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms, grads = [], [], {}
    for step, batch in enumerate(batches):
        targets = sp.shift_labels(batch["labels"])
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        loss = sp.shard_loss_sum(logits, targets) / (targets != sp.IGNORE_INDEX).sum()
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return init, {"losses": losses, "norms": norms}, grads


def _engine(config: Any, init: dict, stage: int, mpu: Any) -> tuple[Any, dict]:
    import deepspeed
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, attn_implementation=sp.SP_ATTENTION)
    model.load_state_dict(init)
    ds_config = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": CLIP,
    }
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config, mpu=mpu)
    return engine, ds_config


def _sp_step(engine: Any, ds_config: dict, batch: dict, dims: sp.ParallelDims) -> Any:
    """Forward and backward of this rank's shard; returns (loss sum, shard)."""
    shard = sp.shard_batch(batch, dims, int(os.environ["RANK"]))
    logits = engine(input_ids=shard["input_ids"], position_ids=shard["position_ids"]).logits
    loss_sum = sp.shard_loss_sum(logits, shard["shift_labels"])
    targets = float((sp.shift_labels(batch["labels"]) != sp.IGNORE_INDEX).sum())
    engine.backward(loss_sum * dims.backward_scale(1, targets, ds_config))
    return loss_sum, shard


def _equal(family: str, stage: int, dims: sp.ParallelDims, mpu: Any) -> dict[str, Any]:
    from deepspeed.utils import safe_get_full_grad

    config = hf_config(family)
    batches = [packed_batch(step % 2) for step in range(STEPS)]  # 0, 1, 0
    init, ref, ref_grads = _reference(config, batches)
    engine, ds_config = _engine(config, init, stage, mpu)
    group = mpu.get_sequence_parallel_group()
    losses, norms, err = [], [], 0.0
    for step, batch in enumerate(batches):
        loss_sum, shard = _sp_step(engine, ds_config, batch, dims)
        if step == 0:
            for name, param in engine.module.named_parameters():  # collective under ZeRO-3
                want = ref_grads[name]
                diff = (safe_get_full_grad(param) - want).abs().max() / want.abs().max()
                err = max(err, float(diff))
        engine.step()
        norms.append(float(engine.get_global_grad_norm()))
        losses.append(float(sp.sequence_mean_loss(loss_sum, shard["shift_labels"], group)))
    return {"reference": ref, "sp": {"losses": losses, "norms": norms}, "grad_rel_err": err}


def _token_losses(model: Any, batch: dict, dims: sp.ParallelDims) -> torch.Tensor:
    """This rank's per-token losses of a later document (global index > FIRST_DOC_END)."""
    import torch.nn.functional as F

    rank = int(os.environ["RANK"])
    shard = sp.shard_batch(batch, dims, rank)
    with torch.no_grad():
        logits = model(input_ids=shard["input_ids"], position_ids=shard["position_ids"]).logits
    losses = F.cross_entropy(logits.transpose(1, 2), shard["shift_labels"], reduction="none")
    start = dims.sp_rank(rank) * (SEQ // dims.sp_size)
    index = torch.arange(start, start + losses.shape[1])
    return losses[:, index > FIRST_DOC_END]


def _leak(family: str, attention: str, dims: sp.ParallelDims) -> list[float]:
    """Max change, on each SP rank, of later-document token losses when the first
    document's tokens change."""
    import deepspeed.comm as dist
    from transformers import AutoModelForCausalLM

    from sharding.loader import document_positions

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(family), attn_implementation=attention)
    model.eval()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, VOCAB, (1, SEQ), generator=g)
    ids[0, [FIRST_DOC_END, 55]] = EOS  # documents [0, 23], [24, 55], [56, 63]
    other = ids.clone()
    other[0, :FIRST_DOC_END] = torch.randint(2, VOCAB, (FIRST_DOC_END,), generator=g)
    a, b = (
        {"input_ids": x, "labels": x, "position_ids": document_positions(x, EOS)}
        for x in (ids, other)
    )
    change = float((_token_losses(model, a, dims) - _token_losses(model, b, dims)).abs().max())
    changes: list[Any] = [None] * dims.world_size
    dist.all_gather_object(changes, change)
    return changes


def _deepspeed_registration(family: str) -> str:
    """DeepSpeed's own `register_with_transformers` with a config holder (no hub): it
    overrides "sdpa" globally, so the wrapper is moved to its own name here."""
    import types

    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    holder = types.SimpleNamespace(config=hf_config(family))
    UlyssesSPAttentionHF.register_with_transformers(holder, "sdpa", 2, micro_batch_size=1)
    wrapper = ALL_ATTENTION_FUNCTIONS["sdpa"]
    del ALL_ATTENTION_FUNCTIONS["sdpa"]  # the local override; transformers' sdpa is back
    AttentionInterface.register("deepspeed_ulysses_sdpa", wrapper)
    return "deepspeed_ulysses_sdpa"


def _checkpoint(root: Path, dims: sp.ParallelDims, mpu: Any) -> dict[str, Any]:
    config = hf_config("llama")
    init, _, _ = _reference(config, [])
    engine, ds_config = _engine(config, init, 2, mpu)
    _sp_step(engine, ds_config, packed_batch(0), dims)
    engine.step()
    engine.save_checkpoint(str(root), tag="step1")
    probe = packed_batch(9)
    saved = float(_sp_step(engine, ds_config, probe, dims)[0].detach())
    torch.manual_seed(1)
    fresh = {k: torch.randn_like(v) for k, v in init.items()}
    other, _ = _engine(config, fresh, 2, mpu)
    other.load_checkpoint(str(root), tag="step1")
    loaded = float(_sp_step(other, ds_config, probe, dims)[0].detach())
    files = sorted(p.name for p in (root / "step1").iterdir() if "model_states" in p.name)
    return {"model_files": files, "saved_loss": saved, "loaded_loss": loaded}


def _sp_as_tp_slips(mpu: Any) -> dict[str, Any]:
    """What DeepSpeed itself does with the SP mpu where ds_repairs steps in: the
    tensor-parallel degree its checkpoints record, and whether the mpu answers the
    tensor-parallel world size its universal loader asks for."""
    import deepspeed
    import deepspeed.runtime.engine as engine
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    raw = engine._checkpoint_parallel_metadata(mpu)
    load = ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir
    return {
        "version": deepspeed.__version__,
        "recorded_tp": raw[engine.CHECKPOINT_PARALLEL_DIMS][engine.CHECKPOINT_TP_DEGREE],
        "has_tp_world_size": hasattr(mpu, "get_tensor_model_parallel_world_size"),
        "repaired_record": getattr(engine._checkpoint_parallel_metadata, "gptrain_repair", False),
        "repaired_load": getattr(load, "gptrain_repair", False),
    }


def main(out: str) -> None:
    from training.parallel.dist import init_distributed

    env = init_distributed()
    dims = sp.ParallelDims(world_size=env.world_size, sp_size=2)
    results: dict[str, Any] = {}
    # first: it builds DeepSpeed's SP groups, which sequence_parallel_mpu then reuses
    plain = _deepspeed_registration("llama")
    mpu = sp.sequence_parallel_mpu(dims)
    group = mpu.get_sequence_parallel_group()
    sp.register_ulysses_attention(group)
    sp.register_ulysses_attention(group, core="sdpa", name="ulysses_plain_sdpa")
    for family in FAMILIES:
        for stage in (2, 3):
            results[f"equal/{family}/zero{stage}"] = _equal(family, stage, dims, mpu)
    for family in LEAK_FAMILIES:
        results[f"leak/{family}"] = {
            "document": _leak(family, sp.SP_ATTENTION, dims),
            "plain": _leak(family, "ulysses_plain_sdpa", dims),
        }
    results["leak/llama/deepspeed"] = {"plain": _leak("llama", plain, dims)}
    results["checkpoint"] = _checkpoint(Path(out).parent / "ckpt", dims, mpu)
    results["slips"] = _sp_as_tp_slips(mpu)
    if env.is_main:
        Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
