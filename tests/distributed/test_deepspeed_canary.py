"""Canary for training/parallel/ds_repairs.py: the installed DeepSpeed still has each slip we
repair (else drop the repair), and the repair still fixes it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import ROOT
from tests.distributed.conftest import torchrun_command
from training.parallel.ds_repairs import has_universal_load_slips


def test_zero3_universal_load_slips_and_their_repair(tmp_path: Path) -> None:
    cmd = torchrun_command(
        1,
        str(ROOT / "tests" / "distributed" / "ds_canary.py"),
        str(tmp_path),
    )
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    slipped = (
        result["raw"]["weight_decay"] != result["expected_weight_decay"]
        or result["raw"]["shared_step"]
    )
    assert slipped == has_universal_load_slips(result["version"]), (
        f"DeepSpeed {result['version']}: raw universal load {result['raw']}; update "
        "training/parallel/ds_repairs.py UNIVERSAL_LOAD_SLIPS (and the pyproject range) to match"
    )
    assert result["repaired"] == {
        "weight_decay": result["expected_weight_decay"],
        "shared_step": False,
    }, result
