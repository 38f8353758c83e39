"""The synthetic-task DeRa sweep runs small, writes its run directory, and its endpoints are exact:
lambda = 0 decodes the SFT policy (KL 0), lambda = 1 the aligned model, with the same rng."""

import json
import os

import pytest

from experiments import reproduce_dera
from experiments.configs import reproduce_dera as dera_config
from tests.tiny_runs import shrink


def small_config(tmp_path):
  config = shrink(dera_config.get_config(), tmp_path)
  config.offline.loop.num_steps = 8
  config.offline.optimizer.learning_rate = 3e-3
  config.dera.lams = (0.0, 1.0, 2.0)
  # Retrained at beta / 1 = beta: the aligned model's own training again (and its programs, so
  # nothing compiles twice), which pins the retraining path against the DeRa row at lam = 1.
  config.dera.retrained_lams = (1.0,)
  return config


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  return reproduce_dera.run(small_config(tmp_path_factory.mktemp("dera")))


def test_writes_run_directory(results):
  run_dir = results["run_dir"]
  for name in ("config.json", "results.json", "reproduce_dera.png", "sft/metrics.jsonl",
               "dpo/metrics.jsonl", "retrained_lam_1/dpo/metrics.jsonl"):
    assert os.path.exists(os.path.join(run_dir, name)), name
  with open(os.path.join(run_dir, "results.json")) as f:
    written = json.load(f)
  for key in ("dera", "retrained", "endpoints"):
    assert written[key] == results[key]
  assert [r["lam"] for r in results["dera"]] == [0.0, 1.0, 2.0]
  # Strength beta / lam: the aligned model's beta (0.1) at lam 1, halved at lam 2.
  assert [r["strength"] for r in results["dera"]] == [None, pytest.approx(0.1),
                                                      pytest.approx(0.05)]
  assert [(r["lam"], r["strength"]) for r in results["retrained"]] == [(1.0, pytest.approx(0.1))]


def test_lambda_zero_is_the_sft_policy_and_one_the_aligned_model(results):
  rows = {r["lam"]: r for r in results["dera"]}
  sft, aligned = results["endpoints"]["sft"], results["endpoints"]["aligned"]
  # lam = 0: the mixture's logits are the SFT policy's exactly, so the same tokens and KL 0.
  assert rows[0.0]["kl"] == pytest.approx(0.0, abs=1e-6)
  assert rows[0.0]["gold_reward"] == pytest.approx(sft["gold_reward"], abs=1e-6)
  assert rows[0.0]["response_len"] == pytest.approx(sft["response_len"], abs=1e-6)
  # lam = 1: the aligned model's own samples.
  assert rows[1.0]["gold_reward"] == pytest.approx(aligned["gold_reward"], abs=1e-6)
  assert rows[1.0]["response_len"] == pytest.approx(aligned["response_len"], abs=1e-6)
  # The exact KL grows away from the SFT policy.
  assert 0 < rows[1.0]["kl"] < rows[2.0]["kl"]


def test_retraining_at_the_same_strength_reproduces_the_aligned_row(results):
  # Same seed, data order and beta: the retrained model is the aligned one, decoded with the
  # same rng, so its row equals DeRa's at lam = 1.
  [retrained] = results["retrained"]
  dera = {r["lam"]: r for r in results["dera"]}[1.0]
  for key in ("gold_reward", "kl", "response_len"):
    assert retrained[key] == pytest.approx(dera[key], abs=1e-5), key


def test_bad_config_names_the_key(tmp_path):
  config = small_config(tmp_path)
  config.dera.loss = "slic"
  with pytest.raises(ValueError, match="config.dera.loss"):
    reproduce_dera.run(config)
