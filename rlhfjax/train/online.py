"""The online RL loop: rollout -> rewards -> advantages -> K epochs of minibatch updates.

One iteration (`OnlineTrainer.iterate`):

1. generate: sample G responses to each of P prompts with the policy (and the greedy response of
   each prompt for ReMax), `rollout.Rollouts.generate`;
2. score: old and reference log-probs, entropies, critic values and rewards, `Rollouts.score`;
3. advantages: batch-level quantities on the whole rollout (`prepare_batch`): the regulariser
   (KL, or preference matching) in the reward, group or batch baselines, whitening, GAE;
4. update: K epochs over M minibatches of whole prompt groups, each one optimizer step of the
   policy (`objectives.make_policy_gradient_loss` through `steps.make_train_step`) and, for PPO,
   of the critic (`objectives.make_value_loss`, a second `TrainState`);
5. coefficients: the KL controller (`losses.update_kl_coef`, fixed or adaptive) and, for
   constrained RLHF, the Lagrange multipliers (`losses.constrained_dual_update`).

Every phase is a jit-compiled program with fixed shapes, so iterations after the first never
recompile; the KL coefficient and the multipliers are arrays passed to the programs, not constants
baked into them. Wall time of each phase is reported (`generate_s`, `score_s`, `advantage_s`,
`update_s`).

An algorithm is one entry of three tables selected by `OnlineSettings.algorithm`: the loss
(`objectives.PG_LOSS_DEFAULTS`), the advantage estimator (`ADVANTAGE_DEFAULTS` and
`prepare_batch`), and what the rollout needs (greedy baseline, critic, component rewards).

`train_online` runs the iterations with the generic loop (`loop.run_loop`): metrics, periodic
evaluation, checkpoints of the whole `OnlineState`, and exact resumption.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rlhfjax import losses
from rlhfjax import sharding as shd
from rlhfjax.train import objectives
from rlhfjax.train import steps as steps_lib
from rlhfjax.train.loop import LoopSettings, run_loop
from rlhfjax.train.rollout import Rollouts
from rlhfjax.train.state import TrainState

REGULARIZERS = ("kl", "pm", "conditional_pm")
BASELINES = ("none", "batch_mean", "group_mean")

# Algorithms whose regulariser is a per-token penalty in the reward (k1 for KL, as in PPO-RLHF),
# which can therefore be swapped for the preference-matching penalty. GRPO-style losses put k3 in
# the loss, ReMax and CoPG have their KL term inside the loss: those take only the KL regulariser.
REWARD_PENALTY_ALGORITHMS = ("reinforce", "rloo", "reinforce_pp", "ppo", "topr", "constrained")

# Settings of each algorithm's advantage estimator, with defaults.
ADVANTAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "reinforce": dict(baseline="batch_mean"),
    "remax": dict(),
    "rloo": dict(),
    "grpo": dict(std_eps=1e-6),
    "dr_grpo": dict(),
    "dapo": dict(std_eps=1e-6, dynamic_sampling=True, overlong_cache_len=0),
    "bnpo": dict(r_min=0.0, r_max=1.0),
    "reinforce_pp": dict(gamma=1.0),
    "ppo": dict(gamma=1.0, lam=0.95, whiten=True),
    "copg": dict(),
    "topr": dict(baseline="group_mean"),
    "constrained": dict(baseline="group_mean", thresholds=(), dual_lr=0.1),
}

# Settings of the PPO critic's step.
CRITIC_DEFAULTS: dict[str, Any] = dict(eps_v=0.2)


# The initial regularisation coefficient when `OnlineSettings.beta` is None: GRPO's k3 KL
# coefficient for its family (ALGORITHMS.md), 0.05 (the ReMax / RLHF default) otherwise.
DEFAULT_BETA = {"grpo": 0.04, "dr_grpo": 0.04, "bnpo": 0.04}
FALLBACK_BETA = 0.05


@dataclasses.dataclass(frozen=True)
class OnlineSettings:
  """What an online run trains with (shapes and algorithm choices are static).

  Attributes:
    algorithm: one of `objectives.PG_ALGORITHMS`.
    group_size: G, responses sampled per prompt.
    num_epochs: K, passes over each rollout.
    num_minibatches: M, optimizer steps per epoch (each on P / M whole prompt groups).
    accumulation_steps: micro-batches of whole groups per optimizer step (the gradient of a
      minibatch from one micro-batch's activations at a time, `steps.make_train_step`).
    beta: the initial regularisation coefficient (KL, or preference matching); None for the
      algorithm's default (`DEFAULT_BETA`: 0.04 for the GRPO family, else 0.05).
    kl_target: target sequence KL of the adaptive controller, or None for a fixed beta.
    kl_horizon: the adaptive controller's horizon in samples.
    regularizer: "kl", "pm" (preference matching: penalty log pi) or "conditional_pm"; the last two
      only for `REWARD_PENALTY_ALGORITHMS`.
    pm_alpha: threshold of conditional preference matching.
    loss_kwargs: the loss's settings (`objectives.PG_LOSS_DEFAULTS[algorithm]`).
    advantage_kwargs: the advantage estimator's settings (`ADVANTAGE_DEFAULTS[algorithm]`).
    critic_kwargs: the PPO critic's settings (`CRITIC_DEFAULTS`).
    seed: seeds the minibatch order.
  """
  algorithm: str
  group_size: int = 4
  num_epochs: int = 1
  num_minibatches: int = 1
  accumulation_steps: int = 1
  beta: float | None = None
  kl_target: float | None = None
  kl_horizon: float = 10_000.0
  regularizer: str = "kl"
  pm_alpha: float = 0.5
  loss_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  advantage_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  critic_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  seed: int = 0

  def __post_init__(self):
    a = self.algorithm
    if a not in objectives.PG_ALGORITHMS:
      raise ValueError(f"algorithm must be one of {objectives.PG_ALGORITHMS}, got {a!r}")
    for name in ("group_size", "num_epochs", "num_minibatches", "accumulation_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if a in ("rloo", "grpo", "dr_grpo", "dapo", "bnpo", "copg") and self.group_size < 2:
      raise ValueError(f"{a} compares samples of the same prompt: group_size must be >= 2, got "
                       f"{self.group_size}")
    if self.beta is None:
      object.__setattr__(self, "beta", DEFAULT_BETA.get(a, FALLBACK_BETA))
    if self.beta < 0:
      raise ValueError(f"beta must be >= 0, got {self.beta}")
    if self.kl_target is not None and not self.kl_target > 0:
      raise ValueError(f"kl_target must be > 0 or None (fixed beta), got {self.kl_target}")
    if self.kl_horizon <= 0:
      raise ValueError(f"kl_horizon must be > 0, got {self.kl_horizon}")
    if self.regularizer not in REGULARIZERS:
      raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {self.regularizer!r}")
    if self.regularizer != "kl" and a not in REWARD_PENALTY_ALGORITHMS:
      raise ValueError(f"regularizer {self.regularizer!r} needs a reward-penalty algorithm "
                       f"{REWARD_PENALTY_ALGORITHMS}; {a} has its KL term inside the loss")
    if not 0 < self.pm_alpha < 1:
      raise ValueError(f"pm_alpha must be in (0, 1), got {self.pm_alpha}")
    for field, table in (("loss_kwargs", objectives.PG_LOSS_DEFAULTS[a]),
                         ("advantage_kwargs", ADVANTAGE_DEFAULTS[a]),
                         ("critic_kwargs", CRITIC_DEFAULTS if a == "ppo" else {})):
      unknown = sorted(set(getattr(self, field)) - set(table))
      if unknown:
        raise ValueError(f"{field} of {a} has unknown keys {unknown}; valid: {sorted(table)}")
    adv = self.advantages
    if "baseline" in adv and adv["baseline"] not in BASELINES:
      raise ValueError(f"baseline must be one of {BASELINES}, got {adv['baseline']!r}")
    if a == "constrained" and not adv["thresholds"]:
      raise ValueError("constrained RLHF needs advantage_kwargs['thresholds'], one per component")

  @classmethod
  def from_algorithm_config(cls, algorithm: str, algorithm_config: Mapping[str, Any],
                            **settings) -> "OnlineSettings":
    """Splits one flat per-algorithm settings dict (e.g. `config.online.grpo`) into beta, loss,
    advantage and critic settings by the tables above; an unknown key is a ValueError naming it."""
    if algorithm not in objectives.PG_ALGORITHMS:
      raise ValueError(f"algorithm must be one of {objectives.PG_ALGORITHMS}, got {algorithm!r}")
    parts: dict[str, dict] = {"loss_kwargs": {}, "advantage_kwargs": {}, "critic_kwargs": {}}
    for key, value in dict(algorithm_config).items():
      if key == "beta":
        settings["beta"] = value
      elif key in objectives.PG_LOSS_DEFAULTS[algorithm]:
        parts["loss_kwargs"][key] = value
      elif key in ADVANTAGE_DEFAULTS[algorithm]:
        parts["advantage_kwargs"][key] = value
      elif algorithm == "ppo" and key in CRITIC_DEFAULTS:
        parts["critic_kwargs"][key] = value
      else:
        valid = sorted({"beta", *objectives.PG_LOSS_DEFAULTS[algorithm],
                        *ADVANTAGE_DEFAULTS[algorithm],
                        *(CRITIC_DEFAULTS if algorithm == "ppo" else ())})
        raise ValueError(f"unknown setting {key!r} of online algorithm {algorithm}; valid: "
                         f"{valid}")
    return cls(algorithm=algorithm, **parts, **settings)

  @property
  def advantages(self) -> dict[str, Any]:
    return {**ADVANTAGE_DEFAULTS[self.algorithm], **self.advantage_kwargs}

  @property
  def greedy_baseline(self) -> bool:
    """The rollout must decode greedy responses (ReMax's baseline)."""
    return self.algorithm == "remax"

  @property
  def needs_critic(self) -> bool:
    return self.algorithm == "ppo"

  @property
  def num_components(self) -> int:
    return len(self.advantages["thresholds"]) if self.algorithm == "constrained" else 0


def regularizer_penalty(regularizer: str, logp_old_BxT, logp_ref_BxT, mask_BxT, *,
                        alpha: float = 0.5) -> jax.Array:
  """Per-token penalty whose coefficient-weighted sum is subtracted from the reward.

  ``kl``: k1 = lp_old - lp_ref (PPO-RLHF); ``pm``: lp_old (`losses.pm_penalty`, optimum softmax(r));
  ``conditional_pm``: `losses.conditional_pm_penalty`. 0 off the response.
  """
  if regularizer == "kl":
    penalty = losses.kl_estimate(logp_old_BxT, logp_ref_BxT, "k1")
  elif regularizer == "pm":
    penalty = losses.pm_penalty(logp_old_BxT)
  elif regularizer == "conditional_pm":
    penalty = losses.conditional_pm_penalty(logp_old_BxT, logp_ref_BxT, alpha=alpha)
  else:
    raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {regularizer!r}")
  return jnp.where(jnp.asarray(mask_BxT) != 0, penalty, 0.0)


def subtract_baseline(x_B, baseline: str, group_size: int) -> jax.Array:
  """``x - b`` with b = 0 (``none``), the batch mean, or the mean of each prompt's group."""
  if baseline == "none":
    return x_B
  if baseline == "batch_mean":
    return x_B - jnp.mean(x_B)
  if baseline == "group_mean":
    x_PxG = x_B.reshape(-1, group_size)
    return (x_PxG - jnp.mean(x_PxG, axis=1, keepdims=True)).reshape(-1)
  raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")


def prepare_batch(settings: OnlineSettings, batch: Mapping[str, jax.Array], beta, xi_N=None, *,
                  response_len: int | None = None
                  ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """Adds the batch-level quantities of the algorithm to a rollout batch (`Rollout.batch()`).

  Computed here, on the whole rollout, because they couple samples: group baselines (RLOO, GRPO,
  BNPO, DAPO), global whitening (REINFORCE++, PPO), GAE over each sequence (PPO).

  Added fields, by algorithm (penalty = the regulariser's per-token penalty, `shaped_rewards` =
  R - beta sum_t penalty_t):

    - reinforce, topr: `shaped_rewards`; `advantages` [B] = shaped - baseline.
    - rloo: `shaped_rewards`; `advantages` [B] = `losses.rloo_advantages` (reported; the loss
      regroups the shaped rewards itself).
    - grpo / dr_grpo: `advantages` [B] = `losses.grpo_advantages` (dr_grpo: no std).
    - dapo: `advantages` [B] of R + the overlong penalty; `loss_mask` zeroed on uniform groups.
    - bnpo: `advantages` [B] = `losses.bnpo_advantages`.
    - reinforce_pp: `advantages` [B, T] = whitened return-to-go of the per-token rewards.
    - ppo: `advantages` [B, T] (GAE, optionally whitened) and `returns` [B, T].
    - remax: `advantages` [B, T] = `losses.remax_returns` (reported; the loss recomputes them).
    - constrained: `advantages` [B] = `losses.constrained_mixed_advantage` of the baselined KL
      reward and component rewards.
    - copg: nothing (the loss pairs raw rewards).

  Args:
    settings: the run's settings.
    batch: a rollout batch.
    beta: the current regularisation coefficient (scalar array).
    xi_N: multiplier logits of constrained RLHF.
    response_len: the generation budget L_max (DAPO's overlong penalty).

  Returns:
    (batch with the added fields, scalar metrics of the rollout).
  """
  a, g, kw = settings.algorithm, settings.group_size, settings.advantages
  mask = batch["loss_mask"]
  rewards = batch["rewards"]
  out = dict(batch)
  k1 = losses.kl_estimate(batch["logp_old"], batch["logp_ref"], "k1")
  metrics = {
      "reward": jnp.mean(rewards),
      "reward_std": jnp.std(rewards),
      "kl": jnp.mean(losses.masked_sum(k1, mask, axis=-1)),
      "rollout_entropy": losses.masked_mean(batch["entropy"], mask),
      "response_len": jnp.mean(batch["lengths"].astype(jnp.float32)),
      "eos_frac": jnp.mean(batch["has_eos"].astype(jnp.float32)),
      "beta": jnp.asarray(beta, jnp.float32),
  }
  if "gold_rewards" in batch:
    metrics["gold_reward"] = jnp.mean(batch["gold_rewards"])
  if "greedy_rewards" in batch:
    metrics["greedy_reward"] = jnp.mean(batch["greedy_rewards"])

  if a in REWARD_PENALTY_ALGORITHMS:
    penalty = regularizer_penalty(settings.regularizer, batch["logp_old"], batch["logp_ref"],
                                  mask, alpha=settings.pm_alpha)
    token_rewards = losses.token_level_rewards(rewards, penalty, mask, beta=beta)
    seq_penalty = losses.masked_sum(penalty, mask, axis=-1)
    out["shaped_rewards"] = rewards - beta * seq_penalty
    metrics["penalty"] = jnp.mean(seq_penalty)
    metrics["shaped_reward"] = jnp.mean(out["shaped_rewards"])

  if a in ("reinforce", "topr"):
    out["advantages"] = subtract_baseline(out["shaped_rewards"], kw["baseline"], g)
  elif a == "rloo":
    out["advantages"] = losses.rloo_advantages(out["shaped_rewards"].reshape(-1, g)).reshape(-1)
  elif a in ("grpo", "dr_grpo"):
    out["advantages"] = losses.grpo_advantages(
        rewards.reshape(-1, g), scale_by_std=a == "grpo",
        **({"eps": kw["std_eps"]} if a == "grpo" else {})).reshape(-1)
  elif a == "dapo":
    shaped = rewards
    if kw["overlong_cache_len"]:
      if response_len is None:
        raise ValueError("dapo's overlong penalty needs response_len (the generation budget)")
      shaped = rewards + losses.dapo_overlong_penalty(
          batch["lengths"], max_len=response_len, cache_len=kw["overlong_cache_len"])
    out["shaped_rewards"] = shaped
    out["advantages"] = losses.grpo_advantages(shaped.reshape(-1, g),
                                               eps=kw["std_eps"]).reshape(-1)
    if kw["dynamic_sampling"]:  # By correctness (the task reward), not the penalised reward.
      keep_P = losses.dapo_dynamic_sampling_mask(rewards.reshape(-1, g))
      out["loss_mask"] = mask * jnp.repeat(keep_P, g)[:, None].astype(mask.dtype)
      metrics["kept_groups"] = jnp.mean(keep_P.astype(jnp.float32))
  elif a == "bnpo":
    out["advantages"] = losses.bnpo_advantages(rewards.reshape(-1, g), r_min=kw["r_min"],
                                               r_max=kw["r_max"]).reshape(-1)
  elif a == "reinforce_pp":
    out["advantages"] = losses.whiten(
        losses.discounted_returns(token_rewards, mask, gamma=kw["gamma"]), mask)
  elif a == "ppo":
    advantages, returns = losses.gae(token_rewards, batch["values"], mask, gamma=kw["gamma"],
                                     lam=kw["lam"])
    out["advantages"] = losses.whiten(advantages, mask) if kw["whiten"] else advantages
    out["returns"] = returns
    metrics["value_mean"] = losses.masked_mean(batch["values"], mask)
  elif a == "remax":
    loss_kw = {**objectives.PG_LOSS_DEFAULTS["remax"], **settings.loss_kwargs}
    delta = losses.remax_advantages(rewards, batch["greedy_rewards"], clip=loss_kw["clip"])
    out["advantages"] = losses.remax_returns(delta, batch["logp_old"], batch["logp_ref"], mask,
                                             beta=beta, gamma=loss_kw["gamma"])
  elif a == "constrained":
    components_NxB = batch["component_rewards"].T
    advantage_kl = subtract_baseline(-seq_penalty, kw["baseline"], g)
    advantages_NxB = jax.vmap(lambda c: subtract_baseline(c, kw["baseline"], g))(components_NxB)
    out["advantages"] = losses.constrained_mixed_advantage(advantage_kl, advantages_NxB, xi_N)
    for i, (c, mu) in enumerate(zip(components_NxB, losses.constraint_multipliers(xi_N))):
      metrics[f"component_{i}"] = jnp.mean(c)
      metrics[f"mu_{i}"] = mu
  if "advantages" in out:
    adv_mask = mask if out["advantages"].ndim == 2 else jnp.ones_like(rewards)
    metrics["advantage_abs"] = losses.masked_mean(jnp.abs(out["advantages"]), adv_mask)
  return out, metrics


def advance_coefficients(settings: OnlineSettings, kl_state: losses.AdaptiveKLState, xi_N,
                         observed_kl, component_means_N, num_samples):
  """The coefficient updates at the end of an iteration.

  KL: `losses.update_kl_coef` (unchanged when `settings.kl_target` is None, Ziegler et al.'s
  proportional controller otherwise) from the rollout's mean sequence KL over `num_samples`
  samples. Constrained RLHF: one `losses.constrained_dual_update` step of the multiplier logits
  from the batch means of the component rewards.

  Returns:
    (kl_state, xi_N).
  """
  kl_state = losses.update_kl_coef(kl_state, observed_kl, num_samples, target=settings.kl_target,
                                   horizon=settings.kl_horizon)
  if xi_N is not None:
    kw = settings.advantages
    xi_N = losses.constrained_dual_update(xi_N, component_means_N,
                                          jnp.asarray(kw["thresholds"], jnp.float32),
                                          lr=kw["dual_lr"])
  return kl_state, xi_N


class CriticSetup(NamedTuple):
  """The PPO critic: a model with a score head, its optimizer and its state shardings."""
  graphdef: nnx.GraphDef
  optimizer: optax.GradientTransformation
  shardings: TrainState


class OnlineState(NamedTuple):
  """Everything an iteration updates.

  Attributes:
    policy: the policy's TrainState.
    critic: the critic's TrainState (PPO), or None.
    kl: the KL controller's state (its `beta` is the current coefficient).
    xi_N: multiplier logits of constrained RLHF, or None.
    iteration: int32 scalar, iterations done.
  """
  policy: TrainState
  critic: TrainState | None
  kl: losses.AdaptiveKLState
  xi_N: jax.Array | None
  iteration: jax.Array


def group_minibatches(num_prompts: int, group_size: int, num_minibatches: int,
                      rng: np.random.Generator) -> np.ndarray:
  """Row indices [M, B / M] of M minibatches made of whole prompt groups, groups shuffled.

  Raises:
    ValueError: if the P prompts do not split into M equal parts.
  """
  if num_prompts % num_minibatches:
    raise ValueError(f"{num_prompts} prompts per iteration do not split into "
                     f"{num_minibatches} minibatches of whole groups")
  groups = rng.permutation(num_prompts)
  rows = groups[:, None] * group_size + np.arange(group_size)[None, :]
  return rows.reshape(num_minibatches, -1).astype(np.int32)


class OnlineTrainer:
  """Runs online RL iterations for one algorithm.

  Args:
    settings: `OnlineSettings`.
    rollouts: the rollout programs (their group size must equal `settings.group_size`; ReMax
      needs `greedy_baseline`, PPO a critic, constrained RLHF components).
    mesh: the device mesh.
    policy_graphdef: the policy's structure.
    optimizer: the policy's optax transform.
    state_shardings: the policy TrainState's shardings (`state.init_train_state`).
    reference_params: the frozen reference policy's params.
    reward_params: params of the reward source (None for programmatic rewards).
    critic: the PPO critic's `CriticSetup`, or None.
    response_len: the generation budget (Dr. GRPO's normaliser); default the sampler's.
  """

  def __init__(self, settings: OnlineSettings, rollouts: Rollouts, *, mesh,
               policy_graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
               state_shardings: TrainState, reference_params: Any, reward_params: Any = None,
               critic: CriticSetup | None = None, response_len: int | None = None):
    if rollouts.group_size != settings.group_size:
      raise ValueError(f"rollouts sample {rollouts.group_size} responses per prompt but "
                       f"settings.group_size is {settings.group_size}")
    if settings.greedy_baseline and not rollouts.greedy_baseline:
      raise ValueError(f"{settings.algorithm} needs Rollouts(greedy_baseline=True)")
    if not settings.needs_critic == (critic is not None) == rollouts.has_critic:
      raise ValueError(f"{settings.algorithm}: a critic (CriticSetup and Rollouts(value_graphdef="
                       f"...)) is needed exactly for ppo")
    if settings.num_components != rollouts.num_components:
      raise ValueError(f"constrained RLHF needs one component reward per threshold: "
                       f"{settings.num_components} thresholds, {rollouts.num_components} "
                       "components")
    budget = rollouts.sampling.max_new_tokens
    response_len = response_len or budget
    if rollouts.shared_prompt and response_len != budget:
      raise ValueError(f"Rollouts(shared_prompt=True) packs responses of the sampler's "
                       f"{budget} tokens; response_len {response_len} differs")
    self.settings = settings
    self.rollouts = rollouts
    self.mesh = mesh
    self.reference_params = reference_params
    self.reward_params = reward_params
    self.critic = critic
    replicated = shd.replicated(mesh)
    self._replicated = replicated
    # The update computes log-probs as the rollout's score phase does (same chunking and packing),
    # so that with recompute_logprobs the first PPO ratio is 1 (up to float rounding).
    loss_fn = objectives.make_policy_gradient_loss(
        settings.algorithm, group_size=settings.group_size, response_len=response_len,
        logits_chunk_size=rollouts.logits_chunk_size, shared_prompt=rollouts.shared_prompt,
        **settings.loss_kwargs)
    accumulate = dict(accumulation_steps=settings.accumulation_steps,
                      accumulation_unit=settings.group_size)
    self.policy_step = steps_lib.make_train_step(
        loss_fn, optimizer, policy_graphdef, mesh, state_shardings,
        frozen_shardings=({"beta": replicated},), **accumulate)
    self.critic_step = None
    if critic is not None:
      value_loss = objectives.make_value_loss(
          **{**CRITIC_DEFAULTS, **settings.critic_kwargs},
          mode={**objectives.PG_LOSS_DEFAULTS["ppo"], **settings.loss_kwargs}["mode"])
      self.critic_step = steps_lib.make_train_step(value_loss, critic.optimizer, critic.graphdef,
                                                   mesh, critic.shardings, **accumulate)
    self.prepare = jax.jit(lambda batch, beta, xi: prepare_batch(
        settings, batch, beta, xi, response_len=response_len))
    self.take = jax.jit(self._take)
    self.update_coefficients = jax.jit(functools.partial(advance_coefficients, settings))

  def _take(self, batch, rows):
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(jnp.take(x, rows, axis=0),
                                                   shd.batch_sharding(self.mesh, x.ndim)), batch)

  def init_state(self, policy_state: TrainState,
                 critic_state: TrainState | None = None) -> OnlineState:
    """The initial OnlineState around freshly initialised (or SFT) train states."""
    put = lambda x: jax.device_put(x, self._replicated)
    xi = None
    if self.settings.algorithm == "constrained":
      xi = put(jnp.zeros((self.settings.num_components,), jnp.float32))
    return OnlineState(policy_state, critic_state,
                       losses.AdaptiveKLState(put(jnp.float32(self.settings.beta))), xi,
                       put(jnp.int32(0)))

  def rollout(self, state: OnlineState, prompts: Mapping[str, jax.Array], rng):
    """Generates and scores one rollout (no update)."""
    critic_params = None if state.critic is None else state.critic.params
    return self.rollouts(state.policy.params, self.reference_params, self.reward_params,
                         critic_params, prompts["prompt_tokens"], prompts["prompt_mask"], rng)

  def iterate(self, state: OnlineState, prompts: Mapping[str, jax.Array],
              rng: jax.Array) -> tuple[OnlineState, dict[str, float]]:
    """One iteration: rollout, advantages, K epochs of M minibatch steps, coefficient updates.

    Args:
      state: the current state (its train states are donated: use the returned one).
      prompts: `prompt_tokens`, `prompt_mask` [P, Tp], sharded on the batch axis
        (`sharding.shard_batch`).
      rng: sampling key.

    Returns:
      (new state, metrics as Python floats): the rollout's (`reward`, `gold_reward`, `kl` (mean
      sequence k1 KL(pi || ref)), `rollout_entropy`, `response_len`, `eos_frac`, ...), the
      update's averaged over its steps (`loss`, `clip_frac`, `entropy`, `grad_norm`, ...; the
      critic's prefixed `critic_`; a name the rollout also reports gets the prefix `update_`),
      and the wall time of each phase (`generate_s`, `score_s`, `advantage_s`, `update_s`,
      `iteration_s`).
    """
    s = self.settings
    times = {}
    t_start = t = time.perf_counter()

    def lap(name, value):
      nonlocal t
      jax.block_until_ready(value)
      now = time.perf_counter()
      times[name] = now - t
      t = now
      return value

    policy_params = state.policy.params
    critic_params = None if state.critic is None else state.critic.params
    generation = lap("generate_s", self.rollouts.generate(
        policy_params, prompts["prompt_tokens"], prompts["prompt_mask"], rng))
    rollout = lap("score_s", self.rollouts.score(
        generation, policy_params, self.reference_params, self.reward_params, critic_params))
    batch, rollout_metrics = lap("advantage_s", self.prepare(rollout.batch(), state.kl.beta,
                                                             state.xi_N))

    num_prompts = prompts["prompt_tokens"].shape[0]
    order = np.random.default_rng((s.seed, int(state.iteration)))
    coefs = {"beta": state.kl.beta}
    policy, critic = state.policy, state.critic
    step_metrics = []
    for _ in range(s.num_epochs):
      if s.num_minibatches == 1:
        minibatches = [batch]  # The loss is order-invariant: no need to gather a permutation.
      else:
        rows = group_minibatches(num_prompts, s.group_size, s.num_minibatches, order)
        minibatches = [self.take(batch, jax.device_put(r, self._replicated)) for r in rows]
      for minibatch in minibatches:
        policy, metrics = self.policy_step(policy, minibatch, coefs)
        if critic is not None:
          critic, critic_metrics = self.critic_step(critic, minibatch)
          metrics = {**metrics, **{k if k.startswith("value_") else f"critic_{k}": v
                                   for k, v in critic_metrics.items()}}
        step_metrics.append(metrics)
    lap("update_s", (policy, critic))

    component_means = (jnp.mean(batch["component_rewards"], axis=0)
                       if "component_rewards" in batch else None)
    kl_state, xi = self.update_coefficients(state.kl, state.xi_N, rollout_metrics["kl"],
                                            component_means, rollout.rewards.shape[0])
    new_state = OnlineState(policy, critic, kl_state, xi, state.iteration + 1)

    step_metrics = jax.device_get(step_metrics)
    out = {k: float(v) for k, v in jax.device_get(rollout_metrics).items()}
    for key in step_metrics[0]:
      # The losses' own `kl` / `value_mean` are measured during the update; keep the rollout's.
      name = f"update_{key}" if key in out else key
      out[name] = float(np.mean([m[key] for m in step_metrics]))
    out.update(times)
    out["iteration_s"] = time.perf_counter() - t_start
    return new_state, out

  def programs(self, state: OnlineState, prompts: Mapping[str, jax.Array],
               rng: jax.Array) -> dict[str, tuple[Any, tuple, tuple]]:
    """The compiled programs of one iteration with real inputs, for ahead-of-time analysis.

    Runs the generate, score and advantage programs once to get their inputs (no update is
    applied). Returns {name: (jitted function, args, resident args)} for "generate", "score",
    "advantage", "policy_step" and, with a critic, "critic_step"; `fn.lower(*args).compile()`
    gives e.g. `memory_analysis()`. Resident args are the inputs that persist across the
    iteration (parameters, optimizer states), as opposed to the batch that a program consumes.
    """
    policy_params = state.policy.params
    critic_params = None if state.critic is None else state.critic.params
    prompt_args = (prompts["prompt_tokens"], prompts["prompt_mask"], rng)
    generation = self.rollouts.generate(policy_params, *prompt_args)
    frozen = (self.reference_params, self.reward_params)
    score_args = (generation, policy_params, *frozen, critic_params)
    rollout = self.rollouts.score(*score_args)
    prepare_args = (rollout.batch(), state.kl.beta, state.xi_N)
    batch, _ = self.prepare(*prepare_args)
    if self.settings.num_minibatches > 1:
      rows = group_minibatches(prompts["prompt_tokens"].shape[0], self.settings.group_size,
                               self.settings.num_minibatches, np.random.default_rng(0))[0]
      batch = self.take(batch, jax.device_put(rows, self._replicated))
    out = {
        "generate": (self.rollouts.generate, (policy_params, *prompt_args), (policy_params,)),
        "score": (self.rollouts.score, score_args, (policy_params, *frozen, critic_params)),
        "advantage": (self.prepare, prepare_args, ()),
        "policy_step": (self.policy_step, (state.policy, batch, {"beta": state.kl.beta}),
                        (state.policy,)),
    }
    if self.critic_step is not None:
      out["critic_step"] = (self.critic_step, (state.critic, batch), (state.critic,))
    return out


def train_online(trainer: OnlineTrainer, state: OnlineState, *, run_dir: str,
                 prompts_at: Callable[[int], Mapping[str, jax.Array]], rng: jax.Array,
                 settings: LoopSettings,
                 eval_fn: Callable[[OnlineState], Mapping[str, Any]] | None = None
                 ) -> tuple[OnlineState, list[dict]]:
  """Runs `trainer.iterate` for iterations 1..`settings.num_steps` with the generic loop
  (`loop.run_loop`): metrics every `log_every` iterations, `eval_fn` every `eval_every`, the whole
  `OnlineState` checkpointed every `checkpoint_every`, and a restart on `run_dir` resumed from the
  latest checkpoint.

  Iteration i uses `prompts_at(i - 1)` and the key `fold_in(rng, i - 1)`, and the trainer seeds
  its minibatch order with (settings seed, iteration): everything random is a function of the
  iteration, so the OnlineState (policy and critic TrainStates, KL controller, multipliers,
  iteration) is all a checkpoint needs, and a resumed run ends bit-identical to an uninterrupted
  one.

  Args:
    trainer: the `OnlineTrainer`.
    state: the initial state (`trainer.init_state`; the restore target when resuming).
    run_dir: the stage's directory (`metrics.jsonl`, TensorBoard events, `checkpoints/`).
    prompts_at: `prompts_at(i) -> {prompt_tokens, prompt_mask}` sharded on the batch axis, for
      the 0-based iteration index i.
    rng: the run's sampling key.
    settings: `loop.LoopSettings`; `num_steps` counts iterations.
    eval_fn: `eval_fn(state) -> metrics`.

  Returns:
    (final state, logged records: one per logged iteration with `OnlineTrainer.iterate`'s
    metrics, plus the eval records).
  """
  def advance(state: OnlineState, iteration: int) -> tuple[OnlineState, dict[str, float]]:
    return trainer.iterate(state, prompts_at(iteration - 1), jax.random.fold_in(rng, iteration - 1))

  return run_loop(run_dir=run_dir, state=state, advance=advance, settings=settings,
                  eval_fn=eval_fn, postfix=("reward", "kl", "response_len"))
