"""Online preference optimisation on the synthetic preference task: SFT, then one online algorithm.

    python -m experiments.online_preference
        [--config.online_preference.algorithm=online_dpo|online_ipo|ipo_md|nash_md_pg|spin|inpo]
        [--config.online_preference.judge=gold|reward_model|preference_model]

Each iteration samples pairs of responses to `prompts_per_iteration` prompts of the preference
task (from the policy, the previous iterate, or the Nash-MD mixture of policy and SFT policy;
SPIN pairs the SFT demonstration with a sample), has the judge label them, and takes
`steps_per_iteration` optimizer steps (`rlhfjax.train.online_preference`). The SFT policy is the
start and the frozen reference mu. Rows: the SFT policy and the trained policy, with the gold
reward, KL to the SFT policy and win rate against it on held-out prompts.

Writes to the run directory: `config.json`, per-stage `metrics.jsonl` (online: one record per
logged iteration with the judge's probabilities, the samples' gold reward, the loss and the wall
time of each phase), TensorBoard events, `curves.png`, and `summary.json` with every row.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import numpy as np

from experiments import common
from experiments import stages
from experiments.configs import online_preference as online_preference_config
from rlhfjax import data as data_lib
from rlhfjax import sharding as shd
from rlhfjax.rewards import vocab
from rlhfjax.sampling import SamplingConfig
from rlhfjax.train import metrics as metrics_lib
from rlhfjax.train import objectives
from rlhfjax.train import online_preference as op_lib
from rlhfjax.train import rollout as rollout_lib
from rlhfjax.train import state as state_lib

JUDGES = ("gold", "reward_model", "preference_model")
COLUMNS = ("method", "gold_reward", "kl", "win_rate", "response_len", "judged_pairs",
           "iteration_s", "train_s")


def preference_settings(config, algorithm: str | None = None) -> op_lib.PreferenceSettings:
  """`PreferenceSettings` of `config.online_preference`, checking every key first (a ValueError
  names it); nothing is built or compiled."""
  pc = config.online_preference
  algorithm = algorithm or pc.algorithm
  if algorithm not in op_lib.ALGORITHMS:
    raise ValueError(f"config.online_preference.algorithm must be one of {op_lib.ALGORITHMS}, "
                     f"got {algorithm!r}")
  if pc.judge not in JUDGES:
    raise ValueError(f"config.online_preference.judge must be one of {JUDGES}, got {pc.judge!r}")
  if not pc.judge_temperature > 0:
    raise ValueError(f"config.online_preference.judge_temperature must be > 0, got "
                     f"{pc.judge_temperature}")
  if not pc.temperature > 0:
    raise ValueError(f"config.online_preference.temperature must be > 0, got {pc.temperature}")
  for key in ("num_iterations", "prompts_per_iteration", "log_every"):
    if pc[key] < 1:
      raise ValueError(f"config.online_preference.{key} must be >= 1, got {pc[key]}")
  if pc.eval_every < 0:
    raise ValueError(f"config.online_preference.eval_every must be >= 0, got {pc.eval_every}")
  try:
    settings = op_lib.PreferenceSettings(
        algorithm, pairs_per_prompt=pc.pairs_per_prompt,
        steps_per_iteration=pc.steps_per_iteration, labels=pc.labels or None,
        mixture_coef=pc.mixture_coef, refresh_every=pc.refresh_every,
        loss_kwargs=pc[algorithm].to_dict())
    common.make_optimizer(pc.optimizer, pc.num_iterations * pc.steps_per_iteration)
    if pc.optimizer.accumulation_steps != 1:
      raise ValueError(f"optimizer.accumulation_steps must be 1 (the online preference trainer "
                       f"steps on whole batches), got {pc.optimizer.accumulation_steps}")
  except ValueError as e:
    raise ValueError(f"config.online_preference ({algorithm}): {e}") from e
  return settings


def run_preference_model(ctx: stages.Context, sft_params: Any) -> tuple[Any, Any]:
  """The pairwise preference model P(y > y' | x) (`objectives.make_pairwise_preference_loss`),
  trained on the task's pairs from the SFT policy with a fresh score head.

  Returns:
    (graphdef, params).
  """
  c, mc = ctx.config, ctx.config.online_preference.preference_model
  train, _ = stages.split_pairs(ctx)
  collate = functools.partial(data_lib.preference_batch, prompt_len=c.prompt_len,
                              response_len=c.response_len)
  graphdef, state, _ = common.train_stage(
      mc, name="preference_model", run_dir=ctx.run_dir, mesh=ctx.mesh,
      build_model=common.model_fn(c, seed=c.seed + 4, score_head=True),
      loss_fn=objectives.make_pairwise_preference_loss(),
      get_batch=common.batch_fn(train, collate, batch_size=mc.loop.batch_size, seed=c.seed),
      init_params=sft_params)
  return graphdef, state.params


def make_judge(ctx: stages.Context, sft_params: Any) -> tuple[op_lib.JudgeFn, Any]:
  """(judge, its params) of `config.online_preference.judge`."""
  pc = ctx.config.online_preference
  if pc.judge == "gold":
    return op_lib.bradley_terry_judge(rollout_lib.programmatic_reward(ctx.tasks.gold_reward),
                                      temperature=pc.judge_temperature), None
  if pc.judge == "reward_model":
    rm_params, _ = stages.run_reward_model(ctx, sft_params)
    rm_graphdef, _, _ = state_lib.abstract_model(
        common.model_fn(ctx.config, seed=ctx.config.seed + 2, score_head=True))
    return op_lib.bradley_terry_judge(rollout_lib.reward_model_reward(rm_graphdef)), rm_params
  graphdef, params = run_preference_model(ctx, sft_params)
  return op_lib.preference_model_judge(graphdef), params


def prompt_stream(ctx: stages.Context, num_prompts: int):
  """`prompts_at(iteration)`: a sharded batch of the preference task's SFT prompts with their
  demonstrations (`response_tokens`, `response_mask`; SPIN's chosen responses)."""
  c, source = ctx.config, ctx.tasks.preference_sft

  def prompts_at(iteration: int) -> dict:
    indices = data_lib.batch_indices(len(source), batch_size=num_prompts, seed=c.seed,
                                     step=iteration)
    batch = data_lib.sft_batch(data_lib.gather(source, indices), prompt_len=c.prompt_len,
                               response_len=c.response_len)
    tp = c.prompt_len
    return shd.shard_batch({
        "prompt_tokens": batch["tokens"][:, :tp], "prompt_mask": batch["attention_mask"][:, :tp],
        "response_tokens": batch["tokens"][:, tp:],
        "response_mask": batch["attention_mask"][:, tp:]}, ctx.mesh)

  return prompts_at


def run_online_preference(ctx: stages.Context, sft_params: Any, algorithm: str | None = None, *,
                          name: str | None = None, judge: tuple | None = None
                          ) -> tuple[Any, dict]:
  """Online preference optimisation from the SFT policy, which is also the frozen reference.

  Args:
    ctx: the run's context.
    sft_params: the SFT policy.
    algorithm: one of `rlhfjax.train.online_preference.ALGORITHMS`; default the config's.
    name: the stage's name (run sub-directory, `ctx.records` key); default the algorithm.
    judge: an already built (judge, judge params) (`make_judge`), to share one between runs.

  Returns:
    (policy params, summary row: the evaluator's metrics against the SFT reference, the judged
    pairs and gradient steps used, median seconds per iteration, train_s).
  """
  from tqdm.auto import tqdm

  pc = ctx.config.online_preference
  settings = preference_settings(ctx.config, algorithm)
  name = name or settings.algorithm
  t0 = time.perf_counter()
  judge_fn, judge_params = judge or make_judge(ctx, sft_params)
  build = common.model_fn(ctx.config, seed=ctx.config.seed)
  _, _, logical = state_lib.abstract_model(build)
  tx = common.make_optimizer(pc.optimizer, pc.num_iterations * settings.steps_per_iteration,
                             logical_axes=logical)
  graphdef, policy_state, shardings = state_lib.state_from_params(sft_params, tx, ctx.mesh, build)
  _, ref_params, _ = state_lib.frozen_params(build, ctx.mesh, sft_params)
  trainer = op_lib.OnlinePreferenceTrainer(
      settings, SamplingConfig(max_new_tokens=ctx.config.response_len, eos_id=vocab.EOS_ID,
                               pad_id=vocab.PAD_ID, temperature=pc.temperature),
      mesh=ctx.mesh, policy_graphdef=graphdef, optimizer=tx, state_shardings=shardings,
      reference_params=ref_params, judge=judge_fn, judge_params=judge_params,
      gold=ctx.tasks.gold_reward)
  state = trainer.init_state(policy_state)
  prompts_at = prompt_stream(ctx, pc.prompts_per_iteration)
  pairs_per_iteration = pc.prompts_per_iteration * settings.pairs_per_prompt

  writer = metrics_lib.MetricsWriter(os.path.join(ctx.run_dir, name))
  records, times = [], []
  key = jax.random.key(ctx.config.seed + 13)
  bar = tqdm(total=pc.num_iterations, desc=name, disable=not pc.progress, dynamic_ncols=True,
             leave=False)
  try:
    for iteration in range(1, pc.num_iterations + 1):
      state, metrics = trainer.iterate(state, prompts_at(iteration - 1),
                                       jax.random.fold_in(key, iteration - 1))
      times.append(metrics["iteration_s"])
      metrics["judged_pairs"] = float(iteration * pairs_per_iteration)
      last = iteration == pc.num_iterations
      if iteration % pc.log_every == 0 or last:
        records.append(writer.write(iteration, metrics))
        bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "first_gold_reward")})
      if (pc.eval_every and iteration % pc.eval_every == 0) or last:
        records.append(writer.write(iteration, {
            **ctx.evaluator(state.policy.params, ref_params),
            "judged_pairs": float(iteration * pairs_per_iteration)}, split="eval"))
      bar.update(1)
  finally:
    bar.close()
    writer.close()
  ctx.records[name] = records
  final = common.final_eval(records, lambda: ctx.evaluator(state.policy.params, ref_params))
  row = {"method": name, **final,
         "gradient_steps": pc.num_iterations * settings.steps_per_iteration,
         "iteration_s": float(np.median(times)), "train_s": time.perf_counter() - t0}
  return state.policy.params, row


def run(config) -> dict:
  """SFT, then `config.online_preference.algorithm`; returns the summary (also
  `<run_dir>/summary.json`)."""
  t_start = time.perf_counter()
  preference_settings(config)  # Every key checked before anything compiles.
  ctx = stages.Context.create(config, "online_preference")
  sft_params, row = stages.run_sft(ctx)
  rows = [row]
  _, row = run_online_preference(ctx, sft_params)
  rows.append(row)
  algorithm = config.online_preference.algorithm
  plot(ctx, algorithm, os.path.join(ctx.run_dir, "curves.png"))
  summary = {"run_dir": ctx.run_dir, "algorithm": algorithm,
             "judge": config.online_preference.judge, "rows": rows,
             "total_s": time.perf_counter() - t_start}
  return common.report_run(summary, COLUMNS)


def plot(ctx: stages.Context, name: str, path: str) -> None:
  records = ctx.records[name]
  metrics_lib.plot_panels({
      "loss": {name: common.curve(records, "loss")},
      "gold reward of the first samples": {name: common.curve(records, "first_gold_reward")},
      "held-out gold reward": {name: common.curve(records, "gold_reward", "eval")},
      "KL(policy || SFT)": {name: common.curve(records, "kl", "eval")},
  }, path)


if __name__ == "__main__":
  common.launch(run, online_preference_config.get_config)
