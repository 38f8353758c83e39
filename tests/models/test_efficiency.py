"""Efficiency options of the decoder: remat policies, scan over layers, the fused attention kernel.

Each option must compute what the default model computes: the oracle is the default
(unrolled, no remat, einsum attention) model with the same weights.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhfjax import sharding as shd
from rlhfjax.models import KVCache, Transformer
from rlhfjax.models.attention import dot_product_attention, fused_dot_product_attention
from rlhfjax.models.configs import REMAT_POLICIES
from rlhfjax.models.transformer import stack_layers, unstack_layers
from tests.models.test_transformer import apply, build, padded_batch, random_params, tiny


def _loss(model, tokens_BxT, mask_BxT):
  """Mean next-token cross-entropy over real tokens (a train-step-like scalar)."""
  logits_BxTxV = model(tokens_BxT, attention_mask_BxT=mask_BxT)
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV[:, :-1])
  target_logp_BxT = jnp.take_along_axis(logp_BxTxV, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
  weights_BxT = mask_BxT[:, 1:] * mask_BxT[:, :-1]
  return -jnp.sum(target_logp_BxT * weights_BxT) / jnp.sum(weights_BxT)


def _loss_and_grads_fn(config):
  """jit `(params, tokens, mask) -> (loss, grads)` of a model built from `config`."""
  with nnx.use_eager_sharding(False):
    graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))[0]

  def loss(params, tokens_BxT, mask_BxT):
    model = nnx.merge(graphdef, nnx.State(params))
    return _loss(model, tokens_BxT, mask_BxT)

  return jax.jit(jax.value_and_grad(loss))


def _state(model):
  return nnx.state(model, nnx.Param).to_pure_dict()


def _assert_trees_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------
# Remat
# ------------------------------------------------------------------------------------------------


# Every policy once, split over the two layouts to keep compilations few.
@pytest.mark.parametrize("scan_layers, policies", [
    (False, ("full", "dots_with_no_batch_dims_saveable")),
    (True, ("nothing_saveable", "dots_saveable")),
])
def test_remat_policies_keep_loss_and_grads(scan_layers, policies):
  assert set(REMAT_POLICIES) == {"none", "full", "nothing_saveable", "dots_saveable",
                                 "dots_with_no_batch_dims_saveable"}
  params = random_params(tiny(num_layers=2), seed=1)
  if scan_layers:
    params = stack_layers(params)
  tokens, mask = padded_batch(np.random.default_rng(2), [8, 5], 8, 64, side="left")
  reference = _loss_and_grads_fn(tiny(num_layers=2, scan_layers=scan_layers))(params, tokens, mask)
  for remat in policies:
    config = tiny(num_layers=2, scan_layers=scan_layers, remat=remat)
    loss, grads = _loss_and_grads_fn(config)(params, tokens, mask)
    np.testing.assert_allclose(loss, reference[0], atol=1e-6, rtol=0)
    _assert_trees_close(grads, reference[1], atol=1e-6)


@pytest.mark.parametrize("scan_layers, remat", [(False, "full"), (True, "nothing_saveable")])
def test_remat_keeps_shared_prefix_attention(scan_layers, remat):
  """Packed continuations of a shared prefix under remat: each continuation's hidden states equal
  those of [prefix | continuation] run alone (it never sees the other continuation)."""
  tp, tr, g = 3, 4, 2
  params = random_params(tiny(), seed=13)
  packed_model = build(tiny(scan_layers=scan_layers, remat=remat),
                       stack_layers(params) if scan_layers else params)
  rng = np.random.default_rng(14)
  tokens = rng.integers(0, 64, (2, tp + g * tr)).astype(np.int32)
  positions = np.concatenate([np.arange(tp)] + [tp + np.arange(tr)] * g)[None].repeat(2, axis=0)
  h = np.asarray(apply(
      lambda m, t, pos: m.hidden_states(t, positions_BxT=pos, shared_prefix=(tp, tr)),
      packed_model, tokens, positions))
  model = build(tiny(), params)
  for i in range(g):
    cols = slice(tp + i * tr, tp + (i + 1) * tr)
    alone = np.asarray(apply(lambda m, t: m.hidden_states(t), model,
                             np.concatenate([tokens[:, :tp], tokens[:, cols]], axis=1)))
    np.testing.assert_allclose(h[:, :tp], alone[:, :tp], atol=1e-5, rtol=0)
    np.testing.assert_allclose(h[:, cols], alone[:, tp:], atol=1e-5, rtol=0)


def _train_step_temp_bytes(config, batch, length):
  """Temp bytes of the compiled loss-and-gradient program (XLA's buffer assignment)."""
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  params = _state(abstract)
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  compiled = _loss_and_grads_fn(config).lower(params, tokens, tokens).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_full_remat_lowers_train_step_memory():
  # Long sequences, narrow model: activations (incl. B x H x T x T attention weights) dominate.
  # Measured with scanned layers: in an unrolled stack XLA:CPU schedules every block's
  # recomputation early, so the rematerialised values are live together and the peak barely moves
  # (4 layers: 71 MB vs 73 MB); under scan each recomputation happens in its own loop iteration.
  config = tiny(num_layers=4, vocab_size=32, scan_layers=True)
  none = _train_step_temp_bytes(config, batch=4, length=256)
  full = _train_step_temp_bytes(dataclasses.replace(config, remat="full"), batch=4, length=256)
  assert full < 0.6 * none, (full, none)


# ------------------------------------------------------------------------------------------------
# Scan over layers
# ------------------------------------------------------------------------------------------------


def test_stack_and_unstack_layers_are_inverse_and_match_the_scanned_layout():
  config = tiny(attention_bias=True)
  params = random_params(config, seed=3)
  stacked = stack_layers(params)
  with nnx.use_eager_sharding(False):
    scanned = nnx.eval_shape(
        lambda: Transformer(dataclasses.replace(config, scan_layers=True), rngs=nnx.Rngs(0)))
  state = nnx.state(scanned, nnx.Param)
  assert jax.tree.structure(_state(scanned)) == jax.tree.structure(stacked)
  for x, y in zip(jax.tree.leaves(_state(scanned)), jax.tree.leaves(stacked)):
    assert x.shape == y.shape
  specs = nnx.get_partition_spec(state).to_pure_dict()
  assert tuple(specs["layers"]["self_attn"]["q_proj"]["kernel"]) == (
      "layers", "embed", "q_heads", "head_dim")
  assert tuple(specs["layers"]["input_layernorm"]["scale"]) == ("layers", "norm")
  assert tuple(specs["embed_tokens"]["embedding"]) == ("vocab", "embed")
  np.testing.assert_array_equal(stacked["layers"]["mlp"]["up_proj"]["kernel"][1],
                                params["layers"][1]["mlp"]["up_proj"]["kernel"])
  round_trip = unstack_layers(stacked)
  assert jax.tree.structure(round_trip) == jax.tree.structure(params)
  _assert_trees_close(round_trip, params, atol=0)
  with pytest.raises(ValueError, match="unscanned layout"):
    stack_layers(stacked)
  with pytest.raises(ValueError, match="scanned layout"):
    unstack_layers(params)


def _scanned_pair(seed, **overrides):
  """(unscanned model, scanned model) with the same weights."""
  config = tiny(**overrides)
  params = random_params(config, seed=seed)
  scanned = build(dataclasses.replace(config, scan_layers=True), stack_layers(params))
  return build(config, params), scanned


@pytest.mark.parametrize("side", ["left", "right"])
def test_scanned_logits_equal_unscanned(side):
  model, scanned = _scanned_pair(4, num_layers=3, attention_bias=True)
  tokens, mask = padded_batch(np.random.default_rng(5), [7, 4, 1], 7, 64, side=side)
  fn = lambda m, t, k: m(t, attention_mask_BxT=k)  # noqa: E731
  expected = np.asarray(apply(fn, model, tokens, mask))
  np.testing.assert_allclose(apply(fn, scanned, tokens, mask), expected, atol=1e-5, rtol=0)


def test_scanned_kv_cache_decode_equals_unscanned():
  model, scanned = _scanned_pair(6, num_kv_heads=1, head_dim=24)
  rng = np.random.default_rng(7)
  prompt, prompt_mask = padded_batch(rng, [5, 2], 5, 64, side="left")
  steps = rng.integers(0, 64, (2, 3)).astype(np.int32)
  step_mask = np.array([[1, 0, 1], [1, 1, 1]], np.int32)

  def decode(m, prompt, prompt_mask, steps, step_mask):
    logits, cache = m(prompt, attention_mask_BxT=prompt_mask, cache=m.init_cache(2, 9))
    out = [logits]
    for i in range(steps.shape[1]):
      logits, cache = m(steps[:, i:i + 1], attention_mask_BxT=step_mask[:, i:i + 1], cache=cache)
      out.append(logits)
    return jnp.concatenate(out, axis=1), cache

  logits, cache = apply(decode, model, prompt, prompt_mask, steps, step_mask)
  scanned_logits, scanned_cache = apply(decode, scanned, prompt, prompt_mask, steps, step_mask)
  assert isinstance(scanned_cache, KVCache) and scanned_cache.stacked and not cache.stacked
  assert scanned_cache.keys.shape == (2, 2, 1, 9, 24)
  np.testing.assert_allclose(scanned_logits, logits, atol=1e-5, rtol=0)
  np.testing.assert_allclose(scanned_cache.values, np.stack(cache.values), atol=1e-5, rtol=0)
  np.testing.assert_array_equal(scanned_cache.next_position_B, cache.next_position_B)
  with pytest.raises(ValueError, match="scan_layers=True"):
    scanned(prompt, cache=model.init_cache(2, 9))


def test_scanned_forward_sharded_on_8_devices_equals_one_device():
  config = tiny(scan_layers=True, num_heads=4, num_kv_heads=2, mlp_dim=128)
  params = stack_layers(random_params(tiny(), seed=8))
  model = build(config, params)
  tokens, mask = padded_batch(np.random.default_rng(9), [6, 3, 6, 2], 6, 64, side="left")
  fn = lambda m, t, k: m(t, attention_mask_BxT=k)  # noqa: E731
  expected = np.asarray(apply(fn, model, tokens, mask))

  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  graphdef, state = nnx.split(model)
  specs = nnx.get_partition_spec(state)
  shardings = shd.tree_shardings(state, specs, mesh)
  state = jax.device_put(state, shardings)
  kernel = state["layers"]["mlp"]["up_proj"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  batch = shd.shard_batch({"tokens": tokens, "mask": mask}, mesh)
  forward = jax.jit(lambda s, t, k: fn(nnx.merge(graphdef, s), t, k))
  np.testing.assert_allclose(forward(state, batch["tokens"], batch["mask"]), expected,
                             atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# Fused attention
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_fused_attention_equals_einsum_attention(side):
  rng = np.random.default_rng(10)
  b, t, h, k, dh = 3, 6, 4, 2, 8
  q, key, v = (rng.standard_normal(s).astype(np.float32)
               for s in ((b, t, h, dh), (b, t, k, dh), (b, t, k, dh)))
  _, mask_BxT = padded_batch(rng, [6, 3, 1], t, 8, side=side)
  slots = jnp.arange(t)
  mask_BxTxS = (slots[None, :] <= slots[:, None])[None] & mask_BxT.astype(bool)[:, None, :]
  expected = dot_product_attention(q, key, v, mask_BxTxS)
  np.testing.assert_allclose(fused_dot_product_attention(q, key, v, mask_BxTxS), expected,
                             atol=1e-6, rtol=0)
  # Padding queries (left padding: no visible key) are zero in both.
  assert np.all(np.asarray(expected)[~np.asarray(mask_BxTxS).any(-1)] == 0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_dot_product_attention_impl_gives_the_same_logits(side):
  config = tiny(attention_bias=True)
  params = random_params(config, seed=11)
  model = build(config, params)
  fused = build(dataclasses.replace(config, attention_impl="dot_product"), params)
  tokens, mask = padded_batch(np.random.default_rng(12), [6, 2], 6, 64, side=side)
  fn = lambda m, t, k: m(t, attention_mask_BxT=k)  # noqa: E731
  np.testing.assert_allclose(apply(fn, fused, tokens, mask), apply(fn, model, tokens, mask),
                             atol=1e-5, rtol=0)
