"""`manifest.json`: the index of a prepared dataset, and the helpers that hash and write it.

A prepared dataset directory holds flat token shards (`train_00000.bin`, ...),
readable with `numpy.memmap`, and a `manifest.json` written last, so a
manifest only ever points at complete shards.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sharding.atomic import atomic_write
from sharding.errors import DataError

FORMAT_VERSION = 1
# Loss-mask bits, one uint8 per token (`.mask` files of prompt→completion / chat data):
MASK_TARGET = 1  # the token is a loss target (completion / assistant turn, and its EOS)
MASK_START = 2  # the first token of a record
MANIFEST_NAME = "manifest.json"
_HASH_CHUNK_BYTES = 1 << 22


@dataclass(frozen=True)
class ShardInfo:
    """One shard file of a split: its name (relative to the dataset dir), size and checksum."""

    file: str
    tokens: int
    documents: int  # documents whose EOS lies in this shard
    sha256: str
    mask_sha256: str | None = None  # loss-masked data: sha256 of the parallel uint8 mask file

    @property
    def mask_file(self) -> str:
        """Name of the shard's loss-mask file (one uint8 per token: 1 = loss target)."""
        return str(Path(self.file).with_suffix(".mask"))

    def files(self, itemsize: int) -> list[tuple[str, int, str]]:
        """(file name, bytes, sha256) of the token file and, for loss-masked data, the mask."""
        files = [(self.file, self.tokens * itemsize, self.sha256)]
        if self.mask_sha256 is not None:
            files.append((self.mask_file, self.tokens, self.mask_sha256))
        return files

    def entry(self) -> dict[str, Any]:
        """The manifest entry (no mask keys for plain text)."""
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class Manifest:
    """A parsed `manifest.json`; `dir` and `tokenizer_dir` are absolute paths."""

    dir: Path
    vocab_size: int
    eos_id: int
    dtype: str
    tokenizer_dir: Path
    tokenizer_name: str
    tokenizer_sha256: str
    splits: dict[str, list[ShardInfo]]
    seed: int = 0
    format_version: int = FORMAT_VERSION
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def loss_mask(self) -> bool:
        """Whether shards carry loss masks (prompt→completion or chat data)."""
        return bool(self.raw.get("loss_mask"))

    @property
    def itemsize(self) -> int:
        """Bytes per token in the shards."""
        return 2 if self.dtype == "uint16" else 4

    def shards(self, split: str) -> list[ShardInfo]:
        """The shards of `split`; DataError when the dataset has no such split."""
        if split not in self.splits:
            known = ", ".join(sorted(self.splits))
            raise DataError(f"{self.dir}: no split {split!r} in manifest.json (has: {known})")
        return self.splits[split]

    def split_tokens(self, split: str) -> int:
        """Total tokens of `split` over all its shards."""
        return sum(s.tokens for s in self.shards(split))

    def shard_path(self, shard: ShardInfo) -> Path:
        """Absolute path of a shard file."""
        return self.dir / shard.file

    def mask_path(self, shard: ShardInfo) -> Path:
        """Absolute path of a shard's loss-mask file."""
        return self.dir / shard.mask_file

    def require_tokenizer(self) -> Path:
        """The tokenizer dir the shards were made with; DataError when it is gone (a run
        copies it and `generate`/`export` load it), without hashing it (`verify` does)."""
        if not self.tokenizer_dir.is_dir():
            raise DataError(
                f"{self.dir}: its tokenizer {self.tokenizer_dir} is missing (moved or deleted "
                "since prepare) — put it back or re-run gptrain prepare"
            )
        return self.tokenizer_dir


def read_split(dir: str | Path, split: str = "train") -> np.ndarray:
    """The whole token stream of one split as an in-memory array (for tests and tools)."""
    m = load_manifest(dir)
    arrays = [np.fromfile(m.shard_path(s), dtype=m.dtype) for s in m.shards(split)]
    return np.concatenate(arrays) if arrays else np.empty(0, dtype=m.dtype)


def dtype_for_vocab(vocab_size: int) -> str:
    """Smallest unsigned dtype name that holds every token id of a vocabulary."""
    return "uint16" if vocab_size < 1 << 16 else "uint32"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of one file, read in chunks (shards can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def file_problem(path: Path, size: int, sha256: str) -> str | None:
    """What is wrong with a shard file against its recorded size and sha256; None if nothing."""
    if not path.is_file():
        return "missing"
    if (actual := path.stat().st_size) != size:
        return f"{actual} bytes, manifest says {size}"
    if sha256_file(path) != sha256:
        return "sha256 differs from the manifest (corrupt)"
    return None


def sha256_dir(path: str | Path) -> str:
    """Hex sha256 over every regular file of a directory (relative names and contents).

    Names are part of the hash so that renaming `vocab.json` is a change too;
    the order is sorted so the hash does not depend on the file system.
    """
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        rel = p.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0")
        h.update(sha256_file(p).encode() + b"\0")
    return h.hexdigest()


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (sharding.atomic): readers see the old or the new file only."""
    atomic_write(Path(path), json.dumps(obj, indent=2, sort_keys=False) + "\n")


def load_manifest(dir: str | Path) -> Manifest:
    """Read `DIR/manifest.json`; DataError with a one-line fix when it is missing or invalid."""
    root = Path(dir).resolve()
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{dir}: no manifest.json — run gptrain prepare first")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e}) — re-run gptrain prepare") from e
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {version!r}, this gptrain reads {FORMAT_VERSION}"
            " — re-run gptrain prepare"
        )
    try:
        tok = raw["tokenizer"]
        tok_path = Path(tok["path"])
        splits = {
            name: [ShardInfo(**s) for s in split["shards"]] for name, split in raw["splits"].items()
        }
        return Manifest(
            dir=root,
            vocab_size=int(raw["vocab_size"]),
            eos_id=int(raw["eos_id"]),
            dtype=str(raw["dtype"]),
            tokenizer_dir=tok_path if tok_path.is_absolute() else (root / tok_path).resolve(),
            tokenizer_name=str(tok["name"]),
            tokenizer_sha256=str(tok["sha256"]),
            splits=splits,
            seed=int(raw.get("seed", 0)),
            format_version=version,
            raw=raw,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: missing or invalid field {e} — re-run gptrain prepare") from e


def tokenizer_path_for_manifest(tokenizer_dir: Path, out_dir: Path) -> str:
    """Path recorded for the tokenizer: relative when it lives inside OUT, else absolute."""
    tok_dir, out = tokenizer_dir.resolve(), out_dir.resolve()
    try:
        return tok_dir.relative_to(out).as_posix()
    except ValueError:
        return str(tok_dir)


def build_manifest_dict(
    *,
    tokenizer: dict[str, Any],
    vocab_size: int,
    eos_id: int,
    splits: dict[str, list[ShardInfo]],
    sources: list[dict[str, Any]],
    seed: int,
    args: dict[str, Any],
    loss_mask: bool = False,
) -> dict[str, Any]:
    """The JSON content of a manifest; `tokenizer` is {path, name, sha256}.

    Holds no timestamps, so preparing the same input twice gives the same bytes.
    """
    split_entries = {
        name: {
            "tokens": sum(s.tokens for s in shards),
            "documents": sum(s.documents for s in shards),
            "shards": [s.entry() for s in shards],
        }
        for name, shards in splits.items()
    }
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer,
        "dtype": dtype_for_vocab(vocab_size),
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        **({"loss_mask": True} if loss_mask else {}),
        "splits": split_entries,
        "totals": {
            "documents": sum(e["documents"] for e in split_entries.values()),
            "tokens": sum(e["tokens"] for e in split_entries.values()),
            "shards": sum(len(e["shards"]) for e in split_entries.values()),
        },
        "sources": sources,
        "seed": seed,
        "args": args,
    }
