"""Train core: sharded init, the generic step on 1 vs 8 devices, recompilation, checkpoints, resume."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.compiles import count_compiles
from rlhfjax import losses
from rlhfjax import sharding as shd
from rlhfjax.losses.sft import cross_entropy
from rlhfjax.train import checkpoint as ckpt_lib
from rlhfjax.train import loop as loop_lib
from rlhfjax.train import metrics as metrics_lib
from rlhfjax.train import optimizers
from rlhfjax.train import state as state_lib
from rlhfjax.train import steps as steps_lib
from tests.train.toy import ToyLM, toy_batch, toy_loss


def _setup(mesh, tx=None, seed=0):
  tx = tx or optimizers.make_optimizer("adamw", 1e-2, clip_norm=1.0)
  graphdef, state, shardings = state_lib.init_train_state(
      lambda: ToyLM(rngs=nnx.Rngs(seed)), tx, mesh)
  step = steps_lib.make_train_step(toy_loss, tx, graphdef, mesh, shardings)
  return graphdef, state, shardings, step


def _run(mesh, num_steps=3):
  _, state, _, step = _setup(mesh)
  losses = []
  for _ in range(num_steps):  # The same batch each step, so the loss must fall.
    state, metrics = step(state, shd.shard_batch(toy_batch(0), mesh))
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params)


def test_params_are_sharded_by_logical_rules():
  mesh = shd.make_mesh(2, 2, 2)
  _, state, shardings, _ = _setup(mesh)
  # ('vocab', 'embed') -> (tensor, fsdp); ('embed', 'mlp') -> (fsdp, tensor); ('mlp',) -> tensor.
  assert state.params["embed"]["embedding"].sharding.spec == jax.P(shd.TENSOR, shd.FSDP)
  assert state.params["up"]["kernel"].sharding.spec == jax.P(shd.FSDP, shd.TENSOR)
  assert state.params["up"]["bias"].sharding.spec == jax.P(shd.TENSOR)
  # Adam's moments shadow the params and take their shardings.
  mu = state.opt_state[1][0].mu
  assert mu["up"]["kernel"].sharding.spec == jax.P(shd.FSDP, shd.TENSOR)
  assert state.step.sharding.spec == jax.P()


def test_logical_rules_skip_axes_that_do_not_divide_or_are_taken():
  mesh = shd.make_mesh(2, 2, 2)
  # 3 is not divisible by tensor=2 -> replicated; second 'vocab' cannot reuse tensor.
  assert shd.logical_to_mesh_spec(("vocab", "embed"), (3, 4), mesh) == jax.P(None, shd.FSDP)
  assert shd.logical_to_mesh_spec(("vocab", "vocab"), (4, 4), mesh) == jax.P(shd.TENSOR, None)
  with pytest.raises(ValueError, match="rank"):
    shd.logical_to_mesh_spec(("vocab",), (4, 4), mesh)


def test_bad_mesh_and_batch_raise():
  with pytest.raises(ValueError, match="must equal the number of devices"):
    shd.make_mesh(3, 1, 1)
  with pytest.raises(ValueError, match="tensor"):
    shd.make_mesh(-1, 1, 3)
  mesh = shd.make_mesh(4, 2, 1)
  with pytest.raises(ValueError, match="tokens.*not divisible"):
    shd.shard_batch({"tokens": np.zeros((6, 3), np.int32)}, mesh)


def test_mesh_axes_and_batch_sharding_use_only_the_data_parallel_axes():
  mesh = shd.make_mesh(4, 2, 1)
  assert dict(mesh.shape) == {shd.DATA: 4, shd.FSDP: 2, shd.TENSOR: 1}
  mesh = shd.make_mesh(2, 2, 2)
  # The batch is split over data x fsdp and replicated over the tensor axis.
  assert shd.num_batch_shards(mesh) == mesh.shape[shd.DATA] * mesh.shape[shd.FSDP] == 4
  assert shd.batch_sharding(mesh, 3).spec == jax.P((shd.DATA, shd.FSDP), None, None)
  placed = shd.shard_batch({"tokens": np.arange(12).reshape(4, 3)}, mesh)["tokens"]
  for shard in placed.addressable_shards:  # 4 rows over 4 shards: one row per device.
    row = shard.index[0].start
    np.testing.assert_array_equal(shard.data, np.arange(12).reshape(4, 3)[row:row + 1])


def test_attention_heads_shard_over_the_tensor_axis():
  from rlhfjax.models import Transformer, get_config
  config = get_config("tiny", num_layers=1)
  abstract, logical = state_lib.abstract_model(lambda: Transformer(config, rngs=nnx.Rngs(0)))[1:]
  mesh = shd.make_mesh(2, 2, 2)
  attn = shd.tree_shardings(abstract, logical, mesh)["layers"][0]["self_attn"]
  assert attn["q_proj"]["kernel"].spec == jax.P(shd.FSDP, shd.TENSOR, None)
  assert attn["k_proj"]["kernel"].spec == jax.P(shd.FSDP, shd.TENSOR, None)
  assert attn["o_proj"]["kernel"].spec == jax.P(shd.TENSOR, None, shd.FSDP)


def test_logical_rules_skip_mesh_axes_of_size_one():
  # A candidate of size 1 would shard nothing and block a later candidate that can.
  rules = (("x", (shd.TENSOR, shd.FSDP)),)
  mesh = shd.make_mesh(4, 2, 1)
  assert shd.logical_to_mesh_spec(("x",), (4,), mesh, rules) == jax.P(shd.FSDP)


def test_one_device_equals_eight_devices():
  one = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  eight = shd.make_mesh(2, 2, 2)
  losses1, params1 = _run(one)
  losses8, params8 = _run(eight)
  np.testing.assert_allclose(losses1, losses8, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               params1, params8)
  assert losses1[-1] < losses1[0]


def test_no_recompilation_on_second_step():
  mesh = shd.make_mesh(2, 2, 2)
  _, state, _, step = _setup(mesh)
  state, _ = step(state, shd.shard_batch(toy_batch(0), mesh))
  with count_compiles() as events:
    state, metrics = step(state, shd.shard_batch(toy_batch(1), mesh))
    jax.block_until_ready(metrics)
  assert events == []


def test_checkpoint_round_trip_and_mismatch(tmp_path):
  mesh = shd.make_mesh(2, 2, 2)
  _, state, shardings, step = _setup(mesh)
  state, _ = step(state, shd.shard_batch(toy_batch(0), mesh))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, state)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)
  restored = ckpt.restore(target)
  assert isinstance(restored, state_lib.TrainState)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(restored))
  assert restored.params["up"]["kernel"].sharding == shardings.params["up"]["kernel"]
  # A checkpoint of another model: the error names the tensor, and the checkpoint survives.
  bigger = state_lib.init_train_state(lambda: ToyLM(hidden=24, rngs=nnx.Rngs(0)),
                                      optimizers.make_optimizer("adamw", 1e-2, clip_norm=1.0),
                                      mesh)[1]
  with pytest.raises(ValueError, match=r"params/up/kernel.*\(8, 16\).*\(8, 24\)"):
    ckpt.restore(bigger)
  assert ckpt.latest_step() == 1
  ckpt.close()


class _Killed(Exception):
  pass


def _loop(run_dir, num_steps, kill_at=None):
  mesh = shd.make_mesh(2, 2, 2)
  tx = optimizers.make_optimizer("adamw", 1e-2, warmup_steps=2, total_steps=12)
  graphdef, state, shardings = state_lib.init_train_state(
      lambda: ToyLM(rngs=nnx.Rngs(0)), tx, mesh)
  step = steps_lib.make_train_step(toy_loss, tx, graphdef, mesh, shardings)

  def get_batch(i):
    if kill_at is not None and i == kill_at:
      raise _Killed()
    return toy_batch(i)

  settings = loop_lib.LoopSettings(num_steps=num_steps, log_every=2, checkpoint_every=4,
                                   progress=False)
  return loop_lib.train(run_dir=run_dir, state=state, state_shardings=shardings, step_fn=step,
                        get_batch=get_batch, mesh=mesh, settings=settings)


def test_kill_and_resume_matches_uninterrupted(tmp_path):
  full, _ = _loop(str(tmp_path / "full"), 12)
  with pytest.raises(_Killed):
    _loop(str(tmp_path / "killed"), 12, kill_at=9)  # Dies after the step-8 checkpoint.
  resumed, records = _loop(str(tmp_path / "killed"), 12)
  assert records[0]["step"] == 10  # Resumed from step 8, first log at step 10.
  assert int(resumed.step) == 12
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(full.params),
               jax.device_get(resumed.params))
  logged = metrics_lib.read_jsonl(os.path.join(tmp_path / "killed", "metrics.jsonl"))
  steps_logged = [r["step"] for r in logged]
  assert steps_logged == sorted(steps_logged) and len(set(steps_logged)) == len(steps_logged)


class _Pending:
  """A metric that logs when the loop waits for it (`jax.block_until_ready` calls the method of
  any leaf that has one)."""

  def __init__(self, step, events):
    self.step, self.events = step, events

  def block_until_ready(self):
    self.events.append(("wait", self.step))
    return self

  def __float__(self):
    return float(self.step)


@pytest.mark.parametrize("max_in_flight", [1, 2, 3])
def test_loop_bounds_the_steps_in_flight(tmp_path, max_in_flight):
  events = []  # ("dispatch", step) and ("wait", step), in order.

  def advance(state, step):
    events.append(("dispatch", step))
    return state + 1, {"pending": _Pending(step, events)}

  # log_every > num_steps: only the last step's metrics are fetched for logging, so every wait
  # before it is the loop's own bound on the queue.
  settings = loop_lib.LoopSettings(num_steps=6, log_every=100, progress=False,
                                   max_steps_in_flight=max_in_flight)
  loop_lib.run_loop(run_dir=str(tmp_path), state=0, settings=settings, advance=advance)
  for step in range(1, 7):
    before = events[:events.index(("dispatch", step)) + 1]
    waited = {s for kind, s in before if kind == "wait"}
    assert step - len(waited) <= max_in_flight, (step, events)
  waited_by_loop = [s for kind, s in events if kind == "wait"]
  assert waited_by_loop == list(range(1, 7 - max_in_flight + 1)), events


def test_rerun_without_checkpoints_logs_each_step_once_and_fewer_steps_raise(tmp_path):
  """A run redone in its directory (killed before a checkpoint, or checkpoint_every = 0) keeps one
  record per step; asking for fewer steps than a checkpoint holds is an error, not a silent
  return of the later state."""
  advance = lambda state, step: (jax.tree.map(lambda v: v + 1, state), {"x": float(step)})
  settings = loop_lib.LoopSettings(num_steps=3, log_every=1, progress=False)
  for _ in range(2):
    loop_lib.run_loop(run_dir=str(tmp_path / "a"), state=jnp.zeros(()), settings=settings,
                      advance=advance)
  steps = [r["step"] for r in metrics_lib.read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))]
  assert steps == [1, 2, 3]
  saved = loop_lib.LoopSettings(num_steps=6, log_every=1, checkpoint_every=3, progress=False)
  loop_lib.run_loop(run_dir=str(tmp_path / "b"), state={"x": jnp.zeros(())}, settings=saved,
                    advance=advance)
  with pytest.raises(ValueError, match="checkpoint at step 6, past num_steps = 3"):
    loop_lib.run_loop(run_dir=str(tmp_path / "b"), state={"x": jnp.zeros(())}, settings=settings,
                      advance=advance)
  assert os.listdir(tmp_path / "b" / "checkpoints")  # Nothing saved was removed.


def test_loop_settings_reject_no_steps_in_flight():
  with pytest.raises(ValueError, match="max_steps_in_flight"):
    loop_lib.LoopSettings(num_steps=1, max_steps_in_flight=0)


def _toy_state(mesh, seed=0):
  _, state, shardings, step = _setup(mesh, seed=seed)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)
  return state, shardings, step, target


def test_checkpoint_restores_the_asked_step_into_the_target_shardings(tmp_path):
  mesh = shd.make_mesh(2, 2, 2)
  state, _, step, _ = _toy_state(mesh)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=5)
  saved = []
  for i in (1, 2):
    state, _ = step(state, shd.shard_batch(toy_batch(i), mesh))
    ckpt.save(i, state)
    saved.append(jax.device_get(state))
  # Restored onto another mesh layout (tensor 8): the target's shardings, not the saved ones.
  other = shd.make_mesh(1, 1, 8)
  _, other_state, other_shardings, _ = _setup(other)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        other_state, other_shardings)
  restored = ckpt.restore(target, 1)
  jax.tree.map(np.testing.assert_array_equal, saved[0], jax.device_get(restored))
  jax.tree.map(lambda x, s: assert_sharding(x, s), restored, other_shardings)
  jax.tree.map(np.testing.assert_array_equal, saved[1], jax.device_get(ckpt.restore(target)))
  # A tree with other parameter names is rejected with the name.
  renamed = state._replace(params={"renamed" if k == "up" else k: v
                                   for k, v in state.params.items()})
  with pytest.raises(ValueError, match=r"missing tensors \['params/renamed/bias'"):
    ckpt.restore(renamed)
  ckpt.close()


def assert_sharding(x, sharding):
  assert x.sharding.is_equivalent_to(sharding, x.ndim), (x.sharding, sharding)


def test_train_feeds_batches_by_step_and_checkpoints_the_last_step(tmp_path):
  """Step s trains on `get_batch(s - 1)`; a run whose length is not a multiple of
  `checkpoint_every` still saves its end, keeping `max_to_keep` checkpoints; rerun on a finished
  directory, it restores the end in the target's shardings and takes no step."""
  mesh = shd.make_mesh(2, 2, 2)
  state, shardings, step, _ = _toy_state(mesh)
  seen = []

  def get_batch(i):
    seen.append(i)
    return toy_batch(i)

  settings = loop_lib.LoopSettings(num_steps=7, log_every=100, checkpoint_every=2, max_to_keep=2,
                                   progress=False)
  run = lambda state: loop_lib.train(run_dir=str(tmp_path), state=state,
                                     state_shardings=shardings, step_fn=step,
                                     get_batch=get_batch, mesh=mesh, settings=settings)
  final, _ = run(jax.tree.map(lambda x: x.copy(), state))
  assert seen == list(range(7))
  expected = state
  for i in range(7):
    expected, _ = step(expected, shd.shard_batch(toy_batch(i), mesh))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(expected), jax.device_get(final))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
  assert ckpt.all_steps() == [6, 7]
  ckpt.close()
  seen.clear()
  again, _ = run(_setup(mesh, seed=1)[1])
  assert seen == []
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(expected), jax.device_get(again))
  jax.tree.map(assert_sharding, again, shardings)
  # Resumed on another mesh layout: restored into that layout's shardings.
  other = shd.make_mesh(1, 1, 8)
  _, other_state, other_shardings, other_step = _setup(other)
  moved, _ = loop_lib.train(run_dir=str(tmp_path), state=other_state,
                            state_shardings=other_shardings, step_fn=other_step,
                            get_batch=get_batch, mesh=other, settings=settings)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(expected), jax.device_get(moved))
  jax.tree.map(assert_sharding, moved, other_shardings)


def test_eval_runs_every_eval_every_steps_and_at_the_end(tmp_path):
  advance = lambda state, step: (state + 1, {"x": float(step)})
  evaluated = []

  def eval_fn(state):
    evaluated.append(int(state))
    return {"value": float(state)}

  settings = loop_lib.LoopSettings(num_steps=7, log_every=3, eval_every=2, progress=False)
  _, records = loop_lib.run_loop(run_dir=str(tmp_path), state=jnp.zeros((), jnp.int32),
                                 settings=settings, advance=advance, eval_fn=eval_fn)
  assert evaluated == [2, 4, 6, 7]
  assert [(r["split"], r["step"]) for r in records] == [
      ("eval", 2), ("train", 3), ("eval", 4), ("train", 6), ("eval", 6), ("train", 7),
      ("eval", 7)]
  assert [r["value"] for r in records if r["split"] == "eval"] == [2.0, 4.0, 6.0, 7.0]
  logged = metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert logged == records


# -- Gradient accumulation inside the step: global counts ----------------------------------------


def _uneven_batch(rows=8, length=6, vocab=16):
  """A batch whose rows hold very different numbers of loss tokens (row 1: none at all)."""
  batch = toy_batch(0, batch_size=rows, length=length, vocab=vocab)
  mask = np.zeros((rows, length), np.int32)
  for r, n in enumerate([5, 0, 1, 3, 5, 2, 4, 1, 5, 3, 2, 1, 4, 5, 1, 2][:rows]):
    mask[r, length - n:] = 1
  return {**batch, "loss_mask": mask}


def _accumulated_step(mesh, loss_fn, batch, k, unit=1):
  """One SGD step (the update is the gradient, unnormalised) with k micro-batches."""
  tx = optax.sgd(0.5)
  graphdef, state, shardings = state_lib.init_train_state(
      lambda: ToyLM(rngs=nnx.Rngs(0)), tx, mesh)
  step = steps_lib.make_train_step(loss_fn, tx, graphdef, mesh, shardings, accumulation_steps=k,
                                   accumulation_unit=unit)
  state, metrics = step(state, shd.shard_batch(batch, mesh))
  return jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                  "sum_over_constant"])
def test_accumulation_equals_one_step_on_the_whole_batch(mode):
  """k micro-batches with unequal token counts (and an empty row) = one step on the whole batch,
  in every aggregation mode: each micro-batch is weighted by its aggregation's denominator."""
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  batch = _uneven_batch()

  def loss_fn(model, b):
    return cross_entropy(model(b["tokens"]), b["tokens"], b["loss_mask"], aggregation=mode)

  whole, whole_metrics = _accumulated_step(mesh, loss_fn, batch, 1)
  for k in (2, 4):
    params, metrics = _accumulated_step(mesh, loss_fn, batch, k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 params, whole)
    np.testing.assert_allclose(metrics["loss"], whole_metrics["loss"], rtol=1e-6)
    if mode == "token_mean":  # A token-mean metric is exact when the weights count tokens.
      np.testing.assert_allclose(metrics["nll"], whole_metrics["nll"], rtol=1e-6)
    assert metrics["num_tokens"] == whole_metrics["num_tokens"]  # counts are summed
    assert "loss_weight" not in metrics and "loss_weight" not in whole_metrics
  if mode == "sum_over_constant":
    return  # Its denominator (rows x max_len) is the same in every micro-batch.
  # The test can fail: the unweighted mean of the micro-batch losses is not the whole batch's.
  with nnx.use_eager_sharding(False):
    model = ToyLM(rngs=nnx.Rngs(0))
  halves = steps_lib.split_micro_batches(batch, 2)
  plain = np.mean([float(loss_fn(model, jax.tree.map(lambda x, i=i: x[i], halves))[0])
                   for i in range(2)])
  assert abs(plain - float(loss_fn(model, batch)[0])) > 1e-3


def test_accumulated_steps_count_optimizer_updates():
  """A step of k micro-batches is one optimizer update: the step counter and the learning-rate
  schedule (warmup) advance once per step, so two accumulated steps equal two whole-batch steps."""
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  batch = shd.shard_batch(_uneven_batch(), mesh)
  tx = optimizers.make_optimizer("adamw", 1e-2, warmup_steps=3, total_steps=6)
  results = []
  for k in (1, 2):
    graphdef, state, shardings = state_lib.init_train_state(
        lambda: ToyLM(rngs=nnx.Rngs(0)), tx, mesh)
    step = steps_lib.make_train_step(toy_loss, tx, graphdef, mesh, shardings,
                                     accumulation_steps=k)
    for _ in range(2):
      state, _ = step(state, batch)
    results.append(jax.device_get(state))
  (whole, accumulated) = results
  assert int(whole.step) == int(accumulated.step) == 2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               accumulated.params, whole.params)


def test_accumulation_on_eight_devices_equals_one_device():
  batch = _uneven_batch(rows=16)
  one = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  whole, _ = _accumulated_step(one, toy_loss, batch, 1)
  params, _ = _accumulated_step(shd.make_mesh(8, 1, 1), toy_loss, batch, 2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), params, whole)


def test_accumulation_keeps_units_whole():
  """A loss over pairs of consecutive rows is unchanged by accumulation with unit 2 (and changed
  with unit 1, which splits the pairs)."""
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  batch = _uneven_batch()

  def pair_loss(model, b):
    logp = losses.token_logprobs(model(b["tokens"]), b["tokens"])
    seq = losses.sequence_logprobs(logp, b["loss_mask"]).reshape(-1, 2)
    return jnp.mean(jnp.square(seq[:, 0] - seq[:, 1])), {}

  whole, _ = _accumulated_step(mesh, pair_loss, batch, 1)
  paired, _ = _accumulated_step(mesh, pair_loss, batch, 2, unit=2)
  split, _ = _accumulated_step(mesh, pair_loss, batch, 2, unit=1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), paired, whole)
  assert not all(jax.tree.leaves(jax.tree.map(np.allclose, split, whole)))


def test_micro_batches_round_trip_and_bad_splits_raise():
  micro = [{"tokens": np.arange(12).reshape(6, 2) + 100 * i} for i in range(3)]
  batch = steps_lib.interleave_micro_batches(micro, unit=2)
  assert batch["tokens"].shape == (18, 2)
  back = steps_lib.split_micro_batches(batch, 3, unit=2)
  for i in range(3):
    np.testing.assert_array_equal(np.asarray(back["tokens"][i]), micro[i]["tokens"])
  with pytest.raises(ValueError, match="multiple of 12"):
    steps_lib.split_micro_batches(batch, 3, unit=2, num_shards=2)
  with pytest.raises(ValueError, match="whole units of 4"):
    steps_lib.interleave_micro_batches(micro, unit=4)
  with pytest.raises(ValueError, match="one structure and shapes"):
    steps_lib.interleave_micro_batches([micro[0], {"tokens": np.zeros((4, 2))}])
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="accumulation_steps"):
    _accumulated_step(mesh, toy_loss, _uneven_batch(), 0)
  with pytest.raises(ValueError, match="cannot be split into 3 micro-batches"):
    _accumulated_step(mesh, toy_loss, _uneven_batch(), 3)
