"""`gptrain prepare`: corpus files -> tokenizer -> checksummed token shards + manifest.json.

    gptrain prepare corpus.jsonl --out data/demo --train-tokenizer 4096
    gptrain prepare 'web/*.parquet' --out data/web --tokenizer path/to/hf_tokenizer
    gptrain prepare qa.jsonl --out data/qa --tokenizer DIR --format prompt-completion
    gptrain prepare --verify data/demo

Documents are streamed in input order (see `sharding.sources` for formats;
a .txt file is ONE document), split into train/val by a seeded hash of their
text, tokenized by a pool of worker processes (results kept in input order),
followed by EOS, and written as fixed-size shards of uint16/uint32 tokens. The
same inputs and seed give byte-identical shards and manifest, whatever the
number of workers. Prompt→completion and chat records (`--format`) also get
a uint8 loss mask per shard (1 = completion / assistant token), written and
hashed alongside the tokens. Shards go to a temp dir in OUT first; manifest.json is
written last, so an interrupted prepare never leaves a manifest pointing at
partial shards.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from sharding import pipeline
from sharding.errors import DataError
from sharding.manifest import file_problem, load_manifest, sha256_dir
from sharding.options import PrepareOptions
from sharding.shards import commit, make_tmp_dir
from sharding.sources import resolve_inputs


def prepare(
    inputs: list[str],
    out_dir: str | Path,
    options: PrepareOptions | None = None,
    *,
    workers: int | None = None,
    progress: bool = True,
    **changes: Any,
) -> dict:
    """Tokenize `inputs` into `out_dir`; returns (and prints) a summary.

    `options` (see `PrepareOptions`; default: its defaults), with `changes` to its
    fields given as keywords: `prepare(inputs, out, train_tokenizer_vocab=4096)`.
    Give either `tokenizer` (an HF tokenizer dir) or `train_tokenizer_vocab` (train a
    byte-level BPE, saved as `out_dir/tokenizer/`). `workers`: tokenizer processes
    (default: all cores; 1 tokenizes in this process). Raises DataError for any
    problem with the inputs, naming the file and what to do.
    """
    o = PrepareOptions.of(options, **changes)
    o.check()
    start = time.perf_counter()
    out = Path(out_dir)
    files = resolve_inputs(inputs, exclude=out)
    added = pipeline.added_tokens(o)
    tmp = make_tmp_dir(out)
    try:
        info, tok_path = pipeline.build_tokenizer(files, o, added, tmp / "tokenizer", out, progress)
        fmt = pipeline.record_format(o, info)
        shards = pipeline.write_streams(
            pipeline.iter_jobs(files, fmt, o),
            info,
            tmp,
            fmt,
            shard_tokens=o.shard_tokens,
            workers=workers or pipeline.cpu_count(),
            progress=progress,
            total_bytes=sum(f.stat().st_size for f in files),
        )
        sources = [pipeline.source_entry(f) for f in files]
        args = pipeline.manifest_args(inputs, o, added)
        manifest = pipeline.dataset_manifest(shards, info, tok_path, sources, args)
        commit(tmp, out, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return pipeline.summarize(out, manifest, time.perf_counter() - start)


def verify(out_dir: str | Path) -> dict:
    """Check every shard's size and sha256 (and the tokenizer's hash) against the manifest.

    Raises DataError naming the first bad file (and how many more); returns
    {"shards", "tokens", "bytes"} when everything matches.
    """
    m = load_manifest(out_dir)
    problems: list[str] = []
    n_shards = n_tokens = n_bytes = 0
    for split in m.splits:
        for shard in m.shards(split):
            want = shard.tokens * m.itemsize
            n_shards, n_tokens, n_bytes = n_shards + 1, n_tokens + shard.tokens, n_bytes + want
            for name, size, sha256 in shard.files(m.itemsize):
                if problem := file_problem(m.dir / name, size, sha256):
                    problems.append(f"{m.dir / name}: {problem}")
    if not m.tokenizer_dir.is_dir():
        problems.append(f"{m.tokenizer_dir}: tokenizer dir missing")
    elif sha256_dir(m.tokenizer_dir) != m.tokenizer_sha256:
        problems.append(f"{m.tokenizer_dir}: tokenizer files changed since prepare")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more} — re-run gptrain prepare")
    return {"shards": n_shards, "tokens": n_tokens, "bytes": n_bytes}
