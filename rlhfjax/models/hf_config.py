"""Hugging Face `config.json` <-> `TransformerConfig` for Llama 2/3/3.1/3.2 and Qwen2/Qwen2.5.

Both generations of the HF config layout are read: transformers 4.x keeps `rope_theta` and
`rope_scaling` at the top level, transformers 5.x nests them in `rope_parameters`. Written configs
use the 4.x layout, which both generations load. Anything the decoder cannot represent (another
architecture, an activation other than SiLU, MLP or output-projection biases, sliding-window
attention, rope types other than "default" and "llama3", partial rotary embeddings) is a
`ValueError` naming the field, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rlhfjax.models.configs import RUNTIME_FIELDS, Llama3RopeScaling, TransformerConfig

# model_type -> the causal-LM architecture class name transformers registers for it.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_ROPE_TYPES = ("default", "llama3")


def _require(hf: Mapping[str, Any], key: str) -> Any:
  if hf.get(key) is None:
    raise ValueError(f"HF config.json has no {key!r} (model_type {hf.get('model_type')!r})")
  return hf[key]


def _rope(hf: Mapping[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
  """(rope_theta, rope_scaling) from either config layout."""
  # transformers 5.x: `rope_parameters` holds the theta and the scaling; 4.x: top-level keys.
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = hf.get("rope_theta", params.get("rope_theta", 10_000.0))
  # `type` is the pre-4.45 spelling of `rope_type`.
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in _ROPE_TYPES:
    raise ValueError(
        f"HF config rope type {rope_type!r} is not supported; supported: {_ROPE_TYPES}"
    )
  if rope_type == "default":
    return float(theta), None
  return float(theta), Llama3RopeScaling(
      factor=float(params["factor"]),
      low_freq_factor=float(params["low_freq_factor"]),
      high_freq_factor=float(params["high_freq_factor"]),
      original_max_position_embeddings=int(
          params.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
      ),
  )


def _check_supported(hf: Mapping[str, Any]) -> str:
  """Returns the model_type after checking every field the decoder cannot represent."""
  model_type = hf.get("model_type")
  architectures = hf.get("architectures") or []
  if model_type not in ARCHITECTURES:
    raise ValueError(
        f"unsupported HF model_type {model_type!r} (architectures {architectures}); supported "
        f"model types: {sorted(ARCHITECTURES)}"
    )
  if architectures and ARCHITECTURES[model_type] not in architectures:
    raise ValueError(
        f"unsupported HF architectures {architectures} for model_type {model_type!r}; "
        f"supported: {ARCHITECTURES[model_type]}"
    )
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"HF config hidden_act {act!r} is not supported (only 'silu': SwiGLU)")
  if hf.get("mlp_bias"):
    raise ValueError("HF config mlp_bias=True is not supported (the MLP has no biases)")
  if model_type == "llama" and hf.get("attention_bias"):
    # HF Llama's attention_bias also puts a bias on o_proj, which the decoder does not have.
    raise ValueError("HF Llama config attention_bias=True (o_proj bias) is not supported")
  if hf.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(
        f"HF config partial_rotary_factor {hf['partial_rotary_factor']} is not supported"
    )
  if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or ()):
    raise ValueError("HF config with sliding-window attention is not supported")
  return model_type


def config_from_hf(
    hf: Mapping[str, Any], *, dtype: Any = None, param_dtype: Any = None, **runtime: Any
) -> TransformerConfig:
  """The `TransformerConfig` of a HF Llama / Qwen2 `config.json` (as a dict).

  `head_dim` is explicit in the config or `hidden_size / num_attention_heads`; Qwen2 always has
  q, k, v biases; `num_key_value_heads` defaults to `num_attention_heads` (Llama 2).

  Args:
    hf: the parsed config.json.
    dtype: compute dtype; default the checkpoint's `torch_dtype` / `dtype`, else float32.
    param_dtype: parameter dtype; default `dtype`.
    **runtime: `RUNTIME_FIELDS` of the config (`scan_layers`, `remat`, `attention_impl`), which
      a checkpoint does not describe.

  Returns:
    The configuration.

  Raises:
    ValueError: for an unsupported model_type / architecture / feature, or another keyword than
      the runtime fields, naming it.
  """
  unknown = sorted(set(runtime) - set(RUNTIME_FIELDS))
  if unknown:
    raise ValueError(f"config_from_hf takes runtime fields {RUNTIME_FIELDS}, not {unknown}")
  model_type = _check_supported(hf)
  num_heads = int(_require(hf, "num_attention_heads"))
  hidden_size = int(_require(hf, "hidden_size"))
  theta, scaling = _rope(hf)
  if dtype is None:
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  return TransformerConfig(
      vocab_size=int(_require(hf, "vocab_size")),
      hidden_size=hidden_size,
      num_layers=int(_require(hf, "num_hidden_layers")),
      num_heads=num_heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
      head_dim=int(hf.get("head_dim") or hidden_size // num_heads),
      mlp_dim=int(_require(hf, "intermediate_size")),
      rope_theta=theta,
      rope_scaling=scaling,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      attention_bias=model_type == "qwen2",
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_seq_len=int(hf.get("max_position_embeddings", 2048)),
      dtype=dtype,
      param_dtype=dtype if param_dtype is None else param_dtype,
      **runtime,
  )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
  """The HF `config.json` dict of a decoder: Qwen2 if it has attention biases, else Llama."""
  c = config
  model_type = "qwen2" if c.attention_bias else "llama"
  rope_scaling = None
  if c.rope_scaling is not None:
    s = c.rope_scaling
    rope_scaling = {
        "rope_type": "llama3",
        "factor": s.factor,
        "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor,
        "original_max_position_embeddings": s.original_max_position_embeddings,
    }
  hf = {
      "architectures": [ARCHITECTURES[model_type]],
      "model_type": model_type,
      "vocab_size": c.vocab_size,
      "hidden_size": c.hidden_size,
      "intermediate_size": c.mlp_dim,
      "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": c.max_seq_len,
      "rms_norm_eps": c.rms_norm_eps,
      "rope_theta": c.rope_theta,
      "rope_scaling": rope_scaling,
      "tie_word_embeddings": c.tie_embeddings,
      "torch_dtype": c.param_dtype,
  }
  if model_type == "llama":
    hf.update(attention_bias=False, mlp_bias=False)
  else:
    hf.update(use_sliding_window=False)
  return hf
