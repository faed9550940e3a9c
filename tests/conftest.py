"""Shared test setup: CPU DeepSpeed, quiet warnings, gpu tests skipped without CUDA."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The layer of a test is its directory (make test runs each layer on its own): a test file
# cannot forget its marker and silently join the unit layer.
LAYER_OF_DIRECTORY = {"distributed": "dist", "slurm": "slurm", "gpu": "gpu"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        layer = LAYER_OF_DIRECTORY.get(parts[0]) if len(parts) > 1 else None
        if layer is not None and not item.get_closest_marker(layer):
            item.add_marker(getattr(pytest.mark, layer))
    if any(item.get_closest_marker("gpu") for item in items):
        try:
            import torch

            has_gpu = torch.cuda.is_available()
        except ImportError:
            has_gpu = False
        if not has_gpu:
            skip = pytest.mark.skip(reason="needs a CUDA GPU")
            for item in items:
                if item.get_closest_marker("gpu"):
                    item.add_marker(skip)


def run_cli(*args: str, cwd: Path | None = None, timeout_s: float = 600, env: dict | None = None):
    """Run `gptrain ARGS` in a subprocess; returns the CompletedProcess."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **(env or {})},
    )
