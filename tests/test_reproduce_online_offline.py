"""The online-vs-offline gap experiment runs small on one shared budget and writes its run
directory."""

import json
import os

import pytest

from experiments import reproduce_online_offline as gap
from experiments.configs import reproduce_online_offline as gap_config
from rlhfjax.train.metrics import read_jsonl
from tests.tiny_runs import shrink

STEPS, PAIRS = 4, 16


def small_config(tmp_path):
  config = shrink(gap_config.get_config(), tmp_path, num_pairs=64)
  config.online_preference.progress = False
  config.online_preference.log_every = 1
  config.gap.methods = ("online_ipo",)
  config.gap.num_steps = STEPS
  config.gap.pairs_per_step = PAIRS
  config.gap.eval_every = 2
  return config


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  return gap.run(small_config(tmp_path_factory.mktemp("gap")))


def test_writes_run_directory(results):
  run_dir = results["run_dir"]
  for name in ("config.json", "results.json", "reproduce_online_offline.png", "sft/metrics.jsonl",
               "dpo/metrics.jsonl", "online_ipo/metrics.jsonl"):
    assert os.path.exists(os.path.join(run_dir, name)), name
  with open(os.path.join(run_dir, "results.json")) as f:
    written = json.load(f)
  assert written["rows"] == results["rows"]
  assert [r["method"] for r in results["rows"]] == ["offline_dpo", "online_ipo"]


def test_every_method_uses_the_same_budget(results):
  # 58 train pairs: 64 minus the 10% held out by `reward_model.eval_fraction` (int(6.4) = 6).
  assert results["budget"] == {"gradient_steps": STEPS, "pairs_per_step": PAIRS,
                               "judged_pairs": STEPS * PAIRS, "offline_dataset_pairs": 58,
                               "offline_epochs": pytest.approx(STEPS * PAIRS / 58)}
  for row in results["rows"]:
    assert row["judged_pairs"] == STEPS * PAIRS and row["gradient_steps"] == STEPS
  for method, curve in results["curves"].items():
    assert curve["judged_pairs"] == [2 * PAIRS, 4 * PAIRS], method
    assert len(curve["gold_reward"]) == len(curve["kl"]) == 2
  online = [r for r in read_jsonl(os.path.join(results["run_dir"], "online_ipo", "metrics.jsonl"))
            if r["split"] == "train"]
  assert [r["judged_pairs"] for r in online] == [PAIRS * (i + 1) for i in range(STEPS)]
  # The first iteration samples from the SFT policy itself: the judge compares two of its
  # samples, and online IPO's soft labels weight each pair by the judge's p >= 1/2.
  assert 0 < online[0]["judge_prob_first"] < 1
  assert all(r["chosen_prob"] >= 0.5 for r in online)


def test_bad_budget_names_the_key(tmp_path):
  config = small_config(tmp_path)
  config.gap.methods = ("online_ppo",)
  with pytest.raises(ValueError, match="config.gap.methods"):
    gap.run(config)
