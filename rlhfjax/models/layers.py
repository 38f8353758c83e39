"""Parameterised building blocks of the decoder: projections, embedding, RMSNorm, SwiGLU MLP.

Every parameter carries logical axis names (`out_sharding` metadata via `nnx.with_partitioning`);
the mapping of logical names to mesh axes lives in `rlhfjax.sharding`, never here. Parameters are
stored in `param_dtype` and cast to the compute `dtype` where they are used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# HF Llama / Qwen2 `initializer_range`: weights ~ N(0, 0.02^2), biases zero, norm scales one.
INIT_STD = 0.02
LogicalAxes = tuple[str | None, ...]


def _param(
    init: nnx.Initializer,
    axes: LogicalAxes,
    shape: Sequence[int],
    param_dtype: jnp.dtype,
    rngs: nnx.Rngs,
) -> nnx.Param:
  """Creates a parameter annotated with logical axis names."""
  return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), tuple(shape), param_dtype))


def flat_matmul(x: jax.Array, kernel: jax.Array, num_contract: int, *,
                preferred_element_type: jnp.dtype | None = None) -> jax.Array:
  """`jnp.tensordot(x, kernel, num_contract)` computed as one 2-D [N, I] x [I, O] matmul.

  The leading axes of `x` and the contracted axes of both operands are flattened first. XLA on
  CPU compiles the backward pass of a higher-rank contraction with strided transposes fused into
  the producers of its operands; the 2-D form it takes as laid out. A SwiGLU block's forward and
  backward pass ([16, 128, 256] inputs, 1024 hidden) takes 98 ms instead of 178 ms on a 2-core CPU
  (`experiments.bench.train_step`: DPO step 0.91 -> 0.84 s, SFT 1.05 -> 0.89 s). The result is
  the same dot.
  """
  in_shape = kernel.shape[:num_contract]
  out_shape = kernel.shape[num_contract:]
  if x.shape[x.ndim - num_contract:] != in_shape:
    raise ValueError(f"input trailing axes {x.shape[x.ndim - num_contract:]} do not match the "
                     f"kernel's contracted axes {in_shape}")
  batch_shape = x.shape[:x.ndim - num_contract]
  x_NxI = x.reshape(math.prod(batch_shape), math.prod(in_shape))
  kernel_IxO = kernel.reshape(math.prod(in_shape), math.prod(out_shape))
  y_NxO = jnp.matmul(x_NxI, kernel_IxO, preferred_element_type=preferred_element_type)
  return y_NxO.reshape(batch_shape + out_shape)


class DenseGeneral(nnx.Module):
  """An affine map contracting the trailing input axes with the leading kernel axes.

  `y[..., o] = sum_i x[..., i] W[i, o] (+ b[o])`, where i and o may each be several axes
  (e.g. D -> (H, Dh) for a query projection, (H, Dh) -> D for the output projection).

  Attributes:
    kernel: W with shape `in_shape + out_shape`.
    bias: b with shape `out_shape`, only when `use_bias`.
  """

  def __init__(
      self,
      in_shape: Sequence[int],
      out_shape: Sequence[int],
      *,
      kernel_axes: LogicalAxes,
      use_bias: bool = False,
      dtype: jnp.dtype = jnp.float32,
      param_dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    if len(kernel_axes) != len(in_shape) + len(out_shape):
      raise ValueError(f"kernel_axes {kernel_axes} must name {len(in_shape + out_shape)} axes")
    self.num_contract = len(in_shape)
    self.dtype = dtype
    self.kernel = _param(
        nnx.initializers.normal(INIT_STD), kernel_axes, in_shape + out_shape, param_dtype, rngs
    )
    if use_bias:
      self.bias = _param(
          nnx.initializers.zeros_init(), kernel_axes[len(in_shape):], out_shape, param_dtype, rngs
      )
    self.use_bias = use_bias

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the map to the trailing `len(in_shape)` axes of `x` (computed in `dtype`)."""
    y = flat_matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.num_contract)
    if self.use_bias:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding table E [V, D], also usable as a tied output projection `h E^T`."""

  def __init__(
      self,
      vocab_size: int,
      hidden_size: int,
      *,
      dtype: jnp.dtype = jnp.float32,
      param_dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.dtype = dtype
    self.embedding = _param(
        nnx.initializers.normal(INIT_STD),
        ("vocab", "embed"),
        (vocab_size, hidden_size),
        param_dtype,
        rngs,
    )

  def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
    """Looks up `E[tokens]` -> [B, T, D] in `dtype`."""
    return jnp.take(self.embedding[...], tokens_BxT, axis=0).astype(self.dtype)

  def attend(self, h_BxTxD: jax.Array) -> jax.Array:
    """Tied logits `h E^T` -> [B, T, V] float32 (inputs in `dtype`, float32 accumulation)."""
    return flat_matmul(h_BxTxD.astype(self.dtype), self.embedding[...].astype(self.dtype).T, 1,
                       preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
  """Root-mean-square normalisation `y = x / sqrt(mean(x^2) + eps) * scale`, in float32.

  The result is cast back to the input dtype after the scale (HF Llama multiplies the scale after
  casting; identical in float32, within one bfloat16 rounding otherwise).

  References: Zhang & Sennrich 2019 (arXiv 1910.07467), eq. 4.
  """

  def __init__(
      self,
      hidden_size: int,
      *,
      eps: float,
      param_dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.eps = eps
    self.scale = _param(nnx.initializers.ones_init(), ("norm",), (hidden_size,), param_dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


@jax.checkpoint
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """`silu(gate) * up`, rematerialised: its backward pass keeps only `gate` and `up`.

  Autodiff of the plain expression stores `sigmoid(gate)` and `silu(gate)` for the backward pass as
  well: two more [B, T, F] arrays per layer, written in the forward pass and read back (SFT
  benchmark step: 312 -> 280 MB of temporaries; DPO step 1.5% faster on a CPU). `jax.checkpoint`
  rather than a custom VJP keeps forward-mode autodiff (`jvp`, Hessian-vector products) working.
  """
  return jax.nn.silu(gate) * up


class MLP(nnx.Module):
  """SwiGLU feed-forward block `down(silu(gate(x)) * up(x))` (`swiglu`).

  References: Shazeer 2020, GLU variants (arXiv 2002.05202), eq. 6 (FFN_SwiGLU).
  """

  def __init__(
      self,
      hidden_size: int,
      mlp_dim: int,
      *,
      dtype: jnp.dtype = jnp.float32,
      param_dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = DenseGeneral((hidden_size,), (mlp_dim,), kernel_axes=("embed", "mlp"), **kw)
    self.up_proj = DenseGeneral((hidden_size,), (mlp_dim,), kernel_axes=("embed", "mlp"), **kw)
    self.down_proj = DenseGeneral((mlp_dim,), (hidden_size,), kernel_axes=("mlp", "embed"), **kw)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    return self.down_proj(swiglu(self.gate_proj(x_BxTxD), self.up_proj(x_BxTxD)))
