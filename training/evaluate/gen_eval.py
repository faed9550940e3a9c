"""Generation quality: complete held-out prompts and score them against the references.

    gptrain evaluate runs/sft --data data/qa --generate            # the val split's records
    gptrain evaluate runs/sft --prompts qa_test.jsonl --generate   # {prompt, completion} lines

Prompts and references come from a loss-masked prepared split (the tokens of
each record whose mask is 0 are its prompt, 1 its reference) or from a JSONL
file. Decoding is greedy and stops at EOS, so scores are reproducible. Metrics:
exact match (after trimming whitespace), corpus BLEU (sacrebleu, 13a
tokenisation) and mean ROUGE-L F1 (rouge-score); all from installed packages,
nothing downloaded at run time. Every (prompt, reference, generated) triple is
written to a JSONL samples file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from training.errors import TrainingError


def pairs_from_split(data_dir: str | Path, split: str, tokenizer: Any) -> Iterator[tuple[str, str]]:
    """(prompt, reference) of each record of a loss-masked prepared split, in file order.

    The prompt is the record up to its first target run (for a chat, the turns
    before the first assistant answer), the reference is that run without EOS.
    """
    import numpy as np

    from sharding.manifest import MASK_TARGET, load_manifest

    m = load_manifest(data_dir)
    if not m.loss_mask:
        raise TrainingError(
            f"--data {data_dir}: plain text has no prompts; prepare it with --format "
            "prompt-completion or chat, or pass --prompts FILE.jsonl"
        )
    for ids, mask in _records(m, split):
        target = (mask & MASK_TARGET) != 0
        first = int(np.argmax(target))
        end = first + int(np.argmin(target[first:])) if not target[first:].all() else ids.size
        answer = ids[first:end]
        if answer.size and answer[-1] == m.eos_id:
            answer = answer[:-1]
        yield tokenizer.decode(ids[:first].tolist()), tokenizer.decode(answer.tolist())


def _records(m: Any, split: str) -> Iterator[tuple[Any, Any]]:
    """(tokens, mask) of each record of a split, in order, reading the memory-mapped
    shards only as far as the caller iterates; a record may span shards."""
    import numpy as np

    from sharding.manifest import MASK_START

    open_record: list[tuple[Any, Any]] = []  # pieces of the record not yet known complete
    for shard in m.shards(split):
        tokens = np.memmap(m.shard_path(shard), dtype=m.dtype, mode="r")
        mask = np.memmap(m.mask_path(shard), dtype=np.uint8, mode="r")
        bounds = [0, *np.flatnonzero(mask & MASK_START).tolist(), tokens.size]
        for i, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
            if i > 0 and open_record:  # a record starts at `lo`: the open one is complete
                yield _joined(open_record)
                open_record = []
            if hi > lo:
                open_record.append((tokens[lo:hi], mask[lo:hi]))
    if open_record:
        yield _joined(open_record)


def _joined(pieces: list[tuple[Any, Any]]) -> tuple[Any, Any]:
    import numpy as np

    return np.concatenate([t for t, _ in pieces]), np.concatenate([k for _, k in pieces])


def pairs_from_file(
    path: str | Path, prompt_key: str = "prompt", completion_key: str = "completion"
) -> list[tuple[str, str]]:
    """(prompt, reference) of each line of a JSONL file."""
    pairs = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise TrainingError(f"--prompts {path}: cannot read ({e.strerror})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            pairs.append((str(record[prompt_key]), str(record[completion_key])))
        except (ValueError, KeyError, TypeError) as e:
            raise TrainingError(
                f"--prompts {path}:{number}: needs a JSON object with {prompt_key!r} and"
                f" {completion_key!r} ({type(e).__name__}: {e})"
            ) from None
    return pairs


def scores(references: list[str], generated: list[str]) -> dict[str, float]:
    """Exact match (fraction), corpus BLEU (0-100) and mean ROUGE-L F1 (0-1)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if not references:
        raise TrainingError("evaluate --generate: no prompts to complete")
    exact = sum(r.strip() == g.strip() for r, g in zip(references, generated, strict=True))
    bleu = sacrebleu.corpus_bleu(generated, [references]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [
        scorer.score(r, g)["rougeL"].fmeasure for r, g in zip(references, generated, strict=True)
    ]
    return {
        "exact_match": exact / len(references),
        "bleu": bleu,
        "rouge_l": sum(rouge) / len(rouge),
        "samples": len(references),
    }


def complete(
    model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int, batch_size: int = 8
) -> list[str]:
    """Greedy completions (text after the prompt, up to EOS) of each prompt."""
    import torch

    positions = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only: generation continues at the right edge
    out: list[str] = []
    for lo in range(0, len(prompts), batch_size):
        # No BOS: the shards hold records without one, so the model was trained without it.
        batch = tokenizer(
            prompts[lo : lo + batch_size],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        width = batch["input_ids"].shape[1]
        if width >= positions:
            raise TrainingError(
                f"evaluate --generate: a prompt of {width} tokens leaves no room in the model's"
                f" {positions} positions"
            )
        with torch.no_grad():
            ids = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=min(max_new_tokens, positions - width),
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        out += tokenizer.batch_decode(ids[:, width:], skip_special_tokens=True)
    return out


def generation_eval(
    model: Any,
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    *,
    samples_path: str | Path,
    max_new_tokens: int = 64,
) -> dict[str, float]:
    """Complete every prompt, score against the references, write the samples file."""
    prompts = [p for p, _ in pairs]
    references = [r for _, r in pairs]
    generated = complete(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    path = Path(samples_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for prompt, reference, text in zip(prompts, references, generated, strict=True):
            row = {"prompt": prompt, "reference": reference, "generated": text}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {**scores(references, generated), "samples_file": str(path)}
