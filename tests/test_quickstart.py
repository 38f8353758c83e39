"""The quick start runs end to end on a small budget and writes its run directory."""

import json
import os

import numpy as np
import pytest

from experiments import common, quickstart
from experiments.configs import quickstart as quickstart_config
from rlhfjax.train import steps
from rlhfjax.train.metrics import read_jsonl
from tests.test_online_experiments import small_online
from tests.tiny_runs import shrink

SFT_STEPS = 4


def small_config(tmp_path):
  config = shrink(quickstart_config.get_config(), tmp_path, sft_steps=SFT_STEPS)
  # A few steps of each stage: the test checks the wiring (records, checkpoints, rows), and that
  # SFT's loss falls, which it does from the first steps.
  config.sft.loop.update(log_every=2, eval_every=2, checkpoint_every=2)
  for stage in (config.reward_model, config.offline):
    stage.loop.update(num_steps=2, eval_every=2, checkpoint_every=0, batch_size=16,
                      progress=False)
    stage.optimizer.warmup_steps = 1
  return small_online(config, num_iterations=2, checkpoint_every=0)


def test_quickstart_writes_run_directory(tmp_path):
  summary = quickstart.run(small_config(tmp_path))
  run_dir = summary["run_dir"]
  for name in ("config.json", "summary.json", "curves.png", "sft/metrics.jsonl"):
    assert os.path.exists(os.path.join(run_dir, name)), name
  assert os.listdir(os.path.join(run_dir, "sft", "tb"))
  assert sorted(int(s) for s in os.listdir(os.path.join(run_dir, "sft", "checkpoints"))) == [
      SFT_STEPS // 2, SFT_STEPS]
  with open(os.path.join(run_dir, "summary.json")) as f:
    assert json.load(f)["rows"] == summary["rows"]
  methods = [r["method"] for r in summary["rows"]]
  assert methods == ["init", "sft", "reward_model", "dpo", "ipo", "remax", "grpo"]
  by_method = {r["method"]: r for r in summary["rows"]}
  for method in ("dpo", "ipo", "remax", "grpo"):
    assert {"accuracy", "kl", "win_rate", "gold_reward"} <= set(by_method[method]), method
  for method in ("sft", "remax", "grpo"):
    assert 0.0 <= by_method[method]["sampled_accuracy"] <= 1.0, method
  for method in ("remax", "grpo"):
    online = read_jsonl(os.path.join(run_dir, method, "metrics.jsonl"))
    assert [r["step"] for r in online if r["split"] == "train"] == [1, 2]
    # The first rollout samples from the SFT policy itself, the reference: its KL is 0.
    assert online[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert by_method[method]["reward"] == online[-2]["reward"]  # The last train record.
  assert 0.0 <= by_method["reward_model"]["rm_accuracy"] <= 1.0
  train = [r for r in read_jsonl(os.path.join(run_dir, "sft", "metrics.jsonl"))
           if r["split"] == "train"]
  assert train[-1]["loss"] < train[0]["loss"]
  evals = [r for r in read_jsonl(os.path.join(run_dir, "sft", "metrics.jsonl"))
           if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [SFT_STEPS // 2, SFT_STEPS]
  assert {"accuracy", "gold_reward", "response_len"} <= set(evals[0])


def test_bad_config_names_the_key(tmp_path):
  config = small_config(tmp_path)
  config.verifiable.demo_error_rate = 1.5
  with pytest.raises(ValueError, match="demo_error_rate"):
    quickstart.run(config)
  config = small_config(tmp_path)
  config.sft.optimizer.name = "adagrad"
  with pytest.raises(ValueError, match="config.sft.optimizer: optimizer name"):
    quickstart.run(config)
  config = small_config(tmp_path)
  config.prompt_len = 4
  with pytest.raises(ValueError, match="config.prompt_len"):
    quickstart.run(config)
  config = small_config(tmp_path)
  config.reward_model.optimizer.accumulation_steps = 0
  with pytest.raises(ValueError, match="config.reward_model.optimizer: accumulation_steps"):
    quickstart.run(config)
  for change, message in [
      (lambda c: setattr(c.offline, "reference", "cached"), "config.offline: reference must be"),
      (lambda c: c.offline.dpo.update(beta=-1.0), "config.offline: dpo.beta must be > 0"),
      (lambda c: c.offline.dpo.update(bta=0.1), "config.offline: dpo has no setting 'bta'"),
      (lambda c: c.offline.loop.update(batch_size=12), "config.offline.loop.batch_size \\(12\\)"),
      (lambda c: c.reward_model.loop.update(log_every=0), "config.reward_model.loop: log_every"),
      (lambda c: c.eval.update(num_prompts=4), "config.eval.num_prompts \\(4\\) must be at least"),
  ]:
    config = small_config(tmp_path)
    change(config)
    with pytest.raises(ValueError, match=message):
      quickstart.run(config)
  config = small_config(tmp_path)
  config.offline.loss = "kto"
  with pytest.raises(ValueError, match="config.offline.loss"):
    quickstart.run(config)
  config = small_config(tmp_path)
  config.model = "gpt5"
  with pytest.raises(ValueError, match="config.model"):
    quickstart.run(config)


def test_accumulated_batches_hold_the_micro_batches_of_a_step():
  """Step s of k accumulated micro-batches trains on get_batch(s k + i), i < k: the batches k
  steps without accumulation would have seen, in order."""
  get = lambda i: {"tokens": np.full((2, 3), i), "loss_mask": np.arange(6).reshape(2, 3) + 10 * i}
  assert common.accumulated_batches(get, 1) is get
  micro = steps.split_micro_batches(common.accumulated_batches(get, 3)(1), 3)
  for i in range(3):
    for key in ("tokens", "loss_mask"):
      np.testing.assert_array_equal(np.asarray(micro[key][i]), get(3 + i)[key])


def test_stage_optimizer_passes_every_setting_and_counts_optimizer_updates():
  """common.make_optimizer(oc, n) is optimizers.make_optimizer with oc's settings over n updates
  (accumulated micro-batches do not lengthen the schedule)."""
  from experiments.configs import base  # pylint: disable=g-import-not-at-top
  from rlhfjax.train import optimizers  # pylint: disable=g-import-not-at-top
  from tests.train.test_optimizers import _assert_same_updates  # pylint: disable=g-import-not-at-top
  oc = base.optimizer_config(learning_rate=0.1, warmup_steps=1, b1=0.8, b2=0.95, eps=1e-6,
                             weight_decay=0.3, clip_norm=0.5, accumulation_steps=3)
  _assert_same_updates(common.make_optimizer(oc, 4), optimizers.make_optimizer(
      "adamw", 0.1, warmup_steps=1, total_steps=4, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.3,
      clip_norm=0.5))


def test_reused_run_directory_keeps_its_config(tmp_path):
  """A run directory's config.json is never lost: a different one is kept aside, and with
  checkpoints present only the run's length and logging may change."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({"run_dir": str(tmp_path), "lr": 1e-3,
                                      "loop": {"num_steps": 4, "log_every": 1}})
  read = lambda: json.load(open(tmp_path / "config.json"))
  common.resolve_run_dir(config, "x")
  config.loop.num_steps = 8  # Before any checkpoint every change is allowed; the old one is kept.
  common.resolve_run_dir(config, "x")
  assert read()["loop"]["num_steps"] == 8
  kept = [f for f in os.listdir(tmp_path) if f.startswith("config.") and f != "config.json"]
  assert len(kept) == 1 and json.load(open(tmp_path / kept[0]))["loop"]["num_steps"] == 4
  os.makedirs(tmp_path / "sft" / "checkpoints" / "4")
  config.loop.num_steps, config.loop.log_every = 12, 2  # Longer, logged differently: resumable.
  common.resolve_run_dir(config, "x")
  assert read()["loop"] == {"num_steps": 12, "log_every": 2}
  config.lr = 3e-3
  with pytest.raises(ValueError, match=r"another config \(it differs in \['lr'\]\)"):
    common.resolve_run_dir(config, "x")
  assert read()["lr"] == 1e-3  # Untouched by the refused run.
  assert common.config_differences({"a": {"b": 1}, "c": 2}, {"a": {"b": 2}, "d": 2}) == \
      ["a.b", "c", "d"]


def test_empty_checkpoint_directories_do_not_block_a_config_change(tmp_path):
  """Only saved checkpoints pin a run's config: an empty `checkpoints/` (a stage that saved
  nothing yet) lets any key change, the old config kept aside."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({"run_dir": str(tmp_path), "lr": 1e-3})
  common.resolve_run_dir(config, "x")
  os.makedirs(tmp_path / "sft" / "checkpoints")
  config.lr = 3e-3
  common.resolve_run_dir(config, "x")
  assert json.load(open(tmp_path / "config.json"))["lr"] == 3e-3
  kept = [f for f in os.listdir(tmp_path) if f.startswith("config.") and f != "config.json"]
  assert [json.load(open(tmp_path / f))["lr"] for f in kept] == [1e-3]
