"""Online-RL experiment modules: the online_rl run directory, config validation, and the
preference-collapse reproduction against its closed forms."""

import json
import os

import numpy as np
import pytest

from experiments import online_rl
from experiments import reproduce_online
from experiments.configs import online_rl as online_rl_config
from experiments.configs import reproduce_online as reproduce_config
from rlhfjax.train.metrics import read_jsonl


def small_config(tmp_path):
  config = online_rl_config.get_config()
  config.run_dir = str(tmp_path / "run")
  config.data_dir = str(tmp_path / "data")
  config.verifiable.num_train = 64
  config.verifiable.num_test = 16
  config.preference.num_sft = 64
  config.preference.num_pairs = 16
  config.preference.num_test = 16
  config.eval.num_prompts = 16
  config.sft.loop.num_steps = 4
  config.sft.optimizer.warmup_steps = 2
  config.sft.loop.eval_every = 0
  config.sft.loop.checkpoint_every = 0
  config.sft.loop.progress = False
  return small_online(config, num_iterations=3, checkpoint_every=2)


def small_online(config, *, num_iterations, checkpoint_every):
  """`config` with a few small online iterations (8 prompts x 2 samples), each logged."""
  config.online.update(num_iterations=num_iterations, checkpoint_every=checkpoint_every,
                       prompts_per_iteration=8, group_size=2, log_every=1, eval_every=0,
                       progress=False)
  return config


def test_online_rl_writes_run_directory(tmp_path):
  summary = online_rl.run(small_config(tmp_path))
  run_dir = summary["run_dir"]
  for name in ("config.json", "summary.json", "curves.png", "sft/metrics.jsonl",
               "grpo/metrics.jsonl"):
    assert os.path.exists(os.path.join(run_dir, name)), name
  with open(os.path.join(run_dir, "summary.json")) as f:
    assert json.load(f)["rows"] == summary["rows"]
  assert [r["method"] for r in summary["rows"]] == ["sft", "grpo"]
  for row in summary["rows"]:
    assert 0.0 <= row["sampled_accuracy"] <= 1.0 and 0.0 <= row["accuracy"] <= 1.0
  records = read_jsonl(os.path.join(run_dir, "grpo", "metrics.jsonl"))
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2, 3]
  assert {"reward", "kl", "rollout_entropy", "entropy", "response_len", "clip_frac",
          "generate_s", "score_s", "advantage_s", "update_s"} <= set(train[0])
  assert [r["step"] for r in records if r["split"] == "eval"] == [3]
  # The first iteration samples from the reference itself: the KL of its rollout is 0.
  assert train[0]["kl"] == pytest.approx(0.0, abs=1e-4)
  assert sorted(int(s) for s in os.listdir(os.path.join(run_dir, "grpo", "checkpoints"))) == [2, 3]


@pytest.mark.parametrize("key, value, message", [
    ("algorithm", "a2c", "config.online.algorithm"),
    ("reward_source", "gold", "config.online.reward_source"),
    ("num_minibatches", 3, "prompts_per_iteration"),
    ("regularizer", "pm", "regularizer 'pm' needs a reward-penalty algorithm"),
])
def test_bad_online_config_names_the_key(tmp_path, key, value, message):
  config = small_config(tmp_path)
  config.online[key] = value
  with pytest.raises(ValueError, match=message):
    online_rl.run(config)


def test_bad_algorithm_setting_names_the_key(tmp_path):
  config = small_config(tmp_path)
  config.online.grpo.eps = 0.2  # GRPO's clip range is eps_lo / eps_hi.
  with pytest.raises(ValueError, match=r"config.online \(grpo\).*'eps'"):
    online_rl.run(config)


def test_preference_collapse_reproduces_the_closed_forms(tmp_path):
  config = reproduce_config.get_config()
  config.run_dir = str(tmp_path / "run")
  config.reproduce.skip_verifiable = True
  config.collapse.num_steps = 2000
  results = reproduce_online.run(config)
  assert os.path.exists(os.path.join(config.run_dir, "results.json"))
  assert os.path.exists(results["plot"])
  two = results["collapse"]["two_responses"]
  # PM-RLHF matches the preferences: pi(y1) = P(y1 > y2), whatever the reference (here 0.2).
  assert two["pm_trained"][0] == pytest.approx(config.collapse.preference, abs=1e-3)
  rows = {r["beta"]: r for r in two["kl"]}
  # KL-RLHF: the trained policy is pi_ref exp(r / beta) / Z; at beta = 1 it keeps the
  # reference's bias (pi(y1) = 0.2 * 0.7 / (0.2 * 0.7 + 0.8 * 0.3) = 0.368), at beta = 0.1 it
  # collapses onto y1.
  assert rows[1.0]["kl_trained"][0] == pytest.approx(0.2 * 0.7 / (0.2 * 0.7 + 0.8 * 0.3),
                                                     abs=1e-3)
  assert rows[0.1]["max_prob"] > 0.99
  many = results["collapse"]["many_responses"]
  assert many["pm_trained_error"] < 1e-3
  for row in many["kl"]:
    assert row["kl_trained_vs_closed_form_tv"] < 5e-3
    assert row["preference_matching_error"] > 0.1
  assert np.argmax(many["kl"][-1]["kl_optimum"]) == np.argmax(many["reward"])
  config.collapse.preference = 0.4
  with pytest.raises(ValueError, match="config.collapse.preference"):
    reproduce_online.run(config)
