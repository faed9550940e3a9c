"""Stream packed token windows from prepared shards to each rank; resumable in O(1).

    loader = build_loader(data, split="train", rank=rank, world_size=world,
                          micro_batch_size=8, seed=seed, state=saved_state)
    for batch in loader:      # {"input_ids", "labels"}: LongTensor[B, L]
        ...
        saved_state = loader.state_dict()   # {"epoch", "consumed", "seed"}: any world size

(the trainer keeps `saved_state` in each checkpoint's meta, `CheckpointMeta.loader`).

Sample i of a split is tokens[i*L : i*L + L + 1] of the split's concatenated
token stream (packed across documents and shards). Loss-masked data
(prompt→completion, chat) has labels -100 where the mask says "prompt", and
also where a completion's record began before the window: a completion whose
prompt was cut off by packing is never a target. The order of samples and
the split between ranks is the pure arithmetic of `sharding.partition`; the
train stream is infinite (epoch after epoch), and so is the val stream (in
file order), so callers take as many batches as they need.

With `data.document_mask` the consumer passes the model `position_ids` that restart at
0 after every EOS (`document_positions`, `loader.document_eos`): given those and no
attention mask, transformers (`masking_utils.find_packed_sequence_indices`) lets a token
attend only to earlier tokens of its own document, and positional embeddings restart per
document. They are computed where the batch is used (the trainer: on the device, a few
elementwise ops), not here: a third int64 row per token would halve the loader's speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sharding.config import DataConfig
from sharding.errors import DataError
from sharding.manifest import MASK_START, MASK_TARGET, Manifest, load_manifest
from sharding.partition import Mixture, batch_positions, epoch_permutation
from sharding.streams import Located, SourceStream, Windows

Batch = dict[str, torch.Tensor]
Plan = list[tuple[int, np.ndarray | None, Located]]  # see PackedDataset.locate
IGNORE_INDEX = -100  # label of a token that is no loss target (torch's cross_entropy default)
# Mask of plain-text tokens mixed with loss-masked sources: targets whose record "began".
ALWAYS = MASK_TARGET | MASK_START
LOCATE_TOKENS = 1 << 22  # windows located per call, in process (a few ms of batches)
FETCH_TOKENS = 1 << 19  # windows fetched per call by a DataLoader worker (~1 MB of uint16)
GATHER_TOKENS = 1 << 18  # windows copied per chunk, in process (512 KB of uint16)
# Windows converted to int64 per chunk: its 512 KB (768 KB with position_ids) stay in
# the L2 cache from one chunk to the next when the caller drops its batches in between.
CONVERT_TOKENS = 1 << 15
_PERMS_CACHED = 2  # the current epoch and the next: a batch can straddle the boundary


class PackedDataset(Dataset):
    """Map-style dataset indexed by global stream position (not by sample id).

    `__getitems__` builds a micro-batch at once. The TokenLoader `locate`s many
    micro-batches per call, sharing the index arithmetic, then copies their
    `windows` a chunk at a time.
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

    def locate(self, positions: np.ndarray) -> Plan:
        """Where the windows of (increasing) `positions` lie, for `windows` to copy any
        range of them: per source, which of the positions are its, and where."""
        if len(self.streams) == 1:
            return [(0, None, self.streams[0].locate(self.samples(0, positions)))]
        sources, indices = self.mixture.locate(positions)
        plan: Plan = []
        for source in np.unique(sources).tolist():
            mine = np.flatnonzero(sources == source)
            where = self.streams[source].locate(self.samples(source, indices[mine]))
            plan.append((source, mine, where))
        return plan

    def windows(self, plan: Plan, lo: int, hi: int) -> Windows:
        """[hi - lo, seq_len + 1] token windows (shard dtype) of positions lo..hi-1 of
        `plan`, and their loss-mask windows (None unless some source is loss-masked)."""
        if len(self.streams) == 1:
            return self.streams[0].windows(plan[0][2], lo, hi)
        shape = (hi - lo, self.seq_len + 1)
        tokens = np.empty(shape, dtype=self.dtype)
        masks = np.empty(shape, dtype=np.uint8) if self.masked else None
        for source, mine, where in plan:
            first, last = np.searchsorted(mine, (lo, hi)).tolist()
            if first < last:
                part, part_mask = self.streams[source].windows(where, first, last)
                rows = mine[first:last] - lo
                tokens[rows] = part
                if masks is not None:
                    masks[rows] = ALWAYS if part_mask is None else part_mask
        return tokens, masks

    def fetch(self, positions: np.ndarray) -> Windows:
        """The token and loss-mask windows of (increasing) `positions`."""
        return self.windows(self.locate(positions), 0, positions.size)

    def __getitems__(self, positions: list[int] | np.ndarray) -> Batch:
        return to_batch(*self.fetch(np.asarray(positions, dtype=np.int64)))

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
    them; one allocation for all.
    """
    n, length = tokens.shape
    both = np.empty((2, n, length - 1), dtype=np.int64)
    np.copyto(both[0], tokens[:, :-1], casting="unsafe")
    np.copyto(both[1], tokens[:, 1:], casting="unsafe")
    if masks is not None:
        np.putmask(both[1], ~targets(masks), IGNORE_INDEX)
    return both


def document_positions(input_ids: Any, eos_id: int) -> Any:
    """[B, L] int64 position of each input token in its document (a torch tensor, on its
    device): 0 after every EOS (an EOS ends its document), counting from the window start
    for the first document. A numpy array in, a numpy array out."""
    import torch

    if isinstance(input_ids, np.ndarray):
        return document_positions(torch.from_numpy(input_ids), eos_id).numpy()
    length = input_ids.shape[-1]
    columns = torch.arange(length, device=input_ids.device).expand_as(input_ids)
    starts = torch.zeros_like(columns)
    starts[..., 1:] = torch.where(input_ids[..., :-1] == eos_id, columns[..., 1:], 0)
    return columns - starts.cummax(dim=-1).values


def targets(masks: np.ndarray) -> np.ndarray:
    """[n, L] bool: which labels of the windows' mask windows [n, L + 1] count in the loss.

    Label k (token k+1) counts when it is a MASK_TARGET and its record began
    inside the window (a MASK_START at or before position k+1): a completion
    whose prompt was cut off by the window start is no target.
    """
    began = np.logical_or.accumulate((masks & MASK_START) != 0, axis=1)[:, 1:]
    return ((masks[:, 1:] & MASK_TARGET) != 0) & began


BATCH_KEYS = ("input_ids", "labels")  # the rows of `to_int64`'s array


def split_batches(both: np.ndarray, batch_size: int) -> list[Batch]:
    """Micro-batches of a [2 or 3, K*B, L] array of `to_int64`, as tensors sharing its memory."""
    # Numpy slices + from_numpy: several times cheaper than torch's split() or indexing.
    rows = list(zip(BATCH_KEYS, both, strict=False))
    return [
        {key: torch.from_numpy(row[lo : lo + batch_size]) for key, row in rows}
        for lo in range(0, both.shape[1], batch_size)
    ]


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
        tokens, masks = self.dataset.fetch(blocks.reshape(-1))
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
        document_mask: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: {rank} is not in [0, world_size={world_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size: must be >= 1, got {micro_batch_size}")
        self.dataset, self.manifests = dataset, manifests
        self.rank, self.world_size, self.micro_batch_size = rank, world_size, micro_batch_size
        self.num_workers = num_workers
        # With document masking: the EOS id the consumer's `document_positions` restart at.
        self.document_eos = manifests[0].eos_id if document_mask else None
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
        size, seq_len = self.micro_batch_size, self.dataset.seq_len
        if self.num_workers == 0:
            # Locate many micro-batches at once (index arithmetic costs per call more than
            # per sample), then copy a chunk of windows at a time just before converting it.
            chunk = size * max(GATHER_TOKENS // (size * seq_len), 1)
            blocks = chunk // size * max(LOCATE_TOKENS // (chunk * seq_len), 1)
            for block in self._sampler(blocks):
                positions = block.reshape(-1)
                plan = self.dataset.locate(positions)
                for lo in range(0, positions.size, chunk):
                    yield from self._hand_over(*self.dataset.windows(plan, lo, lo + chunk))
            return
        # Workers fetch about FETCH_TOKENS per call, which keeps the first batch quick.
        loader = DataLoader(
            _BlockDataset(self.dataset),
            batch_sampler=self._sampler(min(max(FETCH_TOKENS // (size * seq_len), 1), 64)),
            num_workers=self.num_workers,
            collate_fn=_no_collate,
        )
        for carried, carried_masks in loader:
            tokens = carried.numpy().view(self.dataset.dtype)
            yield from self._hand_over(
                tokens, None if carried_masks is None else carried_masks.numpy()
            )

    def _sampler(self, blocks: int) -> RankBatchSampler:
        return RankBatchSampler(
            self.consumed, self.rank, self.world_size, self.micro_batch_size, blocks
        )

    def _hand_over(self, tokens: np.ndarray, masks: np.ndarray | None) -> Iterator[Batch]:
        """The micro-batches of windows, converted to int64 a few at a time (in cache)."""
        size, step = self.micro_batch_size, self.world_size * self.micro_batch_size
        rows = size * max(CONVERT_TOKENS // (size * (tokens.shape[1] - 1)), 1)
        for lo in range(0, tokens.shape[0], rows):
            hi = lo + rows
            batches = split_batches(
                to_int64(
                    tokens[lo:hi],
                    None if masks is None else masks[lo:hi],
                ),
                size,
            )
            # Handed over without keeping a reference: once the caller drops them, the
            # next chunk reuses their memory while it is still in cache.
            batches.reverse()
            while batches:
                # Counted in the main process as each batch is handed over: what was
                # fetched ahead but never received is not consumed.
                self.consumed += step
                yield batches.pop()


def load_manifests(data: DataConfig) -> list[Manifest]:
    """Each `data.sources` entry's manifest, its tokenizer there; a DataError names the
    entry (`data.sources[i].path: ...`)."""
    if not data.sources:
        raise DataError("data.sources: empty — add {path: DIR} entries of prepared datasets")
    manifests = []
    for i, src in enumerate(data.sources):
        try:
            manifest = load_manifest(src.path)
            manifest.require_tokenizer()
        except DataError as exc:
            raise DataError(f"data.sources[{i}].path: {exc}") from None
        manifests.append(manifest)
    return manifests


def open_sources(
    data: DataConfig, split: str = "train"
) -> tuple[list[Manifest], list[SourceStream]]:
    """Each `data.sources` entry's manifest and `split` stream, checked against each other
    and the config: one tokenizer for all, every shard there at its manifest size (with
    `data.verify`, its sha256 too), `data.seq_len` within the data. Cheap without verify
    (no shard is read): the launcher runs it before any rank starts, as the loader does."""
    manifests = load_manifests(data)
    first = manifests[0]
    for src, m in zip(data.sources[1:], manifests[1:], strict=True):
        if m.tokenizer_sha256 != first.tokenizer_sha256:
            raise DataError(
                f"{src.path}: tokenizer sha256 {m.tokenizer_sha256[:12]} differs from"
                f" {data.sources[0].path}'s {first.tokenizer_sha256[:12]} — prepare every"
                " data.sources entry with the same tokenizer"
            )
    streams = [SourceStream(m, split, data.seq_len, verify=data.verify) for m in manifests]
    return manifests, streams


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
    manifests, streams = open_sources(data, split)
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
        document_mask=data.document_mask,
    )
    if state is not None:
        loader.load_state_dict(state)
    return loader
