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
