"""Run under torchrun (1 rank): reproduce DeepSpeed's ZeRO-3 universal-load slips on a
tiny model and print what a raw load does and what `training.parallel.ds_repairs` makes of it.
Used by test_deepspeed_canary.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(out: Path) -> None:
    import deepspeed
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.integrations import HfDeepSpeedConfig

    from training.checkpoint import store as ckpt
    from training.models.build import param_groups
    from training.parallel.dist import init_distributed
    from training.parallel.ds_repairs import param_group_settings, repair_universal_load

    init_distributed()
    ds = {
        "train_batch_size": 2,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }

    def engine(universal: bool):
        config = {**ds, "checkpoint": {"load_universal": True}} if universal else ds
        keep = HfDeepSpeedConfig(config)  # noqa: F841 - alive while the model is built
        torch.manual_seed(0)
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=64,
                n_positions=16,
                n_embd=16,
                n_layer=1,
                n_head=2,
                eos_token_id=0,
                bos_token_id=0,
            )
        )
        optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
        return deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]

    def observe(inner) -> dict:
        steps = [s["step"] for s in inner.state.values() if torch.is_tensor(s.get("step"))]
        return {
            "weight_decay": [g["weight_decay"] for g in inner.param_groups],
            "shared_step": len(steps) > 1 and len({id(s) for s in steps}) == 1,
        }

    first = engine(universal=False)
    ids = torch.randint(0, 64, (2, 16))
    for _ in range(2):
        first.backward(first(input_ids=ids, labels=ids).loss)
        first.step()
    first.save_checkpoint(str(out / "step"), tag=ckpt.DS_TAG)
    ckpt.convert_to_universal(out / "step")
    second = engine(universal=True)
    inner = getattr(second.optimizer, "optimizer", second.optimizer)
    settings = param_group_settings(inner)
    second.load_checkpoint(str(out / "step"), tag=ckpt.UNIVERSAL_TAG)
    raw = observe(inner)
    repair_universal_load(inner, settings)
    result = {
        "version": deepspeed.__version__,
        "expected_weight_decay": [0.1, 0.0],
        "raw": raw,
        "repaired": observe(inner),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
