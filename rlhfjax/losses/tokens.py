"""Token utilities: align logits with targets, masked reductions, loss aggregation.

Alignment convention (used by every loss in the library). A causal model's logits at position t
predict token t + 1, so ``logits_BxTxV[:, t - 1]`` scores ``tokens_BxT[:, t]``. Per-token
quantities returned here are aligned with the token they score: entry t belongs to token t, entry 0
is 0.0 because no logits predict the first token. A response mask over *tokens* therefore applies
directly to the outputs of `token_logprobs` and `entropy`.

`shift_for_next_token` / `pad_first_position` are the only place the shift by one is written; any
loss that needs the full next-token distribution (e.g. GEM) uses them rather than slicing itself.
`map_logit_chunks` is their chunked twin: it takes the final hidden states and the output kernel
instead of logits, so that the float32 [B, T, V] logits never exist at once (with V = 128256, as in
Llama 3, they dominate the memory of a training step).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

AGGREGATION_MODES = (
    "token_mean",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "sum_over_constant",
)

# The metric under which a loss reports the denominator of its aggregation over the batch it saw
# (`aggregation_weight`). A train step that accumulates gradients over micro-batches weights each
# micro-batch by it, so that the result is the loss of the whole batch with global counts
# (`train.steps.make_train_step`); a loss without it counts as weight 1 per micro-batch.
LOSS_WEIGHT = "loss_weight"


def shift_for_next_token(logits_BxTxV, tokens_BxT):
  """Pairs each target token with the logits that predict it.

  Args:
    logits_BxTxV: model outputs; position t predicts token t + 1.
    tokens_BxT: integer token ids.

  Returns:
    ``(logits_BxT1xV, targets_BxT1)`` with T1 = T - 1: ``logits_BxTxV[:, :-1]`` in float32 and
    ``tokens_BxT[:, 1:]``. Pad per-position results back to length T with `pad_first_position`.
  """
  if logits_BxTxV.ndim != 3 or tokens_BxT.ndim != 2:
    raise ValueError(
        "expected logits_BxTxV of rank 3 and tokens_BxT of rank 2, got shapes "
        f"{logits_BxTxV.shape} and {tokens_BxT.shape}"
    )
  if logits_BxTxV.shape[:2] != tokens_BxT.shape:
    raise ValueError(
        f"logits_BxTxV shape {logits_BxTxV.shape} does not match tokens_BxT shape "
        f"{tokens_BxT.shape} in the first two (batch, time) axes"
    )
  # float32 whatever the model dtype: log-softmax in bfloat16 loses ~3 significant digits.
  return logits_BxTxV[:, :-1].astype(jnp.float32), tokens_BxT[:, 1:]


def pad_first_position(x_BxT1):
  """Prepends a zero column so a per-target result of length T - 1 is aligned with tokens."""
  return jnp.pad(x_BxT1, ((0, 0), (1, 0)))


def token_logprobs(logits_BxTxV, tokens_BxT):
  """Per-token log-probabilities of the given tokens, aligned with the tokens.

  ``logp[:, t] = log softmax(logits[:, t - 1])[tokens[:, t]]`` for t >= 1 and 0.0 at t = 0,
  computed in float32 as ``z_y - logsumexp(z)`` (no softmax is materialised).

  Args:
    logits_BxTxV: model outputs, any float dtype.
    tokens_BxT: integer token ids.

  Returns:
    logp_BxT: float32 log-probabilities.
  """
  logits, targets = shift_for_next_token(logits_BxTxV, tokens_BxT)
  return pad_first_position(token_stats_from_logits(logits, targets).logp)


def entropy_from_logits(logits_NxV):
  """Entropy of ``softmax(logits)`` along the last axis, in float32.

  ``H = logsumexp(z) - sum_v p_v z_v``. Logits of -inf (banned tokens) contribute 0, also to the
  gradient.
  """
  z = logits_NxV.astype(jnp.float32)
  p = jax.nn.softmax(z, axis=-1)
  # Where z = -inf, p = 0; replace z there so that 0 * z is 0 (and its gradient not NaN).
  z_finite = jnp.where(jnp.isfinite(z), z, 0.0)
  return jax.nn.logsumexp(z, axis=-1) - jnp.sum(p * z_finite, axis=-1)


def entropy(logits_BxTxV):
  """Entropy of the next-token distribution that predicted each token.

  Entry t is the entropy of ``softmax(logits[:, t - 1])`` (aligned like `token_logprobs`); entry 0
  is 0.0.

  Args:
    logits_BxTxV: model outputs, any float dtype.

  Returns:
    ent_BxT: float32 entropies in nats.
  """
  if logits_BxTxV.ndim != 3:
    raise ValueError(f"expected logits_BxTxV of rank 3, got shape {logits_BxTxV.shape}")
  return pad_first_position(entropy_from_logits(logits_BxTxV[:, :-1]))


class TokenStats(NamedTuple):
  """Per-token statistics of the next-token distributions, aligned with the tokens (entry 0 is 0).

  Attributes:
    logp: [B, T] float32 log-probabilities of the tokens (as `token_logprobs`).
    entropy: [B, T] float32 entropies of the predicting distributions (as `entropy`), or None.
    correct: [B, T] float32, 1.0 where the argmax prediction is the token, or None.
  """
  logp: jax.Array
  entropy: jax.Array | None = None
  correct: jax.Array | None = None


def token_stats_from_logits(logits_BxCxV, targets_BxC, *, with_entropy=False,
                            with_accuracy=False) -> TokenStats:
  """`TokenStats` of already-paired logits and targets (no shift): ``z_y - logsumexp(z)``, ...

  Args:
    logits_BxCxV: logits predicting `targets_BxC` (float32 for the library's precision).
    targets_BxC: integer token ids.
    with_entropy: also the entropy of ``softmax(z)`` (`entropy_from_logits`).
    with_accuracy: also ``argmax(z) == y`` as float32.

  Returns:
    `TokenStats` of shape [B, C] (fields not asked for are None).
  """
  z_y = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
  logp = z_y - jax.nn.logsumexp(logits_BxCxV, axis=-1)
  ent = entropy_from_logits(logits_BxCxV) if with_entropy else None
  correct = ((jnp.argmax(logits_BxCxV, axis=-1) == targets_BxC).astype(jnp.float32)
             if with_accuracy else None)
  return TokenStats(logp, ent, correct)


def map_logit_chunks(fn: Callable[[jax.Array, jax.Array], Any], h_BxTxD, w_DxV, tokens_BxT, *,
                     chunk_size: int, dtype=None) -> Any:
  """Applies a per-position function of the next-token logits, chunk by chunk over time.

  For each chunk of C positions, the logits ``z = h[:, t - 1] W`` [B, C, V] are computed in
  `dtype` with float32 accumulation and handed with their targets ``tokens[:, t]`` to
  ``fn(z_BxCxV, targets_BxC)``, which returns a pytree of [B, C] arrays. The chunks run in a
  `lax.map` under `jax.checkpoint`, so neither the forward nor the backward pass holds more than
  one chunk of logits: the backward pass recomputes each chunk's logits from h and W (one extra
  [B, C, D] x [D, V] matmul per chunk) instead of storing them.

  Chunks are taken along time, not along the flattened B * T rows, because the batch axis is the
  one sharded over data-parallel devices: a chunk then holds every device's rows and each device
  computes its own [B / devices, C, V] slice, where chunks of flattened rows would each live on
  one device and be gathered. A time length T - 1 that C does not divide is padded (the padded
  positions are computed and dropped).

  Args:
    fn: ``fn(logits_BxCxV float32, targets_BxC) -> pytree of [B, C] arrays``.
    h_BxTxD: final hidden states (e.g. `Transformer.hidden_states`); position t predicts token
      t + 1, as for logits.
    w_DxV: the output projection (`lm_head` kernel, or the transposed tied embedding).
    tokens_BxT: integer token ids.
    chunk_size: C, positions per chunk (clipped to T - 1); memory per chunk is B * C * V float32.
    dtype: compute dtype of the matmul; default h's dtype.

  Returns:
    fn's pytree with every leaf [B, T], aligned with the tokens (entry 0 is 0).
  """
  if h_BxTxD.ndim != 3 or w_DxV.ndim != 2 or tokens_BxT.ndim != 2:
    raise ValueError(
        "expected h_BxTxD of rank 3, w_DxV of rank 2 and tokens_BxT of rank 2, got shapes "
        f"{h_BxTxD.shape}, {w_DxV.shape} and {tokens_BxT.shape}")
  if h_BxTxD.shape[:2] != tokens_BxT.shape or h_BxTxD.shape[2] != w_DxV.shape[0]:
    raise ValueError(
        f"h_BxTxD shape {h_BxTxD.shape} must match tokens_BxT {tokens_BxT.shape} in (batch, "
        f"time) and w_DxV {w_DxV.shape} in the model dimension D")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  dtype = jnp.dtype(h_BxTxD.dtype if dtype is None else dtype)
  b, t, d = h_BxTxD.shape
  t1 = max(t - 1, 1)
  c = min(chunk_size, t1)
  n = -(-t1 // c)
  pad = n * c - (t - 1)
  h = jnp.pad(h_BxTxD[:, :-1].astype(dtype), ((0, 0), (0, pad), (0, 0)))
  y = jnp.pad(tokens_BxT[:, 1:], ((0, 0), (0, pad)))
  h_NxBxCxD = h.reshape(b, n, c, d).swapaxes(0, 1)
  y_NxBxC = y.reshape(b, n, c).swapaxes(0, 1)

  @jax.checkpoint
  def chunk(w, h_BxCxD, y_BxC):
    z_BxCxV = jnp.einsum("bcd,dv->bcv", h_BxCxD, w, preferred_element_type=jnp.float32)
    return fn(z_BxCxV, y_BxC)

  w = w_DxV.astype(dtype)
  out = jax.lax.map(lambda xs: chunk(w, *xs), (h_NxBxCxD, y_NxBxC))
  return jax.tree.map(
      lambda x_NxBxC: pad_first_position(x_NxBxC.swapaxes(0, 1).reshape(b, n * c)[:, :t - 1]),
      out)


def chunked_token_stats(h_BxTxD, w_DxV, tokens_BxT, *, chunk_size: int, with_entropy=False,
                        with_accuracy=False, dtype=None) -> TokenStats:
  """`token_logprobs` (and optionally `entropy`, argmax accuracy) from hidden states, chunked.

  Equal to the full path ``token_logprobs(h W, tokens)`` (up to float summation order) without
  materialising the [B, T, V] logits; see `map_logit_chunks` for the chunking, its memory and
  the arguments.

  Returns:
    `TokenStats` [B, T] (entropy / correct only when asked for).
  """
  return map_logit_chunks(
      lambda z, y: token_stats_from_logits(z, y, with_entropy=with_entropy,
                                           with_accuracy=with_accuracy),
      h_BxTxD, w_DxV, tokens_BxT, chunk_size=chunk_size, dtype=dtype)


def chunked_token_logprobs(h_BxTxD, w_DxV, tokens_BxT, *, chunk_size: int, dtype=None):
  """`token_logprobs(h W, tokens)` [B, T] without the full logits (`chunked_token_stats`)."""
  return chunked_token_stats(h_BxTxD, w_DxV, tokens_BxT, chunk_size=chunk_size, dtype=dtype).logp


def _safe_divide(numerator, denominator):
  """numerator / denominator, and 0 (with zero gradient) where the denominator is 0."""
  nonzero = denominator != 0
  return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), 0.0)


def masked_sum(x, mask, axis=None):
  """``sum(mask * x)`` over `axis`; entries with mask 0 are ignored even if x is inf or NaN there.

  Args:
    x: values.
    mask: broadcastable to x; boolean or float weights.
    axis: axis or axes to reduce (None: all).
  """
  mask = jnp.asarray(mask)
  weighted = jnp.where(mask != 0, x * mask.astype(jnp.result_type(x, jnp.float32)), 0.0)
  return jnp.sum(weighted, axis=axis)


def masked_mean(x, mask, axis=None):
  """``sum(mask * x) / sum(mask)`` over `axis`; 0 where the mask sums to 0 (finite gradients too)."""
  mask = jnp.broadcast_to(jnp.asarray(mask), jnp.shape(x))
  total = jnp.sum(mask.astype(jnp.float32), axis=axis)
  return _safe_divide(masked_sum(x, mask, axis=axis), total)


def sequence_logprobs(logp_BxT, mask_BxT):
  """Sequence log-probabilities ``lp(y) = sum_t m_t lp_t``.

  Args:
    logp_BxT: per-token log-probs from `token_logprobs`.
    mask_BxT: response mask over tokens.

  Returns:
    logp_B: per-sequence log-probs.
  """
  return masked_sum(logp_BxT, mask_BxT, axis=-1)


def aggregation_weight(mask_BxT, mode):
  """What `aggregate` divides by on this batch, before any constant: N = sum(mask) for
  ``token_mean``; S, the sequences with an unmasked token, for the ``seq_mean_*`` modes; the batch
  size B for ``sum_over_constant``. Float32 scalar.

  A loss aggregated over micro-batches 1..k with these local counts c_i equals the loss of their
  union with global counts when the micro-batch losses L_i are combined as
  ``sum_i c_i L_i / sum_i c_i`` (exactly, for every mode), which is how a train step accumulating
  gradients uses it (`LOSS_WEIGHT`).
  """
  if mode not in AGGREGATION_MODES:
    raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {AGGREGATION_MODES}")
  mask = jnp.asarray(mask_BxT)
  if mode == "token_mean":
    return jnp.sum(mask.astype(jnp.float32))
  if mode == "sum_over_constant":
    return jnp.asarray(jnp.shape(mask)[0], jnp.float32)
  return jnp.sum(jnp.any(mask != 0, axis=-1).astype(jnp.float32))


def aggregate(loss_BxT, mask_BxT, mode, *, max_len=None, num_tokens=None, num_sequences=None):
  """Reduces a per-token loss to a scalar under an explicit aggregation mode.

  With m the mask, L the loss, N = sum(m) tokens and S sequences:
    - ``token_mean``:          sum_{b,t} m L / N.
    - ``seq_mean_token_mean``: (1/S) sum_b [sum_t m L / sum_t m].
    - ``seq_mean_token_sum``:  (1/S) sum_b sum_t m L.
    - ``sum_over_constant``:   sum_{b,t} m L / (S * max_len)   (Dr. GRPO's constant normaliser).

  Global counts. By default N and S are counted on this batch; pass `num_tokens` / `num_sequences`
  counted over the *global* batch (all devices and micro-batches) so that summing the results of
  micro-batches gives the loss of the whole batch, independent of how it was split.

  Defaults for S: in the ``seq_mean_*`` modes S is the number of sequences with at least one
  unmasked token (an all-masked row, e.g. padding or a filtered group, is treated as absent); in
  ``sum_over_constant`` S is the batch size B, since the normaliser is meant to be a constant.
  Empty denominators give a loss of 0, never NaN.

  Args:
    loss_BxT: per-token losses.
    mask_BxT: token mask (boolean or float weights).
    mode: one of `AGGREGATION_MODES`.
    max_len: generation budget for ``sum_over_constant``; defaults to T.
    num_tokens: global N for ``token_mean``.
    num_sequences: global S for the other modes.

  Returns:
    A scalar loss.

  References:
    Liu et al., "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO),
    arXiv 2503.20783; Yu et al., DAPO, arXiv 2503.14476 (token_mean).
  """
  if jnp.ndim(loss_BxT) != 2 or jnp.shape(loss_BxT) != jnp.shape(mask_BxT):
    raise ValueError(
        "aggregate expects loss_BxT and mask_BxT of the same rank-2 shape, got "
        f"{jnp.shape(loss_BxT)} and {jnp.shape(mask_BxT)}"
    )
  length = jnp.shape(loss_BxT)[1]
  mask = jnp.asarray(mask_BxT)
  count = aggregation_weight(mask, mode)  # Validates the mode.

  if mode == "token_mean":
    return _safe_divide(masked_sum(loss_BxT, mask), count if num_tokens is None else num_tokens)

  if num_sequences is None:
    num_sequences = count
  if mode == "sum_over_constant":
    if max_len is None:
      max_len = length
    return _safe_divide(masked_sum(loss_BxT, mask), num_sequences * max_len)

  if mode == "seq_mean_token_mean":
    per_sequence = masked_mean(loss_BxT, mask, axis=-1)
  else:  # seq_mean_token_sum
    per_sequence = masked_sum(loss_BxT, mask, axis=-1)
  return _safe_divide(jnp.sum(per_sequence), num_sequences)
