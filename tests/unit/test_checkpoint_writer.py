"""The background checkpoint writer (`train.async_save`): what it writes is the state at
`save` time, failures come back through `wait`, and waits can time out."""

from __future__ import annotations

import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from sharding import faults
from training.checkpoint.writer import background_writer

# DeepSpeed's checkpoint metadata holds namedtuples like this (fragment_address)
address = namedtuple("address", "numel start")


def test_the_file_holds_the_state_at_save_time(tmp_path: Path) -> None:
    writer = background_writer(rank=0)
    weights = torch.arange(1000, dtype=torch.float32)
    state = {
        "module": {"w": weights},
        "step": 3,
        "moments": [weights * 2],
        "shapes": {"w": weights.shape, "slice": address(numel=10, start=0)},
        "pair": (weights, 1),
    }
    writer.save(state, str(tmp_path / "a.pt"))
    writer.wait_for_snapshot()  # as the optimizer step does before it changes the state
    weights.add_(100.0)  # training goes on while the file is written
    stats = writer.wait()
    assert stats is not None and stats.errors == [] and stats.files == 1
    assert stats.bytes == (tmp_path / "a.pt").stat().st_size > 4000
    loaded = torch.load(tmp_path / "a.pt", weights_only=False)  # as DeepSpeed loads it
    assert torch.equal(loaded["module"]["w"], torch.arange(1000, dtype=torch.float32))
    assert torch.equal(loaded["moments"][0], torch.arange(1000, dtype=torch.float32) * 2)
    assert loaded["step"] == 3 and not writer.pending
    assert isinstance(loaded["shapes"]["w"], torch.Size) and loaded["shapes"]["slice"].start == 0
    assert isinstance(loaded["pair"], tuple) and loaded["pair"][1] == 1
    # The next save of that file copies into the same host buffers (no new allocation);
    # the first file keeps its values.
    writer.save(state, str(tmp_path / "a2.pt"))
    writer.wait_for_snapshot()
    writer.wait()
    assert torch.equal(torch.load(tmp_path / "a2.pt", weights_only=False)["module"]["w"], weights)
    assert torch.equal(
        torch.load(tmp_path / "a.pt", weights_only=False)["module"]["w"], loaded["module"]["w"]
    )


def test_a_failed_write_is_reported_by_wait_not_raised(tmp_path: Path) -> None:
    writer = background_writer(rank=0)
    writer.save({"w": torch.ones(4)}, str(tmp_path / "missing" / "a.pt"))
    writer.save({"w": torch.ones(4)}, str(tmp_path / "b.pt"))
    stats = writer.wait()
    assert stats is not None and len(stats.errors) == 1 and "missing" in stats.errors[0]
    assert (tmp_path / "b.pt").is_file()  # the writer goes on after a failure
    assert writer.wait().errors == []  # stats start over after each wait


def test_wait_times_out_while_a_slow_write_is_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(faults.SLOW_WRITE, "*:1.0")
    writer = background_writer(rank=1)
    start = time.perf_counter()
    writer.save({"w": torch.ones(4)}, str(tmp_path / "a.pt"))
    assert time.perf_counter() - start < 0.5  # save returns at once
    assert writer.pending and writer.wait(timeout_s=0.1) is None
    # The snapshot does not wait for the (slow) write: the state may change long before
    # the file is written.
    writer.wait_for_snapshot()
    assert time.perf_counter() - start < 0.5 and writer.pending
    stats = writer.wait()
    assert stats is not None and stats.write_s >= 1.0 and not writer.pending


def test_a_blocking_writer_writes_in_save_and_raises(tmp_path: Path) -> None:
    writer = background_writer(rank=0, background=False)
    writer.save({"w": torch.ones(4)}, str(tmp_path / "a.pt"))
    assert (tmp_path / "a.pt").is_file() and not writer.pending  # written before return
    with pytest.raises(FileNotFoundError):
        writer.save({"w": torch.ones(4)}, str(tmp_path / "missing" / "a.pt"))
