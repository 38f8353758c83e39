"""Hugging Face checkpoints in and out: safetensors + config.json for Llama 2/3/3.x and Qwen2/2.5.

Import never materialises a checkpoint on one host. Every parameter becomes a global array with
`jax.make_array_from_callback` and its target `NamedSharding`; the callback reads only the rows and
columns of the HF tensor that the requested shard needs, from a memory-mapped
`safetensors.safe_open(..., framework="numpy")` handle. Sharded checkpoints
(`model.safetensors.index.json`) are followed file by file.

Layout mapping (HF `torch.nn.Linear` stores `weight` as [out, in]; the decoder stores kernels
[in, out] with the head axis split out):
  model.embed_tokens.weight                 [V, D]       -> embed_tokens.embedding [V, D]
  model.layers.i.self_attn.{q,k,v}_proj.weight [N Dh, D] -> kernel [D, N, Dh]   (transpose, split)
  model.layers.i.self_attn.{q,k,v}_proj.bias   [N Dh]    -> bias [N, Dh]        (Qwen2)
  model.layers.i.self_attn.o_proj.weight    [D, H Dh]    -> kernel [H, Dh, D]   (transpose, split)
  model.layers.i.mlp.{gate,up}_proj.weight  [F, D]       -> kernel [D, F]
  model.layers.i.mlp.down_proj.weight       [D, F]       -> kernel [F, D]
  model.layers.i.{input,post_attention}_layernorm.weight -> scale [D]
  model.norm.weight                                      -> norm.scale [D]
  lm_head.weight                            [V, D]       -> lm_head.kernel [D, V] (untied only)
Rotary embeddings are in the HF "rotate half" layout already, so q/k need no permutation.

A model with `scan_layers` stacks the per-layer tensors: `layers.<name>` [L, ...] is read from
`model.layers.{0..L-1}.<name>`, each shard reading only its layers' (and rows' and columns')
part of each tensor; export writes one tensor per layer again.

Export writes the same tensors back (bit-identical round trip) with `safetensors.numpy`, so
neither direction needs torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding

from rlhfjax import sharding as shd
from rlhfjax.models.configs import TransformerConfig
from rlhfjax.models.hf_config import config_from_hf, config_to_hf
from rlhfjax.models.transformer import Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# transformers' default `max_shard_size` in 4.x.
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# HF tensors that carry no parameter of the decoder: old checkpoints saved the rotary buffer.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_LM_HEAD, _EMBED = "lm_head.weight", "model.embed_tokens.weight"


@dataclasses.dataclass(frozen=True)
class _TensorMap:
  """How one decoder parameter is stored in the HF checkpoint.

  The parameter's axes are split into consecutive `groups` (lengths of each group); flattening
  every group gives the HF tensor, transposed when `transpose` (2-D only).
  """
  name: str
  groups: tuple[int, ...]
  transpose: bool


def _param_maps(config: TransformerConfig) -> dict[tuple[Any, ...], _TensorMap]:
  """Decoder parameter path (as in the pure params dict) -> its HF tensor."""
  maps = {("embed_tokens", "embedding"): _TensorMap(_EMBED, (1, 1), False),
          ("norm", "scale"): _TensorMap("model.norm.weight", (1,), False)}
  if not config.tie_embeddings:
    maps[("lm_head", "kernel")] = _TensorMap(_LM_HEAD, (1, 1), True)
  for i in range(config.num_layers):
    hf = f"model.layers.{i}"
    for norm in ("input_layernorm", "post_attention_layernorm"):
      maps[("layers", i, norm, "scale")] = _TensorMap(f"{hf}.{norm}.weight", (1,), False)
    for proj in ("q_proj", "k_proj", "v_proj"):
      maps[("layers", i, "self_attn", proj, "kernel")] = _TensorMap(
          f"{hf}.self_attn.{proj}.weight", (1, 2), True)
      if config.attention_bias:
        maps[("layers", i, "self_attn", proj, "bias")] = _TensorMap(
            f"{hf}.self_attn.{proj}.bias", (2,), False)
    maps[("layers", i, "self_attn", "o_proj", "kernel")] = _TensorMap(
        f"{hf}.self_attn.o_proj.weight", (2, 1), True)
    for proj in ("gate_proj", "up_proj", "down_proj"):
      maps[("layers", i, "mlp", proj, "kernel")] = _TensorMap(
          f"{hf}.mlp.{proj}.weight", (1, 1), True)
  return maps


def _group_shape(shape: tuple[int, ...], groups: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
  out, start = [], 0
  for n in groups:
    out.append(tuple(shape[start:start + n]))
    start += n
  return tuple(out)


def _hf_shape(shape: tuple[int, ...], tmap: _TensorMap) -> tuple[int, ...]:
  """The HF tensor shape of a parameter of `shape`."""
  flat = tuple(math.prod(g) for g in _group_shape(shape, tmap.groups))
  return flat[::-1] if tmap.transpose else flat


def _to_hf_tensor(x: np.ndarray, tmap: _TensorMap) -> np.ndarray:
  flat = x.reshape(tuple(math.prod(g) for g in _group_shape(x.shape, tmap.groups)))
  return np.ascontiguousarray(flat.T if tmap.transpose else flat)


def _read_block(handle, tmap: _TensorMap, shape: tuple[int, ...], index: tuple[slice, ...],
                dtype: np.dtype) -> np.ndarray:
  """Reads the block `param[index]` of a parameter of `shape` from its HF tensor.

  Per group, the rows of the group's leading axis selected by `index` are contiguous in the
  flattened HF axis, so only they are read (the inner axes of the group in full, then sliced):
  a tensor-parallel shard over heads reads just its heads.
  """
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  ranges = [s.indices(n)[:2] for s, n in zip(index, shape)]
  flat_slices, inner, start = [], [], 0
  for g in _group_shape(shape, tmap.groups):
    lo, hi = ranges[start]
    inner_size = math.prod(g[1:])
    flat_slices.append(slice(lo * inner_size, hi * inner_size))
    inner.append((hi - lo,) + g[1:])
    start += len(g)
  if tmap.transpose:
    flat_slices = flat_slices[::-1]
  block = handle.get_slice(tmap.name)[tuple(flat_slices)]
  block = block.T if tmap.transpose else block
  block = block.reshape(tuple(d for g in inner for d in g))
  # The leading axis of every group is already cut; cut the inner axes now.
  inner_index, start = [], 0
  for g in _group_shape(shape, tmap.groups):
    lo, hi = ranges[start]
    inner_index.append(slice(None))
    inner_index.extend(slice(*ranges[start + k]) for k in range(1, len(g)))
    start += len(g)
  return np.asarray(block[tuple(inner_index)], dtype=dtype)


def _read_stacked(handles: list, tmaps: list[_TensorMap], shape: tuple[int, ...],
                  index: tuple[slice, ...], dtype: np.dtype) -> np.ndarray:
  """Reads the block `param[index]` of a stacked [L, ...] parameter from its L per-layer tensors.

  Args:
    handles: the open safetensors handle holding each layer's tensor.
    tmaps: each layer's `_TensorMap`.
    shape: the stacked parameter's shape [L, ...].
    index: the block's slices (the first one selects layers).
    dtype: the parameter dtype.
  """
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  layers = range(*index[0].indices(shape[0]))
  return np.stack([_read_block(handles[i], tmaps[i], shape[1:], index[1:], dtype)
                   for i in layers])


def _per_layer_key(key: tuple[Any, ...], layer: int) -> tuple[Any, ...]:
  """The unscanned path of layer `layer` of a stacked parameter path `("layers", ...)`."""
  return ("layers", layer) + key[1:]


def _is_stacked(config: TransformerConfig, key: tuple[Any, ...]) -> bool:
  """Whether `key`, a path of the config's own params layout, is a stacked [L, ...] parameter."""
  return config.scan_layers and key[0] == "layers"


def _stacked_key(config: TransformerConfig, key: tuple[Any, ...]) -> tuple[Any, ...]:
  """The path in the config's own layout holding the unscanned path `key`."""
  return ("layers",) + key[2:] if _is_stacked(config, key) else key


def _weight_files(path: str) -> dict[str, str]:
  """HF tensor name -> the safetensors file holding it (one file or an index)."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    with open(index, encoding="utf-8") as f:
      weight_map = json.load(f)["weight_map"]
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  single = os.path.join(path, WEIGHTS_FILE)
  if not os.path.exists(single):
    raise ValueError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {path!r}")
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(single, framework="numpy") as f:
    return {name: single for name in f.keys()}


def read_hf_config(path: str) -> dict[str, Any]:
  """The parsed config.json of a checkpoint directory."""
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(file):
    raise ValueError(f"no {CONFIG_FILE} in {path!r}")
  with open(file, encoding="utf-8") as f:
    return json.load(f)


def _abstract(config: TransformerConfig):
  """(graphdef, abstract pure params, logical specs) without allocating a parameter.

  The same as `rlhfjax.train.state.abstract_model`, which models may not import (train depends
  on models, not the reverse).
  """
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  return graphdef, state.to_pure_dict(), nnx.get_partition_spec(state).to_pure_dict()


def _path_key(path) -> tuple[Any, ...]:
  return tuple(k.key for k in path)


def _flatten(tree: Any) -> dict[tuple[Any, ...], Any]:
  """{(key, key, ...): leaf} of a nested params dict."""
  return {_path_key(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _untied_copy_problem(lm_head_handle, embed_handle, rows_per_read: int = 8192) -> str | None:
  """None if the checkpoint's `lm_head.weight` is an exact copy of the embedding (what a tied
  checkpoint may carry), else why loading it tied would drop a different output layer. Compared
  `rows_per_read` vocabulary rows at a time, so a large vocabulary is never read twice whole."""
  head, embed = lm_head_handle.get_slice(_LM_HEAD), embed_handle.get_slice(_EMBED)
  head_shape, embed_shape = tuple(head.get_shape()), tuple(embed.get_shape())
  fix = "set tie_word_embeddings to false in config.json to load it as its own output layer"
  if head_shape != embed_shape:
    return (f"config.json ties the output layer to the embedding (tie_word_embeddings), but the "
            f"checkpoint's {_LM_HEAD} has shape {head_shape} and {_EMBED} {embed_shape}; {fix}")
  for start in range(0, head_shape[0], rows_per_read):
    stop = min(start + rows_per_read, head_shape[0])  # safetensors rejects slices past the end
    if not np.array_equal(head[start:stop], embed[start:stop]):
      return (f"config.json ties the output layer to the embedding (tie_word_embeddings), but the "
              f"checkpoint's {_LM_HEAD} differs from {_EMBED} (rows from {start}); {fix}")
  return None


def _check_tensors(maps, abstract_flat, files, handles) -> None:
  """Raises one ValueError listing every missing, unexpected or mis-shaped tensor."""
  problems = []
  expected = {m.name for m in maps.values()}
  missing = sorted(expected - set(files))
  if missing:
    problems.append(f"missing tensors {missing}")
  unexpected = sorted(n for n in set(files) - expected
                      # A tied checkpoint may still carry a copy of the embedding as lm_head.
                      if not n.endswith(_IGNORED_SUFFIXES) and n != _LM_HEAD)
  if unexpected:
    problems.append(f"unexpected tensors {unexpected}")
  if _LM_HEAD in files and _LM_HEAD not in expected and _EMBED in files:
    problem = _untied_copy_problem(handles[files[_LM_HEAD]], handles[files[_EMBED]])
    if problem:
      problems.append(problem)
  for key, tmap in maps.items():
    if tmap.name not in files:
      continue
    want = _hf_shape(abstract_flat[key].shape, tmap)
    got = tuple(handles[files[tmap.name]].get_slice(tmap.name).get_shape())
    if got != want:
      problems.append(f"tensor {tmap.name} has shape {got} in the checkpoint, but the model "
                      f"config needs {want}")
  if problems:
    raise ValueError("checkpoint does not match its config: " + "; ".join(problems))


def load_pretrained(
    path: str,
    *,
    dtype: Any = None,
    param_dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    **runtime: Any,
) -> tuple[nnx.GraphDef, Any]:
  """Loads a HF checkpoint directory as `(graphdef, params)` for the train code.

  Args:
    path: a directory with `config.json` and `model.safetensors` (or an index and its shards).
    dtype: compute dtype; default the checkpoint's dtype.
    param_dtype: parameter dtype; default `dtype`.
    mesh: place each parameter with its `rlhfjax.sharding` NamedSharding on this mesh; None puts
      everything on the first local device.
    **runtime: runtime config fields (`scan_layers`, `remat`, `attention_impl`); with
      `scan_layers=True` the per-layer tensors are read straight into the stacked parameters.

  Returns:
    (graphdef, params): `nnx.merge(graphdef, params)` is the `Transformer`; params is a pure
    dict of global arrays, each with its sharding (`x.sharding`).

  Raises:
    ValueError: for an unsupported architecture, or missing / unexpected / mis-shaped tensors
      (naming each, with both shapes).
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  config = config_from_hf(read_hf_config(path), dtype=dtype, param_dtype=param_dtype, **runtime)
  graphdef, abstract, specs = _abstract(config)
  # Shapes of the per-layer tensors (the unscanned layout) for the checks.
  per_layer_flat = _flatten(_abstract(dataclasses.replace(config, scan_layers=False))[1])
  if mesh is None:
    device = SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  else:
    shardings = shd.tree_shardings(abstract, specs, mesh)
  maps = _param_maps(config)
  files = _weight_files(path)
  abstract_flat, shardings_flat = _flatten(abstract), _flatten(shardings)
  if set(per_layer_flat) != set(maps):
    # A mismatch here is a bug in `_param_maps`, not in the checkpoint.
    raise AssertionError(f"parameter map out of date: {set(per_layer_flat) ^ set(maps)}")
  with contextlib.ExitStack() as stack:
    handles = {f: stack.enter_context(safe_open(f, framework="numpy"))
               for f in sorted(set(files.values()))}
    _check_tensors(maps, per_layer_flat, files, handles)
    loaded = {}
    for key, x in abstract_flat.items():
      if _is_stacked(config, key):
        tmaps = [maps[_per_layer_key(key, i)] for i in range(config.num_layers)]
        hs = [handles[files[t.name]] for t in tmaps]
        read = lambda index, h=hs, t=tmaps, s=x.shape, d=x.dtype: _read_stacked(h, t, s, index, d)
      else:
        tmap = maps[key]
        handle = handles[files[tmap.name]]
        read = lambda index, h=handle, t=tmap, s=x.shape, d=x.dtype: _read_block(h, t, s, index, d)
      loaded[key] = jax.make_array_from_callback(x.shape, shardings_flat[key], read)
  params = jax.tree_util.tree_map_with_path(
      lambda path_, _: loaded[_path_key(path_)], abstract)
  return graphdef, params


def from_pretrained(path: str, *, dtype: Any = None, param_dtype: Any = None,
                    mesh: jax.sharding.Mesh | None = None, **runtime: Any) -> Transformer:
  """Loads a HF Llama / Qwen2 checkpoint as a `Transformer`: `model(tokens_BxT)` -> logits.

  See `load_pretrained` for the arguments; this merges its `(graphdef, params)`.
  """
  graphdef, params = load_pretrained(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                                     **runtime)
  return nnx.merge(graphdef, params)


def _host_array(x: jax.Array) -> np.ndarray:
  """The whole array on this host (all-gathered across processes when needed)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def save_pretrained(
    model: Transformer | tuple[nnx.GraphDef, Any],
    path: str,
    *,
    dtype: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_config: Mapping[str, Any] | None = None,
) -> None:
  """Writes a decoder as a HF checkpoint directory (config.json + safetensors).

  Tensors are written in the parameters' dtype (or `dtype`), so `load_pretrained` of the result
  gives bit-identical parameters. A checkpoint larger than `max_shard_bytes` is split into
  `model-0000k-of-0000n.safetensors` files with a `model.safetensors.index.json`, as transformers
  does. In a multi-process run every process must call this; process 0 writes.

  Args:
    model: a `Transformer`, or its `(graphdef, params)`.
    path: the output directory (created).
    dtype: storage dtype of the tensors; default the parameters' own.
    max_shard_bytes: the largest size of one safetensors file.
    extra_config: keys added to config.json (e.g. `bos_token_id`, `eos_token_id`).

  Raises:
    ValueError: for a model with a score head (not a causal LM checkpoint).
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  if isinstance(model, tuple):
    model = nnx.merge(*model)
  if getattr(model, "has_score_head", False):
    raise ValueError("save_pretrained exports causal LMs; this model has a score head")
  config = model.config
  params = _flatten(nnx.state(model, nnx.Param).to_pure_dict())
  maps = _param_maps(config)
  per_layer_flat = _flatten(_abstract(dataclasses.replace(config, scan_layers=False))[1])

  def param(key) -> jax.Array:
    """The parameter at an unscanned path (one layer of a stacked parameter, sliced on device)."""
    x = params[_stacked_key(config, key)]
    return x[key[1]] if _is_stacked(config, key) else x

  def tensor(key) -> np.ndarray:
    x = _host_array(param(key))
    return _to_hf_tensor(x if dtype is None else x.astype(np.dtype(dtype)), maps[key])

  # Plan the shards from the shapes, then fetch and write one shard at a time.
  shards, sizes = [[]], [0]
  for key in maps:
    x = per_layer_flat[key]
    nbytes = x.size * np.dtype(dtype or params[_stacked_key(config, key)].dtype).itemsize
    if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
      shards.append([])
      sizes.append(0)
    shards[-1].append(key)
    sizes[-1] += nbytes
  hf_config = {**config_to_hf(config), **(extra_config or {})}
  if dtype is not None:
    hf_config["torch_dtype"] = np.dtype(dtype).name
  names = ([WEIGHTS_FILE] if len(shards) == 1 else
           [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
  write = jax.process_index() == 0
  if write:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
      json.dump(hf_config, f, indent=2, sort_keys=True)
  for name, keys in zip(names, shards):
    tensors = {maps[key].name: tensor(key) for key in keys}
    if write:
      # transformers refuses safetensors files without a "format" entry.
      save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
  if write and len(shards) > 1:
    index = {"metadata": {"total_size": sum(sizes)},
             "weight_map": {maps[key].name: name for name, keys in zip(names, shards)
                            for key in keys}}
    with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as f:
      json.dump(index, f, indent=2, sort_keys=True)


def param_map(config: TransformerConfig) -> dict[tuple[Any, ...], str]:
  """Decoder parameter path -> HF tensor name (for inspection and tooling)."""
  return {key: tmap.name for key, tmap in _param_maps(config).items()}

