"""Find input files and stream their documents without loading a file whole.

Formats (each optionally `.gz` / `.zst` compressed, except parquet):
- `.jsonl` / `.ndjson` / `.json`, `.csv`, `.parquet`: read with HF `datasets`
  (`streaming=True`), one document per record, text under `text_key`. A `.json`
  holding one JSON array cannot be streamed and is read whole: use JSON lines
  for big corpora.
- `.txt`: one document per file. Files are read in pieces of at most
  `TXT_PIECE_BYTES`, cut at a line break, so a multi-GB text file never sits in
  RAM; the pieces are tokenized separately and EOS follows only the last one.
Empty texts are skipped; a missing or non-string text is a DataError.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from sharding.errors import DataError

FORMATS = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".csv": "csv",
           ".parquet": "parquet", ".txt": "text"}
COMPRESSIONS = (".gz", ".zst")
TXT_PIECE_BYTES = 8 << 20
HF_BATCH_DOCS = 1000
_GLOB_CHARS = set("*?[")

# (texts, ends): ends[i] is False for a piece of a .txt document that continues.
Batch = tuple[list[str], list[bool]]


def input_format(path: str | Path) -> str | None:
    """`json`, `csv`, `parquet` or `text` from a file name (after a compression suffix)."""
    name = Path(path).name.lower()
    for comp in COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
            if name.endswith(".parquet"):
                return None  # parquet compresses internally
    return FORMATS.get(Path(name).suffix)


def resolve_inputs(inputs: list[str], exclude: Path | None = None) -> list[Path]:
    """Expand files, directories (recursively, sorted) and globs into a de-duplicated file list.

    Files under `exclude` (the output dir: its manifest and tokenizer JSON) are left out.
    """
    if not inputs:
        raise DataError("prepare: no INPUT given — pass files, directories or globs")
    files: list[Path] = []
    for item in inputs:
        if _GLOB_CHARS & set(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            found = [m for m in matches if m.is_file() and input_format(m)]
        elif os.path.isdir(item):
            found = sorted(
                p for p in Path(item).rglob("*")
                if p.is_file() and input_format(p) and not _hidden(p.relative_to(item))
            )
        elif os.path.isfile(item):
            if not input_format(item):
                raise DataError(
                    f"{item}: unsupported input type — use .txt, .jsonl, .json, .csv or "
                    ".parquet (optionally .gz/.zst)"
                )
            found = [Path(item)]
        else:
            raise DataError(f"{item}: no such file or directory — check the INPUT path")
        if not found:
            raise DataError(f"{item}: matches no .txt/.jsonl/.json/.csv/.parquet files")
        files += found
    seen: set[Path] = set()
    if exclude is not None:
        root = exclude.resolve()
        files = [f for f in files if not f.resolve().is_relative_to(root)]
        if not files:
            raise DataError(f"{' '.join(inputs)}: only files inside --out {exclude} — check INPUT")
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(key)
    return unique


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def open_decompressed(path: Path) -> BinaryIO:
    """Binary stream of a file's content, decompressing `.gz` / `.zst` on the fly."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if name.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")  # noqa: SIM115 - owned and closed by the reader (closefd)
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def find_invalid_utf8(path: Path, chunk_bytes: int = 1 << 20) -> int | None:
    """Byte offset (in the decompressed content) of the first invalid UTF-8 sequence, or None."""
    offset, pending = 0, b""
    with open_decompressed(path) as f:
        while chunk := f.read(chunk_bytes):
            data = pending + chunk
            try:
                data.decode("utf-8")
                offset, pending = offset + len(data), b""
            except UnicodeDecodeError as e:
                if e.reason != "unexpected end of data" or e.end != len(data):
                    return offset + e.start
                # A character split across chunks: retry it with the next chunk.
                offset, pending = offset + e.start, data[e.start :]
    return offset if pending else None


def _utf8_error(path: Path, offset: int) -> DataError:
    where = " of the decompressed data" if path.name.lower().endswith(COMPRESSIONS) else ""
    return DataError(
        f"{path}: invalid UTF-8 at byte {offset}{where} — fix the file or pass --errors replace"
    )


def iter_batches(path: Path, *, text_key: str, errors: str) -> Iterator[Batch]:
    """Stream the documents of one input file as batches of texts."""
    fmt = input_format(path)
    if fmt == "text":
        yield from _iter_text(path, errors)
    elif fmt is not None:
        yield from _iter_hf(path, fmt, text_key, errors)
    else:
        raise DataError(f"{path}: unsupported input type")


def _iter_text(path: Path, errors: str) -> Iterator[Batch]:
    offset, has_text = 0, False
    with open_decompressed(path) as f:
        data = f.read(TXT_PIECE_BYTES)
        while data:
            more = f.read(TXT_PIECE_BYTES)  # look ahead: is `data` the document's last piece?
            cut = _cut_point(data) if more else len(data)
            piece, data = data[:cut], data[cut:] + more
            try:
                text = piece.decode("utf-8", errors)
            except UnicodeDecodeError as e:
                raise _utf8_error(path, offset + e.start) from None
            offset += len(piece)
            has_text = has_text or bool(text)
            if has_text and (text or not data):
                yield [text], [not data]


def _cut_point(data: bytes) -> int:
    """Cut after the last line break; without one, before the last (maybe partial) character."""
    nl = data.rfind(b"\n")
    if nl >= 0:
        return nl + 1
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: the last character starts here
            return len(data) - back if byte >= 0xC0 else len(data)
    return len(data)


def _iter_hf(path: Path, fmt: str, text_key: str, errors: str) -> Iterator[Batch]:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # we raise our own one-liners
    kwargs: dict[str, str] = {}
    if errors == "replace" and fmt == "json":
        # datasets re-decodes JSON only when `encoding` differs from the literal
        # "utf-8"; "utf_8" is the same codec under another name.
        kwargs = {"encoding": "utf_8", "encoding_errors": "replace"}
    elif errors == "replace" and fmt == "csv":
        kwargs = {"encoding_errors": "replace"}
    row = 0
    try:
        ds = datasets.load_dataset(
            fmt, data_files=[str(path)], split="train", streaming=True, **kwargs
        )
        for batch in ds.iter(batch_size=HF_BATCH_DOCS):
            if text_key not in batch:
                keys = ", ".join(sorted(batch)) or "none"
                raise DataError(
                    f"{path}: no key {text_key!r} (has: {keys}) — pass --text-key KEY"
                )
            texts = batch[text_key]
            for i, t in enumerate(texts):
                if not isinstance(t, str):
                    raise DataError(
                        f"{path}: record {row + i} has {type(t).__name__} under {text_key!r},"
                        " not text — fix or drop that record"
                    )
            row += len(texts)
            texts = [t for t in texts if t]
            if texts:
                yield texts, [True] * len(texts)
    except DataError:
        raise
    except Exception as e:  # datasets/pyarrow/pandas raise many types for bad files
        raise _read_error(path, fmt, errors, e) from e


def _read_error(path: Path, fmt: str, errors: str, e: Exception) -> DataError:
    if fmt in ("json", "csv") and errors == "strict":
        offset = find_invalid_utf8(path)
        if offset is not None:
            return _utf8_error(path, offset)
    lines = str(e).strip().splitlines()
    detail = lines[0][:200] if lines else type(e).__name__
    return DataError(f"{path}: cannot read as {fmt} ({detail}) — check the file format")
