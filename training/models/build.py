"""Build the causal LM: a local pretrained HF directory or a fresh model of any causal-LM
type (`training.model_registry`), through transformers' own config and model classes.

Under ZeRO-3 an `HfDeepSpeedConfig` must be alive while the model is built so
transformers constructs it already partitioned (a model bigger than one rank's
memory never exists whole); the caller keeps the returned handle.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from training import model_registry as registry
from training.errors import TrainingError
from training.model_config import ModelConfig
from training.models.finetune import (
    apply_finetune,
    check_added_tokens,
    check_finetune,
    resize_vocab,
)
from training.models.loss import attach_token_loss
from training.models.tiling import tile_mlps

log = logging.getLogger("gptrain")


def _positions(config: Any) -> int | None:
    for key in ("n_positions", "max_position_embeddings"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return None


def _tokenizer_vocab(path: Path) -> dict[str, int] | None:
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    return json.loads(file.read_text())["model"].get("vocab")


def pretrained_config_file(model: ModelConfig) -> Path | None:
    """`model.name_or_path`'s config.json, None for a fresh model; TrainingError naming the
    key when it is not a local HF model directory (the launcher and `plan` check it too)."""
    if not model.name_or_path:
        return None
    path = Path(model.name_or_path)
    if not (path / "config.json").is_file():
        what = "no config.json" if path.is_dir() else "no such directory"
        raise TrainingError(
            f"model.name_or_path: {path} is not a local HF model directory ({what}); "
            "gptrain loads pretrained models from disk (save_pretrained / huggingface-cli download)"
        )
    return path / "config.json"


def load_hf_config(model: ModelConfig, *, vocab_size: int, eos_id: int, seq_len: int) -> Any:
    """The HF config of the model to train, checked against the data it will see and the
    fine-tuning options. With `model.add_tokens` a smaller pretrained vocabulary is the
    one `build_model` resizes to the tokenizer's `vocab_size`."""
    from transformers import AutoConfig

    if (config_file := pretrained_config_file(model)) is not None:
        path = config_file.parent
        check_remote_code(model, config_file)
        config = AutoConfig.from_pretrained(path, trust_remote_code=model.trust_remote_code)
        if not _remote_code(config_file):
            registry.config_class(config.model_type, where=f"model.name_or_path: {path}")
        registry.check_sizes(config, "model.name_or_path")
        if config.vocab_size < vocab_size and model.add_tokens is None:
            raise TrainingError(
                f"model.name_or_path: {path} has vocab_size {config.vocab_size} but the shards' "
                f"tokenizer has {vocab_size} tokens; prepare the data with --tokenizer {path} "
                "(or set model.add_tokens to the tokens prepare --add-tokens added)"
            )
        config.vocab_size = max(config.vocab_size, vocab_size)
        for key in registry.DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(config, key, model.dropout)
    else:
        config = fresh_hf_config(model, vocab_size=vocab_size, eos_id=eos_id)
    positions = _positions(config)
    if positions is not None and seq_len > positions:
        raise TrainingError(
            f"data.seq_len: {seq_len} is longer than the model's {positions} positions; "
            "lower data.seq_len (or raise model.config's n_positions / "
            "max_position_embeddings for a fresh model)"
        )
    config.use_cache = False
    check_finetune(model, config)
    return config


def fresh_hf_config(model: ModelConfig, *, vocab_size: int, eos_id: int) -> Any:
    """The transformers config of a fresh model of `model.config`'s type and sizes
    (`training.model_registry.fresh_config`)."""
    return registry.fresh_config(
        model.config, vocab_size=vocab_size, eos_id=eos_id, dropout=model.dropout
    )


def _remote_code(config_file: Path) -> bool:
    """Whether a pretrained dir's model is its own code (config.json `auto_map`)."""
    try:
        data = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise TrainingError(
            f"model.name_or_path: {config_file} is not readable JSON: {exc}"
        ) from None
    return "AutoModelForCausalLM" in (data.get("auto_map") or {})


def check_remote_code(model: ModelConfig, config_file: Path) -> None:
    """A model that ships its own code runs only with `model.trust_remote_code: true`."""
    if _remote_code(config_file) and not model.trust_remote_code:
        raise TrainingError(
            f"model.name_or_path: {config_file.parent} ships its own model code (auto_map in "
            "config.json); set model.trust_remote_code=true to run it"
        )


def check_tokenizer(model: ModelConfig, tokenizer_dir: Path) -> None:
    """A pretrained model dir's own tokenizer must be the one the shards were made with
    (tokens added by prepare --add-tokens aside), and `model.add_tokens` must be in it."""
    check_added_tokens(model, tokenizer_dir)
    if not model.name_or_path:
        return
    theirs = _tokenizer_vocab(Path(model.name_or_path))
    ours = _tokenizer_vocab(tokenizer_dir)
    if theirs is not None and ours is not None and theirs != ours:
        raise TrainingError(
            f"model.name_or_path: the tokenizer in {model.name_or_path} differs from the one "
            f"the shards were made with ({tokenizer_dir}); re-run gptrain prepare with "
            f"--tokenizer {model.name_or_path}"
        )


def check_attention(model: ModelConfig, *, cuda: bool) -> None:
    """`model.attention` must be able to train here: flex attention has no CPU backward,
    flash_attention_2 needs CUDA and the flash-attn package."""
    import importlib.util

    if model.attention == "flex_attention" and not cuda:
        raise TrainingError(
            "model.attention: flex_attention trains on CUDA GPUs only (torch has no flex "
            "backward on CPU); use sdpa here"
        )
    if model.attention == "flash_attention_2" and (
        not cuda or importlib.util.find_spec("flash_attn") is None
    ):
        raise TrainingError(
            "model.attention: flash_attention_2 needs a CUDA GPU and the flash-attn package "
            "(pip install flash-attn); use sdpa here"
        )


def build_model(
    model: ModelConfig,
    hf_config: Any,
    ds_config: dict[str, Any],
    attention: str | None = None,
) -> tuple[Any, Any]:
    """(model, keepalive): the HF causal LM, sharded at construction under ZeRO-3, its
    vocabulary grown to `hf_config.vocab_size`, LoRA-wrapped / partly frozen as configured.
    `attention`: an attention-interface name that replaces `model.attention` (sequence
    parallelism's, training.parallel.sequence)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    keepalive = None
    if ds_config["zero_optimization"]["stage"] == 3:
        keepalive = HfDeepSpeedConfig(ds_config)
    chosen = attention
    attention = chosen or registry.attention_implementation(hf_config, model.attention)
    if chosen is None and attention != model.attention:
        log.warning(
            "model.attention: %s does not support %s; it runs %s attention",
            hf_config.model_type,
            model.attention,
            attention,
        )
    if model.name_or_path:
        base_config = copy.deepcopy(hf_config)  # the checkpoint's own vocabulary size
        base_config.vocab_size = AutoConfig.from_pretrained(model.name_or_path).vocab_size
        lm = AutoModelForCausalLM.from_pretrained(
            model.name_or_path,
            config=base_config,
            attn_implementation=attention,
            trust_remote_code=model.trust_remote_code,
        )
        resize_vocab(lm, hf_config.vocab_size)
    else:
        lm = AutoModelForCausalLM.from_config(
            hf_config,
            attn_implementation=attention,
            trust_remote_code=model.trust_remote_code,
        )
    if model.activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        blocks = decoder_blocks(lm)
        for block, on in zip(
            blocks,
            checkpointed_blocks(len(blocks), model.activation_checkpointing_fraction),
            strict=True,
        ):
            block.gradient_checkpointing = on
            if on and model.activation_checkpointing_offload:
                block._gradient_checkpointing_func = offload_inputs(
                    block._gradient_checkpointing_func
                )
    if model.tiled_mlp:
        tiled = tile_mlps(
            decoder_blocks(lm), model.tiled_mlp_shards, registry.moe(hf_config) is not None
        )
        log.info("model.tiled_mlp: the MLPs of %d blocks run in sequence slices", tiled)
    attach_token_loss(lm)
    # from_pretrained returns eval mode: without train() dropout would be off and HF
    # would skip gradient checkpointing until the first evaluation switched it back.
    lm.train()
    return apply_finetune(lm, model), keepalive


def decoder_blocks(lm: Any) -> list[Any]:
    """The repeated decoder blocks of an HF causal LM, in order (`registry.block_classes`)."""
    classes = registry.block_classes(lm)
    return [m for m in lm.modules() if isinstance(m, classes)] if classes else []


def checkpointed_blocks(n_blocks: int, fraction: float) -> list[bool]:
    """Which of `n_blocks` blocks recompute activations so that `fraction` of them do,
    spread evenly: 0.5 → every second block, 1/3 → every third, 1.0 → all."""
    return [int((i + 1) * fraction + 1e-9) > int(i * fraction + 1e-9) for i in range(n_blocks)]


def offload_inputs(checkpoint: Any) -> Any:
    """`checkpoint` (transformers' per-block checkpoint function) keeping what it saves
    for backward in host memory: under non-reentrant checkpointing that is exactly the
    block's inputs (the hidden states between blocks, the one activation per block that
    checkpointing keeps; torch saves them through the saved-tensor hooks that
    `save_on_cpu` sets, and the block's own tensors through its recompute hooks), copied
    to pinned memory on a GPU and back in backward."""
    import torch

    def checkpoint_offloaded(*args: Any, **kwargs: Any) -> Any:
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return checkpoint(*args, **kwargs)

    return checkpoint_offloaded


def compile_target(mode: str | bool, *, cuda: bool, zero_stage: int) -> str:
    """What `model.compile` compiles here: "off", "model" or "blocks" ("auto": the model
    on CUDA, nothing elsewhere). Under ZeRO-3 always the blocks: ZeRO-3 gathers parameters
    in hooks of every submodule, which dynamo does not trace (a graph break at each; a
    block under activation checkpointing then runs eager whole). There each decoder block
    becomes a ZeRO-3 leaf (`gather_per_block`) and its forward is compiled: one graph
    for every block, checkpointing included, no break."""
    if mode == "auto":
        mode = cuda
    if mode is False:
        return "off"
    return "blocks" if mode == "blocks" or zero_stage == 3 else "model"


def blocks_to_compile(lm: Any) -> list[Any]:
    """The decoder blocks a per-block compile compiles; one line if the model has none."""
    blocks = decoder_blocks(lm)
    if not blocks:
        raise TrainingError(
            f"model.compile: {type(lm).__name__} has no decoder blocks (transformers' "
            "_no_split_modules) to compile one by one (what ZeRO-3 and "
            '"blocks" do); set model.compile=false'
        )
    return blocks


def gather_per_block(lm: Any) -> None:
    """ZeRO-3 gathers each decoder block's parameters at once, by the block's own hook,
    instead of one hook per submodule (call before `deepspeed.initialize`)."""
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(lm, list({type(block) for block in blocks_to_compile(lm)}))


def compile_engine(engine: Any, target: str) -> None:
    """torch.compile the engine's model in place as `compile_target` decided (parameter
    names and checkpoints are unchanged)."""
    import torch

    # transformers ≥ 5.25 wraps layer forwards in `kernels` (its hub-kernel hooks),
    # which set and reset a context variable around each call. Inside an
    # activation-checkpointed region dynamo refuses that side effect (a graph break
    # per block) unless told that recompute may skip it: harmless here, the pair
    # leaves no state behind and gptrain never kernelizes a model. (Older torch has
    # neither the flag nor the need.)
    skip_flag = "skip_fwd_side_effects_in_bwd_under_checkpoint"
    if target != "off" and hasattr(torch._dynamo.config, skip_flag):
        setattr(torch._dynamo.config, skip_flag, True)
    if target == "blocks":  # forward only: the module hooks (ZeRO-3 gathers) stay eager
        for block in blocks_to_compile(engine.module):
            block.forward = torch.compile(block.forward)
    elif target == "model":
        engine.compile()  # DeepSpeed's own entry: module.compile() with its hooks prepared


def compile_report() -> str:
    """What torch.compile made of the model so far: graphs and graph breaks."""
    from torch._dynamo.utils import counters

    breaks = sum(counters["graph_break"].values())
    text = f"{counters['stats']['unique_graphs']} graph(s), {breaks} graph break(s)"
    return text + (" (TORCH_LOGS=graph_breaks shows where)" if breaks else "")


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices, not biases, norms or other 1-D parameters."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 params are flattened
        (decay if len(shape) >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def model_fingerprint(hf_config: Any) -> dict[str, Any]:
    """The shape-defining part of a model config, to refuse a foreign checkpoint (see
    `fingerprint_diff`)."""
    keys = (
        "model_type",
        "vocab_size",
        "n_layer",
        "n_head",
        "n_embd",
        "n_positions",
        "n_inner",
        "num_hidden_layers",
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "moe_intermediate_size",
        "num_experts",
        "num_local_experts",
        "num_experts_per_tok",
        "tie_word_embeddings",
    )
    return {k: getattr(hf_config, k) for k in keys if getattr(hf_config, k, None) is not None}


def fingerprint_diff(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple]:
    """{key: (saved, current)} where they differ (None: unset); a key only the current
    fingerprint has (a checkpoint from before the key was recorded) is not a difference."""
    return {k: (v, current.get(k)) for k, v in saved.items() if current.get(k) != v}
