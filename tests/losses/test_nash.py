"""Preference-game losses: gradient formulas and their tabular (bandit) fixed points."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhfjax import losses
from rlhfjax import tabular


def _random_game(seed, num_actions):
  """A seeded game P = 1/2 + S (S skew-symmetric) and a full-support reference mu (numpy draws:
  a jax.random draw of each new shape would cost a compilation)."""
  rng = np.random.default_rng(seed)
  upper = np.triu(rng.uniform(-0.5, 0.5, (num_actions, num_actions)), 1)
  reference = np.exp(rng.standard_normal(num_actions))
  return (jnp.asarray(0.5 + upper - upper.T, jnp.float32),
          jnp.asarray(reference / reference.sum(), jnp.float32))


def _arrays(seed, batch=6, scale=3.0):
  """Four seeded log-prob vectors [B] and preference probabilities [B]."""
  rng = np.random.default_rng(seed)
  lp = [jnp.asarray(scale * rng.standard_normal(batch) - 5.0, jnp.float32) for _ in range(4)]
  return lp, jnp.asarray(rng.uniform(size=batch), jnp.float32)


def _pairs(num_actions):
  """Every ordered pair (y, y') as two flat index vectors of length A^2."""
  first = jnp.repeat(jnp.arange(num_actions), num_actions)
  second = jnp.tile(jnp.arange(num_actions), num_actions)
  return first, second


# -- Nash-MD-PG ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [None, 0.1, 1.0])
def test_nash_md_pg_gradient_equals_the_formula(tau):
  # tau None: the default, the paper's 0.008.
  kw = {} if tau is None else dict(tau=tau)
  tau = tau or 0.008
  (lp, lp_ref, _, _), p = _arrays(0)
  grad_lp, grad_ref, grad_p = jax.jit(jax.grad(
      lambda a, b, c: jnp.sum(losses.nash_md_pg(a, b, c, **kw)), argnums=(0, 1, 2)))(
          lp, lp_ref, p)
  # d/d lp(y) of -lp(y) sg[P(y > y') - 1/2 - tau rho(y)] is -(P - 1/2 - tau rho); nothing flows
  # into the reference or the preference (all inside the stop-gradient).
  np.testing.assert_allclose(grad_lp, -(p - 0.5 - tau * (lp - lp_ref)), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(grad_ref, 0.0)
  np.testing.assert_array_equal(grad_p, 0.0)


@pytest.mark.parametrize("seed,tau,mix", [(0, 0.1, 0.25), (1, 1.0, 0.125)])
def test_nash_md_pg_expected_gradient_is_the_nash_md_objective_gradient(seed, tau, mix):
  # On a bandit: y ~ pi (not differentiated), y' ~ the mixture pi^(1-b) mu^b (held fixed). The
  # expected gradient of the surrogate equals -grad [P(pi > pi') - tau KL(pi || mu)] exactly.
  preference, reference = _random_game(seed, 4)
  theta = jnp.asarray(np.random.default_rng(seed + 7).standard_normal(4), jnp.float32)
  opponent = jax.nn.softmax((1 - mix) * jax.nn.log_softmax(theta) + mix * jnp.log(reference))
  first, second = _pairs(4)

  def expected_surrogate(t):
    logp = jax.nn.log_softmax(t)
    weights = jax.lax.stop_gradient(jnp.exp(logp))[first] * opponent[second]
    per_pair = losses.nash_md_pg(logp[first], jnp.log(reference)[first],
                                 preference[first, second], tau=tau)
    return jnp.sum(weights * per_pair)

  def objective(t):
    pi = jax.nn.softmax(t)
    return pi @ preference @ opponent - tau * jnp.sum(pi * (jnp.log(pi) - jnp.log(reference)))

  np.testing.assert_allclose(jax.jit(jax.grad(expected_surrogate))(theta),
                             -jax.jit(jax.grad(objective))(theta), atol=1e-6)


# -- online IPO / IPO-MD ---------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [None, 0.1, 2.0])
def test_online_ipo_is_a_regression_onto_the_centred_preference(tau):
  # tau None: the default, the paper's 1.0.
  kw = {} if tau is None else dict(tau=tau)
  tau = tau or 1.0
  (lp1, lp2, ref1, ref2), p = _arrays(1)
  h = (lp1 - ref1) - (lp2 - ref2)
  loss = losses.online_ipo(lp1, lp2, ref1, ref2, p, **kw)
  # p (h - c)^2 + (1 - p)(h + c)^2 = (h - (2p - 1) c)^2 + c^2 (1 - (2p - 1)^2), c = 1/(2 tau).
  c = 1.0 / (2.0 * tau)
  expected = (h - (2 * p - 1) * c) ** 2 + c**2 * (1 - (2 * p - 1) ** 2)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  # Symmetric in the pair: swapping the responses and p -> 1 - p changes nothing.
  np.testing.assert_allclose(losses.online_ipo(lp2, lp1, ref2, ref1, 1 - p, tau=tau), loss,
                             rtol=1e-6)


@pytest.mark.parametrize("seed,tau", [(0, 0.3), (2, 1.0)])
def test_online_ipo_stationary_point_is_the_nash_policy(seed, tau):
  # Both responses from sg(pi), labelled with P: the population gradient vanishes exactly at the
  # regularised Nash policy (Calandriello et al., arXiv 2403.08635), and not at the reference.
  preference, reference = _random_game(seed, 5)
  first, second = _pairs(5)
  log_mu = jnp.log(reference)

  def population_loss(t):
    logp = jax.nn.log_softmax(t)
    pi = jax.lax.stop_gradient(jnp.exp(logp))
    per_pair = losses.online_ipo(logp[first], logp[second], log_mu[first], log_mu[second],
                                 preference[first, second], tau=tau)
    return jnp.sum(pi[first] * pi[second] * per_pair)

  nash = tabular.nash_equilibrium(preference, reference, tau)
  grad_at = jax.jit(jax.grad(population_loss))
  assert float(jnp.max(jnp.abs(grad_at(jnp.log(nash))))) < 1e-5
  assert float(jnp.max(jnp.abs(grad_at(log_mu)))) > 1e-2


# -- INPO ------------------------------------------------------------------------------------------


def test_inpo_with_tau_equal_eta_is_ipo_against_the_reference():
  (lp_w, lp_l, ref_w, ref_l), _ = _arrays(2)
  prev_w, prev_l = lp_w + 1.0, lp_l - 2.0  # ignored when tau = eta
  np.testing.assert_allclose(
      losses.inpo(lp_w, lp_l, ref_w, ref_l, prev_w, prev_l, tau=0.2, eta=0.2),
      losses.ipo(lp_w, lp_l, ref_w, ref_l, tau=0.2), rtol=1e-6)


def _inpo_population_loss(theta, previous, reference, preference, tau, eta):
  """Expected INPO loss over pairs from pi_t, winner drawn from P (both orders present)."""
  first, second = _pairs(len(reference))
  logp, log_prev, log_mu = jax.nn.log_softmax(theta), jnp.log(previous), jnp.log(reference)
  per_pair = losses.inpo(logp[first], logp[second], log_mu[first], log_mu[second],
                         log_prev[first], log_prev[second], tau=tau, eta=eta)
  return jnp.sum(previous[first] * previous[second] * preference[first, second] * per_pair)


@pytest.mark.parametrize("tau,eta", [(0.1, 0.5), (0.5, 1.0)])
def test_inpo_minimiser_is_the_mirror_descent_step(tau, eta):
  # Minimiser over pi of the population loss with pairs from pi_t: the OMD step
  # pi_{t+1} ∝ pi_t^(1 - tau/eta) mu^(tau/eta) exp(P(y > pi_t) / eta).
  preference, reference = _random_game(3, 4)
  previous = jax.nn.softmax(jnp.array([0.4, -0.3, 1.0, -1.2]))
  expected = jax.nn.softmax((1 - tau / eta) * jnp.log(previous) + tau / eta * jnp.log(reference)
                            + preference @ previous / eta)
  objective = functools.partial(_inpo_population_loss, previous=previous, reference=reference,
                                preference=preference, tau=tau, eta=eta)
  theta = jax.jit(lambda t: tabular.minimize(objective, t, optimizer=optax.lbfgs(),
                                             num_steps=100))(jnp.log(previous))
  np.testing.assert_allclose(jax.nn.softmax(theta), expected, atol=1e-5)


def test_inpo_fixed_point_is_the_nash_policy():
  # pi_t = pi* is a stationary point of the next INPO step: the population gradient vanishes.
  preference, reference = _random_game(4, 5)
  tau, eta = 0.2, 0.5
  nash = tabular.nash_equilibrium(preference, reference, tau)
  grad = jax.jit(jax.grad(_inpo_population_loss), static_argnums=(4, 5))(
      jnp.log(nash), nash, reference, preference, tau, eta)
  assert float(jnp.max(jnp.abs(grad))) < 1e-5


# -- shared properties -----------------------------------------------------------------------------


_LOSSES = {
    "nash_md_pg": lambda lp, p: losses.nash_md_pg(lp[0], lp[1], p, tau=0.1),
    "online_ipo": lambda lp, p: losses.online_ipo(*lp, p, tau=0.5),
    "inpo": lambda lp, p: losses.inpo(lp[0], lp[1], lp[2], lp[3], lp[0] - 1.0, lp[1] + 0.5,
                                      tau=0.1, eta=0.5),
}


@pytest.mark.parametrize("name", sorted(_LOSSES))
def test_batched_loss_equals_a_loop_over_examples_and_is_finite(name):
  fn = jax.jit(_LOSSES[name])
  lp, p = _arrays(5)
  batched = fn(lp, p)
  assert batched.shape == (6,)
  for b in range(6):
    single = fn([x[b:b + 1] for x in lp], p[b:b + 1])
    np.testing.assert_allclose(single, batched[b:b + 1], rtol=1e-6)
  huge = [jnp.full((2,), v) for v in (1e4, -1e4, -1e4, 1e4)]
  values, grads = jax.value_and_grad(lambda x: jnp.sum(fn(x, jnp.array([0.3, 1.0]))))(huge)
  assert np.isfinite(float(values)) and all(np.all(np.isfinite(g)) for g in grads)


def test_inpo_rejects_tau_above_eta():
  (lp_w, lp_l, ref_w, ref_l), _ = _arrays(6)
  with pytest.raises(ValueError, match="tau <= eta"):
    losses.inpo(lp_w, lp_l, ref_w, ref_l, lp_w, lp_l, tau=1.0, eta=0.5)
  with pytest.raises(ValueError, match="eta"):
    losses.inpo(lp_w, lp_l, ref_w, ref_l, lp_w, lp_l, tau=0.0, eta=0.0)


def test_inpo_defaults_weight_the_previous_iterate():
  """The loss's defaults are the trainer's (tau 0.05, eta 0.1): the geometric reference mixes mu
  and the previous iterate half and half (tau = eta would drop the previous iterate)."""
  from rlhfjax.train.online_preference import LOSS_DEFAULTS  # pylint: disable=g-import-not-at-top
  lp = [jnp.asarray([-3.0, -1.0]), jnp.asarray([-2.0, -4.0])]
  ref, prev = [jnp.asarray([-2.5, -2.0]), jnp.asarray([-1.0, -3.0])], [jnp.zeros(2), jnp.ones(2)]
  got = losses.inpo(*lp, *ref, *prev)
  want = losses.inpo(*lp, *ref, *prev, **LOSS_DEFAULTS["inpo"])
  np.testing.assert_allclose(got, want)
  mixed = [0.5 * r + 0.5 * q for r, q in zip(ref, prev)]
  np.testing.assert_allclose(got, losses.ipo(*lp, *mixed, tau=0.1), rtol=1e-6)
