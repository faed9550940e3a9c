"""Pure arithmetic of the sample stream: rank positions, permutations, mixtures."""

from __future__ import annotations

import numpy as np
import pytest

from sharding.partition import (
    Mixture,
    batch_positions,
    epoch_permutation,
    mixture_counts,
    num_samples,
    sample_positions,
)


def test_num_samples_needs_one_extra_token() -> None:
    assert num_samples(17, 16) == 1
    assert num_samples(16, 16) == 0
    assert num_samples(33, 16) == 2
    assert num_samples(0, 16) == 0


def test_sample_positions_interleave_ranks() -> None:
    assert sample_positions(10, 0, 3, 3) == [10, 13, 16]
    assert sample_positions(10, 2, 3, 3) == [12, 15, 18]


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_lockstep_batches_tile_the_stream(world: int) -> None:
    batch, start, steps = 3, 7, 5
    seen = np.concatenate(
        [batch_positions(start, r, world, batch, b) for b in range(steps) for r in range(world)]
    )
    assert sorted(seen.tolist()) == list(range(start, start + steps * world * batch))


def test_batch_positions_match_sample_positions() -> None:
    flat = np.concatenate([batch_positions(5, 1, 4, 3, b) for b in range(3)])
    assert flat.tolist() == sample_positions(5, 1, 4, 9)


def test_k_micro_batches_are_one_block_of_k_times_b() -> None:
    block = batch_positions(11, 2, 3, 4 * 5, 1).reshape(5, 4)
    singles = [batch_positions(11, 2, 3, 4, 5 + k) for k in range(5)]
    assert np.array_equal(block, np.stack(singles))


def test_epoch_permutation_is_seeded_and_differs_by_epoch() -> None:
    a = epoch_permutation(3, 0, 100)
    assert np.array_equal(a, epoch_permutation(3, 0, 100))
    assert sorted(a.tolist()) == list(range(100))
    assert not np.array_equal(a, epoch_permutation(3, 1, 100))
    assert not np.array_equal(a, epoch_permutation(4, 0, 100))
    assert not np.array_equal(a, epoch_permutation(3, 0, 100, source=1))


def test_mixture_counts_sum_to_period_and_follow_weights() -> None:
    assert mixture_counts([1.0], 1000) == [1000]
    assert mixture_counts([3, 1], 1000) == [750, 250]
    counts = mixture_counts([1, 1, 1], 1000)
    assert sum(counts) == 1000 and max(counts) - min(counts) <= 1
    assert min(mixture_counts([1e-9, 1.0], 1000)) == 1  # a tiny weight keeps one slot
    with pytest.raises(ValueError):
        mixture_counts([1.0, 0.0], 1000)


def test_single_source_mixture_is_identity() -> None:
    pos = np.arange(0, 5000, 7)
    source, index = Mixture([2.5], seed=9).locate(pos)
    assert (source == 0).all() and np.array_equal(index, pos)


def test_mixture_gives_each_source_its_own_gapless_stream() -> None:
    mix = Mixture([0.5, 0.3, 0.2], seed=1, period=100)
    source, index = mix.locate(np.arange(1000))
    for s, share in enumerate([0.5, 0.3, 0.2]):
        own = index[source == s]
        assert own.tolist() == list(range(len(own)))  # in order, no gap, no repeat
        assert len(own) == share * 1000
    # Seeded: the same seed gives the same slot order, another seed another one.
    assert np.array_equal(mix.locate(np.arange(100))[0], Mixture([5, 3, 2], 1, 100).slot_source)
    assert not np.array_equal(mix.slot_source, Mixture([5, 3, 2], 2, 100).slot_source)
