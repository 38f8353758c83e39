"""End-to-end runs of `experiments.real` on each real config, a few steps each.

The checkpoint is a tiny RANDOM Llama written by transformers, the tokenizer a byte-level BPE
trained here on the fixture texts with the Llama-3 chat template, and the datasets are the fixture
files of `tests/data/test_real_builders.py` in their source formats in a manual directory: nothing
is downloaded.
"""

import importlib
import json
import math
import os
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import orbax.checkpoint as ocp  # pylint: disable=wrong-import-position

from experiments import real as real_run  # pylint: disable=wrong-import-position
from experiments.configs import base  # pylint: disable=wrong-import-position
from rlhfjax import data as data_lib  # pylint: disable=wrong-import-position
from rlhfjax import sharding as shd  # pylint: disable=wrong-import-position
from rlhfjax.models import load_pretrained  # pylint: disable=wrong-import-position
from rlhfjax.models.hf import read_hf_config  # pylint: disable=wrong-import-position
from tests import hf_fixtures  # pylint: disable=wrong-import-position
from tests.data.test_real_builders import (  # pylint: disable=wrong-import-position
    GSM8K_MAIN,
    HH,
    ULTRAFEEDBACK,
)

FIXTURES = {f.name: f for f in (HH, ULTRAFEEDBACK, GSM8K_MAIN)}
VOCAB = 512
# Slots that fit every HH and UltraFeedback fixture example with this tokenizer (their prompts
# have at most 42 tokens, their responses 8). GSM8K prompts with the config's instruction have 64
# and 72 tokens: with a 64-token slot one of its two questions is skipped as over-long.
PROMPT_LEN, RESPONSE_LEN, GSM8K_PROMPT_LEN = 48, 16, 64


def _strings(value):
  if isinstance(value, str):
    yield value
  elif isinstance(value, dict):
    for v in value.values():
      yield from _strings(v)
  elif isinstance(value, list):
    for v in value:
      yield from _strings(v)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """(checkpoint directory with the tokenizer beside the weights, {dataset: manual_dir})."""
  root = tmp_path_factory.mktemp("real")
  manual, corpus = {}, ["user assistant system #### \\boxed{72}"]
  for name, fixture in FIXTURES.items():
    manual[name] = str(root / "manual" / name)
    corpus += list(_strings(fixture.write(root / "manual" / name, False)))
  checkpoint = str(root / "checkpoint")
  hf_fixtures.write_llama(checkpoint, vocab_size=VOCAB, seed=0, num_layers=1)
  hf_fixtures.write_tokenizer(checkpoint, corpus=corpus * 4, vocab_size=VOCAB)
  return checkpoint, manual


def _tiny_config(module, assets, tmp_path):
  checkpoint, manual = assets
  config = importlib.import_module(f"experiments.configs.{module}").get_config()
  config.checkpoint = checkpoint
  config.run_dir = str(tmp_path / "run")
  config.data_dir = str(tmp_path / "data")
  config.dataset.manual_dir = manual[config.dataset.name]
  config.compute_dtype = "float32"
  config.prompt_len, config.response_len = PROMPT_LEN, RESPONSE_LEN
  config.eval.num_prompts = 8
  for stage in ("sft", "offline", "grpo"):
    if stage in config:
      # Batch 8 = the 8 fsdp shards of the test mesh; a large step size so 3 steps move the loss.
      config[stage].optimizer = base.optimizer_config(learning_rate=1e-2, warmup_steps=0)
      config[stage].loop = base.loop_config(num_steps=3, batch_size=8, log_every=1, eval_every=0,
                                            checkpoint_every=3, progress=False)
  if "grpo" in config:
    # P = 8 prompts (the GSM8K fixture's 2 questions, repeated), G = 2: one minibatch of 16.
    config.grpo.update(prompts_per_step=8, group_size=2, max_new_tokens=8)
    config.grpo.loop.batch_size = 16
    config.prompt_len = GSM8K_PROMPT_LEN
  return config


def _records(run_dir, stage):
  with open(os.path.join(run_dir, stage, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return ([r for r in records if r["split"] == "train"],
          [r for r in records if r["split"] == "eval"])


def _check_stage_outputs(run_dir, stage, num_steps=3):
  """Every step logged with a finite loss, a final held-out record, and the last checkpoint."""
  train, evals = _records(run_dir, stage)
  assert [r["step"] for r in train] == list(range(1, num_steps + 1))
  assert all(math.isfinite(r["loss"]) for r in train)
  assert [r["step"] for r in evals] == [num_steps]
  assert os.listdir(os.path.join(run_dir, stage, "checkpoints")) == ["3"]
  return train, evals


def _by_path(tree):
  """{"layers/0/mlp/...": numpy array}: orbax restores integer dict keys as strings."""
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_export(summary, checkpoint, stage):
  """The export reloads, bit-identical to the stage's last orbax checkpoint, and is not the
  starting checkpoint; transformers loads it too."""
  export = summary["export_dir"]
  _, params = load_pretrained(export)
  saved = ocp.StandardCheckpointer().restore(
      os.path.join(summary["run_dir"], stage, "checkpoints", "3", "default"))
  saved_params = _by_path(saved["policy"]["params"] if stage == "grpo" else saved["params"])
  exported = _by_path(params)
  assert sorted(exported) == sorted(saved_params)
  for path, x in exported.items():
    np.testing.assert_array_equal(x, saved_params[path], err_msg=path)
  initial = _by_path(load_pretrained(checkpoint)[1])
  assert any(np.any(x != initial[path]) for path, x in exported.items())
  assert read_hf_config(export)["eos_token_id"] == read_hf_config(checkpoint)["eos_token_id"]
  assert data_lib.load_tokenizer(export).vocab_size == data_lib.load_tokenizer(
      checkpoint).vocab_size
  transformers.AutoModelForCausalLM.from_pretrained(export)


def test_gem_sft_on_ultrafeedback(assets, tmp_path):
  config = _tiny_config("real_gem_ultrafeedback", assets, tmp_path)
  summary = real_run.run(config)
  run_dir = summary["run_dir"]
  train, evals = _check_stage_outputs(run_dir, "sft")
  assert train[-1]["loss"] < train[0]["loss"]
  assert evals[-1]["nll"] > 0  # GEM reports the plain cross-entropy beside its own loss
  stats = summary["data"]["train_sft/sft"]
  # 3 rows per split in the fixture, all within the slots.
  assert (stats["source_examples"], stats["kept"], stats["overlong"]) == (3, 3, 0)
  assert summary["rows"][0]["stage"] == "sft"
  for name in ("config.json", "data_stats.json", "summary.json", "curves.png"):
    assert os.path.exists(os.path.join(run_dir, name)), name
  _check_export(summary, assets[0], "sft")
  _check_tokenized_cache(config, assets[0])


def _check_tokenized_cache(config, tokenizer_dir):
  """The tokenised splits are cached under data_dir, and the cache gives what encoding gives."""
  tokenizer = data_lib.load_tokenizer(tokenizer_dir)
  chat_format = data_lib.resolve_chat_format(tokenizer)
  cache_dir = os.path.join(config.data_dir, "tokenized")
  assert len(os.listdir(cache_dir)) == 2  # train_sft and test_sft
  encode = lambda: real_run.encode_split(config, tokenizer, tokenizer_dir, chat_format,
                                         config.dataset.train_split, "sft")
  cached_examples, cached_stats = encode()
  shutil.rmtree(cache_dir)
  fresh_examples, fresh_stats = encode()
  assert cached_stats == fresh_stats
  assert len(cached_examples) == len(fresh_examples) == 3
  for cached, fresh in zip(cached_examples, fresh_examples):
    assert sorted(cached) == sorted(fresh) == ["prompt", "response"]
    for key in cached:
      np.testing.assert_array_equal(cached[key], fresh[key])


def test_sft_then_dpo_on_hh(assets, tmp_path):
  config = _tiny_config("real_dpo_hh", assets, tmp_path)
  assert tuple(config.stages) == ("sft", "offline")
  summary = real_run.run(config)
  _check_stage_outputs(summary["run_dir"], "sft")
  train, evals = _check_stage_outputs(summary["run_dir"], "dpo")
  # At the first step the policy IS the reference: every log-ratio is 0 and the DPO loss is
  # -log sigmoid(0) = log 2 exactly (up to float32 rounding of the two equal forward passes).
  np.testing.assert_allclose(train[0]["loss"], math.log(2.0), atol=1e-5)
  np.testing.assert_allclose(train[0]["margin"], 0.0, atol=1e-4)
  assert train[-1]["loss"] < math.log(2.0)
  assert 0.0 <= evals[-1]["reward_accuracy"] <= 1.0
  assert [r["stage"] for r in summary["rows"]] == ["sft", "dpo"]
  # 3 pairs per subset and split, 4 subsets (config "all").
  assert summary["data"]["train/preference"]["kept"] == 12
  _check_export(summary, assets[0], "dpo")


def _digit_share(completion: str, reference: str) -> float:
  """A reward a random policy earns unevenly: the share of the completion's characters that are
  digits."""
  del reference
  return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def test_grpo_on_gsm8k(assets, tmp_path, monkeypatch):
  """The GSM8K pipeline (data, prompts, rollouts, checkpoints, export) with a reward the random
  checkpoint does not score 0 on everywhere: with GSM8K's exact-answer reward every sample earns
  0, every advantage is 0 and the update is driven by float noise alone. The exact-answer reward
  itself is checked inside jit by `test_text_reward_scores_decoded_answers_of_each_prompt`."""
  monkeypatch.setitem(real_run.REWARD_FNS, "digit_share", _digit_share)
  config = _tiny_config("real_grpo_gsm8k", assets, tmp_path)
  config.grpo.reward = "digit_share"
  summary = real_run.run(config)
  train, evals = _records(summary["run_dir"], "grpo")
  assert [r["step"] for r in train] == [1, 2, 3]
  assert any(0.0 < r["reward"] < 1.0 for r in train)
  for r in train:
    assert 0.0 <= r["reward"] <= 1.0 and math.isfinite(r["loss"])
    assert 1 <= r["response_len"] <= 8
  # The first rollout's policy is the reference: the sampled KL is 0 up to float error.
  assert abs(train[0]["kl"]) < 1e-4
  assert 0.0 <= evals[-1]["accuracy"] <= 1.0
  stats = summary["data"]["train/prompt"]
  assert (stats["source_examples"], stats["kept"], stats["overlong"]) == (2, 1, 1)
  assert os.listdir(os.path.join(summary["run_dir"], "grpo", "checkpoints")) == ["3"]
  _check_export(summary, assets[0], "grpo")


# -- pieces ----------------------------------------------------------------------------------------


def test_text_reward_scores_decoded_answers_of_each_prompt(assets):
  """Inside jit on the 8-device mesh, the reward equals the checker on the decoded text."""
  checkpoint, _ = assets
  tokenizer = data_lib.load_tokenizer(checkpoint)
  questions = [{"question": "How many clips?", "answer": "72"},
               {"question": "How much is 1000 + 234?", "answer": "1,234"}]
  examples = [real_run.encode_example(tokenizer, q, "prompt") for q in questions]
  eot = data_lib.end_of_turn_id(tokenizer)
  # (prompt, response, gsm8k_reward by its rules: "####", else \\boxed{}, else the last number).
  cases = [(0, "#### 72", 1), (1, "#### 1,235", 0), (0, "so \\boxed{72}", 1), (1, "no idea", 0),
           (0, "#### 73", 0), (1, "so \\boxed{1234}", 1), (0, "7 and 72", 1),
           (1, "It is 1,234.", 1)]
  rows = [examples[p]["prompt"] for p, _, _ in cases]
  responses = [tokenizer.encode(t) + [eot] for _, t, _ in cases]
  batch = data_lib.prompt_batch([{"prompt": p} for p in rows], prompt_len=PROMPT_LEN)
  resp, resp_mask = data_lib.pad_sequences(responses, RESPONSE_LEN, side="right",
                                           field="response")
  mesh = shd.make_mesh(1, 8, 1)
  reward = real_run.text_reward(tokenizer, "gsm8k", examples, mesh)
  args = shd.shard_batch({"p": batch["prompt_tokens"], "pm": batch["prompt_mask"], "r": resp,
                          "rm": resp_mask}, mesh)
  got = jax.jit(reward)(None, args["p"], args["pm"], args["r"], args["rm"])
  np.testing.assert_array_equal(np.asarray(got), [r for _, _, r in cases])


@pytest.mark.parametrize("overlong, expected", [
    ("skip", None),
    ("truncate", {"prompt": [3, 4, 5], "chosen": [6, 7], "rejected": [8]}),
])
def test_fit_to_slots(overlong, expected):
  example = {"prompt": [1, 2, 3, 4, 5], "chosen": [6, 7, 9], "rejected": [8]}
  fitted, was_overlong = real_run.fit_to_slots(example, prompt_len=3, response_len=2,
                                               overlong=overlong)
  assert was_overlong
  assert fitted == expected if expected is None else {k: list(v) for k, v in fitted.items()} == (
      expected)
  short = {"prompt": [1], "response": [2, 3], "answer": "a long answer is not tokens"}
  assert real_run.fit_to_slots(short, prompt_len=3, response_len=2,
                               overlong=overlong) == (short, False)


@pytest.mark.parametrize("num_examples, wanted, batch_size, expected", [
    (2, 8, 16, [[0, 1, 0, 1, 0, 1, 0, 1]]),            # fewer examples than shards: cyclic fill
    (20, 12, 8, [list(range(8)), [8, 9, 10, 11, 0, 1, 2, 3]]),
    (5, 0, 8, []),
])
def test_eval_chunks(num_examples, wanted, batch_size, expected):
  mesh = shd.make_mesh(1, 8, 1)
  chunks = real_run.eval_chunks(num_examples, wanted, batch_size, mesh)
  assert [list(c) for c in chunks] == expected


@pytest.mark.parametrize("num_examples, wanted, batch_size, expected", [
    (20, 12, 8, [list(range(8))]),                     # 12 rounded down to the 8 shards
    (40, 28, 16, [list(range(16)), list(range(16, 24))]),  # a smaller last chunk, no repeats
    (40, 40, 12, [list(range(8 * i, 8 * i + 8)) for i in range(5)]),  # 12 rounded down to 8
    (2, 8, 16, [[0, 1, 0, 1, 0, 1, 0, 1]]),            # fewer examples than shards: cyclic fill
])
def test_eval_chunks_for_means_count_each_example_once(num_examples, wanted, batch_size,
                                                        expected):
  mesh = shd.make_mesh(1, 8, 1)
  chunks = real_run.eval_chunks(num_examples, wanted, batch_size, mesh, cyclic=False)
  assert [list(c) for c in chunks] == expected


@pytest.mark.parametrize("change, message", [
    (dict(checkpoint=""), "config.checkpoint is empty"),
    (dict(stages=("sft", "rlhf")), "config.stages"),
    (dict(dataset=dict(overlong="crop")), "config.dataset.overlong"),
    (dict(grpo=dict(max_new_tokens=999)), "config.grpo.max_new_tokens"),
    (dict(grpo=dict(loop=dict(batch_size=48))), "config.grpo.loop.batch_size"),
    (dict(grpo=dict(reward="exact")), "config.grpo.reward"),
])
def test_bad_settings_are_value_errors_naming_the_key(assets, tmp_path, change, message):
  config = _tiny_config("real_grpo_gsm8k", assets, tmp_path)
  config.update_from_flattened_dict(_flatten(change))
  with pytest.raises(ValueError, match=message):
    real_run.validate(config)


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
