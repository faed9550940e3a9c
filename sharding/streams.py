"""One split of one prepared dataset as random-access `seq_len + 1`-token windows.

Sample i is tokens[i*L : i*L + L + 1] of the split's token stream, the shards
concatenated in manifest order (and the same of the loss-mask stream for
loss-masked data). Windows are copied by one numpy gather over a view that
spans every shard's memory map (`SourceStream._span`); the few that straddle
two shards are put together piece by piece.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sharding.errors import DataError
from sharding.manifest import Manifest, sha256_file
from sharding.partition import num_samples

Windows = tuple[np.ndarray, np.ndarray | None]  # token windows, loss-mask windows


class Located(NamedTuple):
    """Where the windows of some samples of one stream lie (see `SourceStream.locate`)."""

    rows: np.ndarray | None  # per sample, its window's row in the token span
    mask_rows: np.ndarray | None  # the same in the mask span (None: not loss-masked)
    straddlers: np.ndarray  # the samples (as indices) whose window straddles two shards
    starts: np.ndarray  # their windows' token offsets in the split


class SourceStream:
    """One split of one prepared dataset as a random-access array of samples.

    Shards are memory-mapped when the first windows are located (so DataLoader
    workers map their own), after checking their byte size against the
    manifest. All maps are then seen through one 2-D strided view (`_span`), so
    windows are copied by one numpy gather, not token by token or shard by shard.
    """

    def __init__(self, manifest: Manifest, split: str, seq_len: int, *, verify: bool = False):
        self.manifest, self.split, self.seq_len = manifest, split, seq_len
        self.dtype = np.dtype(manifest.dtype)
        self.shards = manifest.shards(split)
        self.paths = [manifest.shard_path(s) for s in self.shards]
        sizes = np.asarray([s.tokens for s in self.shards], dtype=np.int64)
        ends = np.cumsum(sizes)
        self.shard_sizes, self.shard_ends, self.shard_starts = sizes, ends, ends - sizes
        self.total_tokens = int(ends[-1]) if len(ends) else 0
        self.num_samples = num_samples(self.total_tokens, seq_len)
        if self.num_samples == 0:
            raise DataError(
                f"seq_len {seq_len} is longer than the data in {manifest.dir}"
                f" ({self.total_tokens} tokens in split {split!r}) — lower data.seq_len or add data"
            )
        self.masked = manifest.loss_mask
        self.mask_paths = [manifest.mask_path(s) for s in self.shards]
        # Per shard, in [tokens, mask] pairs: the memory maps; and per [tokens, mask],
        # the window view spanning all of them (see `_span`).
        self._arrays: list[list[np.ndarray | None]] = [[None, None] for _ in self.shards]
        self._spans: list[tuple[np.ndarray, np.ndarray] | None] = [None, None]
        for i in range(len(self.shards)):
            self._check_size(i)
            if verify:
                self._check_sha256(i)

    def __getstate__(self) -> dict:
        # Memory maps are not pickled: each DataLoader worker maps the shards itself.
        empty = [[None, None] for _ in self.shards]
        return {**self.__dict__, "_arrays": empty, "_spans": [None, None]}

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

    def _span(self, mask: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """A window view over every shard's memory map at once, and each shard's origin in it.

        Row o of the view is the `seq_len + 1` elements that start o elements after
        the lowest-addressed map, so the window at token offset t of shard s is row
        origin[s] + t: one numpy gather copies windows from any number of shards
        straight into place. Rows between the maps are not memory of ours (reading
        one would crash the process, not raise); only rows from `locate` (whole
        windows inside one shard) may be read. The maps live as long as this stream.
        """
        span = self._spans[mask]
        if span is None:
            arrays = [self._array(i, mask) for i in range(len(self.shards))]
            itemsize = arrays[0].dtype.itemsize
            addresses = np.asarray([a.ctypes.data for a in arrays], dtype=np.int64)
            lowest = int(np.argmin(addresses))
            gaps = addresses - addresses[lowest]
            assert not (gaps % itemsize).any(), "memory maps are page-aligned"
            origin = gaps // itemsize
            rows = int((origin + self.shard_sizes).max()) - self.seq_len
            view = np.lib.stride_tricks.as_strided(
                arrays[lowest],
                shape=(max(rows, 0), self.seq_len + 1),
                strides=(itemsize, itemsize),
                writeable=False,
            )
            span = self._spans[mask] = (view, origin)
        return span

    def locate(self, samples: np.ndarray) -> Located:
        """Where the windows of `samples` lie in the spans of tokens (and masks)."""
        if samples.size and not 0 <= samples.min() <= samples.max() < self.num_samples:
            raise IndexError(f"samples outside [0, {self.num_samples}) of {self.manifest.dir}")
        starts = samples * self.seq_len
        shard = np.searchsorted(self.shard_ends, starts, side="right")
        offset = starts - self.shard_starts[shard]
        whole = offset + self.seq_len < self.shard_sizes[shard]
        straddlers = np.flatnonzero(~whole)
        if straddlers.size == samples.size:  # no whole window: all are copied piece by piece
            return Located(None, None, straddlers, starts)
        if straddlers.size:  # a straddler's row is some whole window's, replaced after the gather
            offset[straddlers], shard[straddlers] = offset[whole.argmax()], shard[whole.argmax()]
        rows = self._span()[1][shard] + offset
        mask_rows = self._span(mask=True)[1][shard] + offset if self.masked else None
        return Located(rows, mask_rows, straddlers, starts[straddlers])

    def gather(self, where: Located, lo: int, hi: int, mask: bool = False) -> np.ndarray:
        """The [hi - lo, seq_len + 1] token (or loss-mask) windows of samples lo..hi-1."""
        rows = where.mask_rows if mask else where.rows
        if rows is None:
            out = np.empty((hi - lo, self.seq_len + 1), dtype=np.uint8 if mask else self.dtype)
        else:
            out = self._span(mask)[0][rows[lo:hi]]  # one gather in C, from all shards
        if where.straddlers.size:
            first, last = np.searchsorted(where.straddlers, (lo, hi)).tolist()
            straddlers, starts = where.straddlers[first:last], where.starts[first:last]
            for i, start in zip(straddlers.tolist(), starts.tolist(), strict=True):
                out[i - lo] = self._window(start, self.seq_len + 1, mask)
        return out

    def windows(self, where: Located, lo: int, hi: int) -> Windows:
        """Token windows of samples lo..hi-1 of `where`, and their loss-mask windows
        (None for plain text)."""
        tokens = self.gather(where, lo, hi)
        return tokens, (self.gather(where, lo, hi, mask=True) if self.masked else None)

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
