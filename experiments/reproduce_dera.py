"""DeRa on the synthetic preference task: decoding-time realignment against retraining.

    python -m experiments.reproduce_dera [--json PATH] [--config.dera.loss=ipo]

DeRa (Liu et al., arXiv 2402.02992) decodes ``softmax(lam z_aligned + (1 - lam) z_sft)``. On a
one-step bandit the lam-mixture of the SFT policy and the policy aligned at strength beta is
exactly the policy aligned at beta / lam (`experiments.reproduce_games` checks that to 6e-8).
Here, with a transformer and whole sequences, the mixture is applied per token, so it is only an
approximation of the sequence-level optimum; this module measures how good it is:

1. SFT on the task's demonstrations, then DPO (or IPO) at the configured strength against it
   (`experiments.stages.run_sft`, `run_offline`);
2. `rlhfjax.sampling.dera_sweep` decodes held-out prompts at each lam in `config.dera.lams`
   (same rng for every lam), recording the gold reward and the exact KL(pi_lam || pi_sft);
3. for each lam in `config.dera.retrained_lams`, a model trained separately at beta / lam is
   decoded with the same rng and scored the same way.

The endpoints are checked on the way: lam = 0 decodes the SFT policy (KL 0) and lam = 1 the
aligned model, token for token; `endpoints` holds both models sampled alone with the same rng.

Writes to the run directory: `config.json`, each stage's metrics, `results.json` (also copied to
`--json PATH`) and `reproduce_dera.png` (gold reward against KL: the DeRa curve and the
retrained models), and prints the table.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp

from experiments import common
from experiments import stages
from experiments.configs import reproduce_dera as dera_config
from rlhfjax import sampling
from rlhfjax.rewards import vocab

EXPERIMENT = "reproduce_dera"
# The loss's regularisation strength, the one DeRa rescales (beta -> beta / lam).
STRENGTH_KEYS = {"dpo": "beta", "ipo": "tau"}
COLUMNS = ("method", "lam", "strength", "gold_reward", "kl", "response_len")


def _check_config(config) -> None:
  """ValueError naming the first invalid key of `config.dera`."""
  dc = config.dera
  checks = [
      ("loss", dc.loss in STRENGTH_KEYS),
      ("lams", len(dc.lams) > 0 and all(lam >= 0 for lam in dc.lams)),
      ("retrained_lams", all(lam > 0 for lam in dc.retrained_lams)),
  ]
  for key, ok in checks:
    if not ok:
      raise ValueError(f"invalid config.dera.{key}: {dc[key]!r}")


def strength(config, loss: str) -> float:
  """The aligned model's regularisation strength (DPO's beta, IPO's tau)."""
  return float(config.offline[loss][STRENGTH_KEYS[loss]])


def sampling_config(config) -> sampling.SamplingConfig:
  """Decoding of every model here: the evaluator's temperature, the task's response slot."""
  return sampling.SamplingConfig(max_new_tokens=config.response_len, eos_id=vocab.EOS_ID,
                                 pad_id=vocab.PAD_ID, temperature=config.eval.temperature)


def retrain(ctx: stages.Context, sft_params: Any, loss: str, lam: float) -> Any:
  """`run_offline` at strength / lam in its own sub-directory; returns the params."""
  config = ctx.config.copy_and_resolve_references()
  config.offline[loss][STRENGTH_KEYS[loss]] = strength(ctx.config, loss) / lam
  sub = dataclasses.replace(ctx, config=config, records={},
                            run_dir=os.path.join(ctx.run_dir, f"retrained_lam_{lam:g}"))
  params, _ = stages.run_offline(sub, sft_params, loss)
  return params


def sampled_metrics(ctx: stages.Context, params: Any, prompts: dict, rng) -> dict:
  """Gold reward and length of one model sampled alone (no mixture) with `rng`."""
  out = sampling.make_sampler(ctx.graphdef, sampling_config(ctx.config))(
      params, prompts["prompt_tokens"], prompts["prompt_mask"], rng)
  reward = ctx.tasks.gold_reward(prompts["prompt_tokens"], prompts["prompt_mask"], out.tokens_BxTr,
                                 out.mask_BxTr)
  return {"gold_reward": float(jnp.mean(reward)),
          "response_len": float(jnp.mean(out.lengths_B.astype(jnp.float32)))}


def sweep(ctx: stages.Context, aligned: Any, sft_params: Any, prompts: dict, lams, rng
          ) -> list[dict]:
  """`sampling.dera_sweep` rows (`lam`, `gold_reward`, `kl`, `response_len`)."""
  rows = sampling.dera_sweep(ctx.graphdef, ctx.graphdef, (aligned, sft_params),
                             prompts["prompt_tokens"], prompts["prompt_mask"], lams=lams,
                             config=sampling_config(ctx.config), reward_fn=ctx.tasks.gold_reward,
                             rng=rng)
  return [{"lam": r["lam"], "gold_reward": r["reward"], "kl": r["kl"],
           "response_len": r["response_len"]} for r in rows]


def plot(results: dict, path: str) -> str:
  """Gold reward against KL(pi || SFT): the DeRa curve (labelled by lam) and retrained models."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  dera, retrained = results["dera"], results["retrained"]
  ax = axes[0]
  ax.plot([r["kl"] for r in dera], [r["gold_reward"] for r in dera], "o-", label="DeRa (one model)")
  for r in dera:
    ax.annotate(f"{r['lam']:g}", (r["kl"], r["gold_reward"]), textcoords="offset points",
                xytext=(4, 4), fontsize=8)
  ax.plot([r["kl"] for r in retrained], [r["gold_reward"] for r in retrained], "x", ms=10,
          mew=2, label=f"retrained at {results['strength_key']} / lam")
  ax.set_xlabel("KL(pi || SFT)")
  ax.set_ylabel("gold reward")
  ax.set_title("reward vs KL")
  ax = axes[1]
  ax.plot([r["lam"] for r in dera], [r["gold_reward"] for r in dera], "o-", label="DeRa")
  ax.plot([r["lam"] for r in retrained], [r["gold_reward"] for r in retrained], "x", ms=10, mew=2,
          label="retrained")
  ax.set_xlabel("lambda")
  ax.set_title("gold reward vs lambda")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def table(results: dict) -> str:
  key = results["strength_key"]
  rows = [{"method": "dera", **r} for r in results["dera"]]
  rows += [{"method": "retrained", **r} for r in results["retrained"]]
  return (f"DeRa from {results['loss']} at {key} = {results['strength']:g} vs models retrained at "
          f"{key} / lam (gold reward and exact KL to the SFT policy on held-out prompts)\n"
          + common.format_table(rows, COLUMNS))


def run(config) -> dict:
  """SFT, the aligned model, the DeRa sweep and the retrained models; returns the results."""
  _check_config(config)
  t_start = time.perf_counter()
  dc, loss = config.dera, config.dera.loss
  ctx = stages.Context.create(config, EXPERIMENT)
  sft_params, sft_row = stages.run_sft(ctx)
  aligned, aligned_row = stages.run_offline(ctx, sft_params, loss)
  prompts = common.prompts_of(config, ctx.tasks.preference_test, ctx.mesh)
  rng = jax.random.key(config.seed + 17)
  beta = strength(config, loss)
  dera = sweep(ctx, aligned, sft_params, prompts, dc.lams, rng)
  for row in dera:
    row["strength"] = beta / row["lam"] if row["lam"] > 0 else None
  retrained = []
  for lam in dc.retrained_lams:
    params = retrain(ctx, sft_params, loss, lam)
    [row] = sweep(ctx, params, sft_params, prompts, (1.0,), rng)
    retrained.append({**row, "lam": float(lam), "strength": beta / lam})
  results = {
      "run_dir": ctx.run_dir, "loss": loss, "strength_key": STRENGTH_KEYS[loss],
      "strength": beta, "sft": sft_row, "aligned": aligned_row, "dera": dera,
      "retrained": retrained,
      "endpoints": {"sft": sampled_metrics(ctx, sft_params, prompts, rng),
                    "aligned": sampled_metrics(ctx, aligned, prompts, rng)},
  }
  results["plot"] = plot(results, os.path.join(ctx.run_dir, f"{EXPERIMENT}.png"))
  results["total_s"] = time.perf_counter() - t_start
  return common.write_report(results, "results.json", table(results))


if __name__ == "__main__":
  common.launch(run, dera_config.get_config)
