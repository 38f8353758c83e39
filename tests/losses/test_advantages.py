"""Tests for rlhfjax.losses.advantages: group baselines, GAE, returns, whitening, token rewards."""

import functools
import math

import jax
import numpy as np
import pytest
import scipy.stats

from rlhfjax.losses import advantages as adv

B, T = 4, 7


def call(fn, *arrays, **static):
  """fn(*arrays, **static) under jit: one compilation instead of one per eager primitive."""
  return jax.jit(functools.partial(fn, **static))(*arrays)


def _random_mask(rng, b=B, t=T, holes=True):
  """Right-padded masks with random lengths (one row empty), optionally with holes inside."""
  lengths = rng.integers(1, t + 1, size=b)
  lengths[-1] = 0
  mask = np.arange(t)[None, :] < lengths[:, None]
  if holes:
    mask &= rng.random((b, t)) > 0.2
  return mask


def _garbage(x, mask, value=np.nan):
  """x with masked entries replaced by `value`: they must not leak into any result."""
  return np.where(mask, x, value).astype(np.float32)


# ---------------------------------------------------------------- group baselines


def test_rloo_group_of_two_is_reward_difference():
  r = np.array([[1.0, 3.0], [-2.0, 0.5]], np.float32)
  np.testing.assert_allclose(call(adv.rloo_advantages, r), [[-2.0, 2.0], [-2.5, 2.5]])


@pytest.mark.parametrize("g", [2, 3, 5])
def test_rloo_matches_leave_one_out_loop_and_scaled_centring(g):
  r = np.random.default_rng(g).standard_normal((3, g))
  loop = np.array(
      [[r[p, i] - np.mean(np.delete(r[p], i)) for i in range(g)] for p in range(3)]
  )
  out = call(adv.rloo_advantages, r.astype(np.float32))
  np.testing.assert_allclose(out, loop, rtol=1e-5, atol=1e-6)
  scaled_centring = g / (g - 1) * (r - r.mean(1, keepdims=True))
  np.testing.assert_allclose(out, scaled_centring, rtol=1e-5, atol=1e-6)


def test_grpo_advantages_match_numpy():
  r = np.random.default_rng(0).standard_normal((3, 4))
  centred = r - r.mean(1, keepdims=True)
  for eps in (None, 1e-6, 0.5):  # None: the default, 1e-6
    kw = {} if eps is None else dict(eps=eps)
    np.testing.assert_allclose(
        call(adv.grpo_advantages, r.astype(np.float32), **kw),
        centred / (r.std(1, ddof=1, keepdims=True) + (eps or 1e-6)),
        rtol=1e-5,
    )
  np.testing.assert_allclose(
      call(adv.grpo_advantages, r.astype(np.float32), scale_by_std=False), centred, rtol=1e-5,
      atol=1e-6,
  )
  # A uniform group carries no signal.
  uniform = call(adv.grpo_advantages, np.ones((2, 4), np.float32))
  np.testing.assert_array_equal(uniform, np.zeros((2, 4)))


@pytest.mark.parametrize("seed", [0, 1])
def test_bnpo_alpha_beta_one_is_dr_grpo(seed):
  rng = np.random.default_rng(seed)
  binary = rng.integers(0, 2, size=(5, 8)).astype(np.float32)
  np.testing.assert_allclose(
      call(adv.bnpo_advantages, binary, alpha=1.0, beta=1.0),
      call(adv.grpo_advantages, binary, scale_by_std=False),
      atol=1e-6,
  )
  # Documented convention for rewards in [r_min, r_max]: Dr. GRPO divided by the range.
  scores = rng.uniform(-1.0, 2.0, size=(5, 8)).astype(np.float32)
  np.testing.assert_allclose(
      call(adv.bnpo_advantages, scores, alpha=1.0, beta=1.0, r_min=-1.0, r_max=2.0),
      call(adv.grpo_advantages, scores, scale_by_std=False) / 3.0,
      atol=1e-6,
  )


def test_bnpo_three_halves_is_grpo_with_population_std_for_binary_rewards():
  # Beta(3/2, 3/2) density = sqrt(p (1 - p)) / B(3/2, 3/2) with B(3/2, 3/2) = pi / 8.
  r = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]], np.float32)
  p = np.asarray(r).mean(1, keepdims=True)
  expected = (math.pi / 8) * (np.asarray(r) - p) / np.sqrt(p * (1 - p))
  np.testing.assert_allclose(call(adv.bnpo_advantages, r, alpha=1.5, beta=1.5), expected, rtol=1e-5)


def test_bnpo_adaptive_parameters_match_method_of_moments():
  rng = np.random.default_rng(3)
  r = rng.integers(0, 2, size=(16, 8)).astype(np.float32)
  r[0] = 1.0  # an all-correct group: p = 1 where the density may vanish; advantage must be 0
  p = r.mean(1)
  m, v = p.mean(), p.var(ddof=1)
  a, b = (m * (1 - m) / v - 1) * m, (m * (1 - m) / v - 1) * (1 - m)
  alpha, beta = max(1 + a / 3, 1.0), max(1 + b / 3, 1.0)
  got_alpha, got_beta = call(adv.bnpo_beta_params, p)
  np.testing.assert_allclose([got_alpha, got_beta], [alpha, beta], rtol=1e-5)
  with np.errstate(divide="ignore"):  # the density is 0 at p = 1
    weight = np.minimum(1 / scipy.stats.beta.pdf(p, alpha, beta), 1e6)
  out = call(adv.bnpo_advantages, r)
  np.testing.assert_allclose(out, weight[:, None] * (r - p[:, None]), rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(out[0], np.zeros(8))
  # Degenerate batch (every group has the same success rate): no normalisation.
  np.testing.assert_allclose(call(adv.bnpo_beta_params, np.full((4,), 0.5, np.float32)), [1.0, 1.0])


def test_remax_advantages_clip():
  out = call(adv.remax_advantages, np.array([1.0, 10.0, -3.0]), np.array([0.5, 0.0, 4.0]), clip=5.0)
  np.testing.assert_allclose(out, [0.5, 5.0, -5.0])
  np.testing.assert_allclose(
      call(adv.remax_advantages, np.array([10.0]), np.array([0.0]), clip=None), [10.0]
  )
  # The released code's default bound is 5.
  np.testing.assert_allclose(
      call(adv.remax_advantages, np.array([1.0, 10.0, -3.0]), np.array([0.5, 0.0, 4.0])),
      [0.5, 5.0, -5.0],
  )


def test_group_input_validation():
  with pytest.raises(ValueError, match="at least 2"):
    adv.rloo_advantages(np.ones((3, 1)))
  with pytest.raises(ValueError, match=r"\[P, G\]"):
    adv.grpo_advantages(np.ones((6,)))
  with pytest.raises(ValueError, match="r_max"):
    adv.bnpo_advantages(np.ones((2, 2)), r_min=1.0, r_max=1.0)
  with pytest.raises(ValueError, match="alpha and beta"):
    adv.bnpo_advantages(np.ones((2, 2)), alpha=1.0)
  with pytest.raises(ValueError, match="shape"):
    adv.remax_advantages(np.ones(3), np.ones(4))


# ---------------------------------------------------------------- GAE and returns


def _gae_loop(rewards, values, mask, gamma, lam):
  """Textbook GAE on each row's unmasked entries only (compacted), scattered back."""
  out = np.zeros(rewards.shape)
  for b in range(rewards.shape[0]):
    idx = np.flatnonzero(mask[b])
    r, v = rewards[b, idx], values[b, idx]
    a, next_a = np.zeros(len(idx)), 0.0
    for i in reversed(range(len(idx))):
      next_v = v[i + 1] if i + 1 < len(idx) else 0.0
      next_a = r[i] + gamma * next_v - v[i] + gamma * lam * next_a
      a[i] = next_a
    out[b, idx] = a
  return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_scan_matches_python_loop(seed):
  rng = np.random.default_rng(seed)
  gamma, lam = rng.uniform(0.5, 1.0), rng.uniform(0.0, 1.0)
  rewards, values = rng.standard_normal((2, B, T))
  mask = _random_mask(rng)
  gae = jax.jit(functools.partial(adv.gae, gamma=gamma, lam=lam))
  a, g = gae(_garbage(rewards, mask), _garbage(values, mask), mask)
  expected = _gae_loop(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(a, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(g, np.where(mask, expected + values, 0.0), rtol=1e-4, atol=1e-5)


def test_gae_with_unit_gamma_lambda_is_return_to_go_minus_value():
  rng = np.random.default_rng(5)
  rewards, values = rng.standard_normal((2, B, T))
  mask = np.ones((B, T), bool)
  a, g = call(adv.gae, rewards, values, mask, gamma=1.0, lam=1.0)
  suffix_sums = np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1]
  np.testing.assert_allclose(a, suffix_sums - values, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g, suffix_sums, rtol=1e-5, atol=1e-5)


def test_gae_defaults_are_gamma_1_lambda_0_95():
  # ALGORITHMS.md section 4: PPO-RLHF uses GAE with gamma 1 and lambda 0.95.
  rng = np.random.default_rng(8)
  rewards, values = rng.standard_normal((2, B, T))
  mask = _random_mask(rng)
  a, _ = call(adv.gae, _garbage(rewards, mask), _garbage(values, mask), mask)
  np.testing.assert_allclose(a, _gae_loop(rewards, values, mask, 1.0, 0.95), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns_match_loop(gamma):
  rng = np.random.default_rng(7)
  rewards = rng.standard_normal((B, T))
  mask = _random_mask(rng)
  expected = _gae_loop(rewards, np.zeros_like(rewards), mask, gamma, 1.0)
  for b in range(B):  # independent oracle for the return-to-go on a compacted row
    idx = np.flatnonzero(mask[b])
    r = rewards[b, idx]
    manual = [sum(gamma**k * r[i + k] for k in range(len(r) - i)) for i in range(len(r))]
    np.testing.assert_allclose(expected[b, idx], manual, rtol=1e-10)
  out = call(adv.discounted_returns, _garbage(rewards, mask), mask, gamma=gamma)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def _whiten_np(vals):
  return (vals - vals.mean()) / np.sqrt(vals.var() + 1e-8)


def test_whiten_uses_only_unmasked_entries():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((B, T)) * 3 + 2
  mask = _random_mask(rng)
  out = np.asarray(call(adv.whiten, _garbage(x, mask), mask))
  np.testing.assert_allclose(out[mask], _whiten_np(x[mask]), rtol=1e-4)
  np.testing.assert_array_equal(out[~mask], 0.0)


# ---------------------------------------------------------------- per-token rewards


def test_ppo_token_rewards():
  rng = np.random.default_rng(2)
  lp_old, lp_ref = rng.standard_normal((2, B, T))
  mask = _random_mask(rng, holes=False)
  reward = rng.standard_normal(B)
  out = call(
      adv.ppo_token_rewards, reward, _garbage(lp_old, mask), _garbage(lp_ref, mask), mask, beta=0.1
  )
  expected = np.where(mask, -0.1 * (lp_old - lp_ref), 0.0)
  for b in range(B):
    if mask[b].any():
      expected[b, np.flatnonzero(mask[b])[-1]] += reward[b]
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out[-1], np.zeros(T))  # the empty row gets nothing


def test_last_token_mask_with_holes():
  mask = np.array([[1, 0, 1, 1, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(
      call(adv.last_token_mask, mask),
      [[0, 0, 0, 1, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]],
  )


@pytest.mark.parametrize("gamma", [1.0, 0.99, None])
def test_remax_returns_match_released_code_loop(gamma):
  rng = np.random.default_rng(4)
  lp_old, lp_ref = rng.standard_normal((2, B, T))
  mask = _random_mask(rng, holes=False)
  delta = rng.standard_normal(B)
  # None: the defaults, the paper's beta 0.05 and gamma 1; otherwise beta 0.2.
  static = {} if gamma is None else dict(beta=0.2, gamma=gamma)
  beta, gamma = (0.05, 1.0) if gamma is None else (0.2, gamma)
  # liziniu/ReMax compute_returns: walking back from the end, the reward is multiplied by gamma
  # before each token is credited; the KL term is the token's own.
  expected = np.zeros((B, T))
  for b in range(B):
    cumulative = delta[b]
    for i in reversed(range(int(mask[b].sum()))):
      cumulative *= gamma
      expected[b, i] = -beta * (lp_old[b, i] - lp_ref[b, i]) + cumulative
  out = call(
      adv.remax_returns, delta, _garbage(lp_old, mask), _garbage(lp_ref, mask), mask, **static
  )
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 0.8])
def test_reinforce_pp_advantages_are_whitened_returns(gamma):
  rng = np.random.default_rng(6)
  lp_old, lp_ref = rng.standard_normal((2, B, T))
  mask = _random_mask(rng, holes=False)
  reward = rng.standard_normal(B)
  out = np.asarray(
      call(adv.reinforce_pp_advantages, reward, lp_old, lp_ref, mask, beta=0.01, gamma=gamma)
  )
  token_rewards = np.asarray(
      call(adv.ppo_token_rewards, reward, lp_old, lp_ref, mask, beta=0.01)
  )
  returns = np.zeros((B, T))  # right-padded rows: the return-to-go is a plain reverse loop
  for t in reversed(range(T)):
    returns[:, t] = token_rewards[:, t] + gamma * (returns[:, t + 1] if t + 1 < T else 0.0)
  np.testing.assert_allclose(out[mask], _whiten_np(returns[mask]), rtol=1e-4)


# ---------------------------------------------------------------- DAPO


def test_dapo_dynamic_sampling_mask():
  r = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.3, 0.3, 0.2]], np.float32)
  np.testing.assert_array_equal(call(adv.dapo_dynamic_sampling_mask, r), [False, False, True, True])


def test_dapo_overlong_penalty_piecewise():
  # L_max = 20, L_cache = 4: no penalty up to 16, linear to -1 at 20, -1 beyond.
  lengths = np.array([0, 16, 17, 18, 20, 21, 100])
  np.testing.assert_allclose(
      call(adv.dapo_overlong_penalty, lengths, max_len=20, cache_len=4),
      [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0],
  )
  with pytest.raises(ValueError, match="cache_len"):
    adv.dapo_overlong_penalty(lengths, max_len=20, cache_len=0)
