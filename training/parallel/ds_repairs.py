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


class _WithoutTensorParallel:
    """The SP mpu as DeepSpeed's universal loader must see it: no tensor parallelism
    (rank 0 of 1); everything else is the SP mpu's."""

    def __init__(self, mpu: Any) -> None:
        self._mpu = mpu

    def __getattr__(self, name: str) -> Any:
        return getattr(self._mpu, name)

    @staticmethod
    def get_tensor_model_parallel_rank() -> int:
        return 0

    @staticmethod
    def get_tensor_model_parallel_world_size() -> int:
        return 1


# The same SP-as-model-parallel aliasing on load: DeepSpeed 0.19's universal loader of
# ZeRO-1/2 and the bf16 optimizer takes the tensor-parallel rank from the SP mpu (its
# SP rank, through the model-parallel alias) and asks it for a tensor-parallel world
# size it lacks (AttributeError), so no universal checkpoint loaded into an SP run: a
# run saved on another world size (SP=1, say) could not resume under SP.


def load_universal_under_sp_without_tp(version: str | None = None) -> None:
    """Make DeepSpeed's universal loader (ZeRO-1/2, bf16 optimizer) load under an SP mpu
    as tensor-parallel rank 0 of 1: every SP rank takes its ZeRO fragment of the whole
    parameter. Idempotent; a no-op on versions without the slip."""
    import deepspeed
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    if not (version or deepspeed.__version__).startswith(SP_AS_TP_SLIPS):
        return
    original = ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir
    if getattr(original, "gptrain_repair", False):
        return

    def load(self: Any, lp_groups_name: str, checkpoint_dir: str) -> None:
        mpu = self.mpu
        if mpu is None or not hasattr(mpu, "initialize_sequence_parallel"):  # not SP's
            return original(self, lp_groups_name, checkpoint_dir)
        self.mpu = _WithoutTensorParallel(mpu)
        try:
            return original(self, lp_groups_name, checkpoint_dir)
        finally:
            self.mpu = mpu

    load.gptrain_repair = True  # type: ignore[attr-defined]
    ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir = load
