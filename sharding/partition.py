"""Pure arithmetic of the global sample stream: ranks, epochs, permutations and mixtures.

The stream is a sequence of global positions 0, 1, 2, ... Rank r of W takes
positions start + r, start + r + W, ... so a micro-batch of B on every rank
consumes W*B positions, every position is used by exactly one rank, and a run
resumed on a different world size simply continues at `consumed`.

Position p of a mixture is first mapped to (source i, index q in source i's
own stream); index q of a source with N samples is epoch q // N, sample
perm(seed, epoch)[q % N]. With one source, q == p.
"""

from __future__ import annotations

import numpy as np

# Stream tag of the mixture's slot permutation; keeps it independent of epoch permutations.
_MIXTURE_STREAM = 0x6D6978  # "mix"
MIXTURE_PERIOD = 1000


def num_samples(total_tokens: int, seq_len: int) -> int:
    """Samples of `seq_len + 1` tokens at stride `seq_len` in a stream of `total_tokens`."""
    return max(total_tokens - 1, 0) // seq_len


def sample_positions(start: int, rank: int, world_size: int, count: int) -> list[int]:
    """The first `count` global positions of `rank` when the stream starts at `start`."""
    return [start + rank + world_size * k for k in range(count)]


def batch_positions(
    start: int, rank: int, world_size: int, batch_size: int, batch_index: int
) -> np.ndarray:
    """Global positions of micro-batch `batch_index` of `rank` (all ranks move in lockstep)."""
    first = start + batch_index * batch_size * world_size + rank
    return first + world_size * np.arange(batch_size, dtype=np.int64)


def epoch_permutation(seed: int, epoch: int, n: int, source: int = 0) -> np.ndarray:
    """The seeded order of the `n` samples of `source` in `epoch` (int64)."""
    # Source 0 is seeded exactly like a plain single-source stream.
    key = [seed, epoch] if source == 0 else [seed, epoch, source]
    return np.random.default_rng(key).permutation(n)


def mixture_counts(weights: list[float], period: int) -> list[int]:
    """Slots per source in a period: weights normalised, rounded by largest remainder, each >= 1."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or (w <= 0).any():
        raise ValueError(f"weights: need one or more positive weights, got {weights}")
    if period < w.size:
        raise ValueError(f"period: {period} is less than the number of sources {w.size}")
    exact = w / w.sum() * period
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[: period - counts.sum()]:
        counts[i] += 1
    # A tiny weight still gets one slot, taken from the largest source.
    while (counts == 0).any():
        counts[np.argmax(counts)] -= 1
        counts[np.argmin(counts)] += 1
    return counts.tolist()


class Mixture:
    """Maps global positions to (source, index in that source's stream) in O(1).

    Each period of P positions holds `counts[i]` slots of source i in a seeded
    order, so source i gets weight_i of every window of P positions, and its
    own indices 0, 1, 2, ... in order, with no gaps and no repeats.
    """

    def __init__(self, weights: list[float], seed: int, period: int = MIXTURE_PERIOD):
        period = 1 if len(weights) == 1 else period  # one source: identity
        self.counts = np.asarray(mixture_counts(weights, period), dtype=np.int64)
        self.period = period
        labels = np.repeat(np.arange(len(weights)), self.counts)
        self.slot_source = np.random.default_rng([seed, _MIXTURE_STREAM]).permutation(labels)
        # slot_rank[s]: how many earlier slots of the period belong to the same source.
        self.slot_rank = np.zeros(period, dtype=np.int64)
        seen = np.zeros(len(weights), dtype=np.int64)
        for s, src in enumerate(self.slot_source.tolist()):
            self.slot_rank[s] = seen[src]
            seen[src] += 1

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source ids, indices within each source's stream) of global positions."""
        period_index, slot = np.divmod(np.asarray(positions, dtype=np.int64), self.period)
        source = self.slot_source[slot]
        return source, period_index * self.counts[source] + self.slot_rank[slot]
