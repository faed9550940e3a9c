"""`gptrain prepare --backend slurm`: 4 array tasks over 2 nodes give the bytes of a local
prepare; a task killed mid-write fails the merge, and a re-run redoes only its slice."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest

from sharding.faults import PREPARE_SLICE
from sharding.prepare import prepare
from sharding.slices import SLICES_DIR
from tests.conftest import run_cli

pytestmark = pytest.mark.slurm
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
WORDS = ["cat", "dog", "fox", "owl", "jumps", "over", "the", "red", "fence", "river"]
OPTIONS = ["--train-tokenizer", "300", "--val-fraction", "0.1", "--shard-tokens", "800"]


def write_corpus(root: Path) -> Path:
    rng = random.Random(0)
    root.mkdir(parents=True)
    for i in range(8):
        docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(40)]
        (root / f"part{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return root


def status(target: str, cwd: Path | None = None) -> dict:
    result = run_cli("status", target, "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_final(out: Path, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = status(str(out))
        if s["state"] in FINAL:
            return s
        time.sleep(1)
    raise AssertionError(f"prepare job not over within {timeout_s}s: {status(str(out))}")


def submit(corpus: Path, out: Path, env: dict | None = None) -> list[str]:
    result = run_cli(
        "prepare",
        str(corpus),
        "--out",
        str(out),
        *OPTIONS,
        "--backend",
        "slurm",
        "--tasks",
        "4",
        "--set",
        "launch.slurm.cpus_per_task=2",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split("submitted jobs ")[1].split(":")[0].split(", ")


def sacct(job_id: str, field: str) -> list[str]:
    out = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", field],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return out.split()


def shards_and_manifest(out: Path) -> dict[str, bytes]:
    names = [
        p
        for p in out.rglob("*")
        if p.is_file() and p.relative_to(out).parts[0] not in ("job.json", ".prepare-slurm")
    ]
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(names)}


def test_array_prepare_matches_local_and_rerun_redoes_only_the_killed_slice(
    tmp_path: Path,
) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    ref = tmp_path / "ref"
    prepare(
        [str(corpus)],
        ref,
        train_tokenizer_vocab=300,
        val_fraction=0.1,
        shard_tokens=800,
        workers=1,
        progress=False,
    )
    out = tmp_path / "data" / "sliced"

    array_id, merge_id = submit(corpus, out, env={PREPARE_SLICE: "2"})  # slice 2 dies mid-write
    s = wait_final(out, 120)
    assert s["state"] == "FAILED" and (s["slices_done"], s["slices_total"]) == (3, 4), s
    assert "slices 2 of 4 not done" in s["error"]
    assert sorted(set(sacct(array_id, "NodeList"))) == ["n1", "n2"]
    slices_dir = out / SLICES_DIR
    assert not (slices_dir / "slice_0002").exists()
    assert list(slices_dir.glob(".tmp-slice_0002-*")), "the killed task's partial output"
    assert not (out / "manifest.json").exists()
    kept = {k: (slices_dir / f"slice_{k:04d}" / "done.json").read_bytes() for k in (0, 1, 3)}

    rerun_array, _ = submit(corpus, out)
    s = wait_final(out, 120)
    assert s["state"] == "COMPLETED", s
    assert (s["slices_done"], s["slices_total"]) == (4, 4) and s["tokens_per_s"] > 0
    rerun_jobs = sacct(rerun_array, "JobID")  # submitit submits a 1-element array as a job
    assert len(rerun_jobs) == 1, f"only slice 2 is submitted again: {rerun_jobs}"
    import submitit

    redone = submitit.SlurmJob(out / ".prepare-slurm" / "%j", rerun_jobs[0]).result()
    assert redone["slice"] == 2 and "skipped" not in redone
    assert all(json.loads(kept[k])["plan_id"] == redone["plan_id"] for k in kept)
    assert shards_and_manifest(out) == shards_and_manifest(ref)
    assert not (out / SLICES_DIR).exists()
    by_id = run_cli("status", rerun_array, cwd=tmp_path)
    assert by_id.returncode == 0 and "4 / 4 done" in by_id.stdout, by_id.stdout + by_id.stderr
