"""Decoding-time alignment: DeRa (exact on a bandit, lambda = 0 / 1 reproduce the plain samplers),
best-of-n, RSO rejection sampling and the preference pairs built from its samples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhfjax import losses
from rlhfjax import sampling
from rlhfjax import tabular
from rlhfjax.models import Transformer, get_config

EOS = 2


def _model(seed):
  with nnx.use_eager_sharding(False):
    model = Transformer(get_config("tiny"), rngs=nnx.Rngs(seed))
  return nnx.split(model)


def _prompts():
  tokens = np.array([[5, 6, 7, 8], [0, 0, 10, 11], [0, 0, 0, 13], [9, 9, 3, 4]], np.int32)
  return jnp.asarray(tokens), jnp.asarray((tokens != 0).astype(np.int32))


def _token_sum_reward(prompt_tokens, prompt_mask, response_tokens, response_mask):
  """A toy reward: the sum of the response's token ids (so candidates differ)."""
  del prompt_tokens, prompt_mask
  return jnp.sum(response_tokens * response_mask, axis=-1).astype(jnp.float32)


def _normal(seed, shape):
  """Seeded standard normals (numpy: a jax.random draw of each new shape costs a compilation)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _fake_sampler(vocab=16, length=3):
  """A model-free sampler: uniform random tokens (cheap; enough for candidate bookkeeping)."""

  def sample(params, prompt_tokens, prompt_mask, rng):
    del params, prompt_mask
    batch = prompt_tokens.shape[0]
    tokens = jax.random.randint(rng, (batch, length), 3, vocab)
    mask = jnp.ones((batch, length), jnp.int32)
    zeros = jnp.zeros((batch, length), jnp.float32)
    return sampling.SampleOutput(tokens, mask, zeros, zeros, mask.sum(-1))

  return jax.jit(sample)


@pytest.fixture(scope="module")
def models():
  graphdef, aligned = _model(0)
  # A second model, cheaply: the same architecture with perturbed weights (numpy noise, so no
  # second round of random initialisers to compile).
  noise = np.random.default_rng(0)
  ref = jax.tree.map(lambda x: x + 0.3 * noise.standard_normal(x.shape).astype(x.dtype), aligned)
  return graphdef, aligned, ref


DERA_LAMS = (0.0, 1.0, 2.0)


@pytest.fixture(scope="module")
def sweep(models):
  """`dera_sweep` at lambda = 0, 1 and 2 (extrapolation) with its samples, shared by the tests."""
  graphdef, aligned, ref = models
  config = sampling.SamplingConfig(max_new_tokens=3, eos_id=EOS)
  tokens, mask = _prompts()
  return sampling.dera_sweep(graphdef, graphdef, (aligned, ref), tokens, mask, lams=DERA_LAMS,
                             config=config, reward_fn=_token_sum_reward, rng=jax.random.key(4),
                             keep_samples=True)


# -- DeRa ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 1.0, 2.0, 4.0])
def test_dera_is_exact_on_a_bandit(lam):
  # pi_beta ∝ pi_ref exp(r / beta); the lambda-mixture of pi_beta and pi_ref is the policy
  # aligned at beta / lambda (lambda = 0: the reference itself).
  rng = np.random.default_rng(0)
  reward = jnp.asarray(rng.standard_normal(6), jnp.float32)
  reference = jax.nn.softmax(jnp.asarray(rng.standard_normal(6), jnp.float32))
  beta = 0.5
  aligned = tabular.kl_regularized_optimum(reward, reference, beta)
  mixture = jax.nn.softmax(sampling.dera_logits(jnp.log(aligned), jnp.log(reference), lam))
  expected = reference if lam == 0 else tabular.kl_regularized_optimum(reward, reference,
                                                                       beta / lam)
  np.testing.assert_allclose(mixture, expected, atol=1e-6)


def test_dera_lambda_0_and_1_reproduce_the_plain_samplers(models, sweep):
  graphdef, aligned, ref = models
  tokens, mask = _prompts()
  plain = sampling.make_sampler(graphdef, sampling.SamplingConfig(max_new_tokens=3, eos_id=EOS))
  assert [r["lam"] for r in sweep] == list(DERA_LAMS)
  for row, params in ((sweep[0], ref), (sweep[1], aligned)):
    expected = plain(params, tokens, mask, jax.random.key(4))  # the sweep's rng
    out = row["samples"]
    np.testing.assert_array_equal(out.tokens_BxTr, expected.tokens_BxTr)
    np.testing.assert_array_equal(out.mask_BxTr, expected.mask_BxTr)
    np.testing.assert_allclose(out.sampling_logprobs_BxTr, expected.sampling_logprobs_BxTr,
                               atol=1e-6)
  assert abs(sweep[0]["kl"]) < 1e-5  # the reference against itself


def test_dera_sweep_samples_reward_and_kl_match_brute_force(models, sweep):
  graphdef, aligned, ref = models
  tokens, mask = _prompts()
  lam, row = DERA_LAMS[2], sweep[2]  # extrapolation, lambda = 2
  out = row["samples"]
  assert row["reward"] == pytest.approx(
      float(jnp.mean(_token_sum_reward(tokens, mask, out.tokens_BxTr, out.mask_BxTr))), rel=1e-6)

  # Brute force: full forward passes of both models over the decoded sequences.
  seqs = sampling.to_sequences(tokens, mask, out)
  forward = jax.jit(lambda p: nnx.merge(graphdef, p)(seqs["tokens"],
                                                     attention_mask_BxT=seqs["attention_mask"]))
  z_aligned, z_ref = forward(aligned), forward(ref)
  # The sampled distribution is softmax(lam z_aligned + (1 - lam) z_ref) at every step; model 0's
  # own log-probs are reported too.
  mixed = losses.token_logprobs(lam * z_aligned + (1 - lam) * z_ref, seqs["tokens"])[:, 4:]
  own = losses.token_logprobs(z_aligned, seqs["tokens"])[:, 4:]
  np.testing.assert_allclose(out.sampling_logprobs_BxTr, jnp.where(out.mask_BxTr, mixed, 0.0),
                             atol=5e-5)
  np.testing.assert_allclose(out.logprobs_BxTr, jnp.where(out.mask_BxTr, own, 0.0), atol=5e-5)
  # KL(pi_lam || pi_ref) summed over the vocabulary at each sampled prefix, by hand in float64.
  z_aligned, z_ref = np.asarray(z_aligned, np.float64), np.asarray(z_ref, np.float64)
  log_softmax = lambda v: v - v.max() - np.log(np.sum(np.exp(v - v.max())))
  total = 0.0
  for b in range(tokens.shape[0]):
    for t in range(int(out.lengths_B[b])):
      pos = tokens.shape[1] + t - 1  # the logits that predict response token t
      log_q = log_softmax(lam * z_aligned[b, pos] + (1 - lam) * z_ref[b, pos])
      log_p = log_softmax(z_ref[b, pos])
      total += np.sum(np.exp(log_q) * (log_q - log_p))
  assert row["kl"] == pytest.approx(total / tokens.shape[0], rel=1e-4)
  assert row["kl"] > 0 and sweep[1]["kl"] > 0


def test_dera_kl_is_that_of_the_processed_mixture(models, sweep):
  """With temperature and top-k, the KL is of softmax(top_k((lam z + (1 - lam) z_ref) / T))."""
  graphdef, aligned, ref = models
  tokens, mask = _prompts()
  lam, out = DERA_LAMS[2], sweep[2]["samples"]
  config = sampling.SamplingConfig(max_new_tokens=3, eos_id=EOS, temperature=0.5, top_k=5)
  kl = sampling.dera_kl(graphdef, graphdef, (aligned, ref), tokens, mask, out, lam, config)
  seqs = sampling.to_sequences(tokens, mask, out)
  forward = jax.jit(lambda p: nnx.merge(graphdef, p)(seqs["tokens"],
                                                     attention_mask_BxT=seqs["attention_mask"]))
  z_aligned = np.asarray(forward(aligned), np.float64)
  z_ref = np.asarray(forward(ref), np.float64)
  for b in range(tokens.shape[0]):
    total = 0.0
    for t in range(int(out.lengths_B[b])):
      pos = tokens.shape[1] + t - 1
      z = (lam * z_aligned[b, pos] + (1 - lam) * z_ref[b, pos]) / 0.5
      top = np.argsort(-z)[:5]
      log_q = z[top] - z[top].max() - np.log(np.sum(np.exp(z[top] - z[top].max())))
      log_p = z_ref[b, pos] - z_ref[b, pos].max()
      log_p -= np.log(np.sum(np.exp(log_p)))
      total += np.sum(np.exp(log_q) * (log_q - log_p[top]))
    assert float(kl[b]) == pytest.approx(total, rel=1e-4)


def test_dera_sampler_rejects_preset_mixture_weights(models):
  graphdef, _, _ = models
  config = sampling.SamplingConfig(max_new_tokens=2, eos_id=EOS, mixture_weights=(0.5, 0.5))
  with pytest.raises(ValueError, match="mixture_weights"):
    sampling.dera_sampler(graphdef, graphdef, 1.0, config)


def test_mixture_weights_helpers():
  assert sampling.dera_mixture_weights(2.0) == (2.0, -1.0)
  assert sampling.nash_md_mixture_weights(0.125) == (0.875, 0.125)
  with pytest.raises(ValueError, match="mixture_coef"):
    sampling.nash_md_mixture_weights(1.5)


# -- best-of-n -------------------------------------------------------------------------------------


def test_best_of_n_indices_pick_the_argmax_and_the_first_on_ties():
  rewards = _normal(0, (7, 5))
  rewards = rewards.at[0].set(jnp.array([1.0, 3.0, 3.0, 0.0, -1.0]))
  idx = sampling.best_of_n_indices(rewards)
  expected = [max(range(5), key=lambda j: (float(rewards[b, j]), -j)) for b in range(7)]
  assert idx.tolist() == expected
  assert idx[0] == 1


@pytest.mark.parametrize("mode", losses.ENSEMBLE_MODES)
def test_ensemble_best_of_n_uses_the_combined_reward(mode):
  rewards = _normal(1, (3, 6, 8))
  combined = losses.ensemble_reward(rewards, mode, lam=0.5)
  np.testing.assert_array_equal(sampling.ensemble_best_of_n_indices(rewards, mode, lam=0.5),
                                jnp.argmax(combined, axis=1))


def test_best_of_n_end_to_end_keeps_the_best_candidate_by_index():
  sample = _fake_sampler()
  tokens, mask = _prompts()
  best, rewards, idx = sampling.best_of_n(sample, None, tokens, mask, jax.random.key(2),
                                          num_candidates=6, reward_fn=_token_sum_reward)
  candidates = sampling.sample_candidates(sample, None, tokens, mask, jax.random.key(2),
                                          num_candidates=6)
  assert rewards.shape == (4, 6) and best.tokens_BxTr.shape == (4, 3)
  for b in range(4):
    scores = [float(jnp.sum(candidates.tokens_BxTr[b, j])) for j in range(6)]
    assert int(idx[b]) == int(np.argmax(scores))
    np.testing.assert_array_equal(best.tokens_BxTr[b], candidates.tokens_BxTr[b, int(idx[b])])
  # An ensemble of two identical members is the member itself.
  _, ens_rewards, ens_idx = sampling.best_of_n(
      sample, None, tokens, mask, jax.random.key(2), num_candidates=6,
      reward_fn=[_token_sum_reward, _token_sum_reward], ensemble_mode="uncertainty_weighted")
  np.testing.assert_allclose(ens_rewards, rewards)
  np.testing.assert_array_equal(ens_idx, idx)


def test_score_candidates_gives_each_prompt_its_own_candidates():
  def reward(prompt_tokens, prompt_mask, response_tokens, response_mask):
    # Depends on the prompt, so pairing a candidate with another row's prompt shows.
    return (1000.0 * jnp.sum(prompt_tokens * prompt_mask, axis=-1)
            + _token_sum_reward(prompt_tokens, prompt_mask, response_tokens, response_mask))

  tokens, mask = _prompts()
  candidates = sampling.sample_candidates(_fake_sampler(), None, tokens, mask, jax.random.key(3),
                                          num_candidates=3)
  rewards = sampling.score_candidates(reward, tokens, mask, candidates)
  for b in range(4):
    for j in range(3):
      want = reward(tokens[b:b + 1], mask[b:b + 1], candidates.tokens_BxTr[b, j][None],
                    candidates.mask_BxTr[b, j][None])
      assert float(rewards[b, j]) == float(want[0]), (b, j)


def test_candidate_layout_round_trips():
  tokens, mask = _prompts()
  rep_tokens, rep_mask = sampling.repeat_prompts(tokens, mask, 3)
  np.testing.assert_array_equal(rep_tokens[3 * 2 + 1], tokens[2])  # row b * N + j
  split = sampling.split_candidates({"t": rep_tokens, "m": rep_mask}, 3)
  assert split["t"].shape == (4, 3, 4)
  picked = sampling.select_candidates(split, jnp.array([[2, 0], [1, 1], [0, 2], [2, 2]]))
  assert picked["t"].shape == (4, 2, 4)
  np.testing.assert_array_equal(picked["t"][1, 0], tokens[1])
  with pytest.raises(ValueError, match="multiple"):
    sampling.split_candidates(jnp.zeros((7, 2)), 3)


# -- RSO -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_samples,atol", [(1, 0.012), (4, 0.012)])
def test_rso_accepted_distribution_approaches_the_optimal_policy(num_samples, atol):
  # Candidates are actions of a bandit drawn from pi_sft; the accepted ones should be distributed
  # as pi_sft exp(r / beta) / Z (Liu et al., arXiv 2309.06657). Monte Carlo over 8000
  # prompts (standard error about 0.0056 per probability with K = 1).
  pi_sft = jnp.array([0.4, 0.3, 0.2, 0.1])
  reward = jnp.array([0.0, 1.0, 2.0, 0.5])
  beta = 1.0
  target = tabular.kl_regularized_optimum(reward, pi_sft, beta)
  actions = jnp.asarray(np.random.default_rng(num_samples).choice(
      4, size=(8000, 32), p=np.array([0.4, 0.3, 0.2, 0.1])))
  idx = sampling.rso_indices(reward[actions], jax.random.key(num_samples),
                             num_samples=num_samples, beta=beta)
  assert idx.shape == (8000, num_samples)
  # Distinct candidates, every slot filled.
  sorted_idx = jnp.sort(idx, axis=1)
  assert bool(jnp.all(sorted_idx[:, 1:] != sorted_idx[:, :-1])) and bool(jnp.all(idx >= 0))
  accepted = np.asarray(jnp.take_along_axis(actions, idx, axis=1)).ravel()
  np.testing.assert_allclose(np.bincount(accepted, minlength=4) / accepted.size, target, atol=atol)
  # The proposal itself is far from the target: the test can fail.
  assert float(jnp.max(jnp.abs(pi_sft - target))) > 0.1


def _rso_exact(rewards, num_samples, beta):
  """{accepted indices in order: probability} of the paper's loop, enumerated exactly: each pass
  takes M over the remaining candidates and visits them in index order, accepting each with a
  fresh draw of probability exp((r - M) / beta), until K are accepted."""
  out = {}

  def passes(remaining, accepted, prob):
    if len(accepted) == num_samples:
      out[tuple(accepted)] = out.get(tuple(accepted), 0.0) + prob
      return
    best = max(rewards[j] for j in remaining)

    def visit(i, taken, p):  # candidate i of this pass's remaining ones
      if i == len(remaining) or len(accepted) + len(taken) == num_samples:
        passes([j for j in remaining if j not in taken], accepted + taken, p)
        return
      a = np.exp((rewards[remaining[i]] - best) / beta)
      visit(i + 1, taken + [remaining[i]], p * a)
      if a < 1:
        visit(i + 1, taken, p * (1 - a))

    visit(0, [], prob)

  passes(list(range(len(rewards))), [], 1.0)
  return out


def test_rso_acceptance_order_matches_the_exact_loop():
  # Three candidates, two accepted: the exact distribution of the accepted (ordered) pair, over
  # 8000 independent prompts (standard error at most 0.0056 per probability).
  rewards = [0.0, 1.5, 1.0]
  exact = _rso_exact(rewards, num_samples=2, beta=1.0)
  assert abs(sum(exact.values()) - 1) < 1e-12
  idx = sampling.rso_indices(jnp.tile(jnp.asarray(rewards), (8000, 1)), jax.random.key(9),
                             num_samples=2, beta=1.0)
  counts = {}
  for pair in map(tuple, np.asarray(idx).tolist()):
    counts[pair] = counts.get(pair, 0) + 1
  assert set(counts) <= set(exact)
  for pair, p in exact.items():
    assert abs(counts.get(pair, 0) / 8000 - p) < 0.025, (pair, counts.get(pair, 0) / 8000, p)


def test_rso_with_small_beta_is_best_of_n():
  # The shapes of the test above, so the compilations are shared.
  rewards = _normal(5, (8000, 32))
  idx = sampling.rso_indices(rewards, jax.random.key(6), num_samples=1, beta=1e-6)
  np.testing.assert_array_equal(idx[:, 0], sampling.best_of_n_indices(rewards))
  # With K > 1 it takes the top K in order of reward (each pass accepts only the current max).
  idx = sampling.rso_indices(rewards, jax.random.key(6), num_samples=4, beta=1e-6)
  np.testing.assert_array_equal(idx, jnp.argsort(-rewards, axis=1)[:, :4])


def test_rso_keys_duplicates_by_index():
  # Identical rewards (think: identical strings) are distinct candidates: all are accepted in the
  # first pass, the first K in index order. (Shapes of the tests above: shared compilation.)
  idx = sampling.rso_indices(jnp.zeros((8000, 32)), jax.random.key(0), num_samples=4, beta=0.5)
  np.testing.assert_array_equal(idx, np.broadcast_to(np.arange(4), (8000, 4)))


def test_rso_bad_arguments_raise():
  rewards = jnp.zeros((2, 4))
  with pytest.raises(ValueError, match="num_samples"):
    sampling.rso_indices(rewards, jax.random.key(0), num_samples=5, beta=1.0)
  with pytest.raises(ValueError, match="beta"):
    sampling.rso_indices(rewards, jax.random.key(0), num_samples=2, beta=0.0)
  with pytest.raises(ValueError, match="rewards_BxN"):
    sampling.rso_indices(jnp.zeros(4), jax.random.key(0), num_samples=2, beta=1.0)


@pytest.mark.parametrize("pairing,num_pairs", [("consecutive", 2), ("all", 6)])
def test_preference_pairs_order_by_reward(pairing, num_pairs):
  rewards = _normal(7, (3, 8))
  idx = jnp.array([[0, 3, 5, 1], [7, 6, 2, 4], [1, 2, 3, 0]])
  chosen, rejected, margins = sampling.preference_pairs(idx, rewards, pairing=pairing)
  assert chosen.shape == rejected.shape == margins.shape == (3, num_pairs)
  r_c = jnp.take_along_axis(rewards, chosen, axis=1)
  r_r = jnp.take_along_axis(rewards, rejected, axis=1)
  assert bool(jnp.all(r_c >= r_r))
  np.testing.assert_allclose(margins, r_c - r_r, atol=1e-6)
  pairs = {tuple(sorted(p)) for p in zip(chosen[0].tolist(), rejected[0].tolist())}
  expected = ({(0, 3), (1, 5)} if pairing == "consecutive"
              else {tuple(sorted((a, b))) for i, a in enumerate([0, 3, 5, 1])
                    for b in [0, 3, 5, 1][i + 1:]})
  assert pairs == expected
  with pytest.raises(ValueError, match="pairing"):
    sampling.preference_pairs(idx, rewards, pairing="tournament")


def test_preference_pairs_ties_keep_the_first_as_chosen():
  rewards = jnp.array([[1.0, 2.0, 2.0, 0.5]])
  idx = jnp.array([[2, 1, 3, 0]])
  chosen, rejected, margins = sampling.preference_pairs(idx, rewards)
  np.testing.assert_array_equal(chosen, [[2, 0]])
  np.testing.assert_array_equal(rejected, [[1, 3]])
  np.testing.assert_allclose(margins, [[0.0, 0.5]])


def test_rso_sample_to_preference_batch():
  sample = _fake_sampler()
  tokens, mask = _prompts()
  candidates, rewards, idx = sampling.rso_sample(
      sample, None, tokens, mask, jax.random.key(8), num_candidates=6, num_samples=4, beta=0.5,
      reward_fn=_token_sum_reward)
  assert rewards.shape == (4, 6) and idx.shape == (4, 4)
  chosen, rejected, _ = sampling.preference_pairs(idx, rewards)
  batch = sampling.pairs_to_batch(tokens, mask, candidates, chosen, rejected)
  assert batch["chosen_tokens"].shape == (8, 4 + 3)
  # Row b * P + p holds prompt b and its p-th chosen response, in the data pipeline's layout.
  np.testing.assert_array_equal(batch["chosen_tokens"][2 * 2 + 1, :4], tokens[2])
  np.testing.assert_array_equal(batch["chosen_tokens"][2 * 2 + 1, 4:],
                                candidates.tokens_BxTr[2, int(chosen[2, 1])])
  np.testing.assert_array_equal(batch["rejected_loss_mask"][:, :4], 0)
  chosen_r = _token_sum_reward(None, None, batch["chosen_tokens"][:, 4:],
                               batch["chosen_loss_mask"][:, 4:])
  rejected_r = _token_sum_reward(None, None, batch["rejected_tokens"][:, 4:],
                                 batch["rejected_loss_mask"][:, 4:])
  assert bool(jnp.all(chosen_r >= rejected_r))
