"""Optimizer construction and stage states against hand-built oracles: the schedule (Python
formula), make_optimizer (optax / adam_mini chains), state_from_params and frozen_params."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhfjax import sharding as shd
from rlhfjax.optim import BlockPartition, adam_mini
from rlhfjax.train import optimizers
from rlhfjax.train import state as state_lib
from tests.train.toy import ToyLM


def _expected_lr(step, lr, warmup, total):
  if warmup and step < warmup:
    return lr * step / warmup
  if total == 0:
    return lr
  t = min(step, total) - warmup
  return 0.1 * lr + 0.9 * lr * 0.5 * (1 + math.cos(math.pi * t / (total - warmup)))


@pytest.mark.parametrize("warmup,total", [(0, 0), (3, 0), (0, 6), (2, 7)])
def test_schedule_warms_up_linearly_then_decays_by_cosine_to_a_tenth(warmup, total):
  schedule = optimizers.learning_rate_schedule(0.5, warmup_steps=warmup, total_steps=total)
  for step in range(12):
    np.testing.assert_allclose(float(schedule(step)), _expected_lr(step, 0.5, warmup, total),
                               rtol=1e-6, atol=1e-7)


def test_bad_schedule_and_clip_settings_raise():
  for kwargs in [dict(warmup_steps=4, total_steps=4), dict(warmup_steps=-1),
                 dict(total_steps=-1)]:
    with pytest.raises(ValueError, match="warmup_steps"):
      optimizers.learning_rate_schedule(1e-3, **kwargs)
  with pytest.raises(ValueError, match="learning_rate"):
    optimizers.learning_rate_schedule(0.0)
  for clip in (0.0, -1.0):
    with pytest.raises(ValueError, match="clip_norm"):
      optimizers.make_optimizer("adamw", 1e-3, clip_norm=clip)


def _params(seed=0):
  with nnx.use_eager_sharding(False):
    return nnx.split(ToyLM(rngs=nnx.Rngs(seed)))[1].to_pure_dict()


def _updates(tx, params, num_steps=3):
  """Updates of `num_steps` steps on fixed, large gradients (global norm >> 1)."""
  state = tx.init(params)
  out = []
  for i in range(num_steps):
    grads = jax.tree.map(lambda p: (i + 1.0) * jnp.cos(3.0 * p + i) * 10.0, params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out


def _assert_same_updates(tx, reference, params=None):
  params = _params() if params is None else params
  for got, want in zip(_updates(tx, params), _updates(reference, params)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), got, want)


def test_make_optimizer_is_clip_then_the_optimizer_on_the_schedule():
  lrs = jnp.asarray([_expected_lr(s, 0.1, 1, 4) for s in range(4)])
  kw = dict(b1=0.8, b2=0.95, eps=1e-6)
  _assert_same_updates(
      optimizers.make_optimizer("adamw", 0.1, warmup_steps=1, total_steps=4, weight_decay=0.3,
                                clip_norm=0.5, **kw),
      optax.chain(optax.clip_by_global_norm(0.5),
                  optax.adamw(lambda s: lrs[s], weight_decay=0.3, **kw)))
  _assert_same_updates(
      optimizers.make_optimizer("adamw", 0.1, clip_norm=None, **kw), optax.adam(0.1, **kw))
  _assert_same_updates(
      optimizers.make_optimizer("sgd", 0.1, b1=0.7, clip_norm=2.0),
      optax.chain(optax.clip_by_global_norm(2.0), optax.sgd(0.1, momentum=0.7)))


def test_adam_mini_takes_the_logical_axes_partition():
  """make_optimizer's adam_mini blocks follow the given logical axes: the same updates as
  adam_mini with that partition, other updates than with the path rules alone (which make the
  unknown leaf `w` one block)."""
  params = {"w": jnp.linspace(-1.0, 1.0, 24).reshape(4, 6), "up": _params()["up"]}
  logical = {"w": jax.sharding.PartitionSpec("embed", "mlp"),
             "up": {"kernel": jax.sharding.PartitionSpec("embed", "mlp"),
                    "bias": jax.sharding.PartitionSpec("mlp")}}
  kw = dict(b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1)
  tx = optimizers.make_optimizer("adam_mini", 0.05, clip_norm=1.0, logical_axes=logical, **kw)
  _assert_same_updates(tx, optax.chain(optax.clip_by_global_norm(1.0), adam_mini(
      0.05, partition=BlockPartition(logical_axes=logical), **kw)), params)
  by_path = optimizers.make_optimizer("adam_mini", 0.05, clip_norm=1.0, **kw)
  assert not np.allclose(_updates(tx, params)[1]["w"], _updates(by_path, params)[1]["w"],
                         rtol=1e-4)


def test_state_from_params_copies_the_given_params_and_initialises_the_rest():
  """The state holds copies of the given params (its buffers are donated by train steps), the
  model's seeded initialisation for parameters it has beyond them, step 0 and a fresh optimizer
  state, all with the model's shardings."""
  mesh = shd.make_mesh(2, 2, 2)
  tx = optimizers.make_optimizer("adamw", 1e-2, clip_norm=1.0)
  build = lambda: ToyLM(rngs=nnx.Rngs(5))
  full = _params()
  given = {k: v for k, v in full.items() if k != "out"}
  _, state, shardings = state_lib.state_from_params(given, tx, mesh, build)
  init = _params(seed=5)
  expected = dict(given, out=init["out"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), expected)
  assert int(state.step) == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state),
               jax.device_get(tx.init(expected)))
  jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(s)),
               state, shardings)
  # The state's buffers are its own: deleting them (as a donating step does) keeps the given ones.
  placed = jax.device_put(full, shardings.params)
  _, state, _ = state_lib.state_from_params(placed, tx, mesh, build)
  for leaf in jax.tree.leaves(state.params):
    leaf.delete()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(placed), full)


def test_frozen_params_places_given_params_with_the_models_shardings():
  mesh = shd.make_mesh(2, 2, 2)
  build = lambda: ToyLM(rngs=nnx.Rngs(0))
  _, params, shardings = state_lib.frozen_params(build, mesh, params=_params())
  _, init, init_shardings = state_lib.frozen_params(build, mesh)
  assert shardings == init_shardings
  assert params["up"]["kernel"].sharding == shardings["up"]["kernel"]
  assert params["up"]["kernel"].sharding.spec != jax.sharding.PartitionSpec()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(init))


def test_opt_state_shardings_shadow_the_params_and_replicate_reduced_dims():
  """Adam's moments take their parameter's sharding; Adam-mini's reduced second moment (1, 16)
  of up/kernel (8, 16) keeps the sharding of the kept axis only, so the state initialises on a
  mesh that splits the reduced axis."""
  mesh = shd.make_mesh(2, 2, 2)
  build = lambda: ToyLM(dim=4, rngs=nnx.Rngs(0))
  _, abstract, logical = state_lib.abstract_model(build)
  p_sh = state_lib.param_shardings(abstract, logical, mesh)
  spec = tuple(p_sh["up"]["kernel"].spec)
  assert spec[0] is not None  # The reduced axis is sharded: the case under test.
  tx = optimizers.make_optimizer("adam_mini", 1e-2, logical_axes=logical)
  _, state, shardings = state_lib.init_train_state(build, tx, mesh)
  seen = set()
  for (path, leaf), s in zip(jax.tree_util.tree_flatten_with_path(state.opt_state)[0],
                             jax.tree.leaves(shardings.opt_state)):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if names[-2:] == ["up", "kernel"]:
      want = spec if leaf.shape == (4, 16) else (None, spec[1])
      assert tuple(s.spec) + (None,) * (2 - len(s.spec)) == want, (names, leaf.shape, s)
      assert leaf.sharding == s
      seen.add(leaf.shape)
  assert seen == {(4, 16), (1, 16)}
