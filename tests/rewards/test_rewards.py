"""Tests for rlhfjax.rewards: exact match vs a Python checker, gold reward vs a numpy loop."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfjax import rewards
from rlhfjax.rewards import vocab

DIGIT_IDS = range(vocab.FIRST_DIGIT_ID, vocab.FIRST_DIGIT_ID + vocab.NUM_DIGITS)


# ---------------------------------------------------------------------------------------------
# Vocabulary.


def test_vocab_ids_name_their_tokens_and_reject_out_of_range():
  assert [vocab.TOKENS[vocab.digit_id(d)] for d in range(10)] == [str(d) for d in range(10)]
  assert [vocab.TOKENS[vocab.letter_id(i)] for i in range(26)] == list("abcdefghijklmnopqrstuvwxyz")
  for bad in (-1, 10):  # 10 would be the id of 'a'
    with pytest.raises(ValueError, match="digit"):
      vocab.digit_id(bad)
  for bad in (-1, 26):  # 26 would be the id of `sort`
    with pytest.raises(ValueError, match="letter"):
      vocab.letter_id(bad)


# ---------------------------------------------------------------------------------------------
# Verifiable reward.


def _checker(prompt_row, prompt_mask_row, response_row, response_mask_row):
  """Brute-force exact match, written from the task's definition with Python lists."""
  prompt = [t for t, m in zip(prompt_row, prompt_mask_row) if m]
  digits = [t - vocab.FIRST_DIGIT_ID for t in prompt if t in DIGIT_IDS]
  expected = sorted(digits) if vocab.REVERSE_ID not in prompt else digits[::-1]
  answer = []
  for t, m in zip(response_row, response_mask_row):
    if not m:
      break  # right padding: the response is over and never emitted EOS
    if t == vocab.EOS_ID:
      return float(answer == expected)
    if t not in DIGIT_IDS:
      return 0.0
    answer.append(t - vocab.FIRST_DIGIT_ID)
  return 0.0  # no EOS


def _random_verifiable_batch(rng, batch, prompt_len, response_len):
  """Left-padded prompts and right-padded responses of many kinds (right, near-miss, garbage)."""
  prompts = np.zeros((batch, prompt_len), np.int32)
  prompt_mask = np.zeros((batch, prompt_len), np.int32)
  responses = np.zeros((batch, response_len), np.int32)
  response_mask = np.zeros((batch, response_len), np.int32)
  for b in range(batch):
    n = rng.integers(1, prompt_len - 2)
    digits = list(rng.integers(0, 10, size=n))
    op = vocab.REVERSE_ID if rng.random() < 0.5 else vocab.SORT_ID
    prompt = [vocab.BOS_ID, op] + [vocab.digit_id(d) for d in digits] + [vocab.SEP_ID]
    prompts[b, prompt_len - len(prompt):] = prompt
    prompt_mask[b, prompt_len - len(prompt):] = 1
    answer = sorted(digits) if op == vocab.SORT_ID else digits[::-1]
    kind = rng.integers(6)
    if kind == 0:  # correct
      resp = [vocab.digit_id(d) for d in answer] + [vocab.EOS_ID]
    elif kind == 1:  # correct digits, no EOS
      resp = [vocab.digit_id(d) for d in answer]
    elif kind == 2:  # correct, then EOS, then junk after EOS (ignored)
      resp = [vocab.digit_id(d) for d in answer] + [vocab.EOS_ID] + list(rng.integers(0, 64, 3))
    elif kind == 3:  # one digit changed
      wrong = list(answer)
      i = rng.integers(n)
      wrong[i] = (wrong[i] + 1) % 10
      resp = [vocab.digit_id(d) for d in wrong] + [vocab.EOS_ID]
    elif kind == 4:  # the unsorted / unreversed digits
      resp = [vocab.digit_id(d) for d in digits] + [vocab.EOS_ID]
    else:  # random tokens, often EOS-free
      resp = list(rng.integers(0, 16, size=rng.integers(1, response_len + 1)))
    resp = resp[:response_len]
    responses[b, :len(resp)] = resp
    response_mask[b, :len(resp)] = 1
    if kind == 2 and rng.random() < 0.5:
      response_mask[b, n + 1:] = 0  # mask after EOS, as a sampler would
  return prompts, prompt_mask, responses, response_mask


@pytest.mark.parametrize("prompt_len,response_len", [(9, 7), (9, 4), (6, 12)])
def test_verifiable_reward_matches_python_checker(prompt_len, response_len):
  rng = np.random.default_rng(prompt_len * 100 + response_len)
  batch = _random_verifiable_batch(rng, 256, prompt_len, response_len)
  reward = np.asarray(rewards.verifiable_reward(*(jnp.asarray(x) for x in batch)))
  expected = np.array([_checker(*rows) for rows in zip(*batch)])
  np.testing.assert_array_equal(reward, expected)
  # The batch exercises both outcomes (a test where everything scores 0 could not fail).
  assert 0.1 < reward.mean() < 0.9
  # Tokens under the prompt mask's zeros (here random ids: digits, `rev`) are not part of it.
  prompts, prompt_mask = batch[:2]
  junk = np.where(prompt_mask == 1, prompts, rng.integers(0, vocab.VOCAB_SIZE, prompts.shape))
  assert np.any(junk != prompts)
  reward_junk = rewards.verifiable_reward(*(jnp.asarray(x) for x in (junk,) + batch[1:]))
  np.testing.assert_array_equal(reward_junk, expected)


def test_reference_answer_matches_python_and_pads_with_pad():
  rng = np.random.default_rng(11)
  prompts, prompt_mask, _, _ = _random_verifiable_batch(rng, 32, 9, 7)
  answer, num_digits = jax.jit(rewards.reference_answer)(prompts, prompt_mask)
  for b in range(32):
    prompt = [t for t, m in zip(prompts[b], prompt_mask[b]) if m]
    digits = [t for t in prompt if t in DIGIT_IDS]
    expected = sorted(digits) if vocab.REVERSE_ID not in prompt else digits[::-1]
    assert num_digits[b] == len(expected)
    np.testing.assert_array_equal(answer[b], expected + [vocab.PAD_ID] * (9 - len(expected)))


def _row(tokens, length, side):
  pad = [vocab.PAD_ID] * (length - len(tokens))
  if side == "left":
    return pad + tokens, [0] * len(pad) + [1] * len(tokens)
  return tokens + pad, [1] * len(tokens) + [0] * len(pad)


@pytest.mark.parametrize(
    "op,response,expected",
    [
        ("sort", "2 5 9 <eos>", 1.0),
        ("sort", "2 5 9", 0.0),  # no EOS: wrong
        ("sort", "2 5 9 9 <eos>", 0.0),
        ("sort", "2 5 <eos>", 0.0),
        ("sort", "5 2 9 <eos>", 0.0),
        ("rev", "9 2 5 <eos>", 1.0),
        ("rev", "2 5 9 <eos>", 0.0),
    ],
)
def test_verifiable_reward_hand_cases(op, response, expected):
  names = {t: i for i, t in enumerate(vocab.TOKENS)}
  prompt, prompt_mask = _row([names[w] for w in f"<bos> {op} 5 2 9 =".split()], 8, "left")
  resp, resp_mask = _row([names[w] for w in response.split()], 6, "right")
  reward = rewards.verifiable_reward(
      jnp.array([prompt]), jnp.array([prompt_mask]), jnp.array([resp]), jnp.array([resp_mask])
  )
  assert reward.shape == (1,) and float(reward[0]) == expected


# ---------------------------------------------------------------------------------------------
# Gold reward.


def _gold_loop(gold, prompt, prompt_mask, response, response_mask):
  """numpy loop oracle of GoldReward, written from its docstring formula."""
  A = np.asarray(gold.pair_weight_VxV, np.float64)
  b = np.asarray(gold.token_bias_V, np.float64)
  content = np.asarray(gold.prompt_content_V)
  out = []
  for x, xm, y, ym in zip(prompt, prompt_mask, response, response_mask):
    letters = [t for t, m in zip(x, xm) if m and content[t]]
    w = b + (np.mean([A[t] for t in letters], axis=0) if letters else 0.0)
    r, seen, finished = 0.0, set(), False
    for t, m in zip(y, ym):
      if not m:
        continue
      if t == vocab.EOS_ID:
        finished = True
        break
      r += -gold.repeat_penalty if t in seen else w[t]
      seen.add(t)
    out.append(r - (0.0 if finished else gold.missing_eos_penalty))
  return np.array(out)


@pytest.mark.parametrize("seed,num_letters", [(0, 8), (3, 4)])
def test_gold_reward_matches_numpy_loop(seed, num_letters):
  gold = rewards.GoldReward.from_seed(seed, num_letters=num_letters, repeat_penalty=0.7)
  rng = np.random.default_rng(seed)
  B, Tp, Tr = 64, 6, 9
  letters = vocab.FIRST_LETTER_ID + np.arange(num_letters)
  # Prompts: BOS, marker, letters (some slots padded on the left); responses mostly letters with
  # EOS at a random place (or none), a few stray non-letter tokens, random right padding.
  prompt = np.where(rng.random((B, Tp)) < 0.9, rng.choice(letters, (B, Tp)), vocab.PREFERENCE_ID)
  prompt_len = rng.integers(1, Tp + 1, size=B)
  prompt_mask = (np.arange(Tp)[None] >= Tp - prompt_len[:, None]).astype(np.int32)
  response = np.where(rng.random((B, Tr)) < 0.85, rng.choice(letters, (B, Tr)),
                      rng.integers(0, vocab.VOCAB_SIZE, (B, Tr)))
  eos_at = rng.integers(0, Tr + 3, size=B)  # >= Tr: no EOS
  for i in range(B):
    if eos_at[i] < Tr:
      response[i, eos_at[i]] = vocab.EOS_ID
  response_mask = (np.arange(Tr)[None] < rng.integers(1, Tr + 1, size=B)[:, None]).astype(np.int32)
  reward = jax.jit(rewards.GoldReward.__call__)(gold, prompt, prompt_mask, response, response_mask)
  assert reward.shape == (B,) and reward.dtype == jnp.float32
  np.testing.assert_allclose(
      reward, _gold_loop(gold, prompt, prompt_mask, response, response_mask), rtol=1e-5, atol=1e-5
  )


def test_gold_reward_optimum_is_positive_letters_once():
  # Brute force over every response of <= 4 letters from a 4-letter alphabet (then EOS): the best
  # reward is sum_v max(w_x(v), 0), the docstring's claim about the optimum.
  num_letters = 4
  gold = rewards.GoldReward.from_seed(5, num_letters=num_letters)
  letters = [vocab.letter_id(i) for i in range(num_letters)]
  responses = [list(y) + [vocab.EOS_ID] + [vocab.PAD_ID] * (4 - len(y))
               for n in range(num_letters + 1) for y in itertools.product(letters, repeat=n)]
  response = np.array(responses, np.int32)
  response_mask = response != vocab.PAD_ID
  score = jax.jit(rewards.GoldReward.__call__)
  A, b = np.asarray(gold.pair_weight_VxV), np.asarray(gold.token_bias_V)
  for prompt_letters in ([0, 1], [2, 3, 3], [1]):
    prompt_row, prompt_mask_row = _row(
        [vocab.BOS_ID, vocab.PREFERENCE_ID] + [letters[i] for i in prompt_letters] + [vocab.SEP_ID],
        6, "left",
    )
    prompt = np.array([prompt_row] * len(responses), np.int32)
    prompt_mask = np.array([prompt_mask_row] * len(responses), np.int32)
    reward = score(gold, prompt, prompt_mask, response, response_mask)
    w = b[letters] + np.mean([A[letters[i], letters] for i in prompt_letters], axis=0)
    np.testing.assert_allclose(float(jnp.max(reward)), np.maximum(w, 0).sum(), rtol=1e-5, atol=1e-5)


def test_gold_reward_is_a_pytree_and_deterministic_in_seed():
  a, b, c = (rewards.GoldReward.from_seed(s) for s in (7, 7, 8))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.pair_weight_VxV, c.pair_weight_VxV)
  doubled = jax.tree.map(lambda x: x * 2 if x.dtype == jnp.float32 else x, a)
  assert isinstance(doubled, rewards.GoldReward) and doubled.repeat_penalty == a.repeat_penalty


@pytest.mark.parametrize(
    "kwargs,key",
    [({"num_letters": 0}, "num_letters"), ({"num_letters": 27}, "num_letters"),
     ({"repeat_penalty": -1.0}, "repeat_penalty"),
     ({"missing_eos_penalty": np.inf}, "missing_eos_penalty")],
)
def test_gold_reward_rejects_bad_settings(kwargs, key):
  with pytest.raises(ValueError, match=key):
    rewards.GoldReward.from_seed(0, **kwargs)
