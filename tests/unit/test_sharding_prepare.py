"""prepare/verify: every input format, a trained tokenizer, determinism, atomicity, errors."""

from __future__ import annotations

import gzip
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from sharding import sources
from sharding.config import DataConfig, SourceConfig
from sharding.demo_corpus import write_corpus
from sharding.errors import DataError
from sharding.loader import build_loader
from sharding.manifest import load_manifest, read_split
from sharding.prepare import prepare, verify

WORDS = [
    "the",
    "model",
    "reads",
    "a",
    "token",
    "stream",
    "and",
    "learns",
    "which",
    "word",
    "comes",
    "next",
    "after",
    "shard",
    "loader",
    "packs",
    "documents",
    "into",
    "windows",
]
VOCAB = 300


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "."


def doc(rng: random.Random) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(1, 6)))


def write_jsonl(path: Path, texts: list, key: str = "text") -> Path:
    lines = "".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts))
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(lines.encode()))
    elif path.suffix == ".zst":
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def run(inputs: list, out: Path, **kw) -> dict:
    kw.setdefault("train_tokenizer_vocab", None if "tokenizer" in kw else VOCAB)
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return prepare([str(i) for i in inputs], out, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory with every input format; 300 documents in all (one empty, skipped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    texts = [doc(rng) for _ in range(250)]
    texts[3] = "A literal <|endoftext|> inside a document is text, not a separator."
    write_jsonl(root / "a.jsonl", [*texts[:100], ""])
    write_jsonl(root / "b.jsonl.gz", texts[100:150])
    write_jsonl(root / "c.jsonl.zst", texts[150:200])
    with open(root / "d.csv", "w", encoding="utf-8") as f:
        f.write("id,text\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(texts[200:230])))
    pq.write_table(pa.table({"text": texts[230:250]}), root / "e.parquet")
    for i in range(50):
        (root / f"txt{i:02d}.txt").write_text(doc(rng) + "\n\n" + doc(rng) + "\n", "utf-8")
    return root


@pytest.fixture(scope="module")
def prepared(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared") / "data"
    summary = run([corpus], out, val_fraction=0.2, shard_tokens=2000)
    return out, summary


def test_manifest_describes_the_shards(prepared: tuple[Path, dict], corpus: Path) -> None:
    out, summary = prepared
    raw = json.loads((out / "manifest.json").read_text())
    m = load_manifest(out)
    assert raw["format_version"] == 1 and m.dtype == "uint16" and m.vocab_size == VOCAB
    assert raw["tokenizer"]["path"] == "tokenizer" and m.tokenizer_dir == out / "tokenizer"
    assert summary["documents"] == raw["totals"]["documents"] == 300
    assert 0 < raw["splits"]["val"]["documents"] < raw["splits"]["train"]["documents"]
    assert summary["tokens"] == sum(m.split_tokens(s) for s in ("train", "val"))
    assert [Path(s["path"]).name for s in raw["sources"]][:5] == [
        "a.jsonl",
        "b.jsonl.gz",
        "c.jsonl.zst",
        "d.csv",
        "e.parquet",
    ]
    for shard in m.shards("train")[:-1]:
        assert shard.tokens == 2000
        assert (out / shard.file).stat().st_size == 4000
    assert verify(out) == {
        "shards": summary["shards"],
        "tokens": summary["tokens"],
        "bytes": 2 * summary["tokens"],
    }
    assert not list(out.glob(".prepare-tmp-*"))


def test_one_eos_per_document_and_text_round_trips(prepared: tuple[Path, dict]) -> None:
    from tokenizers import Tokenizer

    out, summary = prepared
    m = load_manifest(out)
    stream = np.concatenate([read_split(out, "train"), read_split(out, "val")])
    assert int((stream == m.eos_id).sum()) == summary["documents"]  # literal EOS text ignored
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    docs = np.split(stream, np.flatnonzero(stream == m.eos_id) + 1)
    texts = {tok.decode(d[:-1].tolist(), skip_special_tokens=False) for d in docs if d.size}
    assert "A literal <|endoftext|> inside a document is text, not a separator." in texts


def test_same_input_and_seed_give_identical_bytes(
    prepared: tuple[Path, dict], corpus: Path, tmp_path: Path
) -> None:
    out, _ = prepared
    again = tmp_path / "again"
    run([corpus], again, val_fraction=0.2, shard_tokens=2000, workers=2)  # other worker count
    names = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in names:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    other_seed = tmp_path / "seed1"
    run([corpus], other_seed, val_fraction=0.2, shard_tokens=2000, seed=1)
    assert (other_seed / "train_00000.bin").read_bytes() != (out / "train_00000.bin").read_bytes()


def test_trained_tokenizer_loads_with_transformers(prepared: tuple[Path, dict]) -> None:
    from transformers import AutoTokenizer

    out, _ = prepared
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert tok.eos_token_id == load_manifest(out).eos_id < len(tok) == VOCAB
    text = "the loader packs documents"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_existing_tokenizer_dir_gives_the_same_tokens(
    prepared: tuple[Path, dict], corpus: Path, tmp_path: Path
) -> None:
    out, _ = prepared
    tok_copy = tmp_path / "tok"
    shutil.copytree(out / "tokenizer", tok_copy)
    other = tmp_path / "other"
    run([corpus], other, tokenizer=str(tok_copy), val_fraction=0.2, shard_tokens=2000)
    m = load_manifest(other)
    assert m.tokenizer_dir == tok_copy.resolve()  # outside OUT: absolute path
    assert m.tokenizer_sha256 == load_manifest(out).tokenizer_sha256
    assert np.array_equal(read_split(other), read_split(out))
    # Same tokenizer hash, so the two datasets can be mixed.
    data = DataConfig(sources=[SourceConfig(str(out)), SourceConfig(str(other))], seq_len=32)
    batch = next(
        iter(build_loader(data, split="train", rank=0, world_size=1, micro_batch_size=4, seed=0))
    )
    assert batch["input_ids"].shape == (4, 32) and int(batch["input_ids"].max()) < VOCAB


def test_big_txt_file_is_read_in_pieces_but_stays_one_document(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(1)
    text = "\n".join(sentence(rng) for _ in range(60)) + "\n" + "é" * 50 + "\n"
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(sources, "TXT_PIECE_BYTES", 64)
    fmt = sources.RecordFormat()
    pieces = list(sources.iter_batches(tmp_path / "big.txt", fmt=fmt, errors="strict"))
    assert len(pieces) > 10 and "".join(t for (t,), _, _ in pieces) == text
    assert [e for _, (e,), _ in pieces] == [False] * (len(pieces) - 1) + [True]
    summary = run([tmp_path / "big.txt"], tmp_path / "out", val_fraction=0.0)
    assert summary["documents"] == 1


def test_failed_prepare_keeps_the_previous_dataset(
    prepared: tuple[Path, dict], corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "keep"
    run([corpus / "a.jsonl"], out)
    before = (out / "manifest.json").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError):
        run([corpus / "b.jsonl.gz", bad], out)
    assert (out / "manifest.json").read_bytes() == before
    verify(out)
    assert not list(out.glob(".prepare-tmp-*"))


def test_verify_finds_a_corrupt_shard(prepared: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = prepared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = copy / "train_00001.bin"
    raw = bytearray(shard.read_bytes())
    raw[0] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train_00001\.bin: sha256 differs .* re-run"):
        verify(copy)
    shard.write_bytes(bytes(raw[:-2]))
    with pytest.raises(DataError, match=r"train_00001\.bin: \d+ bytes, manifest says"):
        verify(copy)


def test_missing_input(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file or directory"):
        run([tmp_path / "nope.jsonl"], tmp_path / "out")
    with pytest.raises(DataError, match="matches no"):
        run([str(tmp_path / "*.jsonl")], tmp_path / "out")
    (tmp_path / "x.docx").write_text("hi")
    with pytest.raises(DataError, match="unsupported input type"):
        run([tmp_path / "x.docx"], tmp_path / "out")


def test_empty_input(prepared: tuple[Path, dict], tmp_path: Path) -> None:
    empty = [write_jsonl(tmp_path / "empty.jsonl", ["", ""]), tmp_path / "void.txt"]
    empty[1].write_text("")
    with pytest.raises(DataError, match="no documents to train a tokenizer on"):
        run(empty, tmp_path / "out")
    with pytest.raises(DataError, match=r"void\.txt: no documents"):
        run(empty, tmp_path / "out", tokenizer=str(prepared[0] / "tokenizer"))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_text_key(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "body.jsonl", ["some text"], key="body")
    with pytest.raises(DataError, match=r"body\.jsonl: no key 'text' \(has: body, id\)"):
        run([path], tmp_path / "out")
    assert run([path], tmp_path / "out", text_key="body")["documents"] == 1


def test_non_text_value(tmp_path: Path) -> None:
    path = tmp_path / "num.jsonl"
    path.write_text('{"text": "ok"}\n{"text": null}\n')
    with pytest.raises(DataError, match=r"num\.jsonl: record 1 has NoneType"):
        run([path], tmp_path / "out")


def test_non_utf8_names_file_and_byte_offset(tmp_path: Path) -> None:
    good = b'{"text": "first document"}\n'
    (tmp_path / "bad.jsonl").write_bytes(good + b'{"text": "caf\xe9 au lait"}\n')
    offset = len(good) + len(b'{"text": "caf')
    with pytest.raises(DataError, match=rf"bad\.jsonl: invalid UTF-8 at byte {offset} .*--errors"):
        run([tmp_path / "bad.jsonl"], tmp_path / "out")
    (tmp_path / "bad.txt").write_bytes(b"ok line\nsecond \x80 line\n")
    with pytest.raises(DataError, match=r"bad\.txt: invalid UTF-8 at byte 15 "):
        run([tmp_path / "bad.txt"], tmp_path / "out")
    summary = run(
        [tmp_path / "bad.jsonl", tmp_path / "bad.txt"], tmp_path / "out", errors="replace"
    )
    assert summary["documents"] == 3


def test_invalid_utf8_offset_across_chunks(tmp_path: Path) -> None:
    path = tmp_path / "x.txt.gz"
    data = ("é" * 700).encode() + b"\xc3"  # a character cut off at the very end
    path.write_bytes(gzip.compress(data))
    assert sources.find_invalid_utf8(path, chunk_bytes=7) == 1400
    path.write_bytes(gzip.compress(("é" * 700).encode()))
    assert sources.find_invalid_utf8(path, chunk_bytes=7) is None


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="either --tokenizer"):
        prepare(["x"], tmp_path, progress=False)
    with pytest.raises(DataError, match="--val-fraction"):
        prepare(["x"], tmp_path, train_tokenizer_vocab=300, val_fraction=1.0)
    with pytest.raises(DataError, match="vocab must be > 257"):
        (tmp_path / "t.txt").write_text("hello")
        run([tmp_path / "t.txt"], tmp_path / "o", train_tokenizer_vocab=100)


def test_demo_corpus_is_deterministic_stdlib_docstrings(tmp_path: Path) -> None:
    a = write_corpus(tmp_path / "a.jsonl", max_bytes=60_000)
    write_corpus(tmp_path / "b.jsonl", max_bytes=60_000)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").open(encoding="utf-8")]
    assert a["documents"] == len(records) > 10 and 60_000 <= a["bytes"] < 80_000
    assert len({r["text"] for r in records}) == len(records)
    assert all(set(r) == {"text"} and len(r["text"]) >= 20 for r in records)


def test_output_inside_an_input_dir_is_not_read_back(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", ["one document", "another document"])
    (tmp_path / "b.json").write_text(json.dumps([{"text": "a JSON array file"}]))
    first = run([tmp_path], tmp_path / "out")
    again = run([tmp_path], tmp_path / "out")  # out/manifest.json, out/tokenizer/*.json exist
    assert first["documents"] == again["documents"] == 3


def test_tokenizer_dir_without_tokenizer_json_uses_auto_tokenizer(
    prepared: tuple[Path, dict], corpus: Path, tmp_path: Path
) -> None:
    out, _ = prepared
    model = json.loads((out / "tokenizer" / "tokenizer.json").read_text())["model"]
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (slow / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    eos = "<|endoftext|>"
    (slow / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "GPT2Tokenizer",
                "eos_token": eos,
                "bos_token": eos,
                "unk_token": eos,
            }
        )
    )
    run([corpus / "a.jsonl"], tmp_path / "fast", tokenizer=str(out / "tokenizer"))
    run([corpus / "a.jsonl"], tmp_path / "auto", tokenizer=str(slow))
    assert np.array_equal(read_split(tmp_path / "auto"), read_split(tmp_path / "fast"))


def test_loader_windows_match_the_prepared_stream(prepared: tuple[Path, dict]) -> None:
    from sharding.partition import epoch_permutation

    out, _ = prepared
    stream = read_split(out).astype(np.int64)
    seq, batch = 32, 5
    n = (stream.size - 1) // seq
    data = DataConfig(sources=[SourceConfig(str(out))], seq_len=seq)
    it = iter(
        build_loader(data, split="train", rank=0, world_size=1, micro_batch_size=batch, seed=3)
    )
    inputs = np.concatenate([next(it)["input_ids"].numpy() for _ in range(-(-n // batch))])[:n]
    starts = epoch_permutation(3, 0, n) * seq
    expected = stream[starts[:, None] + np.arange(seq)]  # many windows straddle shards
    assert np.array_equal(inputs, expected)


def test_cli_prepare_flags_and_defaults_come_from_prepare_options(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import inspect
    from dataclasses import fields

    from launcher.cli import build_parser
    from sharding.options import PrepareOptions, flag, from_arguments
    from sharding.slices import prepare_sliced, stage

    parser = build_parser()
    assert from_arguments(parser.parse_args(["prepare"])) == PrepareOptions()
    given = parser.parse_args(
        [
            "prepare",
            "x",
            "--train-tokenizer",
            "300",
            "--shard-tokens",
            "7",
            "--format",
            "chat",
            "--add-tokens",
            "a,b",
        ]
    )
    assert from_arguments(given) == PrepareOptions(
        train_tokenizer_vocab=300, shard_tokens=7, format="chat", add_tokens="a,b"
    )
    monkeypatch.setenv("COLUMNS", "500")  # one line per flag: its help is not wrapped
    with pytest.raises(SystemExit):
        parser.parse_args(["prepare", "--help"])
    shown = capsys.readouterr().out
    for f in fields(PrepareOptions):
        assert flag(f.name) in shown and f.metadata["help"] in shown
        if f.default is not None:
            assert f"(default: {f.default})" in shown
    # No entry point restates an option (or its default) in its own signature.
    names = {f.name for f in fields(PrepareOptions)}
    for fn in (prepare, prepare_sliced, stage):
        assert not names & set(inspect.signature(fn).parameters), fn.__name__
    with pytest.raises(TypeError, match="shard_tokns"):
        PrepareOptions.of(shard_tokns=5)


def test_prepare_options_are_checked_naming_their_flag(tmp_path: Path) -> None:
    from sharding.options import PrepareOptions

    good = PrepareOptions(train_tokenizer_vocab=300)
    for bad, message in [
        ({"tokenizer": "tok"}, "not both"),
        ({"shard_tokens": 0}, "--shard-tokens 0: must be >= 1"),
        ({"errors": "ignore"}, "--errors ignore: must be strict or replace"),
        ({"chat_template": "x"}, "--chat-template x: must be auto or builtin or tokenizer"),
        ({"format": "xml"}, "--format xml: must be one of text, prompt-completion, chat"),
    ]:
        with pytest.raises(DataError, match=message):
            prepare(["x"], tmp_path, PrepareOptions.of(good, **bad), progress=False)
