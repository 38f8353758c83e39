"""The online-versus-offline gap on the synthetic gold-reward preference task.

    python -m experiments.reproduce_online_offline [--json PATH] [--config.gap.num_steps=300]

Online preference optimisation samples its pairs from the current policy and has them judged;
offline DPO trains on a fixed dataset of pairs sampled once from the base distribution (which
the SFT policy imitates). Claim (Calandriello et al., arXiv 2403.08635; Guo et al., arXiv
2402.04792; Tang et al., arXiv 2405.08448): on the same budget, online methods reach a better
reward-KL trade-off than offline DPO.

Budget: `config.gap.num_steps` gradient steps of `pairs_per_step` judged pairs each, for every
method. The online judge is the process that labelled the offline pairs (Bradley-Terry on the
hidden gold reward at the task's label temperature), the optimizer and the regularisation
strength (DPO's beta, IPO's tau) are shared, and all start from one SFT policy, which is also
the reference. Offline DPO revisits its pairs when the budget exceeds the dataset
(`offline_epochs`).

Writes to the run directory: `config.json`, each stage's metrics, `results.json` (also copied to
`--json PATH`) and `reproduce_online_offline.png` (gold reward and KL against judged pairs, and
gold reward against KL), and prints the table.
"""

from __future__ import annotations

import os
import time

from experiments import common
from experiments import online_preference
from experiments import stages
from experiments.configs import reproduce_online_offline as gap_config
from rlhfjax.train import online_preference as op_lib

EXPERIMENT = "reproduce_online_offline"
OFFLINE = "offline_dpo"
COLUMNS = ("method", "gold_reward", "kl", "win_rate", "judged_pairs", "gradient_steps",
           "train_s")


def budget_config(config):
  """A resolved copy of `config` with the shared budget of `config.gap` set on both sides.

  Raises:
    ValueError: naming the first invalid key of `config.gap` or of the online settings.
  """
  gc = config.gap
  for key in ("num_steps", "pairs_per_step"):
    if gc[key] < 1:
      raise ValueError(f"config.gap.{key} must be >= 1, got {gc[key]}")
  if gc.eval_every < 0:
    raise ValueError(f"config.gap.eval_every must be >= 0, got {gc.eval_every}")
  if not gc.methods or any(m not in op_lib.ALGORITHMS for m in gc.methods):
    raise ValueError(f"config.gap.methods must be among {op_lib.ALGORITHMS}, got {gc.methods}")
  config = config.copy_and_resolve_references()
  config.offline.loop.update(num_steps=gc.num_steps, batch_size=gc.pairs_per_step,
                             eval_every=gc.eval_every)
  config.online_preference.update(num_iterations=gc.num_steps,
                                  prompts_per_iteration=gc.pairs_per_step, pairs_per_prompt=1,
                                  steps_per_iteration=1, eval_every=gc.eval_every)
  for method in gc.methods:
    online_preference.preference_settings(config, method)
  return config


def _curve(records, pairs_per_step: int) -> dict:
  """Evaluated gold reward and KL against the judged pairs consumed so far."""
  steps, reward = common.curve(records, "gold_reward", "eval")
  return {"judged_pairs": [s * pairs_per_step for s in steps], "gold_reward": reward,
          "kl": common.curve(records, "kl", "eval")[1]}


def plot(results: dict, path: str) -> str:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for method, c in results["curves"].items():
    axes[0].plot(c["judged_pairs"], c["gold_reward"], "o-", label=method)
    axes[1].plot(c["judged_pairs"], c["kl"], "o-", label=method)
    axes[2].plot(c["kl"], c["gold_reward"], "o-", label=method)
  sft = results["sft"]["gold_reward"]
  for ax, title, xlabel in ((axes[0], "gold reward", "judged pairs"),
                            (axes[1], "KL(pi || SFT)", "judged pairs"),
                            (axes[2], "gold reward vs KL", "KL(pi || SFT)")):
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].axhline(sft, color="gray", ls="--", lw=1)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def run(config) -> dict:
  """SFT, offline DPO, then each online method on the same budget; returns the results."""
  t_start = time.perf_counter()
  config = budget_config(config)
  gc = config.gap
  ctx = stages.Context.create(config, EXPERIMENT)
  sft_params, sft_row = stages.run_sft(ctx)
  train_pairs, _ = stages.split_pairs(ctx)
  pairs = gc.num_steps * gc.pairs_per_step
  _, row = stages.run_offline(ctx, sft_params, "dpo")
  rows = [{**row, "method": OFFLINE, "judged_pairs": pairs, "gradient_steps": gc.num_steps}]
  curves = {OFFLINE: _curve(ctx.records["dpo"], gc.pairs_per_step)}
  judge = online_preference.make_judge(ctx, sft_params)
  for method in gc.methods:
    _, row = online_preference.run_online_preference(ctx, sft_params, method, judge=judge)
    rows.append({**row, "judged_pairs": pairs})
    curves[method] = _curve(ctx.records[method], gc.pairs_per_step)
  results = {"run_dir": ctx.run_dir, "sft": sft_row, "rows": rows, "curves": curves,
             "budget": {"gradient_steps": gc.num_steps, "pairs_per_step": gc.pairs_per_step,
                        "judged_pairs": pairs, "offline_dataset_pairs": len(train_pairs),
                        "offline_epochs": pairs / len(train_pairs)}}
  results["plot"] = plot(results, os.path.join(ctx.run_dir, f"{EXPERIMENT}.png"))
  results["total_s"] = time.perf_counter() - t_start
  common.write_json(os.path.join(ctx.run_dir, "results.json"), results)
  print(f"\nSame budget: {gc.num_steps} gradient steps x {gc.pairs_per_step} judged pairs "
        f"(offline dataset {len(train_pairs)} pairs, {results['budget']['offline_epochs']:.2f} "
        f"epochs); SFT gold reward {sft_row['gold_reward']:.3f}")
  print(common.format_table(rows, COLUMNS))
  print(f"\nrun directory: {ctx.run_dir}  (total {results['total_s']:.0f} s)")
  return results


if __name__ == "__main__":
  common.launch(run, gap_config.get_config)
