"""The `model` config section: a pretrained dir or a fresh model of one family (its
keys as that family's transformers config class takes them), LoRA, freezing.

Each dataclass validates itself in `__post_init__` and raises
`ValueError("field: message")`; the loader adds the section path and file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from training.errors import require

# The families a fresh model can be, and the size keys of each (transformers' own names).
GPT2_KEYS = ("n_layer", "n_head", "n_embd", "n_positions", "n_inner")
LLAMA_KEYS = (
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_size",
    "max_position_embeddings",
    "intermediate_size",
    "num_key_value_heads",
    "rope_theta",
    "tie_word_embeddings",
)
FAMILY_KEYS: dict[str, tuple[str, ...]] = {
    "gpt2": GPT2_KEYS,
    "llama": LLAMA_KEYS,
    "qwen2": LLAMA_KEYS,
    "mistral": LLAMA_KEYS,
}
# A ~124M model of either layout when no size is given; `None` is derived (see below).
_DEFAULTS: dict[str, Any] = {
    "n_layer": 12,
    "n_head": 12,
    "n_embd": 768,
    "n_positions": 1024,
    "n_inner": None,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_size": 768,
    "max_position_embeddings": 2048,
    "intermediate_size": None,
    "num_key_value_heads": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def swiglu_width(hidden: int) -> int:
    """The gated MLP's width for `hidden`: 8h/3 (as wide in parameters as GPT-2's 4h),
    rounded up to a multiple of 256 like Llama's."""
    return -(-8 * hidden // 3 // 256) * 256


@dataclass
class ArchConfig:
    """Sizes of a fresh model (used when `model.name_or_path` is unset): `type` names the
    family, the other keys are that family's own (as in its transformers config class);
    GPT-2: n_layer, n_head, n_embd, n_positions, n_inner; llama, qwen2, mistral:
    num_hidden_layers, num_attention_heads, num_key_value_heads (GQA; default: as many as
    heads), hidden_size, intermediate_size (default: `swiglu_width`), rope_theta,
    tie_word_embeddings, max_position_embeddings. Unset keys take ~124M defaults."""

    type: Literal["gpt2", "llama", "qwen2", "mistral"] = "gpt2"
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    n_positions: int | None = None
    n_inner: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    rope_theta: float | None = None
    tie_word_embeddings: bool | None = None
    max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        own = FAMILY_KEYS[self.type]
        for name in (*GPT2_KEYS, *LLAMA_KEYS):
            if name not in own and getattr(self, name) is not None:
                raise ValueError(f"{name}: not a {self.type} key{_other_name(name, own)}")
        for name in own:
            if getattr(self, name) is None:
                setattr(self, name, _DEFAULTS[name])
        if self.type == "gpt2":
            self._check_sizes("n_layer", "n_head", "n_embd", "n_positions", "n_inner")
            _divisible(self, "n_embd", "n_head")
            return
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = swiglu_width(self.hidden_size)
        self._check_sizes(*LLAMA_KEYS[:6])  # the integer sizes
        require(self.rope_theta > 0, f"rope_theta: must be > 0, got {self.rope_theta}")
        _divisible(self, "hidden_size", "num_attention_heads")
        require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_key_value_heads: {self.num_key_value_heads} does not divide "
            f"num_attention_heads={self.num_attention_heads} (each kv head serves a group)",
        )

    def _check_sizes(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            require(value is None or value >= 1, f"{name}: must be >= 1, got {value}")

    def hf_keys(self) -> dict[str, Any]:
        """The family's keys as its transformers config class takes them, with
        `model_type`: what `training.models.build` builds and `gptrain plan` reads."""
        return {"model_type": self.type, **{k: getattr(self, k) for k in FAMILY_KEYS[self.type]}}


# The same size under the other layout's name, for the error of a key of the wrong family.
_SAME_SIZE = dict(zip(GPT2_KEYS, LLAMA_KEYS[:5], strict=True))
_SAME_SIZE.update({v: k for k, v in _SAME_SIZE.items()})


def _other_name(name: str, own: tuple[str, ...]) -> str:
    if _SAME_SIZE.get(name) in own:
        return f" (did you mean {_SAME_SIZE[name]!r}?)"
    return f"; its keys are {', '.join(own)}"


def _divisible(arch: ArchConfig, name: str, by: str) -> None:
    value, divisor = getattr(arch, name), getattr(arch, by)
    require(value % divisor == 0, f"{name}: {value} is not divisible by {by}={divisor}")


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning: LoRA adapters on the pretrained base's layers.

    `target_modules: null` picks a per-architecture default (see `training.models.finetune`).
    """

    method: Literal["none", "lora"] = "none"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        require(self.r >= 1, f"r: must be >= 1, got {self.r}")
        require(self.alpha > 0, f"alpha: must be > 0, got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, f"dropout: must be in [0, 1), got {self.dropout}")
        require(
            self.target_modules is None or (bool(self.target_modules) and all(self.target_modules)),
            "target_modules: must be a non-empty list of module names, or null for the default",
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
    config: ArchConfig = field(default_factory=ArchConfig)
    dropout: float = 0.0
    # Recompute block activations in backward: `activation_checkpointing_fraction` of the
    # decoder blocks, spread evenly (1.0: every block; 0.5: every other one).
    activation_checkpointing: bool = False
    activation_checkpointing_fraction: float = 1.0
    # torch.compile: true = the whole model, "blocks" = each decoder block, false = eager;
    # "auto" = true on CUDA, false elsewhere (CPU inductor builds are slow to compile).
    # Under ZeRO-3 true means blocks (see training.models.build.compile_target).
    compile: Literal["auto", "blocks"] | bool = "auto"
    # Attention kernels: "sdpa" (flash, or memory-efficient with a document block mask) or
    # "flex_attention" (compiled block-sparse kernels that skip the blocks a document mask
    # hides; CUDA only for training: torch has no flex backward on CPU).
    attention: Literal["sdpa", "flex_attention"] = "sdpa"
    peft: PeftConfig = field(default_factory=PeftConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    add_tokens: list[str] | str | None = None  # tokens, or a file with one token per line

    def __post_init__(self) -> None:
        require(0.0 <= self.dropout < 1.0, f"dropout: must be in [0, 1), got {self.dropout}")
        require(
            0.0 < self.activation_checkpointing_fraction <= 1.0,
            "activation_checkpointing_fraction: must be in (0, 1], got "
            f"{self.activation_checkpointing_fraction}",
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
