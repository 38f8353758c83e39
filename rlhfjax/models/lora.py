"""Low-rank adapters (LoRA) as a pure function of the parameter pytree.

A targeted kernel W (any `DenseGeneral` kernel, shape `in_shape + out_shape`) gets an adapter
pair A [in_shape..., r] and B [r, out_shape...], and the adapted kernel is
    W' = W + (alpha / r) A B          (contracting the rank axis),
so a q/k/v kernel [D, H, Dh] factors over D -> (H, Dh) and the output projection [H, Dh, D] over
(H, Dh) -> D. A is drawn from N(0, 1/d_in) (d_in = prod(in_shape)) and B is zero, so a fresh
adapter leaves the model unchanged. Adapters live in float32 whatever the base dtype.

Adapters are a nested dict mirroring the params dict, with `{"lora_a", "lora_b"}` in place of
`kernel`: `adapters["layers"][0]["self_attn"]["q_proj"]["lora_a"]`. With scanned layers
(`scan_layers`, stacked kernels [L, in..., out...] under `params["layers"]`) every layer gets its
own pair, stacked the same way: A [L, in..., r], B [L, r, out...], `adapters["layers"]["self_attn"]
["q_proj"]["lora_a"]`.

Training only the adapters with the generic `make_train_step`: the adapters are the trained
params (`LoRAAdapters` is their NNX module, so `init_train_state` shards them by the base
kernels' logical axes), the base params are a frozen input, and `lora_loss` wraps any model loss
so that it merges `W + (alpha/r) A B` inside the differentiated function:

    cfg = LoRAConfig(rank=8, alpha=16.0, targets=("q_proj", "v_proj"))
    graphdef, base_params = load_pretrained(path, mesh=mesh)          # frozen
    base_shardings = jax.tree.map(lambda x: x.sharding, base_params)
    _, abstract, specs = abstract_model(lambda: Transformer(model_config, rngs=nnx.Rngs(0)))
    adapter_fn = lambda: LoRAAdapters(abstract, cfg, logical_specs=specs, rngs=nnx.Rngs(0))
    lora_graphdef, state, shardings = init_train_state(adapter_fn, optimizer, mesh)
    step = make_train_step(lora_loss(make_sft_loss(), graphdef, cfg), optimizer,
                           lora_graphdef, mesh, shardings, frozen_shardings=(base_shardings,))
    state, metrics = step(state, batch, base_params)

Gradients reach only A and B (the base params are an argument of the step, not of `grad`).
For sampling or export, `lora_merge` the trained adapters into the base params.

References: Hu et al. 2021, LoRA (arXiv 2106.09685), eq. 3 and sec. 4.1 (A Gaussian, B zero,
scaling alpha / r). Departure: A's scale is fixed to 1/sqrt(d_in) (variance preserving); PEFT's
default is a Kaiming-uniform draw of the same order.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

LORA_A = "lora_a"
LORA_B = "lora_b"
# Kernels whose input is more than one axis: the output projection contracts (H, Dh).
_NUM_IN_AXES = {"o_proj": 2}
_METADATA_KEY = "rlhfjax_lora_config"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
  """Adapter hyper-parameters.

  Attributes:
    rank: r, the inner width of A B.
    alpha: the update is scaled by alpha / r.
    targets: names of the projections to adapt (`q_proj`, `k_proj`, `v_proj`, `o_proj`,
      `gate_proj`, `up_proj`, `down_proj`, `lm_head`); every layer's copy is adapted.
  """
  rank: int
  alpha: float
  targets: tuple[str, ...] = ("q_proj", "v_proj")

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"LoRAConfig.rank ({self.rank!r}) must be a positive int")
    if not self.alpha > 0:
      raise ValueError(f"LoRAConfig.alpha ({self.alpha!r}) must be positive")
    if isinstance(self.targets, str) or not self.targets:
      raise ValueError(f"LoRAConfig.targets ({self.targets!r}) must be a non-empty tuple of names")
    object.__setattr__(self, "targets", tuple(self.targets))

  @property
  def scale(self) -> float:
    """alpha / r."""
    return self.alpha / self.rank


def _name(path: tuple) -> str:
  return "/".join(map(str, path))


def _num_in_axes(name: str) -> int:
  return _NUM_IN_AXES.get(name, 1)


def _num_stacked(path: tuple) -> int:
  """1 for a module under stacked (scanned) layers, `("layers", <name>, ...)`, else 0.

  Unscanned layers are keyed by their index (`("layers", 0, ...)`); the stacked layout has the
  module names right under "layers".
  """
  return int(len(path) > 1 and path[0] == "layers" and not isinstance(path[1], int))


def _targets_in(params: Mapping[Any, Any], targets: tuple[str, ...], path=()):
  """Yields (path to the module, kernel) for every `<target>/kernel` in the params dict."""
  for key, value in params.items():
    if not isinstance(value, Mapping):
      continue
    if key in targets and "kernel" in value:
      yield path + (key,), value["kernel"]
    else:
      yield from _targets_in(value, targets, path + (key,))


def _set_in(tree: dict, path: tuple, value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get_in(tree: Mapping, path: tuple) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _adapter_shapes(params, config: LoRAConfig, logical_specs=None):
  """{module path: (A shape, B shape, A axes, B axes)} of every targeted kernel."""
  found = {}
  for path, kernel in _targets_in(params, config.targets):
    lead = _num_stacked(path)
    n_in = lead + _num_in_axes(path[-1])
    shape = tuple(kernel.shape)
    if len(shape) <= n_in:
      raise ValueError(f"kernel {_name(path)} of shape {shape} has no output axes")
    axes = (None,) * len(shape)
    if logical_specs is not None:
      axes = tuple(_get_in(logical_specs, path + ("kernel",)))
      axes = axes + (None,) * (len(shape) - len(axes))
    found[path] = (shape[:n_in] + (config.rank,), shape[:lead] + (config.rank,) + shape[n_in:],
                   axes[:n_in] + (None,), axes[:lead] + (None,) + axes[n_in:])
  missing = sorted(set(config.targets) - {p[-1] for p in found})
  if missing:
    raise ValueError(f"LoRA targets {missing} match no kernel in the params")
  return found


def _nnx_tree(tree: Any) -> Any:
  """Nested dicts of nnx.Params as NNX containers: int-keyed dicts become `nnx.List`."""
  if not isinstance(tree, dict):
    return tree
  if all(isinstance(k, int) for k in tree):
    if sorted(tree) != list(range(len(tree))):
      raise ValueError(f"layer indices {sorted(tree)} are not contiguous from 0")
    return nnx.List([_nnx_tree(tree[i]) for i in range(len(tree))])
  return nnx.Dict({str(k): _nnx_tree(v) for k, v in tree.items()})


class LoRAAdapters(nnx.Module):
  """The adapter pairs of a model as an NNX module (the trained params of a LoRA train step).

  `nnx.state(LoRAAdapters(...)).to_pure_dict()` is the adapters dict described in the module
  docstring. A carries the logical axes of the kernel's input axes, B those of its output axes,
  so `rlhfjax.sharding` shards them like the kernel they adapt.

  Args:
    params: the base params dict (arrays or `jax.ShapeDtypeStruct`; only shapes are read).
    config: the adapter hyper-parameters.
    logical_specs: the base params' logical PartitionSpecs (from `abstract_model`), or None.
    rngs: draws A.
  """

  def __init__(self, params: Mapping[Any, Any], config: LoRAConfig, *,
               logical_specs: Mapping[Any, Any] | None = None, rngs: nnx.Rngs):
    tree = {}
    for path, (a_shape, b_shape, a_axes, b_axes) in _adapter_shapes(
        params, config, logical_specs).items():
      d_in = math.prod(a_shape[_num_stacked(path):-1])
      a_init = nnx.with_partitioning(nnx.initializers.normal(1.0 / math.sqrt(d_in)), a_axes)
      b_init = nnx.with_partitioning(nnx.initializers.zeros_init(), b_axes)
      _set_in(tree, path, {
          LORA_A: nnx.Param(a_init(rngs.params(), a_shape, jnp.float32)),
          LORA_B: nnx.Param(b_init(rngs.params(), b_shape, jnp.float32)),
      })
    self.adapters = _nnx_tree(tree)

  def pure(self) -> dict:
    """The adapters dict (arrays), as `lora_merge` takes it."""
    return nnx.state(self, nnx.Param).to_pure_dict()["adapters"]


def lora_init(params: Mapping[Any, Any], config: LoRAConfig, rng: jax.Array) -> dict:
  """Fresh adapters for the targeted kernels of `params`: A ~ N(0, 1/d_in), B = 0.

  Args:
    params: the base params dict.
    config: rank, alpha, targets.
    rng: PRNG key.

  Returns:
    The adapters dict (see the module docstring), float32.

  Raises:
    ValueError: if a target matches no kernel.
  """
  with nnx.use_eager_sharding(False):
    return LoRAAdapters(params, config, rngs=nnx.Rngs(params=rng)).pure()


def lora_delta(a: jax.Array, b: jax.Array, scale: float, *, num_stacked: int = 0) -> jax.Array:
  """`scale * A B`, contracting A's last axis with B's first: the kernel update [in..., out...].

  Args:
    a: A [stacked..., in..., r].
    b: B [stacked..., r, out...].
    scale: alpha / r (times the sign).
    num_stacked: leading axes of A and B that index separate adapters (stacked layers).
  """
  def delta(a, b):
    return scale * jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)

  for _ in range(num_stacked):
    delta = jax.vmap(delta)
  return delta(a, b)


def _apply(params: Mapping[Any, Any], adapters: Mapping[Any, Any], config: LoRAConfig,
           sign: float) -> dict:
  """params with `sign * scale * A B` added to every adapted kernel (others untouched)."""

  def walk(p, a, path):
    if not isinstance(a, Mapping):
      raise ValueError(f"adapter entry {_name(path)} is not a dict")
    if LORA_A in a:
      if not isinstance(p, Mapping) or "kernel" not in p:
        raise ValueError(f"adapter {_name(path)} has no kernel in the params")
      w = p["kernel"]
      delta = lora_delta(a[LORA_A], a[LORA_B], sign * config.scale,
                         num_stacked=_num_stacked(path))
      if delta.shape != w.shape:
        raise ValueError(f"adapter {_name(path)} makes an update of shape "
                         f"{delta.shape} for a kernel of shape {w.shape}")
      return {**p, "kernel": (w.astype(jnp.float32) + delta).astype(w.dtype)}
    unknown = sorted(set(a) - set(p), key=str)
    if unknown:
      raise ValueError(f"adapters {[_name(path + (k,)) for k in unknown]} are not in the params")
    return {k: walk(v, a[k], path + (k,)) if k in a else v for k, v in p.items()}

  return walk(params, adapters, ())


def lora_merge(params: Mapping[Any, Any], adapters: Mapping[Any, Any],
               config: LoRAConfig) -> dict:
  """The base params with every adapted kernel replaced by `W + (alpha/r) A B` (in W's dtype).

  Args:
    params: the base params dict.
    adapters: from `lora_init` / training.
    config: gives the scale alpha / r.

  Returns:
    A params dict of the same structure, shapes and dtypes; untargeted leaves are the same arrays.

  Raises:
    ValueError: if an adapter has no matching kernel or the update's shape differs from it.
  """
  return _apply(params, adapters, config, 1.0)


def lora_unmerge(params: Mapping[Any, Any], adapters: Mapping[Any, Any],
                 config: LoRAConfig) -> dict:
  """Inverse of `lora_merge`: `W' - (alpha/r) A B`, exact up to float rounding of W'."""
  return _apply(params, adapters, config, -1.0)


def lora_loss(loss_fn: Callable[..., Any], graphdef: nnx.GraphDef,
              config: LoRAConfig) -> Callable[..., Any]:
  """Turns a model loss into a loss of the adapters, for `make_train_step`.

  Args:
    loss_fn: `loss_fn(model, batch, *frozen) -> (loss, metrics)` of the base model.
    graphdef: the base model's structure.
    config: rank, alpha, targets.

  Returns:
    `loss(adapters_module, batch, base_params, *frozen)`: merges the adapters into the base
    params (`lora_merge`), rebuilds the model and calls `loss_fn`. Passing `base_params` as the
    step's first frozen argument keeps them out of the gradient.
  """

  def loss(adapters_module, batch, base_params, *frozen):
    adapters = (adapters_module.pure() if isinstance(adapters_module, LoRAAdapters)
                else adapters_module)
    model = nnx.merge(graphdef, lora_merge(base_params, adapters, config))
    return loss_fn(model, batch, *frozen)

  return loss


def _flat_names(adapters: Mapping[Any, Any]) -> dict[str, Any]:
  return {".".join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]}


def save_adapters(adapters: Mapping[Any, Any], config: LoRAConfig, path: str) -> None:
  """Writes the adapters alone to one safetensors file, the config in its metadata.

  Tensor names join the path with dots (`layers.0.self_attn.q_proj.lora_a`). Needs the
  `safetensors` package.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  tensors = {name: np.asarray(jax.device_get(x)) for name, x in _flat_names(adapters).items()}
  meta = {_METADATA_KEY: json.dumps(dataclasses.asdict(config))}
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata=meta)


def load_adapters(path: str) -> tuple[dict, LoRAConfig]:
  """Reads `save_adapters`' file: (adapters dict of numpy arrays, config)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  adapters = {}
  with safe_open(path, framework="numpy") as f:
    meta = f.metadata() or {}
    if _METADATA_KEY not in meta:
      raise ValueError(f"{path!r} is not an rlhfjax adapter file (no {_METADATA_KEY} metadata)")
    config = LoRAConfig(**json.loads(meta[_METADATA_KEY]))
    for name in f.keys():
      path_ = tuple(int(k) if k.isdigit() else k for k in name.split("."))
      _set_in(adapters, path_, f.get_tensor(name))
  return adapters, config
