"""Atomic file and directory writes: the one home of write-to-temp-then-rename.

It lives in `sharding` because that is the package every other one may import
(launcher → training → sharding); nothing here knows about data.

A reader sees the old content or the new, never a half-written file, whatever
kills the writer. Temp names carry the writer's pid, so two processes saving the
same file at once (a run and `gptrain cancel`) never share one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def atomic_write(path: Path, data: str | bytes, *, fsync: bool = True) -> None:
    """Write `data` to `path` through `.NAME.tmp-PID` in the same directory + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def publish(src: Path, dest: Path) -> None:
    """Rename the finished file or directory `src` to `dest` (same filesystem), replacing
    a file there; the one step that makes a temp dir's content visible."""
    os.replace(src, dest)


@contextlib.contextmanager
def atomic_dir(dest: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a fresh temp dir beside `dest`; on success it becomes `dest` (an old `dest`
    is removed first when `replace`), on error it is deleted and `dest` is untouched."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replace and dest.is_dir():
        shutil.rmtree(dest)
    publish(tmp, dest)
