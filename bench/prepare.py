"""prepare throughput vs raw `tokenizers` encode_batch, and prepare's peak memory.

    python bench/prepare.py                 # 10 MB corpus: tokens/s of both and the ratio
    python bench/prepare.py --rss 10 100    # peak RSS of prepare on 10 MB and 100 MB inputs

The corpus is the bundled demo corpus (stdlib docstrings) repeated to the
requested size as JSON lines, tokenized with a 8192-token BPE trained on it.
The baseline loads all text into memory and calls `Tokenizer.encode_batch`
(Rust threads on every core); prepare reads, splits, tokenizes with one worker
process per core, writes and hashes shards. Goal: ratio >= 0.8. The RSS
runs show that memory stays flat as the input grows (inputs are streamed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sharding.demo_corpus import write_corpus  # noqa: E402
from sharding.prepare import prepare  # noqa: E402

VOCAB = 8192


def make_corpus(root: Path, megabytes: float) -> Path:
    """The demo corpus repeated (with a copy number, so documents differ) up to `megabytes`."""
    demo = root / "demo.jsonl"
    if not demo.exists():
        write_corpus(demo)
    texts = [json.loads(line)["text"] for line in demo.open(encoding="utf-8")]
    out = root / f"corpus_{megabytes:g}mb.jsonl"
    target, size, copy = megabytes * 1e6, 0, 0
    with open(out, "w", encoding="utf-8") as f:
        while size < target:
            for t in texts:
                line = json.dumps({"text": f"{t}\n({copy})"}) + "\n"
                f.write(line)
                size += len(line)
                if size >= target:
                    break
            copy += 1
    return out


def train_tokenizer(root: Path) -> Path:
    """A BPE tokenizer trained (by prepare itself) on the demo corpus."""
    out = root / "tok_data"
    if not (out / "tokenizer").exists():
        prepare([str(root / "demo.jsonl")], out, train_tokenizer_vocab=VOCAB, progress=False)
    return out / "tokenizer"


def raw_tokens_per_s(corpus: Path, tok_dir: Path) -> float:
    """Tokens/s of encode_batch over the whole corpus, text already in memory."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), 4096):
        tokens += sum(
            len(e.ids) for e in tok.encode_batch(texts[i : i + 4096], add_special_tokens=False)
        )
    return tokens / (time.perf_counter() - start)


def peak_rss(cmd: list[str]) -> tuple[str, float, float]:
    """Run `cmd`; sample RSS every 0.1 s: (stdout, peak main MB, peak sum over workers MB).

    Sampled because ru_maxrss of a forked child counts the parent pages it
    shared at fork time, which says nothing about the worker itself.
    """
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    main_mb = workers_mb = 0.0
    while proc.poll() is None:
        try:
            main_mb = max(main_mb, ps.memory_info().rss / 2**20)
            kids = sum(c.memory_info().rss for c in ps.children(recursive=True))
            workers_mb = max(workers_mb, kids / 2**20)
        except psutil.Error:
            pass  # a process ended between listing and reading it
        time.sleep(0.1)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode:
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(cmd)}")
    return out, main_mb, workers_mb


def main() -> None:
    """Throughput comparison, or peak-RSS runs with --rss."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=10, help="corpus size for the throughput run")
    p.add_argument("--rss", type=float, nargs="*", help="corpus sizes (MB) for peak-RSS runs")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = make_corpus(root, args.mb)
        tok_dir = train_tokenizer(root)
        if args.rss:
            for mb in args.rss:
                big = make_corpus(root, mb)
                code = (
                    f"from sharding.prepare import prepare; prepare([{str(big)!r}],"
                    f" {str(root / f'out_{mb:g}')!r}, tokenizer={str(tok_dir)!r},"
                    " progress=False)"
                )
                out, main_mb, workers_mb = peak_rss([sys.executable, "-c", code])
                print(
                    f"{mb:6g} MB input: peak RSS main process {main_mb:.0f} MB,"
                    f" all workers together {workers_mb:.0f} MB | {out.strip()}"
                )
            return
        raw = raw_tokens_per_s(corpus, tok_dir)
        summary = prepare([str(corpus)], root / "out", tokenizer=str(tok_dir), progress=False)
    ours = summary["tokens_per_s"]
    print(f"{args.mb:g} MB corpus, {summary['tokens']:,} tokens, {os.cpu_count()} cores")
    print(f"raw tokenizers encode_batch: {raw / 1e6:6.2f} M tokens/s")
    print(f"gptrain prepare            : {ours / 1e6:6.2f} M tokens/s")
    print(f"ratio prepare/raw: {ours / raw:.2f}")


if __name__ == "__main__":
    main()
