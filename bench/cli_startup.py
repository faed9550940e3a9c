"""Startup time of `gptrain --help` against a bare `python -c pass`.

    python bench/cli_startup.py [--runs 10]

Goal: `gptrain --help` under 0.3 s (heavy libraries are imported lazily).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def median_s(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    baseline_s = median_s([sys.executable, "-c", "pass"], args.runs)
    help_s = median_s([sys.executable, "-m", "launcher.cli", "--help"], args.runs)
    print(f"python -c pass   : {baseline_s * 1000:7.1f} ms (median of {args.runs})")
    print(f"gptrain --help   : {help_s * 1000:7.1f} ms")
    print(f"ratio            : {help_s / baseline_s:7.2f}x  (goal: gptrain --help < 300 ms)")
    print(f"goal met         : {help_s < 0.3}")


if __name__ == "__main__":
    main()
