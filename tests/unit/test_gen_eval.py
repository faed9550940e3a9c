"""Generation-quality eval: prompts/references from loss-masked shards or a file, and scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.errors import TrainingError
from training.evaluate.gen_eval import pairs_from_file, pairs_from_split, scores


def test_pairs_from_a_masked_split_are_the_records(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from sharding.manifest import load_manifest
    from sharding.prepare import prepare

    records = [{"prompt": f"Q{i}: add {i} and {i}?", "completion": f" {2 * i}"} for i in range(300)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prepare(
        [str(tmp_path / "qa.jsonl")],
        tmp_path / "data",
        train_tokenizer_vocab=300,
        val_fraction=0.1,
        workers=1,
        progress=False,
        format="prompt-completion",
        shard_tokens=97,
    )  # records straddle shards
    m = load_manifest(tmp_path / "data")
    tokenizer = AutoTokenizer.from_pretrained(m.tokenizer_dir)
    pairs = list(pairs_from_split(tmp_path / "data", "val", tokenizer))
    everything = [(r["prompt"], r["completion"]) for r in records]
    assert len(pairs) == m.raw["splits"]["val"]["documents"] > 10
    assert pairs == [p for p in everything if p in pairs]  # whole records, in file order


def test_plain_text_has_no_prompts(tmp_path: Path) -> None:
    from sharding.prepare import prepare

    (tmp_path / "t.jsonl").write_text(
        "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50))
    )
    prepare(
        [str(tmp_path / "t.jsonl")],
        tmp_path / "d",
        train_tokenizer_vocab=300,
        workers=1,
        progress=False,
    )
    with pytest.raises(TrainingError, match="--format prompt-completion"):
        next(pairs_from_split(tmp_path / "d", "val", None))


def test_scores_on_known_cases() -> None:
    refs = ["The capital of Zorbia is Velmar.", "It rains in Tosk today."]
    perfect = scores(refs, [" The capital of Zorbia is Velmar. ", "It rains in Tosk today."])
    assert perfect["exact_match"] == 1.0 and perfect["bleu"] == pytest.approx(100.0)
    assert perfect["rouge_l"] == pytest.approx(1.0)
    half = scores(refs, ["The capital of Zorbia is Velmar.", "Snow falls on Brin."])
    assert half["exact_match"] == 0.5 and 20 < half["bleu"] < 90 and 0.4 < half["rouge_l"] < 0.8
    wrong = scores(refs, ["::::", "::::"])
    assert wrong["exact_match"] == 0 and wrong["bleu"] < 1 and wrong["rouge_l"] == 0


def test_prompt_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c"}\n')
    with pytest.raises(TrainingError, match=r"p.jsonl:3: needs a JSON object"):
        pairs_from_file(path)
    with pytest.raises(TrainingError, match="cannot read"):
        pairs_from_file(tmp_path / "missing.jsonl")
    path.write_text('{"prompt": "a", "completion": "b"}\n')
    assert pairs_from_file(path) == [("a", "b")]


def test_cli_evaluate_needs_something_to_evaluate(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    for args, message in (
        ((), "evaluate needs --data DIR (or --generate --prompts FILE.jsonl)"),
        (("--prompts", "p.jsonl"), "--prompts FILE is for --generate"),
    ):
        out = run_cli("evaluate", str(tmp_path), *args)
        assert out.returncode == 2 and message in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
