"""Evaluation and metric writers: mean rewards, win rates with ties, JSONL and scalar conversion,
each against a Python loop over the examples."""

import jax
import jax.numpy as jnp
import numpy as np

from rlhfjax.sampling.sampler import SampleOutput
from rlhfjax.train import evaluation
from rlhfjax.train import metrics as metrics_lib

B, TP, TR = 6, 3, 4


def _samples(seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, TR + 1, size=B)
  mask = (np.arange(TR)[None, :] < lengths[:, None]).astype(np.int32)
  tokens = np.where(mask, rng.integers(0, 3, size=(B, TR)), 0).astype(np.int32)
  zeros = np.zeros((B, TR), np.float32)
  return SampleOutput(tokens, mask, zeros, zeros, lengths.astype(np.int32))


def _prompts():
  rng = np.random.default_rng(9)
  return {"prompt_tokens": rng.integers(0, 5, size=(B, TP)).astype(np.int32),
          "prompt_mask": np.ones((B, TP), np.int32)}


def count_ones(prompt_tokens, prompt_mask, response_tokens, response_mask):
  """A reward with many ties: how many response tokens are 1, plus the first prompt token."""
  del prompt_mask
  return jnp.sum((response_tokens == 1) * response_mask, -1) + 0.0 * prompt_tokens[:, 0]


def test_win_rate_counts_ties_as_half():
  prompts, a, b = _prompts(), _samples(0), _samples(1)
  ra, rb = (np.asarray(count_ones(prompts["prompt_tokens"], prompts["prompt_mask"],
                                  s.tokens_BxTr, s.mask_BxTr)) for s in (a, b))
  assert len({np.sign(x - y) for x, y in zip(ra, rb)}) == 3  # Wins, ties and losses.
  expected = np.mean([1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(ra, rb)])
  win = jax.jit(evaluation.win_rate, static_argnums=0)
  np.testing.assert_allclose(win(count_ones, prompts, a, b), expected, rtol=1e-6)
  np.testing.assert_allclose(win(count_ones, prompts, b, a), 1.0 - expected, rtol=1e-6)


def test_evaluate_scores_one_sample_per_prompt():
  prompts, out = _prompts(), _samples(2)
  calls = []

  def sample(params, prompt_tokens, prompt_mask, rng):
    calls.append(params)
    np.testing.assert_array_equal(prompt_tokens, prompts["prompt_tokens"])
    return out

  metrics = evaluation.evaluate(sample, "params", prompts, {"ones": count_ones},
                                jax.random.key(0))
  assert calls == ["params"]
  expected_ones = np.mean([sum(int(t == 1) for t, m in zip(row, mask) if m)
                           for row, mask in zip(out.tokens_BxTr, out.mask_BxTr)])
  assert sorted(metrics) == ["ones", "response_len"]
  assert all(isinstance(v, float) for v in metrics.values())
  np.testing.assert_allclose(metrics["ones"], expected_ones, rtol=1e-6)
  np.testing.assert_allclose(metrics["response_len"], np.mean(out.lengths_B), rtol=1e-6)


def test_metrics_writer_appends_records_and_keeps_only_scalars(tmp_path):
  writer = metrics_lib.MetricsWriter(str(tmp_path))
  first = writer.write(1, {"loss": np.float32(0.5), "vector": np.ones(3), "n": jnp.int32(4)})
  second = writer.write(2, {"accuracy": 0.25}, split="eval")
  writer.close()
  assert first == {"step": 1, "split": "train", "loss": 0.5, "n": 4.0}
  assert second == {"step": 2, "split": "eval", "accuracy": 0.25}
  assert metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl")) == [first, second]
  # Resuming at step 1 drops the later record; the file then reads as one run.
  metrics_lib.MetricsWriter(str(tmp_path), resume_step=1).close()
  assert metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl")) == [first]
