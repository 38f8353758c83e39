"""Rollouts for online RL: sample G responses per prompt, score them, and record log-probs.

A rollout has two jit-compiled phases, timed separately by the online loop:

1. `generate`: the P prompts are prefilled once and B = P * G responses sampled with the policy,
   G per prompt (prompt-major: the G samples of prompt p are rows p*G .. p*G + G - 1, the layout
   of `losses.advantages`); optionally the greedy response of each of the P prompts is decoded
   too (ReMax's baseline).
2. `score`: one forward pass of each model over the B sequences in the trainers' layout (prompt
   left-padded + response right-padded): the policy's log-probs of the sampled tokens (``old``) and
   its entropies, the reference's log-probs, the critic's values, and the rewards.

Rewards come from any source with the signature
``reward(params, prompt_tokens_BxTp, prompt_mask_BxTp, response_tokens_BxTr, response_mask_BxTr)
-> [B]``: a programmatic function (`programmatic_reward`, params ignored), a reward model's score
head at the last real token (`reward_model_reward`) or an ensemble of them (`ensemble_reward`).

EOS. The sampler stops a row after its EOS and includes the EOS in the response mask; a row that
fills the whole budget without EOS was truncated. `missing_eos_penalty` is subtracted from the
reward of truncated rows (the reward model never sees that the response was cut off).

Temperature. Log-probs (old, reference, and the update's) are those of the untempered models;
with a sampling temperature other than 1 the responses come from the tempered policy, and the
losses treat them as samples of the untempered one (no correction for the tempering is applied).

Dimension letters: P prompts, G samples per prompt, B = P * G, Tp prompt length, Tr response
length, T = Tp + Tr, E ensemble members.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rlhfjax import losses
from rlhfjax import sharding as shd
from rlhfjax import xla_options
from rlhfjax.sampling.sampler import SampleOutput, SamplingConfig, make_sampler, to_sequences
from rlhfjax.train import objectives, packing

RewardFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def programmatic_reward(fn: Callable[..., jax.Array]) -> RewardFn:
  """A reward source from a parameter-free jittable function of (prompts, responses), e.g.
  `rewards.verifiable_reward` or a `rewards.GoldReward`; its params argument is ignored."""

  def reward(params, prompt_tokens_BxTp, prompt_mask_BxTp, response_tokens_BxTr,
             response_mask_BxTr):
    del params
    return fn(prompt_tokens_BxTp, prompt_mask_BxTp, response_tokens_BxTr, response_mask_BxTr)

  return reward


def response_sequences(prompt_tokens_BxTp, prompt_mask_BxTp, response_tokens_BxTr,
                       response_mask_BxTr) -> dict[str, jax.Array]:
  """`to_sequences` from plain arrays (the reward signature carries no SampleOutput)."""
  zeros = jnp.zeros(response_tokens_BxTr.shape, jnp.float32)
  out = SampleOutput(response_tokens_BxTr, response_mask_BxTr, zeros, zeros,
                     response_mask_BxTr.sum(-1))
  return to_sequences(prompt_tokens_BxTp, prompt_mask_BxTp, out)


def reward_model_reward(graphdef: nnx.GraphDef) -> RewardFn:
  """A reward source from a reward model (a `Transformer` with a score head): its score at the
  last real token of prompt + response (`objectives.response_scores`); params are the model's."""

  def reward(params, prompt_tokens_BxTp, prompt_mask_BxTp, response_tokens_BxTr,
             response_mask_BxTr):
    seqs = response_sequences(prompt_tokens_BxTp, prompt_mask_BxTp, response_tokens_BxTr,
                              response_mask_BxTr)
    model = nnx.merge(graphdef, params)
    return objectives.response_scores(model, seqs["tokens"], seqs["attention_mask"])

  return reward


def ensemble_reward(members: Sequence[RewardFn], mode: str = "mean", *,
                    lam: float = 1.0) -> RewardFn:
  """A reward source combining E members with `losses.ensemble_reward` (mean, worst-case, or
  uncertainty-weighted); params is a sequence of the members' params, in order.

  References:
    Coste et al., "Reward Model Ensembles Help Mitigate Overoptimization", arXiv 2310.02743.
  """
  if not members:
    raise ValueError("ensemble_reward needs at least one member")
  if mode not in losses.ENSEMBLE_MODES:
    raise ValueError(f"ensemble mode must be one of {losses.ENSEMBLE_MODES}, got {mode!r}")
  members = tuple(members)

  def reward(params, *arrays):
    if len(params) != len(members):
      raise ValueError(f"ensemble of {len(members)} members got {len(params)} params")
    rewards_ExB = jnp.stack([fn(p, *arrays) for fn, p in zip(members, params)])
    return losses.ensemble_reward(rewards_ExB, mode, lam=lam)

  return reward


class Generation(NamedTuple):
  """The output of `Rollouts.generate`.

  Attributes:
    prompt_tokens: [B, Tp] prompts, each repeated G times (prompt-major).
    prompt_mask: [B, Tp].
    sample: the B sampled responses.
    greedy: the greedy responses of the P distinct prompts, or None.
    prompt_tokens_unique: [P, Tp] the prompts as given (needed to score `greedy`).
    prompt_mask_unique: [P, Tp].
  """
  prompt_tokens: jax.Array
  prompt_mask: jax.Array
  sample: SampleOutput
  greedy: SampleOutput | None
  prompt_tokens_unique: jax.Array
  prompt_mask_unique: jax.Array


class Rollout(NamedTuple):
  """A scored rollout: the batch of the online update. Per-token arrays are aligned with `tokens`
  like `losses.token_logprobs` and are 0 outside the response.

  Attributes:
    tokens, attention_mask, loss_mask: [B, T] the trainers' layout (loss_mask = response + EOS).
    logp_old: [B, T] the policy's log-probs of the sampled tokens at sampling time.
    logp_ref: [B, T] the reference's log-probs of the same tokens.
    entropy: [B, T] entropy of the policy's next-token distribution at each response token.
    rewards: [B] the reward source's rewards, minus `missing_eos_penalty` for truncated rows.
    has_eos: [B] bool, the response ended with EOS (False: truncated at the budget).
    lengths: [B] response lengths in tokens (EOS included).
    sampler_logp: [B, T] the sampler's own (KV-cache) log-probs, for diagnostics.
    gold_rewards: [B] the gold reward (a metric, never trained on), or None.
    greedy_rewards: [B] reward of the greedy response to the same prompt, or None.
    values: [B, T] the critic's values V_t, or None.
    component_rewards: [B, N] component rewards (constrained RLHF), or None.
  """
  tokens: jax.Array
  attention_mask: jax.Array
  loss_mask: jax.Array
  logp_old: jax.Array
  logp_ref: jax.Array
  entropy: jax.Array
  rewards: jax.Array
  has_eos: jax.Array
  lengths: jax.Array
  sampler_logp: jax.Array
  gold_rewards: jax.Array | None = None
  greedy_rewards: jax.Array | None = None
  values: jax.Array | None = None
  component_rewards: jax.Array | None = None

  def batch(self) -> dict[str, jax.Array]:
    """The non-empty fields as a dict (the batch of `objectives.make_policy_gradient_loss`)."""
    return {k: v for k, v in self._asdict().items() if v is not None}


def batch_sharded(tree: Any, mesh) -> Any:
  """Constrains every array's leading (batch) axis to the data-parallel mesh axes (inside jit)."""
  return jax.tree.map(
      lambda x: jax.lax.with_sharding_constraint(x, shd.batch_sharding(mesh, x.ndim)), tree)


def _prompt_padding(response_BxTr, prompt_len: int):
  """Per-response-token values placed in the response columns of a [B, Tp + Tr] array."""
  return jnp.pad(response_BxTr, ((0, 0), (prompt_len, 0)))


class Rollouts:
  """Builds the jit-compiled rollout phases for one policy, sampler and reward setup.

  Usage::

    rollouts = Rollouts(graphdef, SamplingConfig(...), mesh=mesh, group_size=4,
                        reward=programmatic_reward(verifiable_reward))
    rollout = rollouts(policy_params, ref_params, reward_params, None, prompt_tokens_PxTp,
                       prompt_mask_PxTp, rng)

  Args:
    policy_graphdef: the policy's structure (the reference shares it unless given).
    sampling: decoding settings of the sampled responses (temperature, top-k, ...).
    mesh: the device mesh; outputs are sharded on their batch axis.
    group_size: G, responses per prompt.
    reward: the trained-on reward source (`RewardFn`).
    reference_graphdef: the reference's structure; defaults to the policy's.
    greedy_baseline: also decode the greedy response of each prompt and score it (ReMax).
    gold: a parameter-free reward recorded as `gold_rewards` (e.g. the task's `GoldReward`).
    components: parameter-free rewards recorded as `component_rewards` [B, N] (constrained RLHF).
    value_graphdef: the critic's structure (a model with a score head), or None for no critic.
    missing_eos_penalty: subtracted from the reward of responses without EOS.
    recompute_logprobs: take `logp_old` from a full forward pass (True; the computation the
      update makes at the same parameters, so the first PPO ratio is 1 up to float rounding: the
      update's program, compiled with its backward pass, may sum in another order, about 1 ulp)
      rather than from the sampler's KV-cache pass (False; the entropies come from the sampler
      too, which saves the policy's forward pass; equal up to float error).
    logits_chunk_size: None, or positions per chunk for the policy's and the reference's
      log-probs (`objectives.token_stats`); use the update's setting so that the first PPO ratio
      stays 1 up to rounding.
    shared_prompt: run the policy and the reference once per prompt on its G responses packed
      behind it (`rlhfjax.train.packing`); use the update's setting (`OnlineSettings`).
    fuse_forward: when the policy's log-probs are recomputed and the reference shares the
      policy's structure, score both in one vmapped pass over their stacked parameters
      (`objectives.fused_token_stats`); the same log-probs up to float summation order. Half
      the kernels, each twice the work: for accelerators, where a small model's kernels are
      launch-bound. Off by default: on a 2-core CPU (the benchmark's GRPO rollout, 16 x 96
      tokens packed) it measured no faster, 0.357 s vs 0.337 s per scoring call.
  """

  def __init__(
      self,
      policy_graphdef: nnx.GraphDef,
      sampling: SamplingConfig,
      *,
      mesh,
      group_size: int,
      reward: RewardFn,
      reference_graphdef: nnx.GraphDef | None = None,
      greedy_baseline: bool = False,
      gold: Callable[..., jax.Array] | None = None,
      components: Sequence[Callable[..., jax.Array]] = (),
      value_graphdef: nnx.GraphDef | None = None,
      missing_eos_penalty: float = 0.0,
      recompute_logprobs: bool = True,
      logits_chunk_size: int | None = None,
      shared_prompt: bool = False,
      fuse_forward: bool = False,
  ):
    if group_size < 1:
      raise ValueError(f"group_size must be >= 1, got {group_size}")
    if sampling.greedy and group_size > 1:
      raise ValueError("group_size > 1 with greedy sampling (temperature 0) gives G identical "
                       "responses per prompt")
    if missing_eos_penalty < 0:
      raise ValueError(f"missing_eos_penalty must be >= 0, got {missing_eos_penalty}")
    self.sampling = sampling
    self.mesh = mesh
    self.group_size = group_size
    self.greedy_baseline = greedy_baseline
    self.has_critic = value_graphdef is not None
    self._policy_graphdef = policy_graphdef
    self._reference_graphdef = reference_graphdef or policy_graphdef
    self._value_graphdef = value_graphdef
    self._reward = reward
    self._gold = gold
    self._components = tuple(components)
    self._missing_eos_penalty = float(missing_eos_penalty)
    self._recompute = recompute_logprobs
    objectives.check_logits_chunk_size(logits_chunk_size)
    self.logits_chunk_size = logits_chunk_size
    self.shared_prompt = shared_prompt
    # Fused scoring needs two forward passes of one structure to fuse.
    self.fused = bool(fuse_forward and recompute_logprobs
                      and self._reference_graphdef == self._policy_graphdef)
    self._sample = make_sampler(policy_graphdef, sampling, jit=False, group_size=group_size)
    self._greedy = (make_sampler(policy_graphdef, SamplingConfig(
        max_new_tokens=sampling.max_new_tokens, eos_id=sampling.eos_id, pad_id=sampling.pad_id,
        temperature=0.0), jit=False) if greedy_baseline else None)
    options = xla_options.compiler_options(mesh)
    self.generate = jax.jit(self._generate, compiler_options=options)
    self.score = jax.jit(self._score, compiler_options=options)

  @property
  def num_components(self) -> int:
    return len(self._components)

  def _generate(self, policy_params, prompt_tokens_PxTp, prompt_mask_PxTp, rng) -> Generation:
    g = self.group_size
    prompt_tokens = jnp.repeat(prompt_tokens_PxTp, g, axis=0)
    prompt_mask = jnp.repeat(prompt_mask_PxTp, g, axis=0)
    prompt_tokens, prompt_mask = batch_sharded((prompt_tokens, prompt_mask), self.mesh)
    sample_rng, greedy_rng = jax.random.split(rng)
    sample = self._sample(policy_params, prompt_tokens_PxTp, prompt_mask_PxTp, sample_rng)
    greedy = None
    if self._greedy is not None:
      greedy = self._greedy(policy_params, prompt_tokens_PxTp, prompt_mask_PxTp, greedy_rng)
    return batch_sharded(Generation(prompt_tokens, prompt_mask, sample, greedy,
                                    prompt_tokens_PxTp, prompt_mask_PxTp), self.mesh)

  def _rewards(self, reward_params, prompt_tokens, prompt_mask, out: SampleOutput):
    reward = self._reward(reward_params, prompt_tokens, prompt_mask, out.tokens_BxTr,
                          out.mask_BxTr).astype(jnp.float32)
    return reward - self._missing_eos_penalty * (~_has_eos(out, self.sampling.eos_id))

  def _score(self, generation: Generation, policy_params, reference_params, reward_params,
             value_params) -> Rollout:
    gen, out = generation, generation.sample
    prompt_len = gen.prompt_tokens.shape[1]
    seqs = to_sequences(gen.prompt_tokens, gen.prompt_mask, out)
    tokens, attention_mask, loss_mask = seqs["tokens"], seqs["attention_mask"], seqs["loss_mask"]
    on_response = loss_mask != 0
    masked = lambda x: jnp.where(on_response, x, 0.0)

    stats_kwargs = dict(logits_chunk_size=self.logits_chunk_size, shared=(
        packing.SharedPrompt(prompt_len, self.group_size) if self.shared_prompt else None))
    sampler_logp = _prompt_padding(out.logprobs_BxTr, prompt_len)
    if self.fused:
      policy_stats, reference_stats = objectives.fused_token_stats(
          self._policy_graphdef, (policy_params, reference_params), tokens, attention_mask,
          with_entropy=True, **stats_kwargs)
      logp, entropy, logp_ref = policy_stats.logp, policy_stats.entropy, reference_stats.logp
    else:
      if self._recompute or out.entropies_BxTr is None:
        policy = nnx.merge(self._policy_graphdef, policy_params)
        logp, entropy = objectives.policy_token_stats(policy, seqs, **stats_kwargs)
      else:
        entropy = _prompt_padding(out.entropies_BxTr, prompt_len)
      reference = nnx.merge(self._reference_graphdef, reference_params)
      logp_ref = objectives.token_stats(reference, tokens, attention_mask, **stats_kwargs).logp
    logp_old = logp if self._recompute else sampler_logp

    rewards = self._rewards(reward_params, gen.prompt_tokens, gen.prompt_mask, out)
    gold = greedy_rewards = values = components = None
    if self._gold is not None:
      gold = self._gold(gen.prompt_tokens, gen.prompt_mask, out.tokens_BxTr,
                        out.mask_BxTr).astype(jnp.float32)
    if gen.greedy is not None:
      greedy_P = self._rewards(reward_params, gen.prompt_tokens_unique, gen.prompt_mask_unique,
                               gen.greedy)
      greedy_rewards = jnp.repeat(greedy_P, self.group_size, axis=0)
    if self._value_graphdef is not None:
      critic = nnx.merge(self._value_graphdef, value_params)
      values = masked(objectives.token_values(critic, tokens, attention_mask))
    if self._components:
      components = jnp.stack(
          [fn(gen.prompt_tokens, gen.prompt_mask, out.tokens_BxTr, out.mask_BxTr)
           for fn in self._components], axis=1).astype(jnp.float32)
    rollout = Rollout(
        tokens=tokens, attention_mask=attention_mask, loss_mask=loss_mask,
        logp_old=jax.lax.stop_gradient(masked(logp_old)),
        logp_ref=jax.lax.stop_gradient(masked(logp_ref)),
        entropy=masked(entropy), rewards=rewards, has_eos=_has_eos(out, self.sampling.eos_id),
        lengths=out.lengths_B, sampler_logp=masked(sampler_logp), gold_rewards=gold,
        greedy_rewards=greedy_rewards, values=values, component_rewards=components)
    return batch_sharded(rollout, self.mesh)

  def __call__(self, policy_params, reference_params, reward_params, value_params,
               prompt_tokens_PxTp, prompt_mask_PxTp, rng) -> Rollout:
    """`generate` then `score` (see the class docstring)."""
    generation = self.generate(policy_params, prompt_tokens_PxTp, prompt_mask_PxTp, rng)
    return self.score(generation, policy_params, reference_params, reward_params, value_params)


def _has_eos(out: SampleOutput, eos_id: int) -> jax.Array:
  """[B] bool: the response contains EOS inside its mask (the sampler stops right after it)."""
  return jnp.any((out.tokens_BxTr == eos_id) & (out.mask_BxTr != 0), axis=1)
