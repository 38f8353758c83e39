"""Mesh axes, logical-to-mesh rules, and helpers that shard pytrees.

This is the only module that names mesh axes. Models annotate parameters with *logical* axis names
('vocab', 'embed', 'mlp', ...); `LOGICAL_RULES` maps each logical name to an ordered list of mesh
axes to try. A logical axis takes the first candidate whose mesh axes are not already used by another
dimension of the same array and whose size divides the dimension; otherwise it is replicated. That
makes one rule table serve every mesh shape, from one device to a pod, and every model size (a
2-head tiny model on an 8-way tensor axis is replicated rather than rejected).

Meshes use `AxisType.Auto`: train steps are `jax.jit` with explicit `NamedSharding` in- and
out-shardings and XLA propagates the rest. (jax >= 0.7 defaults `make_mesh` to Explicit axes, which
would make every op's sharding part of its type; Auto keeps model code free of sharding calls.)

Multi-host: call `initialize_distributed()` first; each host feeds its host-local slice of the global
batch and `global_batch` assembles the global array.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

# The batch dimension of activations and data is split over every data-parallel axis.
BATCH_AXES = (DATA, FSDP)

# Ordered logical-to-mesh rules: logical name -> candidate mesh axes (a tuple means "all of these").
LOGICAL_RULES: tuple[tuple[str, tuple[str | tuple[str, ...], ...]], ...] = (
    ("vocab", (TENSOR,)),
    ("embed", (FSDP,)),
    ("mlp", (TENSOR,)),
    ("q_heads", (TENSOR,)),
    ("kv_heads", (TENSOR,)),
    ("head_dim", ()),
    ("norm", ()),
    ("layers", ()),
)


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh; `data=-1` takes all devices left over.

  Raises:
    ValueError: if the axis sizes do not multiply to the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  for name, size in (("fsdp", fsdp), ("tensor", tensor)):
    if size < 1:
      raise ValueError(f"mesh.{name} must be >= 1, got {size}")
  if data == -1:
    if n % (fsdp * tensor):
      raise ValueError(
          f"mesh.fsdp * mesh.tensor = {fsdp * tensor} does not divide the {n} devices")
    data = n // (fsdp * tensor)
  if data < 1 or data * fsdp * tensor != n:
    raise ValueError(
        f"mesh data x fsdp x tensor = {data} x {fsdp} x {tensor} = {data * fsdp * tensor} "
        f"must equal the number of devices ({n})")
  return jax.make_mesh(
      (data, fsdp, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _axis_size(mesh: Mesh, axes: str | tuple[str, ...]) -> int:
  names = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in names)


def _axes_of(axes: str | tuple[str, ...]) -> tuple[str, ...]:
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_mesh_spec(
    logical: PartitionSpec | Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, Sequence[Any]]] = LOGICAL_RULES,
) -> PartitionSpec:
  """Maps a logical PartitionSpec to a mesh PartitionSpec for an array of `shape`.

  Each dimension takes the first rule candidate that (a) uses no mesh axis already taken by an
  earlier dimension, (b) has size > 1, and (c) divides the dimension. Unknown logical names and
  `None` are replicated.
  """
  logical = tuple(logical)
  if len(logical) != len(shape):
    raise ValueError(f"logical axes {logical} do not match array rank {len(shape)} (shape {shape})")
  table = {name: cands for name, cands in rules}
  used: set[str] = set()
  out = []
  for name, dim in zip(logical, shape):
    chosen = None
    for cand in table.get(name, ()) if name is not None else ():
      names = _axes_of(cand)
      size = _axis_size(mesh, names)
      if used.intersection(names) or size == 1 or dim % size:
        continue
      chosen = cand
      used.update(names)
      break
    out.append(chosen)
  return PartitionSpec(*out)


def _is_spec(x: Any) -> bool:
  return isinstance(x, PartitionSpec)


def tree_shardings(abstract_tree: Any, logical_specs: Any, mesh: Mesh) -> Any:
  """NamedShardings for a pytree of arrays given a matching pytree of logical PartitionSpecs."""
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, logical_to_mesh_spec(spec, x.shape, mesh)),
      logical_specs, abstract_tree, is_leaf=_is_spec)


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of an array held whole on every device of `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding for data arrays: leading batch dimension over the data-parallel axes."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def num_batch_shards(mesh: Mesh) -> int:
  """How many ways the batch dimension is split: the product of the data-parallel axes."""
  return _axis_size(mesh, BATCH_AXES)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Places a global (single-host) batch dict on the mesh, batch dimension sharded.

  Raises:
    ValueError: if a batch dimension is not divisible by the number of batch shards.
  """
  n = num_batch_shards(mesh)
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.ndim == 0:
      out[key] = jax.device_put(value, replicated(mesh))
      continue
    if value.shape[0] % n:
      raise ValueError(
          f"batch['{key}'] has batch size {value.shape[0]}, not divisible by the {n} "
          f"data-parallel shards of mesh {dict(mesh.shape)}")
    out[key] = jax.device_put(value, batch_sharding(mesh, value.ndim))
  return out


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles host-local batches (one slice per process) into global arrays on the mesh."""
  if jax.process_count() == 1:
    return shard_batch(local_batch, mesh)
  return {
      key: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
      for key, v in local_batch.items()
  }


def initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` when launched as one process of several.

  Detected from the standard environment variables (`JAX_COORDINATOR_ADDRESS` or a cluster
  launcher that JAX recognises); a plain single-process run is left alone.
  """
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") != "1":
    jax.distributed.initialize()
