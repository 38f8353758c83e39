"""Online preference optimisation: sample pairs, judge them, take gradient steps on the pairs.

One iteration (`OnlinePreferenceTrainer.iterate`), each phase a jit-compiled program:

1. generate: for each of P prompts, K pairs of responses (B = P * K rows, prompt-major). Each side
   of a pair comes from one *source* (`SOURCES`): the policy, the previous iterate pi_t, the
   per-token geometric mixture ``softmax((1 - b) z_policy + b z_ref)`` (Nash-MD's opponent,
   `sampling.nash_md_mixture_weights`), or the data's demonstration (SPIN's real response);
2. judge: the probability ``p = P(first > second)`` from a judge (`bradley_terry_judge` over a
   gold or reward-model reward, or `preference_model_judge` over the pairwise preference model);
   hard labels order each pair into chosen / rejected (a Bernoulli draw from p, or the argmax);
   the frozen models' log-probs (reference, previous iterate) are computed here once;
3. update: `steps_per_iteration` optimizer steps of the algorithm's loss on the judged batch
   (`make_online_preference_loss`; only the policy runs inside the step);
4. refresh (SPIN, INPO): every `refresh_every` iterations the previous iterate pi_t becomes a copy
   of the policy.

Algorithms (`ALGORITHMS`), with their sources and losses (ALGORITHMS.md sections 3 and 5):

  ==========  ===================  ==========================================================
  algorithm   (first, second)      loss on the judged pair
  ==========  ===================  ==========================================================
  online_dpo  (policy, policy)     `losses.dpo` via `objectives.make_preference_loss`, hard
                                   labels, reference = the frozen SFT policy
  online_ipo  (policy, policy)     `losses.online_ipo` weighted by p (soft labels by default)
  ipo_md      (mixture, mixture)   `losses.online_ipo` on mixture samples (IPO-MD)
  nash_md_pg  (policy, mixture)    `losses.nash_md_pg` on y ~ pi with P(y > y'), y' ~ mixture
  spin        (data, previous)     `losses.spin` via `make_preference_loss`: chosen = the
                                   demonstration, rejected = a sample of pi_t, reference = pi_t
  inpo        (previous, previous) `losses.inpo` with mu = SFT and pi_t = the previous iterate
  ==========  ===================  ==========================================================

Dimension letters: P prompts, K pairs per prompt, B = P * K, Tp prompt length, Tr response length,
T = Tp + Tr.

References:
  Guo et al., "Direct Language Model Alignment from Online AI Feedback", arXiv 2402.04792
  (online DPO); Calandriello et al., arXiv 2403.08635 (online IPO, IPO-MD); Munos et al., arXiv
  2312.00886 (Nash-MD-PG); Chen et al., arXiv 2401.01335 (SPIN); Zhang et al., arXiv 2407.00617
  (INPO); Rosset et al., arXiv 2404.03715 (DNO).
"""

from __future__ import annotations

import dataclasses
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
from rlhfjax.sampling import decoding
from rlhfjax import xla_options
from rlhfjax.sampling.sampler import SampleOutput, SamplingConfig, make_sampler, to_sequences
from rlhfjax.train import objectives
from rlhfjax.train import rollout as rollout_lib
from rlhfjax.train import steps as steps_lib
from rlhfjax.train.state import TrainState

ALGORITHMS = ("online_dpo", "online_ipo", "ipo_md", "nash_md_pg", "spin", "inpo")

# Where each side of a pair comes from.
SOURCES: dict[str, tuple[str, str]] = {
    "online_dpo": ("policy", "policy"),
    "online_ipo": ("policy", "policy"),
    "ipo_md": ("mixture", "mixture"),
    "nash_md_pg": ("policy", "mixture"),
    "spin": ("data", "previous"),
    "inpo": ("previous", "previous"),
}

# The keyword arguments of each algorithm's loss, with defaults (the papers' where they apply to
# summed log-ratios; tune for a task).
LOSS_DEFAULTS: dict[str, dict[str, float]] = {
    "online_dpo": dict(beta=0.1),
    "online_ipo": dict(tau=1.0),
    "ipo_md": dict(tau=1.0),
    "nash_md_pg": dict(tau=0.008),
    "spin": dict(beta=0.1),
    "inpo": dict(tau=0.05, eta=0.1),
}

# How a judged pair becomes a training example: a hard label drawn from p ("sampled"), the more
# preferred response ("argmax"), or p itself as a soft weight ("probability", IPO losses only).
LABELS = ("sampled", "argmax", "probability")
SOFT_LABEL_ALGORITHMS = ("online_ipo", "ipo_md")
# Labels when none are asked for: the IPO losses weigh both orders by p (Calandriello et al.),
# the others train on a preference drawn from p, as a judge that returns a winner would give.
DEFAULT_LABELS = {a: "probability" if a in SOFT_LABEL_ALGORITHMS else "sampled"
                  for a in ALGORITHMS}
# Algorithms whose reference is the previous iterate, refreshed every `refresh_every` iterations.
ITERATIVE_ALGORITHMS = ("spin", "inpo")

# judge(params, prompt_tokens_BxTp, prompt_mask_BxTp, first_tokens_BxTr, first_mask_BxTr,
#       second_tokens_BxTr, second_mask_BxTr) -> P(first > second) [B].
JudgeFn = Callable[..., jax.Array]


def bradley_terry_judge(reward: rollout_lib.RewardFn, *, temperature: float = 1.0) -> JudgeFn:
  """A judge from a reward source: ``P(y > y') = sigma((r(y) - r(y')) / temperature)``.

  With the synthetic task's gold reward (`rollout.programmatic_reward(tasks.gold_reward)`) and its
  label temperature this is exactly the process that labelled the offline pairs; with a reward
  model (`rollout.reward_model_reward`) it is the model's Bradley-Terry probability.
  """
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")

  def judge(params, prompt_tokens, prompt_mask, first_tokens, first_mask, second_tokens,
            second_mask):
    r_first = reward(params, prompt_tokens, prompt_mask, first_tokens, first_mask)
    r_second = reward(params, prompt_tokens, prompt_mask, second_tokens, second_mask)
    return jax.nn.sigmoid((r_first - r_second).astype(jnp.float32) / temperature)

  return judge


def preference_model_judge(graphdef: nnx.GraphDef) -> JudgeFn:
  """A judge from the pairwise preference model (`objectives.pairwise_preference_logits`, trained
  by `objectives.make_pairwise_preference_loss`): ``P(y > y') = sigma(s(x, y, y'))``."""

  def judge(params, prompt_tokens, prompt_mask, first_tokens, first_mask, second_tokens,
            second_mask):
    first = rollout_lib.response_sequences(prompt_tokens, prompt_mask, first_tokens, first_mask)
    second = rollout_lib.response_sequences(prompt_tokens, prompt_mask, second_tokens,
                                            second_mask)
    fields = lambda s: (s["tokens"], s["attention_mask"], s["loss_mask"])
    logits = objectives.pairwise_preference_logits(nnx.merge(graphdef, params), fields(first),
                                                   fields(second))
    return jax.nn.sigmoid(logits.astype(jnp.float32))

  return judge


@dataclasses.dataclass(frozen=True)
class PreferenceSettings:
  """What an online preference run trains with (static).

  Attributes:
    algorithm: one of `ALGORITHMS`.
    pairs_per_prompt: K, pairs sampled per prompt.
    steps_per_iteration: optimizer steps on each judged batch.
    labels: one of `LABELS` ("probability" only for `SOFT_LABEL_ALGORITHMS`), or None for the
      algorithm's `DEFAULT_LABELS`. Ignored by nash_md_pg (which uses p itself) and spin (the
      demonstration is always chosen).
    mixture_coef: b of the geometric mixture ``pi^(1-b) mu^b`` (ipo_md, nash_md_pg).
    refresh_every: iterations between refreshes of the previous iterate (spin, inpo).
    loss_kwargs: the loss's settings (`LOSS_DEFAULTS[algorithm]`).
  """
  algorithm: str
  pairs_per_prompt: int = 1
  steps_per_iteration: int = 1
  labels: str | None = None
  mixture_coef: float = 0.125
  refresh_every: int = 1
  loss_kwargs: Mapping[str, float] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    a = self.algorithm
    if a not in ALGORITHMS:
      raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {a!r}")
    for name in ("pairs_per_prompt", "steps_per_iteration", "refresh_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.labels is None:
      object.__setattr__(self, "labels", DEFAULT_LABELS[a])
    if self.labels not in LABELS:
      raise ValueError(f"labels must be one of {LABELS}, got {self.labels!r}")
    if self.labels == "probability" and a not in SOFT_LABEL_ALGORITHMS:
      raise ValueError(f"labels='probability' (soft labels) needs one of {SOFT_LABEL_ALGORITHMS}, "
                       f"got {a}")
    decoding.nash_md_mixture_weights(self.mixture_coef)  # Checks 0 <= b <= 1.
    unknown = sorted(set(self.loss_kwargs) - set(LOSS_DEFAULTS[a]))
    if unknown:
      raise ValueError(f"loss_kwargs of {a} has unknown keys {unknown}; valid: "
                       f"{sorted(LOSS_DEFAULTS[a])}")
    kw = self.loss
    if a == "inpo" and not 0 <= kw["tau"] <= kw["eta"]:
      raise ValueError(f"inpo needs 0 <= tau <= eta, got tau={kw['tau']}, eta={kw['eta']}")

  @property
  def loss(self) -> dict[str, float]:
    """The loss's settings with defaults filled in."""
    return {**LOSS_DEFAULTS[self.algorithm], **self.loss_kwargs}

  @property
  def sources(self) -> tuple[str, str]:
    return SOURCES[self.algorithm]

  @property
  def iterative(self) -> bool:
    """The algorithm keeps a previous iterate pi_t (refreshed every `refresh_every`)."""
    return self.algorithm in ITERATIVE_ALGORITHMS

  @property
  def needs_judge(self) -> bool:
    return self.algorithm != "spin"


def _pair_logps(model: nnx.Module, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Sequence log-probs [B] of chosen and rejected, one forward pass for both."""
  _, logps = objectives.sequence_logps(model, *objectives.stack_pairs(batch))
  return tuple(jnp.split(logps, 2))


def make_online_preference_loss(algorithm: str, loss_kwargs: Mapping[str, float] | None = None
                                ) -> Callable:
  """`loss(model, batch) -> (loss, metrics)` of one online preference algorithm.

  The frozen models' log-probs arrive in the batch (computed once per iteration by the judge
  phase), so only the policy runs. Batch fields (B rows):

    - online_dpo, spin: a preference batch (`chosen_*`, `rejected_*` [B, T]) with
      `reference_chosen_logps`, `reference_rejected_logps` [B];
      `objectives.make_preference_loss(kind, reference="precomputed")` (for spin the reference
      log-probs are the previous iterate's).
    - online_ipo, ipo_md: the same plus `chosen_weight` [B] (p of the chosen response for soft
      labels, 1 for hard ones): `losses.online_ipo`.
    - inpo: the same plus `previous_chosen_logps`, `previous_rejected_logps` [B]: `losses.inpo`.
    - nash_md_pg: `tokens`, `attention_mask`, `loss_mask` [B, T] of y ~ pi, `reference_logps`
      and `preference_probs` = P(y > y') [B]: `losses.nash_md_pg`.

  Args:
    algorithm: one of `ALGORITHMS`.
    loss_kwargs: the loss's settings (`LOSS_DEFAULTS`).

  Returns:
    The model loss; metrics `margin` (mean h) and `reward_accuracy` for pair losses, `logp`.
  """
  if algorithm not in ALGORITHMS:
    raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
  kw = {**LOSS_DEFAULTS[algorithm], **(loss_kwargs or {})}
  if algorithm in ("online_dpo", "spin"):
    return objectives.make_preference_loss(algorithm.removeprefix("online_"), kw,
                                           reference="precomputed")
  sg = jax.lax.stop_gradient

  def loss(model, batch):
    if algorithm == "nash_md_pg":
      _, lp = objectives.sequence_logps(model, batch["tokens"], batch["attention_mask"],
                                        batch["loss_mask"])
      per_example = losses.nash_md_pg(lp, batch["reference_logps"], batch["preference_probs"],
                                      **kw)
      return jnp.mean(per_example), {"logp": sg(jnp.mean(lp)),
                                     "log_ratio": sg(jnp.mean(lp - batch["reference_logps"]))}
    pc, pr = _pair_logps(model, batch)
    rc, rr = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
    if algorithm == "inpo":
      per_pair = losses.inpo(pc, pr, rc, rr, batch["previous_chosen_logps"],
                             batch["previous_rejected_logps"], **kw)
    else:
      per_pair = losses.online_ipo(pc, pr, rc, rr, batch["chosen_weight"], **kw)
    h = losses.log_ratio_margin(pc, pr, rc, rr)
    return jnp.mean(per_pair), {"margin": sg(jnp.mean(h)), "reward_accuracy": sg(jnp.mean(h > 0)),
                                "logp": sg(jnp.mean(jnp.concatenate([pc, pr])))}

  return loss


class PairGeneration(NamedTuple):
  """The output of `OnlinePreferenceTrainer.generate`: two responses to each of B prompt rows.

  Attributes:
    prompt_tokens, prompt_mask: [B, Tp] the prompts, each repeated K times (prompt-major).
    first, second: the two sides of each pair ([B, Tr] fields).
  """
  prompt_tokens: jax.Array
  prompt_mask: jax.Array
  first: SampleOutput
  second: SampleOutput


class PreferenceState(NamedTuple):
  """Everything an iteration updates.

  Attributes:
    policy: the policy's TrainState.
    previous: params of the previous iterate pi_t (spin, inpo), or None.
    iteration: int32 scalar, iterations done.
  """
  policy: TrainState
  previous: Any
  iteration: jax.Array


def _demonstrations(response_tokens_BxTr, response_mask_BxTr) -> SampleOutput:
  """Data responses as a `SampleOutput` (log-probs 0: nothing sampled them)."""
  zeros = jnp.zeros(response_tokens_BxTr.shape, jnp.float32)
  return SampleOutput(response_tokens_BxTr, response_mask_BxTr, zeros, zeros,
                      response_mask_BxTr.sum(-1))


def _ordered(first_wins_B, first, second):
  """(chosen, rejected): per row, `first` if it wins, else `second` (any matching pytrees)."""
  pick = lambda a, b: jnp.where(first_wins_B.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
  return jax.tree.map(pick, first, second), jax.tree.map(pick, second, first)


class OnlinePreferenceTrainer:
  """Runs online preference iterations for one algorithm (see the module docstring).

  Args:
    settings: `PreferenceSettings`.
    sampling: decoding settings of the sampled responses (without `mixture_weights`).
    mesh: the device mesh.
    policy_graphdef: the policy's structure (the reference and previous iterate share it).
    optimizer: the policy's optax transform.
    state_shardings: the policy TrainState's shardings.
    reference_params: the frozen reference mu (the SFT policy).
    judge: a `JudgeFn` (unused by spin: pass None).
    judge_params: the judge's params (None for a programmatic reward).
    gold: a parameter-free reward ``gold(prompt_tokens, prompt_mask, response_tokens,
      response_mask) -> [B]`` recorded as a metric of the policy's samples, or None.
  """

  def __init__(self, settings: PreferenceSettings, sampling: SamplingConfig, *, mesh,
               policy_graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
               state_shardings: TrainState, reference_params: Any, judge: JudgeFn | None = None,
               judge_params: Any = None, gold: Callable[..., jax.Array] | None = None):
    if settings.needs_judge and judge is None:
      raise ValueError(f"{settings.algorithm} needs a judge")
    if sampling.mixture_weights is not None:
      raise ValueError("pass a SamplingConfig without mixture_weights; the trainer builds the "
                       f"mixture from mixture_coef (got {sampling.mixture_weights})")
    if sampling.greedy and settings.sources[0] == settings.sources[1]:
      raise ValueError("greedy sampling (temperature 0) gives two identical responses per pair")
    self.settings = settings
    self.sampling = sampling
    self.mesh = mesh
    self.reference_params = reference_params
    self.judge_params = judge_params
    self._graphdef = policy_graphdef
    self._judge = judge
    self._gold = gold
    self._sample = make_sampler(policy_graphdef, sampling, jit=False)
    self._sample_mixture = make_sampler(
        (policy_graphdef, policy_graphdef),
        dataclasses.replace(sampling, mixture_weights=decoding.nash_md_mixture_weights(
            settings.mixture_coef)), jit=False)
    self.step = steps_lib.make_train_step(
        make_online_preference_loss(settings.algorithm, settings.loss), optimizer,
        policy_graphdef, mesh, state_shardings)
    options = xla_options.compiler_options(mesh)
    self.generate = jax.jit(self._generate, compiler_options=options)
    self.judge = jax.jit(self._judge_pairs, compiler_options=options)

  def init_state(self, policy_state: TrainState) -> PreferenceState:
    """The initial state; the previous iterate starts as a copy of the policy."""
    previous = self._copy(policy_state.params) if self.settings.iterative else None
    return PreferenceState(policy_state, previous,
                           jax.device_put(jnp.int32(0), shd.replicated(self.mesh)))

  @staticmethod
  def _copy(params):
    # A copy: the step donates the policy's buffers.
    return jax.tree.map(lambda x: x.copy(), params)

  # -- phases ---------------------------------------------------------------------------------

  def _sample_side(self, source, policy_params, reference_params, previous_params,
                   prompt_tokens, prompt_mask, demonstrations, rng) -> SampleOutput:
    if source == "policy":
      return self._sample(policy_params, prompt_tokens, prompt_mask, rng)
    if source == "previous":
      return self._sample(previous_params, prompt_tokens, prompt_mask, rng)
    if source == "mixture":
      return self._sample_mixture((policy_params, reference_params), prompt_tokens, prompt_mask,
                                  rng)
    if demonstrations is None:
      raise ValueError(f"{self.settings.algorithm} pairs data responses: the prompts need "
                       "`response_tokens` and `response_mask`")
    return demonstrations

  def _generate(self, policy_params, reference_params, previous_params,
                prompts: Mapping[str, jax.Array], rng) -> PairGeneration:
    """Phase 1: K pairs per prompt from the algorithm's sources.

    The first side is sampled with ``jax.random.split(rng)[0]``, the second with ``[1]``; every
    sampler draws row by row, so a side's responses equal those of its sampler run alone on the
    repeated prompts with that key.
    """
    k = self.settings.pairs_per_prompt
    repeat = lambda x: jnp.repeat(x, k, axis=0)
    prompt_tokens, prompt_mask = rollout_lib.batch_sharded(
        (repeat(prompts["prompt_tokens"]), repeat(prompts["prompt_mask"])), self.mesh)
    demonstrations = None
    if "response_tokens" in prompts:
      demonstrations = _demonstrations(repeat(prompts["response_tokens"]),
                                       repeat(prompts["response_mask"]))
    keys = jax.random.split(rng)
    first, second = (self._sample_side(source, policy_params, reference_params, previous_params,
                                       prompt_tokens, prompt_mask, demonstrations, key)
                     for source, key in zip(self.settings.sources, keys))
    return rollout_lib.batch_sharded(PairGeneration(prompt_tokens, prompt_mask, first, second),
                                     self.mesh)

  def _logps(self, params, seqs):
    model = nnx.merge(self._graphdef, jax.lax.stop_gradient(params))
    return objectives.sequence_logps(model, seqs["tokens"], seqs["attention_mask"],
                                     seqs["loss_mask"])[1]

  def _judge_pairs(self, generation: PairGeneration, reference_params, previous_params,
                   judge_params, rng) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Phase 2: the judged training batch (fields of `make_online_preference_loss`) and metrics.

    Hard labels use ``jax.random.uniform(rng, [B]) < p`` ("sampled") or ``p >= 1/2``.
    """
    s, gen = self.settings, generation
    pt, pm = gen.prompt_tokens, gen.prompt_mask
    seqs = [to_sequences(pt, pm, side) for side in (gen.first, gen.second)]
    metrics = {}
    if s.needs_judge:
      p = self._judge(judge_params, pt, pm, gen.first.tokens_BxTr, gen.first.mask_BxTr,
                      gen.second.tokens_BxTr, gen.second.mask_BxTr).astype(jnp.float32)
      metrics["judge_prob_first"] = jnp.mean(p)
    else:
      p = jnp.ones(pt.shape[:1], jnp.float32)  # SPIN: the demonstration is always chosen.
    for name, side, seq in zip(("first", "second"), (gen.first, gen.second), seqs):
      metrics[f"{name}_len"] = jnp.mean(side.lengths_B.astype(jnp.float32))
      if self._gold is not None:
        metrics[f"{name}_gold_reward"] = jnp.mean(
            self._gold(pt, pm, side.tokens_BxTr, side.mask_BxTr))
    if s.algorithm == "nash_md_pg":
      ref = self._logps(reference_params, seqs[0])
      batch = {**seqs[0], "reference_logps": ref, "preference_probs": p}
      return rollout_lib.batch_sharded(batch, self.mesh), metrics

    if s.labels == "sampled" and s.needs_judge:
      first_wins = jax.random.uniform(rng, p.shape) < p
    else:
      first_wins = p >= 0.5
    chosen, rejected = _ordered(first_wins, *seqs)
    chosen_prob = jnp.where(first_wins, p, 1.0 - p)
    batch = {**{f"chosen_{k}": v for k, v in chosen.items()},
             **{f"rejected_{k}": v for k, v in rejected.items()}}
    stacked = {k: jnp.concatenate([chosen[k], rejected[k]]) for k in chosen}
    # SPIN's reference is the previous iterate; the others' is the frozen reference mu.
    ref_c, ref_r = jnp.split(self._logps(
        previous_params if s.algorithm == "spin" else reference_params, stacked), 2)
    batch.update(reference_chosen_logps=ref_c, reference_rejected_logps=ref_r)
    if s.algorithm in SOFT_LABEL_ALGORITHMS:
      batch["chosen_weight"] = chosen_prob if s.labels == "probability" else jnp.ones_like(p)
    if s.algorithm == "inpo":
      prev_c, prev_r = jnp.split(self._logps(previous_params, stacked), 2)
      batch.update(previous_chosen_logps=prev_c, previous_rejected_logps=prev_r)
    metrics["chosen_prob"] = jnp.mean(chosen_prob)
    return rollout_lib.batch_sharded(batch, self.mesh), metrics

  def judged_batch(self, state: PreferenceState, prompts: Mapping[str, jax.Array], rng,
                   lap: Callable[[str, Any], Any] = lambda name, value: value):
    """Phases 1 and 2 without an update: (generation, batch, metrics), exactly those `iterate`
    trains on with the same rng (generation with ``split(rng)[0]``, labels with ``[1]``); `lap`
    times each phase."""
    gen_key, label_key = jax.random.split(rng)
    generation = lap("generate_s", self.generate(state.policy.params, self.reference_params,
                                                 state.previous, prompts, gen_key))
    batch, metrics = lap("judge_s", self.judge(generation, self.reference_params, state.previous,
                                               self.judge_params, label_key))
    return generation, batch, metrics

  def iterate(self, state: PreferenceState, prompts: Mapping[str, jax.Array],
              rng: jax.Array) -> tuple[PreferenceState, dict[str, float]]:
    """One iteration: generate, judge, `steps_per_iteration` updates, refresh of pi_t.

    Args:
      state: the current state (its policy TrainState is donated: use the returned one).
      prompts: `prompt_tokens`, `prompt_mask` [P, Tp] (and for spin the demonstrations
        `response_tokens`, `response_mask` [P, Tr]), sharded on the batch axis.
      rng: key of this iteration (sampling and labels).

    Returns:
      (new state, metrics as floats): the judge phase's (`judge_prob_first`, `chosen_prob`,
      `first_gold_reward`, ...), the update's averaged over its steps (`loss`, `grad_norm`,
      `margin`, ...), `refreshed` (1.0 when pi_t was replaced) and wall times (`generate_s`,
      `judge_s`, `update_s`, `iteration_s`).
    """
    s = self.settings
    t_start = t = time.perf_counter()
    times = {}

    def lap(name, value):
      nonlocal t
      jax.block_until_ready(value)
      now = time.perf_counter()
      times[name], t = now - t, now
      return value

    _, batch, judge_metrics = self.judged_batch(state, prompts, rng, lap)
    policy, step_metrics = state.policy, []
    for _ in range(s.steps_per_iteration):
      policy, metrics = self.step(policy, batch)
      step_metrics.append(metrics)
    lap("update_s", policy)
    iteration = int(state.iteration) + 1
    previous, refreshed = state.previous, False
    if s.iterative and iteration % s.refresh_every == 0:
      previous, refreshed = self._copy(policy.params), True
    new_state = PreferenceState(policy, previous, state.iteration + 1)

    out = {k: float(v) for k, v in jax.device_get(judge_metrics).items()}
    step_metrics = jax.device_get(step_metrics)
    for key in step_metrics[0]:
      out[key] = float(np.mean([m[key] for m in step_metrics]))
    out["refreshed"] = float(refreshed)
    out.update(times)
    out["iteration_s"] = time.perf_counter() - t_start
    return new_state, out
