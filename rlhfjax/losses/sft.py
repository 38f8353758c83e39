"""Supervised fine-tuning losses: cross-entropy and GEM.

Both take the model's logits, the token ids and a mask over *tokens* (1 on the tokens to learn,
e.g. the response), and return ``(loss, metrics)``. Position 0 is never scored (no logits predict
it), so the mask is zeroed there; with ``aggregation="token_mean"`` the loss is averaged over the
remaining masked tokens.

`chunked_cross_entropy` / `chunked_gem` take the final hidden states and the output kernel instead
of the logits and compute the same losses and metrics chunk by chunk over time, never holding the
float32 [B, T, V] logits (`tokens.map_logit_chunks`).
"""

import jax
import jax.numpy as jnp

from rlhfjax.losses import tokens as tok

GEM_LINKS = ("linear", "logsigmoid")

# Slope of the logsigmoid link in the GEM reference code (liziniu/GEM): w_v = sigmoid(0.01 (z_v - z_y)).
_GEM_LOGSIGMOID_SLOPE = 0.01


def _scored_mask(mask_BxT):
  """The token mask with position 0 removed (nothing predicts the first token)."""
  mask = jnp.asarray(mask_BxT).astype(jnp.float32)
  return mask.at[:, 0].set(0.0)


def _full_stats(logits_BxTxV, tokens_BxT):
  """`TokenStats` (log-probs, entropy, argmax accuracy) from the full logits."""
  logits, targets = tok.shift_for_next_token(logits_BxTxV, tokens_BxT)
  stats = tok.token_stats_from_logits(logits, targets, with_entropy=True, with_accuracy=True)
  return jax.tree.map(tok.pad_first_position, stats)


def _sft_result(losses_BxT, stats, mask_BxT, aggregation, num_tokens, num_sequences):
  """Aggregates per-token losses over the scored mask; metrics from the `TokenStats`: token-mean
  NLL, accuracy of the argmax prediction and predictive entropy over masked tokens."""
  mask = _scored_mask(mask_BxT)
  loss = tok.aggregate(
      losses_BxT, mask, aggregation, num_tokens=num_tokens, num_sequences=num_sequences
  )
  return loss, {
      "nll": tok.masked_mean(-stats.logp, mask),
      "accuracy": tok.masked_mean(stats.correct, mask),
      "entropy": tok.masked_mean(stats.entropy, mask),
      "num_tokens": jnp.sum(mask),
      tok.LOSS_WEIGHT: tok.aggregation_weight(mask, aggregation),
  }


def cross_entropy(
    logits_BxTxV,
    tokens_BxT,
    mask_BxT,
    *,
    aggregation="token_mean",
    num_tokens=None,
    num_sequences=None,
):
  """Next-token cross-entropy over the masked tokens.

  ``L = aggregate(-lp_t, m_t)`` with ``lp_t = log softmax(z_{t-1})[y_t]`` from `token_logprobs`.

  Args:
    logits_BxTxV: model outputs (position t predicts token t + 1).
    tokens_BxT: integer token ids.
    mask_BxT: 1 on the tokens to learn (position 0 is ignored).
    aggregation: one of `AGGREGATION_MODES`.
    num_tokens, num_sequences: optional global counts for `aggregate` (gradient accumulation over
      micro-batches or devices: sum the micro-batch losses).

  Returns:
    ``(loss, metrics)``: scalar loss and a dict with ``nll`` (token-mean), ``accuracy`` (argmax),
    ``entropy`` (mean predictive entropy, nats), ``num_tokens`` and ``loss_weight``
    (`tokens.aggregation_weight`).
  """
  stats = _full_stats(logits_BxTxV, tokens_BxT)
  return _sft_result(-stats.logp, stats, mask_BxT, aggregation, num_tokens, num_sequences)


def chunked_cross_entropy(
    hidden_BxTxD,
    w_DxV,
    tokens_BxT,
    mask_BxT,
    *,
    chunk_size,
    aggregation="token_mean",
    num_tokens=None,
    num_sequences=None,
    dtype=None,
):
  """`cross_entropy` of the logits ``hidden W`` without materialising them.

  The per-token log-probs (and the metrics' entropy and accuracy) are computed chunk by chunk
  over time (`tokens.map_logit_chunks`): at most [B, chunk_size, V] float32 logits exist at once,
  in the forward and the backward pass. Equal to ``cross_entropy(hidden W, ...)`` up to float
  summation order.

  Args:
    hidden_BxTxD: final hidden states (position t predicts token t + 1).
    w_DxV: output projection.
    tokens_BxT, mask_BxT, aggregation, num_tokens, num_sequences: as in `cross_entropy`.
    chunk_size: positions per chunk.
    dtype: compute dtype of the projection; default the hidden states'.

  Returns:
    ``(loss, metrics)`` as in `cross_entropy`.
  """
  stats = tok.chunked_token_stats(hidden_BxTxD, w_DxV, tokens_BxT, chunk_size=chunk_size,
                                  with_entropy=True, with_accuracy=True, dtype=dtype)
  return _sft_result(-stats.logp, stats, mask_BxT, aggregation, num_tokens, num_sequences)


def gem_token_losses(logits_NxV, targets_N, *, beta=0.7, h="logsigmoid"):
  """GEM loss for a flat set of positions: logits_NxV predict targets_N.

  ``L = -sum_v q_v w_v (log p_y - log p_v)`` with ``p = softmax(z)``,
  ``q = sg(softmax(z / beta))`` and weights ``w_v = sg(h'(...))``: 1 for the linear link,
  ``sigmoid(0.01 (z_v - z_y))`` for the logsigmoid link.

  With h linear the gradient is ``dL/dz = softmax(z / beta) - onehot(y)``; beta = 1 gives the
  cross-entropy gradient. The loss *value* is not the cross-entropy (it is 0 when p is one-hot on
  y); only its gradient is meaningful.

  Args:
    logits_NxV: logits, any float dtype (computed in float32).
    targets_N: integer target ids.
    beta: temperature of the stop-gradient distribution q; beta < 1 favours higher entropy.
    h: ``"linear"`` or ``"logsigmoid"`` (the paper's scripts use logsigmoid).

  Returns:
    losses_N.

  References:
    Li et al., "Entropic Distribution Matching in Supervised Fine-tuning of LLMs: Less Overfitting
    and Better Diversity" (GEM), arXiv 2408.16673; the link weights follow the released code
    (liziniu/GEM, ``gem_loss_func``).
  """
  if h not in GEM_LINKS:
    raise ValueError(f"unknown GEM link h={h!r}; expected one of {GEM_LINKS}")
  z = logits_NxV.astype(jnp.float32)
  z_y = jnp.take_along_axis(z, targets_N[..., None], axis=-1)
  log_p = jax.nn.log_softmax(z, axis=-1)
  log_p_y = jnp.take_along_axis(log_p, targets_N[..., None], axis=-1)
  q = jax.lax.stop_gradient(jax.nn.softmax(z / beta, axis=-1))
  if h == "linear":
    w = jnp.ones_like(z)
  else:
    w = jax.lax.stop_gradient(jax.nn.sigmoid(_GEM_LOGSIGMOID_SLOPE * (z - z_y)))
  return -jnp.sum(q * w * (log_p_y - log_p), axis=-1)


def gem(
    logits_BxTxV,
    tokens_BxT,
    mask_BxT,
    *,
    beta=0.7,
    h="logsigmoid",
    aggregation="token_mean",
    num_tokens=None,
    num_sequences=None,
):
  """GEM (entropic distribution matching) SFT loss over the masked tokens.

  Per position t >= 1 with logits ``z = logits[:, t - 1]`` and target ``y = tokens[:, t]``, the
  loss of `gem_token_losses`, then aggregated. The tabular fixed point under a data distribution
  p_D is ``p ∝ p_D^beta`` (linear link), i.e. higher entropy than p_D for beta < 1.

  Args:
    logits_BxTxV: model outputs (position t predicts token t + 1).
    tokens_BxT: integer token ids.
    mask_BxT: 1 on the tokens to learn (position 0 is ignored).
    beta: temperature of q (paper default 0.7).
    h: ``"linear"`` or ``"logsigmoid"`` (paper default).
    aggregation: one of `AGGREGATION_MODES` (the paper uses token_mean).
    num_tokens, num_sequences: optional global counts for `aggregate`.

  Returns:
    ``(loss, metrics)`` as in `cross_entropy`; ``metrics["nll"]`` is the ordinary cross-entropy.

  References:
    Li et al., arXiv 2408.16673 (GEM); code liziniu/GEM.
  """
  logits, targets = tok.shift_for_next_token(logits_BxTxV, tokens_BxT)
  losses = tok.pad_first_position(gem_token_losses(logits, targets, beta=beta, h=h))
  stats = _full_stats(logits_BxTxV, tokens_BxT)
  return _sft_result(losses, stats, mask_BxT, aggregation, num_tokens, num_sequences)


def chunked_gem(
    hidden_BxTxD,
    w_DxV,
    tokens_BxT,
    mask_BxT,
    *,
    chunk_size,
    beta=0.7,
    h="logsigmoid",
    aggregation="token_mean",
    num_tokens=None,
    num_sequences=None,
    dtype=None,
):
  """`gem` of the logits ``hidden W`` without materialising them (chunked like
  `chunked_cross_entropy`, whose arguments it shares; `beta` and `h` as in `gem`).

  Returns:
    ``(loss, metrics)`` as in `gem`.
  """
  def per_chunk(z, y):
    stats = tok.token_stats_from_logits(z, y, with_entropy=True, with_accuracy=True)
    return gem_token_losses(z, y, beta=beta, h=h), stats

  losses, stats = tok.map_logit_chunks(per_chunk, hidden_BxTxD, w_DxV, tokens_BxT,
                                       chunk_size=chunk_size, dtype=dtype)
  return _sft_result(losses, stats, mask_BxT, aggregation, num_tokens, num_sequences)
