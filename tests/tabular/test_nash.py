"""Tabular preference games: the regularised Nash policy, Nash-MD and its convergence bound."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhfjax import tabular


def _random_game(seed, num_actions):
  """A seeded game P = 1/2 + S (S skew-symmetric, entries in (-1/2, 1/2)) and a reference mu.

  numpy draws: each new shape of a jax.random draw would cost a compilation.
  """
  rng = np.random.default_rng(seed)
  upper = np.triu(rng.uniform(-0.5, 0.5, (num_actions, num_actions)), 1)
  reference = np.exp(rng.standard_normal(num_actions))
  return (jnp.asarray(0.5 + upper - upper.T, jnp.float32),
          jnp.asarray(reference / reference.sum(), jnp.float32))


def _rock_paper_scissors(margin=0.4):
  """Action i beats action i + 1 (mod 3) with probability 1/2 + margin."""
  skew = margin * np.array([[0, 1, -1], [-1, 0, 1], [1, -1, 0]], np.float32)
  return jnp.asarray(0.5 + skew)


def _kl(p, q):
  """KL(p || q) over the last axis (q may be a stack of policies), in float64."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def _fixed_point_residual(preference, reference, tau, policy):
  """max_y |pi(y) - softmax(log mu + P pi / tau)(y)|, in float64."""
  p, mu, pi = (np.asarray(x, np.float64) for x in (preference, reference, policy))
  z = np.log(mu) + p @ pi / tau
  target = np.exp(z - z.max())
  return float(np.max(np.abs(pi - target / target.sum())))


@pytest.mark.parametrize("tau", [0.25, 0.5, 1.0, 2.0])
def test_two_action_nash_is_sigmoid_of_0_2_over_tau(tau):
  # ALGORITHMS.md section 5: P(1 > 2) = 0.7, uniform mu. P(1 > pi) - P(2 > pi) = 0.7 - 0.5 = 0.2
  # whatever pi, so pi*_1 = sigma(0.2 / tau).
  preference = jnp.array([[0.5, 0.7], [0.3, 0.5]])
  reference = jnp.array([0.5, 0.5])
  nash = tabular.nash_equilibrium(preference, reference, tau)
  np.testing.assert_allclose(nash[0], jax.nn.sigmoid(0.2 / tau), atol=1e-6)
  # RLHF / DPO with the Bradley-Terry reward r_1 - r_2 = logit(0.7) gives sigma(logit(0.7) / tau).
  rlhf = tabular.kl_regularized_optimum(jnp.array([jax.scipy.special.logit(0.7), 0.0]),
                                        reference, tau)
  np.testing.assert_allclose(rlhf[0], jax.nn.sigmoid(jax.scipy.special.logit(0.7) / tau),
                             atol=1e-6)
  assert abs(float(nash[0] - rlhf[0])) > 0.05


def test_two_action_nash_at_tau_1_is_0_550():
  nash = tabular.nash_equilibrium(jnp.array([[0.5, 0.7], [0.3, 0.5]]), jnp.array([0.5, 0.5]), 1.0)
  assert float(nash[0]) == pytest.approx(0.550, abs=5e-4)  # sigma(0.2) = 0.5498.


@pytest.mark.parametrize("tau", [0.05, 0.3, 1.0])
def test_rock_paper_scissors_gives_uniform(tau):
  uniform = jnp.full((3,), 1.0 / 3.0)
  nash = tabular.nash_equilibrium(_rock_paper_scissors(), uniform, tau)
  np.testing.assert_allclose(nash, uniform, atol=1e-6)
  # Independently of the solver (which starts at the reference): Nash-MD from a skewed policy
  # converges to uniform, and the fixed-point equation holds at uniform only.
  num_steps = 3000
  iterates = tabular.nash_md_iterates(
      _rock_paper_scissors(), uniform, tau, tabular.nash_md_learning_rates(tau, num_steps),
      num_steps, initial_policy_A=jnp.array([0.8, 0.15, 0.05]))
  np.testing.assert_allclose(iterates[-1], uniform, atol=2e-3)
  assert _fixed_point_residual(_rock_paper_scissors(), uniform, tau, uniform) < 1e-6
  assert _fixed_point_residual(_rock_paper_scissors(), uniform, tau,
                               jnp.array([0.5, 0.3, 0.2])) > 1e-2


@pytest.mark.parametrize("seed,num_actions", [(0, 3), (1, 5), (2, 5), (3, 8)])
@pytest.mark.parametrize("tau", [0.1, 0.5, 3.0])
def test_nash_equilibrium_satisfies_its_fixed_point_equation(seed, num_actions, tau):
  preference, reference = _random_game(seed, num_actions)
  nash = jax.jit(tabular.nash_equilibrium)(preference, reference, tau)
  assert _fixed_point_residual(preference, reference, tau, nash) < 1e-6
  np.testing.assert_allclose(jnp.sum(nash), 1.0, atol=1e-6)


def test_nash_is_the_best_response_to_itself_in_the_regularised_game():
  # pi* maximises P(pi > pi*) - tau KL(pi || mu): gradient ascent on that concave objective from
  # mu lands on pi*.
  preference, reference = _random_game(3, 5)
  tau = 0.5
  nash = tabular.nash_equilibrium(preference, reference, tau)

  def negative_objective(theta):
    pi = jax.nn.softmax(theta)
    return -(pi @ preference @ nash - tau * jnp.sum(pi * (jnp.log(pi) - jnp.log(reference))))

  theta = tabular.minimize(negative_objective, jnp.log(reference), optimizer=optax.sgd(2.0),
                           num_steps=3000)
  np.testing.assert_allclose(jax.nn.softmax(theta), nash, atol=1e-5)


def test_nash_md_one_step_matches_brute_force():
  preference, reference = _random_game(4, 4)
  tau, eta = 0.5, 0.3
  start = jax.nn.softmax(jnp.array([0.3, -1.0, 0.5, 0.0]))
  iterates = tabular.nash_md_iterates(preference, reference, tau, eta, 1, initial_policy_A=start)
  p, mu, pi = (np.asarray(x, np.float64) for x in (preference, reference, start))
  mixture = pi ** (1 - eta * tau) * mu ** (eta * tau)
  mixture /= mixture.sum()
  next_pi = np.array([mixture[y] * np.exp(eta * sum(p[y, j] * mixture[j] for j in range(4)))
                      for y in range(4)])
  np.testing.assert_allclose(iterates[0], start, atol=1e-6)
  np.testing.assert_allclose(iterates[1], next_pi / next_pi.sum(), atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau,eta", [(0.1, 1.0), (0.5, 0.5), (0.5, 2.0), (1.0, 0.2)])
def test_nash_md_satisfies_the_papers_one_step_bound(seed, tau, eta):
  # Munos et al., arXiv 2312.00886 (the Nash-MD convergence theorem):
  # KL(pi*, pi_{t+1}) <= (1 - eta tau) KL(pi*, pi_t) + 2 eta^2.
  # Unrolled with constant eta: KL_T <= (1 - eta tau)^T KL_0 + 2 eta / tau.
  preference, reference = _random_game(seed, 5)
  start = jax.nn.softmax(3.0 * np.random.default_rng(seed + 10).standard_normal(5))
  nash = tabular.nash_equilibrium(preference, reference, tau)
  iterates = tabular.nash_md_iterates(preference, reference, tau, eta, 150,
                                      initial_policy_A=start)
  kls = _kl(nash, iterates)
  slack = 1e-6  # float32 round-off in the iterates
  assert np.all(kls[1:] <= (1 - eta * tau) * kls[:-1] + 2 * eta**2 + slack)
  steps = np.arange(len(kls))
  assert np.all(kls <= (1 - eta * tau) ** steps * kls[0] + 2 * eta / tau + slack)


@pytest.mark.parametrize("seed,tau", [(0, 0.3), (1, 1.0)])
def test_nash_md_with_decreasing_rates_converges_to_the_nash_policy(seed, tau):
  preference, reference = _random_game(seed, 5)
  num_steps = 2000
  nash = tabular.nash_equilibrium(preference, reference, tau)
  iterates = tabular.nash_md_iterates(preference, reference, tau,
                                      tabular.nash_md_learning_rates(tau, num_steps), num_steps)
  kls = _kl(nash, iterates[1:])
  # eta_t = 2 / (tau (t + 2)) in the one-step bound gives KL_T <= 8 / (tau^2 (T + 1)).
  bound = 8.0 / (tau**2 * (np.arange(1, num_steps + 1) + 1))
  assert np.all(kls <= bound + 1e-6)
  # The last iterate is the fixed point (observed: far inside the bound).
  np.testing.assert_allclose(iterates[-1], nash, atol=1e-4)
  assert kls[-1] < 1e-6


def test_nash_md_learning_rates_first_step_forgets_the_initial_policy():
  # eta_t = 2 / (tau (t + 2)): eta_0 tau = 1, so the first mixture is mu whatever pi_0 is.
  tau, num_steps = 0.4, 6
  rates = tabular.nash_md_learning_rates(tau, num_steps)
  np.testing.assert_allclose(rates, [2.0 / (tau * (t + 2)) for t in range(num_steps)], rtol=1e-6)
  preference, reference = _random_game(6, 4)
  runs = [tabular.nash_md_iterates(preference, reference, tau, rates, num_steps,
                                   initial_policy_A=start)
          for start in (jnp.array([0.7, 0.1, 0.1, 0.1]), jnp.array([0.1, 0.2, 0.3, 0.4]))]
  assert np.abs(np.asarray(runs[0][0] - runs[1][0])).max() > 0.5
  np.testing.assert_allclose(runs[0][1:], runs[1][1:], atol=1e-6)


def test_nash_md_constant_rate_stops_near_but_not_at_nash():
  # With a constant eta the limit is the fixed point of the mixture recursion, which differs from
  # pi* by O(eta): a reason for the decreasing rates above.
  preference, reference = _random_game(5, 5)
  tau, eta = 0.5, 1.0
  nash = tabular.nash_equilibrium(preference, reference, tau)
  iterates = tabular.nash_md_iterates(preference, reference, tau, eta, 400)
  np.testing.assert_allclose(iterates[-1], iterates[-2], atol=1e-6)  # converged
  assert 1e-7 < _kl(nash, iterates[-1]) < 2 * eta / tau


def test_preference_matching_optimum_maximises_reward_plus_entropy():
  reward = jnp.array([0.5, -1.0, 2.0, 0.0])
  optimum = tabular.preference_matching_optimum(reward)
  np.testing.assert_allclose(optimum, jax.nn.softmax(reward), atol=1e-7)
  objective = lambda t: -(jax.nn.softmax(t) @ reward
                          - jnp.sum(jax.nn.softmax(t) * jax.nn.log_softmax(t)))
  theta = tabular.minimize(objective, jnp.zeros(4), optimizer=optax.sgd(1.0), num_steps=2000)
  np.testing.assert_allclose(jax.nn.softmax(theta), optimum, atol=1e-5)


def test_win_rates_is_the_matrix_vector_product():
  preference = _rock_paper_scissors(0.3)
  pi = jnp.array([0.5, 0.3, 0.2])
  expected = [sum(float(preference[y, j]) * float(pi[j]) for j in range(3)) for y in range(3)]
  np.testing.assert_allclose(tabular.win_rates(preference, pi), expected, atol=1e-7)


def test_bad_inputs_raise():
  preference, reference = _random_game(0, 3)
  for offset in (0.1, 0.01):
    with pytest.raises(ValueError, match="P \\+ P\\^T = 1"):
      tabular.nash_equilibrium(preference + offset, reference, 1.0)
  with pytest.raises(ValueError, match="tau"):
    tabular.nash_equilibrium(preference, reference, 0.0)
  with pytest.raises(ValueError, match="preference_AxA"):
    tabular.nash_equilibrium(preference[:2], reference, 1.0)
  with pytest.raises(ValueError, match="eta"):
    tabular.nash_md_iterates(preference, reference, 0.5, 3.0, 10)
  with pytest.raises(ValueError, match="num_steps"):
    tabular.nash_md_iterates(preference, reference, 0.5, 0.1, -1)
