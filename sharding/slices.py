"""Prepare in slices: resumable, and spread over many processes or SLURM array tasks.

    gptrain prepare corpus/ --out data/corpus --train-tokenizer 32000 --tasks 8
    gptrain prepare corpus/ --out data/corpus --train-tokenizer 32000 --backend slurm --tasks 64

The steps, each restartable:
1. `stage`: the sorted input file list is cut into contiguous slices balanced by
   bytes (a file is never split); the tokenizer is trained (on the same bounded,
   seeded sample as a local prepare) or copied with `--add-tokens`, ONCE, into
   `OUT/.slices/tokenizer/`; `OUT/.slices/plan.json` records all of it. A re-run
   with the same inputs and options (and the same `--add-tokens` tokens and
   `--tokenizer` files) reuses the plan and the tokenizer; any change starts over.
2. `run_slice(k)`: slice k's train/val token streams (and loss masks) are written
   to a temp dir, then renamed to `OUT/.slices/slice_NNNN/` with a `done.json`
   holding their sha256 and token/document counts. A slice whose `done.json`
   verifies is skipped; a killed task's temp dir is never read.
3. `merge`: the slice streams are re-verified and concatenated in order into
   shards of exactly `shard_tokens`, as one local prepare would cut them, so the
   shards and `manifest.json` are byte-identical to `prepare` of the same inputs
   and seed. `OUT/.slices/` is removed after the manifest is written.

File boundaries are document boundaries and the train/val choice is a hash of
each document, so slices need nothing from each other.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from bisect import bisect_left
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sharding import faults
from sharding.atomic import publish
from sharding.errors import DataError
from sharding.manifest import (
    ShardInfo,
    dtype_for_vocab,
    file_problem,
    sha256_dir,
    write_json_atomic,
)
from sharding.options import PrepareOptions
from sharding.pipeline import (
    added_tokens,
    build_tokenizer,
    cpu_count,
    dataset_manifest,
    iter_jobs,
    manifest_args,
    record_format,
    source_entry,
    summarize,
    write_streams,
)
from sharding.pool import run_stoppable
from sharding.shards import ShardWriter, commit, make_tmp_dir
from sharding.sources import RecordFormat, resolve_inputs
from sharding.tokenizer import TokenizerInfo

SLICES_DIR = ".slices"
PLAN_NAME = "plan.json"
DONE_NAME = "done.json"
PLAN_VERSION = 1
_MERGE_CHUNK_TOKENS = 1 << 23
_PROGRESS_EVERY_S = 2.0


def plan_slices(sizes_bytes: list[int], tasks: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of the file list: min(tasks, files) non-empty slices,
    each ending at the file boundary closest to an equal share of the bytes."""
    if tasks < 1:
        raise DataError(f"--tasks {tasks}: must be >= 1")
    n = len(sizes_bytes)
    count = min(tasks, n)
    cum = [0]
    for size in sizes_bytes:
        cum.append(cum[-1] + max(size, 1))  # an empty file still counts as a little work
    bounds = [0]
    for i in range(1, count):
        target = cum[-1] * i / count
        lo, hi = bounds[-1] + 1, n - (count - i)  # leave one file for each later slice
        b = min(max(bisect_left(cum, target), lo), hi)
        if b > lo and abs(cum[b - 1] - target) <= abs(cum[b] - target):
            b -= 1
        bounds.append(b)
    bounds.append(n)
    return list(zip(bounds[:-1], bounds[1:], strict=True))


@dataclass
class SlicePlan:
    """`OUT/.slices/plan.json`: what each slice task reads and how it tokenizes."""

    out_dir: str
    inputs: list[str]
    sources: list[dict[str, Any]]  # manifest source entries {path, size, mtime}, sorted input order
    slices: list[list[int]]  # [start, end) indices into sources
    options: PrepareOptions  # a dict in plan.json
    added: list[str]
    tokenizer: dict[str, Any]  # dir, manifest_path, name, vocab_size, eos_id, fast, sha256
    plan_id: str = ""
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.options, dict):  # read from plan.json
            self.options = PrepareOptions(**self.options)

    @property
    def dir(self) -> Path:
        return Path(self.out_dir) / SLICES_DIR

    def slice_dir(self, k: int) -> Path:
        return self.dir / f"slice_{k:04d}"

    def files(self, k: int) -> list[Path]:
        start, end = self.slices[k]
        return [Path(s["path"]) for s in self.sources[start:end]]

    def tokenizer_info(self) -> TokenizerInfo:
        t = self.tokenizer
        return TokenizerInfo(Path(t["dir"]), t["name"], t["vocab_size"], t["eos_id"], t["fast"])

    def record_format(self, render_chat: bool = False) -> RecordFormat:
        """How records become documents; `render_chat` loads the chat template (for tasks)."""
        if render_chat:
            return record_format(self.options, self.tokenizer_info())
        return self.options.record_format()

    def manifest_args(self) -> dict[str, Any]:
        """The manifest's `args`, exactly as `prepare` writes them."""
        return manifest_args(self.inputs, self.options, self.added)


def _plan_id(
    inputs: list[str],
    sources: list,
    slices: list,
    options: PrepareOptions,
    added: list[str],
    source_sha: str | None,
    tok_sha: str,
) -> str:
    """What a plan was made from. `added` are the tokens read from `--add-tokens` (its spec may
    be a file that changed) and `source_sha` the hash of the `--tokenizer` dir (the plan's
    tokenizer is a copy of it when tokens are added), so a change to either starts over."""
    identity = {
        "inputs": inputs,
        "sources": sources,
        "slices": slices,
        "tokenizer": tok_sha,
        "added": added,
        "source_tokenizer": source_sha,
        "options": options.stream_identity(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _source_tokenizer_sha(tokenizer: str | None) -> str | None:
    """sha256 of the `--tokenizer` dir (None: trained here, or not a directory: the
    tokenizer step reports that)."""
    if tokenizer is None or not Path(tokenizer).is_dir():
        return None
    return sha256_dir(Path(tokenizer).resolve())


def load_plan(out_dir: str | Path) -> SlicePlan:
    """The plan of a sliced prepare in OUT; DataError when there is none."""
    path = Path(out_dir) / SLICES_DIR / PLAN_NAME
    try:
        return SlicePlan(**json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise DataError(f"{path}: no sliced prepare here — run gptrain prepare --tasks N") from None
    except (ValueError, TypeError) as e:
        raise DataError(f"{path}: unreadable ({e}) — re-run gptrain prepare") from None


def stage(
    inputs: list[str],
    out_dir: str | Path,
    tasks: int,
    options: PrepareOptions | None = None,
    *,
    progress: bool = True,
    **changes: Any,
) -> SlicePlan:
    """Plan the slices and produce the tokenizer once (reused when a plan already matches).

    `options` and `changes` as for `prepare`."""
    o = PrepareOptions.of(options, **changes)
    o.check()
    if tasks < 1:
        raise DataError(f"--tasks {tasks}: must be >= 1")
    out = Path(out_dir).resolve()
    files = resolve_inputs(list(inputs), exclude=out)
    sources = [source_entry(f) for f in files]
    slices = [list(r) for r in plan_slices([s["size"] for s in sources], tasks)]
    added = added_tokens(o)
    source_sha = _source_tokenizer_sha(o.tokenizer)
    old = _reusable_plan(out, list(inputs), sources, slices, o, added, source_sha)
    if old is not None:
        old.options = o  # e.g. another shard_tokens: same slices, another merge
        write_json_atomic(old.dir / PLAN_NAME, asdict(old))
        return old
    root = out / SLICES_DIR
    shutil.rmtree(root, ignore_errors=True)  # another plan: nothing in it can be reused
    root.mkdir(parents=True)
    info, tok_path = build_tokenizer(files, o, added, root / "tokenizer", out, progress)
    record_format(o, info)  # a chat template that fails, fails here, not in every task
    tok_sha = sha256_dir(info.dir)
    plan = SlicePlan(
        out_dir=str(out),
        inputs=list(inputs),
        sources=sources,
        slices=slices,
        options=o,
        added=added,
        tokenizer={
            "dir": str(info.dir),
            "manifest_path": tok_path,
            "name": info.name,
            "vocab_size": info.vocab_size,
            "eos_id": info.eos_id,
            "fast": info.fast,
            "sha256": tok_sha,
        },
        plan_id=_plan_id(list(inputs), sources, slices, o, added, source_sha, tok_sha),
    )
    write_json_atomic(root / PLAN_NAME, asdict(plan))  # last: a plan always has its tokenizer
    return plan


def _reusable_plan(
    out: Path,
    inputs: list[str],
    sources: list,
    slices: list,
    options: PrepareOptions,
    added: list[str],
    source_sha: str | None,
) -> SlicePlan | None:
    try:
        old = load_plan(out)
    except DataError:
        return None
    tok_dir = Path(old.tokenizer["dir"])
    if old.version != PLAN_VERSION or not tok_dir.is_dir():
        return None
    tok_sha = old.tokenizer["sha256"]
    if old.plan_id != _plan_id(inputs, sources, slices, options, added, source_sha, tok_sha):
        return None
    return old if sha256_dir(tok_dir) == tok_sha else None


def read_done(plan: SlicePlan, k: int) -> dict[str, Any] | None:
    """Slice k's done.json when it belongs to this plan (not re-hashed: see verify_slice)."""
    try:
        done = json.loads((plan.slice_dir(k) / DONE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return done if done.get("plan_id") == plan.plan_id else None


def verify_slice(plan: SlicePlan, k: int) -> bool:
    """Whether slice k is complete: its done.json matches the plan and every file its sha256."""
    done = read_done(plan, k)
    if done is None:
        return False
    return not any(
        file_problem(plan.slice_dir(k) / name, size, sha256)
        for entry in done["splits"].values()
        for name, size, sha256 in ShardInfo(**entry).files(_itemsize(plan))
    )


def _itemsize(plan: SlicePlan) -> int:
    return np.dtype(dtype_for_vocab(plan.tokenizer["vocab_size"])).itemsize


def pending_slices(plan: SlicePlan) -> list[int]:
    """Slices still to run: those without a verified done.json."""
    return [k for k in range(len(plan.slices)) if not verify_slice(plan, k)]


def run_slice(out_dir: str | Path, k: int, workers: int = 1) -> dict[str, Any]:
    """Tokenize slice k into OUT/.slices/slice_NNNN/ (skipped when already verified)."""
    plan = load_plan(out_dir)
    if not 0 <= k < len(plan.slices):
        raise DataError(f"slice {k}: the plan in {plan.dir} has {len(plan.slices)} slices")
    if verify_slice(plan, k):
        return {**(read_done(plan, k) or {}), "skipped": True}
    final = plan.slice_dir(k)
    for stale in plan.dir.glob(f".tmp-{final.name}-*"):  # earlier killed attempts
        shutil.rmtree(stale, ignore_errors=True)
    host, started = os.environ.get("SLURMD_NODENAME") or socket.gethostname(), time.time()
    tmp = plan.dir / f".tmp-{final.name}-{host}-{os.getpid()}"
    tmp.mkdir()
    with open(plan.dir / "attempts.log", "a", encoding="utf-8") as log:
        log.write(json.dumps({"slice": k, "host": host, "pid": os.getpid(), "at": started}) + "\n")
    files, info, fmt = plan.files(k), plan.tokenizer_info(), plan.record_format(True)
    try:
        report = _progress_reporter(plan, k, started, faults.kill_slice(k))
        # shard_tokens=None: each split is one stream file, cut into shards by the merge
        splits = write_streams(
            iter_jobs(files, fmt, plan.options),
            info,
            tmp,
            fmt,
            shard_tokens=None,
            workers=workers,
            report=report,
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a hard kill leaves it: the next attempt cleans
        raise
    done = {
        "plan_id": plan.plan_id,
        "slice": k,
        "files": plan.slices[k],
        "splits": {split: s[0].entry() for split, s in splits.items() if s},
        "tokens": sum(s.tokens for shards in splits.values() for s in shards),
        "documents": sum(s.documents for shards in splits.values() for s in shards),
        "started_at": started,
        "seconds": round(time.time() - started, 3),
        "host": host,
        "job_id": os.environ.get("SLURM_JOB_ID"),
    }
    write_json_atomic(tmp / DONE_NAME, done)
    shutil.rmtree(final, ignore_errors=True)  # an unverifiable earlier attempt
    publish(tmp, final)
    (plan.dir / "progress" / f"{final.name}.json").unlink(missing_ok=True)
    return done


def _progress_reporter(
    plan: SlicePlan, k: int, started: float, fault: bool
) -> Callable[[int], None]:
    path = plan.dir / "progress" / f"slice_{k:04d}.json"
    path.parent.mkdir(exist_ok=True)
    last, slow = 0.0, faults.prepare_slow_s()

    def report(tokens: int) -> None:
        nonlocal last
        if fault:  # a task killed mid-write: its temp dir holds a partial stream
            os._exit(17)
        now = time.time()
        if now - last >= _PROGRESS_EVERY_S:
            write_json_atomic(
                path, {"slice": k, "tokens": tokens, "started_at": started, "updated_at": now}
            )
            last = now
        if slow:
            time.sleep(slow)

    report(0)
    return report


def merge(out_dir: str | Path, *, started: float | None = None) -> dict[str, Any]:
    """Verify every slice and cut their concatenated streams into the final shards."""
    start = time.perf_counter()
    plan = load_plan(out_dir)
    out = Path(plan.out_dir)
    dones = [read_done(plan, k) for k in range(len(plan.slices))]
    missing = [k for k, d in enumerate(dones) if d is None]
    if missing:
        names = ", ".join(str(k) for k in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise DataError(
            f"{plan.dir}: slices {names} of {len(plan.slices)} not done — re-run the same "
            "gptrain prepare command to redo only those"
        )
    info = plan.tokenizer_info()
    dtype, masked = dtype_for_vocab(info.vocab_size), plan.record_format().masked
    tmp = make_tmp_dir(out)
    try:
        shards = {}
        for split in ("train", "val"):
            writer = ShardWriter(
                tmp,
                split,
                shard_tokens=plan.options.shard_tokens,
                dtype=dtype,
                eos_id=info.eos_id,
                masked=masked,
            )
            for k, done in enumerate(dones):
                assert done is not None
                if split in done["splits"]:
                    _copy_stream(plan, k, ShardInfo(**done["splits"][split]), writer)
            shards[split] = writer.finish()
        if plan.tokenizer["manifest_path"] == "tokenizer":
            shutil.copytree(info.dir, tmp / "tokenizer")
        manifest = dataset_manifest(
            shards, info, plan.tokenizer["manifest_path"], plan.sources, plan.manifest_args()
        )
        commit(tmp, out, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(plan.dir, ignore_errors=True)
    seconds = time.perf_counter() - start if started is None else time.time() - started
    return {**summarize(out, manifest, seconds), "slices": len(plan.slices)}


def _copy_stream(plan: SlicePlan, k: int, shard: ShardInfo, writer: ShardWriter) -> None:
    """Append one slice stream (and mask) to the writer, checking its sha256 on the way."""
    path, mask_path = plan.slice_dir(k) / shard.file, plan.slice_dir(k) / shard.mask_file
    itemsize = writer.dtype.itemsize
    for name, size, _ in shard.files(itemsize):  # the hashes are checked while copying
        file = plan.slice_dir(k) / name
        if not file.is_file() or file.stat().st_size != size:
            _corrupt(plan, k, file, "missing or not the size done.json says")
    digest, mask_digest = hashlib.sha256(), hashlib.sha256()
    with ExitStack() as files:
        f = files.enter_context(open(path, "rb"))
        m = files.enter_context(open(mask_path, "rb")) if writer.masked else None
        while data := f.read(_MERGE_CHUNK_TOKENS * itemsize):
            digest.update(data)
            mask = None
            if m is not None:
                bits = m.read(len(data) // itemsize)
                mask_digest.update(bits)
                mask = np.frombuffer(bits, np.uint8)
            writer.write(np.frombuffer(data, writer.dtype), mask)
    if digest.hexdigest() != shard.sha256:
        _corrupt(plan, k, path, "sha256 differs from done.json (corrupt)")
    if writer.masked and mask_digest.hexdigest() != shard.mask_sha256:
        _corrupt(plan, k, mask_path, "sha256 differs from done.json (corrupt)")


def _corrupt(plan: SlicePlan, k: int, path: Path, what: str) -> None:
    (plan.slice_dir(k) / DONE_NAME).unlink(missing_ok=True)  # the next run redoes it
    raise DataError(f"{path}: {what} — re-run the same gptrain prepare command to redo slice {k}")


def prepare_sliced(
    inputs: list[str],
    out_dir: str | Path,
    options: PrepareOptions | None = None,
    *,
    tasks: int,
    workers: int | None = None,
    progress: bool = True,
    **changes: Any,
) -> dict[str, Any]:
    """`prepare` in `tasks` resumable slices on this machine, then merged: same output bytes.

    Up to `workers` slices run at once, in spawned processes (1: in this process);
    slices already done and verified are skipped. `options` and `changes` as for `prepare`.
    """
    started = time.time()
    plan = stage(inputs, out_dir, tasks, options, progress=progress, **changes)
    todo = pending_slices(plan)
    if progress:
        print(f"{len(plan.slices)} slices, {len(plan.slices) - len(todo)} already done")
    n_workers = workers or cpu_count()
    concurrent = max(1, min(n_workers, len(todo)))
    per_slice = max(1, n_workers // concurrent)

    def report(done: dict[str, Any]) -> None:
        if progress:
            print(
                f"slice {done['slice'] + 1}/{len(plan.slices)}: {done['tokens']:,} tokens in "
                f"{done['seconds']:.1f} s"
            )

    if concurrent == 1:
        for k in todo:
            report(run_slice(plan.out_dir, k, per_slice))
    else:
        try:
            run_stoppable(
                run_slice, [(plan.out_dir, k, per_slice) for k in todo], concurrent, report
            )
        except BrokenProcessPool:
            raise DataError(
                f"{plan.dir}: a slice process died — re-run the same command to resume"
            ) from None
    return merge(plan.out_dir, started=started)


def progress_of(out_dir: str | Path) -> dict[str, Any] | None:
    """Slices done/total and tokens so far of a sliced prepare in OUT (None: no plan there).

    Cheap (no hashing): for `gptrain status`.
    """
    try:
        plan = load_plan(out_dir)
    except DataError:
        return None
    done = tokens = 0
    first, last = float("inf"), 0.0
    for k in range(len(plan.slices)):
        record = read_done(plan, k)
        if record is not None:
            done += 1
            tokens += record["tokens"]
            first = min(first, record["started_at"])
            last = max(last, record["started_at"] + record["seconds"])
            continue
        try:
            p = json.loads((plan.dir / "progress" / f"slice_{k:04d}.json").read_text())
        except (OSError, ValueError):
            continue
        tokens += p["tokens"]
        first, last = min(first, p["started_at"]), max(last, p["updated_at"])
    span = last - first if last > first else None
    return {
        "slices_done": done,
        "slices_total": len(plan.slices),
        "tokens": tokens,
        "first_start": None if span is None else first,
        "last_update": last or None,
        "tokens_per_s": tokens / span if span else None,
    }
