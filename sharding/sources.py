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

Records become documents by their `RecordFormat`: plain text, or
prompt→completion / chat, whose documents are segments that do or do not
count in the loss (prompts and user turns do not).
"""

from __future__ import annotations

import glob
import gzip
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sharding.errors import DataError

FORMATS = {
    ".jsonl": "json",
    ".ndjson": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}
COMPRESSIONS = (".gz", ".zst")
TXT_PIECE_BYTES = 8 << 20
HF_BATCH_DOCS = 1000
_GLOB_CHARS = set("*?[")

# (texts, ends, counted): ends[i] is False for a piece of a document that continues
# (a .txt piece, a prompt before its completion); counted[i]: its tokens are loss targets.
Batch = tuple[list[str], list[bool], list[bool]]
KINDS = ("text", "prompt-completion", "chat")


@dataclass(frozen=True)
class RecordFormat:
    """How a record becomes a document: its text, or loss-masked prompt/completion segments.

    `chat_template` renders a conversation (the tokenizer's Jinja template); None
    uses the built-in `<|role|>` layout.
    """

    kind: str = "text"
    text_key: str = "text"
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    messages_key: str = "messages"
    chat_template: Callable[..., str] | None = None  # (messages, add_generation_prompt)

    @property
    def masked(self) -> bool:
        """Whether documents carry a loss mask (only completions / assistant turns count)."""
        return self.kind != "text"

    @property
    def keys(self) -> tuple[str, ...]:
        """The record fields this format reads."""
        if self.kind == "prompt-completion":
            return (self.prompt_key, self.completion_key)
        return (self.messages_key,) if self.kind == "chat" else (self.text_key,)


def input_format(path: str | Path) -> str | None:
    """`json`, `csv`, `parquet` or `text` from a file name (after a compression suffix).
    Any other gzip/zstd file (`changelog.Debian.gz`, `notes.gz`) is text, but an archive
    (`.tar.gz`) is not."""
    name = Path(path).name.lower()
    for comp in COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
            if name.endswith(".parquet"):
                return None  # parquet compresses internally
            if name.endswith(".tar"):
                return None
            return FORMATS.get(Path(name).suffix, "text")
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
                p
                for p in Path(item).rglob("*")
                if p.is_file() and input_format(p) and not _hidden(p.relative_to(item))
            )
        elif os.path.isfile(item):
            if not input_format(item):
                raise DataError(
                    f"{item}: unsupported input type — use .txt, .jsonl, .json, .csv or "
                    ".parquet (optionally .gz/.zst), or any gzip/zstd text file"
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


def iter_batches(path: Path, *, fmt: RecordFormat, errors: str) -> Iterator[Batch]:
    """Stream the documents of one input file as batches of (segment) texts."""
    kind = input_format(path)
    if kind == "text":
        if fmt.masked:
            raise DataError(
                f"{path}: --format {fmt.kind} reads records; use .jsonl/.json/.csv/.parquet"
            )
        yield from _iter_text(path, errors)
    elif kind is not None:
        yield from _iter_hf(path, kind, fmt, errors)
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
                yield [text], [not data], [True]


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


def _iter_hf(path: Path, kind: str, fmt: RecordFormat, errors: str) -> Iterator[Batch]:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # we raise our own one-liners
    kwargs: dict[str, str] = {}
    if errors == "replace" and kind == "json":
        # datasets re-decodes JSON only when `encoding` differs from the literal
        # "utf-8"; "utf_8" is the same codec under another name.
        kwargs = {"encoding": "utf_8", "encoding_errors": "replace"}
    elif errors == "replace" and kind == "csv":
        kwargs = {"encoding_errors": "replace"}
    row = 0
    try:
        ds = datasets.load_dataset(
            kind, data_files=[str(path)], split="train", streaming=True, **kwargs
        )
        for batch in ds.iter(batch_size=HF_BATCH_DOCS):
            for key in fmt.keys:
                if key not in batch:
                    option = {"text": "--text-key", "chat": "--messages-key"}.get(fmt.kind)
                    if key == fmt.prompt_key and fmt.kind == "prompt-completion":
                        option = "--prompt-key"
                    option = option or "--completion-key"
                    keys = ", ".join(sorted(batch)) or "none"
                    raise DataError(f"{path}: no key {key!r} (has: {keys}) — pass {option} KEY")
            columns = [batch[key] for key in fmt.keys]
            texts: list[str] = []
            ends: list[bool] = []
            counted: list[bool] = []
            for i, values in enumerate(zip(*columns, strict=True)):
                segments = _segments(fmt, values, f"{path}: record {row + i}")
                for j, (text, count) in enumerate(segments):
                    texts.append(text)
                    ends.append(j == len(segments) - 1)
                    counted.append(count)
            row += len(columns[0])
            if texts:
                yield texts, ends, counted
    except DataError:
        raise
    except Exception as e:  # datasets/pyarrow/pandas raise many types for bad files
        raise _read_error(path, kind, errors, e) from e


def _segments(fmt: RecordFormat, values: tuple[Any, ...], where: str) -> list[tuple[str, bool]]:
    """(text, counts in the loss) pieces of one record; [] for an empty plain-text record."""
    for key, value in zip(fmt.keys, values, strict=True):
        if fmt.kind != "chat" and not isinstance(value, str):
            raise DataError(
                f"{where} has {type(value).__name__} under {key!r}, not text — fix or drop it"
            )
    if fmt.kind == "text":
        return [(values[0], True)] if values[0] else []
    if fmt.kind == "prompt-completion":
        prompt, completion = values
        if not completion.strip():
            raise DataError(
                f"{where}: empty {fmt.completion_key!r} — nothing to learn; fill or drop it"
            )
        return [(prompt, False), (completion, True)]
    return chat_segments(values[0], where, fmt.chat_template)


def chat_segments(
    messages: Any, where: str, template: Callable[..., str] | None = None
) -> list[tuple[str, bool]]:
    """A conversation as (text, counts) segments: only assistant turns count in the loss.

    With a `template` (the tokenizer's chat template: `template(messages,
    add_generation_prompt)`), an assistant turn is what rendering it adds after
    the template's own assistant header (the generation prompt, which does not
    count); other turns are what rendering them adds.
    """
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise DataError(f"{where}: messages must be a list of {{role, content}} with text values")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(f"{where}: no non-empty assistant message — nothing to learn; drop it")
    if template is None:
        return [
            piece
            for m in messages
            for piece in (
                (f"<|{m['role']}|>\n", False),
                (m["content"] + "\n", m["role"] == "assistant"),
            )
        ]
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    segments: list[tuple[str, bool]] = []
    rendered = ""
    for i, m in enumerate(turns):
        header = _render(template, turns[:i], True, where) if m["role"] == "assistant" else ""
        full = _render(template, turns[: i + 1], False, where)
        if not (header or rendered).startswith(rendered) or not full.startswith(header or rendered):
            raise DataError(
                f"{where}: the tokenizer's chat template renders earlier turns differently as "
                "the conversation grows — pass --chat-template builtin"
            )
        if header:
            segments += [(header[len(rendered) :], False), (full[len(header) :], True)]
        else:
            segments.append((full[len(rendered) :], False))
        rendered = full
    return [(text, count) for text, count in segments if text]


def _render(template: Callable[..., str], turns: list[dict], prompt: bool, where: str) -> str:
    try:
        return template(turns, prompt)
    except Exception as e:  # Jinja raises TemplateError subclasses, templates raise their own
        raise DataError(f"{where}: the chat template failed ({e})") from None


def _read_error(path: Path, fmt: str, errors: str, e: Exception) -> DataError:
    if fmt in ("json", "csv") and errors == "strict":
        offset = find_invalid_utf8(path)
        if offset is not None:
            return _utf8_error(path, offset)
    lines = str(e).strip().splitlines()
    detail = lines[0][:200] if lines else type(e).__name__
    return DataError(f"{path}: cannot read as {fmt} ({detail}) — check the file format")
