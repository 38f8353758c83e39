"""Tests for the policy-gradient losses, preference matching and constrained RLHF."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfjax.losses import advantages as adv
from rlhfjax.losses import constrained
from rlhfjax.losses import kl
from rlhfjax.losses import policy_gradient as pg
from rlhfjax.losses import preference_matching as pm
from rlhfjax.losses import tokens

sg = jax.lax.stop_gradient
B, T = 4, 6
MODES = tokens.AGGREGATION_MODES


def _batch(seed, b=B, t=T, spread=0.3):
  """Random rollout arrays; row b-1 is all-masked, other rows are right-padded with a hole."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, t + 1, size=b)
  mask = np.arange(t)[None, :] < lengths[:, None]
  mask[0, 1] = False  # a hole inside a response
  mask[-1] = False
  lp_old = -rng.exponential(1.0, (b, t))
  f = lambda x: np.asarray(x, np.float32)
  return {
      "logp": f(lp_old + spread * rng.standard_normal((b, t))),
      "logp_old": f(lp_old),
      "logp_ref": f(lp_old + 0.5 * rng.standard_normal((b, t))),
      "adv_B": f(rng.standard_normal(b)),
      "adv_BxT": f(rng.standard_normal((b, t))),
      "values": f(rng.standard_normal((b, t))),
      "values_old": f(rng.standard_normal((b, t))),
      "returns": f(rng.standard_normal((b, t))),
      "reward": f(rng.standard_normal(b)),
      "greedy_reward": f(rng.standard_normal(b)),
      "mask": mask,
  }


# Every token-level loss under one calling convention: fn(arrays, **aggregation kwargs).
LOSSES = {
    "clipped_surrogate": lambda a, **kw: pg.clipped_surrogate(
        a["logp"], a["logp_old"], a["adv_BxT"], a["mask"], eps_lo=0.2, eps_hi=0.28, **kw
    ),
    "reinforce": lambda a, **kw: pg.reinforce(a["logp"], a["adv_B"], a["mask"], **kw),
    "remax": lambda a, **kw: pg.remax(
        a["logp"], a["logp_old"], a["logp_ref"], a["reward"], a["greedy_reward"], a["mask"],
        gamma=0.9, **kw,
    ),
    "grpo": lambda a, **kw: pg.grpo(
        a["logp"], a["logp_old"], a["logp_ref"], a["adv_B"], a["mask"], **kw
    ),
    "reinforce_pp": lambda a, **kw: pg.reinforce_pp(
        a["logp"], a["logp_old"], a["adv_BxT"], a["mask"], **kw
    ),
    "ppo": lambda a, **kw: pg.ppo(
        a["logp"], a["logp_old"], a["adv_BxT"], a["values"], a["values_old"], a["returns"],
        a["mask"], **kw,
    ),
    "topr": lambda a, **kw: pg.topr(a["logp"], a["logp_old"], a["adv_B"], a["mask"], **kw),
}


def call(fn, *args, **static):
  """fn(*args, **static) under jit: one compilation instead of one per eager primitive."""
  return jax.jit(functools.partial(fn, **static))(*args)


def _rows(arrays, rows, cols=None):
  """Slices the batch: rows (a slice), and optionally token columns of [B, T] arrays."""
  out = {}
  for k, v in arrays.items():
    v = v[rows]
    if cols is not None and v.ndim == 2:
      v = v[:, cols]
    out[k] = v
  return out


def _num_sequences(mask, mode):
  # tokens.aggregate's defaults: all rows for sum_over_constant, non-empty rows otherwise.
  return mask.shape[0] if mode == "sum_over_constant" else int(np.any(mask, axis=1).sum())


@functools.lru_cache(maxsize=None)
def _loss_and_grad_fn(name, mode):
  """jit(value_and_grad wrt logp) of a loss; one compilation per (loss, mode, shapes)."""

  def loss_and_grad(arrays, counts):
    loss_fn = lambda logp: LOSSES[name](dict(arrays, logp=logp), mode=mode, **counts)
    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(arrays["logp"])
    return loss, grad, metrics

  return jax.jit(loss_and_grad)


def _loss_and_grad(name, arrays, mode="seq_mean_token_mean", **counts):
  loss, grad, _ = _loss_and_grad_fn(name, mode)(arrays, counts)
  return loss, grad


def _compact_left(arrays):
  """Moves each row's unmasked entries to the front (the mask becomes a prefix), 7.0 after."""
  mask = np.asarray(arrays["mask"])
  order = np.argsort(~mask, axis=1, kind="stable")  # unmasked positions first, in order
  prefix = np.take_along_axis(mask, order, axis=1)
  out = {}
  for k, v in arrays.items():
    if v.ndim == 2 and k != "mask":
      v = np.where(prefix, np.take_along_axis(v, order, axis=1), 7.0).astype(np.float32)
    out[k] = v
  out["mask"] = prefix
  return out, order


# (loss, mode) pairs for the structural tests: every mode for GRPO, and for the other losses the
# mode that depends most on per-row counts. The aggregation itself is tested in test_tokens.py.
STRUCTURAL_CASES = [("grpo", mode) for mode in MODES] + [
    (name, "seq_mean_token_mean") for name in sorted(LOSSES) if name != "grpo"
]


def _global_counts(mask, mode):
  """The counts `tokens.aggregate` would use for the whole batch, passed explicitly."""
  mask = np.asarray(mask)
  return dict(num_tokens=float(mask.sum()), num_sequences=_num_sequences(mask, mode), max_len=T)


@pytest.mark.parametrize("name, mode", STRUCTURAL_CASES)
def test_batched_equals_loop_and_masked_equals_unmasked_only(name, mode):
  a = _batch(0)
  mask = a["mask"]
  counts = _global_counts(mask, mode)
  full, full_grad = _loss_and_grad(name, a, mode, **counts)

  # Batched = loop over single examples (micro-batches of one) given the global counts.
  rows = [_loss_and_grad(name, _rows(a, slice(b, b + 1)), mode, **counts) for b in range(B)]
  np.testing.assert_allclose(sum(loss for loss, _ in rows), full, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      np.concatenate([grad for _, grad in rows]), full_grad, rtol=1e-5, atol=1e-6
  )

  # Masked = unmasked entries only: NaN in every masked entry changes nothing, and moving each
  # row's unmasked entries to the front (closing the holes) gives the same loss and gradients.
  poisoned = {
      k: (np.where(mask, v, np.nan).astype(np.float32) if v.ndim == 2 and k != "mask" else v)
      for k, v in a.items()
  }
  loss, grad = _loss_and_grad(name, poisoned, mode, **counts)
  np.testing.assert_allclose(loss, full, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)
  compact, order = _compact_left(a)
  compact_loss, compact_grad = _loss_and_grad(name, compact, mode, **counts)
  np.testing.assert_allclose(compact_loss, full, rtol=1e-5, atol=1e-6)
  grad_in_compact_order = np.take_along_axis(np.asarray(grad), order, axis=1)
  np.testing.assert_allclose(
      np.where(compact["mask"], grad_in_compact_order, 0.0), compact_grad, rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_finite_for_huge_log_ratios_and_all_masked_batches(name):
  a = _batch(3)
  signs = np.where(np.arange(B * T).reshape(B, T) % 2 == 0, 1.0, -1.0)
  huge = dict(a, logp=(a["logp_old"] + 1e4 * signs).astype(np.float32))
  empty = dict(a, mask=np.zeros((B, T), bool))
  fn = _loss_and_grad_fn(name, "seq_mean_token_mean")  # shared with the structural test
  for arrays in (huge, empty):
    loss, grad, metrics = fn(arrays, _global_counts(arrays["mask"], "seq_mean_token_mean"))
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert all(np.isfinite(v) for v in metrics.values()), metrics
  assert loss == 0.0 and not np.any(grad)


def test_bad_input():
  # Under jit the errors are raised while tracing, before anything is compiled.
  a = _batch(0)
  with pytest.raises(ValueError, match="aggregation mode"):
    call(LOSSES["grpo"], a, mode="mean")
  with pytest.raises(ValueError, match="advantages"):
    call(pg.clipped_surrogate, a["logp"], a["logp_old"], np.ones(B + 1), a["mask"])
  with pytest.raises(ValueError, match="logp_old_BxT"):
    call(pg.clipped_surrogate, a["logp"], a["logp_old"][:, :-1], a["adv_B"], a["mask"])
  with pytest.raises(ValueError, match="eps_lo"):
    call(pg.clipped_surrogate, a["logp"], a["logp_old"], a["adv_B"], a["mask"], eps_lo=1.5)
  with pytest.raises(ValueError, match="beta"):
    call(pg.grpo, a["logp"], a["logp_old"], None, a["adv_B"], a["mask"], beta=0.04)
  with pytest.raises(ValueError, match="advantages_B"):
    call(pg.topr, a["logp"], a["logp_old"], a["adv_BxT"], a["mask"])
  with pytest.raises(ValueError, match="beta"):
    call(pg.copg, *(np.zeros(3),) * 6, beta=0.0)


# ---------------------------------------------------------------- clipped surrogate family


def _aggregate_np(loss, mask, mode, max_len=T):
  loss, m = np.where(mask, loss, 0.0), mask.astype(np.float64)
  nonempty = m.sum(1) > 0
  if mode == "token_mean":
    return loss.sum() / m.sum()
  if mode == "sum_over_constant":
    return loss.sum() / (loss.shape[0] * max_len)
  if mode == "seq_mean_token_sum":
    return loss.sum(1)[nonempty].mean()
  return (loss.sum(1)[nonempty] / m.sum(1)[nonempty]).mean()


def _surrogate_np(lp, lp_old, a, eps_lo, eps_hi):
  ratio = np.exp(lp - lp_old)
  return -np.minimum(ratio * a, np.clip(ratio, 1 - eps_lo, 1 + eps_hi) * a)


@pytest.mark.parametrize("eps_lo, eps_hi", [(0.2, None), (0.2, 0.28), (0.1, 0.5)])
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
def test_clipped_surrogate_matches_definition(eps_lo, eps_hi, mode):
  a = _batch(4)
  np_ = {k: np.asarray(v, np.float64) for k, v in a.items()}
  mask = np.asarray(a["mask"])
  hi = eps_lo if eps_hi is None else eps_hi
  expected = _aggregate_np(
      _surrogate_np(np_["logp"], np_["logp_old"], np_["adv_BxT"], eps_lo, hi), mask, mode
  )
  loss_fn = functools.partial(pg.clipped_surrogate, eps_lo=eps_lo, eps_hi=eps_hi, mode=mode)
  (loss, metrics), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      a["logp"], a["logp_old"], a["adv_BxT"], a["mask"]
  )
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  ratio = np.exp(np_["logp"] - np_["logp_old"])
  clipped = np.clip(ratio, 1 - eps_lo, 1 + hi) * np_["adv_BxT"] < ratio * np_["adv_BxT"]
  np.testing.assert_allclose(metrics["clip_frac"], clipped[mask].mean(), rtol=1e-6)
  # approx_kl: k3 on samples from the old policy, (r - 1) - log r, estimates KL(old || new).
  log_ratio = np_["logp"] - np_["logp_old"]
  np.testing.assert_allclose(
      metrics["approx_kl"], (np.expm1(log_ratio) - log_ratio)[mask].mean(), rtol=1e-4
  )
  # Gradient: -A ratio * (aggregation weight) where the unclipped branch is active, else 0.
  unit = np.eye(B * T).reshape(B * T, B, T)
  weights = np.array([_aggregate_np(u, mask, mode) for u in unit]).reshape(B, T)
  expected_grad = np.where(clipped, 0.0, -np_["adv_BxT"] * ratio) * weights
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_clip_higher_is_asymmetric():
  lp = np.log(np.array([[1.25, 0.75]], np.float32))  # ratios 1.25 and 0.75 against lp_old = 0
  per_token = lambda a, hi: call(
      pg.clipped_surrogate, lp[:, :1] if a > 0 else lp[:, 1:], np.zeros((1, 1), np.float32),
      np.array([a], np.float32), np.ones((1, 1), bool), eps_lo=0.2, eps_hi=hi,
  )[0]
  # A > 0, ratio 1.25: clipped at 1.2 with eps 0.2 but inside [0.8, 1.28] with clip-higher.
  np.testing.assert_allclose(per_token(1.0, None), -1.2, rtol=1e-6)
  np.testing.assert_allclose(per_token(1.0, 0.28), -1.25, rtol=1e-6)
  # A < 0, ratio 0.75: the lower bound 0.8 applies in both (pessimistic branch is the clipped one).
  np.testing.assert_allclose(per_token(-1.0, None), 0.8, rtol=1e-6)
  np.testing.assert_allclose(per_token(-1.0, 0.28), 0.8, rtol=1e-6)


@pytest.mark.parametrize("mode", [None, "seq_mean_token_mean", "sum_over_constant"])
def test_grpo_is_surrogate_plus_k3(mode):
  # mode None: GRPO's defaults throughout (eps 0.2, beta 0.04, seq_mean_token_mean).
  kw = {} if mode is None else dict(mode=mode)
  mode = mode or "seq_mean_token_mean"
  a = _batch(5)
  np_ = {k: np.asarray(v, np.float64) for k, v in a.items()}
  mask = np.asarray(a["mask"])
  d = np_["logp"] - np_["logp_ref"]
  per_token = _surrogate_np(np_["logp"], np_["logp_old"], np_["adv_B"][:, None], 0.2, 0.2)
  expected = _aggregate_np(per_token + 0.04 * (np.exp(-d) - 1 + d), mask, mode)
  loss, metrics = call(LOSSES["grpo"], a, **kw)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["kl"], (np.exp(-d) - 1 + d)[mask].mean(), rtol=1e-5)
  # The KL term's gradient flows through lp: d k3 / d lp = 1 - exp(-d), times the aggregation
  # weight of each token.
  grad = lambda beta: _loss_and_grad_fn("grpo", mode)(a, dict(beta=beta))[1]
  unit = np.eye(B * T).reshape(B * T, B, T)
  weights = np.array([_aggregate_np(u, mask, mode) for u in unit]).reshape(B, T)
  np.testing.assert_allclose(
      np.asarray(grad(0.04)) - np.asarray(grad(0.0)), 0.04 * (1 - np.exp(-d)) * weights,
      rtol=1e-4, atol=1e-7,
  )
  no_kl_args = (a["logp"], a["logp_old"], None, a["adv_B"], a["mask"])
  both = lambda: (
      pg.grpo(*no_kl_args, beta=0.0, mode=mode)[0],
      pg.clipped_surrogate(*no_kl_args[:2], *no_kl_args[3:], mode=mode)[0],
  )
  no_kl, surrogate = call(both)
  np.testing.assert_allclose(no_kl, surrogate, rtol=1e-6)


@pytest.mark.parametrize("name", ["clipped_surrogate", "grpo", "reinforce_pp", "ppo"])
def test_on_policy_gradient_is_reinforce_even_with_logp_old_the_same_array(name):
  """logp_old is stop-gradient inside the loss: passing the policy's own (differentiable)
  log-probs as logp_old, as on the first step with recomputed log-probs, gives ratio 1 and the
  REINFORCE gradient -A, not 0 (plus the KL term's gradient, 0 here as lp_ref = lp)."""
  a = _batch(11)
  mode = "token_mean"
  advantages = a["adv_B"] if name == "grpo" else a["adv_BxT"]  # what LOSSES[name] uses
  loss = lambda logp: LOSSES[name](dict(a, logp=logp, logp_old=logp, logp_ref=logp), mode=mode)[0]

  grad = call(jax.grad(loss), a["logp"])
  reinforce_grad = call(
      jax.grad(lambda lp: pg.reinforce(lp, advantages, a["mask"], mode=mode)[0]), a["logp"]
  )
  assert np.abs(np.asarray(reinforce_grad)).max() > 1e-2
  np.testing.assert_allclose(grad, reinforce_grad, rtol=1e-5, atol=1e-7)


def test_remax_defaults_match_the_released_code():
  # liziniu/ReMax: Delta = clip(R - R_greedy, +-5), G_t = -0.05 (lp_old_t - lp_ref_t) + Delta
  # (gamma 1), loss -sum m G lp / sum m.
  a = _batch(12)
  a = dict(a, reward=4 * a["reward"], greedy_reward=4 * a["greedy_reward"])
  np_ = {k: np.asarray(v, np.float64) for k, v in a.items()}
  mask = np.asarray(a["mask"])
  delta = np.clip(np_["reward"] - np_["greedy_reward"], -5, 5)
  assert np.any(np.abs(np_["reward"] - np_["greedy_reward"]) > 5)  # the clip is active
  returns = -0.05 * (np_["logp_old"] - np_["logp_ref"]) + delta[:, None]
  expected = np.where(mask, -returns * np_["logp"], 0).sum() / mask.sum()
  loss, _ = call(
      pg.remax, a["logp"], a["logp_old"], a["logp_ref"], a["reward"], a["greedy_reward"], a["mask"]
  )
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_reinforce_pp_and_ppo_defaults():
  # Symmetric clip 0.2 and token_mean for both; PPO's value loss weighted by 0.1.
  a = _batch(13, spread=0.6)
  np_ = {k: np.asarray(v, np.float64) for k, v in a.items()}
  mask = np.asarray(a["mask"])
  policy = _aggregate_np(
      _surrogate_np(np_["logp"], np_["logp_old"], np_["adv_BxT"], 0.2, 0.2), mask, "token_mean"
  )
  v, v_old, g = np_["values"], np_["values_old"], np_["returns"]
  value = 0.5 * np.maximum((v - g) ** 2, (np.clip(v, v_old - 0.2, v_old + 0.2) - g) ** 2)
  value = _aggregate_np(value, mask, "token_mean")
  np.testing.assert_allclose(call(LOSSES["reinforce_pp"], a)[0], policy, rtol=1e-5)
  np.testing.assert_allclose(call(LOSSES["ppo"], a)[0], policy + 0.1 * value, rtol=1e-5)


def test_grpo_variant_configs():
  a = _batch(6)
  args = (a["logp"], a["logp_old"], a["logp_ref"], a["adv_B"], a["mask"])
  surrogate_args = (a["logp"], a["logp_old"], a["adv_B"], a["mask"])
  np.testing.assert_allclose(
      call(pg.dapo, *args)[0],
      call(pg.clipped_surrogate, *surrogate_args, eps_lo=0.2, eps_hi=0.28, mode="token_mean")[0],
      rtol=1e-6,
  )
  np.testing.assert_allclose(
      call(pg.dr_grpo, *args, beta=0.0, max_len=10)[0],
      call(pg.clipped_surrogate, *surrogate_args, mode="sum_over_constant", max_len=10)[0],
      rtol=1e-6,
  )
  # Dr. GRPO advantages = BNPO advantages at alpha = beta = 1 (rewards in [0, 1]) give one loss.
  rewards = np.random.default_rng(0).integers(0, 2, (2, 2)).astype(np.float32)

  def dr_grpo_loss(advantage_fn, **kw):
    return pg.dr_grpo(*args[:3], advantage_fn(rewards, **kw).reshape(-1), a["mask"])[0]

  np.testing.assert_allclose(
      call(lambda: dr_grpo_loss(adv.grpo_advantages, scale_by_std=False)),
      call(lambda: dr_grpo_loss(adv.bnpo_advantages, alpha=1.0, beta=1.0)),
      rtol=1e-5,
  )


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
def test_ppo_value_loss_matches_definition(mode):
  a = _batch(7)
  np_ = {k: np.asarray(v, np.float64) for k, v in a.items()}
  mask = np.asarray(a["mask"])
  v, v_old, g = np_["values"], np_["values_old"], np_["returns"]
  value = 0.5 * np.maximum((v - g) ** 2, (np.clip(v, v_old - 0.2, v_old + 0.2) - g) ** 2)
  policy = _surrogate_np(np_["logp"], np_["logp_old"], np_["adv_BxT"], 0.2, 0.2)
  loss, metrics = call(LOSSES["ppo"], a, mode=mode, vf_coef=0.5)
  np.testing.assert_allclose(metrics["value_loss"], _aggregate_np(value, mask, mode), rtol=1e-5)
  np.testing.assert_allclose(metrics["policy_loss"], _aggregate_np(policy, mask, mode), rtol=1e-5)
  np.testing.assert_allclose(
      loss, _aggregate_np(policy, mask, mode) + 0.5 * _aggregate_np(value, mask, mode), rtol=1e-5
  )
  value_grad = jax.grad(lambda vals: LOSSES["ppo"](dict(a, values=vals), mode=mode)[0])
  grad_v = call(value_grad, a["values"])
  assert np.all(np.isfinite(grad_v)) and not np.any(np.asarray(grad_v)[~mask])


def test_rloo_is_reinforce_with_leave_one_out_advantages():
  a = _batch(8)
  rewards = np.random.default_rng(1).standard_normal((2, 2)).astype(np.float32)
  # G = 2: A_1 = R_1 - R_2, A_2 = R_2 - R_1.
  expected = call(pg.reinforce, a["logp"], (rewards - rewards[:, ::-1]).reshape(-1), a["mask"])
  loss, _ = call(pg.rloo, a["logp"], rewards, a["mask"])
  np.testing.assert_allclose(loss, expected[0], rtol=1e-6)


# ---------------------------------------------------------------- TOPR


def test_topr_on_policy_gradient_equals_reinforce():
  a = _batch(9)
  on_policy = dict(a, logp_old=a["logp"])
  _, g_topr = _loss_and_grad("topr", on_policy, "seq_mean_token_sum")
  _, g_reinforce = _loss_and_grad("reinforce", on_policy, "seq_mean_token_sum")
  assert np.any(np.asarray(a["adv_B"]) < 0) and np.any(np.asarray(a["adv_B"]) > 0)
  np.testing.assert_allclose(g_topr, g_reinforce, rtol=1e-6, atol=1e-7)


def test_topr_off_policy_tapers_negative_examples_only():
  a = _batch(10)
  np_ = {k: np.asarray(v, np.float64) for k, v in a.items()}
  mask = np.asarray(a["mask"])
  seq_lr = np.where(mask, np_["logp"] - np_["logp_old"], 0).sum(1)
  w = np.where(np_["adv_B"] >= 0, 1.0, np.clip(np.exp(seq_lr), 0, 1))
  per_token = -(np_["adv_B"] * w)[:, None] * np_["logp"]
  loss, grad = _loss_and_grad("topr", a, "seq_mean_token_sum")
  np.testing.assert_allclose(loss, _aggregate_np(per_token, mask, "seq_mean_token_sum"), rtol=1e-5)
  # The taper is a constant coefficient (stop-gradient): REINFORCE with advantages A w.
  assert np.any(w < 0.99)
  _, expected_grad = _loss_and_grad(
      "reinforce", dict(a, adv_B=(np_["adv_B"] * w).astype(np.float32)), "seq_mean_token_sum"
  )
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- bandits: exact optima


K = 5  # actions of the one-step bandits below


def _bandit(seed):
  rng = np.random.default_rng(seed)
  log_softmax = lambda z: z - np.log(np.sum(np.exp(z)))
  return (
      jnp.asarray(rng.standard_normal(K), jnp.float32),  # rewards
      jnp.asarray(log_softmax(rng.standard_normal(K)), jnp.float32),  # reference log-probs
      jnp.asarray(np.exp(log_softmax(2 * rng.standard_normal(K))), jnp.float32),  # behaviour
  )


def _softmax_np(z):
  e = np.exp(np.asarray(z, np.float64) - np.max(z))
  return e / e.sum()


def _gradient_descent(loss_fn, steps, lr):
  step = lambda _, th: th - lr * jax.grad(loss_fn)(th)
  return call(lambda th: jax.nn.softmax(jax.lax.fori_loop(0, steps, step, th)), np.zeros(K))


def test_copg_gradient_equals_the_formula():
  # grad L = -2 beta (R_beta(y) - R_beta(y')) (grad lp(y) - grad lp(y')), R_beta = R - beta rho;
  # nothing flows into the reference or the rewards.
  rng = np.random.default_rng(14)
  lp1, ref1, r1, lp2, ref2, r2 = jnp.asarray(rng.standard_normal((6, B)), jnp.float32)
  beta = 0.3
  grads = call(
      jax.grad(lambda *x: jnp.sum(pg.copg(*x, beta=beta)), argnums=tuple(range(6))),
      lp1, ref1, r1, lp2, ref2, r2,
  )
  residual = (r1 - beta * (lp1 - ref1)) - (r2 - beta * (lp2 - ref2))
  np.testing.assert_allclose(grads[0], -2 * beta * residual, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads[3], 2 * beta * residual, rtol=1e-5, atol=1e-6)
  for g in (grads[1], grads[2], grads[4], grads[5]):
    np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_copg_off_policy_fixed_point(seed):
  r, lp_ref, mu = _bandit(seed)
  beta = 0.5
  i, j = np.meshgrid(np.arange(K), np.arange(K), indexing="ij")
  i, j = i.reshape(-1), j.reshape(-1)
  pair_weight = np.asarray(mu)[i] * np.asarray(mu)[j]  # pairs from the behaviour policy, not pi

  def expected_loss(theta):
    lp = jax.nn.log_softmax(theta)
    return jnp.sum(pair_weight * pg.copg(lp[i], lp_ref[i], r[i], lp[j], lp_ref[j], r[j], beta=beta))

  pi = _gradient_descent(expected_loss, steps=4000, lr=1.0)
  target = _softmax_np(lp_ref + r / beta)
  np.testing.assert_allclose(pi, target, atol=2e-4)
  assert np.abs(np.asarray(mu) - np.asarray(target)).max() > 0.1  # genuinely off-policy


def _score_function_optimum(r, penalty_fn, beta):
  """Optimum of exact-expectation REINFORCE on a bandit with a regularising reward penalty.

  Each action is one row of a batch with T = 1; the float mask sg(pi) weights the rows, so the
  ``token_mean`` aggregate is the exact expectation over y ~ pi of the per-sample loss.
  """

  def expected_loss(theta):
    lp = jax.nn.log_softmax(theta)[:, None]
    weights = sg(jnp.exp(lp))
    rewards = adv.token_level_rewards(r, penalty_fn(sg(lp)), weights > 0, beta=beta)
    return pg.reinforce(lp, rewards, weights, mode="token_mean")[0]

  return _gradient_descent(expected_loss, steps=3000, lr=2.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_preference_matching_optimum_is_softmax_reward_for_any_reference(seed):
  r, lp_ref, _ = _bandit(seed)
  _, other_ref, _ = _bandit(seed + 10)
  # The PM penalty never looks at a reference: one optimum, softmax(r), whatever pi_ref is.
  pi_pm = _score_function_optimum(r, pm.pm_penalty, beta=1.0)
  np.testing.assert_allclose(pi_pm, _softmax_np(r), atol=1e-4)
  for ref in (lp_ref, other_ref):
    # KL-RLHF through the same machinery lands on pi_ref exp(r / beta) instead.
    kl_penalty = lambda lp_old, ref=ref: kl.kl_estimate(lp_old, ref[:, None], "k1")
    pi_kl = _score_function_optimum(r, kl_penalty, beta=1.0)
    np.testing.assert_allclose(pi_kl, _softmax_np(ref + r), atol=1e-4)
    assert np.abs(np.asarray(pi_kl) - np.asarray(pi_pm)).max() > 0.05


def test_conditional_pm_penalty_switches_on_reference_probability():
  lp_old = np.log(np.array([[0.3, 0.2, 0.5]], np.float32))
  lp_ref = np.log(np.array([[0.6, 0.01, 0.39]], np.float32))
  out = call(pm.conditional_pm_penalty, lp_old, lp_ref, alpha=0.05)
  np.testing.assert_allclose(
      out, [[np.log(0.3), np.log(0.2) - np.log(0.01), np.log(0.5)]], rtol=1e-6
  )
  # Extremes: alpha below every reference probability is PM; above all of them it is KL.
  np.testing.assert_allclose(call(pm.conditional_pm_penalty, lp_old, lp_ref, alpha=1e-3), lp_old)
  np.testing.assert_allclose(
      call(pm.conditional_pm_penalty, lp_old, lp_ref, alpha=0.99), lp_old - lp_ref, rtol=1e-6
  )
  with pytest.raises(ValueError, match="alpha"):
    pm.conditional_pm_penalty(lp_old, lp_ref, alpha=0.0)


# ---------------------------------------------------------------- unbiased baselines (Monte Carlo)


def _exact_grad_expected_reward(theta, r):
  return call(jax.grad(lambda th: jnp.sum(jax.nn.softmax(th) * r)), theta)


def _assert_within_standard_errors(per_draw_grads, exact, n_se=4.0):
  """Mean of i.i.d. per-draw gradients vs the exact one, within n_se standard errors.

  With K components and 4 standard errors a correct estimator fails with probability < 1e-3 per
  seed (Gaussian tails; the draws are averaged over thousands of samples), and the seeds are fixed.
  """
  g = np.asarray(per_draw_grads, np.float64)
  se = g.std(axis=0, ddof=1) / np.sqrt(g.shape[0])
  deviation = np.abs(g.mean(axis=0) - np.asarray(exact))
  assert np.all(deviation <= n_se * se + 1e-7), (deviation, se)
  return deviation, se


def test_rloo_gradient_is_unbiased_and_the_mean_baseline_is_not():
  r = jnp.array([0.0, 1.0, 3.0, -2.0, 0.5])
  theta = jnp.array([0.3, -0.5, 0.1, 0.8, -0.2])
  num_groups, g = 4000, 2
  actions_PxG = jax.random.categorical(jax.random.key(0), theta, shape=(num_groups, g))

  def group_grad(advantage_fn, actions_G):
    def loss(th):
      lp = jax.nn.log_softmax(th)[actions_G][:, None]
      a = advantage_fn(r[actions_G][None]).reshape(-1)
      return -pg.reinforce(lp, a, jnp.ones((g, 1), bool))[0]  # minus: ascent on E[R]

    return jax.grad(loss)(theta)

  exact = _exact_grad_expected_reward(theta, r)
  group_grads = lambda fn: jax.jit(jax.vmap(functools.partial(group_grad, fn)))(actions_PxG)
  rloo_grads = group_grads(adv.rloo_advantages)
  _assert_within_standard_errors(rloo_grads, exact)
  # Test power: a baseline that includes the sample's own reward scales the gradient by (G-1)/G.
  mean_baseline = functools.partial(adv.grpo_advantages, scale_by_std=False)
  biased = np.asarray(group_grads(mean_baseline))
  se = biased.std(0, ddof=1) / np.sqrt(num_groups)
  assert np.max(np.abs(biased.mean(0) - exact) / se) > 8


def test_remax_gradient_is_unbiased():
  r = jnp.array([0.0, 1.0, 3.0, -2.0, 0.5])
  theta = jnp.array([0.3, -0.5, 0.1, 0.8, -0.2])
  greedy_reward = r[int(np.argmax(theta))]
  actions = jax.random.categorical(jax.random.key(1), theta, shape=(8000,))

  def sample_grad(action):
    def loss(th):
      lp = jax.nn.log_softmax(th)[action].reshape(1, 1)
      out, _ = pg.remax(
          lp, sg(lp), sg(lp), r[action][None], greedy_reward[None], jnp.ones((1, 1), bool),
          clip=None,
      )
      return -out

    return jax.grad(loss)(theta)

  grads = jax.jit(jax.vmap(sample_grad))(actions)
  _assert_within_standard_errors(grads, _exact_grad_expected_reward(theta, r))


def test_remax_gradient_vanishes_for_a_deterministic_policy():
  """A deterministic policy samples its greedy decode, so Delta = R(y) - R(y_greedy) = 0 and the
  ReMax estimate is exactly zero. The policy here is only near-deterministic (pi(3) = 0.96), so
  grad log pi(3) is not zero: REINFORCE without the greedy baseline (Delta = R(y)) has a gradient,
  ReMax has none; its KL part is zero as the reference equals the policy."""
  r = jnp.array([0.0, 1.0, 3.0, -2.0, 0.5])
  theta = jnp.array([0.0, 0.0, 0.0, 5.0, 0.0])
  actions = jnp.full((64,), 3)  # Every sample is the greedy action.
  lp_fn = lambda th: jax.nn.log_softmax(th)[actions][:, None]
  mask = jnp.ones((64, 1), bool)

  def loss(th, greedy_reward):
    lp = lp_fn(th)
    return pg.remax(lp, sg(lp), sg(lp), r[actions], greedy_reward, mask)[0]

  assert np.abs(jax.grad(lambda th: lp_fn(th).sum())(theta)).max() > 1.0  # grad log pi != 0
  np.testing.assert_array_equal(jax.jit(jax.grad(loss))(theta, jnp.full((64,), r[3])),
                                np.zeros(K))
  no_baseline = jax.jit(jax.grad(loss))(theta, jnp.zeros((64,)))
  assert np.abs(no_baseline).max() > 0.04  # |2 (1 - pi(3))| = 0.052


# ---------------------------------------------------------------- constrained RLHF


def test_constrained_mixed_advantage_matches_formula():
  rng = np.random.default_rng(0)
  a_kl = rng.standard_normal((B, T))
  a_n = rng.standard_normal((3, B, T))
  xi = np.array([-1.0, 0.5, 2.0])
  mu = 1 / (1 + np.exp(-xi))
  expected = (3 - mu.sum()) * a_kl + np.tensordot(mu, a_n, axes=1)
  f32 = lambda x: x.astype(np.float32)
  out = call(constrained.constrained_mixed_advantage, f32(a_kl), f32(a_n), f32(xi))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="advantages_N"):
    constrained.constrained_mixed_advantage(np.zeros((B, T)), np.zeros((2, B, T)), np.zeros(3))


def test_dual_update_drives_slack_multiplier_to_zero_and_violated_to_one():
  values = np.array([1.0, 0.2], np.float32)  # component 0 is above its threshold (slack), 1 below
  thresholds = np.array([0.5, 0.6], np.float32)

  def run(xi):
    step = lambda xi, _: (constrained.constrained_dual_update(xi, values, thresholds, lr=1.0), None)
    xi, _ = jax.lax.scan(step, xi, None, length=2000)
    return constrained.constraint_multipliers(xi)

  mu = call(run, np.zeros(2, np.float32))
  assert mu[0] < 0.01 and mu[1] > 0.99, mu
  # One step is plain gradient descent: d/dxi sigmoid(xi) (v - theta) = mu (1 - mu) (v - theta).
  xi0 = np.array([0.3, -0.4], np.float32)
  mu0 = 1 / (1 + np.exp(-xi0))
  np.testing.assert_allclose(
      call(constrained.constrained_dual_update, xi0, values, thresholds, lr=0.1),
      xi0 - 0.1 * mu0 * (1 - mu0) * (values - thresholds),
      rtol=1e-6,
  )
