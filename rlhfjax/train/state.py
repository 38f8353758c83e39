"""Train state and sharded initialisation.

The train state is a plain pytree: a step counter, the model parameters as a pure nested dict
(`nnx.State.to_pure_dict()`), and the optax state. The model's structure (its `nnx.GraphDef`) is
kept beside it, static, and `nnx.merge(graphdef, params)` rebuilds a callable model inside the
loss, so jit, grad and sharding see only arrays.

Sharded initialisation follows DESIGN.md: trace the model with `nnx.eval_shape`, map each
parameter's logical axes to the mesh (`rlhfjax.sharding`), then run the real initialiser under
`jax.jit(out_shardings=...)`, so no parameter is ever materialised whole on one device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhfjax import sharding as shd


class TrainState(NamedTuple):
  """Everything a train step updates.

  Attributes:
    step: int32 scalar, the number of optimizer updates applied.
    params: pure nested dict of parameter arrays.
    opt_state: the optax state for `params`.
  """
  step: jax.Array
  params: Any
  opt_state: optax.OptState


def abstract_model(model_fn: Callable[[], nnx.Module]) -> tuple[nnx.GraphDef, Any, Any]:
  """Traces `model_fn` without allocating: returns (graphdef, abstract params, logical specs).

  Abstract params and logical specs are pure dicts with the same structure; the specs are
  PartitionSpecs of logical axis names (empty for unannotated parameters).
  """
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(model_fn)
  graphdef, state = nnx.split(model)
  specs = nnx.get_partition_spec(state).to_pure_dict()
  return graphdef, state.to_pure_dict(), specs


def param_shardings(abstract_params: Any, logical_specs: Any, mesh: Mesh) -> Any:
  """NamedShardings of the parameters on `mesh`, from their logical axis names."""
  return shd.tree_shardings(abstract_params, logical_specs, mesh)


def _path_key(path) -> tuple:
  return tuple(str(k) for k in path)


def opt_state_shardings(abstract_opt_state: Any, abstract_params: Any, p_shardings: Any,
                        mesh: Mesh) -> Any:
  """Shardings for an optax state: a leaf that shadows a parameter takes its sharding.

  A leaf "shadows" a parameter when the parameter's tree path is a suffix of the leaf's path
  (optax nests per-parameter statistics as copies of the params tree). Dimensions where the leaf
  differs from the parameter (e.g. Adam-mini's reduced second moment) are replicated; leaves that
  shadow nothing (counters, scalars) are replicated.
  """
  by_path = {}
  for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                          jax.tree.leaves(p_shardings)):
    by_path[_path_key(path)] = (x.shape, s.spec)

  def one(path, leaf):
    key = _path_key(path)
    for start in range(len(key)):
      hit = by_path.get(key[start:])
      if hit is None:
        continue
      shape, spec = hit
      if len(shape) != leaf.ndim:
        break
      spec = tuple(spec) + (None,) * (leaf.ndim - len(tuple(spec)))
      kept = [axes if d == pd else None for axes, d, pd in zip(spec, leaf.shape, shape)]
      return NamedSharding(mesh, PartitionSpec(*kept))
    return shd.replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def state_shardings(abstract_state: TrainState, logical_specs: Any, mesh: Mesh) -> TrainState:
  """Shardings for a whole TrainState."""
  p_sh = param_shardings(abstract_state.params, logical_specs, mesh)
  return TrainState(
      step=shd.replicated(mesh),
      params=p_sh,
      opt_state=opt_state_shardings(abstract_state.opt_state, abstract_state.params, p_sh, mesh))


def init_train_state(
    model_fn: Callable[[], nnx.Module],
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """Creates a sharded TrainState.

  Args:
    model_fn: builds the model (including its `nnx.Rngs`, so initialisation is seeded).
    optimizer: the optax transform.
    mesh: the device mesh.

  Returns:
    (graphdef, state, shardings): the static model structure, the sharded state, and the
    NamedShardings of every state leaf (reuse them for jit and for checkpoint restore).
  """
  graphdef, _, logical_specs = abstract_model(model_fn)

  def init() -> TrainState:
    with nnx.use_eager_sharding(False):
      params = nnx.split(model_fn())[1].to_pure_dict()
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

  abstract = jax.eval_shape(init)
  shardings = state_shardings(abstract, logical_specs, mesh)
  state = jax.jit(init, out_shardings=shardings)()
  return graphdef, state, shardings


def state_from_params(
    params: Any,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    model_fn: Callable[[], nnx.Module],
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """A sharded TrainState at given parameters with a fresh optimizer state (step 0).

  Starts a stage from a trained policy or a loaded checkpoint. When `params` cover every
  parameter of `model_fn`'s model, the model is only traced (`abstract_model`): its initialiser
  is neither compiled nor run, which at checkpoint scale saves a second copy of the weights.
  Parameters the model has beyond `params` (a new score head) keep `model_fn`'s initialisation;
  only then is the model initialised.

  The parameters are copied into the state: train steps donate their state, and `params` may stay
  in use (e.g. as the frozen reference).

  Args:
    params: pure nested dict of parameters, a subset of the model's (`merge_params`).
    optimizer: the optax transform.
    mesh: the device mesh.
    model_fn: builds the model (its structure, logical axes and, for missing parameters, their
      seeded initialisation).

  Returns:
    (graphdef, state, shardings), as `init_train_state`.

  Raises:
    ValueError: if a given parameter is not the model's or has another shape (names it).
  """
  graphdef, abstract, logical_specs = abstract_model(model_fn)
  merged = merge_params(abstract, params)
  if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(merged)):
    _, initialised, _ = frozen_params(model_fn, mesh)
    merged = merge_params(initialised, params)
  abstract_state = jax.eval_shape(
      lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)), merged)
  shardings = state_shardings(abstract_state, logical_specs, mesh)
  params = jax.tree.map(lambda x: x.copy(), jax.device_put(merged, shardings.params))
  state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params,
                     jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params))
  return graphdef, state, shardings


def frozen_params(
    model_fn: Callable[[], nnx.Module], mesh: Mesh, params: Any | None = None
) -> tuple[nnx.GraphDef, Any, Any]:
  """Sharded parameters of a frozen model (reference policy, reward model): no optimizer state.

  If `params` is given (e.g. copied from a trained policy) it is placed with the model's
  shardings; otherwise the model is initialised from `model_fn`.

  Returns:
    (graphdef, params, shardings).
  """
  graphdef, abstract, logical_specs = abstract_model(model_fn)
  shardings = param_shardings(abstract, logical_specs, mesh)
  if params is None:
    def init():
      with nnx.use_eager_sharding(False):
        return nnx.split(model_fn())[1].to_pure_dict()
    params = jax.jit(init, out_shardings=shardings)()
  else:
    params = jax.device_put(params, shardings)
  return graphdef, params, shardings


def merge_params(base: Any, override: Any, path: str = "") -> Any:
  """`base` with every parameter that `override` also has replaced by override's.

  Used to start a model with an extra head (reward, value) from a policy's parameters.

  Raises:
    ValueError: if a shared parameter's shape differs (names the parameter).
  """
  if not isinstance(base, dict):
    if getattr(base, "shape", None) != getattr(override, "shape", None):
      raise ValueError(f"parameter {path or '/'} has shape {getattr(base, 'shape', None)} in the "
                       f"model but {getattr(override, 'shape', None)} in the given parameters")
    return override
  if not isinstance(override, dict):
    raise ValueError(f"parameter {path or '/'} is a subtree in the model but a leaf in the given "
                     "parameters")
  unknown = sorted(set(override) - set(base), key=str)
  if unknown:
    raise ValueError(f"the given parameters have {[f'{path}/{k}' for k in unknown]}, "
                     "which the model does not")
  return {k: merge_params(v, override[k], f"{path}/{k}") if k in override else v
          for k, v in base.items()}


def num_params(params: Any) -> int:
  """The number of scalars in a pytree of arrays (or `ShapeDtypeStruct`s)."""
  return sum(x.size for x in jax.tree.leaves(params))


def tree_bytes(tree: Any) -> int:
  """The bytes a pytree of arrays (or `ShapeDtypeStruct`s) occupies, summed over its leaves."""
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
