"""The slurm layer needs the local cluster: `slurm/start.sh` (make test-slurm starts it)."""

from __future__ import annotations

import subprocess

import pytest

from tests.distributed.conftest import prepared  # noqa: F401  (shared fixture)


@pytest.fixture(scope="session", autouse=True)
def slurm_cluster() -> None:
    try:
        up = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        up = None
    if up is None or up.returncode != 0 or not up.stdout.strip():
        pytest.fail("no Slurm cluster answers sinfo; start one with slurm/start.sh")
