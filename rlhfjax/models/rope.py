"""Rotary position embeddings in the Hugging Face Llama "rotate half" layout.

Channel i of a head is paired with channel i + Dh/2 (not with its neighbour 2i+1 as in the RoFormer
paper), which is the layout HF Llama / Qwen2 checkpoints are stored in, so their q/k weights load
without a permutation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhfjax.models.configs import Llama3RopeScaling


def llama3_scale_frequencies(inv_freq: np.ndarray, scaling: Llama3RopeScaling) -> np.ndarray:
  """Applies the Llama-3.1 rescaling to rotary inverse frequencies.

  With `lambda = 2 pi / omega`, frequencies whose wavelength exceeds
  `original_max_position_embeddings / low_freq_factor` are divided by `factor`, those shorter than
  `original_max_position_embeddings / high_freq_factor` are kept, and those in between are
  interpolated (see `Llama3RopeScaling`).

  Args:
    inv_freq: omega, the unscaled inverse frequencies [Dh/2].
    scaling: the rescaling parameters.

  Returns:
    The rescaled inverse frequencies [Dh/2], same dtype as `inv_freq`.

  References: arXiv 2407.21783; HF transformers `_compute_llama3_parameters`.
  """
  inv_freq = np.asarray(inv_freq)
  low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
  high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
  wavelen = 2.0 * np.pi / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor
  )
  smoothed = (1.0 - smooth) * scaled / scaling.factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(inv_freq.dtype)


def inverse_frequencies(
    head_dim: int, theta: float, scaling: Llama3RopeScaling | None = None
) -> np.ndarray:
  """Rotary inverse frequencies `omega_i = theta^(-2i / Dh)`, i = 0 .. Dh/2 - 1.

  Computed in float64 numpy from static config values (a compile-time constant under jit), then
  rounded to float32; HF computes them in float32 torch, which can differ in the last ulp.

  Args:
    head_dim: Dh, even.
    theta: the base.
    scaling: optional Llama-3.1 rescaling.

  Returns:
    omega [Dh/2] float32.

  References: RoFormer (arXiv 2104.09864), eq. 15.
  """
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling is not None:
    inv_freq = llama3_scale_frequencies(inv_freq, scaling)
  return inv_freq.astype(np.float32)


def rotate_half(x: jax.Array) -> jax.Array:
  """Maps the channel halves (x1, x2) to (-x2, x1) along the last axis."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def rotary_cos_sin(positions_BxT: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """`cos(p omega)` and `sin(p omega)`, each [B, T, Dh/2] float32, from float32 angles as HF
  computes them.

  The model computes them once per forward pass and hands them to every layer. Computed inside
  each layer's `apply_rope`, XLA:CPU recomputed cos and sin in every fusion that read a rotated q
  or k (48 fusions in the benchmark's DPO step, 3% of its time).
  """
  angles_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  return jnp.cos(angles_BxTxF), jnp.sin(angles_BxTxF)


def apply_rope(x_BxTxNxDh: jax.Array, cos_BxTxF: jax.Array, sin_BxTxF: jax.Array) -> jax.Array:
  """Rotates each channel pair (i, i + Dh/2) of every head by the angle `p omega_i`.

  `x' = x cos(p omega) + rotate_half(x) sin(p omega)`, with cos and sin repeated over both halves.
  Equivalently, `x_i + 1j x_{i+Dh/2}` is multiplied by `exp(1j p omega_i)`.
  The products are computed in float32 and cast back to the input dtype (HF casts cos/sin
  to the activation dtype first; the float32 form is slightly more accurate in bfloat16).

  Args:
    x_BxTxNxDh: queries or keys, N heads of width Dh.
    cos_BxTxF, sin_BxTxF: `rotary_cos_sin(positions, omega)`, [B, T, Dh/2] float32.

  Returns:
    The rotated array, same shape and dtype as `x_BxTxNxDh`.

  References: RoFormer (arXiv 2104.09864), eq. 34; HF transformers `apply_rotary_pos_emb`.
  """
  cos_BxTx1xDh = jnp.concatenate([cos_BxTxF, cos_BxTxF], axis=-1)[:, :, None, :]
  sin_BxTx1xDh = jnp.concatenate([sin_BxTxF, sin_BxTxF], axis=-1)[:, :, None, :]
  x = x_BxTxNxDh.astype(jnp.float32)
  rotated = x * cos_BxTx1xDh + rotate_half(x) * sin_BxTx1xDh
  return rotated.astype(x_BxTxNxDh.dtype)
