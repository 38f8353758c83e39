"""Tests for rlhfjax.losses.reward: Bradley-Terry, Plackett-Luce, preference models, ensembles."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfjax import losses


def _rewards(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _softplus(x):
  return np.logaddexp(0.0, x)


def test_bradley_terry_against_formula():
  r_w, r_l, margin = _rewards(0, 5), _rewards(1, 5), _rewards(2, 5)
  got = jax.jit(losses.bradley_terry)(r_w, r_l, margin=margin, center_coef=0.01)
  r_w, r_l, margin = (np.asarray(x, np.float64) for x in (r_w, r_l, margin))
  expected = _softplus(-(r_w - r_l - margin)) + 0.01 * (r_w + r_l) ** 2
  np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("p", [0.1, 0.6, 0.95])
def test_bradley_terry_population_optimum_is_logit_p(p):
  # E[loss] = p BT(Delta) + (1 - p) BT(-Delta) is convex with its minimum at Delta* = logit(p).
  def population(delta):
    return p * losses.bradley_terry(delta, 0.0) + (1 - p) * losses.bradley_terry(0.0, delta)

  delta_star = np.log(p / (1 - p))
  np.testing.assert_allclose(jax.grad(population)(delta_star), 0.0, atol=1e-6)
  assert population(delta_star) < min(population(delta_star - 0.1), population(delta_star + 0.1))


def test_soft_bradley_terry_optimum_is_logit_of_label():
  label = 0.8
  grad = jax.grad(lambda d: losses.soft_bradley_terry(d, 0.0, label))(np.log(0.8 / 0.2))
  np.testing.assert_allclose(grad, 0.0, atol=1e-6)
  r_w, r_l = _rewards(3, 4), _rewards(4, 4)
  np.testing.assert_allclose(
      losses.soft_bradley_terry(r_w, r_l, jnp.ones(4)), losses.bradley_terry(r_w, r_l), rtol=1e-6
  )


def test_rewards_are_shift_invariant_without_centering():
  r_w, r_l, shift = _rewards(5, 4), _rewards(6, 4), 3.7
  np.testing.assert_allclose(
      losses.bradley_terry(r_w + shift, r_l + shift), losses.bradley_terry(r_w, r_l), rtol=1e-5
  )
  rewards = _rewards(7, (2, 4))
  np.testing.assert_allclose(
      losses.plackett_luce(rewards + shift), losses.plackett_luce(rewards), rtol=1e-5
  )
  # The centering term breaks the invariance and pins the offset at r_w + r_l = 0.
  r_w0 = r_w - 0.5 * (r_w + r_l)
  r_l0 = r_l - 0.5 * (r_w + r_l)
  offset_grad = jax.jit(
      jax.grad(lambda c: losses.bradley_terry(r_w0 + c, r_l0 + c, center_coef=0.01).sum())
  )
  np.testing.assert_allclose(offset_grad(0.0), 0.0, atol=1e-6)
  assert offset_grad(1.0) > 0


def _numpy_plackett_luce(rewards):
  rewards = np.asarray(rewards, np.float64)
  return -sum(rewards[k] - np.log(np.exp(rewards[k:]).sum()) for k in range(len(rewards)))


def test_plackett_luce_matches_brute_force_and_k2_equals_bradley_terry():
  rewards = _rewards(8, (3, 4))
  got = jax.jit(losses.plackett_luce)(rewards)
  np.testing.assert_allclose(got, [_numpy_plackett_luce(r) for r in np.asarray(rewards)], rtol=1e-5)
  pairs = _rewards(9, (5, 2))
  np.testing.assert_allclose(
      jax.jit(losses.plackett_luce)(pairs), losses.bradley_terry(pairs[:, 0], pairs[:, 1]),
      rtol=1e-6,
  )


def test_plackett_luce_is_a_distribution_over_rankings():
  # sum over all K! orderings of P(ordering) = 1 (exact oracle for the normalisation).
  rewards = np.asarray(_rewards(10, 4))
  orders = np.array(list(itertools.permutations(range(4))))
  probs = jnp.exp(-jax.jit(losses.plackett_luce)(jnp.asarray(rewards[orders])))
  np.testing.assert_allclose(jnp.sum(probs), 1.0, rtol=1e-5)


def test_plackett_luce_mask_equals_loss_on_valid_items_only():
  rewards = _rewards(11, (2, 5))
  mask = jnp.array([[1, 0, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=bool)
  plackett_luce = jax.jit(losses.plackett_luce)
  got = plackett_luce(rewards, mask)
  expected = [_numpy_plackett_luce(r[m]) for r, m in zip(np.asarray(rewards), np.asarray(mask))]
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  grad = jax.jit(jax.grad(lambda r: plackett_luce(r, mask).sum()))(rewards)
  assert np.all(np.asarray(grad)[~np.asarray(mask)] == 0.0)
  # Garbage in masked slots changes nothing.
  garbage = jnp.where(mask, rewards, 1e30)
  np.testing.assert_allclose(plackett_luce(garbage, mask), got, rtol=1e-6)


def test_plackett_luce_rejects_mismatched_mask():
  with pytest.raises(ValueError, match="mask"):
    losses.plackett_luce(jnp.zeros((2, 3)), jnp.ones((2, 4)))


def test_preference_model_antisymmetric_by_construction():
  s_ab, s_ba, labels = _rewards(12, 6), _rewards(13, 6), jnp.asarray([1.0, 0.0, 0.3, 1, 0, 1])
  forward = losses.preference_model_loss(s_ab, labels, logits_ba=s_ba)
  backward = losses.preference_model_loss(s_ba, 1.0 - labels, logits_ba=s_ab)
  np.testing.assert_allclose(forward, backward, rtol=1e-6)
  p_ab = jax.nn.sigmoid(losses.antisymmetrize(s_ab, s_ba))
  p_ba = jax.nn.sigmoid(losses.antisymmetrize(s_ba, s_ab))
  np.testing.assert_allclose(p_ab + p_ba, 1.0, rtol=1e-6)
  s, l = np.asarray(0.5 * (s_ab - s_ba), np.float64), np.asarray(labels, np.float64)
  np.testing.assert_allclose(forward, l * _softplus(-s) + (1 - l) * _softplus(s), rtol=1e-5)


def test_preference_model_plain_and_augmented_forms():
  s_ab, s_ba, labels = _rewards(14, 4), _rewards(15, 4), jnp.asarray([1.0, 0.0, 1.0, 0.25])
  plain = losses.preference_model_loss(s_ab, labels)
  s, l = np.asarray(s_ab, np.float64), np.asarray(labels, np.float64)
  np.testing.assert_allclose(plain, l * _softplus(-s) + (1 - l) * _softplus(s), rtol=1e-5)
  augmented = losses.preference_model_loss(s_ab, labels, logits_ba=s_ba, antisymmetric=False)
  expected = 0.5 * (plain + losses.preference_model_loss(s_ba, 1.0 - labels))
  np.testing.assert_allclose(augmented, expected, rtol=1e-6)


def test_ensemble_modes():
  rewards = _rewards(16, (4, 6))
  mean = losses.ensemble_reward(rewards, "mean")
  worst = losses.ensemble_reward(rewards, "worst_case")
  uwo = losses.ensemble_reward(rewards, "uncertainty_weighted", lam=0.5)
  r = np.asarray(rewards, np.float64)
  np.testing.assert_allclose(mean, r.mean(0), rtol=1e-6)
  np.testing.assert_allclose(worst, r.min(0), rtol=1e-6)
  np.testing.assert_allclose(uwo, r.mean(0) - 0.5 * r.var(0, ddof=0), rtol=1e-5, atol=1e-6)
  # Default lambda = 1 (ALGORITHMS.md §2).
  np.testing.assert_allclose(
      losses.ensemble_reward(rewards, "uncertainty_weighted"), r.mean(0) - r.var(0, ddof=0),
      rtol=1e-5, atol=1e-6,
  )
  assert np.all(worst <= mean)
  identical = jnp.tile(rewards[:1], (4, 1))
  np.testing.assert_allclose(
      losses.ensemble_reward(identical, "uncertainty_weighted"),
      losses.ensemble_reward(identical, "mean"),
      rtol=1e-6,
  )
  with pytest.raises(ValueError, match="median"):
    losses.ensemble_reward(rewards, "median")


def test_log_sigmoid_transform():
  rewards, reference = _rewards(17, 5), _rewards(18, 5)
  u = losses.log_sigmoid_transform(rewards, reference)
  d = np.asarray(rewards - reference, np.float64)
  np.testing.assert_allclose(u, -_softplus(-d), rtol=1e-5)
  extreme = losses.log_sigmoid_transform(jnp.array([1e4, -1e4]), 0.0)
  np.testing.assert_allclose(extreme, [0.0, -1e4], rtol=1e-6)


def test_smooth_labels_update_and_fixed_point():
  labels, margins = jnp.ones(4), _rewards(19, 4)
  updated = losses.smooth_labels(labels, margins, rate=0.2)
  np.testing.assert_allclose(updated, 0.8 + 0.2 * jax.nn.sigmoid(margins), rtol=1e-6)
  np.testing.assert_allclose(losses.smooth_labels(labels, margins, rate=0.0), labels)
  fixed = jax.nn.sigmoid(margins)
  np.testing.assert_allclose(losses.smooth_labels(fixed, margins, rate=0.3), fixed, rtol=1e-6)
  # No gradient flows into the margins through the label update.
  grad = jax.grad(lambda m: losses.smooth_labels(labels, m, rate=0.5).sum())(margins)
  np.testing.assert_array_equal(grad, np.zeros(4))


PAIRWISE_LOSSES = {
    "bradley_terry": lambda a, b: losses.bradley_terry(a, b, margin=0.5, center_coef=0.0),
    "soft_bradley_terry": lambda a, b: losses.soft_bradley_terry(a, b, 0.7 * jnp.ones_like(a)),
    "preference_model": lambda a, b: losses.preference_model_loss(a, jnp.ones_like(a), logits_ba=b),
    "plackett_luce": lambda a, b: losses.plackett_luce(jnp.stack([a, b, 0.5 * b], axis=1)),
}


@pytest.mark.parametrize("name", sorted(PAIRWISE_LOSSES))
def test_batched_equals_loop_and_finite_at_extremes(name):
  fn = jax.jit(PAIRWISE_LOSSES[name])
  a, b = _rewards(20, 4), _rewards(21, 4)
  batched = fn(a, b)
  looped = [fn(a[i : i + 1], b[i : i + 1])[0] for i in range(4)]
  np.testing.assert_allclose(batched, looped, rtol=1e-6)
  extremes = jnp.array([1e4, -1e4, 1e4, -1e4])
  for a_x, b_x in [(extremes, -extremes), (extremes, extremes)]:
    value, grad = jax.value_and_grad(lambda x, y: fn(x, y).sum(), argnums=(0, 1))(a_x, b_x)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grad)
