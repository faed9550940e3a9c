"""Turn a DeepSpeed checkpoint of any ZeRO stage back into a plain HF model.

Used by export, generate, evaluate and by resume on a different world size.
ZeRO 1-3 shards are merged with DeepSpeed's `zero_to_fp32` in lazy mode, so
tensors are materialised one at a time and peak RAM stays about one model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from training.checkpoint.store import DS_TAG, CheckpointMeta, read_meta
from training.errors import TrainingError
from training.observe.logs import library_prints


def iter_fp32_weights(step_dir: Path) -> Iterator[tuple[str, Any]]:
    """(name, fp32 tensor) for every weight of the checkpoint in `step_dir`."""
    import torch

    stage = read_meta(step_dir).deepspeed_config.zero_stage
    if stage == 0:
        # Stage 0 keeps whole module weights in the model-states file.
        files = sorted((step_dir / DS_TAG).glob("mp_rank_*_model_states.pt"))
        if not files:
            raise TrainingError(f"{step_dir}: no model states file; the checkpoint is damaged")
        module = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
        for name, tensor in module.items():
            yield name, tensor.float()
        return
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with library_prints():  # its steps and progress bars; GPTRAIN_DEBUG shows them
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=DS_TAG, lazy_mode=True)
    for name, tensor in lazy.items():
        yield name, tensor.contiguous().float()
    if stage == 1:  # frozen parameters (model.freeze) are only in the module states
        files = sorted((step_dir / DS_TAG).glob("mp_rank_*_model_states.pt"))
        module = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)["module"]
        for name, tensor in module.items():
            if name not in lazy:
                yield name, tensor.float()


def _adapters_only(step_dir: Path) -> bool:
    """LoRA checkpoints hold the trainable (adapter) weights only, not the frozen base."""
    return read_meta(step_dir).model_config.peft.method != "none"


def load_weights_into(model: Any, step_dir: Path, rank: int = 0) -> None:
    """Copy the checkpoint's weights into an HF model, in place. Under ZeRO-3 each
    partitioned parameter is gathered, set from rank 0 and re-partitioned. A LoRA
    checkpoint fills the adapters of a LoRA-wrapped model whose base is loaded already."""
    import torch

    params = dict(model.named_parameters(remove_duplicate=False))  # tied names too
    params.update(dict(model.named_buffers()))
    loaded = set()
    with torch.no_grad():
        for name, tensor in iter_fp32_weights(step_dir):
            if name not in params:
                raise TrainingError(
                    f"{step_dir}: checkpoint weight {name!r} does not exist in the model; "
                    "the checkpoint is from a different model"
                )
            target = params[name]
            shape = tuple(getattr(target, "ds_shape", target.shape))  # ZeRO-3: flattened
            if shape != tuple(tensor.shape):
                raise TrainingError(
                    f"{step_dir}: weight {name} has shape {tuple(tensor.shape)} in the "
                    f"checkpoint but {shape} in the model"
                )
            _assign(target, tensor, rank)
            loaded.add(name)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    adapters_only = _adapters_only(step_dir)
    expected = {n for n, p in model.named_parameters() if p.requires_grad or not adapters_only}
    missing = expected - loaded - tied
    if missing:
        raise TrainingError(
            f"{step_dir}: checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[0]}"
        )


def _assign(target: Any, tensor: Any, rank: int) -> None:
    if not hasattr(target, "ds_id"):
        target.copy_(tensor.to(target.dtype))
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([target], modifier_rank=0):
        if rank == 0:
            target.copy_(tensor.to(target.dtype))


def model_from_checkpoint(step_dir: Path, merge: bool = True) -> tuple[Any, CheckpointMeta]:
    """(fp32 HF model in eval mode, meta) rebuilt from a checkpoint directory.

    A LoRA checkpoint is its base model (`model.name_or_path`) plus the saved adapters:
    merged into a plain HF model, or with `merge=False` the `peft.PeftModel`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from training.models.finetune import (
        lora_model_for_checkpoint,
        restore_frozen_from_base,
    )

    meta = read_meta(step_dir)
    config = AutoConfig.for_model(**meta.hf_config)
    model_cfg = meta.model_config
    if _adapters_only(step_dir):
        peft_model = lora_model_for_checkpoint(model_cfg, config)
        load_weights_into(peft_model, step_dir)
        return (peft_model.merge_and_unload() if merge else peft_model).eval(), meta
    model = AutoModelForCausalLM.from_config(config)
    load_weights_into(model, step_dir)
    model.tie_weights()
    restore_frozen_from_base(model, model_cfg, meta.deepspeed_config.precision)
    return model.eval(), meta
