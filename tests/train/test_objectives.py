"""Trainer objectives: reward model and preference steps on 1 vs 8 devices, reference modes,
the DPO loss at the reference, parameter merging, and gradient accumulation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhfjax import data as data_lib
from rlhfjax import losses
from rlhfjax import sharding as shd
from rlhfjax.models import Transformer, get_config
from rlhfjax.train import objectives, optimizers
from rlhfjax.train import state as state_lib
from rlhfjax.train import steps as steps_lib
from tests.train.toy import ToyLM, toy_batch, toy_loss

PROMPT_LEN, RESPONSE_LEN = 6, 9


@functools.cache
def pair_batch(n=8):
  config = data_lib.PreferenceTaskConfig(num_sft=0, num_pairs=n, num_test=0)
  examples = data_lib.generate_preference(config, "pairs")
  return data_lib.preference_batch(examples, prompt_len=PROMPT_LEN, response_len=RESPONSE_LEN)


def build(score_head=False, seed=0):
  # One layer keeps compilation (the slow part on CPU) short; the objectives do not depend on depth.
  config = get_config("tiny", num_layers=1)
  return lambda: Transformer(config, rngs=nnx.Rngs(seed), score_head=score_head)


def _train(mesh, loss_fn, *, score_head=False, with_reference=False, steps=2):
  # SGD: parameter differences then scale with gradient differences (Adam's normalisation
  # would amplify float noise in near-zero gradients).
  tx = optax.sgd(0.5)
  graphdef, state, shardings = state_lib.init_train_state(build(score_head), tx, mesh)
  frozen, frozen_sh = (), ()
  if with_reference:
    _, ref, ref_sh = state_lib.frozen_params(build(seed=1), mesh)
    frozen, frozen_sh = (ref,), (ref_sh,)
  step = steps_lib.make_train_step(loss_fn(graphdef), tx, graphdef, mesh, shardings, frozen_sh)
  losses_ = []
  for _ in range(steps):
    state, metrics = step(state, shd.shard_batch(pair_batch(), mesh), *frozen)
    losses_.append(float(metrics["loss"]))
  return losses_, jax.device_get(state.params)


@pytest.mark.parametrize("name", ["reward_model", "dpo"])
def test_one_device_equals_eight_devices(name):
  if name == "reward_model":
    kwargs = dict(loss_fn=lambda g: objectives.make_reward_model_loss(), score_head=True)
  else:
    kwargs = dict(loss_fn=lambda g: objectives.make_preference_loss(
        "dpo", {"beta": 0.1}, reference_graphdef=g), with_reference=True)
  one = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  l1, p1 = _train(one, **kwargs)
  l8, p8 = _train(shd.make_mesh(2, 2, 2), **kwargs)
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p8)
  assert l1[1] < l1[0]


def _model(score_head=False, seed=0):
  with nnx.use_eager_sharding(False):
    return build(score_head, seed)()


def test_dpo_at_the_reference_is_log2_and_precomputed_matches_on_the_fly():
  policy, other = _model(seed=0), _model(seed=1)
  graphdef, ref_params = nnx.split(other)
  batch = jax.tree.map(jnp.asarray, pair_batch())
  on_the_fly = objectives.make_preference_loss("dpo", {"beta": 0.1}, reference_graphdef=graphdef)
  pre = objectives.make_preference_loss("dpo", {"beta": 0.1}, reference="precomputed")
  batch_pre = {**batch, **objectives.reference_logps(other, batch)}
  l1, m1 = on_the_fly(policy, batch, ref_params)
  l2, m2 = pre(policy, batch_pre)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  np.testing.assert_allclose(m1["margin"], m2["margin"], rtol=1e-5, atol=1e-6)
  # Policy == reference: h = 0 for every pair, so DPO = log 2 (ALGORITHMS.md §3).
  same, _ = on_the_fly(other, batch, ref_params)
  np.testing.assert_allclose(same, np.log(2.0), rtol=1e-6)


def test_preference_loss_equals_library_loss_on_model_logps():
  policy, ref = _model(seed=0), _model(seed=1)
  graphdef, ref_params = nnx.split(ref)
  batch = jax.tree.map(jnp.asarray, pair_batch())

  def logps(model, side):
    logits = model(batch[f"{side}_tokens"], attention_mask_BxT=batch[f"{side}_attention_mask"])
    return losses.sequence_logprobs(losses.token_logprobs(logits, batch[f"{side}_tokens"]),
                                    batch[f"{side}_loss_mask"])

  args = (logps(policy, "chosen"), logps(policy, "rejected"), logps(ref, "chosen"),
          logps(ref, "rejected"))
  # Response lengths of each side (they differ pair by pair in this batch).
  lengths, rejected_lengths = (batch[f"{side}_loss_mask"].sum(-1).astype(jnp.float32)
                               for side in ("chosen", "rejected"))
  assert np.any(lengths != rejected_lengths)
  policy_args, both_lengths = args[:2], (lengths, rejected_lengths)
  for kind, kwargs, expected in [
      ("ipo", {"tau": 0.1}, losses.ipo(*args, tau=0.1)),
      ("ipo", {"tau": 0.1, "length_normalize": True},
       losses.ipo(*args, tau=0.1, length_normalize=True, chosen_lengths=lengths,
                  rejected_lengths=rejected_lengths)),
      ("cdpo", {"beta": 0.2, "label_smoothing": 0.1},
       losses.cdpo(*args, beta=0.2, label_smoothing=0.1)),
      ("rpo", {"beta": 0.1, "eta": 0.5},
       losses.rpo(*args, beta=0.1, eta=0.5, chosen_lengths=lengths)),
      ("simpo", {"beta": 2.0, "gamma": 0.5},
       losses.simpo(*policy_args, *both_lengths, beta=2.0, gamma=0.5)),
      ("orpo", {"lam": 0.1}, losses.orpo(*policy_args, *both_lengths, lam=0.1)),
  ]:
    got, _ = objectives.make_preference_loss(kind, kwargs, reference_graphdef=graphdef)(
        policy, batch, ref_params)
    np.testing.assert_allclose(got, jnp.mean(expected), rtol=1e-5)


def test_reward_model_loss_is_bradley_terry_of_last_token_scores():
  model = _model(score_head=True)
  batch = jax.tree.map(jnp.asarray, pair_batch())
  got, metrics = objectives.make_reward_model_loss()(model, batch)
  r = {}
  for side in ("chosen", "rejected"):
    scores = model.scores(batch[f"{side}_tokens"],
                          attention_mask_BxT=batch[f"{side}_attention_mask"])
    last = batch[f"{side}_attention_mask"].shape[1] - 1 - jnp.argmax(
        batch[f"{side}_attention_mask"][:, ::-1], axis=1)
    r[side] = scores[jnp.arange(scores.shape[0]), last]
  np.testing.assert_allclose(got, jnp.mean(-jax.nn.log_sigmoid(r["chosen"] - r["rejected"])),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], jnp.mean(r["chosen"] > r["rejected"]))


@pytest.mark.parametrize("kind, aggregation", [("cross_entropy", "seq_mean_token_sum"),
                                               ("gem", "seq_mean_token_mean")])
def test_sft_loss_is_the_library_loss_on_model_logits(kind, aggregation):
  """make_sft_loss hands the model's logits, the tokens and the response mask to the named loss
  with its aggregation (and GEM's beta and h)."""
  model = _model()
  batch = dict(zip(("tokens", "attention_mask", "loss_mask"),
                   objectives.pair_fields(jax.tree.map(jnp.asarray, pair_batch()), "chosen")))
  logits = model(batch["tokens"], attention_mask_BxT=batch["attention_mask"])
  if kind == "gem":
    want, _ = losses.gem(logits, batch["tokens"], batch["loss_mask"], aggregation=aggregation,
                         beta=0.5, h="linear")
    loss_fn = objectives.make_sft_loss("gem", aggregation=aggregation, gem_beta=0.5,
                                       gem_h="linear")
  else:
    want, _ = losses.cross_entropy(logits, batch["tokens"], batch["loss_mask"],
                                   aggregation=aggregation)
    loss_fn = objectives.make_sft_loss(aggregation=aggregation)
  got, _ = loss_fn(model, batch)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  default, _ = losses.cross_entropy(logits, batch["tokens"], batch["loss_mask"])
  assert abs(float(want) - float(default)) > 1e-3  # The settings matter on this batch.


def test_bad_objective_settings_raise():
  with pytest.raises(ValueError, match="preference loss must be one of"):
    objectives.make_preference_loss("kto")
  with pytest.raises(ValueError, match="reference_graphdef"):
    objectives.make_preference_loss("dpo")
  with pytest.raises(ValueError, match="reference must be one of"):
    objectives.make_preference_loss("dpo", reference="cached")
  with pytest.raises(ValueError, match="sft loss"):
    objectives.make_sft_loss("kl")


def test_merge_params_keeps_new_heads_and_rejects_other_models():
  rm = nnx.split(_model(score_head=True))[1].to_pure_dict()
  policy = nnx.split(_model(seed=3))[1].to_pure_dict()
  merged = state_lib.merge_params(rm, policy)
  np.testing.assert_array_equal(merged["embed_tokens"]["embedding"],
                                policy["embed_tokens"]["embedding"])
  np.testing.assert_array_equal(merged["score_head"]["kernel"], rm["score_head"]["kernel"])
  wrong = jax.tree.map(lambda x: x, policy)
  wrong["norm"]["scale"] = jnp.ones(3)
  with pytest.raises(ValueError, match="/norm/scale has shape"):
    state_lib.merge_params(rm, wrong)
  with pytest.raises(ValueError, match="/score_head"):
    state_lib.merge_params(policy, rm)


@pytest.mark.parametrize("objective", ["sft", "dapo", "grpo"])
def test_gradient_accumulation_equals_full_batch(objective):
  """One step of 2 accumulated micro-batches whose rows hold different numbers of response tokens
  (one none) = one step on the whole batch (SGD: the update is the gradient), through the weights
  the objectives report: tokens for SFT and DAPO (token mean), non-empty rows for GRPO (sequence
  mean). Without them the micro-batches' token means would be averaged with equal weights."""
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  batch = _pg_batch()
  mask = np.asarray(batch["loss_mask"]).copy()
  mask[0] = 0  # An empty row.
  mask[1, :-2] = 0  # Two tokens.
  batch = {**batch, "loss_mask": jnp.asarray(mask)}
  if objective == "sft":
    loss_fn, frozen, frozen_shardings = objectives.make_sft_loss(), (), ()
  else:
    loss_fn = objectives.make_policy_gradient_loss(objective, group_size=2)
    frozen, frozen_shardings = ({"beta": jnp.float32(0.04)},), ({"beta": shd.replicated(mesh)},)
  results = []
  for k in (1, 2):
    tx = optax.sgd(1.0)
    graphdef, state, shardings = state_lib.init_train_state(build(), tx, mesh)
    step = steps_lib.make_train_step(loss_fn, tx, graphdef, mesh, shardings, frozen_shardings,
                                     accumulation_steps=k, accumulation_unit=2)
    state, metrics = step(state, shd.shard_batch(batch, mesh), *frozen)
    results.append((jax.device_get(state.params), float(metrics["loss"])))
  (params1, loss1), (params2, loss2) = results
  np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params2,
               params1)


# -- Chunked log-probs: every objective equals its full-logits path ------------------------------


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_output_kernel_is_what_unembed_multiplies_by(tie_embeddings):
  config = get_config("tiny", num_layers=1, tie_embeddings=tie_embeddings)
  with nnx.use_eager_sharding(False):
    model = Transformer(config, rngs=nnx.Rngs(0))
  h = jax.random.normal(jax.random.key(0), (2, 3, config.hidden_size))
  w = objectives.output_kernel(model)
  assert w.shape == (config.hidden_size, config.vocab_size)
  np.testing.assert_allclose(model.unembed(h), h @ w, rtol=1e-5, atol=1e-6)


def _pg_batch(seed=0):
  """An online batch on the preference data's chosen side: random old / reference log-probs on
  the response, random advantages [B]."""
  pairs = jax.tree.map(jnp.asarray, pair_batch())
  tokens, attention_mask, loss_mask = objectives.pair_fields(pairs, "chosen")
  rng = np.random.default_rng(seed)
  logps = lambda: jnp.asarray(rng.normal(-3.0, 0.5, tokens.shape), jnp.float32) * loss_mask
  return {"tokens": tokens, "attention_mask": attention_mask, "loss_mask": loss_mask,
          "logp_old": logps(), "logp_ref": logps(),
          "advantages": jnp.asarray(rng.standard_normal(tokens.shape[0]), jnp.float32)}


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_sum"])
def test_value_loss_is_the_clipped_value_loss_of_the_scores_before_each_token(mode):
  """make_value_loss = `losses.clipped_value_loss` of V_t = the score head at position t - 1,
  aggregated in its mode with that mode's loss weight, clipping at its eps_v."""
  model = _model(score_head=True)
  batch = _pg_batch()
  mask = batch["loss_mask"]
  scores = model.scores(batch["tokens"], attention_mask_BxT=batch["attention_mask"])
  values = jnp.concatenate([jnp.zeros_like(scores[:, :1]), scores[:, :-1]], axis=1)
  rng = np.random.default_rng(1)
  noise = lambda scale: jnp.asarray(rng.normal(0.0, scale, mask.shape), jnp.float32)
  batch = {**batch, "values": (values + noise(0.1)) * mask, "returns": noise(1.0) * mask}
  got, metrics = objectives.make_value_loss(eps_v=0.05, mode=mode)(model, batch)
  per_token, clipped = losses.clipped_value_loss(values, batch["values"], batch["returns"], mask,
                                                 eps_v=0.05)
  np.testing.assert_allclose(got, losses.aggregate(per_token, mask, mode), rtol=1e-5)
  np.testing.assert_allclose(metrics[losses.LOSS_WEIGHT], losses.aggregation_weight(mask, mode))
  np.testing.assert_allclose(metrics["value_clip_frac"], losses.masked_mean(clipped, mask),
                             rtol=1e-5)
  assert 0 < metrics["value_clip_frac"] < 1  # Both branches occur.


@functools.cache
def _policy_and_reference():
  """(graphdef, params) of a policy and of a reference (shared by the tests that only read them:
  eager initialisation is slow on CPU)."""
  return nnx.split(_model(seed=0)), nnx.split(_model(seed=1))


def _objective_cases(ref_graphdef, ref_params):
  """name -> (make_loss(logits_chunk_size), batch, frozen args)."""
  pairs = jax.tree.map(jnp.asarray, pair_batch())
  sft_batch = dict(zip(("tokens", "attention_mask", "loss_mask"),
                       objectives.pair_fields(pairs, "chosen")))
  return {
      "sft_cross_entropy": (lambda c: objectives.make_sft_loss(logits_chunk_size=c),
                            sft_batch, ()),
      "dpo_on_the_fly": (lambda c: objectives.make_preference_loss(
          "dpo", {"beta": 0.1}, reference_graphdef=ref_graphdef, logits_chunk_size=c),
                         pairs, (ref_params,)),
      "grpo": (lambda c: objectives.make_policy_gradient_loss("grpo", logits_chunk_size=c),
               _pg_batch(), ({"beta": jnp.float32(0.04)},)),
  }


def test_chunked_objectives_equal_full_logits_objectives():
  """Loss and metrics of the SFT, DPO and GRPO objectives with logits_chunk_size = 4 (which does
  not divide the T - 1 = 14 scored positions) equal the full-logits objective; for DPO on the fly
  (policy and reference both chunked) the parameter gradients too. The losses' own tests compare
  gradients w.r.t. hidden states and kernel for every chunked loss, GEM's included."""
  (graphdef, params), (ref_graphdef, ref_params) = _policy_and_reference()
  for name, (make_loss, batch, frozen) in _objective_cases(ref_graphdef, ref_params).items():
    def run(chunk, make_loss=make_loss, batch=batch, frozen=frozen):
      loss_fn = make_loss(chunk)
      f = lambda p: loss_fn(nnx.merge(graphdef, p), batch, *frozen)
      if name == "dpo_on_the_fly":
        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)
      return jax.jit(f)(params), None

    (loss, metrics), grads = run(4)
    (want_loss, want_metrics), want_grads = run(None)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6, err_msg=name)
    assert metrics.keys() == want_metrics.keys()
    for k in metrics:
      np.testing.assert_allclose(metrics[k], want_metrics[k], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{name} {k}")
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), grads,
                 want_grads)


def test_fused_token_stats_equal_one_pass_per_model():
  (graphdef, params), (_, ref_params) = _policy_and_reference()
  tokens, attention_mask, _ = objectives.pair_fields(jax.tree.map(jnp.asarray, pair_batch()),
                                                     "chosen")
  want = jax.device_get(jax.jit(lambda: [
      objectives.token_stats(nnx.merge(graphdef, p), tokens, attention_mask, with_entropy=True)
      for p in (params, ref_params)])())
  for chunk in (None, 4):
    got = jax.device_get(jax.jit(lambda chunk=chunk: objectives.fused_token_stats(
        graphdef, (params, ref_params), tokens, attention_mask, with_entropy=True,
        logits_chunk_size=chunk))())
    for g, w in zip(got, want, strict=True):
      np.testing.assert_allclose(g.logp, w.logp, rtol=1e-5, atol=1e-5, err_msg=str(chunk))
      np.testing.assert_allclose(g.entropy, w.entropy, rtol=1e-5, atol=1e-5, err_msg=str(chunk))
  assert not np.allclose(want[0].logp, want[1].logp)  # Two different models.
  with nnx.use_eager_sharding(False):
    _, wider = nnx.split(Transformer(get_config("tiny", num_layers=1, mlp_dim=8),
                                     rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="one structure and shapes"):
    objectives.fused_token_stats(graphdef, (params, wider), tokens, attention_mask)


def test_rollout_scores_with_chunked_logprobs_equal_full_logits():
  from rlhfjax.sampling import SampleOutput  # pylint: disable=g-import-not-at-top
  from rlhfjax.sampling import SamplingConfig  # pylint: disable=g-import-not-at-top
  from rlhfjax.train import rollout as rl  # pylint: disable=g-import-not-at-top

  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  (graphdef, params), (_, ref_params) = _policy_and_reference()
  reward = rl.programmatic_reward(lambda pt, pm, rt, rm: rm.sum(-1).astype(jnp.float32))
  make = lambda chunk: rl.Rollouts(
      graphdef, SamplingConfig(max_new_tokens=RESPONSE_LEN, eos_id=2), mesh=mesh, group_size=1,
      reward=reward, logits_chunk_size=chunk)
  # The preference data's chosen responses stand in for samples (no sampler to compile).
  pairs = jax.tree.map(jnp.asarray, pair_batch())
  prompt = (pairs["chosen_tokens"][:, :PROMPT_LEN], pairs["chosen_attention_mask"][:, :PROMPT_LEN])
  response_mask = pairs["chosen_loss_mask"][:, PROMPT_LEN:]
  zeros = jnp.zeros(response_mask.shape, jnp.float32)
  sample = SampleOutput(pairs["chosen_tokens"][:, PROMPT_LEN:], response_mask, zeros, zeros,
                        response_mask.sum(-1))
  generation = rl.Generation(*prompt, sample, None, *prompt)
  got = make(3).score(generation, params, ref_params, None, None)
  want = make(None).score(generation, params, ref_params, None, None)
  for field in ("logp_old", "logp_ref", "entropy"):
    np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-5,
                               err_msg=field)
  assert np.any(np.asarray(want.logp_ref) != 0.0)
  with pytest.raises(ValueError, match="logits_chunk_size"):
    make(0)
