"""Adam-mini block partition: the classification table for this library's models, Flax layouts,
and unknown pytrees; sharding specs of the second moment."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rlhfjax import optim
from rlhfjax.models import Transformer, get_config

K = optim.BlockKind


def library_model(config_name="tiny", **overrides):
  """(abstract params, logical axes, config) of this library's Transformer, without allocating."""
  config = get_config(config_name, **overrides)
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0), score_head=True))
  state = nnx.state(model, nnx.Param)
  return state.to_pure_dict(), nnx.get_partition_spec(state).to_pure_dict(), config


def expected_library_rows(c):
  """{path suffix: (kind, reduced axes, number of blocks)} from the Adam-mini 1.1.1 rules."""
  H, K_, Dh, D, F, V = (c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.mlp_dim,
                        c.vocab_size)
  return {
      "embed_tokens.embedding": (K.EMBEDDING, (1,), V),         # one per token
      "lm_head.kernel": (K.OUTPUT, (0,), V),                     # one per token
      "self_attn.q_proj.kernel": (K.QUERY_KEY, (0, 2), H),       # one per head
      "self_attn.k_proj.kernel": (K.QUERY_KEY, (0, 2), K_),      # one per kv head
      "self_attn.v_proj.kernel": (K.VALUE, (0,), K_ * Dh),       # one per output neuron
      "self_attn.o_proj.kernel": (K.ATTN_OUT, (0, 1), D),        # one per output neuron
      "self_attn.q_proj.bias": (K.BIAS, (), H * Dh),             # elementwise
      "self_attn.k_proj.bias": (K.BIAS, (), K_ * Dh),
      "self_attn.v_proj.bias": (K.BIAS, (), K_ * Dh),
      "mlp.gate_proj.kernel": (K.MLP, (0,), F),
      "mlp.up_proj.kernel": (K.MLP, (0,), F),
      "mlp.down_proj.kernel": (K.MLP, (0,), D),
      "input_layernorm.scale": (K.NORM, (0,), 1),                # one per tensor
      "post_attention_layernorm.scale": (K.NORM, (0,), 1),
      "norm.scale": (K.NORM, (0,), 1),
      "score_head.kernel": (K.DENSE, (0,), 1),
      "score_head.bias": (K.BIAS, (), 1),
  }


def check_rows(table, expected):
  for block in table:
    suffix = next(s for s in expected if block.path == s or block.path.endswith("." + s))
    kind, axes, num_blocks = expected[suffix]
    assert (block.kind, block.reduce_axes, block.num_blocks) == (kind, axes, num_blocks), block
    assert block.decay == (kind not in (K.NORM, K.BIAS)), block


@pytest.mark.parametrize("use_logical_axes", [True, False])
@pytest.mark.parametrize("head_dim", [16, 24])  # 24 != hidden / heads = 16
def test_library_model_table(use_logical_axes, head_dim):
  params, logical, config = library_model(attention_bias=True, head_dim=head_dim)
  partition = optim.BlockPartition(logical_axes=logical if use_logical_axes else None)
  table = optim.partition_table(params, partition)
  assert len(table) == len(jax.tree.leaves(params))
  check_rows(table, expected_library_rows(config))


def test_scanned_layers_axis_is_never_averaged():
  params, logical, config = library_model()
  L = config.num_layers
  layer = params["layers"][0]
  stacked = {"embed_tokens": params["embed_tokens"], "layers": jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((L, *x.shape), x.dtype), layer)}
  stacked_logical = {"embed_tokens": logical["embed_tokens"], "layers": jax.tree.map(
      lambda s: P("layers", *s), logical["layers"][0])}
  unstacked = {b.path.split(".", 2)[-1]: b
               for b in optim.partition_table({"layers": {0: layer}}, None)}
  for logical_axes in (stacked_logical, None):  # logical 'layers' axis; rank rules on paths
    table = optim.partition_table(stacked, optim.BlockPartition(logical_axes=logical_axes))
    for block in table:
      if not block.path.startswith("layers."):
        continue
      assert 0 not in block.reduce_axes, block
      one = unstacked[block.path.split(".", 1)[1]]
      assert block.kind == one.kind
      assert block.num_blocks == L * one.num_blocks, block


class FlaxModel(nnx.Module):
  """Flax building blocks under their own default names."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(10, 8, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=6, decode=False,
                                       rngs=rngs)
    self.ln = nnx.LayerNorm(8, rngs=rngs)
    self.rms = nnx.RMSNorm(8, rngs=rngs)
    self.dense = nnx.Linear(8, 5, rngs=rngs)
    self.lm_head = nnx.Linear(5, 10, use_bias=False, rngs=rngs)


@pytest.mark.parametrize("pure", [True, False])
def test_flax_layout_table(pure):
  state = nnx.state(nnx.eval_shape(lambda: FlaxModel(nnx.Rngs(0))), nnx.Param)
  params = state.to_pure_dict() if pure else state  # nnx.State paths end in `.value`
  rows = {b.path: (b.kind, b.reduce_axes, b.num_blocks, b.decay)
          for b in optim.partition_table(params)}
  # MHA kernels: query/key/value (D=8, H=2, Dh=3), out (H, Dh, D).
  assert rows == {
      "attn.key.bias": (K.BIAS, (), 6, False),
      "attn.key.kernel": (K.QUERY_KEY, (0, 2), 2, True),
      "attn.out.bias": (K.BIAS, (), 8, False),
      "attn.out.kernel": (K.ATTN_OUT, (0, 1), 8, True),
      "attn.query.bias": (K.BIAS, (), 6, False),
      "attn.query.kernel": (K.QUERY_KEY, (0, 2), 2, True),
      "attn.value.bias": (K.BIAS, (), 6, False),
      "attn.value.kernel": (K.VALUE, (0,), 6, True),
      "dense.bias": (K.BIAS, (), 5, False),
      "dense.kernel": (K.DENSE, (0,), 5, True),
      "embed.embedding": (K.EMBEDDING, (1,), 10, True),
      "lm_head.kernel": (K.OUTPUT, (0,), 10, True),
      "ln.bias": (K.BIAS, (), 8, False),
      "ln.scale": (K.NORM, (0,), 1, False),
      "rms.scale": (K.NORM, (0,), 1, False),
  }


def test_two_dimensional_query_key_kernels_need_and_use_head_counts():
  D, H, KV, Dh = 8, 4, 2, 3
  params = {"query": {"kernel": jnp.zeros((D, H * Dh))}, "key": {"kernel": jnp.zeros((D, KV * Dh))},
            "value": {"kernel": jnp.zeros((D, KV * Dh))}}
  table = optim.partition_table(params, optim.BlockPartition(num_heads=H, num_kv_heads=KV))
  rows = {b.path: (b.view_shape, b.reduce_axes, b.nu_shape) for b in table}
  assert rows == {
      "key.kernel": ((D, KV, Dh), (0, 2), (1, KV, 1)),
      "query.kernel": ((D, H, Dh), (0, 2), (1, H, 1)),
      "value.kernel": ((D, KV * Dh), (0,), (1, KV * Dh)),
  }
  with pytest.raises(ValueError, match="num_heads"):
    optim.partition_table(params)
  with pytest.raises(ValueError, match="do not divide"):
    optim.partition_table(params, optim.BlockPartition(num_heads=5))


def test_unknown_pytree_falls_back_to_one_block_per_tensor():
  params = [jnp.zeros((3, 4)), {"w": jnp.zeros((2, 5, 2)), "b": jnp.zeros(7)}, jnp.zeros(())]
  table = optim.partition_table(params)
  assert [(b.path, b.kind, b.reduce_axes, b.num_blocks) for b in table] == [
      ("0", K.TENSOR, (0, 1), 1),
      ("1.b", K.TENSOR, (0,), 1),
      ("1.w", K.TENSOR, (0, 1, 2), 1),
      ("2", K.TENSOR, (), 1),
  ]
  text = optim.format_partition_table(table)
  assert "1.w" in text and "(2, 5, 2)" in text
  # 12 + 20 + 7 + 1 entries.
  assert text.splitlines()[-1] == "4 parameters, 40 entries, 4 second-moment values"


def test_value_per_tensor_and_custom_axes():
  params, logical, config = library_model()
  partition = optim.BlockPartition(
      logical_axes=logical, value_per_tensor=True,
      axes_fn=lambda path, p: (-1,) if path.endswith("down_proj.kernel") else None)
  rows = {b.path: b for b in optim.partition_table(params, partition)}
  assert rows["layers.0.self_attn.v_proj.kernel"].num_blocks == 1
  custom = rows["layers.1.mlp.down_proj.kernel"]
  assert (custom.kind, custom.reduce_axes, custom.num_blocks) == (K.CUSTOM, (1,), config.mlp_dim)
  with pytest.raises(ValueError, match="out of range"):
    optim.partition_table(params, optim.BlockPartition(axes_fn=lambda path, p: (5,)))


def test_logical_vocab_axis_marks_embedding_or_head():
  params = {"emb": {"embedding": jnp.zeros((6, 4))}, "out": {"kernel": jnp.zeros((5, 6))},
            "stack": {"w": jnp.zeros((2, 6, 4))}}
  logical = {"emb": {"embedding": P("vocab", "embed")}, "out": {"kernel": P("mlp", "vocab")},
             "stack": {"w": P("layers", "vocab", "embed")}}
  rows = {b.path: (b.kind, b.reduce_axes, b.num_blocks) for b in optim.partition_table(
      params, optim.BlockPartition(logical_axes=logical))}
  assert rows == {"emb.embedding": (K.EMBEDDING, (1,), 6), "out.kernel": (K.OUTPUT, (0,), 6),
                  "stack.w": (K.EMBEDDING, (2,), 12)}


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="num_heads"):
    optim.BlockPartition(num_heads=0)
  with pytest.raises(ValueError, match="do not match"):
    optim.partition_table({"w": jnp.zeros((2, 3))},
                          optim.BlockPartition(logical_axes={"w": P("embed")}))
  with pytest.raises(ValueError, match="PartitionSpec"):
    optim.BlockPartition(logical_axes={"w": ("embed", "mlp")})
  with pytest.raises(ValueError, match="BlockPartition"):
    optim.adam_mini(partition={"num_heads": 2}).init({"w": jnp.zeros(2)})


def test_decay_mask_exempts_norms_and_biases():
  params, logical, _ = library_model(attention_bias=True)
  mask = optim.decay_mask(params, optim.BlockPartition(logical_axes=logical))
  leaves = jax.tree_util.tree_flatten_with_path(mask)[0]
  flat = {".".join(optim.path_names(p)): m for p, m in leaves}
  assert not flat["norm.scale"] and not flat["layers.0.self_attn.q_proj.bias"]
  assert not flat["layers.1.input_layernorm.scale"]
  assert flat["layers.1.mlp.up_proj.kernel"] and flat["embed_tokens.embedding"]
  assert sum(flat.values()) == sum(1 for k in flat if k.endswith(("kernel", "embedding")))


@pytest.mark.parametrize("use_logical_axes", [True, False])
def test_custom_blocks_keep_the_norm_and_bias_exemption(use_logical_axes):
  """`axes_fn` chooses blocks, not what a tensor is: with one custom block per tensor everywhere,
  norm scales and biases are still not decayed (as in the reference, which exempts by name)."""
  params, logical, _ = library_model(attention_bias=True)
  kwargs = dict(logical_axes=logical) if use_logical_axes else dict(num_heads=4)
  builtin = optim.decay_mask(params, optim.BlockPartition(**kwargs))
  partition = optim.BlockPartition(axes_fn=lambda path, p: range(len(p.shape)), **kwargs)
  assert {b.kind for b in optim.partition_table(params, partition)} == {K.CUSTOM}
  assert optim.decay_mask(params, partition) == builtin
  assert not all(jax.tree.leaves(builtin)) and any(jax.tree.leaves(builtin))


@pytest.mark.parametrize("spec, shape, partition, expected", [
    (P("fsdp", "tensor"), (8, 16), None, P(None, "tensor")),            # dense: reduce input
    (P("fsdp", "tensor", None), (8, 4, 2), None, P(None, "tensor", None)),  # MHA query
    (P(None, "tensor"), (8, 8), optim.BlockPartition(num_heads=4), P(None, "tensor", None)),
    (P("fsdp"), (8,), None, P(None)),                                    # norm
    (P("fsdp"), (8, 4), None, P("fsdp", None)),                          # embedding (short spec)
])
def test_nu_partition_spec(spec, shape, partition, expected):
  leaf = "embedding" if shape == (8, 4) else "scale" if len(shape) == 1 else "kernel"
  module = "query" if len(shape) == 3 or partition is not None else "dense"
  params = {module: {leaf: jax.ShapeDtypeStruct(shape, jnp.float32)}}
  specs = optim.nu_partition_specs(params, {module: {leaf: spec}}, partition)
  got = specs[module][leaf]
  assert got == expected
  (block,) = optim.partition_table(params, partition)
  assert len(got) == len(block.nu_shape)
  for axis, (n, s) in enumerate(zip(block.nu_shape, got)):
    assert s is None or n > 1, (axis, block)


def test_scanned_library_model_has_per_layer_blocks():
  """The real scan_layers model: every layer of a stacked parameter is its own set of blocks."""
  params, logical, config = library_model(attention_bias=True)
  stacked, stacked_logical, _ = library_model(attention_bias=True, scan_layers=True)
  assert tuple(stacked_logical["layers"]["mlp"]["up_proj"]["kernel"]) == ("layers", "embed", "mlp")
  per_layer = {b.path: b for b in optim.partition_table(
      params, optim.BlockPartition(logical_axes=logical))}
  for logical_axes in (stacked_logical, None):
    table = optim.partition_table(stacked, optim.BlockPartition(logical_axes=logical_axes))
    assert len(table) == len(jax.tree.leaves(stacked))
    for block in table:
      if not block.path.startswith("layers."):
        assert block == per_layer[block.path]
        continue
      one = per_layer["layers.0." + block.path.split(".", 1)[1]]
      assert block.kind == one.kind, block
      assert block.reduce_axes == tuple(a + 1 for a in one.reduce_axes), block
      assert block.num_blocks == config.num_layers * one.num_blocks, block
  text = optim.format_partition_table(table)
  assert "layers.self_attn.q_proj.kernel" in text


def test_stacked_two_dimensional_attention_kernels_keep_the_layer_axis():
  """A scan over 2-D projections stacks them as (L, D, H Dh): with the head counts given, the
  leading axis is a layer axis (never averaged over), not Flax's per-head (D, H, Dh) layout."""
  L, D, H, KV, Dh = 3, 8, 4, 2, 2
  params = {"q_proj": {"kernel": jnp.zeros((L, D, H * Dh))},
            "k_proj": {"kernel": jnp.zeros((L, D, KV * Dh))},
            "v_proj": {"kernel": jnp.zeros((L, D, KV * Dh))},
            "o_proj": {"kernel": jnp.zeros((L, H * Dh, D))}}
  partition = optim.BlockPartition(num_heads=H, num_kv_heads=KV)
  rows = {b.path: (b.view_shape, b.reduce_axes, b.nu_shape)
          for b in optim.partition_table(params, partition)}
  assert rows == {
      "q_proj.kernel": ((L, D, H, Dh), (1, 3), (L, 1, H, 1)),
      "k_proj.kernel": ((L, D, KV, Dh), (1, 3), (L, 1, KV, 1)),
      "v_proj.kernel": ((L, D, KV * Dh), (1,), (L, 1, KV * Dh)),
      "o_proj.kernel": ((L, H * Dh, D), (1,), (L, 1, D)),
  }
  # Per-layer gradient scales 1e-3, 1, 1e3: with b1 = b2 = 0 and eps = 0 every layer's update has
  # RMS 1 (pooled over the layers, the small layers' updates would all but vanish).
  scale = jnp.asarray([1e-3, 1.0, 1e3])[:, None, None]
  grads = {"q_proj": {"kernel": scale * jax.random.normal(jax.random.key(0), (L, D, H * Dh))}}
  tx = optim.adam_mini(1.0, b1=0.0, b2=0.0, eps=0.0, partition=partition)
  updates, _ = tx.update(grads, tx.init(grads), grads)
  rms = jnp.sqrt(jnp.mean(jnp.square(updates["q_proj"]["kernel"]), axis=(1, 2)))
  assert jnp.allclose(rms, 1.0, rtol=1e-3), rms
  # Without head counts a rank-3 kernel is read as Flax's per-head layout (D, H, Dh).
  rows = {b.path: b.reduce_axes for b in optim.partition_table(params)}
  assert rows["q_proj.kernel"] == (0, 2) and rows["o_proj.kernel"] == (0, 1)
