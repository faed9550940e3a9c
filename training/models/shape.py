"""A decoder's shape for the plan: sizes, per-tensor parameter counts, and what LoRA or
freezing leaves trainable (`training.plan` turns them into bytes and FLOPs).

The shape of any causal LM is read off the model transformers builds from its config,
on the meta device (no weights, no memory; exact): every parameter tensor, the decoder
blocks (`training.model_registry.block_classes`), the embedding tables, and for a
mixture of experts the routed experts' parameters, found generically: the fused 3-D
parameters of an experts module (`mlp.experts.gate_up_proj`, experts first) or a
ModuleList of `n_experts` expert modules. The activation formulas' inputs come from the
same tree: whether the MLP is gated (its matrices' widths: f, f, f or 2f, f against
GPT-2's 4h, 4h), whether the block's norms are RMSNorm (which upcast to fp32) and how
many of them a block has. torch and transformers are imported only to build one.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from training import model_registry as registry
from training.errors import TrainingError, first_line

# Meta models built, by config (a plan, its LoRA count and its FLOPs share one build).
_META: OrderedDict[str, Any] = OrderedDict()
_META_KEEP = 4
_ARRAYS = ("numels", "block_numels", "block_params")


@dataclass(frozen=True)
class ModelShape:
    """What memory and FLOPs depend on, read off the built model (`shape_of`)."""

    n_layer: int
    hidden: int
    n_head: int
    n_kv_head: int
    head_dim: int
    vocab_size: int
    # MLP width one token passes through, averaged over the blocks (MoE: its top_k
    # routed experts' widths plus any shared expert's).
    ffn_hidden: int
    numels: tuple[int, ...]  # every parameter tensor, in module order, a tied one once
    block_numels: tuple[int, ...]  # the tensors of the largest decoder block
    block_params: tuple[int, ...]  # each decoder block's parameters, in order
    embedding_params: int  # every embedding table: tokens, learned positions, ...
    token_embedding_params: int
    tied_embeddings: bool = True
    # Rows of the other embedding tables: learned positions (0: rotary or none), ...
    n_positions: int = 0
    gated_mlp: bool = False  # act(gate(x)) * up(x), as Llama's; GPT-2's is act(fc(x))
    rms_norm: bool = False  # RMSNorm (upcasts its input to fp32) rather than LayerNorm
    block_norms: int = 2  # hidden-sized norms per block (Gemma: 4)
    attention: Literal["sdpa", "eager"] = "sdpa"
    model_type: str = ""
    expert_params: int = 0  # routed experts' parameters, all blocks
    n_experts: int = 0
    top_k: int = 0

    def layer_numels(self) -> list[int]:
        """Element count of each parameter tensor of one (the largest) decoder block."""
        return list(self.block_numels)

    def param_numels(self) -> list[int]:
        """Element count of every parameter tensor, in module order."""
        return list(self.numels)

    @property
    def n_params(self) -> int:
        return sum(self.numels)

    @property
    def active_params(self) -> int:
        """Parameters one token uses: all but the routed experts it is not sent to."""
        if not self.n_experts:
            return self.n_params
        idle = self.expert_params * (self.n_experts - self.top_k) / self.n_experts
        return self.n_params - round(idle)

    @property
    def lookup_params(self) -> int:
        """Parameters only looked up, never multiplied: the embedding tables, the token
        table aside when the LM head shares it."""
        return self.embedding_params - (self.token_embedding_params if self.tied_embeddings else 0)

    @property
    def query_width(self) -> int:
        return self.n_head * self.head_dim

    def summary(self) -> dict[str, Any]:
        """The sizes and facts, without the per-tensor lists (for `--json`)."""
        out = {k: v for k, v in asdict(self).items() if k not in _ARRAYS}
        return {**out, "n_params": self.n_params, "active_params": self.active_params}


# --- configs -------------------------------------------------------------------------------


def config_from_dict(data: dict[str, Any], where: str) -> Any:
    """The transformers config of a `config.json`'s contents, as AutoConfig reads it;
    TrainingError naming `where` (the file) when it has no model_type, is not a causal
    LM, or its class refuses it."""
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise TrainingError(
            f"{where}: no 'model_type' (transformers' name of the architecture, e.g. 'llama'); "
            "a config.json written by save_pretrained has one"
        )
    cls = registry.config_class(model_type, where=where)
    try:
        config = cls.from_dict(data)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise TrainingError(f"{where}: {model_type}: {first_line(exc)}") from None
    registry.check_sizes(config.get_text_config(), where)
    return config


def config_from_file(file: Path, *, trust_remote_code: bool = False) -> Any:
    """The transformers config of a pretrained dir's `config.json` (`file`). A model that
    ships its own code (`auto_map`) is read by AutoConfig with `trust_remote_code`."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise TrainingError(f"model.name_or_path: {file} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise TrainingError(f"model.name_or_path: {file} is not a JSON object")
    if trust_remote_code and "AutoModelForCausalLM" in (data.get("auto_map") or {}):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(file.parent, trust_remote_code=True)
    return config_from_dict(data, f"model.name_or_path: {file}")


# --- the meta model ------------------------------------------------------------------------


def meta_model(config: Any, *, trust_remote_code: bool = False, where: str = "model") -> Any:
    """The causal LM of `config` on the meta device (cached per config). TrainingError
    naming `where` (the config's source) when transformers cannot build it."""
    key = _config_key(config)
    if key in _META:
        _META.move_to_end(key)
        return _META[key]
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"), _without_zero3():
            lm = AutoModelForCausalLM.from_config(
                copy.deepcopy(config), trust_remote_code=trust_remote_code
            )
    except Exception as exc:  # whatever the model's own constructor raises: one line
        raise TrainingError(
            f"{where}: transformers cannot build this {config.model_type} model: {first_line(exc)}"
        ) from None
    _META[key] = lm
    while len(_META) > _META_KEEP:
        _META.popitem(last=False)
    return lm


@contextlib.contextmanager
def _without_zero3() -> Iterator[None]:
    """Hide a live `HfDeepSpeedConfig` (the trainer keeps one under ZeRO-3) while a meta
    model is built: transformers would build it under `deepspeed.zero.Init`, whose
    collectives hang when one rank builds alone (the MFU figure is rank 0's)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if ref is not None and ref() is not None:
            hf_deepspeed.set_hf_deepspeed_config(ref())


def _config_key(config: Any) -> str:
    try:
        return f"{type(config).__qualname__}:{config.to_json_string(use_diff=False)}"
    except (TypeError, ValueError):  # a value JSON cannot hold: this object only
        return f"{type(config).__qualname__}@{id(config)}"


def shape_from_hf_config(data: dict[str, Any], where: str = "config.json") -> ModelShape:
    """The shape of a model from a `config.json`'s contents."""
    return shape_of(config_from_dict(data, where), where=where)


def shape_of(config: Any, *, trust_remote_code: bool = False, where: str = "model") -> ModelShape:
    """The shape of the causal LM transformers builds from `config` (from `where`, for
    errors)."""
    from torch import nn

    lm = meta_model(config, trust_remote_code=trust_remote_code, where=where)
    text = config.get_text_config()
    blocks = _blocks(lm, getattr(text, "num_hidden_layers", None))
    token = lm.get_input_embeddings()
    head = lm.get_output_embeddings()
    tables = {id(m.weight): m for m in lm.modules() if isinstance(m, nn.Embedding)}
    hidden = getattr(text, "hidden_size", None) or token.embedding_dim
    heads = getattr(text, "num_attention_heads", None) or 1  # attention-free (Mamba): 1
    sizes = registry.moe(text)
    routed = [_routed(block, sizes.n_experts) if sizes else {} for block in blocks]
    mlp = [_mlp_width(b, hidden, sizes, set(r)) for b, r in zip(blocks, routed, strict=True)]
    expert_params = sum(p.numel() for r in routed for p in r.values())
    moe = sizes is not None and expert_params > 0
    block_params = [sum(p.numel() for p in b.parameters()) for b in blocks]
    largest = blocks[block_params.index(max(block_params))] if blocks else None
    return ModelShape(
        n_layer=len(blocks),
        hidden=hidden,
        n_head=heads,
        n_kv_head=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or hidden // heads,
        vocab_size=head.weight.shape[0] if head is not None else text.vocab_size,
        ffn_hidden=round(sum(w for w, _ in mlp) / len(mlp)) if mlp else 0,
        numels=tuple(p.numel() for p in lm.parameters()),
        block_numels=tuple(p.numel() for p in largest.parameters()) if largest else (),
        block_params=tuple(block_params),
        embedding_params=sum(m.weight.numel() for m in tables.values()),
        token_embedding_params=token.weight.numel(),
        tied_embeddings=head is not None and head.weight is token.weight,
        n_positions=sum(m.num_embeddings for m in tables.values() if m is not token),
        gated_mlp=any(gated for _, gated in mlp),
        rms_norm=any(not isinstance(n, nn.LayerNorm) for n in _norms(blocks, hidden)),
        block_norms=len(_norms(blocks[:1], hidden)),
        model_type=str(getattr(config, "model_type", "")),
        expert_params=expert_params if moe else 0,
        n_experts=sizes.n_experts if moe else 0,
        top_k=sizes.top_k if moe else 0,
    )


def _blocks(lm: Any, n_layers: int | None) -> list[Any]:
    """The decoder blocks in order: modules of `registry.block_classes`, or (when those
    are not the text decoder's `num_hidden_layers`, as in a model with a vision tower)
    the first ModuleList of that many modules."""
    from torch import nn

    classes = registry.block_classes(lm)
    blocks = [m for m in lm.modules() if isinstance(m, classes)] if classes else []
    if n_layers and len(blocks) != n_layers:
        for module in lm.modules():
            if isinstance(module, nn.ModuleList) and len(module) == n_layers:
                return list(module)
    return blocks


def _routed(block: Any, n_experts: int) -> dict[str, Any]:
    """The routed experts' parameters of one block, by name: those of a module holding
    fused 3-D parameters of `n_experts` rows (biases of as many rows with them), or under
    a ModuleList of `n_experts` modules. A shared expert is neither."""
    from torch import nn

    out: dict[str, Any] = {}
    for name, module in block.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if any(p.ndim >= 3 and p.shape[0] == n_experts for p in own.values()):
            out.update({f"{name}.{k}": p for k, p in own.items() if p.shape[0] == n_experts})
        if isinstance(module, nn.ModuleList) and len(module) == n_experts:
            out.update({f"{name}.{k}": p for k, p in module.named_parameters()})
    return out


def _in_attention(name: str, attention: list[str]) -> bool:
    return any(name == a or name.startswith(f"{a}.") for a in attention)


def _attention_modules(block: Any) -> list[str]:
    """Names of a block's attention modules (transformers names every attention class
    `...Attention`)."""
    return [n for n, m in block.named_modules() if n and "attention" in type(m).__name__.lower()]


def _mlp_width(block: Any, hidden: int, sizes: Any, routed: set[str]) -> tuple[float, bool]:
    """(MLP width one token passes through, gated) of one block. The block's matrices
    outside attention are grouped by their MLP (its module, or one expert); each
    matrix's width is its side that is not `hidden`. An MLP of widths f, f (GPT-2's
    fc and proj) is plain; f, f, f or 2f, f (fused gate_up) is gated. Routed experts
    count top_k times, a router (one output per expert, or a single one) not at all."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    attention = _attention_modules(block)
    n_experts = sizes.n_experts if sizes else 0
    widths: dict[str, list[int]] = {}
    copies: dict[str, float] = {}

    def add(group: str, fan_in: int, fan_out: int, n: float) -> None:
        widths.setdefault(group, []).append(fan_out if fan_in == hidden else fan_in)
        copies[group] = n

    for name, module in block.named_modules():
        if _in_attention(name, attention):
            continue
        if isinstance(module, (nn.Linear, Conv1D)):
            linear = isinstance(module, nn.Linear)
            fan_in = module.in_features if linear else module.nx
            fan_out = module.out_features if linear else module.nf
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            if f"{name}.weight" in routed:  # one expert of a ModuleList of them
                add(owner, fan_in, fan_out, sizes.top_k / n_experts)
            elif fan_out not in (1, n_experts):  # not a router or a shared expert's gate
                add(owner, fan_in, fan_out, 1.0)
            continue
        for key, p in module.named_parameters(recurse=False):
            if p.ndim == 3 and f"{name}.{key}" in routed:  # fused (experts, out, in)
                add(name, p.shape[2], p.shape[1], float(sizes.top_k))
    width, gated = 0.0, False
    for group, ws in widths.items():
        f = min(ws)
        width += copies[group] * f
        gated = gated or (len(ws) >= 2 and sum(ws) >= 2.5 * f)
    return width, gated


def _norms(blocks: list[Any], hidden: int) -> list[Any]:
    """The hidden-sized norms of the blocks (outside attention: not q/k norms): leaf
    modules whose parameters are all vectors of `hidden` elements, or a parameter-free
    norm (OLMo's LayerNorm)."""
    from torch import nn

    out = []
    for block in blocks:
        attention = _attention_modules(block)
        for name, module in block.named_modules():
            if list(module.children()) or _in_attention(name, attention):
                continue
            params = list(module.parameters(recurse=False))
            vectors = all(p.ndim == 1 and p.shape[0] == hidden for p in params)
            named = "norm" in type(module).__name__.lower()
            if not isinstance(module, (nn.Linear, nn.Embedding)) and (
                (params and vectors) or (not params and named)
            ):
                out.append(module)
    return out


# --- trainable parameters ------------------------------------------------------------------


def _matches(name: str, target: str) -> bool:
    """peft's match of a target to a module or parameter name: the name or its suffix."""
    return name == target or name.endswith(f".{target}")


def lora_params(
    config: Any,
    rank: int,
    target_modules: list[str] | None = None,
    target_parameters: list[str] | None = None,
    *,
    trust_remote_code: bool = False,
) -> int:
    """LoRA adapter parameters of `config`'s model, counted on its meta model: r·(in + out)
    per adapted linear or embedding layer (the base is frozen). `target_modules` None:
    every linear layer of the decoder blocks (`registry.lora_targets`). Each of
    `target_parameters` (e.g. fused experts `mlp.experts.gate_up_proj`) adds r·(in + out)
    per expert, as peft's ParamWrapper allocates."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    lm = meta_model(config, trust_remote_code=trust_remote_code)
    targets = list(target_modules) if target_modules else registry.lora_targets(lm)
    total = 0
    for name, module in lm.named_modules():
        if not any(_matches(name, t) for t in targets):
            continue
        if isinstance(module, nn.Linear):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, Conv1D):
            total += rank * (module.nx + module.nf)
        elif isinstance(module, nn.Embedding):
            total += rank * (module.num_embeddings + module.embedding_dim)
    for name, param in lm.named_parameters():
        if target_parameters and any(_matches(name, t) for t in target_parameters):
            experts = param.shape[0] if param.ndim == 3 else 1
            total += experts * rank * (param.shape[-2] + param.shape[-1])
    return total


def unfrozen_params(shape: ModelShape, embeddings: bool, first_blocks: int) -> int:
    """Parameters left trainable after freezing the embedding tables (a tied LM head is
    the same tensor) and/or the first decoder blocks."""
    frozen = shape.embedding_params if embeddings else 0
    return shape.n_params - frozen - sum(shape.block_params[:first_blocks])
