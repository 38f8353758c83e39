"""Tests for rlhfjax.data.batching: layout against hand-built arrays, and clear errors."""

import numpy as np
import pytest

from rlhfjax import data

# Hand-built layout: prompt_len 4 (left-padded), response_len 3 (right-padded).
EXAMPLES = [
    {"prompt": np.array([1, 40, 5], np.int32), "response": np.array([6, 2], np.int32),
     "chosen": [7, 8, 2], "rejected": [9, 2], "answer": [5, 2],
     "chosen_gold_reward": np.float32(1.5), "rejected_gold_reward": -0.25},
    {"prompt": [1, 41, 5, 6], "response": [2], "chosen": [2], "rejected": [10, 11, 2],
     "answer": [6, 5, 2], "chosen_gold_reward": 0.0, "rejected_gold_reward": 2.0},
]
TOKENS = np.array([[0, 1, 40, 5, 6, 2, 0],
                   [1, 41, 5, 6, 2, 0, 0]], np.int32)
ATTENTION = np.array([[0, 1, 1, 1, 1, 1, 0],
                      [1, 1, 1, 1, 1, 0, 0]], np.int32)
LOSS = np.array([[0, 0, 0, 0, 1, 1, 0],
                 [0, 0, 0, 0, 1, 0, 0]], np.int32)


def _assert_equal_int32(actual, expected):
  assert actual.dtype == np.int32
  np.testing.assert_array_equal(actual, expected)


def test_sft_batch_layout():
  batch = data.sft_batch(EXAMPLES, prompt_len=4, response_len=3)
  assert sorted(batch) == ["attention_mask", "loss_mask", "tokens"]
  _assert_equal_int32(batch["tokens"], TOKENS)
  _assert_equal_int32(batch["attention_mask"], ATTENTION)
  _assert_equal_int32(batch["loss_mask"], LOSS)


def test_preference_batch_layout_and_gold_rewards():
  batch = data.preference_batch(EXAMPLES, prompt_len=4, response_len=3)
  _assert_equal_int32(batch["chosen_tokens"], [[0, 1, 40, 5, 7, 8, 2], [1, 41, 5, 6, 2, 0, 0]])
  _assert_equal_int32(batch["chosen_attention_mask"],
                      [[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
  _assert_equal_int32(batch["chosen_loss_mask"], [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 0, 0]])
  _assert_equal_int32(batch["rejected_tokens"], [[0, 1, 40, 5, 9, 2, 0], [1, 41, 5, 6, 10, 11, 2]])
  _assert_equal_int32(batch["rejected_attention_mask"],
                      [[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]])
  _assert_equal_int32(batch["rejected_loss_mask"], [[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1]])
  assert batch["chosen_gold_reward"].dtype == np.float32
  np.testing.assert_array_equal(batch["chosen_gold_reward"], [1.5, 0.0])
  np.testing.assert_array_equal(batch["rejected_gold_reward"], [-0.25, 2.0])


def test_preference_batch_without_gold_rewards():
  examples = [{k: ex[k] for k in ("prompt", "chosen", "rejected")} for ex in EXAMPLES]
  batch = data.preference_batch(examples, prompt_len=4, response_len=3)
  assert "chosen_gold_reward" not in batch and "rejected_gold_reward" not in batch
  mixed = [EXAMPLES[0], examples[1]]
  with pytest.raises(ValueError, match="chosen_gold_reward"):
    data.preference_batch(mixed, prompt_len=4, response_len=3)


@pytest.mark.parametrize("value,message", [(float("nan"), "must be finite"),
                                           (None, "must be a real number"),
                                           ([1.0, 2.0], "must be a real number"),
                                           ("high", "must be a real number")])
def test_bad_gold_rewards_name_the_field_and_example(value, message):
  bad = [EXAMPLES[0], {**EXAMPLES[1], "rejected_gold_reward": value}]
  with pytest.raises(ValueError, match=f"rejected_gold_reward of example 1 {message}"):
    data.preference_batch(bad, prompt_len=4, response_len=3)


@pytest.mark.parametrize("dtype", [np.int64, np.uint32])
def test_token_ids_beyond_int32_raise_instead_of_wrapping(dtype):
  bad = [{**EXAMPLES[0], "response": np.array([6, 2**31], dtype)}]
  with pytest.raises(ValueError, match="response of example 0 holds ids beyond int32"):
    data.sft_batch(bad, prompt_len=4, response_len=3)


def test_prompt_batch_with_and_without_answers():
  batch = data.prompt_batch(EXAMPLES, prompt_len=4)
  assert sorted(batch) == ["prompt_mask", "prompt_tokens"]
  _assert_equal_int32(batch["prompt_tokens"], TOKENS[:, :4])
  _assert_equal_int32(batch["prompt_mask"], ATTENTION[:, :4])
  batch = data.prompt_batch(EXAMPLES, prompt_len=4, response_len=3)
  _assert_equal_int32(batch["answer_tokens"], [[5, 2, 0], [6, 5, 2]])
  _assert_equal_int32(batch["answer_mask"], [[1, 1, 0], [1, 1, 1]])


@pytest.mark.parametrize(
    "make_batch,field,length,limit",
    [
        (lambda ex: data.sft_batch(ex, prompt_len=3, response_len=3), "prompt", 4, 3),
        (lambda ex: data.sft_batch(ex, prompt_len=4, response_len=1), "response", 2, 1),
        (lambda ex: data.preference_batch(ex, prompt_len=4, response_len=2), "chosen", 3, 2),
        (lambda ex: data.preference_batch(ex[1:], prompt_len=4, response_len=2), "rejected", 3, 2),
        (lambda ex: data.prompt_batch(ex, prompt_len=4, response_len=2), "answer", 3, 2),
    ],
)
def test_too_long_sequences_raise_naming_field_length_and_limit(make_batch, field, length, limit):
  message = rf"{field} of example \d has {length} tokens.* limit {limit}"
  with pytest.raises(ValueError, match=message):
    make_batch(EXAMPLES)


@pytest.mark.parametrize(
    "examples,match",
    [
        ([], "non-empty"),
        ({"prompt": [1], "response": [2]}, "sequence of dicts"),
        ([[1, 2]], "dict"),
        ([{"prompt": [1]}], "no field 'response'"),
        ([{"prompt": [[1, 2]], "response": [2]}], "1-D"),
        ([{"prompt": [1.0, 2.0], "response": [2]}], "integer"),
        ([{"prompt": "abc", "response": [2]}], "1-D"),
        ([{"prompt": [1], "response": []}], "empty"),
        ([{"prompt": [1, -3], "response": [2]}], "negative"),
    ],
)
def test_bad_examples_raise(examples, match):
  with pytest.raises(ValueError, match=match):
    data.sft_batch(examples, prompt_len=4, response_len=3)


@pytest.mark.parametrize("kwargs,match", [({"prompt_len": 0, "response_len": 3}, "prompt_len"),
                                          ({"prompt_len": 4, "response_len": 2.0}, "response_len"),
                                          ({"prompt_len": True, "response_len": 3}, "prompt_len")])
def test_bad_slot_lengths_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.sft_batch(EXAMPLES, **kwargs)
