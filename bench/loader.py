"""Loader throughput: shuffled, packed micro-batches vs a plain sequential numpy read.

    python bench/loader.py                      # synthetic 128M-token dataset in a temp dir
    python bench/loader.py --shard-tokens 1048576  # the same in 128 shards
    python bench/loader.py --data data/demo     # an existing prepared dataset
    python bench/loader.py --doc-tokens 200     # shorter documents: more position restarts

Both sides produce the same thing per micro-batch, an int64 [B, L] input and
label array, from the same shards (already in the page cache): the baseline
reads them front to back with numpy slices, the loader in a shuffled order
through `build_loader`. The loader is measured twice: without and with
`data.document_mask` (the default). Its `position_ids`, which restart after every EOS,
are computed by the consumer on its device (`sharding.loader.document_positions`, in the
trainer's `Engine.loss_parts`), so the two rows should match: masking costs the loader
nothing (the synthetic documents average `--doc-tokens` tokens).
"first touch" is a fresh mapping (every random window page-faults, as in a
run's first epoch); "steady state" follows one full epoch and is the best of
several trials, since other processes make runs noisy.
Goals, each loader row: >= 100M tokens/s in one process; ratio >= 0.5.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sharding.config import DataConfig, SourceConfig  # noqa: E402
from sharding.loader import build_loader  # noqa: E402
from sharding.manifest import load_manifest  # noqa: E402
from sharding.shards import write_dataset  # noqa: E402

EOS_ID = 50256


def make_dataset(
    root: Path, tokens: int, shard_tokens: int = 1 << 26, doc_tokens: int = 1000
) -> Path:
    """A synthetic dataset of random GPT-2-sized token ids, in shards of `shard_tokens`:
    documents of `doc_tokens` tokens on average (random lengths), each ending in EOS."""
    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text("{}")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, EOS_ID, size=tokens, dtype=np.uint16)
    lengths = rng.geometric(1 / doc_tokens, size=2 * tokens // doc_tokens + 16)
    ends = np.cumsum(lengths) - 1
    ids[ends[ends < tokens]] = EOS_ID
    return write_dataset(
        root / "data",
        {"train": ids},
        tokenizer_dir=tok_dir,
        vocab_size=50257,
        eos_id=EOS_ID,
        shard_tokens=shard_tokens,
    )


class Sequential:
    """Reads micro-batches front to back with plain numpy slices, wrapping around."""

    def __init__(self, data: Path, batch: int, seq_len: int):
        m = load_manifest(data)
        self.arrays = [
            np.asarray(np.memmap(m.shard_path(s), dtype=m.dtype, mode="r"))
            for s in m.shards("train")
        ]
        self.batch, self.seq_len = batch, seq_len
        self.it = self._batches()

    def _batches(self):
        b, n = self.batch, self.batch * self.seq_len
        while True:
            for arr in self.arrays:
                for lo in range(0, arr.size - n - 1, n):
                    window = arr[lo : lo + n + 1]
                    inputs = window[:-1].astype(np.int64).reshape(b, self.seq_len)
                    labels = window[1:].astype(np.int64).reshape(b, self.seq_len)
                    yield inputs, labels

    def __next__(self):
        return next(self.it)


def timed(it, count: int) -> float:
    """Seconds to take `count` items from an iterator."""
    start = time.perf_counter()
    for _ in range(count):
        next(it)
    return time.perf_counter() - start


def warm(data: Path) -> None:
    """Read every shard once so both sides run from the page cache."""
    m = load_manifest(data)
    for s in m.shards("train"):
        int(np.fromfile(m.shard_path(s), dtype=m.dtype)[::4096].sum())


def main() -> None:
    """Print tokens/s of the sequential read and of the loader without and with document
    positions, each loader's as a ratio to the sequential read's."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="a prepared dataset dir (default: synthetic)")
    p.add_argument("--tokens", type=int, default=128 << 20, help="synthetic dataset size")
    p.add_argument("--shard-tokens", type=int, default=1 << 26, help="synthetic shard size")
    p.add_argument("--doc-tokens", type=int, default=1000, help="synthetic mean document size")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batches", type=int, default=4000, help="micro-batches per trial")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--workers", type=int, default=0, help="data.num_workers of the loader")
    args = p.parse_args()
    tokens = args.batches * args.batch * args.seq_len
    names = {False: "loader", True: "loader + document positions"}  # by data.document_mask
    with tempfile.TemporaryDirectory() as tmp:
        data = (
            Path(args.data)
            if args.data
            else make_dataset(Path(tmp), args.tokens, args.shard_tokens, args.doc_tokens)
        )
        warm(data)
        loaders = {
            mask: build_loader(
                DataConfig(
                    sources=[SourceConfig(str(data))],
                    seq_len=args.seq_len,
                    num_workers=args.workers,
                    document_mask=mask,
                ),
                split="train",
                rank=0,
                world_size=1,
                micro_batch_size=args.batch,
                seed=0,
            )
            for mask in names
        }
        readers = {mask: iter(loader) for mask, loader in loaders.items()}
        # First touch: every window of a fresh mapping page-faults (what the first
        # epoch of a run sees); the sequential read faults 16 pages at a time.
        first = {mask: [timed(it, args.batches)] for mask, it in readers.items()}
        readers["sequential"] = Sequential(data, args.batch, args.seq_len)
        first["sequential"] = [timed(readers["sequential"], args.batches)]
        # Steady state: one full epoch maps every page, as in any later epoch.
        for mask in names:
            timed(readers[mask], loaders[mask].batches_per_epoch)
        steady: dict = {key: [] for key in readers}
        for _ in range(args.trials):  # interleaved, so all see the same background load
            for key, it in readers.items():
                steady[key].append(timed(it, args.batches))
        del readers
    documents = "" if args.data else f", documents of ~{args.doc_tokens} tokens"
    print(
        f"batch {args.batch}x{args.seq_len}, {args.batches} micro-batches per trial,"
        f" loader num_workers={args.workers}{documents}"
    )
    for label, seconds in [
        ("first touch", first),
        (f"steady state, best of {args.trials}", steady),
    ]:
        sequential = tokens / min(seconds["sequential"])
        print(f"{label}: sequential {sequential / 1e6:7.1f} M tokens/s")
        for mask, name in names.items():
            rate = tokens / min(seconds[mask])
            print(f"  {name:28s} {rate / 1e6:7.1f} M tokens/s, ratio {rate / sequential:.2f}")


if __name__ == "__main__":
    main()
