"""Atomic checkpoints: `RUN_DIR/checkpoints/step_NNNNNN/` + `meta.json` + `latest`.

Every rank writes its DeepSpeed shard into a hidden temp directory; only when
all ranks are done does rank 0 write `meta.json` and rename the directory into
place, then update `latest`. A crash mid-save (even kill -9) leaves the
previous checkpoint untouched and `resume: auto` picks it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sharding.atomic import atomic_write, publish
from training.config import DeepSpeedConfig
from training.errors import TrainingError
from training.model_config import ModelConfig
from training.run.paths import RunDir
from training.typed import from_data

DS_TAG = "ds"  # DeepSpeed's tag inside each step directory
UNIVERSAL_TAG = "ds_universal"  # the same checkpoint in DeepSpeed's universal format
_Section = TypeVar("_Section")
_STEP_RE = re.compile(r"^step_(\d{6,})$")
LATEST = "latest"  # a file beside the step dirs naming the newest complete one
BEST = "best"  # … naming the one of the best eval loss


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def rng_file(step_dir: Path, rank: int) -> Path:
    """Rank `rank`'s RNG state inside a checkpoint."""
    return step_dir / f"rng_rank{rank}.pt"


def is_complete(path: Path) -> bool:
    """A checkpoint is complete once its meta.json exists (written last)."""
    return (path / "meta.json").is_file()


# meta.json's layout; bump it when a field changes meaning, and teach `from_dict` the old one.
META_FORMAT = 1


@dataclass
class TrainState:
    """Where training stands besides weights and optimizer, to continue exactly."""

    step: int = 0
    tokens: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0


@dataclass
class CheckpointMeta:
    """What a checkpoint's `meta.json` holds besides DeepSpeed's files: where training
    stands (to continue exactly), what model and data it belongs to (to refuse a
    mismatched resume), and the size of every file (to verify before trusting it)."""

    state: TrainState
    loader: dict[str, Any]  # sharding loader position (epoch, consumed)
    world_size: int
    config: dict[str, Any]  # the resolved config tree of the run
    tokenizer_sha256: str
    model: dict[str, Any]  # training.models.build.model_fingerprint
    hf_config: dict[str, Any]
    saved_at: float
    health: dict[str, Any] = field(default_factory=dict)  # training.observe.health.StepHealth state
    files: dict[str, int] = field(default_factory=dict)  # relative path → bytes
    format: int = META_FORMAT

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path | str = "meta.json") -> CheckpointMeta:
        """Parse meta.json; one line naming the file when it is of another format."""
        version = data.get("format", 1)  # checkpoints before the field existed are format 1
        if version != META_FORMAT:
            raise TrainingError(
                f"{source}: checkpoint meta format {version}; this gptrain "
                f"reads format {META_FORMAT} — use the gptrain that wrote it"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise TrainingError(f"{source}: not a gptrain checkpoint meta (missing {missing})")
        fields = {k: v for k, v in data.items() if k in names}
        try:
            fields["state"] = from_data(TrainState, data["state"], "state")
        except ValueError as exc:
            raise TrainingError(f"{source}: {exc}") from None
        return cls(**fields)

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def model_config(self) -> ModelConfig:
        """The run's `model` section, typed (keys newer than the checkpoint: defaults)."""
        return self._section(ModelConfig, "model")

    @property
    def deepspeed_config(self) -> DeepSpeedConfig:
        """The run's `deepspeed` section, typed."""
        return self._section(DeepSpeedConfig, "deepspeed")

    def _section(self, cls: type[_Section], name: str) -> _Section:
        try:
            return from_data(cls, self.config.get(name, {}), name)
        except ValueError as exc:
            raise TrainingError(f"checkpoint config: {exc}") from None

    @property
    def tokens(self) -> int:
        return self.state.tokens

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def read_meta(path: Path) -> CheckpointMeta:
    """The meta of the checkpoint directory `path`."""
    source = path / "meta.json"
    return CheckpointMeta.from_dict(json.loads(source.read_text()), source)


def point_latest(step_dir: Path) -> None:
    """Make the `latest` pointer beside `step_dir` name it."""
    atomic_write(step_dir.parent / LATEST, step_dir.name)


def mark_best(step_dir: Path) -> None:
    """Make the `best` pointer beside `step_dir` name it (kept by `prune`)."""
    atomic_write(step_dir.parent / BEST, step_dir.name)


def best_name(root: Path) -> str | None:
    """The name of the checkpoint `best` points to, None when there is none."""
    pointer = root / BEST
    return pointer.read_text().strip() if pointer.is_file() else None


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_RE.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` names if complete, else the newest complete one."""
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if is_complete(candidate):
            return candidate
    found = list_checkpoints(root)
    return found[-1] if found else None


def file_sizes(directory: Path) -> dict[str, int]:
    """Size of every file under `directory` (relative paths), recorded in meta.json."""
    return {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def verify(step_dir: Path) -> str | None:
    """Why the checkpoint cannot be trusted, or None: every file meta.json lists is
    there with its size, and each DeepSpeed `.pt` file's zip directory reads. Cheap (no
    tensor is read); a checkpoint of an older version has no file list and gets only the
    zip check."""
    try:
        meta = read_meta(step_dir)
    except (OSError, ValueError) as exc:
        return f"meta.json unreadable ({exc})"
    except TrainingError as exc:
        return str(exc)
    for name, size in meta.files.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} of {size} bytes"
    for path in sorted((step_dir / DS_TAG).glob("*.pt")):
        try:
            with zipfile.ZipFile(path):
                pass
        except (zipfile.BadZipFile, OSError) as exc:
            return f"{path.relative_to(step_dir)} is not readable ({exc})"
    return None


def _newest_first(root: Path) -> list[Path]:
    found = list_checkpoints(root)[::-1]
    pointed = latest_checkpoint(root)
    if pointed in found:  # `latest` first, as before verification existed
        found.remove(pointed)
        found.insert(0, pointed)
    return found


def damaged(root: Path, newer_than: Path | None) -> list[tuple[Path, str]]:
    """(checkpoint, why) for every complete checkpoint after `newer_than` that fails
    `verify`: what `resume: auto` skipped."""
    start = -1 if newer_than is None else step_of(newer_than)
    found = [(p, verify(p)) for p in list_checkpoints(root) if step_of(p) > start]
    return [(p, why) for p, why in found if why is not None]


def step_of(step_dir: Path) -> int:
    match = _STEP_RE.match(step_dir.name)
    return int(match.group(1)) if match else -1


def quarantine(path: Path) -> Path:
    """Rename a damaged checkpoint out of the way (`step_N.damaged`), so this run's own
    save of that step is written, and it is never counted again."""
    dest = path.with_name(f"{path.name}.damaged")
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}.damaged-{n}")
    path.rename(dest)
    return dest


def find_resume(root: Path, resume: str) -> Path | None:
    """`train.resume`: auto → newest complete checkpoint that verifies (or None);
    never/overwrite → None; else a path (which must verify)."""
    if resume in ("never", "overwrite"):
        return None
    if resume == "auto":
        tried = []
        for path in _newest_first(root):
            why = verify(path)
            if why is None:
                return path
            tried.append(f"{path.name}: {why}")
        if tried:
            raise TrainingError(
                f"train.resume: auto, but no checkpoint under {root} is intact "
                f"({'; '.join(tried)}); use --set train.resume=overwrite to start over"
            )
        return None
    path = Path(resume)
    checkpoints = RunDir(path).checkpoints
    if path.is_dir() and not is_complete(path) and checkpoints.is_dir():
        path = latest_checkpoint(checkpoints) or path  # a run dir was given
    if not is_complete(path):
        raise TrainingError(
            f"train.resume: {resume} is not a complete checkpoint (no meta.json); "
            "use auto, never or a checkpoints/step_NNNNNN directory"
        )
    why = verify(path)
    if why is not None:
        raise TrainingError(f"train.resume: {path} is damaged ({why}); choose another checkpoint")
    return path


def find_step(root: Path, step: int | None) -> Path:
    """The checkpoint for `step` (None = latest) under `root`, or a TrainingError."""
    if step is None:
        found = latest_checkpoint(root)
        if found is None:
            raise TrainingError(f"{root}: no complete checkpoint found")
        return found
    path = root / step_dir_name(step)
    if not is_complete(path):
        raise TrainingError(f"{path}: no complete checkpoint for step {step} (have: {_have(root)})")
    return path


def _have(root: Path) -> str:
    return ", ".join(str(step_of(p)) for p in list_checkpoints(root)) or "none"


def damaged_error(step_dir: Path, why: str) -> TrainingError:
    """The one line for a checkpoint that export, generate or evaluate cannot read."""
    return TrainingError(
        f"{step_dir}: checkpoint of step {step_of(step_dir)} is damaged ({why}); choose "
        f"another with --step (have: {_have(step_dir.parent)})"
    )


TMP_PREFIX = ".tmp_"  # a checkpoint being written: `.tmp_step_NNNNNN`, never trusted


def temp_dirs(root: Path) -> list[Path]:
    """Temp dirs of checkpoints being written, or left by a save that was interrupted."""
    return sorted(root.glob(f"{TMP_PREFIX}step_*")) if root.is_dir() else []


def begin_save(root: Path, step: int, *, rank: int, barrier: Callable[[], None]) -> Path:
    """Collective: the temp dir every rank writes its files of checkpoint `step` into
    (rank 0 makes it, removing the temp dirs of interrupted saves)."""
    tmp = root / f"{TMP_PREFIX}{step_dir_name(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in temp_dirs(root):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    return tmp


def publish_checkpoint(
    tmp: Path, meta: CheckpointMeta, *, keep_last: int, protect: tuple[str, ...] = ()
) -> Path:
    """Rank 0, once every rank's files are in `tmp`: `meta.json` (listing every file's
    size, what `verify` checks) written last, the rename into place, `latest`, then
    pruning to `keep_last` (never a protected name, nor this one). Returns the step dir."""
    final = tmp.with_name(tmp.name.removeprefix(TMP_PREFIX))
    meta = dataclasses.replace(meta, files=file_sizes(tmp))
    atomic_write(tmp / "meta.json", meta.to_json())
    if final.exists():  # an incomplete leftover of the same step
        shutil.rmtree(final)
    publish(tmp, final)
    point_latest(final)
    prune(final.parent, keep_last, protect=(*protect, final.name))
    return final


def partitioned(step_dir: Path) -> bool:
    """Whether the optimizer state is split by rank (ZeRO, or the bf16 optimizer), so
    another world size needs the universal form; plain stage 0 fp32 loads as it is."""
    return any((step_dir / DS_TAG).glob("*optim_states.pt"))


def convert_to_universal(step_dir: Path) -> None:
    """Write `step_dir/ds_universal`: the DeepSpeed checkpoint as DeepSpeed's universal
    checkpoint (fp32 weights and Adam moments per parameter, whole), which any world
    size loads. Written to a temp dir and renamed; a no-op when it exists already.
    In this process (no worker pool): it runs on a rank that holds CUDA and NCCL
    state, which forked workers must not inherit."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = step_dir / UNIVERSAL_TAG
    if out.is_dir():
        return
    for stale in step_dir.glob(f".{UNIVERSAL_TAG}.tmp-*"):  # of a conversion that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = step_dir / f".{UNIVERSAL_TAG}.tmp-{os.getpid()}"
    args = argparse.Namespace(
        input_folder=str(step_dir / DS_TAG),
        output_folder=str(tmp),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # our checkpoints carry no Megatron-style layout info
    )
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its step-by-step prints
            ds_to_universal(args)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        (step_dir / "latest_universal").unlink(missing_ok=True)  # it names the temp dir


PRUNED_PREFIX = ".pruned_"  # a checkpoint being deleted (renamed first: never half-trusted)


def prune(root: Path, keep_last: int, protect: tuple[str, ...] = ()) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (never a protected one).
    Each is renamed out of the way at once and deleted by a background thread (deleting
    many GB takes seconds the step loop need not wait for); a deletion cut short by an
    exit is finished by the next prune. Returns the checkpoints' former paths."""
    found = list_checkpoints(root)
    doomed = [p for p in found[:-keep_last] if p.name not in protect] if keep_last else []
    renamed = [p.rename(p.with_name(f"{PRUNED_PREFIX}{p.name}")) for p in doomed]
    leftovers = [p for p in root.glob(f"{PRUNED_PREFIX}*") if p not in renamed]
    for path in [*leftovers, *renamed]:
        threading.Thread(target=shutil.rmtree, args=(path, True), daemon=True).start()
    return doomed
