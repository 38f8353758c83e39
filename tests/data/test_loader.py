"""Tests for rlhfjax.data.loader: epoch permutations, host split, resumable iteration."""

import functools

import numpy as np
import pytest

from rlhfjax import data


def _stream(num_examples, seed, num_epochs):
  """Oracle: the concatenated epoch permutations the loader promises to read in order."""
  return np.concatenate(
      [np.random.default_rng((seed, e)).permutation(num_examples) for e in range(num_epochs)]
  )


@pytest.mark.parametrize("num_examples,batch_size", [(12, 4), (10, 4), (5, 8)])
def test_batches_walk_through_seeded_epoch_permutations(num_examples, batch_size):
  num_steps = 7
  got = np.concatenate([data.batch_indices(num_examples, batch_size=batch_size, seed=3, step=s)
                        for s in range(num_steps)])
  expected = _stream(num_examples, 3, num_epochs=num_steps * batch_size // num_examples + 1)
  np.testing.assert_array_equal(got, expected[: num_steps * batch_size])
  # Every epoch visits every example once.
  first_epoch = got[:num_examples]
  np.testing.assert_array_equal(np.sort(first_epoch), np.arange(num_examples))


def test_batch_is_a_pure_function_of_seed_and_step():
  kwargs = dict(batch_size=4, seed=0)
  late_first = data.batch_indices(20, step=9, **kwargs)
  for s in range(9):
    data.batch_indices(20, step=s, **kwargs)
  np.testing.assert_array_equal(late_first, data.batch_indices(20, step=9, **kwargs))
  assert not np.array_equal(data.batch_indices(20, step=0, **kwargs),
                            data.batch_indices(20, step=0, batch_size=4, seed=1))
  assert not np.array_equal(data.batch_indices(20, step=0, **kwargs),
                            data.batch_indices(20, step=1, **kwargs))


@pytest.mark.parametrize("step", [0, 1, 5])
def test_two_hosts_of_four_equal_one_host_of_eight(step):
  one_host = data.batch_indices(13, batch_size=8, seed=2, step=step)
  hosts = [data.batch_indices(13, batch_size=8, seed=2, step=step, process_index=p, process_count=2)
           for p in range(2)]
  assert all(len(h) == 4 for h in hosts)
  np.testing.assert_array_equal(np.concatenate(hosts), one_host)


def test_host_batch_size():
  assert data.host_batch_size(64, 4) == 16
  with pytest.raises(ValueError, match="not divisible by process_count 3"):
    data.host_batch_size(8, 3)
  with pytest.raises(ValueError, match="not divisible"):
    data.batch_indices(10, batch_size=6, seed=0, step=0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="process_index"):
    data.batch_indices(10, batch_size=8, seed=0, step=0, process_index=2, process_count=2)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"step": -1}, "step"), ({"batch_size": 0}, "global_batch_size"), ({"seed": -2}, "seed")],
)
def test_bad_arguments_raise(kwargs, match):
  args = dict(batch_size=4, seed=0, step=0) | kwargs
  with pytest.raises(ValueError, match=match):
    data.batch_indices(10, **args)
  with pytest.raises(ValueError, match="num_examples"):
    data.batch_indices(0, batch_size=4, seed=0, step=0)


class _CountingSource:
  """A random-access source without __getitems__ (the list path of `gather`)."""

  def __init__(self, n):
    self.examples = [{"prompt": [1, 40, 4 + i % 10, 3], "response": [4 + i % 7, 2]}
                     for i in range(n)]

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    return self.examples[i]


class _BatchedSource(_CountingSource):
  """Same examples, read through __getitems__ (the batched path, as tfds sources offer)."""

  def __init__(self, n):
    super().__init__(n)
    self.batched_reads = 0

  def __getitem__(self, i):
    raise AssertionError("a source with __getitems__ is read in one batched call")

  def __getitems__(self, indices):
    self.batched_reads += 1
    return [self.examples[i] for i in indices]


@pytest.mark.parametrize("source_cls", [_CountingSource, _BatchedSource])
@pytest.mark.parametrize("restart_step", [0, 3, 7])
def test_restarted_iteration_sees_the_same_batches(source_cls, restart_step):
  source = source_cls(11)
  collate = functools.partial(data.sft_batch, prompt_len=4, response_len=2)
  kwargs = dict(batch_size=4, seed=5)
  uninterrupted = list(data.iterate_batches(source, collate, num_steps=10, **kwargs))
  resumed = list(data.iterate_batches(source, collate, start_step=restart_step,
                                      num_steps=10 - restart_step, **kwargs))
  assert [s for s, _ in resumed] == list(range(restart_step, 10))
  for (step_a, batch_a), (step_b, batch_b) in zip(uninterrupted[restart_step:], resumed):
    assert step_a == step_b
    for key in batch_a:
      np.testing.assert_array_equal(batch_a[key], batch_b[key])
  # And the batch holds exactly the examples batch_indices names.
  step, batch = resumed[0]
  expected = collate([source.examples[i] for i in data.batch_indices(11, step=step, **kwargs)])
  np.testing.assert_array_equal(batch["tokens"], expected["tokens"])


def test_batched_source_is_read_once_per_batch():
  source = _BatchedSource(11)
  list(data.iterate_batches(source, list, batch_size=4, seed=0, num_steps=3))
  assert source.batched_reads == 3


def test_cached_epoch_permutation_is_read_only():
  """The permutation is cached and shared: a caller writing into it would reorder later reads."""
  permutation = data.epoch_permutation(6, seed=0, epoch=0)
  with pytest.raises(ValueError, match="read-only"):
    permutation[0] = permutation[1]
