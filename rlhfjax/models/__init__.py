"""Llama-family decoder models (Flax NNX), their KV cache and named configurations."""

from rlhfjax.models.cache import KVCache, init_kv_cache
from rlhfjax.models.configs import (
    CONFIGS,
    Llama3RopeScaling,
    TransformerConfig,
    get_config,
    num_params,
)
from rlhfjax.models.heads import last_token_scores
from rlhfjax.models.transformer import (
    Transformer,
    default_positions,
    stack_layers,
    unstack_layers,
)

__all__ = [
    "CONFIGS",
    "KVCache",
    "Llama3RopeScaling",
    "Transformer",
    "TransformerConfig",
    "default_positions",
    "get_config",
    "init_kv_cache",
    "last_token_scores",
    "num_params",
    "stack_layers",
    "unstack_layers",
]

# Hugging Face checkpoints and LoRA adapters (issue 7).
from rlhfjax.models.hf import from_pretrained, load_pretrained, save_pretrained  # noqa: E402
from rlhfjax.models.hf_config import config_from_hf, config_to_hf  # noqa: E402
from rlhfjax.models.lora import (  # noqa: E402
    LoRAAdapters,
    LoRAConfig,
    load_adapters,
    lora_init,
    lora_loss,
    lora_merge,
    lora_unmerge,
    save_adapters,
)

__all__ += [
    "LoRAAdapters",
    "LoRAConfig",
    "config_from_hf",
    "config_to_hf",
    "from_pretrained",
    "load_adapters",
    "load_pretrained",
    "lora_init",
    "lora_loss",
    "lora_merge",
    "lora_unmerge",
    "save_adapters",
    "save_pretrained",
]
