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
import optax
from flax import nnx
from jax.sharding import Mesh

from rlhfjax import sharding as shd
from rlhfjax import xla_options
from rlhfjax.train.state import TrainState

ModelLoss = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


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
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """Builds `step(state, batch, *frozen) -> (state, metrics)`, jit-compiled with explicit shardings.

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

  Returns:
    The compiled step. Metrics include `loss`, `grad_norm` and `update_norm`.
  """

  def step(state: TrainState, batch, *frozen):
    def compute(params):
      return loss_fn(nnx.merge(graphdef, params), batch, *frozen)

    (loss, metrics), grads = jax.value_and_grad(compute, has_aux=True)(state.params)
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
      compiler_options=None if nestable else xla_options.compiler_options(mesh),
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
      compiler_options=None if nestable else xla_options.compiler_options(mesh),
  )
