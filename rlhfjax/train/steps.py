"""Compose a loss and an optimizer into one jit-compiled, sharded train step.

A train step never hard-codes an algorithm: it takes a *model loss* `loss_fn(model, batch, *frozen)
-> (loss, metrics)`, where `model` is the live NNX module rebuilt from the differentiated params
and `frozen` are extra pytrees that are not differentiated (a reference model's params, a reward
model's params). Every algorithm in the library is such a function plus this step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from rlhfjax import sharding as shd
from rlhfjax import xla_options
from rlhfjax.losses.tokens import LOSS_WEIGHT
from rlhfjax.train.state import TrainState

ModelLoss = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def split_micro_batches(batch: Any, accumulation_steps: int, unit: int = 1,
                        num_shards: int = 1) -> Any:
  """[B, ...] batch leaves -> [k, B / k, ...]: micro-batch i holds the units (runs of `unit`
  consecutive rows, e.g. an online prompt's group) j k + i, j = 0 .. B / (k unit) - 1.

  Interleaving rather than cutting the batch into k blocks keeps every micro-batch spread over the
  data-parallel devices as the batch was (each device's rows split into its share of every
  micro-batch), so no rows move between devices. `interleave_micro_batches` is the inverse.

  Raises:
    ValueError: unless B is a multiple of k x unit x num_shards (the data-parallel devices).
  """
  def split(x):
    rows = x.shape[0]
    if rows % (accumulation_steps * unit * num_shards):
      raise ValueError(
          f"a batch of {rows} rows cannot be split into {accumulation_steps} micro-batches of "
          f"whole units of {unit} rows spread over {num_shards} data-parallel devices: the rows "
          f"must be a multiple of {accumulation_steps * unit * num_shards}")
    per = x.reshape(rows // (accumulation_steps * unit), accumulation_steps, unit, *x.shape[1:])
    return jnp.moveaxis(per, 1, 0).reshape(accumulation_steps, rows // accumulation_steps,
                                           *x.shape[1:])
  return jax.tree.map(split, batch)


def interleave_micro_batches(micro_batches: Sequence[Any], unit: int = 1) -> Any:
  """k host batches of [b, ...] leaves -> one [k b, ...] batch that `split_micro_batches` splits
  back into them, in order (micro-batch i = `micro_batches[i]`). numpy in, numpy out.

  Raises:
    ValueError: if the batches differ in structure or shapes, or b is not a multiple of `unit`.
  """
  shapes = [jax.tree.map(np.shape, m) for m in micro_batches]
  if any(s != shapes[0] for s in shapes[1:]):
    raise ValueError(f"micro-batches must have one structure and shapes, got {shapes}")

  def interleave(*xs):
    rows = xs[0].shape[0]
    if rows % unit:
      raise ValueError(f"micro-batches of {rows} rows are not whole units of {unit} rows")
    per = np.stack([np.asarray(x).reshape(rows // unit, unit, *x.shape[1:]) for x in xs], axis=1)
    return per.reshape(len(xs) * rows, *xs[0].shape[1:])
  return jax.tree.map(interleave, *micro_batches)


def _accumulated_gradients(compute, params, batch, accumulation_steps: int, unit: int,
                           num_shards: int):
  """`((loss, metrics), grads)` of the whole batch from `accumulation_steps` micro-batches, one
  forward and backward pass at a time (`lax.scan`: activations of one micro-batch live at once).

  Micro-batch i's loss L_i, metrics and gradients are weighted by w_i = its metric `LOSS_WEIGHT`
  (the denominator of its aggregation, `losses.aggregation_weight`; 1 when the loss reports none):
  ``L = sum_i w_i L_i / sum_i w_i``, the loss of the whole batch with global counts, whatever the
  micro-batches' token counts. Metrics are weighted the same way (exact for metrics averaged like
  the loss, e.g. token means under a token-mean loss; a weighted mean of the micro-batches' values
  otherwise), except counts (names starting with `num_`), which are summed.
  """
  def one(acc, micro):
    (loss, metrics), grads = jax.value_and_grad(compute, has_aux=True)(params, micro)
    weight = jnp.asarray(metrics.pop(LOSS_WEIGHT, 1.0), jnp.float32)
    acc = jax.tree.map(lambda a, g: a + weight * g.astype(jnp.float32), acc, grads)
    return acc, (loss, metrics, weight)

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)  # float32 sums
  acc, (losses, metrics, weights) = jax.lax.scan(
      one, zeros, split_micro_batches(batch, accumulation_steps, unit, num_shards))
  total = jnp.sum(weights)
  inverse = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
  mean = lambda x_K: jnp.sum(weights * x_K) * inverse
  metrics = {k: jnp.sum(v) if k.startswith("num_") else mean(v) for k, v in metrics.items()}
  grads = jax.tree.map(lambda a, p: (a * inverse).astype(p.dtype), acc, params)
  return (mean(losses), metrics), grads


def _compiler_options(mesh: Mesh, nestable: bool) -> dict | None:
  """The step's XLA options: none for a step nested in another jit (JAX accepts compiler options
  on top-level jits only), else `xla_options.compiler_options(mesh)`."""
  return None if nestable else xla_options.compiler_options(mesh)


def make_train_step(
    loss_fn: ModelLoss,
    optimizer: optax.GradientTransformation,
    graphdef: nnx.GraphDef,
    mesh: Mesh,
    state_shardings: TrainState,
    frozen_shardings: Sequence[Any] = (),
    *,
    donate: bool = True,
    nestable: bool = False,
    accumulation_steps: int = 1,
    accumulation_unit: int = 1,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """Builds `step(state, batch, *frozen) -> (state, metrics)`, jit-compiled with explicit shardings.

  With `accumulation_steps` k > 1 the step computes the gradient of the whole batch from k
  micro-batches in turn (`split_micro_batches`: only one micro-batch's activations at a time) and
  makes one optimizer update. Each micro-batch is weighted by the denominator of its loss's
  aggregation (the `losses.LOSS_WEIGHT` metric), so a token-mean loss is the mean over all the
  batch's tokens however they fall into micro-batches (ALGORITHMS.md: global counts).

  Args:
    loss_fn: `loss_fn(model, batch, *frozen) -> (scalar loss, dict of scalar metrics)`.
    optimizer: the optax transform that `state.opt_state` belongs to.
    graphdef: the model structure from `init_train_state`.
    mesh: the device mesh; batch arrays are sharded on their leading axis over the data axes.
    state_shardings: NamedShardings of the TrainState (from `init_train_state`).
    frozen_shardings: NamedShardings of each extra frozen argument.
    donate: donate the input state's buffers to the output state.
    nestable: compile with XLA's default options, so that the step can be called inside another
      `jax.jit` (JAX accepts compiler options on top-level jits only). Default: the faster
      `xla_options.compiler_options(mesh)`.
    accumulation_steps: micro-batches per update (1: the whole batch at once). The batch's rows
      must be a multiple of accumulation_steps x accumulation_unit x the data-parallel devices.
    accumulation_unit: rows that stay together in one micro-batch (an online prompt's group of
      samples, which group-relative losses and shared-prompt packing need whole).

  Returns:
    The compiled step. Metrics include `loss`, `grad_norm` and `update_norm`.

  Raises:
    ValueError: for accumulation settings below 1 (and, when the step is traced, for a batch that
      the micro-batches cannot split).
  """
  if accumulation_steps < 1 or accumulation_unit < 1:
    raise ValueError(f"accumulation_steps ({accumulation_steps}) and accumulation_unit "
                     f"({accumulation_unit}) must be >= 1")
  num_shards = shd.num_batch_shards(mesh)

  def step(state: TrainState, batch, *frozen):
    def compute(params, batch):
      return loss_fn(nnx.merge(graphdef, params), batch, *frozen)

    if accumulation_steps == 1:
      (loss, metrics), grads = jax.value_and_grad(compute, has_aux=True)(state.params, batch)
      metrics.pop(LOSS_WEIGHT, None)
    else:
      (loss, metrics), grads = _accumulated_gradients(
          compute, state.params, batch, accumulation_steps, accumulation_unit, num_shards)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads),
               "update_norm": optax.global_norm(updates)}
    return TrainState(state.step + 1, params, opt_state), metrics

  data = shd.batch_sharding(mesh, 1)
  return jax.jit(
      step,
      in_shardings=(state_shardings, data, *frozen_shardings),
      out_shardings=(state_shardings, shd.replicated(mesh)),
      donate_argnums=(0,) if donate else (),
      compiler_options=_compiler_options(mesh, nestable),
  )


def make_eval_step(
    metrics_fn: Callable[..., dict[str, jax.Array]],
    graphdef: nnx.GraphDef,
    mesh: Mesh,
    param_shardings: Any,
    frozen_shardings: Sequence[Any] = (),
    *,
    nestable: bool = False,
) -> Callable[..., dict[str, jax.Array]]:
  """Builds `eval(params, batch, *frozen) -> metrics` from `metrics_fn(model, batch, *frozen)`
  (`nestable` as in `make_train_step`)."""

  def evaluate(params, batch, *frozen):
    return metrics_fn(nnx.merge(graphdef, params), batch, *frozen)

  return jax.jit(
      evaluate,
      in_shardings=(param_shardings, shd.batch_sharding(mesh, 1), *frozen_shardings),
      out_shardings=shd.replicated(mesh),
      compiler_options=_compiler_options(mesh, nestable),
  )
