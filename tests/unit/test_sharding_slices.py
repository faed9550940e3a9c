"""Sliced prepare: slicing arithmetic, byte-identity with a plain prepare, resume, corrupt
slices, status, and the bad inputs (`--tasks 0`, `--backend slurm` without sbatch)."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.jobs import JobRecord, load_job
from sharding import faults, slices
from sharding.errors import DataError
from sharding.options import PrepareOptions
from sharding.prepare import prepare
from sharding.slices import (
    SLICES_DIR,
    load_plan,
    pending_slices,
    plan_slices,
    prepare_sliced,
    progress_of,
    run_slice,
    stage,
)
from sharding.tokenizer import add_tokens, load_tokenizer_info
from training.run.rundir import pid_alive

WORDS = ["the", "model", "reads", "a", "token", "stream", "shard", "loader", "packs", "next"]
OPTIONS = {"train_tokenizer_vocab": 300, "val_fraction": 0.2, "shard_tokens": 500, "seed": 3}


def text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))


def files_of(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seven files of uneven size (jsonl, gzipped jsonl, txt), one without a document."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i, n in enumerate([30, 5, 60, 0, 12, 25]):
        lines = "".join(json.dumps({"text": text(rng)}) + "\n" for _ in range(n))
        lines = lines or '{"text": ""}\n'  # no document in this file
        if i == 2:
            (root / f"f{i}.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
        else:
            (root / f"f{i}.jsonl").write_text(lines, encoding="utf-8")
    (root / "z.txt").write_text(text(rng) + "\n\n" + text(rng) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "data"
    prepare([str(corpus)], out, workers=1, progress=False, **OPTIONS)
    return out


def sliced(corpus: Path, out: Path, tasks: int, **kw) -> dict:
    return prepare_sliced(
        [str(corpus)],
        out,
        tasks=tasks,
        workers=kw.pop("workers", 1),
        progress=False,
        **{**OPTIONS, **kw},
    )


def test_slices_are_contiguous_balanced_and_deterministic() -> None:
    sizes = [100, 1, 1, 1, 300, 50, 50, 200, 0, 100]
    plan = plan_slices(sizes, 4)
    assert plan == plan_slices(sizes, 4)
    assert [s for s, _ in plan] == [0, *(e for _, e in plan[:-1])] and plan[-1][1] == len(sizes)
    assert all(end > start for start, end in plan)
    assert plan == [(0, 4), (4, 5), (5, 7), (7, 10)]  # cuts nearest to each quarter of bytes
    assert plan_slices([5, 5, 5], 8) == [(0, 1), (1, 2), (2, 3)]  # at most one per file
    assert plan_slices([0, 0, 0, 0], 2) == [(0, 2), (2, 4)]
    assert plan_slices([10**9, 1, 1, 1], 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(DataError, match="--tasks 0: must be >= 1"):
        plan_slices(sizes, 0)


@pytest.mark.parametrize("tasks", [1, 3, 20])
def test_sliced_output_is_byte_identical_to_prepare(
    corpus: Path, reference: Path, tmp_path: Path, tasks: int
) -> None:
    summary = sliced(corpus, tmp_path / "out", tasks)
    assert summary["slices"] == min(tasks, 7)
    assert files_of(tmp_path / "out") == files_of(reference)  # no .slices/ left behind


@pytest.mark.parametrize("fmt", ["prompt-completion", "chat"])
def test_loss_masked_formats_with_added_tokens_are_byte_identical(tmp_path: Path, fmt: str) -> None:
    rng = random.Random(1)
    for i in range(4):
        records = [{"q": f"Q: {text(rng)}?", "a": f" Velmar {text(rng)}."} for _ in range(15)]
        if fmt == "chat":
            records = [
                {
                    "messages": [
                        {"role": "user", "content": r["q"]},
                        {"role": "assistant", "content": r["a"]},
                    ]
                }
                for r in records
            ]
        (tmp_path / f"qa{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    kw = {
        **OPTIONS,
        "format": fmt,
        "prompt_key": "q",
        "completion_key": "a",
        "add_tokens": "Velmar,<answer>",
    }
    inputs = [str(tmp_path / "qa*.jsonl")]
    prepare(inputs, tmp_path / "ref", workers=1, progress=False, **kw)
    prepare_sliced(inputs, tmp_path / "out", tasks=3, workers=1, progress=False, **kw)
    ref, out = files_of(tmp_path / "ref"), files_of(tmp_path / "out")
    assert any(name.endswith(".mask") for name in ref) and out == ref


def test_rerun_skips_verified_slices_and_ignores_a_killed_tasks_temp_dir(
    corpus: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    plan = stage([str(corpus)], out, 4, progress=False, **OPTIONS)
    run_slice(out, 0)
    run_slice(out, 2)
    killed = plan.dir / ".tmp-slice_0001-n1-999"  # a task killed mid-write
    killed.mkdir()
    (killed / "train_00000.bin").write_bytes(b"\x01\x02partial")
    assert pending_slices(plan) == [1, 3]
    progress = progress_of(out)
    assert progress is not None and (progress["slices_done"], progress["slices_total"]) == (2, 4)
    calls: list[int] = []
    real = slices.run_slice
    monkeypatch.setattr(slices, "run_slice", lambda o, k, w: calls.append(k) or real(o, k, w))
    sliced(corpus, out, 4)
    assert calls == [1, 3]
    assert files_of(out) == files_of(reference)


def test_a_corrupt_slice_is_redone(
    corpus: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    plan = stage([str(corpus)], out, 3, progress=False, **OPTIONS)
    for k in range(3):
        run_slice(out, k)
    stream = plan.slice_dir(1) / "train_00000.bin"
    data = bytearray(stream.read_bytes())
    data[0] ^= 1
    stream.write_bytes(bytes(data))
    assert pending_slices(plan) == [1]
    # Corrupted between the check and the merge: the merge refuses and marks it undone.
    with pytest.raises(DataError, match=r"slice_0001/train_00000\.bin: sha256 differs .*slice 1"):
        slices.merge(out)
    assert not (out / "manifest.json").exists() and pending_slices(load_plan(out)) == [1]
    calls: list[int] = []
    real = slices.run_slice
    monkeypatch.setattr(slices, "run_slice", lambda o, k, w: calls.append(k) or real(o, k, w))
    sliced(corpus, out, 3)
    assert calls == [1] and files_of(out) == files_of(reference)


def test_changed_input_or_options_start_a_new_plan(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = stage([str(corpus)], out, 3, progress=False, **OPTIONS)
    run_slice(out, 0)
    same = stage([str(corpus)], out, 3, progress=False, **{**OPTIONS, "shard_tokens": 99})
    assert same.plan_id == first.plan_id and pending_slices(same) == [1, 2]
    other = stage([str(corpus)], out, 3, progress=False, **{**OPTIONS, "seed": 4})
    assert other.plan_id != first.plan_id and pending_slices(other) == [0, 1, 2]
    with pytest.raises(DataError, match="not done — re-run"):
        slices.merge(out)


def test_cli_local_tasks_and_status(
    corpus: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    args = [
        "prepare",
        str(corpus),
        "--out",
        str(out),
        "--train-tokenizer",
        "300",
        "--seed",
        "3",
        "--val-fraction",
        "0.2",
        "--shard-tokens",
        "500",
        "--workers",
        "1",
    ]
    assert main([*args, "--backend", "local", "--tasks", "3"]) == 0
    assert files_of(out) == {**files_of(reference), "job.json": (out / "job.json").read_bytes()}
    capsys.readouterr()
    assert main(["status", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["kind"] == "prepare" and s["state"] == "COMPLETED"
    assert (s["slices_done"], s["slices_total"]) == (3, 3) and s["tokens_per_s"] > 0
    assert main(["status", str(out)]) == 0
    assert "3 / 3 done" in capsys.readouterr().out


def test_cli_bad_tasks_and_no_sbatch_are_one_line_errors(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["prepare", str(corpus), "--out", str(tmp_path / "out"), "--train-tokenizer", "300"]
    assert main([*args, "--tasks", "0"]) == 2
    err = capsys.readouterr().err
    assert "--tasks 0: must be >= 1" in err and err.count("\n") == 1
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    assert main([*args, "--backend", "slurm", "--tasks", "2"]) == 2
    err = capsys.readouterr().err
    assert "--backend slurm: sbatch not found" in err and err.count("\n") == 1
    assert not (tmp_path / "out" / SLICES_DIR).exists()  # checked before any work
    assert main([*args, "--tasks", "2", "--set", "train.max_steps=1"]) == 2
    assert "launch.* settings only" in capsys.readouterr().err
    running = JobRecord(
        backend="local",
        run_dir=str(tmp_path / "out"),
        command=[],
        nodes=1,
        nproc_per_node=2,
        pid=os.getpid(),
        state="RUNNING",
        kind="prepare",
    )
    running.save()
    assert main([*args, "--tasks", "2", "--backend", "local"]) == 2
    assert "a prepare is still RUNNING (local" in capsys.readouterr().err


def test_edited_add_tokens_file_or_replaced_tokenizer_start_a_new_plan(
    corpus: Path, reference: Path, tmp_path: Path
) -> None:
    terms, tok, out = tmp_path / "terms.txt", tmp_path / "tok", tmp_path / "out"
    terms.write_text("Velmar\n", encoding="utf-8")
    shutil.copytree(reference / "tokenizer", tok)
    kw = {"train_tokenizer_vocab": None, "tokenizer": str(tok), "add_tokens": str(terms)}
    first = stage([str(corpus)], out, 3, progress=False, **{**OPTIONS, **kw})
    run_slice(out, 0)
    # The same spec (a path), other tokens in the file: the old tokenizer must not be reused.
    terms.write_text("Velmar\nQuorlix\n", encoding="utf-8")
    second = stage([str(corpus)], out, 3, progress=False, **{**OPTIONS, **kw})
    assert second.plan_id != first.plan_id and pending_slices(second) == [0, 1, 2]
    assert second.added == ["Velmar", "Quorlix"]
    # The --tokenizer dir replaced (here: one more token), same --add-tokens file.
    run_slice(out, 1)
    add_tokens(load_tokenizer_info(tok), ["Zyxt"], tok)
    third = stage([str(corpus)], out, 3, progress=False, **{**OPTIONS, **kw})
    assert third.plan_id != second.plan_id and pending_slices(third) == [0, 1, 2]
    assert third.tokenizer["vocab_size"] == second.tokenizer["vocab_size"] + 1
    run_slice(out, 2)
    sliced(corpus, out, 3, **kw)  # resumes the third plan
    prepare([str(corpus)], tmp_path / "ref", workers=1, progress=False, **{**OPTIONS, **kw})
    assert files_of(out) == files_of(tmp_path / "ref")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["args"]["add_tokens"] == ["Velmar", "Quorlix"]
    vocab = json.loads((out / manifest["tokenizer"]["path"] / "tokenizer.json").read_text())
    added = {t["content"] for t in vocab["added_tokens"]}
    assert {"Velmar", "Quorlix", "Zyxt"} <= added


def test_cancel_stops_a_local_prepare_that_leads_no_process_group(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Started from a script, the prepare shares the script's process group: cancel must
    signal it alone (killpg would fail), and it must stop its slices and record CANCELLED."""
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    cmd = [
        sys.executable,
        "-m",
        "launcher.cli",
        "prepare",
        str(corpus),
        "--out",
        str(out),
        "--train-tokenizer",
        "300",
        "--backend",
        "local",
        "--tasks",
        "2",
        "--workers",
        "2",
    ]
    env = {**os.environ, faults.PREPARE_SLOW_S: "60"}  # every slice sleeps at its first report
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=False
        )
    try:
        assert os.getpgid(proc.pid) != proc.pid  # shares this test's process group
        progress = out / SLICES_DIR / "progress"
        deadline = time.monotonic() + 60
        while len(list(progress.glob("slice_*.json"))) < 2:  # both slices are running
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "slices did not start"
            time.sleep(0.05)
        record = load_job(out)
        assert record is not None and record.state == "RUNNING" and record.pid == proc.pid
        assert record.group_leader is False
        assert main(["cancel", str(out)]) == 0
        assert capsys.readouterr().out.strip().endswith("CANCELLED")
        assert proc.wait(timeout=30) == 143, log.read_text()
    finally:
        if proc.poll() is None:  # the test failed: leave no prepare (or its slices) behind
            attempts = out / SLICES_DIR / "attempts.log"
            for line in attempts.read_text().splitlines() if attempts.is_file() else []:
                if pid_alive(pid := json.loads(line)["pid"]):
                    os.kill(pid, 9)
            proc.kill()
            proc.wait()
    record = load_job(out)
    assert record is not None and record.state == "CANCELLED"
    assert record.result == {"error": "cancelled (SIGTERM)"} and record.end_time is not None
    attempts = (out / SLICES_DIR / "attempts.log").read_text().splitlines()
    slice_pids = {json.loads(line)["pid"] for line in attempts}
    assert len(slice_pids) == 2 and not any(pid_alive(pid) for pid in slice_pids)
    assert not list((out / SLICES_DIR).glob(".tmp-slice_*"))  # each slice cleaned up
    assert "cancelled; re-run the same command to resume" in log.read_text()


def test_options_object_and_slices_in_processes_give_the_same_bytes(
    corpus: Path, reference: Path, tmp_path: Path
) -> None:
    """A PrepareOptions given whole, slices run two at a time in spawned processes (each
    slice's split is one uncut stream file until the merge)."""
    options = PrepareOptions(**OPTIONS)
    plan = stage([str(corpus)], tmp_path / "out", 2, options, progress=False)
    assert load_plan(tmp_path / "out").options == options == plan.options
    run_slice(tmp_path / "out", 0)
    assert sorted(p.name for p in plan.slice_dir(0).glob("*.bin")) == [
        "train_00000.bin",
        "val_00000.bin",
    ]
    summary = prepare_sliced(
        [str(corpus)], tmp_path / "out", options, tasks=3, workers=2, progress=False
    )
    assert summary["slices"] == 3 and files_of(tmp_path / "out") == files_of(reference)
