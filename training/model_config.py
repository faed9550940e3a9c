"""The `model` config section: a pretrained dir or a fresh model of any causal-LM type
(its keys as that type's transformers config class takes them), LoRA, freezing.

Each dataclass validates itself in `__post_init__` and raises
`ValueError("field: message")`; the loader adds the section path and file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from training.errors import require

# `model.config` of a fresh model: `type` (a transformers model_type of a causal LM) and
# that config class's own keys; checked against the class by
# `training.model_registry.fresh_config` (the launcher's preflight and the trainer).
DEFAULT_ARCH: dict[str, Any] = {"type": "gpt2"}


def _check_arch(arch: dict[str, Any]) -> None:
    """What can be checked without transformers: a model type, sizes that are numbers."""
    kind = arch.get("type")
    require(isinstance(kind, str) and bool(kind), f"config.type: a model_type, got {kind!r}")
    for key, value in arch.items():
        is_count = key.startswith(("num_", "n_")) or key.endswith("_size")
        if is_count and isinstance(value, int) and not isinstance(value, bool):
            require(value >= 1, f"config.{key}: must be >= 1, got {value}")


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning: LoRA adapters on the pretrained base's layers.

    `target_modules: null` adapts every linear layer of the decoder blocks, the MoE router
    aside (`training.model_registry.lora_targets`). `target_parameters` adapts parameters
    that are not linear layers, such as an MoE model's fused experts
    (`mlp.experts.gate_up_proj`), through peft's `target_parameters`.
    """

    method: Literal["none", "lora"] = "none"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    target_parameters: list[str] | None = None

    def __post_init__(self) -> None:
        require(self.r >= 1, f"r: must be >= 1, got {self.r}")
        require(self.alpha > 0, f"alpha: must be > 0, got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, f"dropout: must be in [0, 1), got {self.dropout}")
        require(
            self.target_modules is None or (bool(self.target_modules) and all(self.target_modules)),
            "target_modules: must be a non-empty list of module names, or null for the default",
        )
        require(
            self.target_parameters is None or all(self.target_parameters),
            "target_parameters: must be a list of parameter names, or null",
        )


@dataclass
class FreezeConfig:
    """Parameters kept fixed during training: embeddings, the first blocks, name globs."""

    embeddings: bool = False  # token and position embeddings (and a tied LM head)
    first_blocks: int = 0  # the first K decoder blocks
    patterns: list[str] = field(default_factory=list)  # fnmatch globs on parameter names

    def __post_init__(self) -> None:
        require(self.first_blocks >= 0, f"first_blocks: must be >= 0, got {self.first_blocks}")
        require(all(self.patterns), "patterns: must not contain empty patterns")


@dataclass
class ModelConfig:
    """The causal LM: a local pretrained HF directory or a fresh model's family and sizes,
    and how much of it trains (`peft`, `freeze`); `add_tokens` extends its vocabulary."""

    name_or_path: str | None = None
    config: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_ARCH))
    # Run the model code a pretrained dir ships (config.json `auto_map`): only on request.
    trust_remote_code: bool = False
    dropout: float = 0.0
    # Recompute block activations in backward: `activation_checkpointing_fraction` of the
    # decoder blocks, spread evenly (1.0: every block; 0.5: every other one).
    activation_checkpointing: bool = False
    activation_checkpointing_fraction: float = 1.0
    # ... and keep what checkpointing saves (each block's input) in host memory until
    # backward (GPU: pinned, copied back in backward): the longest windows.
    activation_checkpointing_offload: bool = False
    # Long windows: run each block's MLP a slice of the sequence at a time, recomputed in
    # backward (DeepSpeed's TiledMLP): its activations shrink to one slice's, for one
    # more MLP forward. `tiled_mlp_shards`: slices per forward; 0 = one per hidden-size
    # tokens (training/models/tiling.py). Dense MLPs without dropout.
    tiled_mlp: bool = False
    tiled_mlp_shards: int = 0
    # torch.compile: true = the whole model, "blocks" = each decoder block, false = eager;
    # "auto" = true on CUDA, false elsewhere (CPU inductor builds are slow to compile).
    # Under ZeRO-3 true means blocks (see training.models.build.compile_target).
    compile: Literal["auto", "blocks"] | bool = "auto"
    # Attention kernels: "sdpa" (flash, or memory-efficient with a document block mask) or
    # "flex_attention" (compiled block-sparse kernels that skip the blocks a document mask
    # hides; CUDA only for training: torch has no flex backward on CPU).
    # "flash_attention_2" where the flash-attn package is installed (CUDA).
    attention: Literal["sdpa", "flex_attention", "flash_attention_2"] = "sdpa"
    peft: PeftConfig = field(default_factory=PeftConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    add_tokens: list[str] | str | None = None  # tokens, or a file with one token per line

    def __post_init__(self) -> None:
        self.config = {**DEFAULT_ARCH, **self.config}
        _check_arch(self.config)
        require(0.0 <= self.dropout < 1.0, f"dropout: must be in [0, 1), got {self.dropout}")
        require(
            0.0 < self.activation_checkpointing_fraction <= 1.0,
            "activation_checkpointing_fraction: must be in (0, 1], got "
            f"{self.activation_checkpointing_fraction}",
        )
        require(
            self.activation_checkpointing or not self.activation_checkpointing_offload,
            "activation_checkpointing_offload: offloads what activation checkpointing "
            "keeps; set model.activation_checkpointing: true",
        )
        require(
            self.tiled_mlp_shards >= 0,
            f"tiled_mlp_shards: must be >= 0 (0 = auto), got {self.tiled_mlp_shards}",
        )
        require(
            not self.tiled_mlp or self.dropout == 0.0,
            "tiled_mlp: recomputes the MLP in backward, which would draw new dropout masks; "
            "set model.dropout: 0",
        )
        require(
            not self.tiled_mlp or self.peft.method == "none" or self.peft.dropout == 0.0,
            "tiled_mlp: recomputes the MLP in backward, which would draw new dropout masks "
            "in its LoRA adapters; set model.peft.dropout: 0",
        )
        require(
            self.peft.method == "none" or bool(self.name_or_path),
            f"peft.method: {self.peft.method} adapts a pretrained model; set model.name_or_path",
        )
        if isinstance(self.add_tokens, list):
            require(
                bool(self.add_tokens) and all(self.add_tokens),
                "add_tokens: must be a non-empty list of tokens, a file path, or null",
            )
            dupes = sorted({t for t in self.add_tokens if self.add_tokens.count(t) > 1})
            require(not dupes, f"add_tokens: {dupes[0]!r} is listed twice" if dupes else "")
        else:
            require(self.add_tokens != "", "add_tokens: must be a list, a file path or null")
