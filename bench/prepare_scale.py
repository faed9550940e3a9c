"""Sliced prepare throughput with 1, 2 and 4 local workers, and the speed-up over 1.

    python bench/prepare_scale.py                  # 60 MB in 8 files, 4 slices
    python bench/prepare_scale.py --mb 100 --files 16 --tasks 8 --workers 1 2 4 8

The corpus is the bundled demo corpus (stdlib docstrings) repeated to the
requested size as JSON lines, cut into `--files` files (slices never split a
file). Each run is `prepare_sliced` from scratch with a given 8192-token BPE
(so tokenizer training is not timed): plan, `--tasks` slices run by up to
`workers` spawned processes at once, merge into the final shards. tokens/s is
end to end, the merge included. The speed-up cannot exceed the machine's cores.
TOKENIZERS_PARALLELISM=false here, so that 1 worker is one core: otherwise the
in-process encoder already spreads `encode_batch` over every core with Rust threads.
Each spawned slice process pays ~2 s of imports (datasets), so small corpora
understate the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from bench.prepare import make_corpus, train_tokenizer  # noqa: E402
from sharding.slices import prepare_sliced  # noqa: E402


def split_corpus(corpus: Path, root: Path, n_files: int) -> Path:
    """The corpus's lines dealt round-robin into `n_files` JSON-lines files under root/in."""
    out = root / "in"
    out.mkdir()
    with ExitStack() as stack:
        parts = [
            stack.enter_context(open(out / f"part{i:03d}.jsonl", "w", encoding="utf-8"))
            for i in range(n_files)
        ]
        with open(corpus, encoding="utf-8") as f:
            for i, line in enumerate(f):
                parts[i % n_files].write(line)
    return out


def main() -> None:
    """Run the sliced prepare once per worker count and print tokens/s and speed-up."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=60, help="corpus size in MB")
    p.add_argument("--files", type=int, default=8, help="input files the corpus is cut into")
    p.add_argument("--tasks", type=int, default=4, help="slices")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = make_corpus(root, args.mb)
        tok_dir = train_tokenizer(root)
        inputs = split_corpus(corpus, root, args.files)
        results = []
        for workers in args.workers:
            out = root / f"out_{workers}"
            summary = prepare_sliced(
                [str(inputs)],
                out,
                tasks=args.tasks,
                workers=workers,
                tokenizer=str(tok_dir),
                progress=False,
            )
            results.append((workers, summary))
            shutil.rmtree(out)
    base = results[0][1]["tokens_per_s"]
    print(
        f"{args.mb:g} MB in {args.files} files, {results[0][1]['tokens']:,} tokens, "
        f"{args.tasks} slices, os.cpu_count() = {os.cpu_count()}"
    )
    for workers, s in results:
        print(
            f"workers {workers}: {s['tokens_per_s'] / 1e6:6.3f} M tokens/s,"
            f" {s['seconds']:6.1f} s, speed-up x{s['tokens_per_s'] / base:.2f}"
        )
    print(json.dumps({w: s["tokens_per_s"] for w, s in results}))


if __name__ == "__main__":
    main()
