"""Online preference loops: each algorithm's step equals its loss in `rlhfjax.losses` on the judged
pairs (log-probs recomputed independently), the mixture's endpoints are the policy and the
reference, the previous iterate refreshes on schedule, and 8 devices equal 1."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhfjax import losses
from rlhfjax import sharding as shd
from rlhfjax.models import Transformer, get_config
from rlhfjax.sampling import SamplingConfig, make_sampler, to_sequences
from rlhfjax.train import online_preference as op
from rlhfjax.train import rollout as rl
from rlhfjax.train import state as state_lib

CONFIG = get_config("tiny", num_layers=1)
EOS = 2
P, TP, TR = 8, 4, 6
JUDGE_TEMPERATURE = 0.5
# Losses set so that the chosen/rejected margins matter at initialisation.
LOSS_KWARGS = {"online_dpo": dict(beta=0.5), "online_ipo": dict(tau=0.5), "ipo_md": dict(tau=0.5),
               "nash_md_pg": dict(tau=0.1), "spin": dict(beta=0.5),
               "inpo": dict(tau=0.25, eta=0.5)}


def digit_fraction(prompt_tokens, prompt_mask, response_tokens, response_mask):
  """A programmatic reward: the fraction of response tokens that are digits (ids 4..13)."""
  del prompt_tokens, prompt_mask
  digit = (response_tokens >= 4) & (response_tokens < 14)
  return losses.masked_mean(digit.astype(jnp.float32), response_mask, axis=-1)


@functools.cache
def _params(seed):
  """Host params of the tiny model, initialised eagerly (seed 0: policy, 1: reference)."""
  with nnx.use_eager_sharding(False):
    graphdef, params = nnx.split(Transformer(CONFIG, rngs=nnx.Rngs(seed)))
  return graphdef, jax.device_get(params.to_pure_dict())


def _mesh(devices):
  return (shd.make_mesh(1, 1, 1, devices=jax.devices()[:1]) if devices == 1
          else shd.make_mesh(2, 2, 2))


def _prompts(mesh):
  rng = np.random.default_rng(0)
  tokens = rng.integers(14, 40, size=(P, TP)).astype(np.int32)
  mask = (np.arange(TP)[None, :] >= rng.integers(0, TP, size=(P, 1))).astype(np.int32)
  lengths = rng.integers(1, TR + 1, size=(P, 1))
  response_mask = (np.arange(TR)[None, :] < lengths).astype(np.int32)
  response = np.where(np.arange(TR)[None, :] == lengths - 1, EOS,
                      rng.integers(4, 14, size=(P, TR)))
  return shd.shard_batch({"prompt_tokens": np.where(mask, tokens, 0), "prompt_mask": mask,
                          "response_tokens": np.where(response_mask, response, 0).astype(np.int32),
                          "response_mask": response_mask}, mesh)


def make_trainer(algorithm, *, devices=1, lr=1e-3, **settings):
  mesh = _mesh(devices)
  tx = optax.adam(lr)
  graphdef, params = _params(0)
  logical = state_lib.abstract_model(lambda: Transformer(CONFIG, rngs=nnx.Rngs(0)))[2]
  state = state_lib.TrainState(np.int32(0), params, tx.init(params))
  shardings = state_lib.state_shardings(jax.eval_shape(lambda: state), logical, mesh)
  reference = jax.device_put(_params(1)[1], shardings.params)
  settings = op.PreferenceSettings(algorithm, loss_kwargs=LOSS_KWARGS[algorithm], **settings)
  trainer = op.OnlinePreferenceTrainer(
      settings, SamplingConfig(max_new_tokens=TR, eos_id=EOS), mesh=mesh,
      policy_graphdef=graphdef, optimizer=tx, state_shardings=shardings,
      reference_params=reference,
      judge=op.bradley_terry_judge(rl.programmatic_reward(digit_fraction),
                                   temperature=JUDGE_TEMPERATURE),
      gold=digit_fraction)
  return trainer, trainer.init_state(jax.device_put(state, shardings)), _prompts(mesh)


def _oracle_logps(params, seqs):
  """Sequence log-probs [B] of the response tokens by a direct softmax (not the library's
  `token_logprobs`): logits at position t - 1 score token t."""
  graphdef, _ = _params(0)
  logits = nnx.merge(graphdef, params)(seqs["tokens"], attention_mask_BxT=seqs["attention_mask"])
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, seqs["tokens"][:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(picked * seqs["loss_mask"][:, 1:], axis=-1)


# online_ipo trains on soft labels (the paper's form), the others on labels drawn from p.
LABEL_MODES = {"online_ipo": "probability"}


def _oracle_loss(algorithm, params, reference, previous, first, second, p, first_wins):
  """The algorithm's loss from `rlhfjax.losses`, with every log-prob computed here."""
  kw = LOSS_KWARGS[algorithm]
  if algorithm == "nash_md_pg":
    return jnp.mean(losses.nash_md_pg(_oracle_logps(params, first),
                                      _oracle_logps(reference, first), p, **kw))
  pick = lambda a, b: jnp.where(first_wins, a, b)
  lp = [_oracle_logps(x, s) for x in (params, reference, previous) for s in (first, second)]
  (pc, pr), (rc, rr), (qc, qr) = [(pick(a, b), pick(b, a)) for a, b in zip(lp[::2], lp[1::2])]
  if algorithm == "online_dpo":
    per_pair = losses.dpo(pc, pr, rc, rr, **kw)
  elif algorithm == "online_ipo":  # Weighted by p and 1 - p: the order is irrelevant.
    per_pair = losses.online_ipo(lp[0], lp[1], lp[2], lp[3], p, **kw)
  elif algorithm == "ipo_md":
    per_pair = losses.online_ipo(pc, pr, rc, rr, jnp.ones_like(pc), **kw)
  elif algorithm == "spin":
    per_pair = losses.spin(pc, pr, qc, qr, **kw)
  else:
    per_pair = losses.inpo(pc, pr, rc, rr, qc, qr, **kw)
  return jnp.mean(per_pair)


@pytest.mark.parametrize("algorithm", op.ALGORITHMS)
def test_step_equals_loss_on_judged_pairs(algorithm):
  trainer, state, prompts = make_trainer(algorithm,
                                         labels=LABEL_MODES.get(algorithm, "sampled"))
  rng = jax.random.key(3)
  generation, batch, _ = trainer.judged_batch(state, prompts, rng)
  gen = jax.device_get(generation)
  params = jax.device_get(state.policy.params)
  reference = jax.device_get(trainer.reference_params)
  previous = params if state.previous is None else jax.device_get(state.previous)
  first, second = (to_sequences(gen.prompt_tokens, gen.prompt_mask, side)
                   for side in (gen.first, gen.second))
  if algorithm == "spin":  # chosen = the demonstration, always.
    np.testing.assert_array_equal(gen.first.tokens_BxTr, prompts["response_tokens"])
    p = np.ones(P, np.float32)
  else:
    # The judge is Bradley-Terry on the reward at temperature T.
    r1, r2 = (digit_fraction(gen.prompt_tokens, gen.prompt_mask, s.tokens_BxTr, s.mask_BxTr)
              for s in (gen.first, gen.second))
    p = jax.nn.sigmoid((r1 - r2) / JUDGE_TEMPERATURE)
  first_wins = jax.random.uniform(jax.random.split(rng)[1], (P,)) < p
  if algorithm == "online_ipo":  # Soft labels: ordered by the judge, weighted by P(chosen).
    first_wins = p >= 0.5
    np.testing.assert_allclose(batch["chosen_weight"], np.maximum(p, 1 - p), rtol=1e-6)
  if algorithm == "nash_md_pg":
    np.testing.assert_allclose(batch["preference_probs"], p, rtol=1e-6)
  else:
    assert 0 < np.mean(first_wins) < 1 or algorithm in ("spin", "online_ipo")
    np.testing.assert_array_equal(batch["chosen_tokens"],
                                  np.where(first_wins[:, None], first["tokens"], second["tokens"]))

  oracle = jax.jit(jax.value_and_grad(functools.partial(_oracle_loss, algorithm)))
  value, grads = oracle(params, reference, previous, first, second, p, first_wins)
  _, metrics = trainer.step(state.policy, batch)
  np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["grad_norm"], optax.global_norm(grads), rtol=1e-4)
  assert float(metrics["grad_norm"]) > 0


def test_mixture_endpoint_is_the_reference():
  # Nash-MD-PG: y ~ pi, y' ~ pi^(1-b) mu^b; at b = 1 the mixture is mu exactly (same rng).
  trainer, state, prompts = make_trainer("nash_md_pg", mixture_coef=1.0)
  rng = jax.random.key(5)
  gen = trainer.generate(state.policy.params, trainer.reference_params, None, prompts, rng)
  first_key, second_key = jax.random.split(rng)
  sample = make_sampler(_params(0)[0], trainer.sampling)
  alone = sample(trainer.reference_params, prompts["prompt_tokens"], prompts["prompt_mask"],
                 second_key)
  np.testing.assert_array_equal(gen.second.tokens_BxTr, alone.tokens_BxTr)
  np.testing.assert_array_equal(gen.second.mask_BxTr, alone.mask_BxTr)
  policy = sample(state.policy.params, prompts["prompt_tokens"], prompts["prompt_mask"],
                  first_key)
  np.testing.assert_array_equal(gen.first.tokens_BxTr, policy.tokens_BxTr)
  # The two models differ, so the endpoints are distinguishable.
  other = sample(state.policy.params, prompts["prompt_tokens"], prompts["prompt_mask"],
                 second_key)
  assert np.any(np.asarray(other.tokens_BxTr) != np.asarray(alone.tokens_BxTr))


def test_ipo_md_samples_both_sides_from_the_mixture_on_repeated_prompts():
  # IPO-MD: both sides ~ pi^(1-b) mu^b; at b = 1 each is the reference's sample with its key, on
  # each prompt repeated K times (prompt-major).
  k = 2
  trainer, state, prompts = make_trainer("ipo_md", mixture_coef=1.0, pairs_per_prompt=k)
  rng = jax.random.key(6)
  gen = trainer.generate(state.policy.params, trainer.reference_params, None, prompts, rng)
  repeated = {n: np.repeat(np.asarray(prompts[n]), k, axis=0)
              for n in ("prompt_tokens", "prompt_mask")}
  np.testing.assert_array_equal(gen.prompt_tokens, repeated["prompt_tokens"])
  np.testing.assert_array_equal(gen.prompt_mask, repeated["prompt_mask"])
  sample = make_sampler(_params(0)[0], trainer.sampling)
  for side, key in zip((gen.first, gen.second), jax.random.split(rng)):
    alone = sample(trainer.reference_params, repeated["prompt_tokens"], repeated["prompt_mask"],
                   key)
    np.testing.assert_array_equal(side.tokens_BxTr, alone.tokens_BxTr)
    np.testing.assert_array_equal(side.mask_BxTr, alone.mask_BxTr)
    policy = sample(state.policy.params, repeated["prompt_tokens"], repeated["prompt_mask"], key)
    assert np.any(np.asarray(policy.tokens_BxTr) != np.asarray(alone.tokens_BxTr))


def test_iteration_takes_steps_per_iteration_steps_on_one_judged_batch():
  trainer, state, prompts = make_trainer("online_ipo", steps_per_iteration=3, lr=1e-2)
  rng = jax.random.key(4)
  _, batch, _ = trainer.judged_batch(state, prompts, rng)
  policy, losses_ = jax.tree.map(lambda x: x.copy(), state.policy), []
  for _ in range(3):
    policy, metrics = trainer.step(policy, batch)
    losses_.append(float(metrics["loss"]))
  assert len(set(losses_)) == 3  # The steps move the policy: the mean is not any one of them.
  new_state, metrics = trainer.iterate(state, prompts, rng)
  assert int(new_state.policy.step) == 3 and int(new_state.iteration) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(policy.params),
               jax.device_get(new_state.policy.params))
  np.testing.assert_allclose(metrics["loss"], np.mean(losses_), rtol=1e-6)


def test_previous_iterate_refreshes_every_k_iterations():
  trainer, state, prompts = make_trainer("spin", refresh_every=2, lr=1e-2)
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))))
  initial = jax.device_get(state.policy.params)
  refreshed, policies = [], []
  for i in range(3):
    if i == 2:  # SPIN's reference log-probs in iteration 3 are those of the refreshed pi_t.
      _, batch, _ = trainer.judged_batch(state, prompts, jax.random.key(10 + i))
      rejected = {k: batch[f"rejected_{k}"] for k in ("tokens", "attention_mask", "loss_mask")}
      np.testing.assert_allclose(batch["reference_rejected_logps"],
                                 _oracle_logps(policies[1], rejected), rtol=1e-5, atol=1e-5)
    state, metrics = trainer.iterate(state, prompts, jax.random.key(10 + i))
    refreshed.append(metrics["refreshed"])
    policies.append(jax.device_get(state.policy.params))
    if i == 0:
      assert same(state.previous, initial) and not same(state.previous, policies[0])
  assert refreshed == [0.0, 1.0, 0.0]
  assert same(state.previous, policies[1]) and not same(state.previous, policies[2])
  assert int(state.iteration) == 3 and int(state.policy.step) == 3


def test_one_device_equals_eight_devices():
  out = {}
  for devices in (1, 8):
    trainer, state, prompts = make_trainer("ipo_md", devices=devices, mixture_coef=0.25)
    state, metrics = trainer.iterate(state, prompts, jax.random.key(7))
    out[devices] = (jax.device_get(state.policy.params), metrics)
  (params1, m1), (params8, m8) = out[1], out[8]
  for key in ("loss", "grad_norm", "margin", "chosen_prob", "first_gold_reward"):
    np.testing.assert_allclose(m1[key], m8[key], rtol=1e-4, atol=1e-6, err_msg=key)
  # Adam turns float noise in tiny gradients into lr-sized steps: agree to a fraction of one.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-4),
               params1, params8)


@pytest.mark.parametrize("kwargs, message", [
    (dict(algorithm="ppo"), "algorithm must be one of"),
    (dict(algorithm="online_dpo", labels="probability"), "soft labels"),
    (dict(algorithm="online_dpo", labels="hard"), "labels must be one of"),
    (dict(algorithm="inpo", loss_kwargs={"tau": 0.5, "eta": 0.1}), "tau <= eta"),
    (dict(algorithm="ipo_md", mixture_coef=1.5), "mixture_coef"),
    (dict(algorithm="spin", loss_kwargs={"tau": 0.1}), "unknown keys"),
    (dict(algorithm="spin", refresh_every=0), "refresh_every"),
])
def test_bad_settings_name_the_problem(kwargs, message):
  with pytest.raises(ValueError, match=message):
    op.PreferenceSettings(**kwargs)


def test_preference_model_judge_is_antisymmetric():
  with nnx.use_eager_sharding(False):
    graphdef, params = nnx.split(Transformer(CONFIG, rngs=nnx.Rngs(2), score_head=True))
  judge = jax.jit(op.preference_model_judge(graphdef))
  prompts = jax.device_get(_prompts(_mesh(1)))
  rng = np.random.default_rng(1)
  tokens = rng.integers(4, 14, size=(P, TR)).astype(np.int32)
  mask = np.ones((P, TR), np.int32)
  args = (prompts["prompt_tokens"], prompts["prompt_mask"])
  ab = judge(params, *args, prompts["response_tokens"], prompts["response_mask"], tokens, mask)
  ba = judge(params, *args, tokens, mask, prompts["response_tokens"], prompts["response_mask"])
  np.testing.assert_allclose(ab + ba, 1.0, atol=1e-6)
  assert np.ptp(np.asarray(ab)) > 0
  # P(first > second) = sigma((s[x, y, y'] - s[x, y', y]) / 2), each the score at the last token
  # of the gap-free concatenation (left-padded), written out here row by row.
  from rlhfjax.models import last_token_scores
  model = nnx.merge(graphdef, params)
  first = [[t for t, m in zip(row, mask) if m] for row, mask in zip(
      prompts["response_tokens"], prompts["response_mask"])]
  second = [list(row) for row in tokens]
  prompt = [[t for t, m in zip(row, mask) if m] for row, mask in zip(*args)]

  def score(a, b):
    rows = [x + y + z for x, y, z in zip(prompt, a, b)]
    width = max(map(len, rows))
    t = jnp.asarray([[0] * (width - len(r)) + r for r in rows], jnp.int32)
    m = jnp.asarray([[0] * (width - len(r)) + [1] * len(r) for r in rows], jnp.int32)
    return last_token_scores(model.scores(t, attention_mask_BxT=m), m)

  expected = jax.nn.sigmoid(losses.antisymmetrize(score(first, second), score(second, first)))
  np.testing.assert_allclose(ab, expected, rtol=1e-4, atol=1e-5)


def test_default_labels_are_soft_for_ipo_and_drawn_for_the_others():
  assert op.PreferenceSettings("online_ipo").labels == "probability"
  assert op.PreferenceSettings("ipo_md").labels == "probability"
  assert op.PreferenceSettings("online_dpo").labels == "sampled"
