"""Hyper-parameters of the Llama-family decoder and the named configurations.

`TransformerConfig` describes one decoder: a Llama / Qwen2 style stack of pre-norm blocks with
grouped-query attention, rotary position embeddings and a SwiGLU MLP. The named configurations copy
the `config.json` of the published Hugging Face checkpoints, so converted weights fit.

Dimension letters used throughout the package: B batch, T time (queries), S cache slots (keys),
V vocabulary, D model width (`hidden_size`), H query heads, K key/value heads, G = H / K group size,
Dh head width (`head_dim`), F MLP width (`mlp_dim`), L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

# Compute and parameter dtypes the model supports, by canonical numpy name.
_DTYPES = ("float32", "bfloat16", "float16")
# Rematerialisation of each decoder block in the backward pass: "none" stores every activation;
# "full" recomputes the whole block (stores its input only); the others name the
# `jax.checkpoint_policies` that decide which intermediates are saved.
REMAT_POLICIES = (
    "none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable")
# Attention kernels without a cache: "xla" is this library's einsum softmax; "dot_product" calls
# `jax.nn.dot_product_attention` and lets JAX choose the kernel (XLA as of jax 0.11); "cudnn"
# forces its cuDNN flash-attention kernel (GPU, bfloat16 / float16 compute only).
ATTENTION_IMPLS = ("xla", "dot_product", "cudnn")
# Fields that choose how the model runs, not what it computes: checkpoints do not describe them.
RUNTIME_FIELDS = ("scan_layers", "remat", "attention_impl")


def _canonical_dtype(field: str, value: Any) -> str:
  """Returns the canonical name of a dtype given as a string or a dtype-like, or raises."""
  try:
    name = jnp.dtype(value).name
  except TypeError as e:
    raise ValueError(f"{field} ({value!r}) is not a dtype; use one of {_DTYPES}") from e
  if name not in _DTYPES:
    raise ValueError(f"{field} ({value!r}) must be one of {_DTYPES}")
  return name


def _check_positive(field: str, value: Any, *, integer: bool = True) -> None:
  """Raises a ValueError naming `field` unless `value` is a positive int (or number)."""
  types = (int, np.integer) if integer else (int, float, np.integer, np.floating)
  # `bool` is a subclass of `int`; a size of True is a bug, not 1.
  if isinstance(value, bool) or not isinstance(value, types):
    kind = "int" if integer else "number"
    raise ValueError(f"{field} ({value!r}) must be a positive {kind}")
  if value <= 0:
    raise ValueError(f"{field} ({value!r}) must be positive")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Llama3RopeScaling:
  """Llama-3.1 rescaling of the rotary inverse frequencies (HF `rope_type="llama3"`).

  With wavelength `lambda_i = 2 pi / omega_i`, `lambda_lo = L0 / low_freq_factor` and
  `lambda_hi = L0 / high_freq_factor` (L0 = `original_max_position_embeddings`):
    omega_i' = omega_i                                 if lambda_i < lambda_hi (high frequencies),
    omega_i' = omega_i / factor                        if lambda_i > lambda_lo (low frequencies),
    omega_i' = (1 - s) omega_i / factor + s omega_i    otherwise,
  where `s = (L0 / lambda_i - low_freq_factor) / (high_freq_factor - low_freq_factor)`.
  The attention temperature is unchanged (HF returns attention_factor 1.0 for this type).

  References: Llama 3 herd of models (arXiv 2407.21783); HF transformers
  `modeling_rope_utils._compute_llama3_parameters`.
  """

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int

  def __post_init__(self):
    _check_positive("rope_scaling.factor", self.factor, integer=False)
    _check_positive("rope_scaling.low_freq_factor", self.low_freq_factor, integer=False)
    _check_positive("rope_scaling.high_freq_factor", self.high_freq_factor, integer=False)
    _check_positive(
        "rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings
    )
    if self.high_freq_factor <= self.low_freq_factor:
      # The smoothing divides by (high - low).
      raise ValueError(
          f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must exceed "
          f"rope_scaling.low_freq_factor ({self.low_freq_factor})"
      )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
  """Hyper-parameters of a Llama-family decoder.

  Attributes:
    vocab_size: V.
    hidden_size: D, the width of the residual stream.
    num_layers: L, the number of decoder blocks.
    num_heads: H, query heads.
    num_kv_heads: K, key/value heads; H must be a multiple of K (K = H is multi-head attention,
      K = 1 multi-query attention).
    head_dim: Dh, the width of one head; explicit because it may differ from D / H.
    mlp_dim: F, the inner width of the SwiGLU MLP.
    rope_theta: base of the rotary inverse frequencies `theta^(-2i/Dh)`.
    rope_scaling: None or the Llama-3.1 frequency rescaling.
    rms_norm_eps: epsilon inside the RMSNorm root.
    attention_bias: bias on the q, k, v projections (Qwen2); never on the output projection.
    tie_embeddings: logits use the transposed token embedding instead of a separate `lm_head`.
    max_seq_len: the context length the checkpoint was trained for. Informational: the model
      itself accepts any length (rotary embeddings have no table).
    dtype: compute dtype of activations, "float32" | "bfloat16" | "float16" (a jnp dtype is
      accepted and stored by name). Logits, norms, softmax and rotary angles are float32.
    param_dtype: storage dtype of the parameters.
    scan_layers: stack the blocks' parameters along a leading 'layers' axis and run them with
      `nnx.scan` (one compiled block instead of L unrolled ones; the KV cache is stacked
      [L, B, K, S, Dh] too). `transformer.stack_layers` / `unstack_layers` convert parameters.
    remat: rematerialisation policy of each block, one of `REMAT_POLICIES`.
    attention_impl: attention kernel of the cache-free forward, one of `ATTENTION_IMPLS`.
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10_000.0
  rope_scaling: Llama3RopeScaling | None = None
  rms_norm_eps: float = 1e-5
  attention_bias: bool = False
  tie_embeddings: bool = False
  max_seq_len: int = 2048
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  scan_layers: bool = False
  remat: str = "none"
  attention_impl: str = "xla"

  def __post_init__(self):
    for field in (
        "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
        "mlp_dim", "max_seq_len",
    ):
      _check_positive(field, getattr(self, field))
    _check_positive("rope_theta", self.rope_theta, integer=False)
    _check_positive("rms_norm_eps", self.rms_norm_eps, integer=False)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})"
      )
    if self.head_dim % 2:
      # Rotary embeddings rotate pairs of channels.
      raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, Llama3RopeScaling):
      raise ValueError(
          f"rope_scaling ({self.rope_scaling!r}) must be None or a Llama3RopeScaling"
      )
    for field, value, valid in (("remat", self.remat, REMAT_POLICIES),
                                ("attention_impl", self.attention_impl, ATTENTION_IMPLS)):
      if value not in valid:
        raise ValueError(f"{field} ({value!r}) must be one of {valid}")
    for field in ("attention_bias", "tie_embeddings", "scan_layers"):
      if not isinstance(getattr(self, field), bool):
        raise ValueError(f"{field} ({getattr(self, field)!r}) must be a bool")
    # Store dtypes by name: the config stays hashable, printable and ConfigDict friendly.
    object.__setattr__(self, "dtype", _canonical_dtype("dtype", self.dtype))
    object.__setattr__(self, "param_dtype", _canonical_dtype("param_dtype", self.param_dtype))

  @property
  def group_size(self) -> int:
    """G = H / K, query heads per key/value head."""
    return self.num_heads // self.num_kv_heads


def num_params(config: TransformerConfig, *, score_head: bool = False) -> int:
  """Number of parameters of `Transformer(config, score_head=score_head)`, counted analytically.

  Per block: q and o projections `2 D H Dh`, k and v `2 D K Dh`, biases `(H + 2K) Dh` when
  `attention_bias`, MLP `3 D F`, two norm scales `2 D`. Plus the embedding `V D`, the untied
  `lm_head` `V D`, the final norm `D`, and the score head `D + 1`.

  Args:
    config: the model configuration.
    score_head: whether the scalar score head is counted.

  Returns:
    The total number of scalar parameters.
  """
  c = config
  attention = 2 * c.hidden_size * c.num_heads * c.head_dim
  attention += 2 * c.hidden_size * c.num_kv_heads * c.head_dim
  if c.attention_bias:
    attention += (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
  block = attention + 3 * c.hidden_size * c.mlp_dim + 2 * c.hidden_size
  total = c.num_layers * block + c.vocab_size * c.hidden_size + c.hidden_size
  if not c.tie_embeddings:
    total += c.vocab_size * c.hidden_size
  if score_head:
    total += c.hidden_size + 1
  return total


# Llama-3.1 / 3.2 rope scaling: `rope_scaling` in the HF config.json of meta-llama/Llama-3.1-8B
# (factor 8) and meta-llama/Llama-3.2-1B (factor 32); both low 1, high 4, original 8192.
def _llama3_scaling(factor: float) -> Llama3RopeScaling:
  return Llama3RopeScaling(
      factor=factor,
      low_freq_factor=1.0,
      high_freq_factor=4.0,
      original_max_position_embeddings=8192,
  )


_LLAMA3_8B = TransformerConfig(
    # HF meta-llama/Meta-Llama-3-8B config.json.
    vocab_size=128_256,
    hidden_size=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    mlp_dim=14_336,
    rope_theta=500_000.0,
    rms_norm_eps=1e-5,
    max_seq_len=8192,
)

_LLAMA3_70B = TransformerConfig(
    # HF meta-llama/Meta-Llama-3-70B config.json.
    vocab_size=128_256,
    hidden_size=8192,
    num_layers=80,
    num_heads=64,
    num_kv_heads=8,
    head_dim=128,
    mlp_dim=28_672,
    rope_theta=500_000.0,
    rms_norm_eps=1e-5,
    max_seq_len=8192,
)

_QWEN2_5_7B = TransformerConfig(
    # HF Qwen/Qwen2.5-7B config.json (base model; the -Instruct config says 32768 positions).
    # Note the 7B vocabulary is padded to 152064, unlike the 151936 of the 0.5B model.
    vocab_size=152_064,
    hidden_size=3584,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    head_dim=128,
    mlp_dim=18_944,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    attention_bias=True,
    max_seq_len=131_072,
)

CONFIGS: dict[str, TransformerConfig] = {
    # Trains in seconds on a CPU; the configuration all compute tests use.
    "tiny": TransformerConfig(
        vocab_size=64,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        mlp_dim=128,
        max_seq_len=128,
    ),
    # About 19M parameters: a laptop- or single-accelerator-sized model for real experiments.
    "small": TransformerConfig(
        vocab_size=8192,
        hidden_size=384,
        num_layers=8,
        num_heads=6,
        num_kv_heads=2,
        head_dim=64,
        mlp_dim=1024,
        max_seq_len=1024,
    ),
    "llama2_7b": TransformerConfig(
        # HF meta-llama/Llama-2-7b-hf config.json (multi-head attention: K = H).
        vocab_size=32_000,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        mlp_dim=11_008,
        rope_theta=10_000.0,
        rms_norm_eps=1e-5,
        max_seq_len=4096,
    ),
    "llama3_8b": _LLAMA3_8B,
    "llama3_1_8b": dataclasses.replace(
        # HF meta-llama/Llama-3.1-8B config.json: Llama-3-8B plus rope scaling, 128k context.
        _LLAMA3_8B,
        rope_scaling=_llama3_scaling(8.0),
        max_seq_len=131_072,
    ),
    "llama3_70b": _LLAMA3_70B,
    "llama3_1_70b": dataclasses.replace(
        # HF meta-llama/Llama-3.1-70B config.json: Llama-3-70B plus rope scaling, 128k context.
        _LLAMA3_70B,
        rope_scaling=_llama3_scaling(8.0),
        max_seq_len=131_072,
    ),
    "llama3_2_1b": TransformerConfig(
        # HF meta-llama/Llama-3.2-1B config.json.
        vocab_size=128_256,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        mlp_dim=8192,
        rope_theta=500_000.0,
        rope_scaling=_llama3_scaling(32.0),
        rms_norm_eps=1e-5,
        tie_embeddings=True,
        max_seq_len=131_072,
    ),
    "qwen2_5_0_5b": TransformerConfig(
        # HF Qwen/Qwen2.5-0.5B config.json.
        vocab_size=151_936,
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        mlp_dim=4864,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        attention_bias=True,
        tie_embeddings=True,
        max_seq_len=32_768,
    ),
    "qwen2_5_7b": _QWEN2_5_7B,
}


def get_config(name: str, **overrides: Any) -> TransformerConfig:
  """Returns the named configuration, optionally with some fields replaced.

  Args:
    name: a key of `CONFIGS`.
    **overrides: fields to replace, e.g. `dtype="bfloat16"`; validated like the constructor.

  Returns:
    The configuration.

  Raises:
    ValueError: for an unknown name or field.
  """
  if name not in CONFIGS:
    raise ValueError(f"unknown model config {name!r}; valid names: {sorted(CONFIGS)}")
  fields = {f.name for f in dataclasses.fields(TransformerConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown TransformerConfig fields {unknown}; valid fields: {sorted(fields)}")
  return dataclasses.replace(CONFIGS[name], **overrides)
