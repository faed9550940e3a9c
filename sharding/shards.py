"""Writing token shards: fixed-size flat binary files, hashed as they are written.

Shards are written into a temp directory inside OUT and moved into place by
`commit`, which writes `manifest.json` last; an interrupted prepare therefore
leaves either the previous dataset or no manifest at all, never a manifest
pointing at partial shards.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from sharding.atomic import publish
from sharding.manifest import (
    MANIFEST_NAME,
    MASK_START,
    ShardInfo,
    build_manifest_dict,
    dtype_for_vocab,
    sha256_dir,
    tokenizer_path_for_manifest,
    write_json_atomic,
)
from sharding.options import PrepareOptions

TMP_PREFIX = ".prepare-tmp-"


def shard_name(split: str, index: int) -> str:
    """File name of shard `index` of `split`."""
    return f"{split}_{index:05d}.bin"


class ShardWriter:
    """Cuts one split's token stream into shards of exactly `shard_tokens` tokens (last one less).

    Cutting at a fixed token count (not at document ends) keeps shard sizes
    predictable; the loader packs across shard boundaries anyway. `shard_tokens=None`
    writes the whole stream to one file (a slice's stream, cut later by the merge).
    """

    def __init__(
        self,
        tmp_dir: Path,
        split: str,
        *,
        shard_tokens: int | None,
        dtype: str,
        eos_id: int,
        masked: bool = False,
    ):
        self.tmp_dir, self.split = tmp_dir, split
        self.shard_tokens, self.dtype, self.eos_id = shard_tokens, np.dtype(dtype), eos_id
        self.masked = masked
        self.shards: list[ShardInfo] = []
        self._file: BinaryIO | None = None
        self._mask_file: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._mask_hash = hashlib.sha256()
        self._tokens = 0
        self._documents = 0

    def write(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append tokens (already in the shard dtype), and their loss mask if `masked`."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        if self.masked != (mask is not None) or (mask is not None and mask.size != tokens.size):
            raise ValueError(f"mask: a masked writer needs one mask value per token ({self.split})")
        while tokens.size:
            if self._file is None:
                self._open()
            room = tokens.size if self.shard_tokens is None else self.shard_tokens - self._tokens
            take = min(room, tokens.size)
            piece, tokens = tokens[:take], tokens[take:]
            data = piece.tobytes()
            assert self._file is not None
            self._file.write(data)
            self._hash.update(data)
            self._tokens += take
            if mask is None:
                # A document belongs to the shard holding its EOS; prepare makes sure
                # EOS only ever comes from the appended separator, never from the text.
                self._documents += int(np.count_nonzero(piece == self.eos_id))
            else:
                # A record belongs to the shard holding its start (a chat template may
                # write EOS tokens inside a record).
                assert self._mask_file is not None
                bits, mask = np.ascontiguousarray(mask[:take], np.uint8), mask[take:]
                self._mask_file.write(bits.tobytes())
                self._mask_hash.update(bits.tobytes())
                self._documents += int(np.count_nonzero(bits & MASK_START))
            if self._tokens == self.shard_tokens:
                self._close()

    def finish(self) -> list[ShardInfo]:
        """Close the last shard and return the shard list of the split."""
        if self._file is not None:
            self._close()
        return self.shards

    def _open(self) -> None:
        name = shard_name(self.split, len(self.shards))
        # Stays open across write() calls; closed by _close() / finish().
        self._file = open(self.tmp_dir / name, "wb")  # noqa: SIM115
        if self.masked:
            mask_name = ShardInfo(name, 0, 0, "").mask_file
            self._mask_file = open(self.tmp_dir / mask_name, "wb")  # noqa: SIM115
            self._mask_hash = hashlib.sha256()
        self._hash = hashlib.sha256()
        self._tokens = self._documents = 0

    def _close(self) -> None:
        assert self._file is not None
        self._file.close()
        name = Path(self._file.name).name
        mask_sha256 = None
        if self._mask_file is not None:
            self._mask_file.close()
            mask_sha256, self._mask_file = self._mask_hash.hexdigest(), None
        self.shards.append(
            ShardInfo(name, self._tokens, self._documents, self._hash.hexdigest(), mask_sha256)
        )
        self._file = None


def make_tmp_dir(out_dir: Path) -> Path:
    """A fresh temp dir inside OUT (same file system, so moving out of it is a rename).

    Temp dirs of earlier prepares that were killed are removed first.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir / f"{TMP_PREFIX}{os.getpid()}"
    tmp.mkdir()
    return tmp


def commit(tmp_dir: Path, out_dir: Path, manifest: dict[str, Any]) -> None:
    """Move shards (and a trained `tokenizer/`) from `tmp_dir` into OUT, then write the manifest.

    The old manifest is removed before anything is moved, so a crash midway
    leaves no manifest rather than one describing a mix of old and new shards.
    """
    old_manifest = out_dir / MANIFEST_NAME
    old_files: set[str] = set()
    if old_manifest.exists():
        import json

        try:
            old = json.loads(old_manifest.read_text(encoding="utf-8"))
            shards = [ShardInfo(**s) for split in old["splits"].values() for s in split["shards"]]
            old_files = {s.file for s in shards} | {s.mask_file for s in shards}
        except (ValueError, KeyError, TypeError):
            old_files = set()
        old_manifest.unlink()
    new_files = {s["file"] for split in manifest["splits"].values() for s in split["shards"]}
    new_files |= {
        ShardInfo(**s).mask_file
        for split in manifest["splits"].values()
        for s in split["shards"]
        if "mask_sha256" in s
    }
    for name in sorted(new_files):
        publish(tmp_dir / name, out_dir / name)
    if (tmp_dir / "tokenizer").is_dir():
        shutil.rmtree(out_dir / "tokenizer", ignore_errors=True)
        publish(tmp_dir / "tokenizer", out_dir / "tokenizer")
    for name in sorted(old_files - new_files):
        (out_dir / name).unlink(missing_ok=True)
    write_json_atomic(old_manifest, manifest)
    shutil.rmtree(tmp_dir, ignore_errors=True)


def write_dataset(
    out_dir: str | Path,
    splits: dict[str, np.ndarray],
    *,
    tokenizer_dir: str | Path,
    vocab_size: int,
    eos_id: int,
    shard_tokens: int = PrepareOptions.shard_tokens,
    seed: int = 0,
) -> Path:
    """Write already-tokenized splits as a prepared dataset (shards + manifest).

    For tests and for corpora tokenized elsewhere; `prepare` is the usual way in.
    """
    out = Path(out_dir)
    tmp = make_tmp_dir(out)
    dtype = dtype_for_vocab(vocab_size)
    shard_lists = {}
    for split, tokens in splits.items():
        writer = ShardWriter(tmp, split, shard_tokens=shard_tokens, dtype=dtype, eos_id=eos_id)
        writer.write(np.asarray(tokens))
        shard_lists[split] = writer.finish()
    tok_dir = Path(tokenizer_dir)
    tokenizer = {
        "path": tokenizer_path_for_manifest(tok_dir, out),
        "name": tok_dir.name,
        "sha256": sha256_dir(tok_dir),
    }
    manifest = build_manifest_dict(
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        eos_id=eos_id,
        splits=shard_lists,
        sources=[],
        seed=seed,
        args={},
    )
    commit(tmp, out, manifest)
    return out
