"""Repairs of known DeepSpeed slips, each gated by the versions it is known for.

`tests/distributed/test_deepspeed_canary.py` reproduces every slip on the installed
DeepSpeed: it fails when a new version no longer has one (drop the repair, widen
nothing) or when a repair stops fixing it. `pyproject.toml` allows only the DeepSpeed
versions that canary ran on.
"""

from __future__ import annotations

from typing import Any

# ZeRO-3 universal-checkpoint load (DeepSpeed 0.19): every param group receives group
# 0's settings (weight decay on biases and norms), and the Adam states of all flat
# groups share one `step` tensor (each optimizer step then counts it once per group).
UNIVERSAL_LOAD_SLIPS = ("0.19.",)


def has_universal_load_slips(version: str | None = None) -> bool:
    """Whether DeepSpeed `version` (default: the installed one) has the slips above."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    return version.startswith(UNIVERSAL_LOAD_SLIPS)


def param_group_settings(optimizer: Any) -> list[dict[str, Any]]:
    """The settings of each param group (no params, no step), to put back after a load."""
    return [
        {k: v for k, v in g.items() if k not in ("params", "step")} for g in optimizer.param_groups
    ]


def repair_universal_load(optimizer: Any, settings: list[dict[str, Any]]) -> None:
    """Undo the universal loader's slips on the inner (torch) `optimizer`: put back each
    group's own `settings` (taken before the load) and give each state its own step."""
    import torch

    for group, setting in zip(optimizer.param_groups, settings, strict=True):
        group.update(setting)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


# Sequence parallelism (DeepSpeed 0.19): its SP process groups (`parallel_state_sp`)
# answer DeepSpeed's model-parallel questions with the SP group, so every checkpoint
# records tp_degree = sp in `checkpoint_parallel_dimensions`; `ds_to_universal` then looks
# for sp model-state files per pipeline stage, finds one, and fails, so a resume on
# another world size restored the weights only (Adam's moments restarted).
SP_AS_TP_SLIPS = ("0.19.",)


def record_sp_checkpoints_without_tp(version: str | None = None) -> None:
    """Make DeepSpeed record tensor-parallel degree 1 in checkpoints saved under an SP
    mpu (there is no tensor parallelism: the SP ranks hold sequence slices, and the
    model-state file is one). Idempotent; a no-op on versions without the slip."""
    import deepspeed
    import deepspeed.runtime.engine as engine

    if not (version or deepspeed.__version__).startswith(SP_AS_TP_SLIPS):
        return
    original = engine._checkpoint_parallel_metadata
    if getattr(original, "gptrain_repair", False):
        return

    def metadata(mpu: Any) -> dict[str, Any]:
        dims = original(mpu)
        if mpu is not None and hasattr(mpu, "initialize_sequence_parallel"):  # the SP mpu
            dims[engine.CHECKPOINT_PARALLEL_DIMS][engine.CHECKPOINT_TP_DEGREE] = 1
        return dims

    metadata.gptrain_repair = True  # type: ignore[attr-defined]
    engine._checkpoint_parallel_metadata = metadata
