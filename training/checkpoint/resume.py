"""Resume: check a run's checkpoint against the config, then restore it into an engine.

`preflight` runs before any process group or model exists (every refusal leaves the
run dir as it was); `restore` runs once the DeepSpeed engine is built, and
`load_checkpoint` also serves the bad-step rollback (`training.loop.guard`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.checkpoint import store as ckpt
from training.checkpoint.store import CheckpointMeta
from training.config import BatchLayout, TrainJob
from training.errors import TrainingError, first_line
from training.models.build import (
    check_attention,
    check_tokenizer,
    fingerprint_diff,
    load_hf_config,
    model_fingerprint,
)
from training.parallel.dist import DistEnv
from training.parallel.ds_config import build_deepspeed_config, cuda_available
from training.parallel.ds_repairs import (
    has_universal_load_slips,
    param_group_settings,
    repair_universal_load,
)
from training.parallel.sequence import check_heads
from training.run import rundir
from training.run.paths import RunDir
from training.run.rundir import JobContext

if TYPE_CHECKING:  # for annotations only
    from transformers import PretrainedConfig

    from sharding.manifest import Manifest

CONVERT_TIMEOUT_S = 4 * 3600  # rank 0 converting a checkpoint for another world size
log = logging.getLogger("gptrain")


@dataclass
class Resume:
    """The checkpoint a run continues from, and its meta."""

    path: Path
    meta: CheckpointMeta


@dataclass
class Preflight:
    """What can be checked before any process group or model exists."""

    manifest: Manifest  # of the first source
    hf_config: PretrainedConfig
    ds_config: dict[str, Any]
    fingerprint: dict[str, Any]
    resume: Resume | None  # None: a fresh start

    @property
    def resume_from(self) -> Path | None:
        return self.resume.path if self.resume else None

    @property
    def meta(self) -> CheckpointMeta | None:
        return self.resume.meta if self.resume else None


def check_sequence_parallel(sp: int, seq_len: int, hf_config: Any) -> None:
    """What sequence parallelism over `sp` ranks (`deepspeed.sequence_parallel_size`)
    needs of the window (`data.seq_len`) and the model's attention heads (one line if
    not)."""
    if sp == 1:
        return
    if seq_len % sp:
        raise TrainingError(
            f"deepspeed.sequence_parallel_size: {sp} does not divide data.seq_len "
            f"{seq_len} (each rank holds seq_len / {sp} tokens of a window)"
        )
    try:
        check_heads(hf_config, sp)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None


def preflight(job: TrainJob, layout: BatchLayout, context: JobContext | None = None) -> Preflight:
    """Check data, model, batch and checkpoint against each other; a TrainingError (or the
    data's DataError) naming the key if wrong."""
    from sharding.loader import load_manifests

    manifest = load_manifests(job.data)[0]  # each named, its tokenizer there (the run copies it)
    hf_config = load_hf_config(
        job.model,
        vocab_size=manifest.vocab_size,
        eos_id=manifest.eos_id,
        seq_len=job.data.seq_len,
    )
    check_tokenizer(job.model, manifest.tokenizer_dir)
    check_attention(job.model, cuda=cuda_available())
    check_sequence_parallel(job.deepspeed.sequence_parallel_size, job.data.seq_len, hf_config)
    try:
        ds_config = build_deepspeed_config(job.deepspeed, job.train, layout)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    fingerprint = model_fingerprint(hf_config)
    context = context or JobContext.from_env()
    run_dir = Path(job.run.dir)
    # before reading what a live run is writing
    rundir.check_free(run_dir, context.token, context.job_active)
    rundir.check_fresh(run_dir, job.train.resume)
    resume_from = ckpt.find_resume(RunDir(run_dir).checkpoints, job.train.resume)
    meta = ckpt.read_meta(resume_from) if resume_from else None
    diff = fingerprint_diff(meta.model, fingerprint) if meta is not None else {}
    if diff:
        raise TrainingError(
            f"train.resume: {resume_from} is from a different model "
            f"(checkpoint vs config: {diff}); use another run.dir, or --set "
            "train.resume=overwrite to move the old run to RUN_DIR/archive/ first"
        )
    if meta is not None and meta.tokenizer_sha256 != manifest.tokenizer_sha256:
        raise TrainingError(
            f"train.resume: {resume_from} was trained on shards of another tokenizer than "
            f"{job.data.sources[0].path}; resume with the same data, use another run.dir, or "
            "--set train.resume=overwrite"
        )
    rundir.acquire(run_dir, context)  # every rank: the same token, the first one writes it
    resume = Resume(resume_from, meta) if resume_from is not None and meta is not None else None
    return Preflight(manifest, hf_config, ds_config, fingerprint, resume)


def load_tag(job: TrainJob, pre: Preflight, env: DistEnv) -> tuple[str | None, dict[str, Any]]:
    """(what to load of the resume checkpoint, the DeepSpeed config to build with).

    The tag is `ds`, or `ds_universal` when the checkpoint was saved on another world
    size (ZeRO's partitions no longer fit, so DeepSpeed's universal form is loaded),
    or None: weights only (`train.resume_optimizer: false`, or no universal form)."""
    if pre.resume is None or not job.train.resume_optimizer:
        return None, pre.ds_config
    if pre.resume.meta.world_size == env.world_size:
        return ckpt.DS_TAG, pre.ds_config
    tag = elastic_tag(pre.resume.path, env)
    if tag == ckpt.UNIVERSAL_TAG:
        return tag, {**pre.ds_config, "checkpoint": {"load_universal": True}}
    return tag, pre.ds_config


def restore(engine: Any, pre: Preflight, env: DistEnv, tag: str | None, *, lora: bool) -> None:
    """Load the resume checkpoint's DeepSpeed state (`tag`; None: the weights were loaded
    into the model before the engine was built) and this rank's RNG state."""
    if pre.resume is None:
        return
    path, meta = pre.resume.path, pre.resume.meta
    elastic = meta.world_size != env.world_size
    if tag is not None:
        load_checkpoint(engine, path, tag, lora=lora)
        if not elastic:
            restore_rng(ckpt.rng_file(path, env.rank))
    if elastic or tag is None:
        restored = "weights and optimizer state" if tag else "weights (Adam moments restart)"
        log.warning(
            "resuming %s (saved on %d ranks) on %d ranks: %s restored; data continues at"
            " the next unseen sample",
            path,
            meta.world_size,
            env.world_size,
            restored,
        )


def load_checkpoint(engine: Any, step_dir: Path, tag: str, *, lora: bool) -> None:
    """Load DeepSpeed state `step_dir/tag` into `engine` (a LoRA checkpoint holds the
    adapters only; the base came from model.name_or_path).

    After a universal load on a DeepSpeed with the known slips of its ZeRO-3
    universal loader (`training.parallel.ds_repairs`), put back each param group's settings
    from our config and give each Adam state its own step. (For ZeRO-1/2 this
    changes nothing.)
    """
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    settings = param_group_settings(inner)
    try:
        load_path, _ = engine.load_checkpoint(str(step_dir), tag=tag, load_module_strict=not lora)
    except (RuntimeError, OSError, EOFError, ValueError) as exc:  # a file that does not load
        raise TrainingError(
            f"{step_dir}: checkpoint does not load ({first_line(exc)}); resume from another with "
            "--set train.resume=RUN_DIR/checkpoints/step_NNNNNN"
        ) from None
    if load_path is None:
        raise TrainingError(f"{step_dir}: DeepSpeed found no checkpoint under {tag}/")
    if tag == ckpt.UNIVERSAL_TAG and has_universal_load_slips():
        repair_universal_load(inner, settings)


def elastic_tag(step_dir: Path, env: DistEnv) -> str | None:
    """What every rank loads of `step_dir`, saved on another world size: `ds` when its
    optimizer state is not split by rank; else `ds_universal`, which rank 0 writes
    first (once per checkpoint); None (the weights only) when that failed or some
    rank cannot see it. Talks over a gloo group whose timeout allows the conversion
    of a large checkpoint (the default group's is minutes)."""
    import datetime

    import torch
    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=CONVERT_TIMEOUT_S))
    answer: list[Any] = [(ckpt.DS_TAG, "")]
    if env.rank == 0 and ckpt.partitioned(step_dir):
        try:
            ckpt.convert_to_universal(step_dir)
            answer = [(ckpt.UNIVERSAL_TAG, "")]
        except Exception as exc:  # noqa: BLE001 - any failure degrades to weights-only
            answer = [(None, f"no universal checkpoint ({type(exc).__name__}: {exc})")]
    dist.broadcast_object_list(answer, src=0, group=group)
    tag, why = answer[0]
    if tag is not None:
        seen = torch.tensor([int((step_dir / tag).is_dir())])
        dist.all_reduce(seen, op=dist.ReduceOp.MIN, group=group)
        if not seen.item():
            tag, why = None, f"{tag}/ is not visible on every rank (a node-local directory?)"
    dist.destroy_process_group(group)
    if why:
        log.warning("%s: %s", step_dir, why)
    return tag


def save_rng(path: Path) -> None:
    """This process's torch, Python and NumPy RNG state (one file per rank)."""
    import numpy as np
    import torch

    rng = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    torch.save(rng, path)


def restore_rng(path: Path) -> None:
    """The RNG state `save_rng` wrote, if this rank has one (a new rank has none)."""
    import numpy as np
    import torch

    if not path.is_file():
        return
    rng = torch.load(path, weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
