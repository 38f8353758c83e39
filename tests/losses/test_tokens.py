"""Tests for rlhfjax.losses.tokens: alignment of logits with targets, masked reductions, aggregation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfjax import losses

B, T, V = 3, 5, 7


def _random_batch(seed, dtype=jnp.float32, scale=3.0):
  rng = np.random.default_rng(seed)
  logits = (scale * rng.standard_normal((B, T, V))).astype(np.float32)
  tokens = rng.integers(0, V, size=(B, T))
  return jnp.asarray(logits, dtype=dtype), jnp.asarray(tokens)


def _numpy_log_softmax(z):
  z = np.asarray(z, dtype=np.float64)
  m = z.max(axis=-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def _brute_force_logprobs(logits, tokens):
  """Loop oracle: logp[b, t] = log softmax(logits[b, t-1])[tokens[b, t]], 0 at t = 0."""
  logits = np.asarray(jnp.asarray(logits, jnp.float32), dtype=np.float64)
  tokens = np.asarray(tokens)
  out = np.zeros(tokens.shape)
  for b in range(tokens.shape[0]):
    for t in range(1, tokens.shape[1]):
      out[b, t] = _numpy_log_softmax(logits[b, t - 1])[tokens[b, t]]
  return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_token_logprobs_matches_brute_force_loop(dtype, scale):
  logits, tokens = _random_batch(0, dtype, scale)
  logp = jax.jit(losses.token_logprobs)(logits, tokens)
  assert logp.dtype == jnp.float32 and logp.shape == (B, T)
  expected = _brute_force_logprobs(logits, tokens)
  # Relative tolerance: at scale 1e4 log-probs are O(1e4) and float32 keeps ~7 digits.
  np.testing.assert_allclose(logp, expected, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(logp)[:, 0] == 0.0)


def test_token_logprobs_alignment_on_a_deterministic_model():
  # A "model" whose logits at position t put all mass on token t + 1 of the sequence: every
  # aligned log-prob is ~0, while a misaligned (unshifted) gather would give ~-1000.
  tokens = jnp.array([[1, 4, 2, 0, 3]])
  logits = 1000.0 * jax.nn.one_hot(jnp.roll(tokens, -1, axis=1), V)
  logp = losses.token_logprobs(logits, tokens)
  np.testing.assert_allclose(logp, np.zeros((1, T)), atol=1e-6)


def test_token_logprobs_rejects_mismatched_shapes():
  logits, tokens = _random_batch(1)
  with pytest.raises(ValueError, match="tokens_BxT"):
    losses.token_logprobs(logits, tokens[:, :-1])


def test_entropy_matches_brute_force_loop():
  logits, _ = _random_batch(2)
  ent = jax.jit(losses.entropy)(logits)
  expected = np.zeros((B, T))
  for b in range(B):
    for t in range(1, T):
      logp = _numpy_log_softmax(logits[b, t - 1])
      expected[b, t] = -(np.exp(logp) * logp).sum()
  np.testing.assert_allclose(ent, expected, rtol=1e-5, atol=1e-6)


def test_entropy_with_banned_tokens_is_finite_with_finite_gradient():
  logits = jnp.array([[[0.0, 0.0, -jnp.inf, -jnp.inf]] * 3])
  ent, grad = jax.jit(jax.value_and_grad(lambda z: losses.entropy(z).sum()))(logits)
  np.testing.assert_allclose(ent, 2 * np.log(2.0), rtol=1e-6)  # two scored positions
  assert np.all(np.isfinite(grad))


def test_masked_sum_and_mean_against_hand_computation():
  x = jnp.array([[1.0, 2.0, 3.0], [4.0, jnp.nan, 6.0]])
  mask = jnp.array([[1, 0, 1], [0, 0, 1]])
  assert losses.masked_sum(x, mask) == 1.0 + 3.0 + 6.0  # the NaN is masked out
  np.testing.assert_allclose(losses.masked_mean(x, mask), 10.0 / 3.0)
  np.testing.assert_allclose(losses.masked_mean(x, mask, axis=-1), [2.0, 6.0])
  np.testing.assert_allclose(losses.masked_sum(x, mask, axis=0), [1.0, 0.0, 9.0])
  # Float weights: sum(w x) / sum(w), not a count of the nonzero weights.
  weights = jnp.array([[0.5, 0.0, 2.0], [0.0, 0.0, 0.25]])
  np.testing.assert_allclose(losses.masked_mean(x, weights), (0.5 + 6.0 + 1.5) / 2.75, rtol=1e-6)
  np.testing.assert_allclose(losses.masked_mean(x, weights, axis=-1), [6.5 / 2.5, 6.0], rtol=1e-6)


def test_masked_mean_of_all_masked_is_zero_with_zero_gradient():
  x = jnp.arange(6.0).reshape(2, 3)
  mask = jnp.array([[0, 0, 0], [1, 1, 0]])
  np.testing.assert_allclose(losses.masked_mean(x, mask, axis=-1), [0.0, 3.5])
  assert losses.masked_mean(x, jnp.zeros_like(mask)) == 0.0
  grad = jax.grad(lambda y: losses.masked_mean(y, mask, axis=-1).sum())(x)
  np.testing.assert_allclose(grad, [[0.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
  grad_all_masked = jax.grad(lambda y: losses.masked_mean(y, jnp.zeros_like(mask)))(x)
  np.testing.assert_array_equal(grad_all_masked, np.zeros((2, 3)))


def test_sequence_logprobs_is_masked_sum_over_time():
  logp = jnp.array([[0.0, -1.0, -2.0], [0.0, -0.5, -0.25]])
  mask = jnp.array([[0, 1, 1], [0, 1, 0]])
  np.testing.assert_allclose(losses.sequence_logprobs(logp, mask), [-3.0, -0.5])


def _hand_aggregate(loss, mask, mode, max_len=None):
  """Independent oracle written with Python loops over rows."""
  loss, mask = np.asarray(loss, np.float64), np.asarray(mask, np.float64)
  rows = [(loss[b] * mask[b]).sum() for b in range(loss.shape[0])]
  counts = [mask[b].sum() for b in range(loss.shape[0])]
  if mode == "token_mean":
    return sum(rows) / sum(counts)
  if mode == "sum_over_constant":
    return sum(rows) / (loss.shape[0] * (max_len or loss.shape[1]))
  nonempty = [b for b in range(loss.shape[0]) if counts[b] > 0]
  if mode == "seq_mean_token_mean":
    return sum(rows[b] / counts[b] for b in nonempty) / len(nonempty)
  return sum(rows[b] for b in nonempty) / len(nonempty)  # seq_mean_token_sum


def _loss_and_mask(seed, batch=4, length=6):
  rng = np.random.default_rng(seed)
  loss = jnp.asarray(rng.standard_normal((batch, length)), jnp.float32)
  mask = rng.random((batch, length)) < 0.6
  mask[0] = False  # an all-masked row
  mask[1, 0] = True  # at least one non-empty row
  return loss, jnp.asarray(mask)


@pytest.mark.parametrize("mode", losses.AGGREGATION_MODES)
def test_aggregate_against_hand_computation(mode):
  loss, mask = _loss_and_mask(3)
  got = jax.jit(losses.aggregate, static_argnames="mode")(loss, mask, mode=mode)
  np.testing.assert_allclose(got, _hand_aggregate(loss, mask, mode), rtol=1e-6)


@pytest.mark.parametrize("mode", losses.AGGREGATION_MODES)
def test_aggregate_with_float_weights_against_hand_computation(mode):
  """A float mask weights tokens: N = sum(m) (and per-row sum(m)), as the formulas say."""
  loss, mask = _loss_and_mask(7)
  scale = np.random.default_rng(7).uniform(0.1, 2.0, mask.shape)
  weights = jnp.asarray(np.asarray(mask) * scale, jnp.float32)
  got = losses.aggregate(loss, weights, mode)
  np.testing.assert_allclose(got, _hand_aggregate(loss, weights, mode), rtol=1e-6)
  if mode == "token_mean":
    np.testing.assert_allclose(losses.aggregation_weight(weights, mode), np.sum(weights), rtol=1e-6)


def test_sum_over_constant_uses_max_len():
  loss, mask = _loss_and_mask(4)
  got = losses.aggregate(loss, mask, "sum_over_constant", max_len=100)
  np.testing.assert_allclose(got, _hand_aggregate(loss, mask, "sum_over_constant", 100), rtol=1e-6)


@pytest.mark.parametrize("mode", losses.AGGREGATION_MODES)
def test_aggregate_with_global_counts_is_invariant_to_micro_batch_split(mode):
  loss, mask = _loss_and_mask(5, batch=6)
  full = losses.aggregate(loss, mask, mode)
  num_tokens = jnp.sum(mask)
  # The global sequence count each mode uses by default on the full batch.
  if mode == "sum_over_constant":
    num_sequences = loss.shape[0]
  else:
    num_sequences = jnp.sum(jnp.any(mask, axis=-1))
  split = sum(
      losses.aggregate(
          loss[i : i + 2], mask[i : i + 2], mode, num_tokens=num_tokens, num_sequences=num_sequences
      )
      for i in range(0, 6, 2)
  )
  np.testing.assert_allclose(split, full, rtol=1e-6)


def test_token_mean_without_global_counts_depends_on_split():
  # Guards the test above: the split-invariance really needs the global count.
  loss = jnp.array([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
  mask = jnp.array([[1, 1, 1], [1, 0, 0]])
  full = losses.aggregate(loss, mask, "token_mean")
  local = 0.5 * (
      losses.aggregate(loss[:1], mask[:1], "token_mean")
      + losses.aggregate(loss[1:], mask[1:], "token_mean")
  )
  assert not np.isclose(full, local)


@pytest.mark.parametrize("mode", losses.AGGREGATION_MODES)
def test_aggregate_all_masked_is_zero_with_finite_gradient(mode):
  loss = jnp.ones((2, 3))
  mask = jnp.zeros((2, 3))
  assert losses.aggregate(loss, mask, mode) == 0.0
  grad = jax.grad(lambda x: losses.aggregate(x, mask, mode))(loss)
  np.testing.assert_array_equal(grad, np.zeros((2, 3)))


def test_aggregate_rejects_unknown_mode_and_bad_shapes():
  loss, mask = _loss_and_mask(6)
  with pytest.raises(ValueError, match="token_sum_mean"):
    losses.aggregate(loss, mask, "token_sum_mean")
  with pytest.raises(ValueError, match="same rank-2 shape"):
    losses.aggregate(loss, mask[:, :-1], "token_mean")


# -- chunked log-probs: the full path on h W is the oracle --------------------------------------

CB, CT, CD, CV = 3, 7, 6, 11  # T - 1 = 6 positions are scored


def _hidden_batch(seed, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.standard_normal((CB, CT, CD)), dtype)
  w = jnp.asarray(rng.standard_normal((CD, CV)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, CV, size=(CB, CT)))
  # Per-token weights of a scalar test function (so gradients see every output entry).
  a, b = (jnp.asarray(rng.standard_normal((CB, CT)), jnp.float32) for _ in range(2))
  return h, w, tokens, a, b


def _full_stats(h, w, tokens):
  """The unchunked path: float32 logits h W (compute dtype of h, float32 accumulation)."""
  logits = jnp.einsum("btd,dv->btv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
  correct = jnp.argmax(logits[:, :-1], -1) == tokens[:, 1:]
  return losses.TokenStats(losses.token_logprobs(logits, tokens), losses.entropy(logits),
                           losses.pad_first_position(correct.astype(jnp.float32)))


def _chunked_stats(h, w, tokens, chunk_size):
  return losses.chunked_token_stats(h, w, tokens, chunk_size=chunk_size, with_entropy=True,
                                    with_accuracy=True)


def _stats_and_gradients(stats_fn, h, w, tokens, a, b):
  """Jitted: the statistics, and the gradient w.r.t. (h, W) of a scalar of log-probs and
  entropies (random weights a, b, so the gradient sees every output entry)."""
  def f(h, w):
    s = stats_fn(h, w, tokens)
    return jnp.sum(a * s.logp) + jnp.sum(b * s.entropy), s
  (_, stats), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(h, w)
  return stats, grads


# 2 and 3 divide T - 1 = 6; 4 does not (padded); 50 is clipped to 6.
@pytest.mark.parametrize("chunk_size", [2, 3, 4, 50])
def test_chunked_token_stats_equal_full_logits_values_and_gradients(chunk_size):
  h, w, tokens, a, b = _hidden_batch(chunk_size)
  chunked = functools.partial(_chunked_stats, chunk_size=chunk_size)
  got, got_grads = _stats_and_gradients(chunked, h, w, tokens, a, b)
  want, want_grads = _stats_and_gradients(_full_stats, h, w, tokens, a, b)
  assert got.logp.shape == got.entropy.shape == got.correct.shape == (CB, CT)
  np.testing.assert_allclose(got.logp, want.logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.entropy, want.entropy, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got.correct, want.correct)
  np.testing.assert_array_equal(np.asarray(got.logp)[:, 0], 0.0)
  for g_got, g_want in zip(got_grads, want_grads):
    np.testing.assert_allclose(g_got, g_want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      losses.chunked_token_logprobs(h, w, tokens, chunk_size=chunk_size), want.logp,
      rtol=1e-5, atol=1e-5)


def test_chunked_token_stats_in_bfloat16_close_to_full_bfloat16_path():
  h, w, tokens, a, b = _hidden_batch(7, jnp.bfloat16)
  chunked = functools.partial(_chunked_stats, chunk_size=4)
  got, got_grads = _stats_and_gradients(chunked, h, w, tokens, a, b)
  want, want_grads = _stats_and_gradients(_full_stats, h, w, tokens, a, b)
  assert got.logp.dtype == jnp.float32
  # Same bfloat16 products and float32 accumulation; only the summation order may differ.
  np.testing.assert_allclose(got.logp, want.logp, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(got.entropy, want.entropy, rtol=1e-3, atol=1e-3)
  for g_got, g_want in zip(got_grads, want_grads):
    assert g_got.dtype == g_want.dtype
    np.testing.assert_allclose(np.asarray(g_got, np.float32), np.asarray(g_want, np.float32),
                               rtol=2e-2, atol=2e-2)


def test_chunked_logprobs_only_requested_statistics():
  h, w, tokens, _, _ = _hidden_batch(0)
  stats = losses.chunked_token_stats(h, w, tokens, chunk_size=4)
  assert stats.entropy is None and stats.correct is None


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_loss_and_gradient_never_hold_the_full_logits():
  # Large V: the float32 [B, T, V] logits (and their gradient) are 2 * 64 * 16384 * 4 = 8 MiB.
  b, t, d, v, chunk = 2, 64, 16, 16384, 8
  h = jnp.zeros((b, t, d), jnp.float32)
  w = jnp.zeros((d, v), jnp.float32)
  tokens = jnp.zeros((b, t), jnp.int32)
  full_logits_bytes = b * t * v * 4

  def loss(stats_fn):
    return jax.value_and_grad(lambda h, w: jnp.sum(stats_fn(h, w, tokens)), argnums=(0, 1))

  full = _temp_bytes(loss(lambda h, w, y: losses.token_logprobs(h @ w, y)), h, w)
  chunked = _temp_bytes(loss(lambda h, w, y: losses.chunked_token_logprobs(
      h, w, y, chunk_size=chunk)), h, w)
  # The compiler's own figure (deterministic, not a timing): the full path holds at least one
  # [B, T, V] float32 buffer; the chunked one a few [B, chunk, V] ones plus the [D, V] gradient.
  assert full >= full_logits_bytes
  assert chunked < 0.5 * full, (chunked, full)
  assert chunked < full_logits_bytes / 2


def test_chunked_token_stats_reject_bad_inputs():
  h, w, tokens, _, _ = _hidden_batch(0)
  with pytest.raises(ValueError, match="chunk_size"):
    losses.chunked_token_stats(h, w, tokens, chunk_size=0)
  with pytest.raises(ValueError, match="model dimension D"):
    losses.chunked_token_stats(h, w[:-1], tokens, chunk_size=2)
  with pytest.raises(ValueError, match="tokens_BxT"):
    losses.chunked_token_stats(h, w, tokens[:, :-1], chunk_size=2)
  with pytest.raises(ValueError, match="rank"):
    losses.chunked_token_stats(h[0], w, tokens, chunk_size=2)
