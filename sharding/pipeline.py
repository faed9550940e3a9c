"""The steps of a prepare, driven by `sharding.prepare` (in one go) and `sharding.slices`
(in resumable slices): the tokenizer, the records as tokenization jobs, the token
streams and the manifest.

    info, tok_path = build_tokenizer(files, options, added, tmp / "tokenizer", out, progress)
    fmt = record_format(options, info)
    shards = write_streams(iter_jobs(files, fmt, options), info, tmp, fmt,
                           shard_tokens=options.shard_tokens, workers=8)
    manifest = dataset_manifest(shards, info, tok_path, sources, manifest_args(...))

Documents are tagged train/val by a seeded hash of their text, tokenized by a pool
of worker processes (results kept in input order) and followed by EOS, so the same
inputs and seed give the same streams whatever the number of workers or slices.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from sharding.errors import DataError
from sharding.manifest import (
    ShardInfo,
    build_manifest_dict,
    dtype_for_vocab,
    sha256_dir,
    tokenizer_path_for_manifest,
)
from sharding.options import PrepareOptions, flag
from sharding.shards import ShardWriter
from sharding.sources import RecordFormat, iter_batches
from sharding.tokenizer import (
    Encoded,
    Encoder,
    TokenizerInfo,
    encode_job,
    init_worker,
    load_tokenizer_info,
    read_token_list,
    train_bpe,
)
from sharding.tokenizer import add_tokens as extend_tokenizer

# Text per tokenization job: big enough to amortise process hand-off, small
# enough that 2 jobs per worker in flight keep memory low.
JOB_CHARS = 1 << 20
JOBS_IN_FLIGHT_PER_WORKER = 2
# The tokenizer trains on a seeded sample of at most this much text.
TOKENIZER_SAMPLE_BYTES = 64 << 20
TOKENIZER_SAMPLE_DOC_CHARS = 1 << 20

Job = tuple[list[str], list[bool], list[bool], list[bool]]  # texts, doc ends, to val, counted


def added_tokens(options: PrepareOptions) -> list[str]:
    """The tokens `--add-tokens` names (read from its file, when it is one)."""
    return read_token_list(options.add_tokens) if options.add_tokens is not None else []


def build_tokenizer(
    files: list[Path],
    options: PrepareOptions,
    added: list[str],
    tok_dir: Path,
    out: Path,
    progress: bool,
) -> tuple[TokenizerInfo, str]:
    """The tokenizer to encode with, and its manifest path; a trained or extended one is
    written to `tok_dir` (which `commit` moves to OUT/tokenizer)."""
    if options.tokenizer is not None:
        info = load_tokenizer_info(options.tokenizer)
        tok_path = tokenizer_path_for_manifest(info.dir, out)
    else:
        vocab = options.train_tokenizer_vocab
        assert vocab is not None
        if progress:
            print(f"training a {vocab}-token byte-level BPE tokenizer...")
        sample = _tokenizer_sample(files, options.record_format(), options.errors, options.seed)
        info = train_bpe(sample, vocab, tok_dir)
        tok_path = "tokenizer"  # where commit() moves it
    if added:
        info = extend_tokenizer(info, added, tok_dir)
        tok_path = "tokenizer"
    return info, tok_path


def record_format(options: PrepareOptions, info: TokenizerInfo) -> RecordFormat:
    """How records become documents, with the tokenizer's chat template loaded (chat)."""
    fmt = options.record_format()
    if fmt.kind == "chat":
        fmt = replace(fmt, chat_template=chat_renderer(info, options.chat_template))
    return fmt


def chat_renderer(info: TokenizerInfo, choice: str) -> Callable[..., str] | None:
    """The tokenizer's chat template as a function of the messages, or None (built-in)."""
    config = info.dir / "tokenizer_config.json"
    has_template = (info.dir / "chat_template.jinja").is_file() or (
        config.is_file() and "chat_template" in json.loads(config.read_text(encoding="utf-8"))
    )
    if choice == "builtin" or (choice == "auto" and not has_template):
        return None
    if not has_template:
        raise DataError(
            f"{info.dir}: {flag('chat_template')} tokenizer, but it has no chat template"
        )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(info.dir), local_files_only=True)

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    return render


def iter_jobs(files: list[Path], fmt: RecordFormat, options: PrepareOptions) -> Iterator[Job]:
    """Documents in input order, grouped into jobs, each tagged train/val by a seeded hash.

    A record (prompt→completion, chat) is hashed whole and never split between jobs;
    a plain-text document is hashed by its first piece (a .txt file streams in pieces).
    """
    key, threshold = _seed_key(options.seed, "split"), int(options.val_fraction * 2.0**64)
    texts: list[str] = []
    ends: list[bool] = []
    vals: list[bool] = []
    counts: list[bool] = []
    chars, doc_val = 0, None
    record: list[tuple[str, bool, bool]] = []  # the segments of the current record
    for path in files:
        for batch in iter_batches(path, fmt=fmt, errors=options.errors):
            for text, end, counted in zip(*batch, strict=True):
                if fmt.masked:
                    record.append((text, end, counted))
                    if not end:
                        continue
                    whole = "\x1f".join(t for t, _, _ in record)
                    pieces, record, doc_val = record, [], _doc_hash(whole, key) < threshold
                elif doc_val is None:  # first piece decides for the whole document
                    pieces, doc_val = [(text, end, counted)], _doc_hash(text, key) < threshold
                else:
                    pieces = [(text, end, counted)]
                for piece, piece_end, piece_counted in pieces:
                    texts.append(piece)
                    ends.append(piece_end)
                    vals.append(doc_val)
                    counts.append(piece_counted)
                    chars += len(piece)
                if end:
                    doc_val = None
                if chars >= JOB_CHARS:
                    yield texts, ends, vals, counts
                    texts, ends, vals, counts, chars = [], [], [], [], 0
    if texts:
        yield texts, ends, vals, counts


def write_streams(
    jobs: Iterator[Job],
    info: TokenizerInfo,
    tmp: Path,
    fmt: RecordFormat,
    *,
    shard_tokens: int | None,
    workers: int,
    progress: bool = False,
    total_bytes: int = 0,
    report: Callable[[int], None] | None = None,
) -> dict[str, list[ShardInfo]]:
    """Tokenize every job and append its tokens (and masks) to the train/val shard writers.

    `shard_tokens=None` writes each split as one uncut stream file. `workers`: tokenizer
    processes (1: in this process). `report(tokens so far)` is called after each job.
    """
    dtype, masked = dtype_for_vocab(info.vocab_size), fmt.masked
    # A chat template writes the tokenizer's special tokens as text: they must encode as ids.
    special_tokens = fmt.chat_template is not None
    writers = {
        split: ShardWriter(
            tmp, split, shard_tokens=shard_tokens, dtype=dtype, eos_id=info.eos_id, masked=masked
        )
        for split in ("train", "val")
    }
    n_tokens = 0
    with _progress_bar(progress, total_bytes) as advance:
        for (train, val, train_mask, val_mask), chars in _encode(
            jobs, info, dtype, workers, masked, special_tokens
        ):
            writers["train"].write(train, train_mask)
            writers["val"].write(val, val_mask)
            n_tokens += train.size + val.size
            advance(chars, n_tokens)
            if report is not None:
                report(n_tokens)
    return {split: w.finish() for split, w in writers.items()}


def manifest_args(inputs: list[str], options: PrepareOptions, added: list[str]) -> dict[str, Any]:
    """The manifest's `args`: the options that made the dataset (a local and a sliced
    prepare write the same, so their manifests are byte-identical)."""
    o, fmt = options, options.record_format()
    return {
        "inputs": list(inputs),
        "tokenizer": o.tokenizer,
        "train_tokenizer_vocab": o.train_tokenizer_vocab,
        "text_key": o.text_key,
        "val_fraction": o.val_fraction,
        "seed": o.seed,
        "shard_tokens": o.shard_tokens,
        "errors": o.errors,
        **({"format": fmt.kind, "keys": list(fmt.keys)} if fmt.masked else {}),
        **({"chat_template": o.chat_template} if fmt.kind == "chat" else {}),
        **({"add_tokens": added} if added else {}),
    }


def source_entry(path: Path) -> dict[str, Any]:
    """The manifest's record of one input file."""
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime": int(st.st_mtime)}


def dataset_manifest(
    shards: dict[str, list[ShardInfo]],
    info: TokenizerInfo,
    tok_path: str,
    sources: list[dict[str, Any]],
    args: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of the written shards; DataError when no document was found."""
    if not any(s.documents for split in shards.values() for s in split):
        inputs = " ".join(args["inputs"])
        raise DataError(f"{inputs}: no documents (inputs are empty) — check INPUT")
    return build_manifest_dict(
        tokenizer={"path": tok_path, "name": info.name, "sha256": sha256_dir(info.dir)},
        vocab_size=info.vocab_size,
        eos_id=info.eos_id,
        splits=shards,
        sources=sources,
        seed=args["seed"],
        args=args,
        loss_mask="format" in args,
    )


def summarize(out: Path, manifest: dict[str, Any], seconds: float) -> dict:
    """Print and return what a finished prepare wrote (documents, tokens, shards, speed)."""
    totals, splits = manifest["totals"], manifest["splits"]
    summary = {
        "out_dir": str(out),
        "documents": totals["documents"],
        "tokens": totals["tokens"],
        "train_tokens": splits["train"]["tokens"],
        "val_tokens": splits["val"]["tokens"],
        "shards": totals["shards"],
        "vocab_size": manifest["vocab_size"],
        "seconds": round(seconds, 3),
        "tokens_per_s": round(totals["tokens"] / max(seconds, 1e-9)),
    }
    print(
        f"prepared {out}: {summary['documents']:,} documents, {summary['tokens']:,} tokens"
        f" (train {summary['train_tokens']:,}, val {summary['val_tokens']:,}) in"
        f" {summary['shards']} shards, {seconds:.1f} s, {summary['tokens_per_s']:,} tokens/s"
    )
    if summary["val_tokens"] == 0 and manifest["args"]["val_fraction"] > 0:
        print(f"note: no document landed in val — raise --val-fraction for {out} to have one")
    return summary


def cpu_count() -> int:
    """CPUs this process may run on (the default number of tokenizer processes)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _doc_hash(text: str, key: bytes) -> int:
    # surrogatepass: JSON may decode to lone surrogates; hashing must not fail on them.
    data = text.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=key).digest(), "little")


def _seed_key(seed: int, purpose: str) -> bytes:
    return f"{purpose}:{seed}".encode()


def _encode(
    jobs: Iterator[Job],
    info: TokenizerInfo,
    dtype: str,
    n_workers: int,
    masked: bool,
    special_tokens: bool,
) -> Iterator[tuple[Encoded, int]]:
    """Tokens and masks of each job, in job order, with the job's character count."""
    args = (str(info.dir), info.fast, dtype, info.eos_id, masked, special_tokens)
    if n_workers <= 1:
        encoder = Encoder(*args)
        for job in jobs:
            yield encoder(*job), sum(map(len, job[0]))
        return
    # spawn, not fork: the parent may hold tokenizers/datasets threads, which fork
    # does not copy safely. ProcessPoolExecutor (not Pool) fails fast with
    # BrokenProcessPool when a worker dies, where Pool would respawn it forever.
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(n_workers, ctx, initializer=init_worker, initargs=args) as pool:
        pending: deque = deque()
        # A bounded window of submitted jobs instead of map(): map would read the
        # whole corpus into its queue when reading outpaces tokenizing.
        for job in jobs:
            pending.append((pool.submit(encode_job, job), sum(map(len, job[0]))))
            if len(pending) >= JOBS_IN_FLIGHT_PER_WORKER * n_workers:
                future, chars = pending.popleft()
                yield future.result(), chars
        while pending:
            future, chars = pending.popleft()
            yield future.result(), chars


def _tokenizer_sample(files: list[Path], fmt: RecordFormat, errors: str, seed: int) -> list[str]:
    """A seeded sample of documents, at most TOKENIZER_SAMPLE_BYTES, independent of input order.

    Keeps the documents with the smallest seeded hashes (bottom-k), so memory
    stays bounded in one pass however large the corpus is.
    """
    key = _seed_key(seed, "tokenizer")
    heap: list[tuple[int, int, int, str]] = []  # (-hash, order, bytes, text): max-heap on hash
    total = order = 0
    for path in files:
        for texts, _ends, _counted in iter_batches(path, fmt=fmt, errors=errors):
            for text in texts:
                text = text[:TOKENIZER_SAMPLE_DOC_CHARS]
                size = len(text.encode("utf-8", "surrogatepass"))
                heapq.heappush(heap, (-_doc_hash(text, key), order, size, text))
                total, order = total + size, order + 1
                while total > TOKENIZER_SAMPLE_BYTES and len(heap) > 1:
                    total -= heapq.heappop(heap)[2]
    if not heap:
        raise DataError(f"{files[0]}: no documents to train a tokenizer on — check INPUT")
    return [text for *_, text in sorted(heap, reverse=True)]


@contextmanager
def _progress_bar(enabled: bool, total_bytes: int) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar over input bytes; text characters stand in for bytes read."""
    if not enabled:
        yield lambda chars, tokens: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("tokenizing"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[tokens]:,} tokens"),
        TimeElapsedColumn(),
    )
    with Progress(*columns) as bar:
        task = bar.add_task("tokenize", total=max(total_bytes, 1), tokens=0)
        done = 0

        def advance(chars: int, tokens: int) -> None:
            nonlocal done
            done = min(done + chars, total_bytes)  # compressed inputs hold more text than bytes
            bar.update(task, completed=done, tokens=tokens)

        yield advance
        bar.update(task, completed=max(total_bytes, 1))
