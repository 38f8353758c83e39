"""`python -m experiments.online_preference` runs small end to end (Nash-MD-PG judged by the
pairwise preference model it trains) and names bad keys."""

import json
import os

import pytest

from experiments import online_preference
from experiments.configs import online_preference as online_preference_config
from rlhfjax.train.metrics import read_jsonl
from tests.tiny_runs import shrink


def small_config(tmp_path):
  config = shrink(online_preference_config.get_config(), tmp_path, num_sft=64, num_pairs=64,
                  sft_steps=6)
  pc = config.online_preference
  pc.update(algorithm="nash_md_pg", judge="preference_model", num_iterations=2,
            prompts_per_iteration=8, log_every=1, eval_every=0, progress=False)
  pc.preference_model.loop.update(num_steps=3, batch_size=16, progress=False)
  pc.preference_model.optimizer.warmup_steps = 1
  return config


def test_runs_nash_md_pg_with_the_preference_model(tmp_path):
  summary = online_preference.run(small_config(tmp_path))
  run_dir = summary["run_dir"]
  for name in ("config.json", "summary.json", "curves.png", "preference_model/metrics.jsonl",
               "nash_md_pg/metrics.jsonl"):
    assert os.path.exists(os.path.join(run_dir, name)), name
  with open(os.path.join(run_dir, "summary.json")) as f:
    assert json.load(f)["rows"] == summary["rows"]
  assert [r["method"] for r in summary["rows"]] == ["sft", "nash_md_pg"]
  train = [r for r in read_jsonl(os.path.join(run_dir, "nash_md_pg", "metrics.jsonl"))
           if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2]
  assert [r["judged_pairs"] for r in train] == [8.0, 16.0]
  # P(y > y') of a preference model strictly between 0 and 1; finite surrogate loss.
  for r in train:
    assert 0 < r["judge_prob_first"] < 1 and abs(r["loss"]) < 1e3


@pytest.mark.parametrize("key, value, message", [
    ("algorithm", "ppo", "config.online_preference.algorithm"),
    ("judge", "oracle", "config.online_preference.judge"),
    ("labels", "probability", r"config.online_preference \(online_dpo\).*soft labels"),
])
def test_bad_config_names_the_key(tmp_path, key, value, message):
  config = small_config(tmp_path)
  config.online_preference.algorithm = "online_dpo"
  config.online_preference[key] = value
  with pytest.raises(ValueError, match=message):
    online_preference.run(config)
