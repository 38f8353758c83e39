"""The synthetic-task reproduction runs small, writes its run directory, and its robust trends
hold."""

import json
import os

import jax
import numpy as np
import pytest

from experiments import reproduce_preference_synthetic as synthetic
from experiments.configs import reproduce_preference_synthetic as synthetic_config

CONVEX = ("squared",)


def small_config(tmp_path):
  config = synthetic_config.get_config()
  config.run_dir = str(tmp_path / "run")
  config.data_dir = str(tmp_path / "data")
  config.verifiable.num_train = 128
  config.verifiable.num_test = 16
  config.preference.num_sft = 256
  config.preference.num_pairs = 256
  config.preference.num_test = 32
  config.eval.num_prompts = 16
  config.probe.num_pairs = 32
  config.sft.loop.num_steps = 10
  config.sft.loop.checkpoint_every = 0
  config.sft.optimizer.warmup_steps = 3
  config.offline.optimizer.warmup_steps = 2
  config.offline.loop.log_every = 2
  for stage in (config.sft, config.offline):
    stage.loop.progress = False
    stage.loop.batch_size = 32
  config.deterministic.num_steps = 6
  config.deterministic.eval_every = 3
  config.noisy_labels.num_steps = 6
  config.noisy_labels.eval_every = 0
  config.gpo.convex = CONVEX
  config.gpo.num_steps = 6
  return config


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  return synthetic.run(small_config(tmp_path_factory.mktemp("synthetic")))


def test_writes_run_directory(results):
  run_dir = results["run_dir"]
  for name in ("config.json", "results.json", "reproduce_preference_synthetic.png",
               "deterministic/dpo/metrics.jsonl", "deterministic/ipo/metrics.jsonl",
               "noisy_labels/clean_labels/dpo/metrics.jsonl",
               "noisy_labels/robust_dpo/metrics.jsonl",
               "gpo/squared/gpo/metrics.jsonl"):
    assert os.path.exists(os.path.join(run_dir, name)), name
  with open(os.path.join(run_dir, "results.json")) as f:
    written = json.load(f)
  for key in ("sft", "deterministic", "noisy_labels", "gpo"):
    assert written[key] == results[key]


def test_deterministic_claim_structure_and_trend(results):
  det = results["deterministic"]
  # T = 0.01 against gold gaps of order 1: almost every label follows the gold order.
  assert det["temperature"] == 0.01 and det["label_determinism"] > 0.9
  for loss in ("dpo", "ipo"):
    assert det[loss]["eval_steps"] == [3, 6]
    assert len(det[loss]["eval_train_margin"]) == len(det[loss]["eval_heldout_margin"]) == 2
    assert {"gold_reward", "kl", "win_rate", "train_margin", "heldout_gold_accuracy"} <= set(
        det[loss]["final"])
  assert det["ipo"]["target"] == pytest.approx(1.0 / (2.0 * det["ipo"]["tau"]))
  dpo = det["dpo"]
  # Training starts at the reference (h = 0 on every pair) and DPO pushes the margins up.
  assert dpo["logged_steps"] == [2, 4, 6]
  assert dpo["logged_margin"][-1] > dpo["logged_margin"][0]
  assert dpo["eval_train_margin"][-1] > dpo["eval_train_margin"][0] > 0.0


def test_noisy_labels_rows(results):
  noisy = results["noisy_labels"]
  assert [r["method"] for r in noisy["rows"]] == ["dpo_clean_labels", "dpo", "cdpo",
                                                  "robust_dpo"]
  # The FieldReference in the config keeps the data's flip rate and both corrections equal.
  assert noisy["rate"] == noisy["robust_dpo_label_noise"] == noisy["cdpo_label_smoothing"] == 0.2
  # 256 pairs, 10% held out for the reward model: a binomial(230, 0.2) flip count.
  assert 0.1 < noisy["observed_flip_rate"] < 0.3
  # (1 - 2 eps), (1 - 2 eps)^2 and 1 at eps = 0.2 (`expected_shrink`).
  assert [r["expected_slope_vs_clean"] for r in noisy["rows"]] == pytest.approx(
      [1.0, 0.6, 0.36, 1.0])
  clean_slope = noisy["rows"][0]["heldout_reward_slope"]
  for row in noisy["rows"]:
    assert row["slope_vs_clean"] == pytest.approx(row["heldout_reward_slope"] / clean_slope)
    for key in ("heldout_gold_accuracy", "train_label_accuracy", "win_rate"):
      assert 0.0 <= row[key] <= 1.0, (row["method"], key)
    assert np.isfinite([row["gold_reward"], row["kl"], row["heldout_reward_slope"]]).all()


def test_gpo_rows(results):
  rows = results["gpo"]["rows"]
  assert [r["convex"] for r in rows] == list(CONVEX)
  for row in rows:
    assert row["z"] == pytest.approx(row["beta"] * row["train_margin"])
    assert np.isfinite([row["gold_reward"], row["kl"], row["heldout_margin"]]).all()


@pytest.mark.parametrize("temperature,beta", [(0.5, 0.1), (1.0, 2.0)])
def test_implicit_reward_stats_match_a_loop(temperature, beta):
  """The probe's statistics, recomputed from their definitions pair by pair."""
  rng = np.random.default_rng(0)
  h = rng.normal(size=16)
  gap = np.where(rng.random(16) < 0.25, 0.0, rng.normal(size=16))  # Some gold ties.
  stats = synthetic.implicit_reward_stats(h, gap, beta=beta, temperature=temperature)
  untied = [(hi, gi) for hi, gi in zip(h, gap) if gi != 0]
  assert stats["margin"] == pytest.approx(sum(h) / len(h))
  assert stats["label_accuracy"] == pytest.approx(sum(hi > 0 for hi in h) / len(h))
  assert stats["gold_accuracy"] == pytest.approx(
      sum((hi > 0) == (gi > 0) for hi, gi in untied) / len(untied))
  num = sum(beta * hi * gi / temperature for hi, gi in zip(h, gap))
  den = sum((gi / temperature) ** 2 for gi in gap)
  assert stats["reward_slope"] == pytest.approx(num / den)
  # At DPO's clean optimum beta h = g / T, the slope is 1 and every untied pair is ordered.
  optimum = synthetic.implicit_reward_stats(gap / (temperature * beta), gap, beta=beta,
                                            temperature=temperature)
  assert optimum["reward_slope"] == pytest.approx(1.0)
  assert optimum["gold_accuracy"] == 1.0


@pytest.mark.parametrize("loss", ["dpo", "cdpo", "robust_dpo"])
def test_expected_shrink_is_the_population_optimum(loss):
  """sigma(h*) - 1/2 = c (P - 1/2) at the minimum over h of the loss averaged over noisy labels
  (the root of its derivative: the losses are float32, whose values are too flat to bracket h*)."""
  from scipy import optimize

  from rlhfjax import losses as losses_lib

  clean_p, eps = 0.8, 0.2
  offline = synthetic_config.get_config().copy_and_resolve_references().offline
  offline.cdpo.label_smoothing, offline.robust_dpo.label_noise = 0.1, 0.15
  fn = {"dpo": lambda h, y: losses_lib.dpo(h * y, 0.0 * h, 0.0, 0.0, beta=1.0),
        "cdpo": lambda h, y: losses_lib.cdpo(h * y, 0.0 * h, 0.0, 0.0, beta=1.0,
                                             label_smoothing=0.1),
        "robust_dpo": lambda h, y: losses_lib.robust_dpo(h * y, 0.0 * h, 0.0, 0.0, beta=1.0,
                                                         label_noise=0.15)}[loss]
  noisy_p = (1.0 - 2.0 * eps) * (clean_p - 0.5) + 0.5  # Labels flipped with probability eps.
  slope = jax.jit(jax.grad(lambda h: noisy_p * fn(h, 1.0) + (1.0 - noisy_p) * fn(h, -1.0)))
  h_star = optimize.brentq(lambda h: float(slope(h)), -20.0, 20.0, xtol=1e-10)
  shrink = (1.0 / (1.0 + np.exp(-h_star)) - 0.5) / (clean_p - 0.5)
  assert shrink == pytest.approx(synthetic.expected_shrink(loss, eps, offline), abs=1e-5)


@pytest.mark.parametrize("key,value,match", [
    ("deterministic.temperature", 0.0, "config.deterministic.temperature"),
    ("noisy_labels.rate", 0.5, "config.noisy_labels.rate"),
    ("gpo.convex", ("cubic",), "config.gpo.convex"),
    ("gpo.num_steps", 2, "config.gpo.num_steps"),
])
def test_bad_config_names_the_key(tmp_path, key, value, match):
  config = small_config(tmp_path)
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=match):
    synthetic.run(config)
