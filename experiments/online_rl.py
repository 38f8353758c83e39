"""Online RL on the synthetic tasks: SFT, then one policy-gradient algorithm from the SFT policy.

    python -m experiments.online_rl [--config.online.algorithm=grpo|remax|rloo|ppo|reinforce|...]
        [--config.online.task=verifiable|preference]
        [--config.online.reward_source=programmatic|gold|reward_model|ensemble]

The verifiable task trains on the exact-match reward of its train prompts; the preference task on
the hidden gold reward, a Bradley-Terry reward model trained on its pairs (`reward_model`), or an
ensemble of them. The SFT policy is the start and the frozen reference. Rows: the SFT policy and
the RL policy, with greedy and sampled (temperature `config.eval.temperature`) exact-match
accuracy, the gold reward, KL to the SFT policy and win rate against it on the preference task.

Writes to the run directory: `config.json`, per-stage `metrics.jsonl` (online: one record per
logged iteration with rewards, KL, entropy, length, clip fraction and the wall time of each
phase), TensorBoard events, `curves.png`, and `summary.json` with every row of the table.
"""

from __future__ import annotations

import os
import time

from experiments import common
from experiments import stages
from experiments.configs import online_rl as online_rl_config
from rlhfjax.train import metrics as metrics_lib

COLUMNS = ("method", "accuracy", "sampled_accuracy", "gold_reward", "kl", "win_rate",
           "response_len", "reward", "iteration_s", "train_s")


def run(config) -> dict:
  """SFT, then `config.online.algorithm`; returns the summary (also `<run_dir>/summary.json`)."""
  t_start = time.perf_counter()
  stages.online_settings(config)  # Every online key checked before anything compiles.
  ctx = stages.Context.create(config, "online_rl")
  sft_params, row = stages.run_sft(ctx)
  rows = [{**row, "sampled_accuracy": stages.sampled_accuracy(ctx, sft_params)}]
  _, row = stages.run_online(ctx, sft_params)
  rows.append(row)
  plot(ctx, config.online.algorithm, os.path.join(ctx.run_dir, "curves.png"))
  summary = {"run_dir": ctx.run_dir, "algorithm": config.online.algorithm,
             "task": config.online.task, "reward_source": config.online.reward_source,
             "rows": rows, "total_s": time.perf_counter() - t_start}
  return common.report_run(summary, COLUMNS)


def plot(ctx: stages.Context, name: str, path: str) -> None:
  records = ctx.records[name]
  metrics_lib.plot_panels({
      "rollout reward": {name: common.curve(records, "reward")},
      "KL(policy || SFT)": {name: common.curve(records, "kl")},
      "held-out accuracy": {"greedy": common.curve(records, "accuracy", "eval"),
                            "sampled": common.curve(records, "sampled_accuracy", "eval")},
      "gold reward (preference)": {name: common.curve(records, "gold_reward", "eval")},
  }, path)


if __name__ == "__main__":
  common.launch(run, online_rl_config.get_config)
