"""Tests for rlhfjax.losses.sft: cross-entropy and GEM."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfjax import losses

B, T, V = 3, 6, 5


def _batch(seed):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(2.0 * rng.standard_normal((B, T, V)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, V, size=(B, T)))
  mask = rng.random((B, T)) < 0.7
  mask[:, 1] = True  # every row has a scored token
  return logits, tokens, jnp.asarray(mask)


def _np(*arrays):
  """Host copies for the Python-loop oracles (indexing device arrays in a loop is slow)."""
  return tuple(np.asarray(a) for a in arrays)


def _numpy_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max(axis=-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def _numpy_gem(z, y, beta, h):
  """GEM per-position loss written from the formula in ALGORITHMS.md, in float64."""
  z = np.asarray(z, np.float64)
  log_p = _numpy_log_softmax(z)
  q = np.exp(_numpy_log_softmax(z / beta))
  w = np.ones_like(z) if h == "linear" else 1.0 / (1.0 + np.exp(-0.01 * (z - z[y])))
  return -np.sum(q * w * (log_p[y] - log_p))


def _scored_positions(mask):
  """(b, t) pairs that are scored: masked-in and t >= 1 (nothing predicts token 0)."""
  mask = np.asarray(mask)
  return [(b, t) for b in range(mask.shape[0]) for t in range(1, mask.shape[1]) if mask[b, t]]


@pytest.mark.parametrize("loss_name", ["cross_entropy", "gem_linear", "gem_logsigmoid"])
def test_token_mean_loss_matches_brute_force_loop(loss_name):
  logits, tokens, mask = _batch(0)
  mask = mask.at[:, 0].set(True)  # position 0 must be ignored even when the mask covers it
  if loss_name == "cross_entropy":
    fn = losses.cross_entropy
    per_position = lambda z, y: -_numpy_log_softmax(z)[y]
  else:
    h = loss_name.split("_")[1]
    fn = functools.partial(losses.gem, beta=0.7, h=h)
    per_position = functools.partial(_numpy_gem, beta=0.7, h=h)
  loss, metrics = jax.jit(fn)(logits, tokens, mask)
  positions = _scored_positions(mask)
  logits, tokens = _np(logits, tokens)
  expected = np.mean([per_position(logits[b, t - 1], int(tokens[b, t])) for b, t in positions])
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  expected_nll = np.mean([-_numpy_log_softmax(logits[b, t - 1])[tokens[b, t]] for b, t in positions])
  np.testing.assert_allclose(metrics["nll"], expected_nll, rtol=1e-5)
  assert metrics["num_tokens"] == len(positions)


def test_cross_entropy_metrics_accuracy_and_entropy():
  logits, tokens, mask = _batch(1)
  _, metrics = jax.jit(losses.cross_entropy)(logits, tokens, mask)
  positions = _scored_positions(mask)
  logits, tokens = _np(logits, tokens)
  accuracy = np.mean([np.argmax(logits[b, t - 1]) == tokens[b, t] for b, t in positions])
  entropy = np.mean(
      [-(np.exp(lp) * lp).sum() for lp in (_numpy_log_softmax(logits[b, t - 1]) for b, t in positions)]
  )
  np.testing.assert_allclose(metrics["accuracy"], accuracy, rtol=1e-6)
  np.testing.assert_allclose(metrics["entropy"], entropy, rtol=1e-5)


@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
@pytest.mark.parametrize("beta", [0.5, 0.7, 1.0])
def test_gem_gradient_is_weighted_tempered_softmax_minus_onehot(beta, h):
  """With q and w held fixed (stop-gradients), dL/dz_k = q_k w_k - [k = y] sum_v q_v w_v; for the
  linear link (w = 1) that is softmax(z / beta) - onehot(y) (ALGORITHMS.md §1)."""
  logits, tokens, mask = _batch(2)
  grad = jax.jit(jax.grad(lambda z: losses.gem(z, tokens, mask, beta=beta, h=h)[0]))(logits)
  positions = _scored_positions(mask)
  logits_np, tokens_np = _np(logits, tokens)
  expected = np.zeros((B, T, V))
  for b, t in positions:
    z, y = logits_np[b, t - 1].astype(np.float64), tokens_np[b, t]
    w = np.ones(V) if h == "linear" else 1.0 / (1.0 + np.exp(-0.01 * (z - z[y])))
    qw = np.exp(_numpy_log_softmax(z / beta)) * w
    expected[b, t - 1] = (qw - np.eye(V)[y] * qw.sum()) / len(positions)
  np.testing.assert_allclose(grad, expected, atol=1e-6)
  if beta == 1.0 and h == "linear":
    ce_grad = jax.jit(jax.grad(lambda z: losses.cross_entropy(z, tokens, mask)[0]))(logits)
    np.testing.assert_allclose(grad, ce_grad, atol=1e-6)


@pytest.mark.parametrize("beta", [0.5, 0.8])
def test_gem_tabular_fixed_point_is_tempered_data_distribution(beta):
  # One position, data distribution p_D over V tokens. Gradient descent on the population loss
  # sum_y p_D(y) L_GEM(z, y) converges to softmax(z) ∝ p_D^beta (ALGORITHMS.md §1).
  p_data = jnp.array([0.5, 0.25, 0.15, 0.07, 0.03])
  targets = jnp.arange(V)

  def population_loss(z):
    per_target = losses.gem_token_losses(jnp.tile(z, (V, 1)), targets, beta=beta, h="linear")
    return jnp.sum(p_data * per_target)

  @jax.jit
  def descend(z):
    step = lambda z, _: (z - 1.0 * jax.grad(population_loss)(z), None)
    return jax.lax.scan(step, z, length=3000)[0]

  z = descend(jnp.zeros(V))
  expected = p_data**beta / jnp.sum(p_data**beta)
  np.testing.assert_allclose(jax.nn.softmax(z), expected, atol=1e-5)
  # Higher entropy than the data for beta < 1.
  entropy = lambda p: -jnp.sum(p * jnp.log(p))
  assert entropy(jax.nn.softmax(z)) > entropy(p_data)


@pytest.mark.parametrize("loss_fn", [losses.cross_entropy, losses.gem])
def test_masked_positions_do_not_affect_the_loss(loss_fn):
  logits, tokens, mask = _batch(3)
  loss_fn = jax.jit(loss_fn)
  loss, _ = loss_fn(logits, tokens, mask)
  # Change the logits that predict masked tokens and the masked tokens themselves.
  predicts_masked = jnp.pad(~mask[:, 1:], ((0, 0), (0, 1)))[..., None]
  new_logits = jnp.where(predicts_masked, 100.0 * jnp.ones_like(logits), logits)
  new_tokens = jnp.where(mask, tokens, (tokens + 1) % V)
  new_loss, _ = loss_fn(new_logits, new_tokens, mask)
  np.testing.assert_allclose(new_loss, loss, rtol=1e-6)
  grad = jax.jit(jax.grad(lambda z: loss_fn(z, tokens, mask)[0]))(logits)
  np.testing.assert_array_equal(np.asarray(grad)[np.broadcast_to(predicts_masked, grad.shape)], 0.0)


@pytest.mark.parametrize("loss_fn", [losses.cross_entropy, losses.gem])
def test_batched_loss_equals_loop_over_examples(loss_fn):
  logits, tokens, mask = _batch(4)
  fn = jax.jit(functools.partial(loss_fn, aggregation="seq_mean_token_mean"))
  batched, _ = fn(logits, tokens, mask)
  looped = np.mean([fn(logits[i : i + 1], tokens[i : i + 1], mask[i : i + 1])[0] for i in range(B)])
  np.testing.assert_allclose(batched, looped, rtol=1e-6)


@pytest.mark.parametrize("loss_fn", [losses.cross_entropy, losses.gem])
def test_bfloat16_logits_give_float32_loss_close_to_float32(loss_fn):
  logits, tokens, mask = _batch(5)
  logits_bf16 = logits.astype(jnp.bfloat16)
  loss_fn = jax.jit(loss_fn)
  loss_bf16, _ = loss_fn(logits_bf16, tokens, mask)
  loss_f32, _ = loss_fn(logits_bf16.astype(jnp.float32), tokens, mask)
  assert loss_bf16.dtype == jnp.float32
  np.testing.assert_allclose(loss_bf16, loss_f32, rtol=1e-6)


@pytest.mark.parametrize("loss_fn", [losses.cross_entropy, losses.gem])
def test_all_masked_and_extreme_logits_are_finite(loss_fn):
  logits, tokens, mask = _batch(6)
  value_and_grad = jax.jit(jax.value_and_grad(lambda z, m: loss_fn(z, tokens, m), has_aux=True))
  for lg, m in [(logits, jnp.zeros_like(mask)), (1e4 * logits, mask)]:
    (loss, metrics), grad = value_and_grad(lg, m)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert all(np.isfinite(v) for v in metrics.values())


def test_gem_defaults_are_the_paper_scripts():
  """beta 0.7 and the logsigmoid link (ALGORITHMS.md §1) in gem_token_losses, gem and chunked_gem."""
  logits, tokens, mask = _batch(10)
  z, y = logits[:, 0], tokens[:, 1]
  expected = [_numpy_gem(z_i, int(y_i), 0.7, "logsigmoid") for z_i, y_i in zip(*_np(z, y))]
  np.testing.assert_allclose(losses.gem_token_losses(z, y), expected, rtol=1e-5)
  explicit = functools.partial(losses.gem, beta=0.7, h="logsigmoid")
  np.testing.assert_allclose(losses.gem(logits, tokens, mask)[0],
                             explicit(logits, tokens, mask)[0], rtol=1e-6)
  rng = np.random.default_rng(10)
  hidden = jnp.asarray(rng.standard_normal((B, T, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((4, V)), jnp.float32)
  np.testing.assert_allclose(losses.chunked_gem(hidden, w, tokens, mask, chunk_size=2)[0],
                             explicit(hidden @ w, tokens, mask)[0], rtol=1e-5)


def test_gem_rejects_unknown_link():
  logits, tokens, mask = _batch(7)
  with pytest.raises(ValueError, match="log_sigmoid"):
    losses.gem(logits, tokens, mask, h="log_sigmoid")


@pytest.mark.parametrize("loss_fn", [losses.cross_entropy, losses.gem])
def test_global_token_count_makes_micro_batches_sum_to_the_full_batch(loss_fn):
  logits, tokens, mask = _batch(8)
  loss_fn = jax.jit(loss_fn)
  full, metrics = loss_fn(logits, tokens, mask)
  num_tokens = metrics["num_tokens"]
  split = sum(
      loss_fn(logits[i : i + 1], tokens[i : i + 1], mask[i : i + 1], num_tokens=num_tokens)[0]
      for i in range(B)
  )
  np.testing.assert_allclose(split, full, rtol=1e-6)


@pytest.mark.parametrize("aggregation", losses.AGGREGATION_MODES)
@pytest.mark.parametrize("loss_fn", [losses.cross_entropy, losses.gem])
def test_loss_weight_combines_micro_batch_losses_into_the_full_batch_loss(loss_fn, aggregation):
  """sum_i c_i L_i / sum_i c_i with c_i = metrics["loss_weight"] is the whole batch's loss
  (`tokens.aggregation_weight`). The mask covers position 0, which is not scored, and row 2 has no
  scored token, so the weights must count scored tokens / sequences only."""
  logits, tokens, mask = _batch(11)
  mask = mask.at[:, 0].set(True).at[2, 1:].set(False)
  fn = jax.jit(functools.partial(loss_fn, aggregation=aggregation))
  full, _ = fn(logits, tokens, mask)
  parts = [fn(logits[i : i + 1], tokens[i : i + 1], mask[i : i + 1]) for i in range(B)]
  weights = np.array([m[losses.LOSS_WEIGHT] for _, m in parts])
  combined = sum(c * loss for c, (loss, _) in zip(weights, parts)) / weights.sum()
  np.testing.assert_allclose(combined, full, rtol=1e-6)


@pytest.mark.parametrize("chunked_fn", [losses.chunked_cross_entropy, losses.chunked_gem])
def test_chunked_global_counts_make_micro_batches_sum_to_the_full_batch(chunked_fn):
  _, tokens, mask = _batch(12)
  rng = np.random.default_rng(12)
  hidden = jnp.asarray(rng.standard_normal((B, T, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((4, V)), jnp.float32)
  for aggregation in ("token_mean", "seq_mean_token_mean"):
    fn = jax.jit(functools.partial(chunked_fn, chunk_size=2, aggregation=aggregation))
    full, metrics = fn(hidden, w, tokens, mask)
    counts = {"num_tokens": metrics["num_tokens"], "num_sequences": B}  # every row is scored
    split = sum(fn(hidden[i : i + 1], w, tokens[i : i + 1], mask[i : i + 1], **counts)[0]
                for i in range(B))
    np.testing.assert_allclose(split, full, rtol=1e-6, err_msg=aggregation)


@pytest.mark.parametrize("full_fn,chunked_fn,kwargs", [
    (losses.cross_entropy, losses.chunked_cross_entropy, {"aggregation": "seq_mean_token_sum"}),
    (losses.gem, losses.chunked_gem, {"beta": 0.7, "h": "logsigmoid"}),
])
def test_chunked_loss_equals_loss_of_full_logits(full_fn, chunked_fn, kwargs):
  """Loss, metrics and gradients (w.r.t. hidden states and kernel) equal the full-logits loss
  of ``hidden W``; chunks of 4 do not divide the T - 1 = 5 scored positions."""
  _, tokens, mask = _batch(9)
  rng = np.random.default_rng(9)
  hidden = jnp.asarray(rng.standard_normal((B, T, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((4, V)), jnp.float32)
  full = lambda h, w: full_fn(h @ w, tokens, mask, **kwargs)
  chunked = lambda h, w: chunked_fn(h, w, tokens, mask, chunk_size=4, **kwargs)
  results = [jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(hidden, w)
             for fn in (chunked, full)]
  (loss, metrics), grads = results[0]
  (want_loss, want_metrics), want_grads = results[1]
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  assert metrics.keys() == want_metrics.keys()
  for k in metrics:
    np.testing.assert_allclose(metrics[k], want_metrics[k], rtol=1e-5, err_msg=k)
  for g, g_want in zip(grads, want_grads):
    np.testing.assert_allclose(g, g_want, rtol=1e-5, atol=1e-6)
