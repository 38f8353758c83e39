"""Tests for rlhfjax.losses.preference and .gpo: offline preference optimisation losses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfjax import losses

B = 4


def _logps(seed, shape=(B,)):
  """Four arrays of sequence log-probs: policy chosen/rejected, reference chosen/rejected."""
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(-rng.uniform(1.0, 20.0, size=shape), jnp.float32) for _ in range(4))


def _margin_loss(loss_fn, h):
  """A sequence loss as a function of the margin h alone (policy chosen log-ratio = h)."""
  zero = jnp.zeros_like(h)
  return loss_fn(h, zero, zero, zero)


def _population(loss_fn, p):
  """E[loss] when the pair is labelled in the given direction with probability p."""
  return lambda h: p * _margin_loss(loss_fn, h) + (1 - p) * _margin_loss(loss_fn, -h)


def _logit(p):
  return np.log(p / (1 - p))


LENGTHS_W = jnp.array([3.0, 5.0, 2.0, 7.0])
LENGTHS_L = jnp.array([4.0, 1.0, 6.0, 2.0])

# Every sequence loss with the common signature (pc, pr, rc, rr) -> [B].
SEQUENCE_LOSSES = {
    "dpo": functools.partial(losses.dpo, beta=0.1),
    "ipo": functools.partial(losses.ipo, tau=0.1),
    "ipo_length_normalized": functools.partial(
        losses.ipo, tau=0.1, length_normalize=True, chosen_lengths=LENGTHS_W,
        rejected_lengths=LENGTHS_L,
    ),
    "slic": functools.partial(losses.slic, beta=0.1, lam=0.5),
    "cdpo": functools.partial(losses.cdpo, beta=0.1, label_smoothing=0.1),
    "robust_dpo": functools.partial(losses.robust_dpo, beta=0.1, label_noise=0.2),
    "rpo": functools.partial(losses.rpo, beta=0.1, eta=0.5, chosen_lengths=LENGTHS_W),
    "spin": functools.partial(losses.spin, beta=0.1),
    "mdpo_g1": lambda pc, pr, rc, rr: losses.mdpo(pc[:, None], pr[:, None], rc[:, None], rr[:, None]),
    "mipo_g1": lambda pc, pr, rc, rr: losses.mipo(pc[:, None], pr[:, None], rc[:, None], rr[:, None]),
    "simpo": lambda pc, pr, rc, rr: losses.simpo(pc, pr, LENGTHS_W, LENGTHS_L),
    "orpo": lambda pc, pr, rc, rr: losses.orpo(pc, pr, LENGTHS_W, LENGTHS_L),
    **{
        f"gpo_{name}": functools.partial(losses.gpo, beta=0.1, convex=name)
        for name in losses.GPO_CONVEX_FUNCTIONS
    },
}


@pytest.mark.parametrize("p", [0.2, 0.75])
def test_dpo_population_optimum(p):
  beta = 0.5
  loss_fn = functools.partial(losses.dpo, beta=beta)
  h_star = _logit(p) / beta  # sigma(beta h*) = p
  np.testing.assert_allclose(jax.grad(_population(loss_fn, p))(h_star), 0.0, atol=1e-6)


def test_dpo_bandit_optimum_is_reference_tilted_by_reward():
  # Four actions, Bradley-Terry preferences P(i > j) = sigma(r_i - r_j) over all ordered pairs.
  # Minimising the expected DPO loss over the policy logits gives pi* ∝ pi_ref exp(r / beta).
  beta = 2.0
  rewards = jnp.array([1.0, 0.0, -0.5, 2.0])
  log_ref = jax.nn.log_softmax(jnp.array([0.3, -0.2, 0.5, 0.0]))
  i, j = np.array([(a, b) for a in range(4) for b in range(4) if a != b]).T
  pref = jax.nn.sigmoid(rewards[i] - rewards[j])

  def expected_loss(theta):
    log_pi = jax.nn.log_softmax(theta)
    return jnp.sum(pref * losses.dpo(log_pi[i], log_pi[j], log_ref[i], log_ref[j], beta=beta))

  @jax.jit
  def descend(theta):
    step = lambda theta, _: (theta - 0.2 * jax.grad(expected_loss)(theta), None)
    return jax.lax.scan(step, theta, length=1000)[0]

  pi = jax.nn.softmax(descend(jnp.zeros(4)))
  expected = jax.nn.softmax(log_ref + rewards / beta)
  np.testing.assert_allclose(pi, expected, atol=1e-5)


@pytest.mark.parametrize("p", [0.3, 0.9])
def test_ipo_population_optimum(p):
  tau = 0.25
  loss_fn = functools.partial(losses.ipo, tau=tau)
  h_star = (2 * p - 1) / (2 * tau)
  np.testing.assert_allclose(jax.grad(_population(loss_fn, p))(h_star), 0.0, atol=1e-5)


def test_ipo_length_normalize_divides_log_ratios_by_lengths():
  pc, pr, rc, rr = _logps(0)
  got = losses.ipo(
      pc, pr, rc, rr, tau=0.1, length_normalize=True, chosen_lengths=LENGTHS_W,
      rejected_lengths=LENGTHS_L,
  )
  h = np.asarray((pc - rc) / LENGTHS_W - (pr - rr) / LENGTHS_L, np.float64)
  np.testing.assert_allclose(got, (h - 5.0) ** 2, rtol=1e-5)
  with pytest.raises(ValueError, match="chosen_lengths"):
    losses.ipo(pc, pr, rc, rr, length_normalize=True)
  with pytest.raises(ValueError, match="length_normalize"):
    losses.ipo(pc, pr, rc, rr, chosen_lengths=LENGTHS_W, rejected_lengths=LENGTHS_L)


@pytest.mark.parametrize("p", [0.2, 0.8])
def test_cdpo_population_optimum(p):
  beta, eps = 0.5, 0.1
  loss_fn = functools.partial(losses.cdpo, beta=beta, label_smoothing=eps)
  h_star = _logit((1 - 2 * eps) * p + eps) / beta
  np.testing.assert_allclose(jax.grad(_population(loss_fn, p))(h_star), 0.0, atol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_robust_dpo_averaged_over_label_noise_is_clean_dpo(eps):
  logps = _logps(1)
  h = losses.log_ratio_margin(*logps)
  robust = functools.partial(losses.robust_dpo, beta=0.1, label_noise=eps)
  # The observed label is the true one with probability 1 - eps and swapped with probability eps.
  noisy_average = lambda h: (1 - eps) * _margin_loss(robust, h) + eps * _margin_loss(robust, -h)
  clean = lambda h: _margin_loss(functools.partial(losses.dpo, beta=0.1), h)
  np.testing.assert_allclose(noisy_average(h), losses.dpo(*logps, beta=0.1), rtol=1e-5)
  np.testing.assert_allclose(
      jax.grad(lambda h: noisy_average(h).sum())(h), jax.grad(lambda h: clean(h).sum())(h), atol=1e-6
  )
  if eps > 0:  # guard: the plain DPO loss averaged over the same noise is *not* clean DPO
    dpo = functools.partial(losses.dpo, beta=0.1)
    naive = (1 - eps) * _margin_loss(dpo, h) + eps * _margin_loss(dpo, -h)
    assert not np.allclose(naive, clean(h), rtol=1e-3)


def test_label_smoothing_and_noise_must_be_below_one_half():
  logps = _logps(2)
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.cdpo(*logps, label_smoothing=0.5)
  with pytest.raises(ValueError, match="label_noise"):
    losses.robust_dpo(*logps, label_noise=0.7)


# z* from the table in ALGORITHMS.md §3 (Tang et al., arXiv 2402.05749, Table 1).
GPO_OPTIMA = {
    "logistic": _logit,
    "hinge": lambda p: np.sign(2 * p - 1),
    "squared": lambda p: 2 * p - 1,
    "exponential": lambda p: _logit(p) / 2,
    "truncated_quadratic": lambda p: 2 * p - 1,
    "savage": _logit,
}


@pytest.mark.parametrize("convex", sorted(GPO_OPTIMA))
@pytest.mark.parametrize("p", [0.2, 0.7, 0.9])
def test_gpo_population_minimiser_matches_table(convex, p):
  # Minimise p f(z) + (1 - p) f(-z) numerically and compare with z*. A grid search (spacing 1e-4)
  # finds the global minimum, but near a smooth minimum float32 loss values are flat to ~1e-3 in z;
  # the sign change of the derivative on the same grid then pins the minimiser to the grid spacing.
  z = jnp.linspace(-4.0, 4.0, 80001)
  population = _population(functools.partial(losses.gpo, beta=1.0, convex=convex), p)
  values, slopes = jax.jit(lambda z: (population(z), jax.vmap(jax.grad(population))(z)))(z)
  z_star = GPO_OPTIMA[convex](p)
  np.testing.assert_allclose(z[jnp.argmin(values)], z_star, atol=2e-3)
  crossing = np.flatnonzero((np.asarray(slopes[:-1]) < 0) & (np.asarray(slopes[1:]) >= 0))
  assert len(crossing) == 1  # a single stationary point: the minimiser
  np.testing.assert_allclose(z[crossing[0]], z_star, atol=2e-4)


def test_gpo_special_cases_equal_dpo_slic_ipo():
  logps = _logps(3)
  np.testing.assert_allclose(
      losses.gpo(*logps, beta=0.3, convex="logistic"), losses.dpo(*logps, beta=0.3), rtol=1e-6
  )
  np.testing.assert_allclose(
      losses.gpo(*logps, beta=0.3, convex="hinge"), losses.slic(*logps, beta=0.3), rtol=1e-6
  )
  # (beta h - 1)^2 = beta^2 (h - 1/(2 tau))^2 with beta = 2 tau.
  np.testing.assert_allclose(
      losses.gpo(*logps, beta=0.3, convex="squared"),
      0.3**2 * losses.ipo(*logps, tau=0.15),
      rtol=1e-5,
  )
  custom = losses.gpo(*logps, beta=0.3, convex=lambda z: jnp.abs(z))
  np.testing.assert_allclose(custom, jnp.abs(0.3 * losses.log_ratio_margin(*logps)), rtol=1e-6)
  with pytest.raises(ValueError, match="cubic"):
    losses.gpo(*logps, convex="cubic")


def test_slic_regulariser_is_negative_log_likelihood():
  logps = _logps(4)
  sft_logps = _logps(5)[0]
  base = losses.slic(*logps, beta=0.1)
  np.testing.assert_allclose(
      losses.slic(*logps, beta=0.1, lam=0.3, sft_logps=sft_logps), base - 0.3 * sft_logps, rtol=1e-6
  )
  np.testing.assert_allclose(
      losses.slic(*logps, beta=0.1, lam=0.3), base - 0.3 * logps[0], rtol=1e-6
  )


def test_group_losses_with_one_sample_reduce_to_dpo_and_ipo():
  logps = _logps(6)
  grouped = [x[:, None] for x in logps]
  np.testing.assert_allclose(losses.mdpo(*grouped, beta=0.2), losses.dpo(*logps, beta=0.2), rtol=1e-6)
  np.testing.assert_allclose(losses.mipo(*grouped, tau=0.2), losses.ipo(*logps, tau=0.2), rtol=1e-6)


@pytest.mark.parametrize("loss_fn", [losses.mdpo, losses.mipo])
def test_group_losses_are_permutation_invariant_and_respect_masks(loss_fn):
  pc, pr, rc, rr = _logps(7, (B, 3))
  perm_w, perm_l = np.array([2, 0, 1]), np.array([1, 2, 0])
  base = loss_fn(pc, pr, rc, rr)
  permuted = loss_fn(pc[:, perm_w], pr[:, perm_l], rc[:, perm_w], rr[:, perm_l])
  np.testing.assert_allclose(permuted, base, rtol=1e-6)

  # Masked members are ignored: equal to the loss on the first two chosen / first rejected only.
  mask_w = jnp.array([[1, 1, 0]] * B)
  mask_l = jnp.array([[1, 0, 0]] * B)
  masked = loss_fn(pc, pr, rc, rr, chosen_mask_BxG=mask_w, rejected_mask_BxG=mask_l)
  subset = loss_fn(pc[:, :2], pr[:, :1], rc[:, :2], rr[:, :1])
  np.testing.assert_allclose(masked, subset, rtol=1e-6)
  garbage = loss_fn(
      pc.at[:, 2].set(1e30), pr, rc, rr, chosen_mask_BxG=mask_w, rejected_mask_BxG=mask_l
  )
  np.testing.assert_allclose(garbage, masked, rtol=1e-6)
  # Group-level mean: mdpo on G samples uses the mean log-ratio per side.
  h = np.mean(pc - rc, axis=1) - np.mean(pr - rr, axis=1)
  if loss_fn is losses.mdpo:
    np.testing.assert_allclose(base, np.logaddexp(0.0, -0.1 * h), rtol=1e-5)
  with pytest.raises(ValueError, match=r"\[B, G\]"):
    loss_fn(pc[:, 0], pr[:, 0], rc[:, 0], rr[:, 0])


def test_rpo_is_dpo_plus_nll_and_eta_zero_is_dpo():
  logps = _logps(8)
  dpo = losses.dpo(*logps, beta=0.1)
  np.testing.assert_allclose(losses.rpo(*logps, beta=0.1, eta=0.0), dpo, rtol=1e-6)
  np.testing.assert_allclose(
      losses.rpo(*logps, beta=0.1, eta=0.5), dpo - 0.5 * logps[0], rtol=1e-6
  )
  np.testing.assert_allclose(
      losses.rpo(*logps, beta=0.1, eta=0.5, chosen_lengths=LENGTHS_W),
      dpo - 0.5 * logps[0] / LENGTHS_W,
      rtol=1e-6,
  )


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_spin_is_dpo_against_previous_iterate(beta):
  logps = _logps(9)
  np.testing.assert_allclose(losses.spin(*logps, beta=beta), losses.dpo(*logps, beta=beta))


def test_defaults_are_the_documented_ones():
  """DPO-family beta 0.1 (ALGORITHMS.md §3; SPIN's paper value too); GPO defaults to its logistic
  form, i.e. DPO; cDPO / robust DPO default to no smoothing / noise (DPO); SLiC is GPO's hinge;
  the G = 1 group losses equal DPO / IPO with defaults; SimPO beta 2, gamma 1; ORPO lam 0.1."""
  logps = _logps(13)
  pc, pr, _, _ = logps
  h = np.asarray(losses.log_ratio_margin(*logps), np.float64)
  dpo = np.logaddexp(0.0, -0.1 * h)
  for fn in (losses.dpo, losses.spin, losses.gpo, losses.cdpo, losses.robust_dpo):
    np.testing.assert_allclose(fn(*logps), dpo, rtol=1e-5, err_msg=fn.__name__)
  grouped = [x[:, None] for x in logps]
  np.testing.assert_allclose(losses.mdpo(*grouped), dpo, rtol=1e-5)
  np.testing.assert_allclose(losses.mipo(*grouped), losses.ipo(*logps), rtol=1e-6)
  np.testing.assert_allclose(losses.slic(*logps), np.maximum(0.0, 1.0 - 0.1 * h), rtol=1e-5)
  np.testing.assert_allclose(losses.slic(*logps), losses.gpo(*logps, convex="hinge"), rtol=1e-6)
  np.testing.assert_allclose(
      losses.simpo(pc, pr, LENGTHS_W, LENGTHS_L),
      losses.simpo(pc, pr, LENGTHS_W, LENGTHS_L, beta=2.0, gamma=1.0), rtol=1e-6,
  )
  np.testing.assert_allclose(
      losses.orpo(pc, pr, LENGTHS_W, LENGTHS_L), losses.orpo(pc, pr, LENGTHS_W, LENGTHS_L, lam=0.1),
      rtol=1e-6,
  )


def test_simpo_against_formula():
  pc, pr, _, _ = _logps(10)
  got = losses.simpo(pc, pr, LENGTHS_W, LENGTHS_L, beta=2.0, gamma=1.0)
  pc, pr = np.asarray(pc, np.float64), np.asarray(pr, np.float64)
  x = 2.0 * pc / np.asarray(LENGTHS_W) - 2.0 * pr / np.asarray(LENGTHS_L) - 1.0
  np.testing.assert_allclose(got, np.logaddexp(0.0, -x), rtol=1e-5)


# Mean token log-probs a = lp / |y| of -1e-2 .. -1e-4: responses with probability close to 1, where
# log(1 - e^a) needs the expm1 branch and the -1e-6 cap must not bite.
NEAR_ONE_W = jnp.array([-3e-3, -5e-4, -2e-2, -7e-4])
NEAR_ONE_L = jnp.array([-4e-4, -5e-3, -6e-3, -2e-3])


@pytest.mark.parametrize("near_one", [False, True])
def test_orpo_against_formula_in_float64(near_one):
  pc, pr, _, _ = _logps(11)
  if near_one:
    pc, pr = NEAR_ONE_W, NEAR_ONE_L
  got = losses.orpo(pc, pr, LENGTHS_W, LENGTHS_L, lam=0.1)
  a_w = np.asarray(pc, np.float64) / np.asarray(LENGTHS_W)
  a_l = np.asarray(pr, np.float64) / np.asarray(LENGTHS_L)
  log_odds = lambda a: a - np.log(-np.expm1(a))
  expected = -a_w + 0.1 * np.logaddexp(0.0, -(log_odds(a_w) - log_odds(a_l)))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_orpo_is_finite_near_probability_one():
  pc = jnp.array([-1e-9, 0.0, -1e4, -0.3])
  pr = jnp.array([-1e4, -1e-9, 0.0, -0.3])
  ones = jnp.ones(4)
  value, grads = jax.value_and_grad(
      lambda a, b: losses.orpo(a, b, ones, ones).sum(), argnums=(0, 1)
  )(pc, pr)
  assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("name", sorted(SEQUENCE_LOSSES))
def test_batched_equals_loop_over_examples(name):
  loss_fn = SEQUENCE_LOSSES[name]
  logps = _logps(12)
  batched = jax.jit(loss_fn)(*logps)
  assert batched.shape == (B,)
  for i in range(B):
    # Per-example call: slice the inputs and the per-example lengths baked into the partials.
    single = _single_example_loss(name, i)(*(x[i : i + 1] for x in logps))
    np.testing.assert_allclose(batched[i], single[0], rtol=1e-6)


def _single_example_loss(name, i):
  """The loss of SEQUENCE_LOSSES[name] with its per-example length arrays sliced to example i."""
  lw, ll = LENGTHS_W[i : i + 1], LENGTHS_L[i : i + 1]
  if name == "ipo_length_normalized":
    return functools.partial(
        losses.ipo, tau=0.1, length_normalize=True, chosen_lengths=lw, rejected_lengths=ll
    )
  if name == "rpo":
    return functools.partial(losses.rpo, beta=0.1, eta=0.5, chosen_lengths=lw)
  if name == "simpo":
    return lambda pc, pr, rc, rr: losses.simpo(pc, pr, lw, ll)
  if name == "orpo":
    return lambda pc, pr, rc, rr: losses.orpo(pc, pr, lw, ll)
  return SEQUENCE_LOSSES[name]


@pytest.mark.parametrize("name", sorted(set(SEQUENCE_LOSSES) - {"orpo"}))
def test_finite_values_and_gradients_at_extreme_log_ratios(name):
  loss_fn = SEQUENCE_LOSSES[name]
  big = jnp.array([1e4, -1e4, 1e4, -1e4])
  zero = jnp.zeros(B)
  # h = +-1e4 and +-2e4 (with reference log-probs of the opposite sign).
  for args in [(big, zero, zero, zero), (big, -big, zero, zero), (big, -big, -big, big)]:
    value, grads = jax.value_and_grad(lambda *a: loss_fn(*a).sum(), argnums=(0, 1, 2, 3))(*args)
    if name == "gpo_exponential":
      # e^-z is unbounded: the value overflows to inf where beta h << 0, by definition.
      assert np.isinf(value)
      continue
    assert np.isfinite(value), name
    assert all(np.all(np.isfinite(g)) for g in grads), name


@pytest.mark.parametrize("name", sorted(SEQUENCE_LOSSES))
def test_no_loss_trains_the_reference(name):
  """Stop-gradients live inside the loss: the gradient w.r.t. the reference log-probs is exactly
  zero (and w.r.t. the policy's is not), whoever calls it."""
  grads = jax.grad(lambda *a: SEQUENCE_LOSSES[name](*a).sum(), argnums=(0, 1, 2, 3))(*_logps(3))
  assert np.abs(np.asarray(grads[0])).max() > 0, name
  np.testing.assert_array_equal(grads[2], 0.0)
  np.testing.assert_array_equal(grads[3], 0.0)


def test_online_preference_losses_do_not_train_the_reference():
  pc, pr, rc, rr = _logps(4)
  p = jnp.asarray([0.2, 0.5, 0.7, 0.9])
  for fn in (lambda rc, rr: losses.online_ipo(pc, pr, rc, rr, p).sum(),
             lambda rc, rr: losses.inpo(pc, pr, rc, rr, rc + 1.0, rr - 1.0, tau=0.5,
                                        eta=1.0).sum(),
             lambda rc, rr: losses.nash_md_pg(pc, rc, p).sum()):
    for g in jax.grad(fn, argnums=(0, 1))(rc, rr):
      np.testing.assert_array_equal(g, 0.0)
