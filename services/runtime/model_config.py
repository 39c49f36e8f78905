"""The handful of numbers our forward pass needs, read from a `transformers` config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import ModelError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
# RoPE variants whose frequencies do not depend on the running sequence length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama / Qwen2 decoder."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int
    hf_config: Any  # kept for the RoPE initialisation functions of transformers

    @classmethod
    def from_hf(cls, config: Any) -> "ModelConfig":
        model_type = getattr(config, "model_type", "?")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelError(f"unsupported architecture '{model_type}' (specmesh supports "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)})")
        rope_type = _rope_parameters(config).get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise ModelError(f"unsupported RoPE scaling '{rope_type}' (supported: {', '.join(STATIC_ROPE_TYPES)})")
        if getattr(config, "mlp_bias", False):
            raise ModelError(f"unsupported {model_type} config: mlp_bias=True (MLP projections with biases)")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            model_type=model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama only when attention_bias is set.
            attention_bias=model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
            max_position_embeddings=config.max_position_embeddings,
            hf_config=config,
        )

    def rope_inv_freq(self) -> tuple[torch.Tensor, float]:
        """Inverse frequencies and the cos/sin scaling, exactly as transformers computes them."""
        params = _rope_parameters(self.hf_config)
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            base = params.get("rope_theta", 10000.0)
            dim = self.head_dim
            return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        return ROPE_INIT_FUNCTIONS[rope_type](self.hf_config, None)


def _rope_parameters(config: Any) -> dict:
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    # Older transformers: rope_theta and rope_scaling live directly on the config.
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    scaling.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return scaling
