"""The DeepSpeed side of training: engine, data, one optimizer step, eval, save.

Loss is the mean over every real target token of the *global* batch (all
micro-batches of all ranks), not a mean of per-micro-batch means, so it is
the same however the batch is split into ranks × accumulation steps.
"""

from __future__ import annotations

import datetime
import functools
import logging
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sharding import faults
from sharding.errors import DataError
from training.checkpoint import store as ckpt
from training.checkpoint.consolidate import load_weights_into
from training.checkpoint.resume import Preflight, load_checkpoint, load_tag, restore, save_rng
from training.config import BatchLayout, TrainJob
from training.errors import TrainingError
from training.models.build import (
    build_model,
    compile_engine,
    compile_report,
    compile_target,
    gather_per_block,
    param_groups,
)
from training.models.finetune import is_lora, param_counts
from training.models.loss import target_count
from training.observe.guard import RunGuard
from training.observe.health import guarded_adamw
from training.observe.sinks import Metrics, RunInfo
from training.parallel.dist import DistEnv
from training.parallel.ds_config import cuda_available
from training.run.paths import RunDir
from training.schedule import lr_at, total_steps_for

if TYPE_CHECKING:  # heavy imports, for annotations only
    import torch
    import torch.distributed as dist
    from deepspeed import DeepSpeedEngine
    from transformers.integrations import HfDeepSpeedConfig

    from sharding.loader import TokenLoader

log = logging.getLogger("gptrain")


@dataclass
class StepRunner:
    """One rank's training machinery: the DeepSpeed engine and its data, one optimizer
    step, evaluation, the checkpoint shards; resume lives in `training.checkpoint.resume` and the
    run's health in `training.observe.guard`."""

    job: TrainJob
    env: DistEnv
    layout: BatchLayout
    engine: DeepSpeedEngine
    optimizer: torch.optim.Optimizer
    keepalive: HfDeepSpeedConfig | None  # under ZeRO-3; must outlive the engine
    loader: TokenLoader
    train_iter: Iterator[dict[str, torch.Tensor]]
    pre: Preflight
    total_steps: int
    metrics: Metrics
    has_val: bool
    guard: RunGuard
    # Small host-side collectives (token counts, the stop agreement) go over gloo on CPU
    # tensors: an NCCL collective read back with .item() would wait for the GPU to drain.
    control_group: dist.ProcessGroup | None = None  # None: the default group is gloo already
    compiled: str = "off"  # training.models.build.compile_target: off | model | blocks
    val_loader: TokenLoader | None = field(default=None, init=False, repr=False)

    # --- setup -----------------------------------------------------------------------------

    @classmethod
    def setup(
        cls,
        job: TrainJob,
        env: DistEnv,
        layout: BatchLayout,
        pre: Preflight,
        on_hang: Callable[[str], None] | None = None,
    ) -> StepRunner:
        """Build model, optimizer and DeepSpeed engine (restoring a checkpoint), and data;
        `on_hang`: the launcher backend's hook for a hung rank (see RunGuard)."""
        import deepspeed
        import torch
        import torch.distributed as dist

        from sharding.loader import build_loader

        meta, run_dir = pre.meta, Path(job.run.dir)
        tag, ds_config = load_tag(job, pre, env)
        torch.manual_seed(job.run.seed)
        model, keepalive = build_model(job.model, pre.hf_config, ds_config)
        if pre.resume is not None and tag is None:
            load_weights_into(model, pre.resume.path, rank=env.rank)
        cuda = cuda_available()
        zero_stage = ds_config["zero_optimization"]["stage"]
        compiled = compile_target(job.model.compile, cuda=cuda, zero_stage=zero_stage)
        if compiled == "blocks" and zero_stage == 3:
            gather_per_block(model)  # a model without blocks fails here, before the engine
        optimizer = _make_optimizer(model, job, fused=cuda)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        compile_engine(engine, compiled)
        if compiled != "off":
            log.info("model.compile: torch.compile of the %s (the first steps are slow)", compiled)
        restore(engine, pre, env, tag, lora=is_lora(job.model))

        loader = build_loader(
            job.data,
            split="train",
            rank=env.rank,
            world_size=env.world_size,
            micro_batch_size=layout.micro_batch_size,
            seed=job.run.seed,
            state=meta.loader if meta else None,
        )
        total = total_steps_for(
            max_steps=job.train.max_steps,
            max_tokens=job.train.max_tokens,
            epochs=job.train.epochs,
            global_batch_size=layout.global_batch_size,
            seq_len=job.data.seq_len,
            samples_per_epoch=loader.samples_per_epoch,
        )
        resume_step = meta.step if meta else None
        run = RunInfo(
            run_dir=RunDir(run_dir),
            name=job.run.name or run_dir.name,
            config=job.resolved,
            resume_step=resume_step,
            params=param_counts(model),
        )
        metrics = Metrics(job.tracking, run, rank=env.rank)
        has_val = any(s.tokens for s in pre.manifest.splits.get("val", []))
        timeout = datetime.timedelta(seconds=job.train.collective_timeout_s)
        control = (
            None
            if dist.get_backend() == "gloo"
            else dist.new_group(backend="gloo", timeout=timeout)
        )
        return cls(
            job=job,
            env=env,
            layout=layout,
            engine=engine,
            optimizer=optimizer,
            keepalive=keepalive,
            loader=loader,
            train_iter=iter(loader),
            pre=pre,
            total_steps=total,
            metrics=metrics,
            has_val=has_val,
            control_group=control,
            guard=RunGuard.start(job, env, metrics, meta, on_hang),
            compiled=compiled,
        )

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

        from training.models.flops import peak_tflops

        peak = self.job.tracking.peak_tflops
        if peak is None and torch.cuda.is_available():
            peak = peak_tflops(torch.cuda.get_device_name())
        if peak is None:
            return None  # e.g. CPU: no honest peak to divide by
        return tokens_per_s * self.flops_per_token / (peak * 1e12 * self.env.world_size)

    @functools.cached_property
    def flops_per_token(self) -> float:
        from training.models.flops import model_flops_per_token

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
        """Summed token loss of a micro-batch, a device tensor (see training.models.loss)."""
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
        guard = self.guard
        guard.beat(step + 1, "step" if guard.health.steps_seen else "warmup")
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
            step,
            max_lr=cfg.learning_rate,
            min_lr=cfg.min_lr,
            warmup_steps=cfg.lr_warmup_steps,
            total_steps=self.total_steps,
            decay=cfg.lr_decay,
        )
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
                spike = guard.health.is_spike(mean_loss)
                if spike:  # DeepSpeed has no "skip this step": a NaN gradient makes every
                    token_loss = token_loss * float("nan")  # optimizer path drop it
            if i == 0:  # before this step's first collective: this rank's own pace
                busy_s = time.perf_counter() - start
            self.engine.backward(token_loss * scale)
            self.engine.step()
        guard.heartbeat.record_busy(busy_s)
        if self.compiled != "off" and not guard.health.steps_seen:  # this process's first
            log.info("model.compile: %s", compile_report())
        # Whether the optimizer applied the step is DeepSpeed's own host flag (no extra
        # sync); fp16 overflow skips are its loss scaler at work, not bad steps.
        applied = self.engine.was_step_applied() or self.job.deepspeed.precision == "fp16"
        skipped = guard.after_step(
            step + 1,
            applied=applied,
            spike=spike,
            mean_loss=mean_loss,
            restore=self._restore_last_good,
            position=self.loader.state_dict,
        )
        return {
            "local_loss_sum": loss_sum,  # a device tensor; summed over ranks when logged
            "tokens": int(global_tokens),
            "samples": self.layout.global_batch_size,
            "lr": lr,
            "grad_norm": self.engine.get_global_grad_norm(),  # float or tensor, read when logged
            "data_wait_s": data_wait_s,
            "skipped": skipped,
        }

    def _restore_last_good(self, step_dir: Path) -> None:
        """Roll back: the weights and optimizer state of checkpoint `step_dir`."""
        load_checkpoint(self.engine, step_dir, ckpt.DS_TAG, lora=is_lora(self.job.model))

    def evaluate(self, max_steps: int) -> float:
        """Mean token loss over up to `max_steps` micro-batches per rank of the val split."""
        import torch

        loader = self._val_loader()
        self.guard.beat(self.guard.step, "eval")
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

    def _val_loader(self) -> TokenLoader:
        """The val split's loader, built (shards mapped and verified) once per runner."""
        from sharding.loader import build_loader

        if self.val_loader is not None:
            return self.val_loader
        try:
            self.val_loader = build_loader(
                self.job.data,
                split="val",
                rank=self.env.rank,
                world_size=self.env.world_size,
                micro_batch_size=self.layout.micro_batch_size,
                seed=self.job.run.seed,
            )
        except DataError as exc:
            raise TrainingError(f"eval: {exc}") from None
        return self.val_loader

    def write_shards(self, directory: Path) -> None:
        """This rank's part of a checkpoint: DeepSpeed state and RNG state."""

        self.guard.beat(self.guard.step, "save")
        self.engine.save_checkpoint(
            str(directory),
            tag=ckpt.DS_TAG,
            save_latest=False,
            exclude_frozen_parameters=is_lora(self.job.model),
        )
        save_rng(ckpt.rng_file(directory, self.env.rank))

    def peak_memory_gb(self) -> float:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 1e9
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB → GB

    def close(self) -> None:
        """Flush metrics, then leave the process group: gloo's threads must not be torn
        down by the interpreter's exit (which can abort with "terminate called ...")."""
        import torch.distributed as dist

        self.guard.close()
        self.metrics.finish()
        if dist.is_initialized():
            dist.destroy_process_group()


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
