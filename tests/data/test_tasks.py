"""Tests for rlhfjax.data.synthetic: the task generators' statistics, determinism and validation."""

import jax
import numpy as np
import pytest

from rlhfjax import data
from rlhfjax import rewards
from rlhfjax.rewards import vocab

tok = data.SyntheticTokenizer()


def _assert_records_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def _records_differ(a, b):
  return any(not np.array_equal(x["prompt"], y["prompt"]) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------
# Verifiable task.


def _is_correct(record):
  """Independent checker on the readable text: `<bos> op d.. =` against `d.. <eos>`."""
  words = tok.decode(record["prompt"]).split()
  op, digits = words[1], sorted(words[2:-1]) if words[1] == "sort" else words[2:-1][::-1]
  assert words[0] == "<bos>" and words[-1] == "=" and op in ("sort", "rev")
  response = list(record["response"])
  return response[-1] == vocab.EOS_ID and tok.decode(response).split() == digits


@pytest.mark.parametrize("operation", ["sort", "reverse"])
@pytest.mark.parametrize("demo_error_rate", [0.0, 0.3, 1.0])
def test_demo_error_rate_matches_config(operation, demo_error_rate):
  config = data.VerifiableTaskConfig(seed=1, num_train=2000, num_test=8, operation=operation,
                                     demo_error_rate=demo_error_rate)
  records = data.generate_verifiable(config, "train")
  correct = np.array([_is_correct(r) for r in records])
  np.testing.assert_array_equal(correct, [r["is_correct"] for r in records])
  error_rate = 1.0 - correct.mean()
  # 4 binomial standard deviations (p = 0 and p = 1 must be exact).
  tolerance = 4 * np.sqrt(demo_error_rate * (1 - demo_error_rate) / len(records))
  assert abs(error_rate - demo_error_rate) <= tolerance
  for r in records:
    np.testing.assert_array_equal(r["answer"][-1], vocab.EOS_ID)
    assert len(r["prompt"]) <= config.max_prompt_len
    assert len(r["response"]) <= config.max_response_len


def test_test_split_is_correct_and_held_out():
  config = data.VerifiableTaskConfig(seed=2, num_train=3000, num_test=300, min_digits=3,
                                     max_digits=3)
  test, train = data.generate_verifiable(config, "test"), data.generate_verifiable(config, "train")
  assert len(test) == 300 and len(train) == 3000
  assert all(_is_correct(r) and r["is_correct"] == 1 for r in test)
  for r in test:
    np.testing.assert_array_equal(r["response"], r["answer"])
  # With 3 digits there are only 1000 prompts, so a held-out set is not held out by chance.
  test_prompts = {tuple(r["prompt"]) for r in test}
  assert not test_prompts & {tuple(r["prompt"]) for r in train}


def test_verifiable_reward_agrees_with_the_records():
  config = data.VerifiableTaskConfig(seed=3, num_train=256, num_test=4)
  records = data.generate_verifiable(config, "train")
  batch = data.sft_batch(records, prompt_len=config.max_prompt_len,
                         response_len=config.max_response_len)
  Tp = config.max_prompt_len
  reward = rewards.verifiable_reward(batch["tokens"][:, :Tp], batch["attention_mask"][:, :Tp],
                                     batch["tokens"][:, Tp:], batch["attention_mask"][:, Tp:])
  np.testing.assert_array_equal(reward, [r["is_correct"] for r in records])


def test_verifiable_generation_is_deterministic_in_seed():
  config = data.VerifiableTaskConfig(seed=4, num_train=50, num_test=10)
  for split in data.VERIFIABLE_SPLITS:
    records = data.generate_verifiable(config, split)
    _assert_records_equal(records, data.generate_verifiable(config, split))
    other_config = data.VerifiableTaskConfig(seed=5, num_train=50, num_test=10)
    assert _records_differ(records, data.generate_verifiable(other_config, split))


def test_test_prompts_covering_every_prompt_is_an_error():
  config = data.VerifiableTaskConfig(num_train=5, num_test=500, min_digits=1, max_digits=1)
  with pytest.raises(ValueError, match="num_test"):
    data.generate_verifiable(config, "train")


# ---------------------------------------------------------------------------------------------
# Preference task.


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


@pytest.mark.parametrize("temperature,label_noise", [(1.0, 0.0), (0.5, 0.2)])
def test_pair_labels_follow_bradley_terry_with_label_noise(temperature, label_noise):
  config = data.PreferenceTaskConfig(seed=6, num_pairs=6000, temperature=temperature,
                                     label_noise=label_noise)
  records = data.generate_preference(config, "pairs")
  r_chosen = np.array([r["chosen_gold_reward"] for r in records], np.float64)
  r_rejected = np.array([r["rejected_gold_reward"] for r in records], np.float64)
  keep = r_chosen != r_rejected  # ties carry no direction
  # P(chosen is the higher-reward response) = (1 - eps) s + eps (1 - s), s = sigmoid(|dr| / T).
  s = _sigmoid(np.abs(r_chosen - r_rejected)[keep] / temperature)
  q = (1 - label_noise) * s + label_noise * (1 - s)
  hit = (r_chosen > r_rejected)[keep]
  # Overall and per bin of q: observed frequency within 4 binomial standard deviations.
  bins = np.digitize(q, [0.6, 0.7, 0.8, 0.9])
  checked = 0
  for members in [np.ones_like(hit)] + [bins == k for k in range(5)]:
    if members.sum() < 200:
      continue
    sd = np.sqrt(np.sum(q[members] * (1 - q[members]))) / members.sum()
    assert abs(hit[members].mean() - q[members].mean()) <= 4 * sd, members.sum()
    checked += 1
  assert checked >= 3
  flipped = np.array([r["label_flipped"] for r in records])
  flip_sd = np.sqrt(label_noise * (1 - label_noise) / len(records))
  assert abs(flipped.mean() - label_noise) <= 4 * flip_sd
  # A wrong temperature would be visible: the mean gap between T and 2T is far beyond the tolerance.
  s_wrong = _sigmoid(np.abs(r_chosen - r_rejected)[keep] / (2 * temperature))
  q_wrong = (1 - label_noise) * s_wrong + label_noise * (1 - s_wrong)
  assert abs(q.mean() - q_wrong.mean()) > 8 * np.sqrt(np.sum(q * (1 - q))) / len(q)


def test_preference_records_are_consistent_with_the_gold_reward():
  config = data.PreferenceTaskConfig(seed=7, num_test=300, temperature=1.5, repeat_penalty=0.3)
  records = data.generate_preference(config, "test")
  gold = config.gold_reward()
  score = jax.jit(rewards.GoldReward.__call__)
  prompt, prompt_mask = data.pad_sequences([r["prompt"] for r in records], config.max_prompt_len,
                                           side="left", field="prompt")
  for field in ("response", "chosen", "rejected"):
    response, response_mask = data.pad_sequences([r[field] for r in records],
                                                 config.max_response_len, side="right", field=field)
    expected = np.asarray(score(gold, prompt, prompt_mask, response, response_mask))
    stored = np.array([r[f"{field}_gold_reward"] for r in records])
    np.testing.assert_allclose(stored, expected, rtol=1e-6, atol=1e-6)
  for r in records:
    np.testing.assert_allclose(
        r["chosen_prob"],
        _sigmoid((np.float64(r["chosen_gold_reward"]) - r["rejected_gold_reward"]) / 1.5),
        rtol=1e-6)
    assert not np.array_equal(r["chosen"], r["rejected"])
    assert any(np.array_equal(r["response"], r[k]) for k in ("chosen", "rejected"))
    words = tok.decode(r["prompt"]).split()
    assert words[:2] == ["<bos>", "pref"] and words[-1] == "="
    assert set(words[2:-1]) <= set("abcdefgh") and 2 <= len(words) - 3 <= 3
    assert r["response"][-1] == vocab.EOS_ID and len(r["response"]) <= config.max_response_len
    assert set(tok.decode(r["response"]).split()) <= set("abcdefgh")


@pytest.mark.parametrize("copy_prob", [0.0, 1.0])
def test_copy_prob_is_the_probability_of_copying_a_prompt_letter(copy_prob):
  config = data.PreferenceTaskConfig(seed=10, num_sft=200, copy_prob=copy_prob)
  outside = 0  # response letters not in the prompt
  for r in data.generate_preference(config, "sft"):
    prompt_letters = set(tok.decode(r["prompt"]).split()[2:-1])
    outside += sum(w not in prompt_letters for w in tok.decode(r["response"]).split())
  if copy_prob == 1.0:
    assert outside == 0
  else:  # uniform letters: each misses the <= 3 prompt letters of 8 with probability >= 5/8
    assert outside > 0


def test_preference_generation_is_deterministic_and_splits_independent():
  config = data.PreferenceTaskConfig(seed=8, num_sft=40, num_pairs=40, num_test=40)
  splits = {s: data.generate_preference(config, s) for s in data.PREFERENCE_SPLITS}
  for split, records in splits.items():
    assert len(records) == 40
    _assert_records_equal(records, data.generate_preference(config, split))
    other = data.generate_preference(data.PreferenceTaskConfig(seed=9, num_sft=40, num_pairs=40,
                                                                num_test=40), split)
    assert _records_differ(records, other)
  assert _records_differ(splits["sft"], splits["pairs"])
  # A split does not depend on the sizes of the others.
  _assert_records_equal(splits["pairs"], data.generate_preference(
      data.PreferenceTaskConfig(seed=8, num_sft=3, num_pairs=40, num_test=0), "pairs"))


# ---------------------------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize(
    "config_cls,kwargs,key",
    [
        (data.VerifiableTaskConfig, {"num_train": -1}, "num_train"),
        (data.VerifiableTaskConfig, {"num_test": 2.5}, "num_test"),
        (data.VerifiableTaskConfig, {"demo_error_rate": 1.5}, "demo_error_rate"),
        (data.VerifiableTaskConfig, {"demo_error_rate": -0.1}, "demo_error_rate"),
        (data.VerifiableTaskConfig, {"min_digits": 5, "max_digits": 4}, "min_digits"),
        (data.VerifiableTaskConfig, {"operation": "add"}, "operation"),
        (data.VerifiableTaskConfig, {"seed": -1}, "seed"),
        (data.PreferenceTaskConfig, {"num_pairs": -5}, "num_pairs"),
        (data.PreferenceTaskConfig, {"label_noise": 2.0}, "label_noise"),
        (data.PreferenceTaskConfig, {"temperature": 0.0}, "temperature"),
        (data.PreferenceTaskConfig, {"num_letters": 30}, "num_letters"),
        (data.PreferenceTaskConfig, {"copy_prob": -0.5}, "copy_prob"),
        (data.PreferenceTaskConfig, {"min_response_letters": 0}, "min_response_letters"),
        (data.PreferenceTaskConfig, {"repeat_penalty": -1.0}, "repeat_penalty"),
    ],
)
def test_bad_config_raises_naming_the_key(config_cls, kwargs, key):
  with pytest.raises(ValueError, match=key):
    config_cls(**kwargs)


@pytest.mark.parametrize("generate,split", [(data.generate_verifiable, "pairs"),
                                            (data.generate_preference, "train")])
def test_unknown_split_raises(generate, split):
  config = (data.VerifiableTaskConfig if generate is data.generate_verifiable
            else data.PreferenceTaskConfig)()
  with pytest.raises(ValueError, match="split"):
    generate(config, split)
