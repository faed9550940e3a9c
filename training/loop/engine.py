"""The model under DeepSpeed and its optimizer: built (restoring a checkpoint), forward
to the summed token loss, backward and step, the learning rate, the checkpoint shards."""

from __future__ import annotations

import contextlib
import functools
import logging
import resource
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.checkpoint import store as ckpt
from training.checkpoint.consolidate import load_weights_into
from training.checkpoint.resume import Preflight, load_checkpoint, load_tag, restore, save_rng
from training.checkpoint.writer import background_writer, install
from training.config import TrainJob
from training.models.build import (
    build_model,
    compile_engine,
    compile_report,
    compile_target,
    gather_per_block,
    param_groups,
)
from training.models.finetune import is_lora, param_counts
from training.observe.health import guarded_adamw
from training.parallel.dist import DistEnv
from training.parallel.ds_config import cuda_available
from training.parallel.ds_repairs import (
    load_universal_under_sp_without_tp,
    record_sp_checkpoints_without_tp,
)
from training.parallel.sequence import (
    ParallelDims,
    register_ulysses_attention,
    sequence_parallel_mpu,
    shard_batch,
)

if TYPE_CHECKING:  # heavy imports, for annotations only
    import torch
    from deepspeed import DeepSpeedEngine
    from transformers.integrations import HfDeepSpeedConfig

log = logging.getLogger("gptrain")


@dataclass
class Engine:
    """One rank's DeepSpeed engine. The optimizer is stepped only through it."""

    ds: DeepSpeedEngine
    optimizer: torch.optim.Optimizer
    keepalive: HfDeepSpeedConfig | None  # under ZeRO-3; must outlive the engine
    lora: bool
    compiled: str = "off"  # training.models.build.compile_target: off | model | blocks
    rank: int = 0
    document_eos: int | None = None  # data.document_mask: the EOS id documents end with
    dims: ParallelDims | None = None  # sequence parallelism: this rank holds 1/sp of a window
    grad_average: int = 1  # ranks DeepSpeed averages gradients over (the step undoes it)
    writer: Any = None  # train.async_save: the background checkpoint writer (else None)
    _reported: bool = False

    @classmethod
    def build(cls, job: TrainJob, env: DistEnv, pre: Preflight) -> Engine:
        """Model, optimizer and engine from the config; a resumed run's weights and
        optimizer state loaded."""
        import deepspeed
        import torch

        tag, ds_config = load_tag(job, pre, env)
        torch.manual_seed(job.run.seed)
        dims = ParallelDims(env.world_size, job.deepspeed.sequence_parallel_size)
        mpu = sequence_parallel_mpu(dims)
        attention = None
        if mpu is not None:
            attention = register_ulysses_attention(mpu.get_sequence_parallel_group())
            record_sp_checkpoints_without_tp()
            load_universal_under_sp_without_tp()
        model, keepalive = build_model(job.model, pre.hf_config, ds_config, attention)
        if pre.resume is not None and tag is None:
            load_weights_into(model, pre.resume.path, rank=env.rank)
        cuda = cuda_available()
        zero_stage = ds_config["zero_optimization"]["stage"]
        compiled = compile_target(job.model.compile, cuda=cuda, zero_stage=zero_stage)
        if compiled == "blocks" and zero_stage == 3:
            gather_per_block(model)  # a model without blocks fails here, before the engine
        optimizer = _make_optimizer(model, job, fused=cuda)
        ds, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, mpu=mpu
        )
        compile_engine(ds, compiled)
        if compiled != "off":
            log.info("model.compile: torch.compile of the %s (the first steps are slow)", compiled)
        lora = is_lora(job.model)
        restore(ds, pre, env, tag, lora=lora)
        eos = pre.manifest.eos_id if job.data.document_mask else None
        writer = background_writer(env.rank, background=job.train.async_save)
        install(ds, writer)  # every file fsynced; in the background with async_save
        return cls(
            ds,
            optimizer,
            keepalive,
            lora,
            compiled,
            env.rank,
            eos,
            dims if mpu is not None else None,
            dims.grad_average_size(ds_config),
            writer if job.train.async_save else None,
        )

    # --- one step ------------------------------------------------------------------------

    def loss_parts(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The loss parts of a micro-batch as device tensors (`loss` to differentiate,
        `ce_sum`, and for an MoE `aux_loss`, `expert_load_max`; training.models.loss).
        With data.document_mask the `position_ids` restart per document, which keeps
        attention inside each document: computed here, on the device, from the inputs
        (`sharding.loader.document_positions`), so the loader pays nothing for them."""
        from sharding.loader import document_positions

        device = self.ds.device
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if self.document_eos is not None:
            inputs["position_ids"] = document_positions(inputs["input_ids"], self.document_eos)
        if self.dims is not None:  # sequence parallel: this rank's slice of every window
            inputs = self._shard(inputs)
        return self.ds(**inputs, token_loss=True)

    def _shard(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """This rank's 1/sp of the window (its SP group holds the same batch): tokens,
        their targets, and positions that say where documents start (plain 0..L-1 without
        document masking), which Ulysses all-gathers for the attention's mask."""
        import torch

        assert self.dims is not None
        if "position_ids" not in inputs:
            length = inputs["input_ids"].shape[-1]
            inputs["position_ids"] = torch.arange(length, device=self.ds.device)[None]
        shard = shard_batch(inputs, self.dims, self.rank, labels_shifted=True)
        return {
            "input_ids": shard["input_ids"],
            "position_ids": shard["position_ids"],
            "labels": shard["shift_labels"],
        }

    def token_loss_sum(self, batch: dict[str, Any]) -> Any:
        """What backward differentiates for a micro-batch (`loss_parts`' `loss`)."""
        return self.loss_parts(batch)["loss"]

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward_and_step(self, loss: Any) -> None:
        """Backward of one micro-batch; DeepSpeed steps the optimizer at the boundary
        (once a checkpoint's snapshot, taken while the micro-batches ran, is done)."""
        self.ds.backward(loss)
        if self.ds.is_gradient_accumulation_boundary():
            self.settle()
        self.ds.step()

    def settle(self) -> None:
        """Wait until the checkpoint being saved no longer needs the state unchanged."""
        if self.writer is not None:
            self.writer.wait_for_snapshot()

    def step_applied(self, precision: str) -> bool:
        """Whether the optimizer applied the step: DeepSpeed's own host flag (no extra
        sync); fp16 overflow skips are its loss scaler at work, not bad steps."""
        return self.ds.was_step_applied() or precision == "fp16"

    def grad_norm(self) -> Any:
        """The global gradient norm (float or device tensor: read when logged)."""
        return self.ds.get_global_grad_norm()

    def report_compile_once(self) -> None:
        """After this process's first step: how many graphs, how many breaks."""
        if self.compiled != "off" and not self._reported:
            log.info("model.compile: %s", compile_report())
        self._reported = True

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode and no gradients inside; training mode after."""
        import torch

        self.ds.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.ds.train()

    # --- checkpoints -----------------------------------------------------------------------

    def save_shards(self, directory: Path) -> None:
        """This rank's part of a checkpoint: DeepSpeed state and RNG state (with a
        background `writer`, DeepSpeed's files are snapshotted here and written later)."""
        self.ds.save_checkpoint(
            str(directory),
            tag=ckpt.DS_TAG,
            save_latest=False,
            exclude_frozen_parameters=self.lora,
        )
        save_rng(ckpt.rng_file(directory, self.rank))

    def load(self, step_dir: Path) -> None:
        """Roll back: the weights and optimizer state of checkpoint `step_dir`."""
        self.settle()
        load_checkpoint(self.ds, step_dir, ckpt.DS_TAG, lora=self.lora)

    # --- what it is --------------------------------------------------------------------------

    def param_counts(self) -> dict[str, int]:
        return param_counts(self.ds.module)

    @functools.cached_property
    def n_params(self) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.ds.module.parameters())

    @staticmethod
    def peak_memory_gb() -> float:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 1e9
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB → GB


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
