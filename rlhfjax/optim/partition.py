"""Adam-mini parameter blocks: which entries of a parameter share one second-moment value.

Adam-mini keeps one second-moment scalar per *block* of a parameter, the mean of the squared
gradient over the block. A block is described by the axes of the parameter that are averaged over
(`reduce_axes`); every other axis is kept, so the stored second moment has the parameter's shape
with the reduced axes set to 1 (keepdims layout: no broadcast copies, same rank as the parameter).

Block rules (Adam-mini 1.1.1, Zhang et al. arXiv 2406.16793, Sec. 2.3 and the reference package):

  kind        parameter                              blocks                    reduced axes
  embedding   embedding table (V, D)                 one per token (row)       D
  output      untied output head kernel (D, V)       one per token             D
  query_key   q / k kernel (D, H, Dh)                one per head              D, Dh
  value       v kernel (D, K, Dh)                    one per output neuron     D
  attn_out    attention output kernel (H, Dh, D)     one per output neuron     H, Dh
  mlp/dense   any other Dense kernel (..., in, out)  one per output neuron     in
  norm        norm scale (D,)                        one per tensor            D
  bias        any bias                               elementwise (plain Adam)  none
  tensor      anything else                          one per tensor            all
  custom      `axes_fn` returned axes                as returned               as returned

A stacked (scanned) layer axis is never averaged over: every layer is its own set of blocks.

How a parameter is recognised, in order:

1. `axes_fn(path, param)`, if given and it returns a sequence of axes (None falls through).
2. Logical axis names (`logical_axes`, a pytree like the params with `PartitionSpec` leaves, e.g.
   `nnx.get_partition_spec(state).to_pure_dict()` for this library's models). Axes named 'layers'
   are kept. A leaf named `bias` is elementwise; 'vocab' marks the embedding (leaf `embedding` or
   'vocab' first) or the output head (either way reduce all but 'vocab'); 'q_heads' / 'kv_heads'
   before 'embed' is a query/key kernel (reduce all but the heads axis) unless the path has a value
   module name (`v_proj`, `value`, `wv`), then a value kernel (reduce 'embed'); a heads axis after
   'embed' is the attention output (reduce all but 'embed'); 'mlp' is an MLP kernel (reduce all but
   the last axis); 'norm' is a norm scale; another `kernel` (e.g. the score head ('embed', None)) is
   a Dense kernel; anything else is one block per tensor. A parameter whose spec is empty
   (unannotated) falls through to the path rules.
3. Path names, matched exactly against lower-cased path components (so `LayerNorm` inside
   `embeddings` cannot be mistaken for an embedding, a known pitfall of substring matching in the
   reference). These cover Flax layouts (`nnx.Linear`, `nnx.LinearGeneral`, `nnx.Embed`,
   `nnx.MultiHeadAttention`, `nnx.LayerNorm` / `nnx.RMSNorm`, their linen counterparts) and this
   library's naming without logical axes:
   - leaf `bias` -> bias; leaf `scale` -> norm (reduce the last axis; leading axes are stacked
     layers); leaf `embedding` -> embedding (reduce the last axis);
   - leaf `kernel` under a query / key module (`query`, `key`, `q_proj`, `k_proj`, `wq`, `wk`):
     3-D and higher (..., D, heads, head_dim): the head axis is read from the shape, reduce
     (D, head_dim); 2-D (D, heads * head_dim): `num_heads` (query) or `num_kv_heads` (key; defaults
     to `num_heads`) must be given and the kernel is viewed as (D, heads, head_dim);
   - a scan over 2-D projections stacks them as (L, D, heads * head_dim) (and (L, H * Dh, D) for
     the output), the same rank as the per-head (D, H, Dh): when the head count of the kernel's
     kind is given (`num_heads` for query and output, `num_kv_heads` for key and value), a kernel
     whose head axis does not have that size is read as such a stack, its leading axes layers
     (never averaged over); without it, rank 3 is read as per-head;
   - leaf `kernel` under a value module (`value`, `v_proj`, `wv`): reduce the input axis D (the
     third-last of a 3-D kernel, the second-last of a 2-D one);
   - leaf `kernel` under an attention-output module (`out`, `o_proj`, `out_proj`, `wo`): 3-D
     (..., H, Dh, D): reduce (H, Dh); 2-D: reduce the input axis;
   - any other leaf `kernel` of rank >= 2: one block per output neuron, reducing only the
     second-last (input) axis; labelled `output` under `lm_head` / `output` / `unembed`, `mlp` under
     an MLP module name, `dense` otherwise. Leading axes are kept, so a stacked kernel
     (L, in, out) keeps its layer axis; a `LinearGeneral` with several input axes gets finer
     blocks (never coarser ones) - pass `axes_fn` to choose otherwise;
   - anything else (unknown names, 1-D tensors not named bias/scale, scalars) -> one block per
     tensor. A tensor the rules do not know may carry a stacked axis the rules cannot see: use
     `logical_axes` or `axes_fn` for such models.

Weight decay (decoupled) follows the reference's default exemptions: norm scales and biases are not
decayed (`Block.decay`), also when `axes_fn` chose their blocks (a leaf named `bias`; a leaf named
`scale`, or with logical axes a 'norm' axis).

Departures from the reference (deliberate): the reference finds heads by reshaping q/k to rows of
D * D / H entries, which is wrong when head_dim != D / H; here heads come from the kernel shape, so
that case (and GQA) is exact. The reference matches names by substring ("norm", "ln", "embed"...);
here components are matched exactly. Combined QKV kernels (e.g. GPT-2 `c_attn`) get per-neuron
blocks; split them or pass `axes_fn` for per-head blocks.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
from jax.sharding import PartitionSpec

# Module names (exact, lower-cased path components) that identify attention projections etc.
_QUERY_NAMES = frozenset({"query", "q_proj", "wq"})
_KEY_NAMES = frozenset({"key", "k_proj", "wk"})
_VALUE_NAMES = frozenset({"value", "v_proj", "wv"})
_ATTN_OUT_NAMES = frozenset({"out", "o_proj", "out_proj", "wo"})
_OUTPUT_NAMES = frozenset({"lm_head", "output", "unembed"})
_MLP_NAMES = frozenset(
    {"mlp", "gate_proj", "up_proj", "down_proj", "feed_forward", "ffn", "fc1", "fc2"})

# Logical axis names of this library's models (rlhfjax.models); 'layers' marks a stacked axis.
_LAYERS = "layers"
_HEADS = ("q_heads", "kv_heads")


class BlockKind(str, enum.Enum):
  """How a parameter was classified; decides its blocks and whether it is weight-decayed."""
  EMBEDDING = "embedding"
  OUTPUT = "output"
  QUERY_KEY = "query_key"
  VALUE = "value"
  ATTN_OUT = "attn_out"
  MLP = "mlp"
  DENSE = "dense"
  NORM = "norm"
  BIAS = "bias"
  TENSOR = "tensor"
  CUSTOM = "custom"


class Block(NamedTuple):
  """The Adam-mini blocks of one parameter.

  Attributes:
    path: the parameter's path, components joined by '.'.
    shape: the parameter's shape.
    kind: how it was classified.
    view_shape: the shape the blocks are read in; equal to `shape` except for 2-D query/key
      kernels (D, heads * head_dim), viewed as (D, heads, head_dim).
    reduce_axes: axes of `view_shape` averaged over (sorted, non-negative).
    decay: whether decoupled weight decay applies (not to norm scales and biases).
  """
  path: str
  shape: tuple[int, ...]
  kind: BlockKind
  view_shape: tuple[int, ...]
  reduce_axes: tuple[int, ...]
  decay: bool

  @property
  def nu_shape(self) -> tuple[int, ...]:
    """Shape of the stored second moment: `view_shape` with the reduced axes set to 1."""
    return tuple(1 if a in self.reduce_axes else n for a, n in enumerate(self.view_shape))

  @property
  def num_blocks(self) -> int:
    """Number of second-moment values (blocks) of this parameter."""
    return math.prod(self.nu_shape)


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
  """Names of a jax key path's components; drops the trailing `.value` of an `nnx.Variable`."""
  names = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      names.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      names.append(str(key.idx))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      names.append(key.name)
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      names.append(str(key.key))
    else:
      names.append(str(key))
  # `nnx.State` of Variables flattens each Variable to its `.value`; a pure dict has no such key.
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
    names.pop()
  return tuple(names)


def _normalize_axes(axes: Sequence[int], ndim: int, where: str) -> tuple[int, ...]:
  out = set()
  for a in axes:
    if not -ndim <= int(a) < ndim:
      raise ValueError(f"{where}: axis {a} is out of range for a rank-{ndim} parameter")
    out.add(int(a) % ndim)
  return tuple(sorted(out))


@dataclasses.dataclass(frozen=True, eq=False)
class BlockPartition:
  """Options that decide Adam-mini's blocks; see the module docstring for the rules.

  Pass one to `adam_mini(..., partition=...)`. It is neither numeric nor callable, so
  `optax.inject_hyperparams(adam_mini)` leaves it alone.

  Attributes:
    num_heads: query heads H, needed for 2-D query kernels (D, H * Dh) and to recognise stacked
      2-D query / output kernels.
    num_kv_heads: key heads K for 2-D key kernels (D, K * Dh) (defaults to `num_heads`) and to
      recognise stacked 2-D key / value kernels.
    value_per_tensor: treat value kernels as one block per tensor (leading stacked axes kept)
      instead of one block per output neuron.
    axes_fn: optional `(path: str, param) -> axes to average over | None` for custom models; None
      falls through to the built-in rules. `param` may be an array or a `jax.ShapeDtypeStruct`.
    logical_axes: optional pytree like the params with `PartitionSpec` leaves of logical axis names
      (this library's models: `nnx.get_partition_spec(state).to_pure_dict()`). Matched to the
      params by path, so it also works under `optax.masked` and on an `nnx.State`.
  """
  num_heads: int | None = None
  num_kv_heads: int | None = None
  value_per_tensor: bool = False
  axes_fn: Callable[[str, Any], Sequence[int] | None] | None = None
  logical_axes: Any = None

  def __post_init__(self):
    for field in ("num_heads", "num_kv_heads"):
      value = getattr(self, field)
      if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"BlockPartition.{field} ({value!r}) must be None or a positive int")
    if not isinstance(self.value_per_tensor, bool):
      raise ValueError(
          f"BlockPartition.value_per_tensor ({self.value_per_tensor!r}) must be a bool")
    if self.axes_fn is not None and not callable(self.axes_fn):
      raise ValueError(f"BlockPartition.axes_fn ({self.axes_fn!r}) must be callable or None")
    by_path = {}
    if self.logical_axes is not None:
      leaves = jax.tree_util.tree_flatten_with_path(
          self.logical_axes, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
      for path, spec in leaves:
        if not isinstance(spec, PartitionSpec):
          raise ValueError(
              f"BlockPartition.logical_axes leaf at {'.'.join(path_names(path))} is {spec!r}, "
              "not a PartitionSpec")
        by_path[path_names(path)] = tuple(spec)
    object.__setattr__(self, "_logical_by_path", by_path)

  def classify(self, path: Sequence[Any] | tuple[str, ...], param: Any) -> Block:
    """Returns the blocks of one parameter.

    Args:
      path: a jax key path (from `tree_flatten_with_path`) or a tuple of component names.
      param: the parameter (anything with `.shape`).

    Returns:
      Its `Block`.

    Raises:
      ValueError: for a 2-D query/key kernel without `num_heads`, a head count that does not
        divide it, logical axes of the wrong rank, or bad axes from `axes_fn`.
    """
    names = path if all(isinstance(n, str) for n in path) else path_names(path)
    names = tuple(names)
    shape = tuple(int(n) for n in param.shape)
    where = ".".join(names) or "<root>"

    logical = self._logical_by_path.get(names)

    def block(kind, reduce_axes, view_shape=shape):
      axes = _normalize_axes(reduce_axes, len(view_shape), where)
      if kind == BlockKind.CUSTOM:  # Custom blocks, but a norm scale or bias is still exempt.
        leaf = names[-1].lower() if names else ""
        norm = "norm" in logical if logical else leaf == "scale" and len(shape) >= 1
        decay = not (leaf == "bias" or norm)
      else:
        decay = kind not in (BlockKind.NORM, BlockKind.BIAS)
      return Block(where, shape, kind, tuple(view_shape), axes, decay)

    if self.axes_fn is not None:
      axes = self.axes_fn(where, param)
      if axes is not None:
        return block(BlockKind.CUSTOM, axes)
    if logical:
      if len(logical) != len(shape):
        raise ValueError(
            f"logical axes {logical} of parameter {where} do not match its shape {shape}")
      return self._classify_logical(names, shape, logical, block)
    return self._classify_path(names, shape, where, block)

  def _classify_logical(self, names, shape, logical, block) -> Block:
    """Rules on logical axis names (this library's models); 'layers' axes are always kept."""
    leaf = names[-1].lower() if names else ""
    modules = {n.lower() for n in names[:-1]}
    free = [a for a, name in enumerate(logical) if name != _LAYERS]  # Axes that may be reduced.
    position = {name: a for a, name in enumerate(logical) if isinstance(name, str)}

    def all_but(*keep):
      return [a for a in free if a not in keep]

    if leaf == "bias":
      return block(BlockKind.BIAS, ())
    if "vocab" in position:
      # Embedding tables are (vocab, features); output heads (features, vocab).
      first = leaf == "embedding" or (free and position["vocab"] == free[0])
      return block(BlockKind.EMBEDDING if first else BlockKind.OUTPUT, all_but(position["vocab"]))
    heads = next((position[h] for h in _HEADS if h in position), None)
    if heads is not None and "embed" in position:
      if position["embed"] > heads:
        return block(BlockKind.ATTN_OUT, all_but(position["embed"]))
      if modules & _VALUE_NAMES:
        if self.value_per_tensor:
          return block(BlockKind.VALUE, free)
        return block(BlockKind.VALUE, [position["embed"]])
      return block(BlockKind.QUERY_KEY, all_but(heads))
    if "mlp" in position and len(free) >= 2:
      return block(BlockKind.MLP, free[:-1])
    if "norm" in position:
      return block(BlockKind.NORM, free)
    if leaf == "kernel" and len(free) >= 2:
      return block(BlockKind.DENSE, free[:-1])
    return block(BlockKind.TENSOR, free)

  @staticmethod
  def _has_heads_axis(shape, heads: int | None, axis: int) -> bool:
    """Whether an attention kernel of rank >= 3 has a heads axis at `axis` (Flax's per-head
    (D, H, Dh) / (H, Dh, D), maybe with leading layer axes) rather than being a stack of 2-D
    kernels ((L, D, H Dh) from a scan over 2-D projections). Rank 3 is ambiguous by shape alone:
    with the head count given, the axis's size decides; without it, per-head is assumed."""
    if len(shape) < 3:
      return False
    return heads is None or shape[axis] == heads

  def _classify_path(self, names, shape, where, block) -> Block:
    """Rules on path names and shapes (Flax layouts, or this library without logical axes)."""
    leaf = names[-1].lower() if names else ""
    modules = {n.lower() for n in names[:-1]}
    ndim = len(shape)
    if leaf == "bias":
      return block(BlockKind.BIAS, ())
    if leaf == "scale" and ndim >= 1:
      return block(BlockKind.NORM, (-1,))
    if leaf == "embedding" and ndim >= 2:
      return block(BlockKind.EMBEDDING, (-1,))
    if leaf != "kernel" or ndim < 2:
      return block(BlockKind.TENSOR, range(ndim))
    is_key = bool(modules & _KEY_NAMES) and not modules & _QUERY_NAMES
    kv_heads = self.num_kv_heads if self.num_kv_heads is not None else self.num_heads
    # Rank-3 key / value kernels are told apart from stacks of 2-D ones by `num_kv_heads` only.
    if modules & (_QUERY_NAMES | _KEY_NAMES):
      heads = kv_heads if is_key else self.num_heads
      if self._has_heads_axis(shape, self.num_kv_heads if is_key else self.num_heads, -2):
        return block(BlockKind.QUERY_KEY, (-3, -1))
      if heads is None:
        raise ValueError(
            f"query/key kernel {where} has 2-D shape {shape}: pass "
            "BlockPartition(num_heads=..., num_kv_heads=...) so it can be split into heads")
      if shape[-1] % heads:
        raise ValueError(
            f"query/key kernel {where} with shape {shape}: {heads} heads do not divide "
            f"its output width {shape[-1]}")
      return block(BlockKind.QUERY_KEY, (-3, -1), (*shape[:-1], heads, shape[-1] // heads))
    if modules & _VALUE_NAMES:
      per_head = self._has_heads_axis(shape, self.num_kv_heads, -2)
      if self.value_per_tensor:
        return block(BlockKind.VALUE, range(max(ndim - (3 if per_head else 2), 0), ndim))
      return block(BlockKind.VALUE, (-3,) if per_head else (-2,))
    if modules & _ATTN_OUT_NAMES:
      per_head = self._has_heads_axis(shape, self.num_heads, -3)
      return block(BlockKind.ATTN_OUT, (-3, -2) if per_head else (-2,))
    if modules & _OUTPUT_NAMES:
      kind = BlockKind.OUTPUT
    elif modules & _MLP_NAMES:
      kind = BlockKind.MLP
    else:
      kind = BlockKind.DENSE
    return block(kind, (-2,))


def _partition(partition: BlockPartition | None) -> BlockPartition:
  if partition is None:
    return BlockPartition()
  if not isinstance(partition, BlockPartition):
    raise ValueError(f"partition ({partition!r}) must be a BlockPartition or None")
  return partition


def map_blocks(fn: Callable[..., Any], partition: BlockPartition | None, tree: Any,
               *rest: Any) -> Any:
  """`jax.tree.map` that also hands `fn` each leaf's `Block`: `fn(block, leaf, *rest_leaves)`.

  Paths come from `tree` (the parameters or updates), so masked-out `optax.MaskedNode`s and
  `None` leaves are skipped like in any tree map.
  """
  partition = _partition(partition)
  return jax.tree_util.tree_map_with_path(
      lambda path, x, *r: fn(partition.classify(path, x), x, *r), tree, *rest)


def partition_table(params: Any, partition: BlockPartition | None = None) -> list[Block]:
  """How every parameter is split into Adam-mini blocks, in tree-flatten order.

  Args:
    params: a pytree of arrays or `jax.ShapeDtypeStruct`s.
    partition: the block options (defaults: path rules only).

  Returns:
    One `Block` per parameter; print it with `format_partition_table`.
  """
  partition = _partition(partition)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return [partition.classify(path, x) for path, x in leaves]


def format_partition_table(table: Sequence[Block]) -> str:
  """A fixed-width text table of `partition_table`'s rows, plus totals, for a person to read."""
  header = ("path", "shape", "kind", "reduced axes", "blocks", "decay")
  rows = [
      (b.path, str(b.shape) if b.view_shape == b.shape else f"{b.shape}->{b.view_shape}",
       b.kind.value, str(b.reduce_axes), str(b.num_blocks), "yes" if b.decay else "no")
      for b in table
  ]
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
  numel = sum(math.prod(b.shape) for b in table)
  blocks = sum(b.num_blocks for b in table)
  lines.append(f"{len(table)} parameters, {numel} entries, {blocks} second-moment values")
  return "\n".join(lines)


def decay_mask(params: Any, partition: BlockPartition | None = None) -> Any:
  """Pytree of bools: True where decoupled weight decay applies (not norms, not biases)."""
  return map_blocks(lambda block, _: block.decay, partition, params)


def nu_partition_spec(param_spec: PartitionSpec, block: Block) -> PartitionSpec:
  """The PartitionSpec of a parameter's second moment: its own, with the reduced axes replicated.

  A 2-D query/key kernel (D, H * Dh) is viewed as (D, H, Dh); its output-axis sharding goes to the
  heads axis (a mesh axis that divides H splits whole heads, the same entries as before).

  Args:
    param_spec: the parameter's mesh PartitionSpec (may be shorter than its rank).
    block: the parameter's `Block`.

  Returns:
    A PartitionSpec for an array of shape `block.nu_shape`.
  """
  spec = tuple(param_spec) + (None,) * (len(block.shape) - len(tuple(param_spec)))
  if len(spec) != len(block.shape):
    raise ValueError(f"PartitionSpec {param_spec} has more entries than {block.path}'s rank")
  if block.view_shape != block.shape:
    # The view splits one axis into two: find it and give its sharding to the outer part.
    split = next(a for a, (n, m) in enumerate(zip(block.shape, block.view_shape)) if n != m)
    spec = spec[:split] + (spec[split], None) + spec[split + 1:]
  return PartitionSpec(*(None if a in block.reduce_axes else s for a, s in enumerate(spec)))


def nu_partition_specs(params: Any, param_specs: Any,
                       partition: BlockPartition | None = None) -> Any:
  """`nu_partition_spec` over a pytree: the specs of `ScaleByAdamMiniState.nu`.

  Args:
    params: pytree of arrays or `jax.ShapeDtypeStruct`s.
    param_specs: matching pytree of mesh PartitionSpecs.
    partition: the block options.
  """
  return map_blocks(lambda block, _, spec: nu_partition_spec(spec, block), partition, params,
                    param_specs)
