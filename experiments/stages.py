"""The stages of the pipeline (SFT, reward model, offline preference optimisation), each a
composition of the generic train step with one objective; experiment modules chain them."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from experiments import common
from rlhfjax import data as data_lib
from rlhfjax import sharding as shd
from rlhfjax.train import loop as loop_lib
from rlhfjax.train import objectives
from rlhfjax.train import online as online_lib
from rlhfjax.train import state as state_lib


@dataclasses.dataclass
class Context:
  """What every stage of one run shares."""
  config: ml_collections.ConfigDict
  run_dir: str
  mesh: Any
  tasks: common.Tasks
  graphdef: nnx.GraphDef
  evaluator: common.PolicyEvaluator
  records: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, experiment: str) -> "Context":
    common.validate(config)
    run_dir = common.resolve_run_dir(config, experiment)
    mesh = common.make_mesh(config)
    tasks = common.load_tasks(config)
    graphdef, _, _ = state_lib.abstract_model(common.model_fn(config, seed=config.seed))
    return cls(config, run_dir, mesh, tasks, graphdef,
               common.PolicyEvaluator(config, tasks, graphdef, mesh))


def _collate(config, batch_fn_name):
  return functools.partial(getattr(data_lib, batch_fn_name), prompt_len=config.prompt_len,
                           response_len=config.response_len)


def run_sft(ctx: Context) -> tuple[Any, dict]:
  """SFT on both tasks' demonstrations. Returns (params, summary row)."""
  c = ctx.config
  source = common.ConcatSource([ctx.tasks.verifiable_train, ctx.tasks.preference_sft])
  t0 = time.perf_counter()
  _, state, records = common.train_stage(
      c.sft, name="sft", run_dir=ctx.run_dir, mesh=ctx.mesh,
      build_model=common.model_fn(c, seed=c.seed),
      loss_fn=objectives.make_sft_loss(c.sft.loss, aggregation=c.sft.aggregation,
                                       gem_beta=c.sft.gem_beta, gem_h=c.sft.gem_h,
                                       logits_chunk_size=c.logits_chunk_size),
      get_batch=common.batch_fn(source, _collate(c, "sft_batch"),
                                batch_size=c.sft.loop.batch_size, seed=c.seed),
      eval_fn=ctx.evaluator)
  ctx.records["sft"] = records
  return state.params, {"method": "sft", **ctx.evaluator(state.params),
                        "train_s": time.perf_counter() - t0}


def split_pairs(ctx: Context) -> tuple[Any, Any]:
  """The preference pairs split into (train, held-out) sources by `reward_model.eval_fraction`."""
  pairs = ctx.tasks.preference_pairs
  n_eval = int(len(pairs) * ctx.config.reward_model.eval_fraction)
  return common.Subset(pairs, range(n_eval, len(pairs))), common.Subset(pairs, range(n_eval))


def run_reward_model(ctx: Context, sft_params: Any) -> tuple[Any, dict]:
  """Bradley-Terry reward model with a score head, initialised from the SFT policy.

  Returns (params, summary row with held-out pair accuracy against the labels and the gold order).
  """
  c, rc = ctx.config, ctx.config.reward_model
  train, held_out = split_pairs(ctx)
  collate = _collate(c, "preference_batch")
  build = common.model_fn(c, seed=c.seed + 2, score_head=True)
  rm_graphdef, _, _ = state_lib.abstract_model(build)
  loss_fn = objectives.make_reward_model_loss(margin=rc.margin, center_coef=rc.center_coef)
  eval_batch = shd.shard_batch(collate(data_lib.gather(held_out, _even(len(held_out), ctx.mesh))),
                               ctx.mesh)
  evaluate = jax.jit(lambda params, batch: loss_fn(nnx.merge(rm_graphdef, params), batch)[1])
  t0 = time.perf_counter()
  _, state, records = common.train_stage(
      rc, name="reward_model", run_dir=ctx.run_dir, mesh=ctx.mesh, build_model=build,
      loss_fn=loss_fn,
      get_batch=common.batch_fn(train, collate, batch_size=rc.loop.batch_size, seed=c.seed),
      init_params=sft_params,
      eval_fn=lambda params: {k: float(v) for k, v in evaluate(params, eval_batch).items()})
  ctx.records["reward_model"] = records
  held = {k: float(v) for k, v in evaluate(state.params, eval_batch).items()}
  return state.params, {"method": "reward_model", "rm_accuracy": held["accuracy"],
                        "rm_gold_agreement": held["gold_agreement"],
                        "train_s": time.perf_counter() - t0}


def _even(n: int, mesh) -> range:
  return range(n - n % shd.num_batch_shards(mesh))


def run_offline(ctx: Context, sft_params: Any, loss: str | None = None) -> tuple[Any, dict]:
  """Offline preference optimisation from the SFT policy against it as the frozen reference."""
  c, oc = ctx.config, ctx.config.offline
  loss = loss or oc.loss
  if loss not in objectives.PREFERENCE_LOSSES:
    raise ValueError(f"config.offline.loss must be one of {objectives.PREFERENCE_LOSSES}, "
                     f"got {loss!r}")
  train, _ = split_pairs(ctx)
  collate = _collate(c, "preference_batch")
  build = common.model_fn(c, seed=c.seed)
  _, ref_params, ref_shardings = state_lib.frozen_params(build, ctx.mesh, sft_params)
  frozen, frozen_shardings, extras = (ref_params,), (ref_shardings,), None
  if oc.reference == "precomputed":
    extras = precompute_reference(ctx.graphdef, ctx.mesh, ref_params, train, collate,
                                  **common.logp_kwargs(c))
    frozen, frozen_shardings = (), ()
  loss_fn = objectives.make_preference_loss(loss, oc[loss].to_dict(), reference=oc.reference,
                                            reference_graphdef=ctx.graphdef,
                                            **common.logp_kwargs(c))
  t0 = time.perf_counter()
  _, state, records = common.train_stage(
      oc, name=loss, run_dir=ctx.run_dir, mesh=ctx.mesh, build_model=build, loss_fn=loss_fn,
      get_batch=common.batch_fn(train, collate, batch_size=oc.loop.batch_size, seed=c.seed,
                                extras=extras),
      frozen=frozen, frozen_shardings=frozen_shardings, init_params=sft_params,
      eval_fn=lambda params: ctx.evaluator(params, ref_params))
  ctx.records[loss] = records
  return state.params, {"method": loss, **ctx.evaluator(state.params, ref_params),
                        "train_s": time.perf_counter() - t0}


def precompute_reference(graphdef: nnx.GraphDef, mesh: Any, ref_params: Any, source: Any,
                         collate, *, chunk: int = 256, **logp_kwargs) -> dict:
  """Reference log-probs of every example of `source`: {name: [N] numpy array}.

  One forward pass per `chunk` examples (rounded down to a multiple of the mesh's batch shards;
  the last chunk is padded with copies of its first example, dropped from the result).

  Args:
    graphdef: the reference model's structure.
    mesh: the device mesh.
    ref_params: the reference's parameters.
    source: random-access examples.
    collate: `collate(examples) -> batch` (e.g. `data.preference_batch`).
    chunk: examples per forward pass.
    **logp_kwargs: `objectives.reference_logps` settings (chunked logits, shared-prompt packing).

  Returns:
    `objectives.reference_logps` of every example, in order.
  """
  shards = shd.num_batch_shards(mesh)
  size = chunk - chunk % shards
  if size < 1:
    raise ValueError(f"chunk ({chunk}) must be at least the mesh's {shards} batch shards")
  compute = jax.jit(lambda p, b: objectives.reference_logps(nnx.merge(graphdef, p), b,
                                                            **logp_kwargs))
  parts = []
  for start in range(0, len(source), size):
    idx = np.arange(start, min(start + size, len(source)))
    pad = (-len(idx)) % shards
    batch = collate(data_lib.gather(source, np.concatenate([idx, idx[:1].repeat(pad)])))
    out = jax.device_get(compute(ref_params, shd.shard_batch(batch, mesh)))
    parts.append({k: v[:len(idx)] for k, v in out.items()})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# -- Online RL ------------------------------------------------------------------------------------

ONLINE_TASKS = ("verifiable", "preference")
REWARD_SOURCES = ("programmatic", "gold", "reward_model", "ensemble")


def _online_reward(ctx: Context, sft_params: Any, task: str, reward_source: str,
                   reward_params: Any) -> tuple[Any, Any, Any, dict]:
  """(reward fn, its params, params to start a critic from or None, extra summary fields)."""
  from rlhfjax.rewards import verifiable_reward
  from rlhfjax.train import rollout as rollout_lib

  del task  # `online_settings` checked that the source fits the task.
  c, oc = ctx.config, ctx.config.online
  if reward_source == "programmatic":
    return rollout_lib.programmatic_reward(verifiable_reward), None, None, {}
  if reward_source == "gold":
    return rollout_lib.programmatic_reward(ctx.tasks.gold_reward), None, None, {}
  rm_graphdef, _, _ = state_lib.abstract_model(common.model_fn(c, seed=c.seed + 2,
                                                               score_head=True))
  member = rollout_lib.reward_model_reward(rm_graphdef)
  extra = {}
  if reward_source == "reward_model":
    if reward_params is None:
      reward_params, rm_row = run_reward_model(ctx, sft_params)
      extra = {k: v for k, v in rm_row.items() if k.startswith("rm_")}
    return member, reward_params, reward_params, extra
  if reward_params is None:
    # Members differ by seed (initialisation of the score head and data order), as in Coste et al.
    reward_params, accuracies = [], []
    for k in range(oc.ensemble_size):
      member_config = ctx.config.copy_and_resolve_references()
      member_config.seed = c.seed + 100 * (k + 1)
      member_ctx = dataclasses.replace(ctx, config=member_config, records={})
      params, rm_row = run_reward_model(member_ctx, sft_params)
      ctx.records[f"reward_model_{k}"] = member_ctx.records["reward_model"]
      reward_params.append(params)
      accuracies.append(rm_row["rm_gold_agreement"])
    extra = {"rm_gold_agreement": float(np.mean(accuracies))}
  reward = rollout_lib.ensemble_reward([member] * len(reward_params), oc.ensemble_mode,
                                       lam=oc.ensemble_lam)
  return reward, tuple(reward_params), reward_params[0], extra


@functools.lru_cache(maxsize=8)
def _accuracy_sampler(graphdef, sampling):
  from rlhfjax.sampling import make_sampler

  return make_sampler(graphdef, sampling)


def sampled_accuracy(ctx: Context, params: Any, num_samples: int = 4) -> float:
  """Exact-match accuracy of responses sampled at `config.eval.temperature` (1.0: the policy
  itself) on the verifiable task's held-out prompts, averaged over `num_samples` draws.

  The evaluator's `accuracy` is greedy; after SFT on demonstrations with corrupted answers the
  sampled accuracy is lower, and it is what RL on the exact-match reward raises first.
  """
  from rlhfjax.rewards import verifiable_reward, vocab
  from rlhfjax.sampling import SamplingConfig

  c = ctx.config
  sample = _accuracy_sampler(ctx.graphdef, SamplingConfig(
      max_new_tokens=c.response_len, eos_id=vocab.EOS_ID, pad_id=vocab.PAD_ID,
      temperature=c.eval.temperature))
  prompts = common.prompts_of(c, ctx.tasks.verifiable_test, ctx.mesh)
  total = 0.0
  for k in range(num_samples):
    out = sample(params, prompts["prompt_tokens"], prompts["prompt_mask"],
                 jax.random.fold_in(jax.random.key(c.seed + 7), k))
    total += float(jax.numpy.mean(verifiable_reward(prompts["prompt_tokens"],
                                                    prompts["prompt_mask"], out.tokens_BxTr,
                                                    out.mask_BxTr)))
  return total / num_samples


COMPONENT_REWARDS = ("accuracy", "gold_reward")


def online_settings(config: ml_collections.ConfigDict, algorithm: str | None = None,
                    reward_source: str | None = None, task: str | None = None):
  """`(OnlineSettings, component reward names)` of `config.online` for one algorithm, checking
  every online key first (a ValueError names the key); nothing is built or compiled."""
  from rlhfjax import losses as losses_lib

  oc = config.online
  algorithm = algorithm or oc.algorithm
  reward_source = reward_source or oc.reward_source
  task = task or oc.task
  if task not in ONLINE_TASKS:
    raise ValueError(f"config.online.task must be one of {ONLINE_TASKS}, got {task!r}")
  if algorithm not in objectives.PG_ALGORITHMS:
    raise ValueError(f"config.online.algorithm must be one of {objectives.PG_ALGORITHMS}, got "
                     f"{algorithm!r}")
  fits = {"verifiable": ("programmatic",), "preference": ("gold", "reward_model", "ensemble")}
  if reward_source not in REWARD_SOURCES or reward_source not in fits[task]:
    raise ValueError(f"config.online.reward_source must be one of {fits[task]} for task "
                     f"{task!r}, got {reward_source!r}")
  for key in ("num_iterations", "prompts_per_iteration", "log_every", "ensemble_size"):
    if oc[key] < 1:
      raise ValueError(f"config.online.{key} must be >= 1, got {oc[key]}")
  for key in ("eval_every", "checkpoint_every"):
    if oc[key] < 0:
      raise ValueError(f"config.online.{key} must be >= 0, got {oc[key]}")
  if not oc.temperature > 0:
    raise ValueError(f"config.online.temperature must be > 0 (G samples per prompt), got "
                     f"{oc.temperature}")
  if oc.ensemble_mode not in losses_lib.ENSEMBLE_MODES:
    raise ValueError(f"config.online.ensemble_mode must be one of {losses_lib.ENSEMBLE_MODES}, "
                     f"got {oc.ensemble_mode!r}")
  if oc.prompts_per_iteration % oc.num_minibatches:
    raise ValueError(f"config.online.prompts_per_iteration ({oc.prompts_per_iteration}) must "
                     f"split into num_minibatches ({oc.num_minibatches}) of whole groups")
  algorithm_config = oc[algorithm].to_dict()
  component_names = tuple(algorithm_config.pop("components", ()))
  unknown = sorted(set(component_names) - set(COMPONENT_REWARDS))
  if unknown:
    raise ValueError(f"config.online.{algorithm}.components has unknown rewards {unknown}; "
                     f"valid: {COMPONENT_REWARDS}")
  try:
    settings = online_lib.OnlineSettings.from_algorithm_config(
        algorithm, algorithm_config, group_size=oc.group_size, num_epochs=oc.num_epochs,
        num_minibatches=oc.num_minibatches, kl_target=oc.kl_target or None,
        kl_horizon=oc.kl_horizon, regularizer=oc.regularizer, pm_alpha=oc.pm_alpha,
        accumulation_steps=common.accumulation_steps(oc.optimizer), seed=config.seed)
  except ValueError as e:
    raise ValueError(f"config.online ({algorithm}): {e}") from e
  if oc.critic_optimizer.accumulation_steps != settings.accumulation_steps:
    raise ValueError(f"config.online.critic_optimizer.accumulation_steps "
                     f"({oc.critic_optimizer.accumulation_steps}) must equal the policy's "
                     f"({settings.accumulation_steps}): the critic steps on the same micro-batches")
  if settings.num_components != len(component_names):
    raise ValueError(f"config.online.{algorithm}: {len(component_names)} components for "
                     f"{settings.num_components} thresholds")
  for key in ("optimizer", "critic_optimizer"):
    try:
      common.make_optimizer(oc[key], oc.num_iterations)
    except ValueError as e:
      raise ValueError(f"config.online.{key}: {e}") from e
  return settings, component_names


@dataclasses.dataclass
class OnlineRun:
  """A ready-to-iterate online stage (`make_online_run`).

  Attributes:
    name: the stage's name.
    trainer: the `rlhfjax.train.online.OnlineTrainer`.
    state: its initial `OnlineState`.
    prompts_at: `prompts_at(iteration) -> sharded prompt batch` of the task's train prompts.
    reference_params: the frozen reference (the SFT policy).
    extra: summary fields of the reward source (reward-model accuracy).
  """
  name: str
  trainer: Any
  state: Any
  prompts_at: Any
  reference_params: Any
  extra: dict


def make_online_run(ctx: Context, sft_params: Any, algorithm: str | None = None,
                    reward_source: str | None = None, *, task: str | None = None,
                    reward_params: Any = None, name: str | None = None) -> OnlineRun:
  """Builds the trainer, states and prompt stream of `run_online` (same arguments), without
  running it; benchmarks use it to drive several algorithms on the same batches."""
  from rlhfjax.rewards import verifiable_reward, vocab
  from rlhfjax.sampling import SamplingConfig
  from rlhfjax.train import rollout as rollout_lib

  c, oc = ctx.config, ctx.config.online
  algorithm = algorithm or oc.algorithm
  reward_source = reward_source or oc.reward_source
  task = task or oc.task
  settings, component_names = online_settings(c, algorithm, reward_source, task)
  reward, reward_params, critic_init, extra = _online_reward(ctx, sft_params, task,
                                                             reward_source, reward_params)
  task_rewards = {"accuracy": verifiable_reward, "gold_reward": ctx.tasks.gold_reward}
  components = tuple(task_rewards[n] for n in component_names)

  mesh = ctx.mesh
  build = common.model_fn(c, seed=c.seed)
  num_updates = oc.num_iterations * oc.num_epochs * oc.num_minibatches
  _, _, logical = state_lib.abstract_model(build)
  tx = common.make_optimizer(oc.optimizer, num_updates, logical_axes=logical)
  graphdef, policy_state, shardings = state_lib.state_from_params(sft_params, tx, mesh, build)
  _, ref_params, _ = state_lib.frozen_params(build, mesh, sft_params)

  critic, critic_state, value_graphdef = None, None, None
  if settings.needs_critic:
    build_critic = common.model_fn(c, seed=c.seed + 3, score_head=True)
    _, _, critic_logical = state_lib.abstract_model(build_critic)
    critic_tx = common.make_optimizer(oc.critic_optimizer, num_updates,
                                      logical_axes=critic_logical)
    # The critic starts from the reward model when there is one (InstructGPT), else from the
    # SFT policy with a fresh score head.
    value_graphdef, critic_state, critic_shardings = state_lib.state_from_params(
        critic_init if critic_init is not None else sft_params, critic_tx, mesh, build_critic)
    critic = online_lib.CriticSetup(value_graphdef, critic_tx, critic_shardings)

  sampling = SamplingConfig(max_new_tokens=c.response_len, eos_id=vocab.EOS_ID,
                            pad_id=vocab.PAD_ID, temperature=oc.temperature)
  rollouts = rollout_lib.Rollouts(
      graphdef, sampling, mesh=mesh, group_size=settings.group_size, reward=reward,
      greedy_baseline=settings.greedy_baseline,
      gold=ctx.tasks.gold_reward if task == "preference" else None, components=components,
      value_graphdef=value_graphdef, missing_eos_penalty=oc.missing_eos_penalty,
      recompute_logprobs=oc.recompute_logprobs, logits_chunk_size=c.logits_chunk_size,
      shared_prompt=c.shared_prompt, fuse_forward=c.fuse_forward)
  trainer = online_lib.OnlineTrainer(
      settings, rollouts, mesh=mesh, policy_graphdef=graphdef, optimizer=tx,
      state_shardings=shardings, reference_params=ref_params, reward_params=reward_params,
      critic=critic, response_len=c.response_len)
  source = ctx.tasks.verifiable_train if task == "verifiable" else ctx.tasks.preference_sft

  def prompts_at(iteration: int) -> dict:
    indices = data_lib.batch_indices(len(source), batch_size=oc.prompts_per_iteration,
                                     seed=c.seed, step=iteration)
    return shd.shard_batch(data_lib.prompt_batch(data_lib.gather(source, indices),
                                                 prompt_len=c.prompt_len), mesh)

  return OnlineRun(name or algorithm, trainer, trainer.init_state(policy_state, critic_state),
                   prompts_at, ref_params, extra)


def run_online(ctx: Context, sft_params: Any, algorithm: str | None = None,
               reward_source: str | None = None, *, task: str | None = None,
               reward_params: Any = None, name: str | None = None) -> tuple[Any, dict]:
  """Online RL from the SFT policy, which is also the frozen reference.

  Each iteration samples `config.online.group_size` responses to `prompts_per_iteration` train
  prompts of the task and updates the policy with `rlhfjax.train.online.OnlineTrainer`. Metrics
  go to `<run_dir>/<name>/metrics.jsonl` (and TensorBoard) every `log_every` iterations, the
  evaluator's every `eval_every`; `checkpoint_every` > 0 saves the whole online state, and a run
  restarted on its run directory resumes from the latest checkpoint.

  Args:
    ctx: the run's context.
    sft_params: the SFT policy (start and reference).
    algorithm: one of `rlhfjax.train.objectives.PG_ALGORITHMS`; default `config.online.algorithm`.
    reward_source: "programmatic" (the verifiable task's exact match), "gold" (the preference
      task's hidden reward), "reward_model" (trained here with `run_reward_model` unless
      `reward_params` are given) or "ensemble"; default `config.online.reward_source`.
    task: "verifiable" or "preference"; default `config.online.task`.
    reward_params: an already trained reward model (or tuple of ensemble members).
    name: the stage's name (run sub-directory, `ctx.records` key); default the algorithm.

  Returns:
    (policy params, summary row: the evaluator's metrics against the SFT reference, the sampled
    accuracy, the last iteration's rollout reward, median seconds per logged iteration, train_s).
  """
  oc = ctx.config.online
  t0 = time.perf_counter()
  run = make_online_run(ctx, sft_params, algorithm, reward_source, task=task,
                        reward_params=reward_params, name=name)

  def evaluate(state) -> dict:
    params = state.policy.params
    return {**ctx.evaluator(params, run.reference_params),
            "sampled_accuracy": sampled_accuracy(ctx, params)}

  state, records = online_lib.train_online(
      run.trainer, run.state, run_dir=os.path.join(ctx.run_dir, run.name),
      prompts_at=run.prompts_at, rng=jax.random.key(ctx.config.seed + 11),
      settings=online_loop_settings(oc, run.name), eval_fn=evaluate)
  ctx.records[run.name] = records
  row = {"method": run.name, **common.final_eval(records, lambda: evaluate(state)),
         **online_summary(records), "train_s": time.perf_counter() - t0, **run.extra}
  return state.policy.params, row


def online_loop_settings(oc: ml_collections.ConfigDict, name: str) -> Any:
  """`loop.LoopSettings` of an online stage: `num_iterations` iterations, logged, evaluated and
  checkpointed as `config.online` says."""
  return loop_lib.LoopSettings(
      num_steps=oc.num_iterations, log_every=oc.log_every, eval_every=oc.eval_every,
      checkpoint_every=oc.checkpoint_every, max_to_keep=2, progress=oc.progress, name=name)


def online_summary(records: list[dict]) -> dict:
  """Rollout fields of an online stage's summary from its records: the last iteration's rollout
  `reward` and `iteration_s`, the median seconds of the logged iterations (None for a finished
  stage, resumed)."""
  train = [r for r in records if r["split"] == "train"]
  return {"reward": train[-1]["reward"] if train else None,
          "iteration_s": float(np.median([r["iteration_s"] for r in train])) if train else None}
