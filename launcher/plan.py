"""`gptrain plan`: will a config fit, and how long will it take — before it runs.

    gptrain plan configs/gpt2-xl-zero3-multinode.yaml --nodes 4 --gpus-per-node 8 --gpu H100-80GB
    gptrain plan configs/demo-cpu.yaml --json

The formulas are in `training.plan`; this module finds their inputs (the model's shape,
`training.models.shape`: the model of `model.config` or of the pretrained dir's
`config.json` built on the meta device, any causal LM transformers has, dense or MoE;
the vocabulary from the data manifest; the device) and prints the result. `gptrain
launch` runs the same plan and refuses a config that cannot fit (`check_fits`), unless `--force`.

Device memory per rank, first that applies: `--gpu-memory-gb`; `--gpu NAME` (the
table below, as `nvidia-smi` reports the total); a local launch on CPU
(`DS_ACCELERATOR=cpu` or no `nvidia-smi`): the host's RAM (MemTotal) shared by the
node's ranks; a local launch on GPUs: `nvidia-smi` of GPU 0; a SLURM CPU job with
`launch.slurm.mem_gb`: that shared by the node's ranks. Otherwise it is unknown and
there is no verdict. A reserve is held back: CUDA context, NCCL and allocator slack on
a GPU; the interpreter with torch, DeepSpeed and transformers loaded on a CPU rank.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from launcher.config import Config
from launcher.errors import LaunchError
from training import plan as formulas
from training.models import shape as shapes
from training.models.shape import ModelShape
from training.plan import GIB, Plan, Setup

# Total memory as nvidia-smi reports it (MiB), by the name `--gpu` takes.
GPU_MEMORY_MIB = {
    "H100-80GB": 81559,
    "H100-94GB": 95830,
    "H200-141GB": 143771,
    "A100-80GB": 81920,
    "A100-40GB": 40960,
    "L40S-48GB": 46068,
    "A10G-24GB": 23028,
    "V100-32GB": 32768,
    "V100-16GB": 16384,
}
GPU_RESERVE_BYTES = 2 * GIB  # CUDA context (~0.5 GiB), NCCL buffers, allocator fragmentation
CPU_RESERVE_BYTES = 1 * GIB  # a rank's interpreter + torch + DeepSpeed + transformers
DEFAULT_MFU = 0.4
GPT2_VOCAB = 50257


@dataclass
class Device:
    """What one rank runs on: its memory (None: unknown), reserve and peak."""

    name: str
    memory_bytes: int | None
    reserve_bytes: int
    peak_tflops: float | None
    source: str  # how it was determined, for the reader


@dataclass
class PlanReport:
    config: str
    cfg: Config
    shape: ModelShape
    setup: Setup
    device: Device
    plan: Plan
    mfu: float
    notes: list[str] = field(default_factory=list)


# --- inputs --------------------------------------------------------------------------------


def _data_vocab(cfg: Config, notes: list[str]) -> tuple[int | None, int | None]:
    """(vocab_size, train samples per epoch) from the first data source's manifest."""
    from sharding.errors import DataError
    from sharding.manifest import load_manifest

    if not cfg.data.sources:
        return None, None
    try:
        manifests = [load_manifest(s.path) for s in cfg.data.sources]
    except DataError:
        notes.append(f"no manifest at {cfg.data.sources[0].path}: vocab_size from the model")
        return None, None
    samples = sum(
        m.split_tokens("train") // (cfg.data.seq_len + 1) for m in manifests if "train" in m.splits
    )
    return manifests[0].vocab_size, samples


def model_hf_config(cfg: Config, notes: list[str]) -> tuple[Any, int | None]:
    """The transformers config of the model the run builds (the pretrained dir's
    config.json, or the fresh `model.config` with the data's vocabulary) and the samples
    per epoch (None when no data is prepared)."""
    from training.models.build import check_remote_code, fresh_hf_config, pretrained_config_file

    data_vocab, samples = _data_vocab(cfg, notes)
    model = cfg.model
    if (file := pretrained_config_file(model)) is not None:
        check_remote_code(model, file)
        config = shapes.config_from_file(file, trust_remote_code=model.trust_remote_code)
        text = config.get_text_config()
        if data_vocab is not None and data_vocab > text.vocab_size:  # add_tokens resizes
            text.vocab_size = data_vocab
        return config, samples
    if data_vocab is None:
        notes[-1:] = [f"vocab_size {GPT2_VOCAB} (GPT-2's) assumed: no prepared data yet"]
    return fresh_hf_config(model, vocab_size=data_vocab or GPT2_VOCAB, eos_id=0), samples


def model_shape(cfg: Config, notes: list[str]) -> tuple[ModelShape, int | None]:
    """The model's shape (built on the meta device) and the samples per epoch."""
    config, samples = model_hf_config(cfg, notes)
    return _shape(cfg, config), samples


def _shape(cfg: Config, hf_config: Any) -> ModelShape:
    model = cfg.model
    where = f"model.name_or_path: {model.name_or_path}" if model.name_or_path else "model.config"
    return shapes.shape_of(hf_config, trust_remote_code=model.trust_remote_code, where=where)


def trainable_params(
    cfg: Config, hf_config: Any, shape: ModelShape, notes: list[str]
) -> int | None:
    """Trainable parameters under `model.peft` / `model.freeze` (None: all of them)."""
    peft = cfg.model.peft
    freeze = cfg.model.freeze
    if peft.method == "lora":
        return shapes.lora_params(
            hf_config,
            peft.r,
            peft.target_modules,
            peft.target_parameters,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    if not (freeze.embeddings or freeze.first_blocks or freeze.patterns):
        return None
    if freeze.patterns:
        notes.append("model.freeze.patterns: not counted; gradients and optimizer overestimated")
    return shapes.unfrozen_params(shape, freeze.embeddings, freeze.first_blocks)


def _nvidia_smi() -> tuple[str, int] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.splitlines()[0]
        name, mib = (part.strip() for part in out.rsplit(",", 1))
        return name, int(float(mib)) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _host_ram_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_device(
    cfg: Config,
    *,
    gpu: str | None = None,
    gpu_memory_gb: float | None = None,
    peak_tflops: float | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Device:
    """The device one rank of `cfg` runs on (see the module docstring for the order)."""
    from training.models.flops import peak_tflops as table_peak

    launch = cfg.launch
    ranks = launch.nproc_per_node
    peak = peak_tflops or cfg.tracking.peak_tflops
    if gpu is not None:
        key = next((k for k in GPU_MEMORY_MIB if k.lower() == gpu.lower()), None)
        if key is None:
            raise LaunchError(
                f"--gpu {gpu}: unknown GPU; known: {', '.join(GPU_MEMORY_MIB)} "
                "(or give --gpu-memory-gb and --peak-tflops)"
            )
        memory = GPU_MEMORY_MIB[key] * 2**20
        if gpu_memory_gb is not None:
            memory = round(gpu_memory_gb * GIB)
        return Device(key, memory, GPU_RESERVE_BYTES, peak or table_peak(key), "--gpu")
    if gpu_memory_gb is not None:
        return Device("GPU", round(gpu_memory_gb * GIB), GPU_RESERVE_BYTES, peak, "--gpu-memory-gb")
    if launch.backend == "local":
        smi = None if environ.get("DS_ACCELERATOR") == "cpu" else _nvidia_smi()
        if smi is not None:
            name, memory = smi
            return Device(name, memory, GPU_RESERVE_BYTES, peak or table_peak(name), "nvidia-smi")
        return Device(
            f"CPU (host RAM / {ranks} ranks)",
            _host_ram_bytes() // ranks,
            CPU_RESERVE_BYTES,
            peak,
            "/proc/meminfo",
        )
    if launch.slurm.gpus_per_node == 0 and launch.slurm.mem_gb is not None:
        return Device(
            f"CPU (launch.slurm.mem_gb / {ranks} ranks)",
            round(launch.slurm.mem_gb * 2**30 / ranks),
            CPU_RESERVE_BYTES,
            peak,
            "launch.slurm.mem_gb",
        )
    return Device("unknown", None, GPU_RESERVE_BYTES, peak, "pass --gpu NAME or --gpu-memory-gb G")


def build_report(
    cfg: Config,
    config_name: str,
    *,
    gpu: str | None = None,
    gpu_memory_gb: float | None = None,
    peak_tflops: float | None = None,
    mfu: float = DEFAULT_MFU,
    environ: Mapping[str, str] = os.environ,
) -> PlanReport:
    """The plan of `cfg` on its launch layout (`cfg.launch`) and device."""
    from training.checkpoint.resume import check_sequence_parallel
    from training.errors import TrainingError
    from training.parallel.ds_config import build_deepspeed_config
    from training.schedule import total_steps_for

    notes: list[str] = []
    hf_config, samples = model_hf_config(cfg, notes)
    # before any rank starts, in one line
    check_sequence_parallel(cfg.deepspeed.sequence_parallel_size, cfg.data.seq_len, hf_config)
    shape = _shape(cfg, hf_config)
    layout = cfg.batch_layout()
    try:
        ds_config = build_deepspeed_config(cfg.deepspeed, cfg.train, layout)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    setup = formulas.setup_from_sections(
        cfg.model,
        cfg.data,
        cfg.deepspeed,
        layout,
        ds_config,
        cfg.launch.nproc_per_node,
        trainable_params(cfg, hf_config, shape, notes),
    )
    device = resolve_device(
        cfg, gpu=gpu, gpu_memory_gb=gpu_memory_gb, peak_tflops=peak_tflops, environ=environ
    )
    train = cfg.train
    total_steps = None
    if train.max_steps or train.max_tokens or (train.epochs and samples):
        total_steps = total_steps_for(
            max_steps=train.max_steps,
            max_tokens=train.max_tokens,
            epochs=train.epochs,
            global_batch_size=layout.global_batch_size,
            seq_len=cfg.data.seq_len,
            samples_per_epoch=samples or 0,
        )
    if train.epochs:
        how = "samples per epoch from the manifests" if samples else "no data, so no step budget"
        notes.append(f"train.epochs: {how}")
    plan = formulas.make_plan(
        shape,
        setup,
        device_bytes=device.memory_bytes,
        reserve_bytes=device.reserve_bytes,
        peak_tflops=device.peak_tflops,
        mfu=mfu,
        total_steps=total_steps,
    )
    if device.peak_tflops is None:
        notes.append("no step time: peak FLOP/s unknown (pass --peak-tflops or --gpu)")
    return PlanReport(config_name, cfg, shape, setup, device, plan, mfu, notes)


# --- output --------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GIB:9.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def _describe_model(shape: ModelShape) -> str:
    kv = f", {shape.n_kv_head} kv heads" if shape.n_kv_head != shape.n_head else ""
    active = (
        f", {_count(shape.active_params)} active ({shape.top_k} of {shape.n_experts} "
        "experts per token)"
        if shape.n_experts
        else ""
    )
    mlp = f"mlp {shape.ffn_hidden}" + (" per token" if shape.n_experts else "")
    return (
        f"{shape.model_type} {_count(shape.n_params)} params{active} ({shape.n_layer} layers, "
        f"hidden {shape.hidden}, {shape.n_head} heads{kv}, {mlp}"
        f"{', gated' if shape.gated_mlp else ''}, vocab {shape.vocab_size}, "
        f"{shape.attention} attention)"
    )


def format_report(report: PlanReport) -> str:
    """The plan as a table for people."""
    r, s, p, dev = report, report.setup, report.plan, report.device
    launch = r.cfg.launch
    ckpt = "on" if s.activation_checkpointing else "off"
    stage_note = {
        0: "replicated",
        1: "optimizer partitioned",
        2: "+ gradients partitioned",
        3: "+ parameters partitioned",
    }[s.zero_stage]
    trainable = "" if s.trainable_params is None else f", {s.trainable_params:,} trainable"
    lines = [
        f"plan: {r.config}",
        f"model:  {_describe_model(r.shape)}{trainable}",
        f"layout: {launch.nodes} node(s) × {launch.nproc_per_node} = {s.world_size} ranks; "
        f"global batch {s.micro_batch_size * s.grad_accum_steps * s.dp_size} = micro "
        f"{s.micro_batch_size} × accum {s.grad_accum_steps} × {s.dp_size}; seq_len "
        f"{s.seq_len}"
        + (f" split over {s.sp_size} ranks (sequence parallel)" if s.sp_size > 1 else "")
        + f"; ZeRO-{s.zero_stage} ({stage_note}), {s.precision}, activation "
        f"checkpointing {ckpt}"
        + (", offload optimizer" if s.offload_optimizer else "")
        + (", offload params" if s.offload_params else ""),
        f"device: {dev.name}"
        + (
            f", {dev.memory_bytes / GIB:.1f} GiB per rank ({dev.source})"
            if dev.memory_bytes is not None
            else f": memory unknown ({dev.source})"
        ),
        "",
        f"{'per rank':<56}{'GiB':>9}",
        f"{'  parameters':<56}{_gib(p.params_bytes)}",
        f"{'  gradients':<56}{_gib(p.grads_bytes)}",
        f"{'  optimizer states (fp32 master + Adam m, v)':<56}{_gib(p.optimizer_bytes)}",
        f"{'  temporary buffers (buckets, gathers, grads in flight)':<56}{_gib(p.buffers_bytes)}",
        f"{f'  activations, micro-batch {s.micro_batch_size}, checkpointing {ckpt}':<56}"
        f"{_gib(p.activations_bytes)}",
        f"{'    (checkpointing off | on)':<56}{_gib(p.activations_no_ckpt_bytes)} |"
        f"{_gib(p.activations_ckpt_bytes).strip():>6}",
        f"{'  total':<56}{_gib(p.total_bytes)}",
    ]
    if p.device_bytes is not None:
        verdict = "fits" if p.fits else "DOES NOT FIT"
        lines += [
            f"{'  + reserve (runtime, fragmentation)':<56}{_gib(p.reserve_bytes)}",
            f"{'  device memory':<56}{_gib(p.device_bytes)}   -> {verdict}",
            f"largest micro-batch that fits: {p.max_micro_batch_size}",
        ]
        if not p.fits:
            budget = p.device_bytes - p.reserve_bytes
            changes = formulas.alternatives(r.shape, s, budget)
            lines.append(
                "would fit with: "
                + (
                    "; ".join(changes)
                    or "nothing single; combine the changes above or use more GPUs"
                )
            )
    lines.append(f"CPU RAM for offload per node: {p.offload_cpu_bytes_per_node / GIB:.2f} GiB")
    comm = ", ".join(
        f"ZeRO-{k} {v / GIB:.2f}" + (" (this)" if k == s.zero_stage else "")
        for k, v in p.comm_bytes_per_step.items()
    )
    lines.append(f"communication per step per rank (GiB sent): {comm}")
    if s.sp_size > 1:
        lines.append(
            "sequence parallel all-to-all per step per rank (GiB sent): "
            f"{p.sequence_comm_bytes_per_step / GIB:.2f}"
        )
    if p.step_time_s is not None:
        from training.observe.logs import hms

        flops = formulas.step_flops(r.shape, s)
        budget = (
            f"; {p.total_steps:,} steps -> {hms(p.time_to_budget_s)} (h:mm:ss)"
            if p.time_to_budget_s is not None
            else "; no step budget"
        )
        lines.append(
            f"time: {flops:.3g} FLOPs/step at MFU {r.mfu:.0%} of "
            f"{dev.peak_tflops:g} TFLOP/s per rank: {p.step_time_s:.3g} s/step"
            f"{budget}"
        )
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def report_dict(report: PlanReport) -> dict[str, Any]:
    """The plan as plain data for `--json`."""
    from dataclasses import asdict

    return {
        "config": report.config,
        "model": report.shape.summary(),
        "setup": asdict(report.setup),
        "device": asdict(report.device),
        "mfu": report.mfu,
        "plan": report.plan.to_dict(),
        "notes": report.notes,
    }


def check_fits(report: PlanReport) -> None:
    """LaunchError, one line with the numbers and what to change, if the plan cannot fit."""
    p, s, dev = report.plan, report.setup, report.device
    if p.fits is not False:
        return
    assert p.device_bytes is not None
    budget = p.device_bytes - p.reserve_bytes
    changes = formulas.alternatives(report.shape, s, budget) or [
        "no single change fits: combine them or use more GPUs"
    ]
    raise LaunchError(
        f"{report.config}: does not fit: {p.total_bytes / GIB:.1f} GiB per rank > "
        f"{budget / GIB:.1f} GiB usable on {dev.name} (parameters {p.params_bytes / GIB:.1f}, "
        f"gradients {p.grads_bytes / GIB:.1f}, optimizer {p.optimizer_bytes / GIB:.1f}, "
        f"buffers {p.buffers_bytes / GIB:.1f}, activations {p.activations_bytes / GIB:.1f} at "
        f"micro-batch {s.micro_batch_size}); try {'; '.join(changes)}; see `gptrain plan`, "
        "or --force to launch anyway"
    )
