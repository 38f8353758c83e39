"""The key/value cache for incremental decoding: a plain pytree of fixed-shape arrays."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class KVCache(NamedTuple):
  """Keys and values of every layer for S slots, plus the bookkeeping to continue decoding.

  All rows advance through the slots in lockstep (slot = index in the concatenated
  prompt + generation sequence, padding included); rows differ only in which slots hold real
  tokens and in their rotary positions, so left-padded prompts of different lengths share a cache.

  Attributes:
    keys: per layer [B, K, S, Dh] (a tuple; head-major, the layout the attention products read
      without a transpose), rotary embedding already applied; one stacked [L, B, K, S, Dh] array
      for a model with `scan_layers`.
    values: per layer [B, K, S, Dh], or stacked [L, B, K, S, Dh] like `keys`.
    mask_BxS: bool, True where the slot holds a real (non-padding) token.
    next_position_B: int32, rotary position of the next real token of each row
      (the number of real tokens seen so far when positions are the defaults).
    index: int32 scalar, the next slot to write.
  """

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  mask_BxS: jax.Array
  next_position_B: jax.Array
  index: jax.Array

  @property
  def max_len(self) -> int:
    """S, the number of slots."""
    return self.mask_BxS.shape[1]

  @property
  def stacked(self) -> bool:
    """Whether keys and values are stacked [L, ...] arrays (the scanned-layers layout)."""
    return not isinstance(self.keys, (tuple, list))


def init_kv_cache(
    *,
    num_layers: int,
    batch_size: int,
    max_len: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: jnp.dtype,
    stacked: bool = False,
) -> KVCache:
  """Returns an empty cache: zero keys/values, no real slots, position 0, index 0.

  Keys and values are tuples of `num_layers` arrays [B, K, S, Dh], or with `stacked` one
  [L, B, K, S, Dh] array each (for models with `scan_layers`).
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size ({batch_size}) must be positive")
  if max_len <= 0:
    raise ValueError(f"max_len ({max_len}) must be positive")
  shape = (batch_size, num_kv_heads, max_len, head_dim)
  if stacked:
    keys = jnp.zeros((num_layers, *shape), dtype)
    values = jnp.zeros((num_layers, *shape), dtype)
  else:
    keys = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
    values = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
  return KVCache(
      keys=keys,
      values=values,
      mask_BxS=jnp.zeros((batch_size, max_len), bool),
      next_position_B=jnp.zeros((batch_size,), jnp.int32),
      index=jnp.zeros((), jnp.int32),
  )


def repeat_cache(cache: KVCache, repeats: int) -> KVCache:
  """The cache with each row repeated `repeats` times in place (row b -> rows b*n .. b*n + n - 1):
  prefill P prompts once, then decode G continuations of each."""
  batch_axis = 1 if cache.stacked else 0
  rows = lambda x: jnp.repeat(x, repeats, axis=batch_axis)
  keys, values = ((rows(kv) if cache.stacked else tuple(map(rows, kv)))
                  for kv in (cache.keys, cache.values))
  return KVCache(keys=keys, values=values, mask_BxS=jnp.repeat(cache.mask_BxS, repeats, axis=0),
                 next_position_B=jnp.repeat(cache.next_position_B, repeats, axis=0),
                 index=cache.index)
