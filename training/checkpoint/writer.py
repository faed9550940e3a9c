"""Checkpoint files written in the background (`train.async_save`).

DeepSpeed hands every file of a checkpoint to its checkpoint engine (`save(state_dict,
path)`). `BackgroundWriter` is such an engine: `save` copies the state dict's tensors
to host memory (the snapshot; the step loop waits for this only) and queues the
`torch.save` for one writer thread, so training goes on while the files are written.
`wait` is the one place that learns whether they all were.

Why our own engine and not DeepSpeed 0.19.8's decoupled one
(`"checkpoint": {"writer": {"decoupled": true}}`, a writer process fed through a queue):
tried on 2 CPU ranks, its saves failed under ZeRO-1/2, its checkpoints did not load and
runs hung at exit. torch's `distributed.checkpoint.async_save` writes its own format,
which DeepSpeed's loaders, the universal conversion and our export do not read. This
engine keeps DeepSpeed's files as they are, so everything that reads them stays as it is.

The thread is a daemon: a process that exits (a dropped write, a kill) takes it along
without waiting; the files it leaves are in the checkpoint's temp dir, which nobody
trusts (`training.checkpoint.store`).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sharding import faults

log = logging.getLogger("gptrain")


@dataclass
class WriteStats:
    """What the writes queued since the last `wait` took: `files`, `bytes` written,
    `snapshot_s` (the step loop's share: copying to host memory) and `write_s` (the
    writer thread's time, from the first file queued to the last written)."""

    files: int = 0
    bytes: int = 0
    snapshot_s: float = 0.0
    write_s: float = 0.0
    errors: list[str] = field(default_factory=list)


def _make_engine_class() -> type:
    """The engine class, built on DeepSpeed's torch engine at first use (DeepSpeed is a
    heavy import this module's readers must not pay for)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    class BackgroundWriter(TorchCheckpointEngine):
        """A DeepSpeed checkpoint engine whose `save` snapshots and returns; one daemon
        thread writes, in the order saved. At most one checkpoint's files are pending
        (the checkpointer waits before it starts the next)."""

        def __init__(self, rank: int, background: bool = True) -> None:
            super().__init__(None)
            self.rank = rank
            self.background = background  # False: `save` writes before it returns
            self.name = "gptrain.BackgroundWriter"
            self._queue: queue.Queue[tuple[Any, str] | None] = queue.Queue()
            self._idle = threading.Event()
            self._idle.set()
            self._lock = threading.Lock()
            self._stats = WriteStats()
            self._first_queued_s: float | None = None
            # Host copies of the last checkpoint's tensors, by file name: the next save
            # copies into them (no fresh allocation, no page faults: that doubled the
            # snapshot's time). Free again once `wait` returned (at most one in flight).
            self._buffers: dict[str, list[Any]] = {}
            self._staged: set[str] = set()  # files of the checkpoint in flight
            self._thread = threading.Thread(
                target=self._run, name="gptrain-checkpoint-writer", daemon=True
            )
            self._thread.start()

        # --- DeepSpeed's engine interface ----------------------------------------------

        def create(self, info: Any) -> None:  # noqa: D102 (DeepSpeed's hook; nothing to do)
            pass

        def save(self, state_dict: Any, path: str) -> None:
            """Snapshot `state_dict` to host memory and queue its write to `path` (not
            `background`: write it now, raising on failure)."""
            if not self.background:
                self._write(state_dict, path)
                return
            start = time.perf_counter()
            name = os.path.basename(path)
            reuse = [] if name in self._staged else self._buffers.get(name, [])
            tensors: list[Any] = []
            snapshot = _stage(state_dict, reuse, tensors)
            _synchronize(tensors)
            self._buffers[name] = tensors
            self._staged.add(name)
            with self._lock:
                self._stats.snapshot_s += time.perf_counter() - start
                self._stats.files += 1
                if self._first_queued_s is None:
                    self._first_queued_s = time.perf_counter()
                self._idle.clear()
                self._queue.put((snapshot, path))

        def commit(self, info: Any) -> bool:
            return True  # completion is ours to decide: `wait`, then meta.json

        def preserves_storage_sharing(self) -> bool:
            return False  # `save` copies every tensor itself; DeepSpeed need not first

        # --- ours ---------------------------------------------------------------------

        @property
        def pending(self) -> bool:
            """Whether a queued file is not written yet."""
            return not self._idle.is_set()

        def wait(self, timeout_s: float | None = None) -> WriteStats | None:
            """Block until every queued file is written (at most `timeout_s`); the
            stats of those writes (reset for the next checkpoint), or None on timeout.
            A failed write is in `errors`, never raised here."""
            if not self._idle.wait(timeout_s):
                return None
            with self._lock:
                stats, self._stats = self._stats, WriteStats()
                self._first_queued_s = None
            self._staged.clear()
            return stats

        def _run(self) -> None:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                snapshot, path = item
                error = None
                try:
                    faults.slow_write(self.rank)
                    self._write(snapshot, path)
                except Exception as exc:  # reported by `wait`, on the step loop's thread
                    error = f"{path}: {type(exc).__name__}: {exc}"
                del snapshot, item
                with self._lock:
                    if error is not None:
                        self._stats.errors.append(error)
                    elif os.path.exists(path):
                        self._stats.bytes += os.path.getsize(path)
                    if self._first_queued_s is not None:
                        self._stats.write_s = time.perf_counter() - self._first_queued_s
                    if self._queue.empty():
                        self._idle.set()

        def _write(self, snapshot: Any, path: str) -> None:
            """torch.save, then fsync: meta.json (written after every rank's files) must
            never vouch for data still in the page cache when a node goes down."""
            import torch

            torch.save(snapshot, path, _use_new_zipfile_serialization=self.zipfile_serialization)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    return BackgroundWriter


def _stage(item: Any, reuse: list[Any], out: list[Any]) -> Any:
    """`item` with every tensor copied to host memory: into `reuse[i]` (the i-th tensor
    of the same file last time) when its shape and dtype match, else a new buffer
    (pinned when the tensor is on a GPU); each buffer is appended to `out`. Lists and
    dicts are rebuilt; tuples keep their type (DeepSpeed's metadata holds torch.Size and
    namedtuples, which its consolidation reads by attribute)."""
    import torch

    if torch.is_tensor(item):
        i = len(out)
        buffer = reuse[i] if i < len(reuse) else None
        if buffer is None or buffer.shape != item.shape or buffer.dtype != item.dtype:
            buffer = torch.empty(item.shape, dtype=item.dtype, pin_memory=item.is_cuda)
        buffer.copy_(item.detach(), non_blocking=item.is_cuda)
        out.append(buffer)
        return buffer
    if isinstance(item, list):
        return [_stage(v, reuse, out) for v in item]
    if isinstance(item, tuple):
        staged = [_stage(v, reuse, out) for v in item]
        if all(a is b for a, b in zip(staged, item, strict=True)):
            return item  # no tensor inside: keep it, type and all (torch.Size, namedtuples)
        return type(item)(*staged) if hasattr(item, "_fields") else type(item)(staged)
    if isinstance(item, dict):
        return type(item)({k: _stage(v, reuse, out) for k, v in item.items()})
    return item


def _synchronize(tensors: list[Any]) -> None:
    """Wait for the device-to-host copies `_stage` queued (pinned buffers copy async)."""
    import torch

    if tensors and torch.cuda.is_available() and any(t.is_pinned() for t in tensors):
        torch.cuda.synchronize()


_ENGINE_CLASS: type | None = None


def background_writer(rank: int, background: bool = True) -> Any:
    """A new `BackgroundWriter` for this rank (a DeepSpeed checkpoint engine; with
    `background` false it writes in `save`, fsync included, as the blocking save does):
    install it with `install(ds_engine, writer)`."""
    global _ENGINE_CLASS
    if _ENGINE_CLASS is None:
        _ENGINE_CLASS = _make_engine_class()
    return _ENGINE_CLASS(rank, background)


def install(ds_engine: Any, writer: Any) -> None:
    """Make `ds_engine.save_checkpoint` write through `writer`, in the serialization the
    engine's own writer was configured with (loads are unchanged: the files are
    DeepSpeed's own)."""
    writer.zipfile_serialization = getattr(
        ds_engine.checkpoint_engine, "zipfile_serialization", True
    )
    ds_engine.checkpoint_engine = writer
