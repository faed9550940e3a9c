"""The DeepSpeed side of training: engine, data, one optimizer step, eval, save.

Loss is the mean over every real target token of the *global* batch (all
micro-batches of all ranks), not a mean of per-micro-batch means, so it is
the same however the batch is split into ranks × accumulation steps.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharding.errors import DataError
from training import checkpoint as ckpt
from training import faults, rundir
from training.config import BatchLayout, TrainJob
from training.consolidate import load_weights_into
from training.dist import DistEnv
from training.ds_config import build_deepspeed_config, cuda_available
from training.ds_repairs import (
    has_universal_load_slips,
    param_group_settings,
    repair_universal_load,
)
from training.errors import EXIT_REQUEUE, TrainingError
from training.events import Events
from training.finetune import is_lora, param_counts
from training.health import Heartbeat, StepHealth, Watchdog, guarded_adamw
from training.loss import target_count
from training.model import (
    build_model,
    check_tokenizer,
    compile_engine,
    load_hf_config,
    model_fingerprint,
    param_groups,
)
from training.schedule import lr_at, total_steps_for
from training.tracking import Tracker

CONVERT_TIMEOUT_S = 4 * 3600  # rank 0 converting a checkpoint for another world size
log = logging.getLogger("gptrain")


@dataclass
class Preflight:
    """What can be checked before any process group or model exists."""

    manifest: Any
    hf_config: Any
    ds_config: dict[str, Any]
    fingerprint: dict[str, Any]
    resume_from: Path | None
    meta: dict[str, Any] | None


def preflight(job: TrainJob, layout: BatchLayout) -> Preflight:
    """Check data, model, batch and checkpoint against each other; TrainingError if wrong."""
    from sharding.manifest import load_manifest

    if not job.data.sources:
        raise TrainingError("data.sources: empty; point it at a `gptrain prepare` output dir")
    manifest = load_manifest(job.data.sources[0].path)
    hf_config = load_hf_config(
        job.model, vocab_size=manifest.vocab_size, eos_id=manifest.eos_id,
        seq_len=job.data.seq_len,
    )  # fmt: skip
    check_tokenizer(job.model, manifest.tokenizer_dir)
    try:
        ds_config = build_deepspeed_config(job.deepspeed, job.train, layout)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    fingerprint = model_fingerprint(hf_config)
    run_dir, token = Path(job.run.dir), rundir.owner_token(os.environ)
    rundir.check_free(run_dir, token)  # before reading what a live run is writing
    rundir.check_fresh(run_dir, job.train.resume)
    resume_from = ckpt.find_resume(run_dir / "checkpoints", job.train.resume)
    meta = ckpt.read_meta(resume_from) if resume_from else None
    if meta is not None and meta["model"] != fingerprint:
        diff = {k: (meta["model"].get(k), v) for k, v in fingerprint.items()
                if meta["model"].get(k) != v}  # fmt: skip
        raise TrainingError(
            f"train.resume: {resume_from} is from a different model "
            f"(checkpoint vs config: {diff}); use another run.dir, or --set "
            "train.resume=overwrite to move the old run to RUN_DIR/archive/ first"
        )
    if meta is not None and meta["tokenizer_sha256"] != manifest.tokenizer_sha256:
        raise TrainingError(
            f"train.resume: {resume_from} was trained on shards of another tokenizer than "
            f"{job.data.sources[0].path}; resume with the same data, use another run.dir, or "
            "--set train.resume=overwrite"
        )
    rundir.acquire(run_dir, token)  # every rank: the same token, the first one writes it
    return Preflight(manifest, hf_config, ds_config, fingerprint, resume_from, meta)


@dataclass
class StepRunner:
    job: TrainJob
    env: DistEnv
    layout: BatchLayout
    engine: Any
    optimizer: Any
    keepalive: Any  # HfDeepSpeedConfig under ZeRO-3; must outlive the engine
    loader: Any
    train_iter: Any
    pre: Preflight
    total_steps: int
    metrics: Any
    has_val: bool
    # Small host-side collectives (token counts, the stop agreement) go over gloo on CPU
    # tensors: an NCCL collective read back with .item() would wait for the GPU to drain.
    control_group: Any = None  # None: the default group is gloo already
    health: StepHealth = field(default_factory=lambda: StepHealth(3))
    heartbeat: Heartbeat | None = None
    watchdog: Watchdog | None = None
    events: Events | None = None
    val_loader: Any = field(default=None, init=False, repr=False)

    # --- setup -----------------------------------------------------------------------------

    @classmethod
    def setup(cls, job: TrainJob, env: DistEnv, layout: BatchLayout, pre: Preflight) -> StepRunner:
        """Build model, optimizer and DeepSpeed engine (restoring a checkpoint), and data."""
        import deepspeed
        import torch
        import torch.distributed as dist

        from sharding.loader import build_loader

        meta, resume_from = pre.meta, pre.resume_from
        run_dir = Path(job.run.dir)
        ds_config = pre.ds_config
        tag = ckpt.DS_TAG if job.train.resume_optimizer else None  # None: weights only
        # Saved on another world size: ZeRO's partitions no longer fit, so restore from
        # DeepSpeed's universal form of the checkpoint (weights and moments, whole).
        elastic = meta is not None and meta["world_size"] != env.world_size
        if elastic and tag is not None:
            tag = _elastic_tag(resume_from, env)  # type: ignore[arg-type]
            if tag == ckpt.UNIVERSAL_TAG:
                ds_config = {**ds_config, "checkpoint": {"load_universal": True}}
        torch.manual_seed(job.run.seed)
        model, keepalive = build_model(job.model, pre.hf_config, ds_config)
        if meta is not None and tag is None:
            load_weights_into(model, resume_from, rank=env.rank)  # type: ignore[arg-type]
        cuda = cuda_available()
        optimizer = _make_optimizer(model, job, fused=cuda)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        compiled = compile_engine(engine, job.model.compile, cuda=cuda)
        if compiled != "off":
            log.info("model.compile: torch.compile of the %s (the first steps are slow)", compiled)
        if meta is not None and tag is not None:
            _load_checkpoint(engine, resume_from, tag, lora=is_lora(job.model))  # type: ignore[arg-type]
            if not elastic:
                _restore_rng(resume_from / f"rng_rank{env.rank}.pt")  # type: ignore[operator]
        if meta is not None and (elastic or tag is None):
            restored = "weights and optimizer state" if tag else "weights (Adam moments restart)"
            log.warning(
                "resuming %s (saved on %d ranks) on %d ranks: %s restored; data continues at"
                " the next unseen sample", resume_from, meta["world_size"], env.world_size,
                restored,
            )  # fmt: skip

        loader = build_loader(
            job.data, split="train", rank=env.rank, world_size=env.world_size,
            micro_batch_size=layout.micro_batch_size, seed=job.run.seed,
            state=meta["loader"] if meta else None,
        )  # fmt: skip
        total = total_steps_for(
            max_steps=job.train.max_steps, max_tokens=job.train.max_tokens,
            epochs=job.train.epochs, global_batch_size=layout.global_batch_size,
            seq_len=job.data.seq_len, samples_per_epoch=loader.samples_per_epoch,
        )  # fmt: skip
        resume_step = meta["step"] if meta else None
        metrics = Tracker(
            job.tracking, run_dir, rank=env.rank, resume_step=resume_step,
            config=job.resolved, name=job.run.name or run_dir.name,
        )  # fmt: skip
        metrics.log_params(param_counts(model), step=resume_step or 0)
        has_val = any(s.tokens for s in pre.manifest.splits.get("val", []))
        control = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        health = StepHealth(job.train.max_bad_steps, job.train.spike_factor)
        if meta is not None:
            health.load_state_dict(meta.get("health", {}))
        events = Events(run_dir, env.rank, metrics)
        heartbeat = Heartbeat(run_dir, env.rank)
        heartbeat.beat(resume_step or 0, "setup")
        watchdog = Watchdog(
            heartbeat, job.train.hang_timeout_s, run_dir / "logs" / f"rank{env.rank}.log",
            EXIT_REQUEUE, on_hang=lambda message: _on_hang(events, heartbeat, message),
        )  # fmt: skip
        watchdog.start()
        return cls(
            job=job, env=env, layout=layout, engine=engine, optimizer=optimizer,
            keepalive=keepalive, loader=loader, train_iter=iter(loader), pre=pre,
            total_steps=total, metrics=metrics, has_val=has_val, control_group=control,
            health=health, heartbeat=heartbeat, watchdog=watchdog, events=events,
        )  # fmt: skip

    @property
    def labels_masked(self) -> bool:
        """Whether some labels may be IGNORE_INDEX (a loss-masked source), so counts vary."""
        return bool(self.loader.dataset.masked)

    # --- collectives -----------------------------------------------------------------------

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum host numbers over ranks (on the gloo control group: no device sync)."""
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.control_group)
        return t.tolist()

    def window_stats(self, results: list[dict[str, Any]], step_time_s: float) -> dict:
        """Loss over the window (all ranks' tokens), slowest rank's step time and largest
        memory, in one collective: rank 0 logs what every rank saw. The only place the
        step's device results are read back (a CPU-GPU sync point, once per log line)."""
        import torch
        import torch.distributed as dist

        loss_sum = float(sum(r["local_loss_sum"] for r in results))
        t = torch.tensor([loss_sum, step_time_s, self.peak_memory_gb()], dtype=torch.float64)
        gathered = [torch.empty_like(t) for _ in range(self.env.world_size)]
        dist.all_gather(gathered, t, group=self.control_group)
        rows = torch.stack(gathered)
        grad_norm = results[-1]["grad_norm"]
        return {
            "loss": float(rows[:, 0].sum()) / sum(r["tokens"] for r in results),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "step_time_max_s": float(rows[:, 1].max()),
            "memory_gb": float(rows[:, 2].max()),
        }

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation over all ranks; None where the device peak is unknown."""
        import torch

        from training.flops import peak_tflops

        peak = self.job.tracking.peak_tflops
        if peak is None and torch.cuda.is_available():
            peak = peak_tflops(torch.cuda.get_device_name())
        if peak is None:
            return None  # e.g. CPU: no honest peak to divide by
        return tokens_per_s * self.flops_per_token / (peak * 1e12 * self.env.world_size)

    @functools.cached_property
    def flops_per_token(self) -> float:
        from training.flops import model_flops_per_token

        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())
        return model_flops_per_token(self.pre.hf_config, n_params, self.job.data.seq_len)

    def agree(self, flag: bool) -> bool:
        """True on every rank if it is true on any (e.g. a signal reached one rank)."""
        return self.all_reduce_sum([1.0 if flag else 0.0])[0] > 0

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    # --- training --------------------------------------------------------------------------

    def _token_loss_sum(self, batch: dict[str, Any]) -> Any:
        """Summed token loss of a micro-batch, a device tensor (see training.loss)."""
        device = self.engine.device
        # position_ids (data.document_mask): restart per document, which keeps attention
        # inside each document (see sharding.loader)
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        return self.engine(**inputs, token_loss=True)

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step over `grad_accum_steps` micro-batches on every rank.

        Never waits for the device: the loss stays a device tensor (`window_stats`
        reads it back and reduces it over ranks when a log line is due), and the
        global target count is a host sum of the CPU labels over the control group.
        """
        cfg = self.job.train
        start = time.perf_counter()
        self._beat(step + 1, "step" if self.health.steps_seen else "warmup")
        faults.sleep_in_step(self.env.rank, step + 1)
        micro = [next(self.train_iter) for _ in range(self.layout.grad_accum_steps)]
        data_wait_s = time.perf_counter() - start
        if self.labels_masked:
            local_tokens = float(sum(target_count(b["labels"]) for b in micro))
            (global_tokens,) = self.all_reduce_sum([local_tokens])
        else:  # packed text: every label is a target; skip a collective per step
            global_tokens = float(self.layout.global_batch_size * self.job.data.seq_len)
        if global_tokens == 0:
            raise TrainingError(
                f"step {step}: no completion token of the global batch is a loss target — records"
                f" longer than data.seq_len {self.job.data.seq_len} lose their prompt to packing;"
                " raise data.seq_len"
            )
        lr = lr_at(
            step, max_lr=cfg.learning_rate, min_lr=cfg.min_lr, warmup_steps=cfg.lr_warmup_steps,
            total_steps=self.total_steps, decay=cfg.lr_decay,
        )  # fmt: skip
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # DeepSpeed divides by accum steps and averages over ranks; undo both so the
        # gradient is d(sum of token losses)/d(w) / global_tokens.
        scale = self.layout.grad_accum_steps * self.env.world_size / global_tokens
        loss_sum, spike, mean_loss = None, False, None
        for i, batch in enumerate(micro):
            token_loss = self._token_loss_sum(batch)
            if faults.nan_loss(self.env.rank, step + 1):
                token_loss = token_loss * float("nan")
            loss = token_loss.detach()
            loss_sum = loss if loss_sum is None else loss_sum + loss
            if i == len(micro) - 1 and cfg.spike_factor is not None:
                (mean_loss,) = self.all_reduce_sum([float(loss_sum) / global_tokens])  # sync
                spike = self.health.is_spike(mean_loss)
                if spike:  # DeepSpeed has no "skip this step": a NaN gradient makes every
                    token_loss = token_loss * float("nan")  # optimizer path drop it
            if i == 0:  # before this step's first collective: this rank's own pace
                busy_s = time.perf_counter() - start
            self.engine.backward(token_loss * scale)
            self.engine.step()
        if self.heartbeat is not None:
            self.heartbeat.record_busy(busy_s)
        skipped = self._record_health(step + 1, spike, mean_loss)
        return {
            "local_loss_sum": loss_sum,  # a device tensor; summed over ranks when logged
            "tokens": int(global_tokens),
            "samples": self.layout.global_batch_size,
            "lr": lr,
            "grad_norm": self.engine.get_global_grad_norm(),  # float or tensor, read when logged
            "data_wait_s": data_wait_s,
            "skipped": skipped,
        }

    def _record_health(self, step: int, spike: bool, mean_loss: float | None) -> bool:
        """Count a dropped step; after max_bad_steps in a row roll back or stop. Whether
        the optimizer applied the step is DeepSpeed's own host flag (no extra sync); fp16
        overflow skips are its loss scaler at work, not bad steps."""
        applied = self.engine.was_step_applied() or self.job.deepspeed.precision == "fp16"
        verdict = self.health.record(applied=applied and not spike, spike=spike, loss=mean_loss)
        if not verdict.bad:
            return False
        message = (f"step {step} skipped ({verdict.reason}); {self.health.bad_in_a_row} bad in "
                   f"a row (train.max_bad_steps {self.health.max_bad_steps})")  # fmt: skip
        log.warning(message)
        if self.env.is_main and self.events is not None:
            self.events.emit("bad_step", message, step=step)
        if verdict.act:
            self._act_on_bad_steps(step, verdict.reason)
        return True

    def _act_on_bad_steps(self, step: int, reason: str) -> None:
        """`train.on_bad_steps`: stop with one line, or load the last checkpoint's weights
        and optimizer state and go on with the next data (the samples the dropped steps
        saw are not seen again this epoch; logged)."""
        cfg, n = self.job.train, self.health.bad_in_a_row
        what = f"step {step}: {n} bad steps in a row ({reason})"
        if cfg.on_bad_steps == "stop":
            raise TrainingError(
                f"{what}; stopped (train.on_bad_steps=stop): lower train.learning_rate or set"
                " train.grad_clip, then resume"
            )
        root = Path(self.job.run.dir) / "checkpoints"
        good = ckpt.latest_checkpoint(root)
        meta = ckpt.read_meta(good) if good is not None else None
        if meta is None or meta["world_size"] != self.env.world_size:
            raise TrainingError(f"{what} and no checkpoint of this world size to roll back "
                                f"to in {root}; lower train.learning_rate or set "
                                "train.grad_clip")  # fmt: skip
        _load_checkpoint(self.engine, good, ckpt.DS_TAG, lora=is_lora(self.job.model))
        self.health.rolled_back()
        now = self.loader.state_dict()
        message = (f"{what}: rolled back to {good.name} (step {meta['step']}); training goes "
                   f"on with the next data: samples {meta['loader'].get('consumed')}.."
                   f"{now.get('consumed')} (loader positions) were trained on by dropped or "
                   "undone steps")  # fmt: skip
        log.warning(message)
        if self.env.is_main and self.events is not None:
            self.events.emit("rollback", message, step=step)
        self.metrics.log({"step": step, "rollback_to_step": meta["step"], **self.health.counts()})

    def _beat(self, step: int, phase: str) -> None:
        if self.heartbeat is not None:
            self.heartbeat.beat(step, phase)

    def evaluate(self, max_steps: int) -> float:
        """Mean token loss over up to `max_steps` micro-batches per rank of the val split."""
        import torch

        loader = self._val_loader()
        self._beat(self.heartbeat.step if self.heartbeat else 0, "eval")
        loader.load_state_dict({"consumed": 0})  # every eval sees the same val samples
        per_step = self.env.world_size * self.layout.micro_batch_size
        steps = max(1, min(max_steps, loader.samples_per_epoch // per_step))
        self.engine.eval()
        loss_sum, tokens = torch.zeros((), dtype=torch.float64), 0.0
        with torch.no_grad():
            for _, batch in zip(range(steps), loader, strict=False):
                loss_sum = loss_sum + self._token_loss_sum(batch).double().cpu()
                tokens += float(target_count(batch["labels"]))
        self.engine.train()
        loss_sum, tokens = self.all_reduce_sum([float(loss_sum), tokens])
        return loss_sum / max(tokens, 1.0)

    def _val_loader(self) -> Any:
        """The val split's loader, built (shards mapped and verified) once per runner."""
        from sharding.loader import build_loader

        if self.val_loader is not None:
            return self.val_loader
        try:
            self.val_loader = build_loader(
                self.job.data, split="val", rank=self.env.rank, world_size=self.env.world_size,
                micro_batch_size=self.layout.micro_batch_size, seed=self.job.run.seed,
            )  # fmt: skip
        except DataError as exc:
            raise TrainingError(f"eval: {exc}") from None
        return self.val_loader

    def write_shards(self, directory: Path) -> None:
        """This rank's part of a checkpoint: DeepSpeed state and RNG state."""
        import numpy as np
        import torch

        self._beat(self.heartbeat.step if self.heartbeat else 0, "save")
        self.engine.save_checkpoint(str(directory), tag=ckpt.DS_TAG, save_latest=False,
                                    exclude_frozen_parameters=is_lora(self.job.model))  # fmt: skip
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "numpy": np.random.get_state()}  # fmt: skip
        torch.save(rng, directory / f"rng_rank{self.env.rank}.pt")

    def peak_memory_gb(self) -> float:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 1e9
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB → GB

    def close(self) -> None:
        """Flush metrics, then leave the process group: gloo's threads must not be torn
        down by the interpreter's exit (which can abort with "terminate called ...")."""
        import torch.distributed as dist

        if self.watchdog is not None:
            self.watchdog.stop()
        self._beat(self.heartbeat.step if self.heartbeat else 0, "done")
        self.metrics.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _on_hang(events: Events, heartbeat: Heartbeat, message: str) -> None:
    events.emit("hang", message, step=heartbeat.step)
    for hook in HANG_HOOKS:  # e.g. the SLURM backend's requeue
        hook(message)


# Called (from the watchdog thread, before the process exits to requeue) with the hang's
# one-line message; launchers register here (training never imports them).
HANG_HOOKS: list[Any] = []


def _make_optimizer(model: Any, job: TrainJob, *, fused: bool) -> Any:
    """AdamW: DeepSpeed's CPU Adam under optimizer offload, else torch's, fused into one
    kernel per step on CUDA (`fused`; torch's own, so no JIT build on a compute node)."""
    import torch

    cfg = job.train
    groups = param_groups(model, cfg.weight_decay)
    if job.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.learning_rate, betas=tuple(cfg.betas))
    if job.deepspeed.zero_stage == 0 and job.deepspeed.precision == "fp32":
        # the one setup where DeepSpeed steps a client optimizer with unchecked gradients
        return guarded_adamw(groups, lr=cfg.learning_rate, betas=tuple(cfg.betas), fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=tuple(cfg.betas), fused=fused)


def _load_checkpoint(engine: Any, step_dir: Path, tag: str, *, lora: bool) -> None:
    """Load DeepSpeed state `step_dir/tag` into `engine` (a LoRA checkpoint holds the
    adapters only; the base came from model.name_or_path).

    After a universal load on a DeepSpeed with the known slips of its ZeRO-3
    universal loader (`training.ds_repairs`), put back each param group's settings
    from our config and give each Adam state its own step. (For ZeRO-1/2 this
    changes nothing.)
    """
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    settings = param_group_settings(inner)
    try:
        load_path, _ = engine.load_checkpoint(str(step_dir), tag=tag, load_module_strict=not lora)
    except (RuntimeError, OSError, EOFError, ValueError) as exc:  # a file that does not load
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainingError(
            f"{step_dir}: checkpoint does not load ({first}); resume from another with "
            "--set train.resume=RUN_DIR/checkpoints/step_NNNNNN"
        ) from None
    if load_path is None:
        raise TrainingError(f"{step_dir}: DeepSpeed found no checkpoint under {tag}/")
    if tag == ckpt.UNIVERSAL_TAG and has_universal_load_slips():
        repair_universal_load(inner, settings)


def _elastic_tag(step_dir: Path, env: DistEnv) -> str | None:
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


def _restore_rng(path: Path) -> None:
    import numpy as np
    import torch

    if not path.is_file():
        return
    rng = torch.load(path, weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
