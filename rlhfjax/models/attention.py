"""Grouped-query self-attention with rotary embeddings and an optional key/value cache."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhfjax.models.layers import DenseGeneral
from rlhfjax.models.rope import apply_rope


def attention_mask(
    query_slots_T: jax.Array, key_slots_S: jax.Array, key_mask_BxS: jax.Array
) -> jax.Array:
  """Causal-and-padding mask: query t may see key s iff `slot(s) <= slot(t)` and s is real.

  Slots are the indices of tokens in the (cached) sequence, so causality holds across a prefill
  and later decode steps alike.

  Args:
    query_slots_T: slot of each query.
    key_slots_S: slot of each key.
    key_mask_BxS: 1/True where the key is a real token, 0/False for padding or empty cache slots.

  Returns:
    mask_BxTxS, bool.
  """
  causal_TxS = key_slots_S[None, :] <= query_slots_T[:, None]
  return causal_TxS[None, :, :] & key_mask_BxS.astype(bool)[:, None, :]


def shared_prefix_mask(segment_ids_BxT: jax.Array) -> jax.Array:
  """Which keys a query may see when several continuations of one prefix are packed in a row.

  Segment 0 is the shared prefix (the prompt); segments 1, 2, ... are continuations of it laid
  side by side. A query sees the prefix and its own segment, never another continuation.
  Combine with `attention_mask` (causality and padding). For rows of equal-length continuations,
  `shared_prefix_attention` attends under this mask block by block, without building it.

  Args:
    segment_ids_BxT: int segment of each token, 0 for the shared prefix.

  Returns:
    mask_BxTxT, bool: `seg(s) == 0 or seg(s) == seg(t)` for query t, key s.
  """
  key_BxS = segment_ids_BxT[:, None, :]
  return (key_BxS == 0) | (key_BxS == segment_ids_BxT[:, :, None])


def shared_prefix_continuations(length: int, prefix_len: int, segment_len: int) -> int:
  """G, the continuations in a packed row of `length` = Tp + G Tr positions; raises ValueError
  unless Tp, Tr and G are all >= 1."""
  g = (length - prefix_len) // segment_len if segment_len > 0 else 0
  if prefix_len < 1 or g < 1 or prefix_len + g * segment_len != length:
    raise ValueError(f"shared prefix (Tp, Tr) = ({prefix_len}, {segment_len}): {length} positions "
                     f"are not a prefix of {prefix_len} and whole continuations of {segment_len}")
  return g


def shared_prefix_attention(
    attend,
    q_BxTxHxDh: jax.Array,
    k_BxTxKxDh: jax.Array,
    v_BxTxKxDh: jax.Array,
    mask_BxTxT: jax.Array,
    *,
    prefix_len: int,
    segment_len: int,
) -> jax.Array:
  """`attend(q, k, v, mask & shared_prefix_mask(segments))` on rows laid out as
  [prefix (Tp) | continuation 1 (Tr) | ... | continuation G (Tr)], computed block by block.

  The prefix attends to itself ([Tp, Tp] logits) and continuation g to the prefix and itself
  ([Tr, Tp + Tr]), with the prefix's keys and values shared by the G continuations. The blocks
  between continuations, which the shared-prefix mask zeroes, are never computed:
  Tp^2 + G Tr (Tp + Tr) query-key pairs instead of (Tp + G Tr)^2.

  Args:
    attend: an attention function `(q, k, v, mask_BxTxS) -> o` (`dot_product_attention` or
      another of the same contract).
    q_BxTxHxDh: queries.
    k_BxTxKxDh: keys.
    v_BxTxKxDh: values.
    mask_BxTxT: the causal-and-padding mask (`attention_mask`) of the packed rows.
    prefix_len: Tp.
    segment_len: Tr; T - Tp must be a whole number G >= 1 of continuations.

  Returns:
    o_BxTxHxDh, as `attend` on the whole rows would return it.
  """
  b, t, h, dh = q_BxTxHxDh.shape
  tp, tr = prefix_len, segment_len
  g = shared_prefix_continuations(t, tp, tr)
  o_prefix = attend(q_BxTxHxDh[:, :tp], k_BxTxKxDh[:, :tp], v_BxTxKxDh[:, :tp],
                    mask_BxTxT[:, :tp, :tp])

  def continuations(x_BxTxNxDh):  # [B * G, Tr, N, Dh]
    return x_BxTxNxDh[:, tp:].reshape(b * g, tr, *x_BxTxNxDh.shape[2:])

  def with_prefix(x_BxTxKxDh):  # [B * G, Tp + Tr, K, Dh]: each continuation after the prefix
    prefix = x_BxTxKxDh[:, None, :tp]
    prefix = jnp.broadcast_to(prefix, (b, g) + prefix.shape[2:]).reshape(b * g, tp, -1, dh)
    return jnp.concatenate([prefix, continuations(x_BxTxKxDh)], axis=1)

  rows_BxGxTrxT = mask_BxTxT[:, tp:].reshape(b, g, tr, t)
  own_cols_GxTr = tp + np.arange(g)[:, None] * tr + np.arange(tr)
  own_BxGxTrxTr = rows_BxGxTrxT[:, np.arange(g)[:, None, None], np.arange(tr)[None, :, None],
                                own_cols_GxTr[:, None, :]]
  mask_NxTrxS = jnp.concatenate([rows_BxGxTrxT[..., :tp], own_BxGxTrxTr], axis=-1).reshape(
      b * g, tr, tp + tr)
  o_continuations = attend(continuations(q_BxTxHxDh), with_prefix(k_BxTxKxDh),
                           with_prefix(v_BxTxKxDh), mask_NxTrxS)
  return jnp.concatenate([o_prefix, o_continuations.reshape(b, g * tr, h, dh)], axis=1)


def _grouped_attention(q_BxTxHxDh, k, v, mask_BxTxS, kv_axes: str) -> jax.Array:
  """Masked softmax attention with GQA; `kv_axes` names the key/value layout ("skd" for
  [B, S, K, Dh], "ksd" for the cache's [B, K, S, Dh]). See `dot_product_attention`."""
  b, t, h, dh = q_BxTxHxDh.shape
  k_heads = k.shape[kv_axes.index("k") + 1]
  q_BxTxKxGxDh = q_BxTxHxDh.reshape(b, t, k_heads, h // k_heads, dh)
  logits_BxKxGxTxS = jnp.einsum(
      f"btkgd,b{kv_axes}->bkgts",
      q_BxTxKxGxDh,
      k.astype(q_BxTxHxDh.dtype),
      preferred_element_type=jnp.float32,
  ) / np.sqrt(dh).astype(np.float32)
  mask_Bx1x1xTxS = mask_BxTxS[:, None, None, :, :]
  # A finite fill keeps fully masked rows NaN-free; the second `where` zeroes their uniform weights.
  logits_BxKxGxTxS = jnp.where(mask_Bx1x1xTxS, logits_BxKxGxTxS, jnp.finfo(jnp.float32).min)
  probs_BxKxGxTxS = jnp.where(mask_Bx1x1xTxS, jax.nn.softmax(logits_BxKxGxTxS, axis=-1), 0.0)
  o_BxTxKxGxDh = jnp.einsum(
      f"bkgts,b{kv_axes}->btkgd",
      probs_BxKxGxTxS.astype(q_BxTxHxDh.dtype),
      v.astype(q_BxTxHxDh.dtype),
  )
  return o_BxTxKxGxDh.reshape(b, t, h, dh)


def dot_product_attention(
    q_BxTxHxDh: jax.Array,
    k_BxSxKxDh: jax.Array,
    v_BxSxKxDh: jax.Array,
    mask_BxTxS: jax.Array,
) -> jax.Array:
  """Masked softmax attention where each key/value head serves G = H / K query heads.

  `o_t = sum_s softmax_s(q_t . k_s / sqrt(Dh) | mask) v_s`, query head h using kv head h // G
  (the grouping of HF `repeat_kv`). Logits and softmax are float32. Masked keys get weight exactly
  zero, and a query with no visible key (a padding row) outputs zeros rather than NaN.

  Args:
    q_BxTxHxDh: queries.
    k_BxSxKxDh: keys.
    v_BxSxKxDh: values.
    mask_BxTxS: True where query t may attend to key s.

  Returns:
    o_BxTxHxDh in the dtype of `q`.

  References: Vaswani et al. 2017 (arXiv 1706.03762) eq. 1; GQA, Ainslie et al. 2023
  (arXiv 2305.13245).
  """
  return _grouped_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxTxS, "skd")


def cached_attention(
    q_BxTxHxDh: jax.Array,
    k_BxKxSxDh: jax.Array,
    v_BxKxSxDh: jax.Array,
    mask_BxTxS: jax.Array,
) -> jax.Array:
  """`dot_product_attention` on a KV cache's head-major [B, K, S, Dh] keys and values.

  The head-major layout is what both attention products read without a transpose (XLA on CPU
  otherwise copies the whole cache into it at every decode step).
  """
  return _grouped_attention(q_BxTxHxDh, k_BxKxSxDh, v_BxKxSxDh, mask_BxTxS, "ksd")


def fused_dot_product_attention(
    q_BxTxHxDh: jax.Array,
    k_BxSxKxDh: jax.Array,
    v_BxSxKxDh: jax.Array,
    mask_BxTxS: jax.Array,
    *,
    implementation: str | None = None,
) -> jax.Array:
  """`dot_product_attention` through `jax.nn.dot_product_attention` (GQA, boolean mask).

  Fully masked query rows (padding) output zeros, as in `dot_product_attention` (the JAX kernel
  would average every value there).

  Args:
    q_BxTxHxDh: queries.
    k_BxSxKxDh: keys.
    v_BxSxKxDh: values.
    mask_BxTxS: True where query t may attend to key s.
    implementation: None lets JAX choose (jax 0.10-0.11 always choose XLA); "cudnn" forces cuDNN
      flash attention (GPU, float16 / bfloat16 only; JAX raises for unsupported shapes).

  Returns:
    o_BxTxHxDh in the dtype of `q`.
  """
  dtype = q_BxTxHxDh.dtype
  o_BxTxHxDh = jax.nn.dot_product_attention(
      q_BxTxHxDh,
      k_BxSxKxDh.astype(dtype),
      v_BxSxKxDh.astype(dtype),
      mask=mask_BxTxS[:, None, :, :],
      implementation=implementation,
  )
  any_key_BxTx1x1 = jnp.any(mask_BxTxS, axis=-1)[:, :, None, None]
  return jnp.where(any_key_BxTx1x1, o_BxTxHxDh, 0).astype(dtype)


# `TransformerConfig.attention_impl` -> the attention function of the cache-free forward.
_ATTENTION_IMPLS = {
    "xla": dot_product_attention,
    "dot_product": fused_dot_product_attention,
    "cudnn": functools.partial(fused_dot_product_attention, implementation="cudnn"),
}


class Attention(nnx.Module):
  """Self-attention block: q/k/v projections, rotary embeddings, GQA, output projection."""

  def __init__(
      self,
      hidden_size: int,
      num_heads: int,
      num_kv_heads: int,
      head_dim: int,
      *,
      use_bias: bool,
      impl: str = "xla",
      dtype: jnp.dtype = jnp.float32,
      param_dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    if impl not in _ATTENTION_IMPLS:
      raise ValueError(f"attention impl {impl!r} must be one of {tuple(_ATTENTION_IMPLS)}")
    # The cache path always uses the einsum kernel (`cached_attention`).
    self.impl = impl
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d, h, k, dh = hidden_size, num_heads, num_kv_heads, head_dim
    self.q_proj = DenseGeneral(
        (d,), (h, dh), kernel_axes=("embed", "q_heads", "head_dim"), use_bias=use_bias, **kw
    )
    self.k_proj = DenseGeneral(
        (d,), (k, dh), kernel_axes=("embed", "kv_heads", "head_dim"), use_bias=use_bias, **kw
    )
    self.v_proj = DenseGeneral(
        (d,), (k, dh), kernel_axes=("embed", "kv_heads", "head_dim"), use_bias=use_bias, **kw
    )
    # Qwen2 puts biases on q, k, v only, never on the output projection.
    self.o_proj = DenseGeneral((h, dh), (d,), kernel_axes=("q_heads", "head_dim", "embed"), **kw)

  def __call__(
      self,
      x_BxTxD: jax.Array,
      *,
      rotary: tuple[jax.Array, jax.Array],
      mask_BxTxS: jax.Array,
      kv_cache: tuple[jax.Array, jax.Array] | None = None,
      cache_index: jax.Array | None = None,
      shared_prefix: tuple[int, int] | None = None,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Attends from the T new tokens to themselves, or to all S slots of the cache.

    Args:
      x_BxTxD: normalised inputs.
      rotary: (cos, sin) [B, T, Dh/2] of the new tokens' rotary angles
        (`rope.rotary_cos_sin`).
      mask_BxTxS: visibility mask (S = T without a cache, S = cache length with one).
      kv_cache: this layer's (keys, values), each [B, K, S, Dh] with rotary already applied; the
        new keys and values are written at slots `cache_index .. cache_index + T - 1`.
      cache_index: int32 scalar, the first slot to write.
      shared_prefix: (Tp, Tr), no cache: the rows are packed continuations of Tr tokens after a
        Tp-token prefix, each seeing the prefix and itself only (`shared_prefix_attention`).

    Returns:
      (y_BxTxD, updated (keys, values) or None).
    """
    q_BxTxHxDh = apply_rope(self.q_proj(x_BxTxD), *rotary)
    k_BxTxKxDh = apply_rope(self.k_proj(x_BxTxD), *rotary)
    v_BxTxKxDh = self.v_proj(x_BxTxD)
    if kv_cache is None:
      attend = _ATTENTION_IMPLS[self.impl]
      if shared_prefix is None:
        o_BxTxHxDh = attend(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, mask_BxTxS)
      else:
        o_BxTxHxDh = shared_prefix_attention(
            attend, q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, mask_BxTxS,
            prefix_len=shared_prefix[0], segment_len=shared_prefix[1])
      return self.o_proj(o_BxTxHxDh), None
    start = (0, 0, cache_index, 0)
    kv_cache = tuple(
        jax.lax.dynamic_update_slice(cached, new.swapaxes(1, 2).astype(cached.dtype), start)
        for cached, new in zip(kv_cache, (k_BxTxKxDh, v_BxTxKxDh)))
    o_BxTxHxDh = cached_attention(q_BxTxHxDh, *kv_cache, mask_BxTxS)
    return self.o_proj(o_BxTxHxDh), kv_cache
