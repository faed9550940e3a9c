"""The sweep: every `model_type` in this transformers' causal-LM mapping that builds from a
tiny generic config trains through gptrain's path: the plan counts its parameters
exactly (meta device), and one forward + backward through gptrain's chunked loss head
gives the loss of the model's own logits and gradients on every trainable parameter
reached. A type that does not build from the generic config (it needs sizes or ids of
its own, or is not a plain text decoder) is skipped with the reason, so `pytest -rs`
lists what is not covered; a new transformers release is then covered without code."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import tiny_arch
from training import model_registry as registry
from training.errors import first_line

VOCAB, EOS = 128, 1
MAX_TINY_PARAMS = 20_000_000  # a type whose size keys we do not know stays big: skipped


def _build(model_type: str) -> tuple[object, object]:
    """(config, model), or pytest.skip naming why the type does not build tiny."""
    from transformers import AutoModelForCausalLM

    try:
        config = registry.fresh_config(tiny_arch(model_type), vocab_size=VOCAB, eos_id=EOS)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
        n_params = sum(p.numel() for p in meta.parameters())
        if n_params > MAX_TINY_PARAMS:
            pytest.skip(f"{model_type}: {n_params / 1e6:.0f}M parameters with the generic sizes")
        torch.manual_seed(0)
        attention = registry.attention_implementation(config, "sdpa")  # as gptrain builds it
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    except pytest.skip.Exception:
        raise
    except Exception as exc:  # noqa: BLE001 - the reason is the report
        pytest.skip(f"{model_type}: does not build from a tiny generic config: {first_line(exc)}")
    return config, model


@pytest.mark.parametrize("model_type", registry.causal_lm_types())
def test_every_causal_lm_type_trains_through_gptrains_path(model_type: str) -> None:
    import torch.nn.functional as F

    from training.models.loss import attach_token_loss
    from training.models.shape import shape_from_hf_config

    config, model = _build(model_type)
    model.eval()  # no dropout of any name; gradients flow all the same
    real = sum(p.numel() for p in model.parameters())
    assert shape_from_hf_config(config.to_dict()).n_params == real

    ids = torch.randint(2, VOCAB, (2, 16))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"{model_type}: its own forward fails on a text batch: {first_line(exc)}")
    if logits.shape[-1] != VOCAB:
        pytest.skip(f"{model_type}: its logits are not over config.vocab_size ({logits.shape})")
    labels = torch.roll(ids, -1, dims=1)
    expected = F.cross_entropy(
        logits.float().reshape(-1, VOCAB), labels.reshape(-1), reduction="sum"
    )
    attach_token_loss(model)
    parts = model(input_ids=ids, labels=labels, token_loss=True)
    assert float(parts["ce_sum"]) == pytest.approx(float(expected), rel=1e-4)
    parts["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
