"""TokenLoader: exactly-once per epoch on any world size, O(1) resume, mixtures, errors.

The datasets here hold tokens 0, 1, 2, ... so a window names its own sample:
sample i starts with token i * seq_len.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sharding.config import DataConfig, SourceConfig
from sharding.errors import DataError
from sharding.loader import TokenLoader, build_loader
from sharding.shards import write_dataset

SEQ = 16
TOKENS = 3001  # 187 samples of 16 (+1) tokens, over 4 shards (boundaries inside windows)


def make(root: Path, name: str, tokens: np.ndarray, *, tok: str = "tok", shard: int = 1000):
    tok_dir = root / tok
    tok_dir.mkdir(exist_ok=True)
    (tok_dir / "tokenizer.json").write_text(f'{{"name": "{tok}"}}')
    val = np.arange(200, dtype=np.int64)
    write_dataset(
        root / name,
        {"train": tokens, "val": val},
        tokenizer_dir=tok_dir,
        vocab_size=65535,
        eos_id=65534,
        shard_tokens=shard,
    )
    return root / name


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make(tmp_path_factory.mktemp("loader"), "ds", np.arange(TOKENS))


def cfg(*paths: Path | tuple[Path, float], **kw) -> DataConfig:
    sources = [
        SourceConfig(str(p)) if isinstance(p, Path) else SourceConfig(str(p[0]), p[1])
        for p in paths
    ]
    return DataConfig(sources=sources, seq_len=kw.pop("seq_len", SEQ), **kw)


def loader(
    data_cfg: DataConfig,
    rank: int = 0,
    world: int = 1,
    batch: int = 3,
    seed: int = 0,
    split: str = "train",
    state: dict | None = None,
) -> TokenLoader:
    return build_loader(
        data_cfg,
        split=split,
        rank=rank,
        world_size=world,
        micro_batch_size=batch,
        seed=seed,
        state=state,
    )


def take(ld: TokenLoader, n: int) -> list[dict]:
    it = iter(ld)
    out = [next(it) for _ in range(n)]
    del it  # shuts DataLoader workers down
    return out


def sample_ids(batch: dict) -> list[int]:
    return (batch["input_ids"][:, 0] // SEQ).tolist()


def lockstep(
    data_cfg: DataConfig, world: int, batches: int, batch: int = 3, state: dict | None = None
) -> tuple[list[int], dict]:
    """Sample ids in global position order of `batches` lockstep micro-batches on every rank."""
    per_rank = []
    for r in range(world):
        ld = loader(data_cfg, r, world, batch, state=state)
        per_rank.append([sample_ids(b) for b in take(ld, batches)])
    ordered = [0] * (world * batch * batches)
    for r, rank_batches in enumerate(per_rank):
        for b, ids in enumerate(rank_batches):
            for j, s in enumerate(ids):
                ordered[b * world * batch + r + world * j] = s
    return ordered, ld.state_dict()


def test_windows_are_packed_slices_of_the_stream(data: Path) -> None:
    (b,) = take(loader(cfg(data, shuffle=False), batch=187), 1)
    expected = np.arange(187 * SEQ).reshape(187, SEQ)
    assert b["input_ids"].dtype == b["labels"].dtype == torch.int64
    assert np.array_equal(b["input_ids"].numpy(), expected)  # crosses 3 shard boundaries
    assert np.array_equal(b["labels"].numpy(), expected + 1)
    assert b["input_ids"].is_contiguous() and b["labels"].is_contiguous()


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_every_sample_exactly_once_per_epoch(data: Path, world: int, workers: int) -> None:
    n = 187
    steps = -(-2 * n // (world * 3))  # two epochs
    ordered, _ = lockstep(cfg(data, num_workers=workers), world, steps)
    assert sorted(ordered[:n]) == list(range(n))
    assert sorted(ordered[n : 2 * n]) == list(range(n))
    assert ordered[:n] != ordered[n : 2 * n]  # a new permutation each epoch
    assert ordered[:n] != list(range(n))


def test_workers_do_not_change_the_order(data: Path) -> None:
    assert lockstep(cfg(data, num_workers=2), 2, 9)[0] == lockstep(cfg(data), 2, 9)[0]


def test_same_seed_same_order_other_seed_other_order(data: Path) -> None:
    a = [sample_ids(b) for b in take(loader(cfg(data)), 20)]
    assert a == [sample_ids(b) for b in take(loader(cfg(data)), 20)]
    assert a != [sample_ids(b) for b in take(loader(cfg(data), seed=1), 20)]


def test_resume_at_a_random_point_equals_the_uninterrupted_order(data: Path) -> None:
    full = [sample_ids(b) for b in take(loader(cfg(data)), 150)]  # > 2 epochs
    rng = random.Random(0)
    for cut in [0, 1, 62, 63, *rng.sample(range(1, 150), 5)]:
        first = loader(cfg(data))
        head = [sample_ids(b) for b in take(first, cut)]
        state = first.state_dict()
        assert set(state) == {"epoch", "consumed", "seed"}
        assert state["consumed"] == 3 * cut and state["epoch"] == 3 * cut // 187
        tail = [sample_ids(b) for b in take(loader(cfg(data), state=state), 150 - cut)]
        assert head + tail == full


@pytest.mark.parametrize("before,after", [(4, 2), (2, 3)])
def test_resume_on_another_world_size_covers_the_rest_once(
    data: Path, before: int, after: int
) -> None:
    n, batch = 187, 3
    head, state = lockstep(cfg(data), before, 5, batch)
    assert state["consumed"] == before * batch * 5
    rest_steps = -(-(n - len(head)) // (after * batch))
    tail, _ = lockstep(cfg(data), after, rest_steps, batch, state=state)
    assert sorted(head + tail[: n - len(head)]) == list(range(n))


def test_changed_seed_in_state_wins(data: Path) -> None:
    ld = loader(cfg(data), seed=5, state={"epoch": 0, "consumed": 6, "seed": 7})
    assert ld.state_dict() == {"epoch": 0, "consumed": 6, "seed": 7}
    ref = loader(cfg(data), seed=7)
    assert [sample_ids(b) for b in take(ld, 4)] == [sample_ids(b) for b in take(ref, 6)][2:]


def test_val_split_is_in_order_and_wraps(data: Path) -> None:
    ld = loader(cfg(data), split="val", batch=4)
    assert ld.samples_per_epoch == 12  # 200 tokens
    ids = sum((sample_ids(b) for b in take(ld, 6)), [])
    assert ids == list(range(12)) * 2


def test_mixture_follows_weights_and_each_source_runs_its_own_epochs(tmp_path: Path) -> None:
    a = make(tmp_path, "a", np.arange(4001))  # 250 samples
    b = make(tmp_path, "b", 30000 + np.arange(1601))  # 100 samples
    ld = loader(cfg((a, 3.0), (b, 1.0)), batch=50)
    first = np.concatenate([x["input_ids"][:, 0].numpy() for x in take(ld, 40)])  # 2000
    from_a = first < 30000
    assert abs(from_a.mean() - 0.75) < 0.01
    ids_a, ids_b = first[from_a] // SEQ, (first[~from_a] - 30000) // SEQ
    assert sorted(ids_a[:250].tolist()) == list(range(250))
    assert sorted(ids_b[:100].tolist()) == list(range(100))
    assert sorted(ids_b[100:200].tolist()) == list(range(100))


def test_small_locate_blocks_and_copy_chunks_give_the_same_windows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shards of 100 tokens: about one window in six straddles two shards.
    a = make(tmp_path, "a", np.arange(4001), shard=100)
    b = make(tmp_path, "b", 30000 + np.arange(1601), shard=100)
    mixed = cfg((a, 3.0), (b, 1.0))
    default = [x["input_ids"].numpy() for x in take(loader(mixed), 60)]
    import sharding.loader as module

    monkeypatch.setattr(module, "CONVERT_TOKENS", 2 * 3 * SEQ)  # 2 micro-batches per chunk
    monkeypatch.setattr(module, "GATHER_TOKENS", 2 * 2 * 3 * SEQ)  # 2 chunks per gather
    monkeypatch.setattr(module, "LOCATE_TOKENS", 3 * 2 * 2 * 3 * SEQ)  # 3 gathers per block
    small = take(loader(mixed), 60)
    for d, x in zip(default, small, strict=True):
        assert np.array_equal(d, x["input_ids"].numpy())
        starts = x["input_ids"][:, :1].numpy()
        assert np.array_equal(x["input_ids"].numpy(), starts + np.arange(SEQ))
        assert np.array_equal(x["labels"].numpy(), starts + 1 + np.arange(SEQ))


def test_single_source_mixture_reduces_to_the_plain_stream(data: Path) -> None:
    plain = [sample_ids(b) for b in take(loader(cfg(data)), 10)]
    assert plain == [sample_ids(b) for b in take(loader(cfg((data, 0.3))), 10)]


def test_sources_with_different_tokenizers_are_refused(tmp_path: Path) -> None:
    a = make(tmp_path, "a", np.arange(500))
    b = make(tmp_path, "b", np.arange(500), tok="other")
    with pytest.raises(DataError, match="tokenizer sha256 .* differs"):
        loader(cfg(a, b))


def test_seq_len_longer_than_data(data: Path) -> None:
    with pytest.raises(DataError, match=r"seq_len 4096 is longer than the data in .*\(3001 tokens"):
        loader(cfg(data, seq_len=4096))


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no manifest.json — run gptrain prepare first"):
        loader(cfg(tmp_path))


def test_truncated_shard_is_named(tmp_path: Path) -> None:
    d = make(tmp_path, "t", np.arange(TOKENS))
    shard = d / "train_00002.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"train_00002\.bin: 1998 bytes, manifest.json says 2000"):
        loader(cfg(d))


def test_corrupt_shard_is_caught_when_verifying(tmp_path: Path) -> None:
    d = make(tmp_path, "c", np.arange(TOKENS))
    shard = d / "train_00001.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    loader(cfg(d))  # same size: only the checksum can tell
    with pytest.raises(DataError, match=r"train_00001\.bin: sha256 differs"):
        loader(cfg(d, verify=True))


def test_state_from_another_dataset_is_refused(data: Path) -> None:
    with pytest.raises(DataError, match="dataset changed"):
        loader(cfg(data), state={"epoch": 5, "consumed": 10, "seed": 0})


EOS = 65534  # `make`'s eos_id


def reference_positions(inputs: np.ndarray, eos_id: int) -> np.ndarray:
    """Position of each token in its document, one token at a time: 0 after each EOS."""
    out = np.empty(inputs.shape, dtype=np.int64)
    for r, row in enumerate(inputs.tolist()):
        position = 0
        for c, token in enumerate(row):
            out[r, c] = position
            position = 0 if token == eos_id else position + 1
    return out


def windows_with_documents(rng: np.random.Generator, n: int, length: int, kind: str) -> np.ndarray:
    tokens = rng.integers(0, 100, size=(n, length))
    if kind == "random":
        tokens[rng.random(tokens.shape) < 0.1] = EOS
    elif kind == "edges":  # EOS first, last, and last-but-one, in every row
        tokens[:, [0, -2, -1]] = EOS
    elif kind == "runs":  # consecutive EOS (empty documents), also across row ends
        tokens[:, 3:6] = EOS
        tokens[::2, -3:] = EOS
        tokens[1::2, :2] = EOS
    elif kind == "one row":
        tokens[n // 2, length // 2] = EOS
    return tokens


@pytest.mark.parametrize("kind", ["random", "edges", "runs", "one row", "none"])
@pytest.mark.parametrize("dtype", [np.uint16, np.int64])
def test_document_positions_match_a_token_by_token_reference(kind: str, dtype: type) -> None:
    from sharding.loader import document_positions

    rng = np.random.default_rng(0)
    for n, length in [(1, 1), (1, 2), (3, 17), (40, 64)]:
        tokens = windows_with_documents(rng, n, length + 1, kind).astype(dtype)
        inputs = tokens[:, :-1]  # a strided view
        expected = reference_positions(inputs, EOS)
        positions = document_positions(torch.from_numpy(inputs.astype(np.int64)), EOS)
        assert positions.dtype == torch.int64 and positions.shape == inputs.shape
        assert np.array_equal(positions.numpy(), expected), (kind, n, length)
        assert np.array_equal(document_positions(inputs, EOS), expected)  # numpy in and out


def test_document_positions_of_long_windows() -> None:
    from sharding.loader import document_positions

    inputs = np.zeros((2, 40000), dtype=np.int64)
    inputs[0, [0, 5, 35000]] = EOS
    expected = reference_positions(inputs, EOS)
    assert expected.max() == 39999
    assert np.array_equal(document_positions(inputs, EOS), expected)


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random documents of 1 to 40 tokens, some empty (consecutive EOS)."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 100, size=TOKENS)
    tokens[np.cumsum(rng.integers(1, 40, size=TOKENS // 10))[: TOKENS // 25]] = EOS
    tokens[[100, 101, 102, 16, 33]] = EOS
    return make(tmp_path_factory.mktemp("documents"), "docs", tokens)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_are_the_same_at_any_chunk_size(
    documents: Path, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With document masking the loader names the EOS its consumer restarts positions at
    and yields inputs and labels only (the positions are the consumer's, on its device)."""
    import sharding.loader as module

    data = cfg(documents, num_workers=workers)
    assert data.document_mask
    default_loader = loader(data, batch=4)
    assert default_loader.document_eos == EOS
    default = take(default_loader, 60)
    monkeypatch.setattr(module, "CONVERT_TOKENS", 2 * 4 * SEQ)  # 2 micro-batches per chunk
    monkeypatch.setattr(module, "GATHER_TOKENS", 3 * 2 * 4 * SEQ)  # 3 chunks per gather
    monkeypatch.setattr(module, "FETCH_TOKENS", 5 * 4 * SEQ)
    small = take(loader(data, batch=4), 60)
    eos_seen = 0
    for d, b in zip(default, small, strict=True):
        assert set(b) == {"input_ids", "labels"}
        assert b["input_ids"].dtype == torch.int64 and b["input_ids"].is_contiguous()
        assert np.array_equal(b["input_ids"].numpy(), d["input_ids"].numpy())
        assert np.array_equal(b["labels"].numpy(), d["labels"].numpy())
        eos_seen += int((b["input_ids"] == EOS).sum())
    assert eos_seen > 60


def test_no_document_eos_without_document_mask(documents: Path) -> None:
    plain = loader(cfg(documents, document_mask=False))
    (b,) = take(plain, 1)
    assert set(b) == {"input_ids", "labels"} and plain.document_eos is None
