"""The tabular bandit helpers against brute force and their defining properties."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhfjax import losses
from rlhfjax import tabular


def _random_bandit(seed, num_actions):
  """Seeded logits, reference policy (full support) and reward, each [A]."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  logits = jax.random.normal(k1, (num_actions,))
  reference = jax.nn.softmax(jax.random.normal(k2, (num_actions,)))
  reward = jax.random.normal(k3, (num_actions,))
  return logits, reference, reward


def _fit(loss_fn, reference, preference, *, learning_rate, num_steps=1500):
  """Gradient descent on the population loss from theta = log pi_ref."""
  objective = lambda t: tabular.population_loss(loss_fn, t, reference, preference)
  return jax.jit(lambda t0: tabular.minimize(
      objective, t0, optimizer=optax.sgd(learning_rate), num_steps=num_steps))(
          jnp.log(reference))


def test_bt_preference_matrix_matches_loop():
  _, _, reward = _random_bandit(0, 5)
  temperature = 0.7
  preference = np.asarray(tabular.bt_preference_matrix(reward, temperature))
  r = np.asarray(reward, np.float64)
  for i in range(5):
    for j in range(5):
      expected = 1.0 / (1.0 + np.exp(-(r[i] - r[j]) / temperature))
      np.testing.assert_allclose(preference[i, j], expected, rtol=1e-6)
  np.testing.assert_allclose(preference + preference.T, 1.0, rtol=1e-6)


@pytest.mark.parametrize("name,loss_fn", [
    ("dpo", functools.partial(losses.dpo, beta=0.3)),
    ("ipo", functools.partial(losses.ipo, tau=0.2)),
    ("robust_dpo", functools.partial(losses.robust_dpo, beta=0.5, label_noise=0.2)),
    ("gpo_hinge", functools.partial(losses.gpo, beta=0.7, convex="hinge")),
])
def test_population_loss_equals_double_loop(name, loss_fn):
  del name
  num_actions = 4
  logits, reference, _ = _random_bandit(1, num_actions)
  k1, k2 = jax.random.split(jax.random.key(2))
  # Any P in [0, 1] (not necessarily P + P^T = 1) and any non-negative mu.
  preference = jax.random.uniform(k1, (num_actions, num_actions))
  weights = jax.random.uniform(k2, (num_actions, num_actions))
  logp = np.log(np.asarray(jax.nn.softmax(logits)))
  ref_logp = np.log(np.asarray(reference))
  expected = 0.0
  for i in range(num_actions):
    for j in range(num_actions):
      one = lambda a, b: float(loss_fn(*(jnp.array([v]) for v in (
          logp[a], logp[b], ref_logp[a], ref_logp[b])))[0])
      p = float(preference[i, j])
      expected += float(weights[i, j]) * (p * one(i, j) + (1.0 - p) * one(j, i))
  population = jax.jit(functools.partial(tabular.population_loss, loss_fn))
  np.testing.assert_allclose(population(logits, reference, preference, weights), expected,
                             rtol=1e-5)


def test_population_loss_default_weights_are_uniform_over_ordered_pairs():
  logits, reference, reward = _random_bandit(3, 3)
  preference = tabular.bt_preference_matrix(reward)
  loss_fn = functools.partial(losses.dpo, beta=0.5)
  weights = tabular.uniform_pair_weights(3)
  np.testing.assert_allclose(np.sum(weights), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(np.diag(weights), 0.0)
  np.testing.assert_allclose(
      tabular.population_loss(loss_fn, logits, reference, preference),
      tabular.population_loss(loss_fn, logits, reference, preference, weights), rtol=1e-6)


def test_pairwise_margins_are_implicit_reward_differences():
  logits, reference, _ = _random_bandit(4, 4)
  margins = np.asarray(tabular.pairwise_margins(logits, reference))
  rho = np.log(np.asarray(jax.nn.softmax(logits))) - np.log(np.asarray(reference))
  np.testing.assert_allclose(margins, rho[:, None] - rho[None, :], atol=1e-5)
  # Shifting the logits leaves the policy, hence the margins, unchanged.
  np.testing.assert_allclose(tabular.pairwise_margins(logits + 3.0, reference), margins,
                             atol=1e-5)


@pytest.mark.parametrize("beta", [0.3, 2.0])
def test_kl_regularized_optimum_maximises_the_regularised_objective(beta):
  _, reference, reward = _random_bandit(5, 5)
  optimum = tabular.kl_regularized_optimum(reward, reference, beta)
  ref, r = np.asarray(reference, np.float64), np.asarray(reward, np.float64)

  def objective(pi):
    return np.dot(pi, r) - beta * np.sum(pi * np.log(pi / ref))

  # Closed-form maximum: beta log sum_y pi_ref(y) exp(r(y) / beta).
  best = beta * np.log(np.sum(ref * np.exp(r / beta)))
  np.testing.assert_allclose(objective(np.asarray(optimum, np.float64)), best, rtol=1e-5)
  # Optimality condition: log pi* - log pi_ref - r / beta is a constant (-log Z).
  gap = np.log(np.asarray(optimum, np.float64)) - np.log(ref) - r / beta
  np.testing.assert_allclose(gap, gap[0], atol=1e-5)
  # Every other policy does worse.
  rng = np.random.default_rng(0)
  for _ in range(20):
    other = rng.dirichlet(np.ones(5))
    assert objective(other) < best


@pytest.mark.parametrize("beta,temperature", [(0.5, 1.0), (2.0, 0.5)])
def test_dpo_population_optimum_is_the_kl_regularized_optimum(beta, temperature):
  """ALGORITHMS.md section 3: all pairs + BT data give pi* ∝ pi_ref exp(r / beta)."""
  _, reference, reward = _random_bandit(6, 4)
  preference = tabular.bt_preference_matrix(reward, temperature)
  # The loss depends on theta through beta h: a step of 3 / beta^2 is GD on beta * theta.
  theta = _fit(functools.partial(losses.dpo, beta=beta), reference, preference,
               learning_rate=3.0 / beta**2)
  expected = tabular.kl_regularized_optimum(reward / temperature, reference, beta)
  np.testing.assert_allclose(jax.nn.softmax(theta), expected, atol=1e-4)
  # And sigma(beta h*) = P on every pair.
  implied = jax.nn.sigmoid(beta * tabular.pairwise_margins(theta, reference))
  np.testing.assert_allclose(implied, preference, atol=1e-4)


@pytest.mark.parametrize("consistent", [True, False])
def test_ipo_optimum_minimises_the_population_ipo_loss(consistent):
  tau = 0.4
  _, reference, reward = _random_bandit(7, 4)
  if consistent:
    preference = tabular.bt_preference_matrix(reward)
  else:  # Any P in [0, 1]: the closed form uses P_ij - P_ji.
    preference = jax.random.uniform(jax.random.key(8), (4, 4))
  theta = _fit(functools.partial(losses.ipo, tau=tau), reference, preference, learning_rate=0.5)
  np.testing.assert_allclose(jax.nn.softmax(theta), tabular.ipo_optimum(preference, reference, tau),
                             atol=1e-5)


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_ipo_optimum_keeps_a_finite_margin_on_deterministic_preferences(tau):
  reference = jnp.array([0.3, 0.7])
  preference = jnp.array([[0.5, 1.0], [0.0, 0.5]])
  optimum = tabular.ipo_optimum(preference, reference, tau)
  margin = tabular.pairwise_margins(jnp.log(optimum), reference)[0, 1]
  np.testing.assert_allclose(margin, 1.0 / (2.0 * tau), rtol=1e-5)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_robust_dpo_on_noisy_preferences_is_clean_dpo(eps):
  """Chowdhury et al.: averaged over label flips, robust DPO's loss is the clean DPO loss."""
  logits, reference, reward = _random_bandit(9, 4)
  clean = tabular.bt_preference_matrix(reward)
  noisy = tabular.noisy_preferences(clean, eps)
  np.testing.assert_allclose(noisy, (1.0 - eps) * clean + eps * (1.0 - clean), rtol=1e-6)
  beta = 0.5
  robust = tabular.population_loss(
      functools.partial(losses.robust_dpo, beta=beta, label_noise=eps), logits, reference, noisy)
  dpo = tabular.population_loss(functools.partial(losses.dpo, beta=beta), logits, reference,
                                clean)
  np.testing.assert_allclose(robust, dpo, rtol=1e-5)


@pytest.mark.parametrize("convex", tuple(losses.GPO_CONVEX_FUNCTIONS))
def test_gpo_optimal_margin_minimises_the_population_loss(convex):
  f = losses.GPO_CONVEX_FUNCTIONS[convex]
  probs = jnp.array([0.1, 0.3, 0.7, 0.9])

  def argmin(p):
    return tabular.minimize_scalar(lambda z: p * f(z) + (1.0 - p) * f(-z), -20.0, 20.0)

  np.testing.assert_allclose(jax.jit(jax.vmap(argmin))(probs),
                             tabular.gpo_optimal_margin(convex, probs), atol=1e-4)


def test_minimize_scalar_handles_kinks_and_flat_derivatives():
  kink = tabular.minimize_scalar(lambda x: jnp.abs(x - 0.3) + 0.1 * jnp.abs(x), -5.0, 5.0)
  np.testing.assert_allclose(kink, 0.3, atol=1e-6)
  # Far in the tail the derivative of exp(-x) + x is tiny but has the right sign.
  smooth = tabular.minimize_scalar(lambda x: jnp.exp(-x) + 0.01 * x, -10.0, 30.0)
  np.testing.assert_allclose(smooth, np.log(100.0), atol=1e-4)


@pytest.mark.parametrize("optimizer", [optax.sgd(0.1), optax.sgd(0.2, momentum=0.5)])
def test_minimize_reaches_the_minimum_of_a_quadratic(optimizer):
  target = jnp.array([1.0, -2.0, 0.5])
  objective = lambda x: jnp.sum(jnp.square(x - target))
  theta = jax.jit(lambda n: tabular.minimize(objective, jnp.zeros(3), optimizer=optimizer,
                                             num_steps=n))(200)
  np.testing.assert_allclose(theta, target, atol=1e-5)


@pytest.mark.parametrize("regularizer", ["kl", "pm", "conditional_pm"])
def test_expected_policy_gradient_loss_is_the_exact_regularised_policy_gradient(regularizer):
  """The surrogate's gradient is -grad [E_pi r - beta E_pi penalty], the penalty being
  KL(pi || ref) (kl), sum pi log pi (pm) or, for conditional_pm, log pi minus log pi_ref on the
  actions whose reference probability is at most alpha; it vanishes at the closed-form optima."""
  logits, reference, reward = _random_bandit(10, 5)
  beta = 0.7
  ref = np.sort(np.asarray(reference))
  alpha = float(0.5 * (ref[1] + ref[2]))  # two actions on the KL side, three on the PM side
  anchored = (reference <= alpha).astype(jnp.float32)

  def objective(theta):
    pi, logp = jax.nn.softmax(theta), jax.nn.log_softmax(theta)
    log_ref = jnp.log(reference)
    penalty = {"kl": logp - log_ref, "pm": logp, "conditional_pm": logp - anchored * log_ref}
    return pi @ reward - beta * pi @ penalty[regularizer]

  loss = functools.partial(tabular.expected_policy_gradient_loss, reward_A=reward,
                           reference_policy_A=reference, beta=beta, regularizer=regularizer,
                           alpha=alpha)
  grad = jax.jit(jax.grad(loss))
  np.testing.assert_allclose(grad(logits), -jax.grad(objective)(logits), atol=1e-6)
  optimum = {"kl": jnp.log(tabular.kl_regularized_optimum(reward, reference, beta)),
             "pm": reward / beta,
             "conditional_pm": reward / beta + anchored * jnp.log(reference)}[regularizer]
  np.testing.assert_allclose(grad(optimum), 0.0, atol=1e-6)


def test_bad_inputs_raise_value_errors():
  reward, reference = jnp.zeros(3), jnp.full((3,), 1.0 / 3.0)
  with pytest.raises(ValueError, match="beta"):
    tabular.kl_regularized_optimum(reward, reference, 0.0)
  with pytest.raises(ValueError, match="reference_policy_A"):
    tabular.kl_regularized_optimum(reward, jnp.ones(2) / 2, 1.0)
  with pytest.raises(ValueError, match="temperature"):
    tabular.bt_preference_matrix(reward, -1.0)
  with pytest.raises(ValueError, match="flip_rate"):
    tabular.noisy_preferences(jnp.eye(3), 0.5)
  with pytest.raises(ValueError, match="num_actions"):
    tabular.uniform_pair_weights(1)
  with pytest.raises(ValueError, match="preference_AxA"):
    tabular.population_loss(losses.dpo, reward, reference, jnp.eye(2))
  with pytest.raises(ValueError, match="logits_A"):
    tabular.population_loss(losses.dpo, jnp.zeros((3, 1)), reference, jnp.eye(3))
  with pytest.raises(ValueError, match="tau"):
    tabular.ipo_optimum(jnp.eye(3), reference, 0.0)
  with pytest.raises(ValueError, match="unknown GPO convex"):
    tabular.gpo_optimal_margin("cubic", 0.7)
  with pytest.raises(ValueError, match="lower < upper"):
    tabular.minimize_scalar(jnp.square, 1.0, 1.0)
