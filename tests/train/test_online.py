"""The online RL loop: 1 vs 8 devices, no recompilation, advantages and losses wired for every
algorithm, a short run that raises the reward, the PPO critic, and the coefficient controllers."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhfjax import losses
from rlhfjax import sharding as shd
from rlhfjax.models import Transformer, get_config
from rlhfjax.sampling import SamplingConfig
from rlhfjax.train import Checkpointer, LoopSettings
from rlhfjax.train import objectives
from rlhfjax.train import online
from rlhfjax.train import rollout as rl
from rlhfjax.train import state as state_lib
from rlhfjax.train.metrics import read_jsonl
from tests.compiles import count_compiles

CONFIG = get_config("tiny", num_layers=1)
EOS = 2
P, G, TP, TR = 8, 4, 4, 6


def digit_fraction(prompt_tokens, prompt_mask, response_tokens, response_mask):
  """Reward of the tiny problem: the fraction of response tokens that are digits (ids 4..13)."""
  del prompt_tokens, prompt_mask
  digit = (response_tokens >= 4) & (response_tokens < 14)
  return losses.masked_mean(digit.astype(jnp.float32), response_mask, axis=-1)


def _prompts(mesh):
  rng = np.random.default_rng(0)
  tokens = rng.integers(14, 40, size=(P, TP)).astype(np.int32)
  mask = (np.arange(TP)[None, :] >= rng.integers(0, TP, size=(P, 1))).astype(np.int32)
  return shd.shard_batch({"prompt_tokens": np.where(mask, tokens, 0), "prompt_mask": mask}, mesh)


@functools.cache
def _initial_params(score_head):
  """Host params of the tiny model, initialised eagerly once (a jit of the initialiser costs more
  compile time than these tests spend elsewhere)."""
  with nnx.use_eager_sharding(False):
    model = Transformer(CONFIG, rngs=nnx.Rngs(int(score_head)), score_head=score_head)
  graphdef, params = nnx.split(model)
  return graphdef, jax.device_get(params.to_pure_dict())


def _train_state(score_head, tx, mesh):
  """(graphdef, sharded TrainState, shardings) from `_initial_params`, like `init_train_state`."""
  graphdef, params = _initial_params(score_head)
  logical = state_lib.abstract_model(
      lambda: Transformer(CONFIG, rngs=nnx.Rngs(0), score_head=score_head))[2]
  state = state_lib.TrainState(np.int32(0), params, tx.init(params))
  shardings = state_lib.state_shardings(jax.eval_shape(lambda: state), logical, mesh)
  return graphdef, jax.device_put(state, shardings), shardings


def make_trainer(mesh, algorithm="grpo", *, num_epochs=2, num_minibatches=2, lr=3e-3,
                 rollout_kwargs=None, **kwargs):
  tx = optax.adam(lr)
  graphdef, state, shardings = _train_state(False, tx, mesh)
  ref = jax.device_put(_initial_params(False)[1], shardings.params)  # The reference: a copy.
  settings = online.OnlineSettings(algorithm, group_size=G, num_epochs=num_epochs,
                                   num_minibatches=num_minibatches, **kwargs)
  critic = critic_state = value_graphdef = None
  if settings.needs_critic:
    critic_tx = optax.adam(1e-2)
    value_graphdef, critic_state, critic_shardings = _train_state(True, critic_tx, mesh)
    critic = online.CriticSetup(value_graphdef, critic_tx, critic_shardings)
  rollouts = rl.Rollouts(graphdef, SamplingConfig(max_new_tokens=TR, eos_id=EOS), mesh=mesh,
                         group_size=G, reward=rl.programmatic_reward(digit_fraction),
                         greedy_baseline=settings.greedy_baseline, value_graphdef=value_graphdef,
                         **(rollout_kwargs or {}))
  trainer = online.OnlineTrainer(settings, rollouts, mesh=mesh, policy_graphdef=graphdef,
                                 optimizer=tx, state_shardings=shardings, reference_params=ref,
                                 critic=critic)
  return trainer, trainer.init_state(state, critic_state)


BETA0, KL_TARGET, KL_HORIZON = 0.1, 0.5, 100.0


@functools.cache
def ppo_runs():
  """One PPO iteration (2 epochs x 2 minibatches, critic, adaptive KL) on 1 and on 8 devices."""
  out = {}
  for name, mesh in (("one", shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])),
                     ("eight", shd.make_mesh(2, 2, 2))):
    trainer, state = make_trainer(mesh, "ppo", beta=BETA0, kl_target=KL_TARGET,
                                  kl_horizon=KL_HORIZON)
    prompts = _prompts(mesh)
    first = jax.device_get(trainer.rollout(state, prompts, jax.random.key(0)))
    initial_critic = jax.device_get(state.critic.params)
    initial_state = jax.tree.map(lambda x: x.copy(), state)  # `iterate` donates `state`.
    state, metrics = trainer.iterate(state, prompts, jax.random.key(0))
    out[name] = dict(trainer=trainer, state=state, metrics=metrics, prompts=prompts,
                     first_rollout=first, initial_critic=initial_critic,
                     initial_state=initial_state, beta_after=float(state.kl.beta))
  return out


def test_one_device_equals_eight_devices():
  runs = ppo_runs()
  one, eight = runs["one"], runs["eight"]
  np.testing.assert_array_equal(one["first_rollout"].tokens, eight["first_rollout"].tokens)
  for key in ("reward", "kl", "loss", "clip_frac", "entropy", "advantage_abs", "critic_loss",
              "value_mean"):
    np.testing.assert_allclose(one["metrics"][key], eight["metrics"][key], rtol=1e-4, atol=1e-6,
                               err_msg=key)
  # Adam turns float noise in near-zero gradients (reduction order differs across meshes) into
  # lr-sized steps, so parameters agree to a fraction of one update (lr 3e-3), not to 1e-6.
  for part in ("policy", "critic"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-4),
                 jax.device_get(getattr(one["state"], part).params),
                 jax.device_get(getattr(eight["state"], part).params))
  np.testing.assert_allclose(float(one["state"].kl.beta), float(eight["state"].kl.beta),
                             rtol=1e-6)
  assert int(eight["state"].policy.step) == 4  # 2 epochs x 2 minibatches
  assert int(eight["state"].critic.step) == 4
  assert int(eight["state"].iteration) == 1


def test_second_iteration_does_not_recompile():
  run = ppo_runs()["eight"]
  with count_compiles() as events:
    state, metrics = run["trainer"].iterate(run["state"], run["prompts"], jax.random.key(1))
    jax.block_until_ready(state)
  run["state"] = state
  assert events == []
  for phase in ("generate_s", "score_s", "advantage_s", "update_s", "iteration_s"):
    assert metrics[phase] > 0


def test_shared_prompt_packing_trains_like_unpacked_rows():
  """GRPO with packed prompt groups (rollout scoring and both minibatch updates) and with the
  sampler's entropies reaches the same metrics and parameters as the unpacked iteration."""
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  runs = {}
  for shared in (False, True):
    trainer, state = make_trainer(mesh, num_epochs=1, rollout_kwargs=dict(
        shared_prompt=shared, recompute_logprobs=not shared))
    state, metrics = trainer.iterate(state, _prompts(mesh), jax.random.key(0))
    runs[shared] = metrics, jax.device_get(state.policy.params)
  (plain, plain_params), (packed, packed_params) = runs[False], runs[True]
  for key in ("reward", "kl", "loss", "entropy", "rollout_entropy", "grad_norm", "logp"):
    np.testing.assert_allclose(packed[key], plain[key], rtol=2e-4, atol=1e-5, err_msg=key)
  # Adam moves every parameter by about lr = 3e-3 whatever its gradient; float noise in the
  # near-zero gradients shows up at 1e-6 to 1e-5 (how the compiler orders the sums): 1% of lr.
  for a, b in zip(jax.tree.leaves(packed_params), jax.tree.leaves(plain_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5)


def test_advantages_and_value_targets_are_gae_of_the_rollout():
  run = ppo_runs()["one"]
  trainer, state = run["trainer"], run["state"]
  rollout = trainer.rollout(state, run["prompts"], jax.random.key(2))
  batch, metrics = trainer.prepare(rollout.batch(), state.kl.beta, state.xi_N)
  r, beta = jax.device_get(rollout), float(state.kl.beta)
  # PPO-RLHF: r_t = -beta k1_t + [t = last] R; GAE with gamma 1, lambda 0.95; whitened.
  token_rewards = losses.ppo_token_rewards(r.rewards, r.logp_old, r.logp_ref, r.loss_mask,
                                           beta=beta)
  advantages, returns = losses.gae(token_rewards, r.values, r.loss_mask, gamma=1.0, lam=0.95)
  np.testing.assert_allclose(batch["returns"], returns, atol=1e-5)
  np.testing.assert_allclose(batch["advantages"], losses.whiten(advantages, r.loss_mask),
                             atol=1e-4)
  np.testing.assert_allclose(metrics["reward"], np.mean(r.rewards), rtol=1e-6)
  k1 = np.where(r.loss_mask, r.logp_old - r.logp_ref, 0.0).sum(-1)
  np.testing.assert_allclose(metrics["kl"], k1.mean(), rtol=1e-5, atol=1e-6)


def test_critic_update_lowers_the_value_loss():
  run = ppo_runs()["one"]
  trainer, state = run["trainer"], run["state"]
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), run["initial_critic"],
                         jax.device_get(state.critic.params))
  assert all(jax.tree.leaves(changed["score_head"]))
  rollout = trainer.rollout(state, run["prompts"], jax.random.key(3))
  batch, _ = trainer.prepare(rollout.batch(), state.kl.beta, state.xi_N)
  minibatch = trainer.take(batch, jnp.arange(P * G // 2, dtype=jnp.int32))
  # A copy: critic steps donate their input state, and the run's state is used by later tests.
  critic = jax.tree.map(lambda x: x.copy(), state.critic)
  critic, m1 = trainer.critic_step(critic, minibatch)
  critic, m2 = trainer.critic_step(critic, minibatch)
  assert float(m2["loss"]) < float(m1["loss"])


def test_adaptive_kl_follows_the_proportional_controller():
  run = ppo_runs()["one"]
  assert run["metrics"]["beta"] == pytest.approx(BETA0)  # The iteration trained with beta_0.
  # Ziegler et al.: beta <- beta (1 + clip(KL / target - 1, +-0.2) n / horizon), n = P G samples.
  error = np.clip(run["metrics"]["kl"] / KL_TARGET - 1.0, -0.2, 0.2)
  np.testing.assert_allclose(run["beta_after"], BETA0 * (1 + error * P * G / KL_HORIZON),
                             rtol=1e-5)
  assert run["beta_after"] != pytest.approx(BETA0)


def test_a_short_run_raises_the_reward():
  run = ppo_runs()["one"]
  trainer, state = run["trainer"], run["state"]
  rewards = [run["metrics"]["reward"]]
  for i in range(1, 10):
    state, metrics = trainer.iterate(state, run["prompts"], jax.random.key(100 + i))
    rewards.append(metrics["reward"])
  run["state"] = state
  # Initial digit fraction ~ 10/64 under the random policy; PPO pushes it up within a few
  # iterations (threshold chosen well below the observed end value of the seeded run).
  assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.1, rewards


class Killed(Exception):
  """Stands for the process dying mid-run."""


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
  # PPO on the (data 2, fsdp 2, tensor 2) mesh with a critic, the adaptive KL controller and two
  # shuffled minibatches per epoch: a checkpoint must hold both TrainStates, beta and the
  # iteration. The runs reuse the compiled trainer and start from copies of its initial state.
  run = ppo_runs()["eight"]
  trainer, mesh = run["trainer"], run["trainer"].mesh
  host = jax.device_get(run["prompts"])
  settings = LoopSettings(num_steps=4, log_every=1, checkpoint_every=2, progress=False)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        run["initial_state"])

  def prompts_at(i):  # Other prompts every iteration.
    return shd.shard_batch({k: np.roll(v, i, axis=0) for k, v in host.items()}, mesh)

  def killed_at_iteration_4(i):  # Iteration 3 is done but not saved: it is replayed.
    if i == 3:
      raise Killed
    return prompts_at(i)

  def train(run_dir, prompts):
    return online.train_online(trainer, jax.tree.map(lambda x: x.copy(), run["initial_state"]),
                               run_dir=str(run_dir), prompts_at=prompts,
                               rng=jax.random.key(7), settings=settings)

  whole, whole_records = train(tmp_path / "whole", prompts_at)
  with pytest.raises(Killed):
    train(tmp_path / "killed", killed_at_iteration_4)
  assert os.listdir(tmp_path / "killed" / "checkpoints") == ["2"]
  resumed, resumed_records = train(tmp_path / "killed", prompts_at)

  assert int(resumed.iteration) == 4 and int(resumed.policy.step) == 16
  assert float(resumed.kl.beta) != pytest.approx(BETA0)  # The controller moved beta.
  leaves = lambda tree: jax.tree.leaves(jax.device_get(tree))
  for a, b in zip(leaves(resumed), leaves(whole), strict=True):
    np.testing.assert_array_equal(a, b)
  # What a restarted process reads back: the final checkpoints are equal too.
  final = [Checkpointer(str(tmp_path / d / "checkpoints")).restore(target, 4)
           for d in ("killed", "whole")]
  for a, b in zip(*map(leaves, final), strict=True):
    np.testing.assert_array_equal(a, b)
  # The restarted run logs iterations 3 and 4 again, as the uninterrupted run did, and its
  # metrics.jsonl reads as one run.
  assert [r["step"] for r in resumed_records] == [3, 4]
  for key in ("reward", "kl", "loss", "critic_loss", "beta"):
    assert [r[key] for r in resumed_records] == [r[key] for r in whole_records[2:]], key
  logged = [r for r in read_jsonl(str(tmp_path / "killed" / "metrics.jsonl"))]
  assert [r["step"] for r in logged] == [1, 2, 3, 4]


# -- Objectives and advantages of every algorithm, on a synthetic batch and a bigram model ------

PB, GB, TPB, TRB, V = 2, 4, 2, 4, 16
BETA = 0.07


class Bigram:
  """logits_t = W[token_t]: a model small enough to differentiate eagerly."""

  def __init__(self, table_VxV):
    self.table_VxV = table_VxV

  @classmethod
  def seeded(cls, seed):
    return cls(0.5 * jax.random.normal(jax.random.key(seed), (V, V)))

  def __call__(self, tokens_BxT, *, attention_mask_BxT=None):
    del attention_mask_BxT
    return self.table_VxV[tokens_BxT]


@functools.cache
def synthetic_batch():
  rng = np.random.default_rng(1)
  b, t = PB * GB, TPB + TRB
  tokens = rng.integers(1, V, size=(b, t)).astype(np.int32)
  lengths = rng.integers(1, TRB + 1, size=b)
  response_mask = (np.arange(TRB)[None, :] < lengths[:, None]).astype(np.int32)
  loss_mask = np.concatenate([np.zeros((b, TPB), np.int32), response_mask], 1)
  old = np.asarray(losses.token_logprobs(Bigram.seeded(0)(tokens), tokens))
  ref = np.asarray(losses.token_logprobs(Bigram.seeded(1)(tokens), tokens))
  rewards = rng.integers(0, 2, size=b).astype(np.float32)
  rewards[:GB] = 1.0  # One group with equal rewards (DAPO drops it).
  batch = dict(
      tokens=tokens, attention_mask=np.ones_like(tokens), loss_mask=loss_mask,
      logp_old=np.where(loss_mask, old, 0.0).astype(np.float32),
      logp_ref=np.where(loss_mask, ref, 0.0).astype(np.float32),
      entropy=np.where(loss_mask, 1.0, 0.0).astype(np.float32), rewards=rewards,
      has_eos=lengths < TRB, lengths=lengths.astype(np.int32),
      sampler_logp=np.where(loss_mask, old, 0.0).astype(np.float32),
      greedy_rewards=rng.uniform(size=b).astype(np.float32),
      values=np.where(loss_mask, rng.normal(size=(b, t)), 0.0).astype(np.float32),
      component_rewards=rng.uniform(size=(b, 2)).astype(np.float32))
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _group_centred(x):
  x = x.reshape(PB, GB)
  return (x - x.mean(1, keepdims=True)).reshape(-1)


def expected_loss(algorithm, logp, b, xi):
  """The loss of each algorithm composed directly from the library's named functions."""
  mask, rewards, old, ref = b["loss_mask"], b["rewards"], b["logp_old"], b["logp_ref"]
  kl_seq = losses.sequence_logprobs(old - ref, mask)
  shaped = rewards - BETA * kl_seq
  if algorithm == "reinforce":
    return losses.reinforce(logp, shaped - shaped.mean(), mask)[0]
  if algorithm == "remax":
    return losses.remax(logp, old, ref, rewards, b["greedy_rewards"], mask, beta=BETA)[0]
  if algorithm == "rloo":
    return losses.rloo(logp, shaped.reshape(PB, GB), mask)[0]
  if algorithm in ("grpo", "dr_grpo", "dapo"):
    adv = losses.grpo_advantages(rewards.reshape(PB, GB),
                                 scale_by_std=algorithm != "dr_grpo").reshape(-1)
    if algorithm == "grpo":
      return losses.grpo(logp, old, ref, adv, mask, beta=BETA)[0]
    if algorithm == "dr_grpo":
      return losses.dr_grpo(logp, old, ref, adv, mask, beta=BETA, max_len=TRB)[0]
    keep = jnp.repeat(losses.dapo_dynamic_sampling_mask(rewards.reshape(PB, GB)), GB)
    return losses.dapo(logp, old, None, adv, mask * keep[:, None])[0]
  if algorithm == "bnpo":
    adv = losses.bnpo_advantages(rewards.reshape(PB, GB)).reshape(-1)
    return losses.grpo(logp, old, ref, adv, mask, beta=BETA)[0]
  if algorithm == "reinforce_pp":
    adv = losses.reinforce_pp_advantages(rewards, old, ref, mask, beta=BETA)
    return losses.reinforce_pp(logp, old, adv, mask)[0]
  if algorithm == "ppo":
    adv, _ = losses.gae(losses.ppo_token_rewards(rewards, old, ref, mask, beta=BETA), b["values"],
                        mask, gamma=1.0, lam=0.95)
    return losses.clipped_surrogate(logp, old, losses.whiten(adv, mask), mask)[0]
  if algorithm == "copg":
    lp, lr = losses.sequence_logprobs(logp, mask), losses.sequence_logprobs(ref, mask)
    return jnp.mean(losses.copg(lp[0::2], lr[0::2], rewards[0::2], lp[1::2], lr[1::2],
                                rewards[1::2], beta=BETA))
  if algorithm == "topr":
    return losses.topr(logp, old, _group_centred(shaped), mask)[0]
  if algorithm == "constrained":
    components = b["component_rewards"].T
    adv = losses.constrained_mixed_advantage(_group_centred(-kl_seq),
                                             jax.vmap(_group_centred)(components), xi)
    return losses.clipped_surrogate(logp, old, adv, mask)[0]
  raise AssertionError(algorithm)


@pytest.mark.parametrize("algorithm", objectives.PG_ALGORITHMS)
def test_prepare_and_objective_equal_the_library_composition(algorithm):
  b = synthetic_batch()
  extra = dict(advantage_kwargs=dict(thresholds=(0.3, 0.6))) if algorithm == "constrained" else {}
  settings = online.OnlineSettings(algorithm, group_size=GB, beta=BETA, **extra)
  xi = jnp.array([0.5, -1.0]) if algorithm == "constrained" else None
  prepared, _ = online.prepare_batch(settings, b, jnp.float32(BETA), xi, response_len=TRB)
  loss_fn = objectives.make_policy_gradient_loss(algorithm, group_size=GB, response_len=TRB)
  # Not the sampling policy: ratios differ from 1 and clipping is active.
  table = Bigram.seeded(2).table_VxV

  def actual(table):
    return loss_fn(Bigram(table), prepared, {"beta": jnp.float32(BETA)})[0]

  def reference(table):
    logp = losses.token_logprobs(table[b["tokens"]], b["tokens"])
    return expected_loss(algorithm, logp, b, xi)

  np.testing.assert_allclose(actual(table), reference(table), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.grad(actual)(table), jax.grad(reference)(table), rtol=1e-4,
                             atol=1e-6)
  assert float(jnp.abs(jax.grad(reference)(table)).sum()) > 0


def test_preference_matching_regularisers_replace_the_kl_penalty():
  b = synthetic_batch()
  mask, old, ref = b["loss_mask"], b["logp_old"], b["logp_ref"]
  for regularizer, penalty in (
      ("pm", old), ("conditional_pm", jnp.where(ref > jnp.log(0.1), old, old - ref))):
    settings = online.OnlineSettings("rloo", group_size=GB, beta=BETA, regularizer=regularizer,
                                     pm_alpha=0.1)
    prepared, _ = online.prepare_batch(settings, b, jnp.float32(BETA))
    shaped = b["rewards"] - BETA * losses.masked_sum(penalty, mask, axis=-1)
    np.testing.assert_allclose(prepared["shaped_rewards"], shaped, rtol=1e-6)
    np.testing.assert_allclose(prepared["advantages"],
                               losses.rloo_advantages(shaped.reshape(PB, GB)).reshape(-1),
                               rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="regularizer"):
    online.OnlineSettings("grpo", regularizer="pm")


def test_dapo_drops_uniform_groups_and_penalises_overlong_responses():
  b = synthetic_batch()
  settings = online.OnlineSettings("dapo", group_size=GB, advantage_kwargs=dict(
      overlong_cache_len=2))
  prepared, metrics = online.prepare_batch(settings, b, jnp.float32(0.0), response_len=TRB)
  # Soft overlong punishment (DAPO): 0 up to L_max - L_cache = 2 tokens, then -1/2 per token.
  lengths = np.asarray(b["lengths"])
  np.testing.assert_allclose(prepared["shaped_rewards"] - b["rewards"],
                             np.clip((2 - lengths) / 2, -1.0, 0.0))
  keep = np.repeat(np.asarray(losses.dapo_dynamic_sampling_mask(b["rewards"].reshape(PB, GB))),
                   GB)
  np.testing.assert_array_equal(prepared["loss_mask"], b["loss_mask"] * keep[:, None])
  np.testing.assert_allclose(metrics["kept_groups"], keep.reshape(PB, GB)[:, 0].mean())
  # Groups are dropped by correctness, whatever the length penalty does to the shaped rewards:
  # all correct with unequal penalties (shaped 1, 1, 0.5, 0) is dropped; mixed correctness with
  # shaped rewards all 0 (the correct ones penalised by 1) is kept.
  b = {**b, "rewards": np.asarray([1, 1, 1, 1, 1, 0, 1, 0], np.float32),
       "lengths": np.asarray([1, 2, 3, 4, 4, 1, 4, 2])}
  prepared, metrics = online.prepare_batch(settings, b, jnp.float32(0.0), response_len=TRB)
  np.testing.assert_allclose(prepared["shaped_rewards"], [1, 1, 0.5, 0, 0, 0, 0, 0])
  keep = np.repeat([0, 1], GB)
  np.testing.assert_array_equal(prepared["loss_mask"], b["loss_mask"] * keep[:, None])
  np.testing.assert_allclose(metrics["kept_groups"], 0.5)


def test_constrained_multipliers_fall_for_slack_and_rise_for_violated_constraints():
  settings = online.OnlineSettings("constrained", group_size=GB, advantage_kwargs=dict(
      thresholds=(0.2, 0.8), dual_lr=5.0))
  kl_state, xi = losses.adaptive_kl_init(0.1), jnp.zeros(2)
  for _ in range(20):  # Component means 0.5: slack for threshold 0.2, violated for 0.8.
    kl_state, xi = online.advance_coefficients(settings, kl_state, xi, 0.3, jnp.array([0.5, 0.5]),
                                               8)
  mu = losses.constraint_multipliers(xi)
  assert mu[0] < 0.2 and mu[1] > 0.8
  assert float(kl_state.beta) == pytest.approx(0.1)  # Fixed KL: the controller leaves beta.


def test_minibatches_are_whole_shuffled_groups():
  rows = online.group_minibatches(6, 3, 2, np.random.default_rng(0))
  assert rows.shape == (2, 9)
  np.testing.assert_array_equal(np.sort(rows.reshape(-1)), np.arange(18))
  groups = rows.reshape(2, 3, 3)
  np.testing.assert_array_equal(groups - groups[..., :1], np.broadcast_to([0, 1, 2], (2, 3, 3)))
  assert (groups[..., 0] % 3 == 0).all()
  # Shuffled: each draw (epoch) groups the prompts differently, not in their rollout order.
  rng = np.random.default_rng(0)
  draws = [online.group_minibatches(8, 2, 2, rng)[:, ::2] // 2 for _ in range(3)]
  assert not any(np.array_equal(d, np.arange(8).reshape(2, 4)) for d in draws)
  assert len({tuple(np.sort(d, axis=1).reshape(-1)) for d in draws}) > 1
  with pytest.raises(ValueError, match="minibatches"):
    online.group_minibatches(5, 3, 2, np.random.default_rng(0))


def test_bad_settings_name_the_problem():
  with pytest.raises(ValueError, match="algorithm"):
    online.OnlineSettings("a2c")
  # Default coefficients: GRPO's k3 KL 0.04 (ALGORITHMS.md), 0.05 for the others; explicit wins.
  assert [online.OnlineSettings(a, group_size=2).beta for a in ("grpo", "dr_grpo", "bnpo")] == \
      [0.04] * 3
  assert online.OnlineSettings("remax").beta == 0.05
  assert online.OnlineSettings("grpo", beta=0.1).beta == 0.1
  with pytest.raises(ValueError, match="group_size"):
    online.OnlineSettings("grpo", group_size=1)
  with pytest.raises(ValueError, match="unknown keys"):
    online.OnlineSettings("grpo", loss_kwargs=dict(eps=0.2))
  with pytest.raises(ValueError, match="thresholds"):
    online.OnlineSettings("constrained")
  with pytest.raises(ValueError, match="kl_target"):
    online.OnlineSettings("ppo", kl_target=0.0)
  with pytest.raises(ValueError, match="unknown setting 'eps_v' of online algorithm grpo"):
    online.OnlineSettings.from_algorithm_config("grpo", {"beta": 0.1, "eps_v": 0.2})
  settings = online.OnlineSettings.from_algorithm_config(
      "ppo", {"beta": 0.2, "eps": 0.1, "lam": 0.9, "eps_v": 0.3}, group_size=2)
  assert settings.beta == 0.2 and settings.loss_kwargs == {"eps": 0.1}
  assert settings.advantage_kwargs == {"lam": 0.9} and settings.critic_kwargs == {"eps_v": 0.3}
  with pytest.raises(ValueError, match="copg"):
    objectives.make_policy_gradient_loss("copg", group_size=3)
  with pytest.raises(ValueError, match="unknown settings"):
    objectives.make_policy_gradient_loss("grpo", eps=0.2)


@pytest.mark.parametrize("algorithm", ["dapo", "grpo", "rloo"])
def test_accumulation_gives_the_update_of_the_whole_minibatch(algorithm):
  """OnlineSettings.accumulation_steps splits each minibatch into micro-batches of whole groups
  inside the step: the loss and the gradient are those of the whole minibatch, whatever the
  micro-batches' token counts (DAPO's token mean needs the loss weights; RLOO's loss regroups the
  rewards of each prompt, so a micro-batch must hold whole groups)."""
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  out = {}
  for k in (1, 2):
    trainer, state = make_trainer(mesh, algorithm, num_epochs=1, num_minibatches=1,
                                  accumulation_steps=k)
    _, metrics = trainer.iterate(state, _prompts(mesh), jax.random.key(0))
    out[k] = jax.device_get(metrics)
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(out[2][key], out[1][key], rtol=1e-5, err_msg=key)


def test_iteration_is_epochs_of_minibatch_steps_on_the_rollout():
  """An iteration (2 epochs x 2 minibatches) equals the loop written out: the rollout of the same
  key, its advantages, then per epoch the seeded shuffle of whole groups and one policy step per
  minibatch with the controller's current beta, every epoch on the rollout's logp_old (the
  behaviour policy, never refreshed). Checked on the second iteration, after the adaptive
  controller has moved beta."""
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  trainer, state = make_trainer(mesh, "grpo", num_epochs=2, num_minibatches=2, lr=1e-2,
                                kl_target=1e-3, kl_horizon=10.0)
  prompts, key = _prompts(mesh), jax.random.key(0)
  state, _ = trainer.iterate(state, prompts, jax.random.key(1))
  assert float(state.kl.beta) != pytest.approx(trainer.settings.beta)
  manual = jax.tree.map(lambda x: x.copy(), state)  # `iterate` donates `state`.
  state, metrics = trainer.iterate(state, prompts, key)
  batch, _ = trainer.prepare(trainer.rollout(manual, prompts, key).batch(), manual.kl.beta,
                             manual.xi_N)
  order = np.random.default_rng((trainer.settings.seed, 1))  # (seed, iteration)
  policy, step_metrics = manual.policy, []
  for _ in range(2):
    for rows in online.group_minibatches(P, G, 2, order):
      policy, m = trainer.policy_step(policy, trainer.take(batch, jnp.asarray(rows)),
                                      {"beta": manual.kl.beta})
      step_metrics.append(jax.device_get(m))
  assert int(state.policy.step) == int(policy.step) == 8
  for k in ("loss", "approx_kl", "clip_frac", "grad_norm"):
    np.testing.assert_allclose(metrics[k], np.mean([m[k] for m in step_metrics]), rtol=1e-5,
                               atol=1e-7, err_msg=k)
  assert metrics["approx_kl"] > 0  # Later steps see ratios away from 1.
  for a, b in zip(jax.tree.leaves(jax.device_get(state.policy.params)),
                  jax.tree.leaves(jax.device_get(policy.params)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_critic_step_aggregates_the_value_loss_like_the_policy_loss():
  """The PPO critic's step is `make_value_loss` with the policy loss's aggregation mode (here
  seq_mean_token_sum) and CRITIC_DEFAULTS' eps_v, on the prepared batch's returns."""
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  mode = "seq_mean_token_sum"
  trainer, state = make_trainer(mesh, "ppo", num_epochs=1, num_minibatches=1,
                                loss_kwargs=dict(mode=mode))
  rollout = trainer.rollout(state, _prompts(mesh), jax.random.key(0))
  batch, _ = trainer.prepare(rollout.batch(), state.kl.beta, state.xi_N)
  critic = nnx.merge(trainer.critic.graphdef, state.critic.params)
  want = {m: float(objectives.make_value_loss(eps_v=0.2, mode=m)(critic, batch)[0])
          for m in (mode, "token_mean")}
  assert abs(want[mode] - want["token_mean"]) > 1e-4  # The mode matters on this batch.
  _, metrics = trainer.critic_step(jax.tree.map(lambda x: x.copy(), state.critic), batch)
  np.testing.assert_allclose(metrics["loss"], want[mode], rtol=1e-5)
