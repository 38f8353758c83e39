"""Logit processors: temperature, top-k, top-p, and the geometric mixture of several models' logits.

A processor maps next-token logits [B, V] to logits [B, V]; banned tokens get -inf. They compose
left to right with `compose`. The geometric mixture is not a processor of one model's logits but a
combination of several: `softmax(sum_i w_i z_i)` is proportional to `prod_i softmax(z_i)^{w_i}`
(the log-normalisers cancel inside the softmax), which is the per-token mixture used by DeRa
(`w = (lambda, 1 - lambda)`, arXiv 2402.02992) and Nash-MD (`w = (1 - b, b)`, arXiv 2312.00886).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

Processor = Callable[[jax.Array], jax.Array]


def temperature(t: float) -> Processor:
  """Divides logits by `t` > 0."""
  if t <= 0:
    raise ValueError(f"temperature must be > 0 (use greedy decoding for 0), got {t}")
  return lambda logits_BxV: logits_BxV / t


def top_k(k: int) -> Processor:
  """Keeps the k largest logits of each row (ties at the k-th value are kept)."""
  if k < 1:
    raise ValueError(f"top_k must be >= 1, got {k}")

  def apply(logits_BxV):
    kth = jax.lax.top_k(logits_BxV, min(k, logits_BxV.shape[-1]))[0][..., -1:]
    return jnp.where(logits_BxV < kth, -jnp.inf, logits_BxV)

  return apply


def top_p(p: float) -> Processor:
  """Nucleus filtering: keeps the smallest set of most likely tokens with mass >= p.

  The cut is a logit value, so tokens tied exactly with the last kept one are kept as well (as in
  `top_k`): the set is larger than the smallest one only at exact ties, where which of the tied
  tokens would form the smallest set is arbitrary (HF keeps the first ones in sort order).
  """
  if not 0 < p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {p}")

  def apply(logits_BxV):
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_BxV, axis=-1)
    # Mass strictly before each sorted token; a token is kept while that mass is < p.
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < p
    threshold = jnp.min(jnp.where(keep, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BxV < threshold, -jnp.inf, logits_BxV)

  return apply


def compose(*processors: Processor) -> Processor:
  """Applies processors left to right."""

  def apply(logits_BxV):
    for proc in processors:
      logits_BxV = proc(logits_BxV)
    return logits_BxV

  return apply


def geometric_mixture(logits: Sequence[jax.Array], weights: Sequence[float]) -> jax.Array:
  """`sum_i w_i z_i`: logits of the normalised product `prod_i softmax(z_i)^{w_i}`.

  Weights need not be positive or sum to one: DeRa extrapolates with lambda > 1, i.e. weights
  (lambda, 1 - lambda).
  """
  if len(logits) != len(weights) or not logits:
    raise ValueError(f"need one weight per model: {len(logits)} logits, {len(weights)} weights")
  return sum(w * z.astype(jnp.float32) for w, z in zip(weights, logits))
