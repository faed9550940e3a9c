"""Which Hugging Face causal LMs gptrain trains, and what it derives about one.

Any `model_type` in transformers' causal-LM mapping trains, fresh (`model.config:
{type: <model_type>, <that config class's own keys>}`) or pretrained
(`model.name_or_path`). Everything gptrain needs to know about a model is read from its
config or found on the built module tree, here:

- the config class and its keys (`config_class`, `config_keys`), checked with a
  did-you-mean, and the ids a fresh model takes from the run's tokenizer;
- the decoder-block classes (`block_classes`: transformers' own `_no_split_modules`),
  for activation checkpointing, per-block compile and ZeRO-3 leaf modules;
- how the output head turns hidden states into logits (`logit_transform`), for the
  chunked loss head;
- LoRA's default targets (`lora_targets`: the linear layers of a decoder block, the
  router aside);
- mixture-of-experts sizes (`moe`): experts, experts per token, the router's aux-loss
  coefficient.

`EXCEPTIONS`-style tables below are the few facts that cannot be derived; each says why.
No other module names a model family. transformers is imported lazily (its causal-LM
mapping alone takes seconds to import).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from dataclasses import dataclass
from typing import Any

from huggingface_hub.errors import StrictDataclassError

from training.errors import TrainingError, first_line

# A fresh model given no size: a ~124M decoder, whatever its family (the config classes'
# own defaults are the families' flagship sizes, 7B and up). Applied only to keys the
# family's config class has and the user left unset.
SMALL_DEFAULTS: dict[str, Any] = {
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_size": 768,
    "max_position_embeddings": 2048,
}
# Config keys that are the run's business, not the architecture's: set from the run
# (tokenizer, dropout, use_cache) or meaningless for training. Refused in model.config.
RUN_KEYS = frozenset(
    {
        "vocab_size",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "use_cache",
        "transformers_version",
        "architectures",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "dtype",
        "torch_dtype",
        "id2label",
        "label2id",
        "problem_type",
        "is_encoder_decoder",
        "chunk_size_feed_forward",
        "_name_or_path",
    }
)
# Dropout probabilities by config key; every family names them its own way, so the
# model's `model.dropout` sets whichever of these its config has.
DROPOUT_KEYS = (
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "hidden_dropout",
    "attention_dropout",
    "embedding_dropout",
    "mlp_dropout",
)
# Mixture-of-experts keys, by meaning: families spell them differently (Mixtral
# `num_local_experts`, Qwen3-MoE `num_experts`, DeepSeek `n_routed_experts`, ...).
_N_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOP_K = ("num_experts_per_tok", "moe_top_k", "top_k", "num_experts_per_token")
# Output heads that are not a plain linear map of the final hidden states, by config key
# (the model's own forward applies them after the head; the chunked loss must too).
#   final_logit_softcapping (Gemma 2/3): logits = cap · tanh(logits / cap)
#   logits_scaling (Granite): logits / scaling
#   logits_mup_width_multiplier (Inkling, μP): hidden / multiplier before a bias-free head
#   logit_scale (Cohere): logits · scale
LOGIT_SOFTCAP, LOGIT_MULTIPLY = "final_logit_softcapping", "logit_scale"
LOGIT_DIVIDE = ("logits_scaling", "logits_mup_width_multiplier")


# --- types and config classes ------------------------------------------------------------


def causal_lm_types() -> list[str]:
    """Every `model_type` transformers maps to a causal-LM class (its own registry)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def config_class(model_type: str, where: str = "model.config.type") -> type:
    """transformers' config class of a causal-LM `model_type`; one line naming `where`
    when it is unknown or not a causal LM."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    types = causal_lm_types()
    if model_type not in types:
        if model_type in CONFIG_MAPPING:
            raise TrainingError(
                f"{where}: {model_type!r} is not a causal LM in transformers (no "
                "AutoModelForCausalLM class); gptrain trains decoder language models"
            )
        close = difflib.get_close_matches(model_type, types, n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise TrainingError(f"{where}: unknown model type {model_type!r}{hint}")
    return CONFIG_MAPPING[model_type]


def config_keys(cls: type) -> list[str]:
    """The keys a config class takes: its dataclass fields (or its __init__'s), the
    aliases of its `attribute_map` (GPT-2 takes `hidden_size` for `n_embd`), and
    `rope_theta` where the class has `rope_parameters` (transformers 5 folded the one
    into the other and still accepts it; Llama-style configs in the wild carry it)."""
    names = config_fields(cls)
    names += [n for n in getattr(cls, "attribute_map", {}) if n not in names]
    if "rope_parameters" in names and "rope_theta" not in names:
        names.append("rope_theta")
    return names


def config_fields(cls: type) -> list[str]:
    """A config class's own fields (no aliases): where defaults may be filled in."""
    if dataclasses.is_dataclass(cls):
        names = [f.name for f in dataclasses.fields(cls)]
    else:
        names = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    return [n for n in names if not n.startswith("_") and n not in ("kwargs", "args")]


def fresh_config(
    arch: dict[str, Any],
    *,
    vocab_size: int,
    eos_id: int,
    pad_id: int | None = None,
    dropout: float = 0.0,
) -> Any:
    """The transformers config of a fresh model: `arch` is `model.config` (`type` and
    that class's keys). Sizes left unset take `SMALL_DEFAULTS`; with a hidden size and
    no MLP width the gated MLP is `swiglu_width`; head_dim unset is hidden / heads, kv
    heads unset as many as heads. The
    vocabulary and the special ids are the run's tokenizer's (EOS doubles as BOS: the
    shards delimit documents with EOS only)."""
    model_type = str(arch["type"])
    cls = config_class(model_type)
    keys = config_keys(cls)
    given = {k: v for k, v in arch.items() if k != "type"}
    for key in given:
        if key in RUN_KEYS:
            raise TrainingError(
                f"model.config.{key}: set by the run, not the architecture (the vocabulary "
                "and special ids come from the data's tokenizer)"
            )
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TrainingError(f"model.config.{key}: not a {model_type} config key{hint}")
    fields = config_fields(cls)
    values = {k: v for k, v in SMALL_DEFAULTS.items() if k in fields and k not in given}
    values.update(given)
    hidden, heads = values.get("hidden_size"), values.get("num_attention_heads")
    if "num_key_value_heads" in fields and heads and "num_key_value_heads" not in given:
        values["num_key_value_heads"] = heads  # unset: one kv head per query head
    if "intermediate_size" in fields and hidden and "intermediate_size" not in given:
        values["intermediate_size"] = swiglu_width(hidden)
    if "head_dim" in fields and hidden and heads and "head_dim" not in given:
        if hidden % heads:
            raise TrainingError(
                f"model.config.hidden_size: {hidden} is not divisible by "
                f"num_attention_heads={heads} (or set head_dim)"
            )
        values["head_dim"] = hidden // heads
    for key in DROPOUT_KEYS:
        if key in fields and key not in given:
            values[key] = dropout
    # A family's default special ids may lie outside a small vocabulary (phi3's pad id
    # 32000): the run's tokenizer decides them all.
    ids = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    try:
        config = cls(vocab_size=vocab_size, **{k: v for k, v in ids.items() if k in keys}, **values)
    except (TypeError, ValueError, StrictDataclassError) as exc:  # the class's own checks
        cause = exc.__cause__ if isinstance(exc, StrictDataclassError) and exc.__cause__ else exc
        raise TrainingError(f"model.config: {model_type}: {first_line(cause)}") from None
    for key, value in ids.items():
        setattr(config, key, value)
    check_sizes(config, "model.config")
    return config


def swiglu_width(hidden: int) -> int:
    """A gated MLP's width for `hidden`: 8h/3 (as wide in parameters as GPT-2's 4h),
    rounded up to a multiple of 256 like Llama's."""
    return -(-8 * hidden // 3 // 256) * 256


def check_sizes(config: Any, where: str) -> None:
    """Sizes every attention needs: positive layer/head counts and a query-head count
    that the key/value heads divide (each kv head serves a group)."""
    for key in ("num_hidden_layers", "num_attention_heads", "hidden_size", "n_layer", "n_head"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value < 1:
            raise TrainingError(f"{where}.{key}: must be >= 1, got {value}")
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(kv, int) and kv >= 1 and heads % kv:
        raise TrainingError(
            f"{where}.num_key_value_heads: {kv} does not divide num_attention_heads={heads} "
            "(each kv head serves a group of query heads)"
        )
    for hidden_key, heads_key in (("n_embd", "n_head"), ("hidden_size", "num_attention_heads")):
        hidden, n = getattr(config, hidden_key, None), getattr(config, heads_key, None)
        sized = isinstance(hidden, int) and isinstance(n, int) and n > 0
        if sized and not getattr(config, "head_dim", None) and hidden % n:
            raise TrainingError(
                f"{where}.{hidden_key}: {hidden} is not divisible by {heads_key}={n}"
            )
        if sized:
            break  # one spelling of the sizes is enough (GPT-2 maps the other onto it)


_ATTENTION_FLAGS = {
    "sdpa": "_supports_sdpa",
    "flex_attention": "_supports_flex_attn",
    "flash_attention_2": "_supports_flash_attn",
}


def attention_implementation(config: Any, requested: str) -> str:
    """`requested` (`model.attention`) if the model class supports it, else "eager"
    (Gemma 2 soft-caps its attention scores, which sdpa cannot): what the model is built
    with. Eager attention honours the same document masks."""
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping.get(type(config), None)
    flag = _ATTENTION_FLAGS.get(requested)
    if cls is None or flag is None or getattr(cls, flag, True):
        return requested
    return "eager"


# --- what the built model tells ----------------------------------------------------------


def block_classes(lm: Any) -> tuple[type, ...]:
    """The decoder-block classes of a built model: transformers' `_no_split_modules`
    (the classes it never splits across devices) that occur in the tree more than once,
    else its GradientCheckpointingLayer modules."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    names = set(getattr(_hf_model(lm), "_no_split_modules", None) or ())
    counts: dict[type, int] = {}
    for module in lm.modules():
        if type(module).__name__ in names:
            counts[type(module)] = counts.get(type(module), 0) + 1
    found = tuple(cls for cls, n in counts.items() if n > 1 or len(counts) == 1)
    if found:
        return found
    return tuple({type(m) for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)})


def _hf_model(lm: Any) -> Any:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(lm, "get_base_model", None)
    return get_base() if callable(get_base) else lm


@dataclass(frozen=True)
class LogitTransform:
    """What the model's forward does to `head(hidden)`: soft-cap, divide, multiply."""

    softcap: float | None = None
    divide: float | None = None
    multiply: float | None = None

    def __call__(self, logits: Any) -> Any:
        import torch

        if self.multiply is not None:
            logits = logits * self.multiply
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @property
    def identity(self) -> bool:
        return self.softcap is None and self.divide is None and self.multiply is None


def logit_transform(config: Any) -> LogitTransform:
    """The post-head transform of a config (see `LOGIT_SOFTCAP` and the others)."""
    text = getattr(config, "get_text_config", lambda: config)()

    def number(key: str) -> float | None:
        value = getattr(text, key, None)
        return float(value) if isinstance(value, (int, float)) and value not in (0, 1) else None

    divide = next((d for d in map(number, LOGIT_DIVIDE) if d is not None), None)
    return LogitTransform(
        softcap=number(LOGIT_SOFTCAP), divide=divide, multiply=number(LOGIT_MULTIPLY)
    )


def plain_head(lm: Any) -> bool:
    """Whether the logits are `get_output_embeddings()` of the base model's hidden states:
    every parameter belongs to the one or the other. BERT-style LM heads (a dense layer and
    a norm before the decoder) are not, and get their logits from the model's own forward."""
    model = _hf_model(lm)
    head = model.get_output_embeddings()
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model:
        return False
    owned = {id(p) for p in base.parameters()} | {id(p) for p in head.parameters()}
    return all(id(p) in owned for p in model.parameters())


@dataclass(frozen=True)
class MoeSizes:
    """A mixture-of-experts config: routed experts, experts per token, the router's
    load-balancing coefficient, and whether the model reports router logits
    (`output_router_logits`, which the aux loss and the expert-load figure need)."""

    n_experts: int
    top_k: int
    aux_loss_coef: float
    router_logits: bool


def moe(config: Any) -> MoeSizes | None:
    """The MoE sizes of a config, None for a dense model."""
    text = getattr(config, "get_text_config", lambda: config)()
    n_experts = _first(text, _N_EXPERTS)
    top_k = _first(text, _TOP_K)
    if not n_experts or not top_k or n_experts <= 1:
        return None
    coef = getattr(text, "router_aux_loss_coef", None) or 0.0
    return MoeSizes(int(n_experts), int(top_k), float(coef), hasattr(text, "output_router_logits"))


def aux_loss_function(lm: Any) -> Any:
    """The model's own router load-balancing loss: `load_balancing_loss_func(router_logits,
    n_experts, top_k, attention_mask)` of its modeling module (every transformers MoE that
    reports router logits has one); None if it has none."""
    import sys

    module = sys.modules.get(type(_hf_model(lm)).__module__)
    return getattr(module, "load_balancing_loss_func", None)


def _first(config: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def lora_targets(lm: Any) -> list[str]:
    """LoRA's default targets: the linear layers of one decoder block (attention and MLP),
    as paths inside the block (`self_attn.q_proj`, `attn.c_attn`, `mlp.down_proj`), which
    peft matches by suffix. A router (a layer with one output per expert) is left out:
    adapting it would let the adapter re-route tokens. Fused experts are 3-D parameters,
    not linear layers (see `model.peft.target_parameters`)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    classes = block_classes(lm)
    block = next((m for m in lm.modules() if isinstance(m, classes)), None)
    if block is None:
        return []
    sizes = moe(_hf_model(lm).config)
    targets = []
    for name, module in block.named_modules():
        if not name or not isinstance(module, (nn.Linear, Conv1D)):
            continue
        out = module.out_features if isinstance(module, nn.Linear) else module.nf
        if sizes and out == sizes.n_experts and "expert" not in name:
            continue  # the router
        if "lora_" in name or "base_layer" in name:
            continue
        targets.append(name)
    return targets


def uses_conv1d(lm: Any, targets: list[str]) -> bool:
    """Whether the targets are GPT-2-style Conv1D layers (peft's fan_in_fan_out)."""
    from transformers.pytorch_utils import Conv1D

    return any(
        isinstance(m, Conv1D) and any(n == t or n.endswith(f".{t}") for t in targets)
        for n, m in lm.named_modules()
    )
