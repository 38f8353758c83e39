"""The quick start (`make demo`): the whole pipeline on the built-in synthetic tasks.

    python -m experiments.quickstart [--config.sft.loop.num_steps=200] [--config.run_dir=DIR]

Stages: build the synthetic data -> SFT -> reward model -> DPO and IPO from the SFT policy ->
ReMax and GRPO from the SFT policy, online on the verifiable task's exact-match reward. Every
policy is scored on both tasks (greedy and sampled exact-match accuracy on the verifiable task;
gold reward, KL to the SFT policy and win rate against it on the preference task).

Writes to the run directory: `config.json`, per-stage `metrics.jsonl`, TensorBoard events and
checkpoints, `curves.png`, and `summary.json` with every row of the printed table.
"""

from __future__ import annotations

import os
import time

from experiments import common
from experiments import stages
from experiments.configs import quickstart as quickstart_config
from rlhfjax.train import metrics as metrics_lib
from rlhfjax.train import state as state_lib

COLUMNS = ("method", "accuracy", "sampled_accuracy", "gold_reward", "kl", "win_rate",
           "response_len", "rm_accuracy", "rm_gold_agreement", "train_s")


def run(config) -> dict:
  """Runs every stage and returns the summary (also written to `<run_dir>/summary.json`)."""
  t_start = time.perf_counter()
  for algorithm in config.quickstart.online_algorithms:
    stages.online_settings(config, algorithm, "programmatic", "verifiable")
  ctx = stages.Context.create(config, "quickstart")
  _, init_params, _ = state_lib.frozen_params(common.model_fn(config, seed=config.seed), ctx.mesh)
  rows = [{"method": "init", **ctx.evaluator(init_params)}]
  sft_params, row = stages.run_sft(ctx)
  rows.append({**row, "sampled_accuracy": stages.sampled_accuracy(ctx, sft_params)})
  _, row = stages.run_reward_model(ctx, sft_params)
  rows.append(row)
  for loss in config.quickstart.offline_losses:
    _, row = stages.run_offline(ctx, sft_params, loss)
    rows.append(row)
  for algorithm in config.quickstart.online_algorithms:
    _, row = stages.run_online(ctx, sft_params, algorithm, "programmatic", task="verifiable")
    rows.append(row)
  plot(ctx, os.path.join(ctx.run_dir, "curves.png"))
  summary = {"run_dir": ctx.run_dir, "rows": rows, "total_s": time.perf_counter() - t_start}
  return common.report_run(summary, COLUMNS)


def plot(ctx: stages.Context, path: str) -> None:
  online = ctx.config.quickstart.online_algorithms
  policies = [name for name in ctx.records if name != "reward_model"]
  metrics_lib.plot_panels({
      "train loss": {name: common.curve(r, "loss") for name, r in ctx.records.items()
                     if name not in online},
      "rollout reward (verifiable)": {n: common.curve(ctx.records[n], "reward") for n in online},
      "accuracy (verifiable)": {n: common.curve(ctx.records[n], "accuracy", "eval")
                                for n in policies},
      "gold reward (preference)": {n: common.curve(ctx.records[n], "gold_reward", "eval")
                                   for n in policies},
  }, path)


if __name__ == "__main__":
  common.launch(run, quickstart_config.get_config)
