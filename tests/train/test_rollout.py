"""Rollouts: G repeats in prompt-major order, masks and EOS, old / reference log-probs against full
forward passes, critic values, greedy baselines, and every reward source."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhfjax import losses
from rlhfjax import sharding as shd
from rlhfjax.models import Transformer, get_config, last_token_scores
from rlhfjax.sampling import SamplingConfig
from rlhfjax.train import rollout as rl

# One layer: these tests pin bookkeeping, not modelling, and compile time dominates on a CPU.
CONFIG = get_config("tiny", num_layers=1)
EOS = 2
P, G, TP, TR = 4, 4, 5, 10
PENALTY = 0.5


def _split(seed, score_head=False):
  with nnx.use_eager_sharding(False):
    return nnx.split(Transformer(CONFIG, rngs=nnx.Rngs(seed), score_head=score_head))


def digit_fraction(prompt_tokens, prompt_mask, response_tokens, response_mask):
  """A programmatic reward: the fraction of response tokens that are digits (ids 4..13)."""
  del prompt_tokens, prompt_mask
  digit = (response_tokens >= 4) & (response_tokens < 14)
  return losses.masked_mean(digit.astype(jnp.float32), response_mask, axis=-1)


def first_token(prompt_tokens, prompt_mask, response_tokens, response_mask):
  del prompt_tokens, prompt_mask, response_mask
  return response_tokens[:, 0].astype(jnp.float32)


def _prompts():
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, 40, size=(P, TP)).astype(np.int32)
  lengths = np.array([5, 3, 2, 4])
  mask = (np.arange(TP)[None, :] >= TP - lengths[:, None]).astype(np.int32)
  return np.where(mask, tokens, 0), mask


@functools.cache
def setup():
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  graphdef, params = _split(0)
  _, ref_params = _split(1)
  rm_graphdef, rm_params = _split(2, score_head=True)
  reward = rl.ensemble_reward(
      [rl.reward_model_reward(rm_graphdef), rl.programmatic_reward(digit_fraction)], "mean")
  rollouts = rl.Rollouts(
      graphdef, SamplingConfig(max_new_tokens=TR, eos_id=EOS), mesh=mesh, group_size=G,
      reward=reward, greedy_baseline=True, gold=digit_fraction,
      components=(digit_fraction, first_token), value_graphdef=rm_graphdef,
      missing_eos_penalty=PENALTY)
  prompt_tokens, prompt_mask = _prompts()
  reward_params = (rm_params, None)
  args = (params, ref_params, reward_params, rm_params, prompt_tokens, prompt_mask,
          jax.random.key(3))
  generation = rollouts.generate(params, prompt_tokens, prompt_mask, args[-1])
  rollout = rollouts(*args)

  @jax.jit
  def forward(tokens, attention_mask):
    """Full forward passes of every model over [B, T] sequences (one compilation, reused)."""
    logp = {}
    for name, p in (("policy", params), ("reference", ref_params)):
      logits = nnx.merge(graphdef, p)(tokens, attention_mask_BxT=attention_mask)
      logp[name] = losses.token_logprobs(logits, tokens)
    scores = nnx.merge(rm_graphdef, rm_params).scores(tokens, attention_mask_BxT=attention_mask)
    return logp, scores, last_token_scores(scores, attention_mask)

  return dict(rollout=jax.device_get(rollout), generation=jax.device_get(generation),
              prompts=(prompt_tokens, prompt_mask), forward=forward)


def _response(x_BxT):
  return np.asarray(x_BxT)[:, TP:]


def test_groups_repeat_prompts_in_prompt_major_order_and_masks_follow_the_layout():
  s = setup()
  r, (prompt_tokens, prompt_mask) = s["rollout"], s["prompts"]
  assert r.tokens.shape == (P * G, TP + TR)
  np.testing.assert_array_equal(r.tokens[:, :TP], np.repeat(prompt_tokens, G, axis=0))
  np.testing.assert_array_equal(r.attention_mask[:, :TP], np.repeat(prompt_mask, G, axis=0))
  assert not r.loss_mask[:, :TP].any()
  np.testing.assert_array_equal(r.attention_mask[:, TP:], r.loss_mask[:, TP:])
  # Responses are right-padded: the mask is a prefix of length `lengths`.
  expected = (np.arange(TR)[None, :] < r.lengths[:, None]).astype(r.loss_mask.dtype)
  np.testing.assert_array_equal(_response(r.loss_mask), expected)
  # The G samples of a prompt differ (temperature 1).
  assert len({tuple(row) for row in _response(r.tokens)[:G]}) > 1


def test_eos_ends_the_response_and_truncated_rows_are_penalised():
  s = setup()
  r = s["rollout"]
  tokens, mask = _response(r.tokens), _response(r.loss_mask)
  assert r.has_eos.any() and (~r.has_eos).any(), "seeded draw should hold both kinds of rows"
  for b in range(P * G):
    n = r.lengths[b]
    if r.has_eos[b]:
      assert tokens[b, n - 1] == EOS and EOS not in tokens[b, :n - 1]
      assert (tokens[b, n:] == 0).all()
    else:
      assert n == TR and EOS not in tokens[b]
  # The reward is the ensemble mean of the reward model and the programmatic reward, minus the
  # penalty where the response never emitted EOS.
  p, pm = np.repeat(s["prompts"][0], G, 0), np.repeat(s["prompts"][1], G, 0)
  _, _, member_rm = s["forward"](r.tokens, r.attention_mask)
  member_prog = digit_fraction(p, pm, jnp.asarray(tokens), jnp.asarray(mask))
  expected = 0.5 * (member_rm + member_prog) - PENALTY * (~r.has_eos)
  np.testing.assert_allclose(r.rewards, expected, atol=1e-5)
  np.testing.assert_allclose(r.gold_rewards, member_prog, atol=1e-6)
  np.testing.assert_allclose(r.component_rewards[:, 1], tokens[:, 0])


def test_old_and_reference_logprobs_equal_full_forward_passes():
  s = setup()
  r = s["rollout"]
  on = r.loss_mask != 0
  logp, _, _ = s["forward"](r.tokens, r.attention_mask)
  full = {name: np.where(on, x, 0.0) for name, x in logp.items()}
  # logp_old is recomputed by a full forward pass (recompute_logprobs=True, the default); the
  # sampler's KV-cache log-probs agree up to float error.
  np.testing.assert_allclose(r.logp_old, full["policy"], atol=1e-5)
  np.testing.assert_allclose(r.sampler_logp, full["policy"], atol=2e-5)
  np.testing.assert_allclose(r.logp_ref, full["reference"], atol=1e-5)
  assert not np.allclose(r.logp_old[on], r.logp_ref[on])  # different models
  assert (r.entropy[on] > 0).all() and (r.entropy[~on] == 0).all()


def test_packed_scoring_with_sampler_entropies_equals_full_forward_passes():
  """Rollouts(shared_prompt=True, recompute_logprobs=False): one packed reference pass per prompt
  group, the sampler's log-probs and entropies, no policy pass; same values as full passes."""
  s = setup()
  graphdef, params = _split(0)
  _, ref_params = _split(1)
  rollouts = rl.Rollouts(graphdef, SamplingConfig(max_new_tokens=TR, eos_id=EOS),
                         mesh=shd.make_mesh(1, 1, 1, devices=jax.devices()[:1]), group_size=G,
                         reward=rl.programmatic_reward(digit_fraction), recompute_logprobs=False,
                         shared_prompt=True)
  r = jax.device_get(rollouts.score(s["generation"], params, ref_params, None, None))
  on = r.loss_mask != 0
  logp, _, _ = s["forward"](r.tokens, r.attention_mask)
  np.testing.assert_allclose(r.logp_ref, np.where(on, logp["reference"], 0.0), atol=1e-5)
  np.testing.assert_array_equal(r.logp_old, r.sampler_logp)
  np.testing.assert_allclose(r.logp_old, np.where(on, logp["policy"], 0.0), atol=2e-5)
  entropy = losses.entropy(nnx.merge(graphdef, params)(r.tokens, attention_mask_BxT=r.attention_mask))
  np.testing.assert_allclose(r.entropy, np.where(on, entropy, 0.0), atol=2e-5)


def test_fused_policy_and_reference_scoring_equals_separate_passes():
  """Recomputed policy log-probs + reference of the same structure: one vmapped pass over both
  models' stacked params (fuse_forward=True), equal to two separate passes, packed or not."""
  s = setup()
  graphdef, params = _split(0)
  _, ref_params = _split(1)
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])

  def rollouts(**kwargs):
    return rl.Rollouts(graphdef, SamplingConfig(max_new_tokens=TR, eos_id=EOS), mesh=mesh,
                       group_size=G, reward=rl.programmatic_reward(digit_fraction), **kwargs)

  for shared_prompt in (False, True):
    fused, separate = rollouts(shared_prompt=shared_prompt, fuse_forward=True), rollouts(
        shared_prompt=shared_prompt)
    assert fused.fused and not separate.fused
    a, b = (jax.device_get(r.score(s["generation"], params, ref_params, None, None))
            for r in (fused, separate))
    for field in ("logp_old", "logp_ref", "entropy"):
      np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=1e-5,
                                 err_msg=f"{field} shared_prompt={shared_prompt}")
    assert not np.allclose(a.logp_old, a.logp_ref)  # The two halves are not mixed up.
  # Nothing to fuse: the sampler's log-probs (no policy pass), or a reference of another structure.
  assert not rollouts(recompute_logprobs=False, fuse_forward=True).fused
  with nnx.use_eager_sharding(False):
    other, _ = nnx.split(Transformer(get_config("tiny", num_layers=2), rngs=nnx.Rngs(0)))
  assert not rollouts(reference_graphdef=other, fuse_forward=True).fused


def test_critic_values_are_the_score_before_each_token():
  s = setup()
  r = s["rollout"]
  _, scores, _ = s["forward"](r.tokens, r.attention_mask)
  scores = np.asarray(scores)
  on = r.loss_mask != 0
  np.testing.assert_allclose(r.values[:, 1:][on[:, 1:]], scores[:, :-1][on[:, 1:]], atol=1e-5)
  assert (r.values[~on] == 0).all()


def test_greedy_baseline_is_the_reward_of_each_prompts_greedy_response():
  s = setup()
  r, greedy = s["rollout"], s["generation"].greedy
  prompt_tokens, prompt_mask = s["prompts"]
  # Greedy responses are teacher-forced argmaxes: each token maximises the full forward's
  # log-prob at its position. Repeated G times they have the rollout's shape (no recompilation).
  tokens = np.concatenate([prompt_tokens, greedy.tokens_BxTr], 1).repeat(G, 0)
  attention = np.concatenate([prompt_mask, greedy.mask_BxTr], 1).repeat(G, 0)
  logp, _, rm_reward = s["forward"](tokens, attention)
  assert greedy.tokens_BxTr.shape == (P, TR)
  graphdef, params = _split(0)
  logits = nnx.merge(graphdef, params)(tokens, attention_mask_BxT=attention)
  on = attention[:, TP:] != 0
  np.testing.assert_array_equal(np.argmax(logits[:, TP - 1:-1], -1)[on], tokens[:, TP:][on])
  np.testing.assert_allclose(np.asarray(greedy.logprobs_BxTr).repeat(G, 0),
                             np.where(attention[:, TP:], logp["policy"][:, TP:], 0.0), atol=2e-5)
  has_eos = ((greedy.tokens_BxTr == EOS) & (greedy.mask_BxTr != 0)).any(1).repeat(G)
  response, response_mask = tokens[:, TP:], attention[:, TP:]
  expected = 0.5 * (rm_reward + digit_fraction(None, None, response, response_mask))
  np.testing.assert_allclose(r.greedy_rewards, expected - PENALTY * ~has_eos, atol=1e-5)


def test_bad_settings_raise():
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  graphdef, _ = _split(0)
  reward = rl.programmatic_reward(digit_fraction)
  with pytest.raises(ValueError, match="group_size"):
    rl.Rollouts(graphdef, SamplingConfig(max_new_tokens=TR, eos_id=EOS), mesh=mesh, group_size=0,
                reward=reward)
  with pytest.raises(ValueError, match="greedy"):
    rl.Rollouts(graphdef, SamplingConfig(max_new_tokens=TR, eos_id=EOS, temperature=0.0),
                mesh=mesh, group_size=2, reward=reward)
  with pytest.raises(ValueError, match="missing_eos_penalty"):
    rl.Rollouts(graphdef, SamplingConfig(max_new_tokens=TR, eos_id=EOS), mesh=mesh, group_size=2,
                reward=reward, missing_eos_penalty=-1.0)
  with pytest.raises(ValueError, match="ensemble mode"):
    rl.ensemble_reward([reward], "median")


def test_ensemble_modes_combine_members_with_the_library_function():
  s = setup()
  r = s["rollout"]
  prompt_tokens = jnp.asarray(np.repeat(s["prompts"][0], G, 0))
  prompt_mask = jnp.asarray(np.repeat(s["prompts"][1], G, 0))
  args = (prompt_tokens, prompt_mask, jnp.asarray(_response(r.tokens)),
          jnp.asarray(_response(r.loss_mask)))
  members = [rl.programmatic_reward(digit_fraction), rl.programmatic_reward(first_token)]
  stacked = jnp.stack([digit_fraction(*args), first_token(*args)])
  for mode in losses.ENSEMBLE_MODES:
    combined = rl.ensemble_reward(members, mode, lam=0.5)((None, None), *args)
    np.testing.assert_allclose(combined, losses.ensemble_reward(stacked, mode, lam=0.5),
                               rtol=1e-6)
  # Worst case is the elementwise minimum of the members (a closed form, not the library call).
  np.testing.assert_allclose(rl.ensemble_reward(members, "worst_case")((None, None), *args),
                             np.minimum(*np.asarray(stacked)))
