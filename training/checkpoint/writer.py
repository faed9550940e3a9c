"""Checkpoint files written in the background (`train.async_save`).

DeepSpeed hands every file of a checkpoint to its checkpoint engine (`save(state_dict,
path)`). `BackgroundWriter` is such an engine. Its `save` only rebuilds the state dict's
structure around host buffers and returns; one thread copies the tensors into those
buffers (the snapshot), another writes the files. The state must not change before the
snapshot is taken: the step loop calls `wait_for_snapshot()` before the optimizer step
(forward and backward leave weights and optimizer state alone, so the copy overlaps
them). `wait` is the one place that learns whether every file was written.

Why our own engine and not DeepSpeed 0.19.8's decoupled one
(`"checkpoint": {"writer": {"decoupled": true}}`, a writer process fed through a queue):
tried on 2 CPU ranks, its saves failed under ZeRO-1/2, its checkpoints did not load and
runs hung at exit. torch's `distributed.checkpoint.async_save` writes its own format,
which DeepSpeed's loaders, the universal conversion and our export do not read. This
engine keeps DeepSpeed's files as they are, so everything that reads them stays as it is.

The threads are daemons: a process that exits (a dropped write, a kill) takes them
along without waiting; the files they leave are in the checkpoint's temp dir, which
nobody trusts (`training.checkpoint.store`).
"""

from __future__ import annotations

import copy
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
    """What the files queued since the last `wait` took: `files`, `bytes` written,
    `snapshot_wait_s` (the step loop's waits in `wait_for_snapshot`) and `write_s` (from
    the first file queued to the last written)."""

    files: int = 0
    bytes: int = 0
    snapshot_wait_s: float = 0.0
    write_s: float = 0.0
    errors: list[str] = field(default_factory=list)


@dataclass
class _File:
    """One queued file: its structure around host `buffers`, and the `sources` still to
    be copied into them (dropped once copied)."""

    path: str
    snapshot: Any
    buffers: list[Any]
    sources: list[Any]
    ready: Any = None  # CUDA: an event recorded on the training stream at save time
    device: Any = None  # CUDA: the sources' device (a thread's current device is its own)
    error: str | None = None


def _make_engine_class() -> type:
    """The engine class, built on DeepSpeed's torch engine at first use (DeepSpeed is a
    heavy import this module's readers must not pay for)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    class BackgroundWriter(TorchCheckpointEngine):
        """A DeepSpeed checkpoint engine whose `save` queues and returns; a copier thread
        snapshots, a writer thread writes, in the order saved. At most one checkpoint's
        files are pending (the checkpointer waits before it starts the next)."""

        def __init__(self, rank: int, background: bool = True) -> None:
            super().__init__(None)
            self.rank = rank
            self.background = background  # False: `save` writes before it returns
            self.name = "gptrain.BackgroundWriter"
            self._copies: queue.Queue[_File] = queue.Queue()
            self._writes: queue.Queue[_File] = queue.Queue()
            self._changed = threading.Condition()  # guards the counts and the stats
            self._to_copy = 0  # files queued, not yet in host memory
            self._to_write = 0  # files queued, not yet written (or failed)
            self._stats = WriteStats()
            self._first_queued_s: float | None = None
            # Host copies of the last checkpoint's tensors, by file name: the next save
            # copies into them (no fresh allocation, no page faults: that doubled the
            # snapshot's time). Free again once `wait` returned (at most one in flight).
            self._buffers: dict[str, list[Any]] = {}
            self._staged: set[str] = set()  # files of the checkpoint in flight
            self._threads: list[threading.Thread] = []

        # --- DeepSpeed's engine interface ----------------------------------------------

        def create(self, info: Any) -> None:  # noqa: D102 (DeepSpeed's hook; nothing to do)
            pass

        def save(self, state_dict: Any, path: str) -> None:
            """Queue `state_dict`'s snapshot and write to `path` (not `background`:
            write it now, raising on failure). Its tensors must stay unchanged until
            `wait_for_snapshot` returns."""
            if not self.background:
                self._write(state_dict, path)
                return
            self._start_threads()
            name = os.path.basename(path)
            reuse = [] if name in self._staged else self._buffers.get(name, [])
            buffers: list[Any] = []
            sources: list[Any] = []
            snapshot = _stage(state_dict, reuse, buffers, sources)
            self._buffers[name] = buffers
            self._staged.add(name)
            ready, device = _record_event(sources)
            item = _File(path, snapshot, buffers, sources, ready, device)
            with self._changed:
                self._stats.files += 1
                if self._first_queued_s is None:
                    self._first_queued_s = time.perf_counter()
                self._to_copy += 1
                self._to_write += 1
            self._copies.put(item)

        def commit(self, info: Any) -> bool:
            return True  # completion is ours to decide: `wait`, then meta.json

        def preserves_storage_sharing(self) -> bool:
            return False  # `save` copies every tensor itself; DeepSpeed need not first

        # --- ours ---------------------------------------------------------------------

        @property
        def pending(self) -> bool:
            """Whether a queued file is not written yet."""
            return self._to_write > 0

        def wait_for_snapshot(self) -> float:
            """Block until every queued file's tensors are in host memory, so the state
            may change (the optimizer step); the seconds waited (summed in the stats'
            `snapshot_wait_s`)."""
            if self._to_copy == 0:
                return 0.0
            start = time.perf_counter()
            with self._changed:
                self._changed.wait_for(lambda: self._to_copy == 0)
                waited_s = time.perf_counter() - start
                self._stats.snapshot_wait_s += waited_s
            return waited_s

        def wait(self, timeout_s: float | None = None) -> WriteStats | None:
            """Block until every queued file is written (at most `timeout_s`); the
            stats of those writes (reset for the next checkpoint), or None on timeout.
            A failed write is in `errors`, never raised here."""
            with self._changed:
                if not self._changed.wait_for(lambda: self._to_write == 0, timeout_s):
                    return None
                stats, self._stats = self._stats, WriteStats()
                self._first_queued_s = None
            self._staged.clear()
            return stats

        def _start_threads(self) -> None:
            if not self._threads:
                for target, name in ((self._copy_loop, "copier"), (self._write_loop, "writer")):
                    thread = threading.Thread(
                        target=target, name=f"gptrain-checkpoint-{name}", daemon=True
                    )
                    thread.start()
                    self._threads.append(thread)

        def _copy_loop(self) -> None:
            streams: dict[Any, Any] = {}  # a side stream per device
            while True:
                item = self._copies.get()
                try:
                    faults.slow_write(self.rank, faults.SLOW_COPY)
                    _copy(item, streams)
                except Exception as exc:  # reported by `wait`, on the step loop's thread
                    item.error = f"{item.path}: snapshot: {type(exc).__name__}: {exc}"
                item.sources = []  # the training state is free to change
                with self._changed:
                    self._to_copy -= 1
                    self._changed.notify_all()
                self._writes.put(item)

        def _write_loop(self) -> None:
            while True:
                item = self._writes.get()
                error = item.error
                if error is None:
                    try:
                        faults.slow_write(self.rank)
                        self._write(item.snapshot, item.path)
                    except Exception as exc:  # reported by `wait`
                        error = f"{item.path}: {type(exc).__name__}: {exc}"
                path = item.path
                del item
                with self._changed:
                    if error is not None:
                        self._stats.errors.append(error)
                    elif os.path.exists(path):
                        self._stats.bytes += os.path.getsize(path)
                    if self._first_queued_s is not None:
                        self._stats.write_s = time.perf_counter() - self._first_queued_s
                    self._to_write -= 1
                    self._changed.notify_all()

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


def _stage(item: Any, reuse: list[Any], buffers: list[Any], sources: list[Any]) -> Any:
    """`item` with every tensor replaced by a host buffer to copy it into: `reuse[i]`
    (the i-th tensor of the same file last time) when its shape and dtype match, else a
    new one (pinned when the tensor is on a GPU). Appends each buffer to `buffers` and
    its tensor to `sources`; copies no tensor. Lists and dicts are rebuilt; tuples keep
    their type (DeepSpeed's metadata holds torch.Size and namedtuples, which its
    consolidation reads by attribute); other objects are deep-copied now, as the state
    they hold may change before the writer pickles them (DeepSpeed's loss scaler)."""
    import torch

    if torch.is_tensor(item):
        i = len(buffers)
        buffer = reuse[i] if i < len(reuse) else None
        if buffer is None or buffer.shape != item.shape or buffer.dtype != item.dtype:
            buffer = torch.empty(item.shape, dtype=item.dtype, pin_memory=item.is_cuda)
        buffers.append(buffer)
        sources.append(item.detach())
        return buffer
    if isinstance(item, list):
        return [_stage(v, reuse, buffers, sources) for v in item]
    if isinstance(item, tuple):
        staged = [_stage(v, reuse, buffers, sources) for v in item]
        if all(a is b for a, b in zip(staged, item, strict=True)):
            return item  # no tensor inside: keep it, type and all (torch.Size, namedtuples)
        return type(item)(*staged) if hasattr(item, "_fields") else type(item)(staged)
    if isinstance(item, dict):
        return type(item)({k: _stage(v, reuse, buffers, sources) for k, v in item.items()})
    if isinstance(item, _IMMUTABLE) or item is None:
        return item
    try:  # an object the writer pickles later (DeepSpeed's loss scaler): as it is now
        return copy.deepcopy(item)
    except Exception:  # noqa: BLE001 (not copyable: pickled as it is then)
        return item


_IMMUTABLE = (int, float, complex, str, bytes, bool, range, frozenset)


def _record_event(sources: list[Any]) -> tuple[Any, Any]:
    """On a GPU: (an event on the current stream, so the copies start after the work
    that produced the state; the sources' device); (None, None) on CPU."""
    import torch

    device = next((t.device for t in sources if t.is_cuda), None)
    if device is None:
        return None, None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event, device


def _copy(item: _File, streams: dict[Any, Any]) -> None:
    """Copy `item`'s sources into its buffers; GPU tensors on a side stream of their
    device (made current here: this thread's own current device is GPU 0), waited for
    before returning."""
    import torch

    if item.ready is None:
        for buffer, source in zip(item.buffers, item.sources, strict=True):
            buffer.copy_(source)
        return
    with torch.cuda.device(item.device):
        stream = streams.get(item.device)
        if stream is None:
            stream = streams[item.device] = torch.cuda.Stream(device=item.device)
        stream.wait_event(item.ready)
        try:
            with torch.cuda.stream(stream):
                for buffer, source in zip(item.buffers, item.sources, strict=True):
                    buffer.copy_(source, non_blocking=True)
        finally:
            stream.synchronize()


_ENGINE_CLASS: type | None = None


def background_writer(rank: int, background: bool = True) -> Any:
    """A new `BackgroundWriter` for this rank (a DeepSpeed checkpoint engine; with
    `background` false it writes in `save`, fsync included, as the blocking save does,
    and starts no thread): install it with `install(ds_engine, writer)`."""
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
