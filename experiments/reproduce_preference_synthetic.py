"""Reproduces the offline-preference claims on the synthetic preference task (tiny model, CPU).

    python -m experiments.reproduce_preference_synthetic [--config.deterministic.num_steps=1600]

`experiments.reproduce_preference` checks the claims exactly on a tabular bandit. This module shows
what is left of them with a transformer policy, sampled minibatches and log-ratios summed over
tokens, on the synthetic letters task whose pairs are labelled by Bradley-Terry on a hidden gold
reward (`rlhfjax.data.synthetic`). One SFT policy is the start and the frozen reference of every
preference run (`experiments.stages.run_offline`); it is trained once, on the clean task, since the
SFT demonstrations do not depend on the label temperature or noise.

1. Near-deterministic preferences (Azar et al., arXiv 2310.12036, section 4.2): at the label
   temperature `deterministic.temperature` the labels follow the gold reward almost surely. DPO's
   mean margin h keeps growing with the steps; IPO's settles near 1/(2 tau). h is a sum over
   tokens and one network sets every pair's margin, so IPO's mean need not land on the target
   exactly: the measured value and its distance to 1/(2 tau) are reported as they come.
2. Label noise (Chowdhury et al., arXiv 2403.00409): labels flipped with probability eps. DPO,
   cDPO (label smoothing eps) and robust DPO (label_noise eps), and DPO on the clean labels of the
   same pairs as the target. Reported: gold reward, win rate against and KL to the SFT policy, and
   on held-out pairs the implicit reward's agreement with the gold order (clean labels) and its
   scale (`PairProbe`): the slope of beta h on the clean logit, which flipped labels shrink by
   1 - 2 eps for DPO, (1 - 2 eps)^2 for cDPO and not at all for robust DPO (`expected_shrink`).
   Whether the unbiased implicit reward also buys gold reward is measured here, not assumed: with
   the default config robust DPO matches clean-label DPO's slope but drifts furthest from the SFT
   policy (largest KL) and ends with the lowest gold reward of the four.
3. GPO (Tang et al., arXiv 2402.05749): each convex f briefly on the clean pairs, side by side
   (gold reward, KL, margin). The closed-form optimum check stays tabular.

Writes to the run directory: `config.json`, one sub-directory per claim with each stage's metrics,
`results.json` (also copied to `--json PATH`) and `reproduce_preference_synthetic.png`, and prints
one table per claim.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import special

from experiments import common
from experiments import stages
from experiments.configs import reproduce_preference_synthetic as synthetic_config
from rlhfjax import data as data_lib
from rlhfjax import losses
from rlhfjax import sharding as shd
from rlhfjax.train import metrics as metrics_lib
from rlhfjax.train import objectives

EXPERIMENT = "reproduce_preference_synthetic"
DETERMINISTIC_LOSSES = ("dpo", "ipo")
NOISY_LOSSES = ("dpo", "cdpo", "robust_dpo")
CLAIMS = ("deterministic", "noisy_labels", "gpo")


def _check_config(config) -> None:
  """ValueError naming the first invalid key of this experiment's sections."""
  checks = [
      ("deterministic.temperature", config.deterministic.temperature > 0),
      ("noisy_labels.rate", 0 < config.noisy_labels.rate < 0.5),
      ("gpo.convex", len(config.gpo.convex) > 0
       and all(c in losses.GPO_CONVEX_FUNCTIONS for c in config.gpo.convex)),
      ("probe.num_pairs", config.probe.num_pairs >= 1),
  ]
  for claim in CLAIMS:
    checks.append((f"{claim}.eval_every", config[claim].eval_every >= 0))
  for key, ok in checks:
    if not ok:
      section, name = key.split(".")
      raise ValueError(f"invalid config.{key}: {config[section][name]!r}")
  warmup = config.offline.optimizer.warmup_steps
  for claim in CLAIMS:
    if config[claim].num_steps <= warmup:
      raise ValueError(f"config.{claim}.num_steps ({config[claim].num_steps}) must exceed "
                       f"config.offline.optimizer.warmup_steps ({warmup})")


@functools.lru_cache(maxsize=4)
def _margin_fn(graphdef: nnx.GraphDef):
  """Jitted `h_B(params, reference_params, batch)`, compiled once per model."""

  def margins(params, reference_params, batch):
    tokens, attention_mask, loss_mask = objectives.stack_pairs(batch)
    _, logps = objectives.sequence_logps(nnx.merge(graphdef, params), tokens, attention_mask,
                                         loss_mask)
    _, ref = objectives.sequence_logps(nnx.merge(graphdef, reference_params), tokens,
                                       attention_mask, loss_mask)
    return losses.log_ratio_margin(*jnp.split(logps, 2), *jnp.split(ref, 2))

  return jax.jit(margins)


class PairProbe:
  """Implicit-reward statistics of a policy on fixed preference pairs.

  For a pair (x, y_w, y_l) the margin is
  h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)], the gold gap is
  g = r(x, y_w) - r(x, y_l), and the clean Bradley-Terry logit is g / T. Per named pair set:

    {name}_margin          mean h
    {name}_label_accuracy  mean [h > 0], agreement with the recorded (possibly noisy) labels
    {name}_gold_accuracy   mean [h g > 0] over pairs with g != 0, agreement with the gold order
                           (the labels without noise, at any temperature)
    {name}_reward_slope    sum(beta h g / T) / sum((g / T)^2), the least-squares slope (through 0)
                           of the implicit reward gap beta h on the clean logit: 1 at DPO's clean
                           optimum sigma(beta h*) = sigma(g / T), below 1 when the labels are
                           noisy (Chowdhury et al., arXiv 2403.00409) or training stopped early.

  Callable as `probe(params, reference_params, beta=...) -> dict`; compiles once per model.
  """

  def __init__(self, ctx: stages.Context, sources: dict[str, Any], *, num_pairs: int):
    """Gathers the first `num_pairs` pairs of each source (rounded down to the batch shards)."""
    self._margins = _margin_fn(ctx.graphdef)
    self._temperature = ctx.config.preference.temperature
    self._sets, self.gold_gaps = {}, {}
    shards = shd.num_batch_shards(ctx.mesh)
    for name, source in sources.items():
      n = min(num_pairs, len(source))
      n -= n % shards
      if n == 0:
        raise ValueError(f"config.probe.num_pairs ({num_pairs}) leaves no {name} pairs for "
                         f"{shards} batch shards ({len(source)} available)")
      batch = data_lib.preference_batch(data_lib.gather(source, range(n)),
                                        prompt_len=ctx.config.prompt_len,
                                        response_len=ctx.config.response_len)
      self.gold_gaps[name] = (np.asarray(batch.pop("chosen_gold_reward"), np.float64)
                              - np.asarray(batch.pop("rejected_gold_reward"), np.float64))
      self._sets[name] = shd.shard_batch(batch, ctx.mesh)

  def __call__(self, params: Any, reference_params: Any, *, beta: float) -> dict[str, float]:
    metrics = {}
    for name, batch in self._sets.items():
      h_B = jax.device_get(self._margins(params, reference_params, batch))
      stats = implicit_reward_stats(h_B, self.gold_gaps[name], beta=beta,
                                    temperature=self._temperature)
      metrics.update({f"{name}_{key}": value for key, value in stats.items()})
    return metrics


def implicit_reward_stats(h_B, gold_gap_B, *, beta: float, temperature: float
                          ) -> dict[str, float]:
  """`margin`, `label_accuracy`, `gold_accuracy` and `reward_slope` of `PairProbe`.

  Args:
    h_B: log-ratio margins h of B pairs.
    gold_gap_B: gold reward gaps g = r(y_w) - r(y_l) of the same pairs.
    beta: scale of the implicit reward beta h.
    temperature: T of the Bradley-Terry labels (clean logit g / T).

  Returns:
    dict of floats (gold_accuracy is NaN when every pair is a gold tie).
  """
  h = np.asarray(h_B, np.float64)
  gap = np.asarray(gold_gap_B, np.float64)
  logit = gap / temperature
  untied = gap != 0
  return {
      "margin": float(np.mean(h)),
      "label_accuracy": float(np.mean(h > 0)),
      "gold_accuracy": float(np.mean(h[untied] * gap[untied] > 0)) if untied.any() else np.nan,
      "reward_slope": float(np.dot(beta * h, logit) / max(np.dot(logit, logit), 1e-30)),
  }


def make_probe(ctx: stages.Context) -> PairProbe:
  """A probe on the context's training pairs ("train") and its test split's pairs ("heldout")."""
  train, _ = stages.split_pairs(ctx)
  return PairProbe(ctx, {"train": train, "heldout": ctx.tasks.preference_test},
                   num_pairs=ctx.config.probe.num_pairs)


def _claim_context(ctx: stages.Context, name: str, steps: Any, *, task: dict | None = None,
                   offline: dict | None = None) -> stages.Context:
  """The context of one claim's runs: its own sub-directory and step budget (`steps.num_steps`,
  `steps.eval_every`), the task with `task` overrides and `config.offline` with `offline` ones.

  The evaluator is shared: the label temperature and noise leave the test prompts and the gold
  reward unchanged (the generator draws both before the labels).
  """
  config = ctx.config.copy_and_resolve_references()
  config.offline.loop.num_steps = steps.num_steps
  config.offline.loop.eval_every = steps.eval_every
  config.preference.update(task or {})
  config.offline.update(offline or {})
  return dataclasses.replace(ctx, config=config, run_dir=os.path.join(ctx.run_dir, name),
                             tasks=common.load_tasks(config) if task else ctx.tasks, records={})


def implicit_beta(offline: Any, loss: str) -> float:
  """beta of the implicit reward beta h: IPO is GPO's squared loss at beta = 2 tau."""
  return 2.0 * offline.ipo.tau if loss == "ipo" else offline[loss].beta


def _train(claim: stages.Context, sft_params: Any, loss: str, probe: PairProbe
           ) -> tuple[dict, list[dict]]:
  """`run_offline` with the probe's statistics in every evaluation. Returns (row, records)."""
  beta = implicit_beta(claim.config.offline, loss)
  evaluator = claim.evaluator

  def evaluate(params, reference_params=None):
    metrics = evaluator(params, reference_params)
    if reference_params is not None:
      metrics.update(probe(params, reference_params, beta=beta))
    return metrics

  run_ctx = dataclasses.replace(claim, evaluator=evaluate)
  _, row = stages.run_offline(run_ctx, sft_params, loss)
  return {**row, "beta": beta}, run_ctx.records[loss]


def _curves(records: list[dict]) -> dict:
  """The logged train margin and the evaluated gold reward and probe margins, per step."""
  logged_steps, logged_margin = common.curve(records, "margin")
  eval_steps, gold_reward = common.curve(records, "gold_reward", "eval")
  return {"logged_steps": logged_steps, "logged_margin": logged_margin, "eval_steps": eval_steps,
          "eval_gold_reward": gold_reward,
          "eval_train_margin": common.curve(records, "train_margin", "eval")[1],
          "eval_heldout_margin": common.curve(records, "heldout_margin", "eval")[1]}


def run_deterministic(ctx: stages.Context, sft_params: Any) -> dict:
  """Claim 1: DPO's and IPO's margins along a longer run on near-deterministic labels."""
  dc = ctx.config.deterministic
  claim = _claim_context(ctx, "deterministic", dc, task={"temperature": dc.temperature})
  probe = make_probe(claim)
  chosen_prob = special.expit(probe.gold_gaps["train"] / dc.temperature)
  out = {"temperature": dc.temperature,
         # The mean probability that a pair's label is the gold order's: 1 for deterministic.
         "label_determinism": float(np.mean(np.maximum(chosen_prob, 1.0 - chosen_prob)))}
  for loss in DETERMINISTIC_LOSSES:
    row, records = _train(claim, sft_params, loss, probe)
    out[loss] = {"final": row, **_curves(records)}
  tau = claim.config.offline.ipo.tau
  target, final = 1.0 / (2.0 * tau), out["ipo"]["final"]["train_margin"]
  out["ipo"].update(tau=tau, target=target, relative_error=abs(final - target) / target)
  out["dpo"]["beta"] = claim.config.offline.dpo.beta
  return out


def expected_shrink(loss: str, eps: float, offline: Any) -> float:
  """Factor c by which `loss` shrinks the clean preference on labels flipped with rate eps.

  Its target preference is 1/2 + c (P - 1/2): flipped labels have the expected value
  1/2 + (1 - 2 eps)(P - 1/2); cDPO with smoothing s shrinks that once more by (1 - 2 s); robust DPO
  with label_noise eps' weighs the loss on a label by (1 - eps')/(1 - 2 eps') and on its flip by
  -eps'/(1 - 2 eps'), i.e. divides by (1 - 2 eps') (Chowdhury et al., arXiv 2403.00409, eq. 9: the
  robust loss; `rlhfjax.losses.robust_dpo`).
  At the population optimum sigma(beta h*) = 1/2 + c (P - 1/2) exactly, so the implicit reward's
  slope on the clean logit shrinks by c to first order in P - 1/2; early in training too, where
  each loss's expected gradient in h at h = 0 is proportional to its target's P - 1/2.
  """
  noisy = 1.0 - 2.0 * eps
  return {"dpo": noisy, "cdpo": noisy * (1.0 - 2.0 * offline.cdpo.label_smoothing),
          "robust_dpo": noisy / (1.0 - 2.0 * offline.robust_dpo.label_noise)}[loss]


def run_noisy_labels(ctx: stages.Context, sft_params: Any, clean_probe: PairProbe) -> dict:
  """Claim 2: DPO, cDPO and robust DPO on flipped labels, and DPO on the clean ones."""
  nc = ctx.config.noisy_labels
  clean = _claim_context(ctx, "noisy_labels/clean_labels", nc)
  row, records = _train(clean, sft_params, "dpo", clean_probe)
  rows = [{**row, "method": "dpo_clean_labels", "slope_vs_clean": 1.0,
           "expected_slope_vs_clean": 1.0, **_curves(records)}]
  clean_slope = row["heldout_reward_slope"]
  noisy = _claim_context(ctx, "noisy_labels", nc, task={"label_noise": nc.rate})
  train, _ = stages.split_pairs(noisy)
  flipped = [e["label_flipped"] for e in data_lib.gather(train, range(len(train)))]
  probe = make_probe(noisy)
  oc = noisy.config.offline
  for loss in NOISY_LOSSES:
    row, records = _train(noisy, sft_params, loss, probe)
    rows.append({**row, "method": loss,
                 "slope_vs_clean": row["heldout_reward_slope"] / clean_slope,
                 "expected_slope_vs_clean": expected_shrink(loss, nc.rate, oc),
                 **_curves(records)})
  return {"rate": nc.rate, "observed_flip_rate": float(np.mean(flipped)),
          "cdpo_label_smoothing": oc.cdpo.label_smoothing,
          "robust_dpo_label_noise": oc.robust_dpo.label_noise, "rows": rows}


def run_gpo(ctx: stages.Context, sft_params: Any, clean_probe: PairProbe) -> dict:
  """Claim 3: every configured convex f of GPO, trained the same way on the clean pairs."""
  gc = ctx.config.gpo
  rows = []
  for convex in gc.convex:
    claim = _claim_context(ctx, os.path.join("gpo", convex), gc,
                           offline={"gpo": {"convex": convex}})
    row, records = _train(claim, sft_params, "gpo", clean_probe)
    rows.append({"convex": convex, **row, "z": row["beta"] * row["train_margin"],
                 **_curves(records)})
  return {"rows": rows}


def plot(results: dict, path: str) -> str:
  """One PNG: the margins of claim 1, the gold reward of claim 2, the margins of claim 3."""
  det, noisy = results["deterministic"], results["noisy_labels"]
  margins = {loss: (det[loss]["logged_steps"], det[loss]["logged_margin"])
             for loss in DETERMINISTIC_LOSSES}
  steps = det["ipo"]["logged_steps"]
  margins["1/(2 tau)"] = (steps, [det["ipo"]["target"]] * len(steps))
  return metrics_lib.plot_panels({
      f"1. margin h, train batches (T = {det['temperature']})": margins,
      "1. margin h, held-out pairs": {
          loss: (det[loss]["eval_steps"], det[loss]["eval_heldout_margin"])
          for loss in DETERMINISTIC_LOSSES},
      f"2. gold reward, label noise {noisy['rate']}": {
          r["method"]: (r["eval_steps"], r["eval_gold_reward"]) for r in noisy["rows"]},
      "3. GPO margin h, train batches": {
          r["convex"]: (r["logged_steps"], r["logged_margin"]) for r in results["gpo"]["rows"]},
  }, path)


def tables(results: dict) -> str:
  """The three claims as plain-text tables."""
  det = results["deterministic"]
  rows = []
  for k, step in enumerate(det["dpo"]["eval_steps"]):
    rows.append({"step": step, **{f"{loss} {where} h": det[loss][f"eval_{where}_margin"][k]
                                  for loss in DETERMINISTIC_LOSSES
                                  for where in ("train", "heldout")}})
  columns = ["step"] + [f"{loss} {where} h" for loss in DETERMINISTIC_LOSSES
                        for where in ("train", "heldout")]
  ipo = det["ipo"]
  out = [f"1. Near-deterministic labels (T = {det['temperature']}, label determinism "
         f"{det['label_determinism']:.3f}): mean margin h on train and held-out pairs",
         common.format_table(rows, columns),
         f"   IPO tau = {ipo['tau']}: final train-pairs margin {ipo['final']['train_margin']:.3f} "
         f"vs 1/(2 tau) = {ipo['target']:.3f} (relative error {ipo['relative_error']:.2f}); "
         f"DPO beta = {det['dpo']['beta']}: {det['dpo']['final']['train_margin']:.3f}"]

  noisy = results["noisy_labels"]
  columns = ["method", "gold_reward", "win_rate", "kl", "heldout_gold_accuracy",
             "heldout_reward_slope", "slope_vs_clean", "expected_slope_vs_clean",
             "train_label_accuracy", "train_margin"]
  out += ["", f"2. Label noise {noisy['rate']} (observed flip rate "
          f"{noisy['observed_flip_rate']:.3f}). On held-out pairs: gold accuracy = sign of h vs "
          "the gold order,", "   reward slope = fitted slope of beta h on the clean logit "
          "(r_w - r_l) / T, and its ratio to the clean-label DPO's",
          common.format_table(noisy["rows"], columns)]

  columns = ["convex", "gold_reward", "win_rate", "kl", "train_margin", "heldout_margin", "z",
             "heldout_gold_accuracy"]
  out += ["", "3. GPO family on the clean pairs (z = beta h on train pairs)",
          common.format_table(results["gpo"]["rows"], columns)]
  return "\n".join(out)


def run(config) -> dict:
  """Runs SFT, then the three claims; returns (and writes) the results."""
  _check_config(config)
  t_start = time.perf_counter()
  ctx = stages.Context.create(config, EXPERIMENT)
  sft_params, sft_row = stages.run_sft(ctx)
  clean_probe = make_probe(ctx)
  results = {
      "run_dir": ctx.run_dir,
      "sft": sft_row,
      "deterministic": run_deterministic(ctx, sft_params),
      "noisy_labels": run_noisy_labels(ctx, sft_params, clean_probe),
      "gpo": run_gpo(ctx, sft_params, clean_probe),
  }
  results["plot"] = plot(results, os.path.join(ctx.run_dir, f"{EXPERIMENT}.png"))
  results["total_s"] = time.perf_counter() - t_start
  return common.write_report(results, "results.json", tables(results))


if __name__ == "__main__":
  common.launch(run, synthetic_config.get_config)
