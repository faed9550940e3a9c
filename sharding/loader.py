"""Stream packed token windows from prepared shards to each rank; resumable in O(1).

    loader = build_loader(cfg.data, split="train", rank=rank, world_size=world,
                          micro_batch_size=8, seed=cfg.run.seed, state=meta.get("data"))
    for batch in loader:          # {"input_ids": LongTensor[B, L], "labels": LongTensor[B, L]}
        ...
        meta["data"] = loader.state_dict()   # {"epoch", "consumed", "seed"}

Sample i of a split is tokens[i*L : i*L + L + 1] of the split's concatenated
token stream (packed across documents and shards). Loss-masked data
(prompt→completion, chat) has labels -100 where the mask says "prompt", and
also where a completion's record began before the window: a completion whose
prompt was cut off by packing is never a target. The order of samples and
the split between ranks is the pure arithmetic of `sharding.partition`; the
train stream is infinite (epoch after epoch), and so is the val stream (in
file order), so callers take as many batches as they need.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sharding.config import DataConfig
from sharding.errors import DataError
from sharding.manifest import MASK_START, MASK_TARGET, Manifest, load_manifest, sha256_file
from sharding.partition import Mixture, batch_positions, epoch_permutation, num_samples

Batch = dict[str, torch.Tensor]
Windows = tuple[np.ndarray, np.ndarray | None]  # token windows, loss-mask windows
IGNORE_INDEX = -100  # label of a token that is no loss target (torch's cross_entropy default)
# Mask of plain-text tokens mixed with loss-masked sources: targets whose record "began".
ALWAYS = MASK_TARGET | MASK_START
FETCH_TOKENS = 1 << 19  # ~1 MB of uint16 windows per fetch
CONVERT_TOKENS = 1 << 16  # int64 conversion in ~1 MB pieces, which stay in cache
_PERMS_CACHED = 2  # the current epoch and the next: a batch can straddle the boundary


class SourceStream:
    """One split of one prepared dataset as a random-access array of samples.

    Shards are memory-mapped on first use (so DataLoader workers map their
    own), after checking their byte size against the manifest. Each shard is
    also seen as a 2-D strided view whose row j is the window of its j-th whole
    sample, so windows are copied by numpy indexing, not token by token.
    """

    def __init__(self, manifest: Manifest, split: str, seq_len: int, *, verify: bool = False):
        self.manifest, self.split, self.seq_len = manifest, split, seq_len
        self.dtype = np.dtype(manifest.dtype)
        self.shards = manifest.shards(split)
        self.paths = [manifest.shard_path(s) for s in self.shards]
        sizes = np.asarray([s.tokens for s in self.shards], dtype=np.int64)
        ends = np.cumsum(sizes)
        self.shard_ends, self.shard_starts = ends, ends - sizes
        self.total_tokens = int(ends[-1]) if len(ends) else 0
        self.num_samples = num_samples(self.total_tokens, seq_len)
        if self.num_samples == 0:
            raise DataError(
                f"seq_len {seq_len} is longer than the data in {manifest.dir}"
                f" ({self.total_tokens} tokens in split {split!r}) — lower data.seq_len or add data"
            )
        # Sample i starts in the shard s with first_sample[s] <= i < first_sample[s+1]; the
        # first full_samples[s] of those end in the same shard, the rest straddle a boundary.
        self.first_sample = -(-self.shard_starts // seq_len)
        self.full_samples = np.maximum((ends - 1) // seq_len - self.first_sample, 0)
        self.masked = manifest.loss_mask
        self.mask_paths = [manifest.mask_path(s) for s in self.shards]
        # Per shard, in [tokens, mask] pairs: memory maps and their window views.
        self._arrays: list[list[np.ndarray | None]] = [[None, None] for _ in self.shards]
        self._windows: list[list[np.ndarray | None]] = [[None, None] for _ in self.shards]
        for i in range(len(self.shards)):
            self._check_size(i)
            if verify:
                self._check_sha256(i)

    def __getstate__(self) -> dict:
        # Memory maps are not pickled: each DataLoader worker maps the shards itself.
        empty = [[None, None] for _ in self.shards]
        return {**self.__dict__, "_arrays": empty, "_windows": [list(e) for e in empty]}

    def _check_size(self, i: int) -> None:
        for name, want, _ in self.shards[i].files(self.manifest.itemsize):
            path = self.manifest.dir / name
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise DataError(f"{path}: shard missing — re-run gptrain prepare") from None
            if size != want:
                raise DataError(
                    f"{path}: {size} bytes, manifest.json says {want} (truncated or replaced"
                    " shard) — re-run gptrain prepare"
                )

    def _check_sha256(self, i: int) -> None:
        for name, _, sha256 in self.shards[i].files(self.manifest.itemsize):
            path = self.manifest.dir / name
            if sha256_file(path) != sha256:
                kind = "mask" if path.suffix == ".mask" else "shard"
                raise DataError(
                    f"{path}: sha256 differs from manifest.json (corrupt {kind})"
                    " — re-run gptrain prepare"
                )

    def _array(self, i: int, mask: bool = False) -> np.ndarray:
        arr = self._arrays[i][mask]
        if arr is None:
            self._check_size(i)
            path, dtype = (self.mask_paths[i], np.uint8) if mask else (self.paths[i], self.dtype)
            # A plain ndarray view: slicing it is several times cheaper than slicing a memmap.
            arr = self._arrays[i][mask] = np.asarray(np.memmap(path, dtype=dtype, mode="r"))
        return arr

    def _window_view(self, i: int, mask: bool = False) -> np.ndarray:
        view = self._windows[i][mask]
        if view is None:
            offset = int(self.first_sample[i] * self.seq_len - self.shard_starts[i])
            base = self._array(i, mask)[offset:]
            itemsize = base.dtype.itemsize
            view = self._windows[i][mask] = np.lib.stride_tricks.as_strided(
                base,
                shape=(int(self.full_samples[i]), self.seq_len + 1),
                strides=(self.seq_len * itemsize, itemsize),
                writeable=False,
            )
        return view

    def locate(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row in that shard's window view) of each sample; row -1: straddles shards."""
        shard = np.searchsorted(self.first_sample, samples, side="right") - 1
        row = samples - self.first_sample[shard]
        return shard, np.where(row < self.full_samples[shard], row, -1)

    def gather(
        self, shard: np.ndarray, row: np.ndarray, samples: np.ndarray, mask: bool = False
    ) -> np.ndarray:
        """The [n, seq_len + 1] token (or loss-mask) windows of `samples`, located by `locate`."""
        whole = row >= 0
        first = int(shard[0])
        if whole.all() and (shard == first).all():
            return self._window_view(first, mask)[row]  # one gather in C
        dtype = np.uint8 if mask else self.dtype
        out = np.empty((samples.size, self.seq_len + 1), dtype=dtype)
        # One gather per shard (into its rows of `out`), then the few windows that
        # straddle two shards one by one.
        for s in np.unique(shard[whole]).tolist():
            rows = np.flatnonzero(whole & (shard == s))
            out[rows] = self._window_view(s, mask)[row[rows]]
        for i in np.flatnonzero(~whole).tolist():
            out[i] = self._window(int(samples[i]) * self.seq_len, self.seq_len + 1, mask)
        return out

    def windows(self, samples: np.ndarray) -> Windows:
        """Token windows of `samples`, and their loss-mask windows (None for plain text)."""
        where = self.locate(samples)
        tokens = self.gather(*where, samples)
        return tokens, (self.gather(*where, samples, mask=True) if self.masked else None)

    def _window(self, start: int, length: int, mask: bool = False) -> np.ndarray:
        """Tokens (or mask values) [start, start+length) of the split, across shards."""
        pieces, shard = [], int(np.searchsorted(self.shard_ends, start, side="right"))
        while length > 0:
            arr = self._array(shard, mask)
            lo = start - int(self.shard_starts[shard])
            piece = arr[lo : lo + length]
            pieces.append(piece)
            start, length, shard = start + piece.shape[0], length - piece.shape[0], shard + 1
        return np.concatenate(pieces)


class PackedDataset(Dataset):
    """Map-style dataset indexed by global stream position (not by sample id).

    `__getitems__` builds a micro-batch at once; the TokenLoader asks `windows`
    for several micro-batches per call, sharing the index arithmetic.
    """

    def __init__(self, streams: list[SourceStream], weights: list[float], seed: int, shuffle: bool):
        self.streams, self.weights, self.shuffle = streams, weights, shuffle
        self.seq_len = streams[0].seq_len
        self.dtype = streams[0].dtype
        self.masked = any(s.masked for s in streams)
        self.set_seed(seed)

    def set_seed(self, seed: int) -> None:
        """Change the seed of the mixture order and the epoch permutations."""
        self.seed = seed
        self.mixture = Mixture(self.weights, seed)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return sum(s.num_samples for s in self.streams)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_perms": {}}

    def samples(self, source: int, indices: np.ndarray) -> np.ndarray:
        """Sample ids of a source for (increasing) indices of its own stream, across epochs."""
        n = self.streams[source].num_samples
        epochs, offsets = np.divmod(indices, n)
        if not self.shuffle:
            return offsets
        first, last = int(epochs.min()), int(epochs.max())
        if first == last:
            return self._perm(source, first, n)[offsets]
        out = np.empty_like(offsets)
        for epoch in range(first, last + 1):
            mask = epochs == epoch
            out[mask] = self._perm(source, epoch, n)[offsets[mask]]
        return out

    def _perm(self, source: int, epoch: int, n: int) -> np.ndarray:
        key = (source, epoch)
        perm = self._perms.get(key)
        if perm is None:
            if len(self._perms) >= _PERMS_CACHED * len(self.streams):
                self._perms.pop(next(iter(self._perms)))  # oldest first (dicts keep order)
            perm = self._perms[key] = epoch_permutation(self.seed, epoch, n, source)
        return perm

    def windows(self, positions: np.ndarray) -> Windows:
        """[len(positions), seq_len + 1] token windows (shard dtype) of increasing positions,
        and their loss-mask windows (None unless some source is loss-masked)."""
        if len(self.streams) == 1:
            stream = self.streams[0]
            return stream.windows(self.samples(0, positions))
        shape = (positions.size, self.seq_len + 1)
        tokens = np.empty(shape, dtype=self.dtype)
        masks = np.empty(shape, dtype=np.uint8) if self.masked else None
        sources, indices = self.mixture.locate(positions)
        for source in np.unique(sources).tolist():
            rows = np.flatnonzero(sources == source)
            part, part_mask = self.streams[source].windows(self.samples(source, indices[rows]))
            tokens[rows] = part
            if masks is not None:
                masks[rows] = ALWAYS if part_mask is None else part_mask
        return tokens, masks

    def __getitems__(self, positions: list[int] | np.ndarray) -> Batch:
        return to_batch(*self.windows(np.asarray(positions, dtype=np.int64)))

    def __getitem__(self, position: int) -> Batch:
        batch = self.__getitems__([position])
        return {k: v[0] for k, v in batch.items()}


def to_batch(tokens: np.ndarray, masks: np.ndarray | None = None) -> Batch:
    """The micro-batch of `seq_len + 1`-token windows: int64 inputs and labels."""
    return split_batches(to_int64(tokens, masks), tokens.shape[0])[0]


def to_int64(tokens: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
    """[2, n, L] int64: inputs = tokens[:, :-1], labels = tokens[:, 1:], each contiguous;
    labels that are not loss targets (see `targets`) are IGNORE_INDEX.

    Contiguous (not two overlapping views) because training code may `.view()`
    them; one allocation for both.
    """
    n, length = tokens.shape
    both = np.empty((2, n, length - 1), dtype=np.int64)
    np.copyto(both[0], tokens[:, :-1], casting="unsafe")
    np.copyto(both[1], tokens[:, 1:], casting="unsafe")
    if masks is not None:
        np.putmask(both[1], ~targets(masks), IGNORE_INDEX)
    return both


def targets(masks: np.ndarray) -> np.ndarray:
    """[n, L] bool: which labels of the windows' mask windows [n, L + 1] count in the loss.

    Label k (token k+1) counts when it is a MASK_TARGET and its record began
    inside the window (a MASK_START at or before position k+1): a completion
    whose prompt was cut off by the window start is no target.
    """
    began = np.logical_or.accumulate((masks & MASK_START) != 0, axis=1)[:, 1:]
    return ((masks[:, 1:] & MASK_TARGET) != 0) & began


def split_batches(both: np.ndarray, batch_size: int) -> list[Batch]:
    """Micro-batches of a [2, K*B, L] inputs-and-labels array, as tensors sharing its memory."""
    # Numpy slices + from_numpy: several times cheaper than torch's split() or indexing.
    inputs, labels, tensor = both[0], both[1], torch.from_numpy
    return [
        {"input_ids": tensor(inputs[lo : lo + batch_size]),
         "labels": tensor(labels[lo : lo + batch_size])}
        for lo in range(0, both.shape[1], batch_size)
    ]  # fmt: skip


# Shard dtypes and the signed torch dtypes of the same width that carry them between
# processes (torch's unsigned 16/32-bit types lack shared-memory support in older torch).
_CARRIER = {np.dtype(np.uint16): np.int16, np.dtype(np.uint32): np.int32}


class _BlockDataset(Dataset):
    """What the DataLoader sees: each "index" is a [K, B] block of positions.

    Workers return the block's token windows as ONE shard-dtype tensor (a quarter
    of int64's bytes to pass between processes), plus a uint8 one of loss masks
    for masked data; the main process converts them a few micro-batches at a time.
    """

    def __init__(self, dataset: PackedDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens, masks = self.dataset.windows(blocks.reshape(-1))
        carried = torch.from_numpy(tokens.view(_CARRIER[tokens.dtype]))
        return carried, (None if masks is None else torch.from_numpy(masks))

    def __getitem__(self, position: int) -> Batch:
        return self.dataset[position]


class RankBatchSampler(Sampler[np.ndarray]):
    """Yields this rank's positions from `start`, forever, as [K, B] blocks of K micro-batches."""

    def __init__(self, start: int, rank: int, world_size: int, batch_size: int, blocks: int = 1):
        self.start, self.rank, self.world_size = start, rank, world_size
        self.batch_size, self.blocks = batch_size, blocks

    def __iter__(self) -> Iterator[np.ndarray]:
        shape, size, k = (self.blocks, self.batch_size), self.blocks * self.batch_size, 0
        while True:
            # Micro-batches k*K .. k*K+K-1 of batch size B are exactly "batch" k of size K*B.
            yield batch_positions(self.start, self.rank, self.world_size, size, k).reshape(shape)
            k += 1


def _no_collate(block: Any) -> Any:
    return block  # the dataset already returns the finished block


class TokenLoader:
    """Iterable of this rank's micro-batches; `state_dict()` is O(1) and world-size independent.

    `consumed` counts GLOBAL samples (all ranks, in lockstep): each micro-batch
    yielded adds world_size * micro_batch_size.
    """

    def __init__(
        self,
        dataset: PackedDataset,
        manifests: list[Manifest],
        *,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        num_workers: int = 0,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: {rank} is not in [0, world_size={world_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size: must be >= 1, got {micro_batch_size}")
        self.dataset, self.manifests = dataset, manifests
        self.rank, self.world_size, self.micro_batch_size = rank, world_size, micro_batch_size
        self.num_workers = num_workers
        self.consumed = 0

    @property
    def manifest(self) -> Manifest:
        """The first source's manifest (all sources share the tokenizer)."""
        return self.manifests[0]

    @property
    def samples_per_epoch(self) -> int:
        """Samples in one pass over every source (the sum over sources)."""
        return len(self.dataset)

    @property
    def seed(self) -> int:
        """Seed of the sample order (a resumed state's seed wins over the configured one)."""
        return self.dataset.seed

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per rank for one pass over `samples_per_epoch` (rounded down, >= 1)."""
        return max(self.samples_per_epoch // (self.world_size * self.micro_batch_size), 1)

    def state_dict(self) -> dict:
        """{"epoch", "consumed", "seed"}: enough to resume on any world size."""
        return {
            "epoch": self.consumed // self.samples_per_epoch,
            "consumed": self.consumed,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after `state["consumed"]` global samples, in the order of `state["seed"]`."""
        try:
            consumed, seed = int(state["consumed"]), int(state.get("seed", self.seed))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"data loader state {state!r}: needs an integer 'consumed'") from e
        if consumed < 0:
            raise DataError(f"data loader state: consumed {consumed} is negative")
        epoch = state.get("epoch")
        if epoch is not None and epoch != consumed // self.samples_per_epoch:
            raise DataError(
                f"data loader state: epoch {epoch} but consumed {consumed} is epoch"
                f" {consumed // self.samples_per_epoch} of {self.samples_per_epoch} samples"
                " — the dataset changed since the checkpoint; resume with the same data"
            )
        if seed != self.seed:
            self.dataset.set_seed(seed)
        self.consumed = consumed

    def __iter__(self) -> Iterator[Batch]:
        step = self.world_size * self.micro_batch_size
        # Fetch several micro-batches per call to share the index arithmetic; about
        # FETCH_TOKENS tokens per fetch keeps the latency of the first batch low.
        blocks = min(max(FETCH_TOKENS // (self.micro_batch_size * self.dataset.seq_len), 1), 64)
        sampler = RankBatchSampler(
            self.consumed, self.rank, self.world_size, self.micro_batch_size, blocks
        )
        if self.num_workers == 0:
            # The same dataset and sampler as the DataLoader path, minus its overhead.
            flat = (block.reshape(-1) for block in sampler)
            fetched: Iterator[Windows] = map(self.dataset.windows, flat)
        else:
            loader = DataLoader(
                _BlockDataset(self.dataset),
                batch_sampler=sampler,
                num_workers=self.num_workers,
                collate_fn=_no_collate,
            )
            dtype = self.dataset.dtype
            fetched = (
                (tokens.numpy().view(dtype), None if masks is None else masks.numpy())
                for tokens, masks in loader
            )
        size = self.micro_batch_size
        chunk = size * max(CONVERT_TOKENS // (size * self.dataset.seq_len), 1)
        for tokens, masks in fetched:
            for lo in range(0, tokens.shape[0], chunk):
                part = None if masks is None else masks[lo : lo + chunk]
                for batch in split_batches(to_int64(tokens[lo : lo + chunk], part), size):
                    # Counted in the main process as each batch is handed over: what was
                    # fetched ahead but never received is not consumed.
                    self.consumed += step
                    yield batch


def build_loader(
    data: DataConfig,
    *,
    split: str,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    seed: int,
    state: dict | None = None,
) -> TokenLoader:
    """A TokenLoader over `data.sources` for `split` ("train" shuffles, "val" does not)."""
    if not data.sources:
        raise DataError("data.sources: empty — add {path: DIR} entries of prepared datasets")
    manifests = [load_manifest(s.path) for s in data.sources]
    first = manifests[0]
    for src, m in zip(data.sources[1:], manifests[1:], strict=True):
        if m.tokenizer_sha256 != first.tokenizer_sha256:
            raise DataError(
                f"{src.path}: tokenizer sha256 {m.tokenizer_sha256[:12]} differs from"
                f" {data.sources[0].path}'s {first.tokenizer_sha256[:12]} — prepare every"
                " data.sources entry with the same tokenizer"
            )
    streams = [SourceStream(m, split, data.seq_len, verify=data.verify) for m in manifests]
    dataset = PackedDataset(
        streams,
        [s.weight for s in data.sources],
        seed,
        shuffle=data.shuffle and split == "train",
    )
    loader = TokenLoader(
        dataset,
        manifests,
        rank=rank,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        num_workers=data.num_workers,
    )
    if state is not None:
        loader.load_state_dict(state)
    return loader
