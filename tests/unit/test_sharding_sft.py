"""Loss-masked data: prompt→completion and chat records, masks through shards and loader,
domain tokens added to the tokenizer, and the bad inputs of each."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sharding.config import DataConfig, SourceConfig
from sharding.errors import DataError
from sharding.loader import IGNORE_INDEX, build_loader, targets, to_batch
from sharding.manifest import MASK_START, MASK_TARGET, load_manifest, read_split
from sharding.prepare import prepare, verify
from sharding.sources import chat_segments

CITIES = ["Velmar", "Tosk", "Brin", "Orrow", "Pell", "Quade", "Ssiv", "Umber"]
LANDS = ["Zorbia", "Kettle", "Amaran", "Dusk", "Ferro", "Glim", "Holt", "Ivar"]


def qa_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        land = LANDS[i % len(LANDS)]
        prompt = f"Q: {' '.join(rng.choice(LANDS) for _ in range(rng.randint(0, 3)))} {land}?\nA:"
        out.append({"prompt": prompt, "completion": f" {CITIES[LANDS.index(land)]}."})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_mask(data: Path, split: str = "train") -> np.ndarray:
    m = load_manifest(data)
    return np.concatenate([np.fromfile(m.mask_path(s), dtype=np.uint8) for s in m.shards(split)])


@pytest.fixture(scope="module")
def qa(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    root = tmp_path_factory.mktemp("qa")
    records = qa_records(400)
    src = write_jsonl(root / "qa.jsonl", records)
    prepare(
        [str(src)],
        root / "data",
        train_tokenizer_vocab=300,
        val_fraction=0.0,
        workers=1,
        progress=False,
        format="prompt-completion",
        shard_tokens=1500,
    )
    return root / "data", records


def test_masks_cover_exactly_the_completions_and_their_eos(qa: tuple[Path, list]) -> None:
    from tokenizers import Tokenizer

    data, records = qa
    m = load_manifest(data)
    assert m.loss_mask and len(m.shards("train")) > 1 and verify(data)["shards"] > 1
    tokens, mask = read_split(data), read_mask(data)
    assert tokens.size == mask.size
    tok = Tokenizer.from_file(str(m.tokenizer_dir / "tokenizer.json"))
    ends = np.flatnonzero(tokens == m.eos_id)
    assert ends.size == len(records)
    start = 0
    for end, record in zip(ends.tolist(), records, strict=True):
        doc, doc_mask = tokens[start : end + 1], mask[start : end + 1]
        assert doc_mask[0] == MASK_START and not (doc_mask[1:] & MASK_START).any()
        target = (doc_mask & MASK_TARGET) != 0
        assert target[-1]  # the EOS after a completion is learned: the model stops
        assert tok.decode(doc[~target].tolist()) == record["prompt"]
        assert tok.decode(doc[:-1][target[:-1]].tolist()) == record["completion"]
        assert (np.diff(target.astype(int)) >= 0).all()  # prompt first, then completion
        start = end + 1


def test_loader_labels_are_targets_only_where_the_prompt_is_in_the_window(
    qa: tuple[Path, list],
) -> None:
    data, _ = qa
    tokens, mask = read_split(data), read_mask(data)
    seq_len = 24
    cfg = DataConfig(sources=[SourceConfig(str(data))], seq_len=seq_len, shuffle=False)
    loader = build_loader(cfg, split="train", rank=0, world_size=1, micro_batch_size=4, seed=0)
    seen_targets = 0
    for k, batch in zip(range(30), loader, strict=False):
        for row in range(4):
            i = k * 4 + row
            window = tokens[i * seq_len : i * seq_len + seq_len + 1].astype(np.int64)
            window_mask = mask[i * seq_len : i * seq_len + seq_len + 1]
            assert torch.equal(batch["input_ids"][row], torch.from_numpy(window[:-1]))
            labels = batch["labels"][row].numpy()
            for j in range(seq_len):  # label j is token j+1
                began = (window_mask[: j + 2] & MASK_START).any()
                target = window_mask[j + 1] & MASK_TARGET
                want = window[j + 1] if target and began else IGNORE_INDEX
                assert labels[j] == want, (i, j)
            seen_targets += int((labels != IGNORE_INDEX).sum())
    assert seen_targets > 100


def test_masked_loss_ignores_prompt_labels_and_counts_completion_labels() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from training.models.loss import token_loss_sum

    eos = 0
    tokens = np.array([[5, 6, 7, eos, 8, 9, 10, 11, 12, eos, 13]], dtype=np.uint16)
    masks = np.array([[0, 0, 1, 1, 2, 0, 0, 1, 1, 1, 2]], dtype=np.uint8)
    base = to_batch(tokens, masks)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    ).eval()
    with torch.no_grad():
        logits = model(input_ids=base["input_ids"]).logits

    def loss_with_token(position: int) -> float:
        changed = tokens.copy()
        changed[0, position] = 20  # the same inputs, another token as label at `position`
        labels = to_batch(changed, masks)["labels"]
        return float(token_loss_sum(logits, labels))

    reference = float(token_loss_sum(logits, base["labels"]))
    assert loss_with_token(5) == reference  # a prompt token (mask 0) of the 2nd record
    assert loss_with_token(2) == reference  # completion of a record whose prompt was cut off
    assert loss_with_token(8) != reference  # a completion token of the 2nd record
    assert base["labels"][0].tolist() == [-100] * 6 + [11, 12, 0, -100]


def test_targets_rule_on_hand_made_windows() -> None:
    masks = np.array(
        [
            [1, 1, 1, 2, 1, 1],  # a cut-off completion, then a record whose prompt is visible
            [2, 0, 1, 1, 2, 1],  # a record starting at the window start counts from the start
            [3, 3, 3, 3, 3, 3],  # plain text mixed in: every label counts
            [0, 0, 2, 0, 0, 0],  # only prompt tokens: nothing counts
        ],
        dtype=np.uint8,
    )
    assert targets(masks).tolist() == [
        [False, False, False, True, True],
        [False, True, True, False, True],
        [True] * 5,
        [False] * 5,
    ]


def test_resume_and_workers_give_the_same_masked_batches(qa: tuple[Path, list]) -> None:
    data, _ = qa

    def batches(workers: int, state: dict | None, count: int) -> list[torch.Tensor]:
        cfg = DataConfig(sources=[SourceConfig(str(data))], seq_len=16, num_workers=workers)
        loader = build_loader(
            cfg, split="train", rank=1, world_size=2, micro_batch_size=2, seed=3, state=state
        )
        return [b["labels"].clone() for _, b in zip(range(count), loader, strict=False)]

    straight = batches(0, None, 12)
    assert torch.equal(torch.stack(batches(2, None, 12)), torch.stack(straight))
    resumed = batches(0, {"consumed": 5 * 2 * 2}, 7)
    assert torch.equal(torch.stack(resumed), torch.stack(straight[5:]))


def test_mixture_with_plain_text_keeps_every_text_label(
    qa: tuple[Path, list], tmp_path: Path
) -> None:
    data, _ = qa
    m = load_manifest(data)
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "Velmar and Tosk and Brin " * 3}] * 200)
    plain = tmp_path / "plain"
    prepare(
        [str(text)],
        plain,
        tokenizer=str(m.tokenizer_dir),
        val_fraction=0.0,
        workers=1,
        progress=False,
    )
    cfg = DataConfig(sources=[SourceConfig(str(data)), SourceConfig(str(plain))], seq_len=16)
    loader = build_loader(cfg, split="train", rank=0, world_size=1, micro_batch_size=8, seed=0)
    plain_rows = masked_rows = 0
    for _, batch in zip(range(20), loader, strict=False):
        for inputs, labels in zip(batch["input_ids"], batch["labels"], strict=True):
            if (labels == IGNORE_INDEX).any():
                masked_rows += 1
            elif m.eos_id not in inputs.tolist():
                plain_rows += 1  # a text window: every label a target, none dropped
    assert plain_rows > 20 and masked_rows > 20


def test_chat_builtin_counts_only_assistant_turns(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    chats = [
        {
            "messages": [
                {"role": "user", "content": f"Where is {land}?"},
                {"role": "assistant", "content": f"In {city}."},
                {"role": "user", "content": "Sure?"},
                {"role": "assistant", "content": "Yes."},
            ]
        }
        for land, city in zip(LANDS * 10, CITIES * 10, strict=True)
    ]
    src = write_jsonl(tmp_path / "chat.jsonl", chats)
    prepare(
        [str(src)],
        tmp_path / "data",
        train_tokenizer_vocab=300,
        val_fraction=0.0,
        workers=1,
        progress=False,
        format="chat",
    )
    m = load_manifest(tmp_path / "data")
    tokens, mask = read_split(tmp_path / "data"), read_mask(tmp_path / "data")
    tok = Tokenizer.from_file(str(m.tokenizer_dir / "tokenizer.json"))
    first = tokens[: np.flatnonzero(tokens == m.eos_id)[0] + 1]
    counted = first[(mask[: first.size] & MASK_TARGET) != 0]
    assert tok.decode(counted.tolist()) == "In Velmar.\nYes.\n"
    assert m.raw["args"]["chat_template"] == "auto"


def test_chat_segments_with_a_template() -> None:
    def template(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        text = "".join(f"<s>[{m['role']}] {m['content'].strip()}</s>" for m in messages)
        return text + ("<s>[assistant] " if add_generation_prompt else "")

    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": " a\n"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "b"},
    ]
    segments = chat_segments(messages, "r0", template)
    assert segments == [
        ("<s>[user] hi</s>", False),
        ("<s>[assistant] ", False),
        ("a</s>", True),
        ("<s>[user] and?</s>", False),
        ("<s>[assistant] ", False),
        ("b</s>", True),
    ]  # the template trims content: the answer is found anyway

    def unstable(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return f"{len(messages)}:" + template(messages, add_generation_prompt)

    with pytest.raises(DataError, match="--chat-template builtin"):
        chat_segments(messages, "r0", unstable)

    def broken(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        raise ValueError("roles must alternate")

    with pytest.raises(DataError, match="r0: the chat template failed \\(roles must alternate"):
        chat_segments(messages, "r0", broken)


def test_added_tokens_encode_as_single_ids(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    terms = ["hyperkalemia", "<|note|>"]
    texts = [{"text": f"Patient had hyperkalemia. <|note|> check {w}"} for w in LANDS * 20]
    src = write_jsonl(tmp_path / "notes.jsonl", texts)
    (tmp_path / "terms.txt").write_text("\n".join(terms) + "\n")
    plain = prepare(
        [str(src)],
        tmp_path / "a",
        train_tokenizer_vocab=300,
        val_fraction=0.0,
        workers=1,
        progress=False,
    )
    out = prepare(
        [str(src)],
        tmp_path / "b",
        tokenizer=str(tmp_path / "a" / "tokenizer"),
        val_fraction=0.0,
        workers=1,
        progress=False,
        add_tokens=str(tmp_path / "terms.txt"),
    )
    m = load_manifest(tmp_path / "b")
    assert m.vocab_size == plain["vocab_size"] + 2 and m.raw["args"]["add_tokens"] == terms
    assert m.tokenizer_dir == (tmp_path / "b" / "tokenizer").resolve()
    tok = Tokenizer.from_file(str(m.tokenizer_dir / "tokenizer.json"))
    ids = [tok.token_to_id(t) for t in terms]
    assert all(i is not None and i >= plain["vocab_size"] for i in ids)
    tokens = read_split(tmp_path / "b")
    assert (tokens == ids[0]).sum() == len(texts) and (tokens == ids[1]).sum() == len(texts)
    before = Tokenizer.from_file(str(tmp_path / "a" / "tokenizer" / "tokenizer.json"))
    assert len(before.encode("<|note|>").ids) > 1 and out["documents"] == len(texts)


@pytest.mark.parametrize(
    ("records", "kwargs", "message"),
    [
        ([{"question": "q", "completion": "a"}], {}, "no key 'prompt'.*--prompt-key"),
        ([{"prompt": "q", "completion": "  "}], {}, "record 0: empty 'completion'"),
        ([{"prompt": "q", "answer": "a"}], {}, "no key 'completion'.*--completion-key"),
        ([{"prompt": "q", "completion": 3}], {}, "record 0 has int under 'completion'"),
        (
            [{"messages": [{"role": "user", "content": "q"}]}],
            {"format": "chat"},
            "record 0: no non-empty assistant message",
        ),
        ([{"messages": "hello"}], {"format": "chat"}, "list of \\{role, content\\}"),
    ],
)
def test_bad_records_are_one_line_errors(
    tmp_path: Path, records: list[dict], kwargs: dict, message: str
) -> None:
    src = write_jsonl(tmp_path / "bad.jsonl", records * 3)
    options = {"format": "prompt-completion", **kwargs}
    with pytest.raises(DataError, match=message) as err:
        prepare(
            [str(src)],
            tmp_path / "out",
            train_tokenizer_vocab=300,
            workers=1,
            progress=False,
            **options,
        )
    assert "\n" not in str(err.value) and str(src) in str(err.value)


def test_txt_input_needs_records_for_masked_formats(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("some text\n")
    with pytest.raises(DataError, match="reads records"):
        prepare(
            [str(tmp_path / "a.txt")],
            tmp_path / "out",
            train_tokenizer_vocab=300,
            workers=1,
            progress=False,
            format="prompt-completion",
        )


def test_corrupt_mask_is_detected(qa: tuple[Path, list], tmp_path: Path) -> None:
    data = tmp_path / "copy"
    shutil.copytree(qa[0], data)
    m = load_manifest(data)
    path = m.mask_path(m.shards("train")[0])
    raw = bytearray(path.read_bytes())
    raw[3] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="mask"):
        verify(data)
    cfg = DataConfig(sources=[SourceConfig(str(data))], seq_len=16, verify=True)
    with pytest.raises(DataError, match="corrupt mask"):
        build_loader(cfg, split="train", rank=0, world_size=1, micro_batch_size=2, seed=0)
    path.write_bytes(bytes(raw[:-1]))
    cfg = DataConfig(sources=[SourceConfig(str(data))], seq_len=16)
    with pytest.raises(DataError, match="truncated"):
        build_loader(cfg, split="train", rank=0, world_size=1, micro_batch_size=2, seed=0)


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_with_the_tokenizers_template_keeps_its_special_tokens(tmp_path: Path) -> None:
    from tokenizers import AddedToken, Tokenizer

    chats = [
        {
            "messages": [
                {"role": "user", "content": f"Where is {land}?"},
                {"role": "assistant", "content": f" In {city}. "},
            ]
        }
        for land, city in zip(LANDS * 10, CITIES * 10, strict=True)
    ]
    src = write_jsonl(tmp_path / "chat.jsonl", chats)
    prepare(
        [str(src)],
        tmp_path / "base",
        train_tokenizer_vocab=300,
        val_fraction=0.0,
        workers=1,
        progress=False,
        format="chat",
    )
    tok_dir = tmp_path / "chat-tokenizer"
    shutil.copytree(tmp_path / "base" / "tokenizer", tok_dir)
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tok.add_special_tokens(
        [AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)]
    )
    tok.save(str(tok_dir / "tokenizer.json"))
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    prepare(
        [str(src)],
        tmp_path / "data",
        tokenizer=str(tok_dir),
        val_fraction=0.0,
        workers=1,
        progress=False,
        format="chat",
    )
    m = load_manifest(tmp_path / "data")
    assert m.raw["splits"]["train"]["documents"] == len(chats)
    tokens, mask = read_split(tmp_path / "data"), read_mask(tmp_path / "data")
    start, end = (tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>"))
    assert (tokens == start).sum() == 2 * len(chats) and (tokens == end).sum() == 2 * len(chats)
    first = slice(0, int(np.flatnonzero(mask & MASK_START)[1]))
    counted = tokens[first][(mask[first] & MASK_TARGET) != 0]
    assert tok.decode(counted.tolist(), skip_special_tokens=False) == (
        "In Velmar.<|im_end|>\n<|endoftext|>"
    )
