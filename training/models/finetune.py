"""Fine-tuning options of `model`: LoRA adapters, frozen parameters, added tokens.

    model:
      name_or_path: models/gpt2-xl
      peft: {method: lora, r: 16, alpha: 32}     # adapters only train and are saved
      freeze: {embeddings: true, first_blocks: 4, patterns: ["*.ln_*"]}
      add_tokens: [<clause>, <party>]            # or a file, one token per line

LoRA wraps the model with `peft` before `deepspeed.initialize` (under ZeRO-3 the
base is already partitioned; DeepSpeed partitions the new adapter weights).
Everything that can be wrong with these options is checked in `check_finetune`
on a meta-device copy of the model, before any process group starts.
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path
from typing import Any

from training import model_registry as registry
from training.errors import TrainingError
from training.model_config import FreezeConfig, ModelConfig, PeftConfig

log = logging.getLogger("gptrain")

_PEFT_PREFIX = "base_model.model."  # what peft puts in front of the HF parameter names


def is_lora(model: ModelConfig) -> bool:
    return model.peft.method == "lora"


def target_modules(peft: PeftConfig, lm: Any) -> list[str]:
    """The configured LoRA targets, or the model's default: every linear layer of its
    decoder blocks, the MoE router aside (`registry.lora_targets`)."""
    if peft.target_modules is not None:
        return list(peft.target_modules)
    targets = registry.lora_targets(lm)
    if not targets:
        raise TrainingError(
            f"model.peft.target_modules: {type(lm).__name__} has no linear layers in its "
            "decoder blocks to adapt by default; list the modules to adapt"
        )
    return targets


def lora_config(peft: PeftConfig, lm: Any) -> Any:
    """The `peft.LoraConfig` for our `model.peft` section and this model."""
    from peft import LoraConfig

    targets = target_modules(peft, lm)
    return LoraConfig(
        r=peft.r,
        lora_alpha=peft.alpha,
        lora_dropout=peft.dropout,
        bias="none",
        target_modules=targets,
        target_parameters=peft.target_parameters,
        task_type="CAUSAL_LM",
        fan_in_fan_out=registry.uses_conv1d(lm, targets),  # GPT-2's Conv1D layers
    )


# --- checks before any process group --------------------------------------------------------


def _adaptable(module: Any) -> bool:
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, torch.nn.Embedding, Conv1D))


def check_targets(targets: list[str], modules: dict[str, Any], model_type: str) -> None:
    """Every LoRA target must name (the end of) at least one linear/embedding layer.

    Matching is peft's: a module `a.b.c` matches target `c`, `b.c` or `a.b.c`. Fused MoE
    experts are 3-D parameters, not layers: a target naming them says what to set instead.
    """
    for target in targets:
        hits = [m for name, m in modules.items() if name == target or name.endswith(f".{target}")]
        fused = [
            f"{target}.{n}"
            for m in hits
            for n, p in m.named_parameters(recurse=False)
            if p.dim() == 3 and not _adaptable(m)
        ]
        if fused and not any(_adaptable(m) for m in hits):
            raise TrainingError(
                f"model.peft.target_modules: {target!r} holds fused expert weights (3-D "
                "parameters), not linear layers; adapt them with model.peft.target_parameters="
                f"[{', '.join(sorted(set(fused)))}]"
            )
        if not any(_adaptable(m) for m in hits):
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if _adaptable(m)})
            found = "matches no module" if not hits else "matches no linear layer"
            raise TrainingError(
                f"model.peft.target_modules: {target!r} {found} of the {model_type} model; "
                f"its linear/embedding layers are: {', '.join(linear)}"
            )


def check_target_parameters(names: list[str], params: list[str]) -> None:
    """Every `peft.target_parameters` entry must end at least one parameter's name."""
    for name in names:
        if not any(p == name or p.endswith(f".{name}") for p in params):
            raise TrainingError(
                f"model.peft.target_parameters: {name!r} matches no parameter "
                f"(names look like {params[len(params) // 2]!r})"
            )


def strip_peft_prefix(name: str) -> str:
    return name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name


def block_list(model: Any) -> tuple[str, int]:
    """(dotted name, length) of the model's list of decoder blocks, found generically: the
    first ModuleList as long as the config's layer count (`transformer.h`, `model.layers`)."""
    import torch

    n_layers = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return strip_peft_prefix(name), len(module)
    raise TrainingError(
        "model.freeze.first_blocks: cannot find the decoder blocks of this model "
        "(no ModuleList of num_hidden_layers modules); use model.freeze.patterns"
    )


def embedding_names(model: Any) -> set[str]:
    """Parameter names of the token and position embedding tables (a tied LM head is the
    same tensor, so it is frozen with them)."""
    import torch

    names = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            names |= {strip_peft_prefix(f"{mod_name}.{p}") for p, _ in module.named_parameters()}
    return names


def select_frozen(
    names: list[str],
    freeze: FreezeConfig,
    *,
    blocks: tuple[str, int] | None,
    embeddings: set[str],
) -> set[str]:
    """The parameter names `freeze` selects (names without peft's prefix).

    Raises TrainingError for more blocks than the model has or a pattern matching nothing.
    """
    chosen: set[str] = set()
    if freeze.embeddings:
        chosen |= embeddings & set(names)
    if freeze.first_blocks:
        prefix, count = blocks if blocks is not None else ("", 0)
        if freeze.first_blocks > count:
            raise TrainingError(
                f"model.freeze.first_blocks: {freeze.first_blocks} but the model has {count} blocks"
            )
        heads = tuple(f"{prefix}.{i}." for i in range(freeze.first_blocks))
        chosen |= {n for n in names if n.startswith(heads)}
    for pattern in freeze.patterns:
        hits = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            raise TrainingError(
                f"model.freeze.patterns: {pattern!r} matches no parameter "
                f"(names look like {names[len(names) // 2]!r})"
            )
        chosen |= hits
    return chosen


def _freezes(freeze: FreezeConfig) -> bool:
    return freeze.embeddings or freeze.first_blocks > 0 or bool(freeze.patterns)


def check_finetune(model: ModelConfig, hf_config: Any) -> None:
    """Check LoRA targets and freeze selection on a meta-device model (no memory, no
    process group), so a typo fails in a second with a one-line error."""
    if not is_lora(model) and not _freezes(model.freeze):
        return
    from training.models.shape import meta_model

    # the plan's and the MFU figure's cached meta build: one per model, not one per check
    lm = meta_model(hf_config, trust_remote_code=model.trust_remote_code)
    if is_lora(model):
        modules = dict(lm.named_modules())
        check_targets(target_modules(model.peft, lm), modules, hf_config.model_type)
        if model.peft.target_parameters:
            names = [n for n, _ in lm.named_parameters()]
            check_target_parameters(model.peft.target_parameters, names)
    if _freezes(model.freeze):
        names = [n for n, _ in lm.named_parameters()]
        blocks = block_list(lm) if model.freeze.first_blocks else None
        select_frozen(names, model.freeze, blocks=blocks, embeddings=embedding_names(lm))


# --- applying them to the real model --------------------------------------------------------


def apply_finetune(lm: Any, model: ModelConfig) -> Any:
    """Wrap with LoRA (base frozen) and freeze what `model.freeze` selects; returns the
    model to hand to DeepSpeed (a `PeftModel` under LoRA)."""
    if is_lora(model):
        from peft import get_peft_model

        lm = get_peft_model(lm, lora_config(model.peft, lm))
    if _freezes(model.freeze):
        named = [(strip_peft_prefix(n), p) for n, p in lm.named_parameters()]
        blocks = block_list(lm) if model.freeze.first_blocks else None
        chosen = select_frozen(
            [n for n, _ in named], model.freeze, blocks=blocks, embeddings=embedding_names(lm)
        )
        for name, param in named:
            if name in chosen:
                param.requires_grad_(False)
    return lm


def param_counts(lm: Any) -> dict[str, int]:
    """Trainable and total parameter counts (ZeRO-3 partitioned parameters count whole)."""
    trainable = total = 0
    for param in lm.parameters():
        numel = getattr(param, "ds_numel", param.numel())
        total += numel
        trainable += numel if param.requires_grad else 0
    return {"params_trainable": trainable, "params_total": total}


# --- added tokens ---------------------------------------------------------------------------


def added_tokens(model: ModelConfig) -> list[str]:
    """`model.add_tokens` as a list, read exactly as `gptrain prepare --add-tokens` reads it:
    a list, a file with one token per line, or comma-separated."""
    from sharding.errors import DataError
    from sharding.tokenizer import read_token_list

    if model.add_tokens is None:
        return []
    try:
        return read_token_list(model.add_tokens)
    except (DataError, OSError) as exc:
        raise TrainingError(f"model.add_tokens: {exc}") from None


def check_added_tokens(model: ModelConfig, tokenizer_dir: Path) -> None:
    """Each added token must be a single id of the shards' tokenizer (prepare added it)."""
    tokens = added_tokens(model)
    if not tokens:
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for token in tokens:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1 or tokenizer.convert_tokens_to_ids(token) != ids[0]:
            raise TrainingError(
                f"model.add_tokens: {token!r} is not a single token of the shards' tokenizer "
                f"({tokenizer_dir}; it encodes as {len(ids)} ids); re-run gptrain prepare "
                "with --add-tokens"
            )


def resize_vocab(lm: Any, vocab_size: int) -> None:
    """Grow the token embeddings (and an untied LM head) to `vocab_size` rows; each new
    row is the mean of the old rows. Works on ZeRO-3 partitioned models."""
    old = lm.get_input_embeddings().weight
    old_rows = int(getattr(old, "ds_shape", old.shape)[0])
    if vocab_size <= old_rows:
        return
    lm.resize_token_embeddings(vocab_size, mean_resizing=False)
    weights = {
        id(m.weight): m.weight
        for m in (lm.get_input_embeddings(), lm.get_output_embeddings())
        if m is not None
    }
    for weight in weights.values():
        _fill_mean_rows(weight, old_rows)
    log.info(
        "resized the vocabulary from %d to %d tokens (new rows = mean of the old)",
        old_rows,
        vocab_size,
    )


def _fill_mean_rows(weight: Any, old_rows: int) -> None:
    import torch

    def fill() -> None:
        mean = weight.data[:old_rows].float().mean(dim=0)
        weight.data[old_rows:] = mean.to(weight.dtype)

    with torch.no_grad():
        if hasattr(weight, "ds_id"):  # still partitioned: gather, fill on rank 0, scatter
            import deepspeed
            import torch.distributed as dist

            with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
                if not dist.is_initialized() or dist.get_rank() == 0:
                    fill()
        else:
            fill()


# --- rebuilding a LoRA model outside training ------------------------------------------------


def lora_model_for_checkpoint(model: ModelConfig, hf_config: Any) -> Any:
    """The fp32 base from `model.name_or_path`, resized to the checkpoint's vocabulary and
    wrapped with fresh LoRA adapters, ready for the checkpoint's adapter weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = Path(model.name_or_path or "")
    if not (base / "config.json").is_file():
        raise TrainingError(
            f"model.name_or_path: {base} is not a local HF model directory; this LoRA run's "
            "checkpoints hold the adapters only and need their base model there"
        )
    remote = model.trust_remote_code
    base_config = AutoConfig.from_pretrained(base, trust_remote_code=remote)
    lm = AutoModelForCausalLM.from_pretrained(
        base, config=base_config, dtype="float32", trust_remote_code=remote
    )
    resize_vocab(lm, hf_config.vocab_size)
    lm.tie_weights()
    return apply_finetune(lm, model)


def restore_frozen_from_base(lm: Any, model: ModelConfig, precision: str) -> None:
    """Frozen weights exactly as in the base model: under bf16/fp16 DeepSpeed keeps (and
    checkpoints) frozen weights in 16 bits only, while the base has them in full. Each is
    checked to round to the checkpoint's value, so a base changed since training is refused.
    Without the base directory the checkpoint's values stay."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(model.name_or_path or "")
    if not _freezes(model.freeze) or precision == "fp32" or not (path / "config.json").is_file():
        return
    base = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    resize_vocab(base, lm.config.vocab_size)
    names = [n for n, _ in base.named_parameters()]
    blocks = block_list(base) if model.freeze.first_blocks else None
    chosen = select_frozen(names, model.freeze, blocks=blocks, embeddings=embedding_names(base))
    exact, ours = dict(base.named_parameters()), dict(lm.named_parameters())
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.no_grad():
        for name in sorted(chosen):
            if not torch.equal(exact[name].to(dtype).float(), ours[name].float()):
                raise TrainingError(
                    f"model.name_or_path: frozen weight {name} of {path} does not match the "
                    "checkpoint; the base model changed since training"
                )
            ours[name].copy_(exact[name])
