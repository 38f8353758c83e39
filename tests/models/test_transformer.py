"""Tests of the Llama-family decoder: parameter contract, exact oracles, KV cache, padding.

Models get random parameters of unit-scale signal (not the 0.02 init, under which attention is
nearly uniform and many bugs would hide below tolerance), drawn in numpy and shared with an
independent float64 numpy transcription of the HF Llama forward pass.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhfjax.models import (
    KVCache,
    Llama3RopeScaling,
    Transformer,
    get_config,
    last_token_scores,
)
from rlhfjax.models.layers import RMSNorm, flat_matmul, swiglu
from rlhfjax.models.rope import (
    apply_rope,
    inverse_frequencies,
    llama3_scale_frequencies,
    rotary_cos_sin,
)

TINY = get_config("tiny")


def tiny(**overrides):
  return dataclasses.replace(TINY, **overrides)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _path_names(path):
  return [str(getattr(k, "key", k)) for k in path]


def random_params(config, seed, *, score_head=False):
  """Numpy float32 parameters, keyed like `nnx.to_pure_dict`, with unit-scale activations."""
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(
        lambda: Transformer(config, rngs=nnx.Rngs(0), score_head=score_head)
    )
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    names = _path_names(path)
    shape = leaf.shape
    if names[-1] == "scale":
      value = 1.0 + 0.2 * rng.standard_normal(shape)
    elif names[-1] == "bias":
      value = 0.5 * rng.standard_normal(shape)
    elif names[-1] == "embedding":
      value = rng.standard_normal(shape)
    else:
      fan_in = shape[0] * shape[1] if "o_proj" in names else shape[0]
      value = rng.standard_normal(shape) / np.sqrt(fan_in)
    return value.astype(np.float32)

  pure = nnx.to_pure_dict(nnx.state(abstract))
  return jax.tree_util.tree_map_with_path(draw, pure)


def build(config, params, *, score_head=False):
  """A model whose parameters are `params` (a pure dict of arrays)."""
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(
        lambda: Transformer(config, rngs=nnx.Rngs(0), score_head=score_head)
    )
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(
      state, jax.tree.map(lambda p: jnp.asarray(p, config.param_dtype), params)
  )
  return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jit_apply(graphdef, fn, state, args):
  return fn(nnx.merge(graphdef, state), *args)


def apply(fn, model, *args):
  """`fn(model, *args)` under jit: one compilation instead of one per op in eager mode."""
  graphdef, state = nnx.split(model)
  return _jit_apply(graphdef, fn, state, jax.tree.map(jnp.asarray, args))


def _logits(model, tokens_BxT, mask_BxT):
  return model(tokens_BxT, attention_mask_BxT=mask_BxT)


def _logits_and_hidden(model, tokens_BxT, mask_BxT):
  return (
      model(tokens_BxT, attention_mask_BxT=mask_BxT),
      model.hidden_states(tokens_BxT, attention_mask_BxT=mask_BxT),
  )


def _cached_logits(model, tokens_BxT, mask_BxT, positions_BxT, cache):
  return model(tokens_BxT, attention_mask_BxT=mask_BxT, positions_BxT=positions_BxT, cache=cache)


def logits_of(model, tokens_BxT, mask_BxT=None):
  if mask_BxT is None:
    mask_BxT = np.ones(tokens_BxT.shape, np.int32)
  return apply(_logits, model, tokens_BxT, mask_BxT)


_CACHED_TRACES = []


@functools.partial(jax.jit, static_argnums=0)
def _jit_cached(graphdef, state, tokens_BxT, mask_BxT, cache):
  _CACHED_TRACES.append(tokens_BxT.shape)  # runs once per compilation
  return nnx.merge(graphdef, state)(tokens_BxT, attention_mask_BxT=mask_BxT, cache=cache)


# ------------------------------------------------------------------------------------------------
# Independent numpy reference (float64), transcribed from HF LlamaModel / Qwen2Model.
# ------------------------------------------------------------------------------------------------


def np_rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale


def np_rope_complex(x, positions, inv_freq):
  """Rotation as complex multiplication of (x_i + 1j x_{i+Dh/2}) by exp(1j p omega_i)."""
  half = x.shape[-1] // 2
  z = x[..., :half] + 1j * x[..., half:]
  z = z * np.exp(1j * positions[:, :, None, None] * inv_freq)
  return np.concatenate([z.real, z.imag], axis=-1)


def np_reference_logits(config, params, tokens, mask):
  c = config
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  mask = np.asarray(mask, bool)
  b, t = tokens.shape
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.float64)
  inv_freq = 1.0 / c.rope_theta ** (np.arange(0, c.head_dim, 2) / c.head_dim)
  if c.rope_scaling is not None:
    inv_freq = np_llama3_scaling_loop(inv_freq, c.rope_scaling)
  x = p["embed_tokens"]["embedding"][tokens]
  for i in range(c.num_layers):
    layer = p["layers"][i]
    attn = layer["self_attn"]
    h = np_rms_norm(x, layer["input_layernorm"]["scale"], c.rms_norm_eps)
    q = np.einsum("btd,dhk->bthk", h, attn["q_proj"]["kernel"])
    k = np.einsum("btd,dhk->bthk", h, attn["k_proj"]["kernel"])
    v = np.einsum("btd,dhk->bthk", h, attn["v_proj"]["kernel"])
    if c.attention_bias:
      q, k, v = q + attn["q_proj"]["bias"], k + attn["k_proj"]["bias"], v + attn["v_proj"]["bias"]
    q, k = np_rope_complex(q, positions, inv_freq), np_rope_complex(k, positions, inv_freq)
    # HF repeat_kv: kv head j serves query heads j*G .. j*G + G - 1.
    k, v = np.repeat(k, c.group_size, axis=2), np.repeat(v, c.group_size, axis=2)
    o = np.zeros_like(q)
    for bb in range(b):
      for tt in range(t):
        visible = [s for s in range(t) if s <= tt and mask[bb, s]]
        if not visible:
          continue
        logits = np.einsum("hd,shd->hs", q[bb, tt], k[bb, visible]) / np.sqrt(c.head_dim)
        w = np.exp(logits - logits.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        o[bb, tt] = np.einsum("hs,shd->hd", w, v[bb, visible])
    x = x + np.einsum("bthk,hkd->btd", o, attn["o_proj"]["kernel"])
    h = np_rms_norm(x, layer["post_attention_layernorm"]["scale"], c.rms_norm_eps)
    mlp = layer["mlp"]
    gate = h @ mlp["gate_proj"]["kernel"]
    x = x + (gate / (1 + np.exp(-gate)) * (h @ mlp["up_proj"]["kernel"])) @ mlp["down_proj"][
        "kernel"
    ]
  h = np_rms_norm(x, p["norm"]["scale"], c.rms_norm_eps)
  if c.tie_embeddings:
    return h @ p["embed_tokens"]["embedding"].T
  return h @ p["lm_head"]["kernel"]


def np_llama3_scaling_loop(inv_freq, scaling):
  """Meta's published `apply_scaling` (llama-models, Llama 3.1), written as a loop."""
  low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
  high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
  out = []
  for freq in inv_freq:
    wavelen = 2 * np.pi / freq
    if wavelen < high_freq_wavelen:
      out.append(freq)
    elif wavelen > low_freq_wavelen:
      out.append(freq / scaling.factor)
    else:
      smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
          scaling.high_freq_factor - scaling.low_freq_factor
      )
      out.append((1 - smooth) * freq / scaling.factor + smooth * freq)
  return np.array(out)


def padded_batch(rng, lengths, t, vocab, side):
  """Random tokens, each row `lengths[b]` real tokens padded on `side` to length t."""
  tokens = rng.integers(0, vocab, size=(len(lengths), t))
  mask = np.zeros((len(lengths), t), np.int32)
  for b, n in enumerate(lengths):
    if side == "left":
      mask[b, t - n:] = 1
    else:
      mask[b, :n] = 1
  return tokens.astype(np.int32), mask


# ------------------------------------------------------------------------------------------------
# Parameter contract
# ------------------------------------------------------------------------------------------------


def expected_layout(c, score_head):
  """The FIXED naming contract: path -> (shape, logical axes)."""
  d, h, k, dh = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
  f, v = c.mlp_dim, c.vocab_size
  out = {
      "embed_tokens.embedding": ((v, d), ("vocab", "embed")),
      "norm.scale": ((d,), ("norm",)),
  }
  for i in range(c.num_layers):
    p = f"layers.{i}."
    out[p + "input_layernorm.scale"] = ((d,), ("norm",))
    out[p + "post_attention_layernorm.scale"] = ((d,), ("norm",))
    out[p + "self_attn.q_proj.kernel"] = ((d, h, dh), ("embed", "q_heads", "head_dim"))
    out[p + "self_attn.k_proj.kernel"] = ((d, k, dh), ("embed", "kv_heads", "head_dim"))
    out[p + "self_attn.v_proj.kernel"] = ((d, k, dh), ("embed", "kv_heads", "head_dim"))
    out[p + "self_attn.o_proj.kernel"] = ((h, dh, d), ("q_heads", "head_dim", "embed"))
    if c.attention_bias:
      out[p + "self_attn.q_proj.bias"] = ((h, dh), ("q_heads", "head_dim"))
      out[p + "self_attn.k_proj.bias"] = ((k, dh), ("kv_heads", "head_dim"))
      out[p + "self_attn.v_proj.bias"] = ((k, dh), ("kv_heads", "head_dim"))
    out[p + "mlp.gate_proj.kernel"] = ((d, f), ("embed", "mlp"))
    out[p + "mlp.up_proj.kernel"] = ((d, f), ("embed", "mlp"))
    out[p + "mlp.down_proj.kernel"] = ((f, d), ("mlp", "embed"))
  if not c.tie_embeddings:
    out["lm_head.kernel"] = ((d, v), ("embed", "vocab"))
  if score_head:
    out["score_head.kernel"] = ((d, 1), ("embed", None))
    out["score_head.bias"] = ((1,), (None,))
  return out


@pytest.mark.parametrize(
    "overrides, score_head",
    [
        (dict(), False),
        (dict(tie_embeddings=True), True),
        (dict(attention_bias=True, head_dim=24, num_kv_heads=1), False),
    ],
)
def test_parameter_paths_shapes_and_logical_axes(overrides, score_head):
  config = tiny(**overrides)
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0), score_head=score_head))
  state = nnx.state(model, nnx.Param)
  shapes = {
      ".".join(_path_names(path)): leaf.shape
      for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
  }
  specs = {
      ".".join(_path_names(path)): tuple(spec)
      for path, spec in jax.tree_util.tree_flatten_with_path(
          nnx.to_pure_dict(nnx.get_partition_spec(state)),
          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
      )[0]
  }
  expected = expected_layout(config, score_head)
  assert shapes == {name: shape for name, (shape, _) in expected.items()}
  assert specs == {name: axes for name, (_, axes) in expected.items()}


def test_sharded_init_with_eval_shape_and_out_shardings():
  """eval_shape + jit(out_shardings) from the logical axes (rules local to this test).

  Also checks the real initialisers: norm scales one, biases zero, weights N(0, 0.02^2).
  """
  config = tiny(vocab_size=128, attention_bias=True)
  mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  rules = {"vocab": "b", "embed": "a", "q_heads": "b", "mlp": "b"}  # K = 2 < 4: replicate

  def init():
    with nnx.use_eager_sharding(False):
      return nnx.state(Transformer(config, rngs=nnx.Rngs(0), score_head=True))

  abstract = jax.eval_shape(init)
  shardings = jax.tree.map(
      lambda spec: jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec(*(rules.get(a) for a in spec))
      ),
      nnx.get_partition_spec(abstract),
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
  )
  state = jax.jit(init, out_shardings=shardings)()
  kernel = state["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("a", "b", None)
  assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape == (
      32, 1, 16
  )
  pure = nnx.to_pure_dict(state)
  np.testing.assert_array_equal(pure["norm"]["scale"], np.ones(config.hidden_size))
  np.testing.assert_array_equal(pure["layers"][1]["self_attn"]["k_proj"]["bias"], 0.0)
  np.testing.assert_array_equal(pure["score_head"]["bias"], 0.0)
  assert 0.018 < float(np.std(pure["layers"][0]["mlp"]["up_proj"]["kernel"])) < 0.022
  assert 0.018 < float(np.std(pure["embed_tokens"]["embedding"])) < 0.022


# ------------------------------------------------------------------------------------------------
# Exact oracles
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # GQA, K = 2 < H = 4
        dict(head_dim=24, attention_bias=True),  # H Dh = 96 != D = 64, Qwen2 biases
        dict(tie_embeddings=True, num_kv_heads=1, rope_theta=500.0),  # multi-query, tied
        dict(rope_scaling=Llama3RopeScaling(
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16,
        )),
        # eps comparable to mean(x^2) (unit-scale activations): a dropped or hard-coded eps shows.
        dict(rms_norm_eps=0.5),
    ],
)
def test_forward_matches_numpy_reference(overrides):
  config = tiny(**overrides)
  params = random_params(config, seed=1)
  model = build(config, params)
  rng = np.random.default_rng(2)
  tokens, mask = padded_batch(rng, [7, 4, 1], 7, config.vocab_size, side="left")
  mask[1, 5] = 0  # a hole in the middle of a row
  expected = np_reference_logits(config, params, tokens, mask)
  got = np.asarray(logits_of(model, tokens, mask))
  assert got.dtype == np.float32 and got.shape == (3, 7, config.vocab_size)
  np.testing.assert_allclose(got, expected, atol=2e-4, rtol=2e-4)


def test_causality_via_gradients():
  """d logits[t] / d x[s] is exactly zero for s > t and for padded s != t, nonzero otherwise."""
  config = tiny()
  model = build(config, random_params(config, seed=3))
  t = 6
  x_1xTxD = model.embed(jnp.asarray(np.random.default_rng(4).integers(0, 64, (1, t)), jnp.int32))
  mask_1xT = jnp.array([[1, 1, 0, 1, 1, 1]])
  graphdef, state = nnx.split(model)

  def logits(x):
    return nnx.merge(graphdef, state).forward_embeddings(x, attention_mask_BxT=mask_1xT)[0]

  jac_TxVxTxD = jax.jit(jax.jacfwd(logits))(x_1xTxD)[:, :, 0, :, :]
  influence_TxT = np.asarray(jnp.abs(jac_TxVxTxD).max(axis=(1, 3)))
  for tt in range(t):
    for s in range(t):
      if s > tt or (s == 2 and tt != 2):
        assert influence_TxT[tt, s] == 0.0, (tt, s)
      else:
        assert influence_TxT[tt, s] > 1e-4, (tt, s)


def test_gqa_equals_mha_with_repeated_kv_heads():
  gqa_config = tiny(attention_bias=True)  # H = 4, K = 2
  mha_config = tiny(attention_bias=True, num_kv_heads=4)
  g = gqa_config.group_size
  gqa_params = random_params(gqa_config, seed=5)
  mha_params = jax.tree.map(np.copy, gqa_params)
  for layer_id, layer in gqa_params["layers"].items():
    for name in ("k_proj", "v_proj"):
      mha_attn = mha_params["layers"][layer_id]["self_attn"][name]
      mha_attn["kernel"] = np.repeat(layer["self_attn"][name]["kernel"], g, axis=1)
      mha_attn["bias"] = np.repeat(layer["self_attn"][name]["bias"], g, axis=0)
  tokens, mask = padded_batch(np.random.default_rng(6), [6, 3], 6, 64, side="left")
  np.testing.assert_allclose(
      logits_of(build(gqa_config, gqa_params), tokens, mask),
      logits_of(build(mha_config, mha_params), tokens, mask),
      atol=1e-5,
  )


def test_tied_embeddings_use_transposed_embedding():
  config = tiny(tie_embeddings=True)
  model = build(config, random_params(config, seed=7))
  assert not hasattr(model, "lm_head")
  tokens = jnp.asarray(np.random.default_rng(8).integers(0, 64, (2, 5)), jnp.int32)
  mask = jnp.ones(tokens.shape, jnp.int32)
  logits, h = apply(_logits_and_hidden, model, tokens, mask)
  np.testing.assert_allclose(logits, h @ model.embed_tokens.embedding[...].T, atol=1e-5)

  untied = build(tiny(), random_params(tiny(), seed=7))
  logits, h = apply(_logits_and_hidden, untied, tokens, mask)
  np.testing.assert_allclose(logits, h @ untied.lm_head.kernel[...], atol=1e-5)


def test_attention_bias_present_only_when_configured():
  def has_bias(config):
    state = nnx.to_pure_dict(nnx.state(build(config, random_params(config, seed=0))))
    attn = state["layers"][0]["self_attn"]
    return {name: "bias" in attn[name] for name in ("q_proj", "k_proj", "v_proj", "o_proj")}

  assert has_bias(tiny()) == dict(q_proj=False, k_proj=False, v_proj=False, o_proj=False)
  assert has_bias(tiny(attention_bias=True)) == dict(
      q_proj=True, k_proj=True, v_proj=True, o_proj=False
  )


# ------------------------------------------------------------------------------------------------
# Padding and KV cache
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_invariance(side):
  config = tiny()
  model = build(config, random_params(config, seed=9))
  lengths, t = [6, 3], 6
  tokens, mask = padded_batch(np.random.default_rng(10), lengths, t, 64, side=side)
  batched = np.asarray(logits_of(model, tokens, mask))
  for b in range(len(lengths)):
    real = np.flatnonzero(mask[b])
    alone = np.asarray(logits_of(model, tokens[b:b + 1, real]))[0]
    np.testing.assert_allclose(batched[b, real], alone, atol=1e-5)
    np.testing.assert_allclose(
        jax.nn.log_softmax(batched[b, real]), jax.nn.log_softmax(alone), atol=1e-5
    )
  assert np.isfinite(batched).all()  # fully padded query rows too


@pytest.mark.parametrize(
    "overrides", [dict(attention_bias=True), dict(num_kv_heads=1, head_dim=24)]
)
def test_kv_cache_decode_matches_full_forward(overrides):
  config = tiny(**overrides)
  model = build(config, random_params(config, seed=11))
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(12)
  prompt_len, steps, lengths = 5, 4, [5, 3, 1]
  prompt, prompt_mask = padded_batch(rng, lengths, prompt_len, 64, side="left")
  generated = rng.integers(0, 64, (3, steps)).astype(np.int32)
  generated_mask = np.ones((3, steps), np.int32)
  generated_mask[0, 1] = 0  # a row may skip a step (e.g. finished); the cache must not count it
  tokens = np.concatenate([prompt, generated], axis=1)
  mask = np.concatenate([prompt_mask, generated_mask], axis=1)
  full = np.asarray(logits_of(model, tokens, mask))

  cache = model.init_cache(3, prompt_len + steps + 3)
  assert isinstance(cache, KVCache)
  assert cache.keys[0].shape == (3, config.num_kv_heads, prompt_len + steps + 3, config.head_dim)
  logits, cache = _jit_cached(graphdef, state, prompt, prompt_mask, cache)
  real = prompt_mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[real], full[:, :prompt_len][real], atol=1e-5)
  np.testing.assert_array_equal(cache.next_position_B, lengths)
  traces_before_steps = len(_CACHED_TRACES)
  for i in range(steps):
    step = slice(prompt_len + i, prompt_len + i + 1)
    logits, cache = _jit_cached(graphdef, state, tokens[:, step], mask[:, step], cache)
    real = mask[:, step].astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], full[:, step][real], atol=1e-5)
  assert int(cache.index) == prompt_len + steps
  np.testing.assert_array_equal(cache.next_position_B, mask.sum(axis=1))
  np.testing.assert_array_equal(cache.mask_BxS[:, : prompt_len + steps], mask.astype(bool))
  assert len(_CACHED_TRACES) - traces_before_steps <= 1  # all steps share one compilation


def test_kv_cache_chunked_prefill_and_explicit_positions():
  """Two prefill chunks equal one; explicit positions equal the defaults they reproduce."""
  config = tiny()
  model = build(config, random_params(config, seed=13))
  tokens, mask = padded_batch(np.random.default_rng(14), [6, 2], 6, 64, side="left")
  full = np.asarray(logits_of(model, tokens, mask))
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  cache = model.init_cache(2, 8)
  first, cache = apply(_cached_logits, model, tokens[:, :3], mask[:, :3], positions[:, :3], cache)
  second, cache = apply(_cached_logits, model, tokens[:, 3:], mask[:, 3:], positions[:, 3:], cache)
  chunked = np.concatenate([first, second], axis=1)
  np.testing.assert_allclose(chunked[mask == 1], full[mask == 1], atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Components
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, factor", [("llama3_1_8b", 8.0), ("llama3_2_1b", 32.0)])
def test_llama3_scaled_frequencies_match_published_formula(name, factor):
  config = get_config(name)
  base = 1.0 / config.rope_theta ** (np.arange(0, config.head_dim, 2) / config.head_dim)
  expected = np_llama3_scaling_loop(base, config.rope_scaling)
  np.testing.assert_allclose(llama3_scale_frequencies(base, config.rope_scaling), expected,
                             rtol=1e-12)
  got = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # All three regimes occur, so the test would see a wrong branch.
  assert np.any(got == np.float32(base)) and np.any(np.isclose(got, base / factor, rtol=1e-6))
  medium = ~np.isclose(got, base, rtol=1e-6) & ~np.isclose(got, base / factor, rtol=1e-6)
  assert medium.any()


def test_rope_matches_complex_reference_and_is_relative():
  rng = np.random.default_rng(15)
  dh = 16
  inv_freq = inverse_frequencies(dh, 10_000.0)
  np.testing.assert_allclose(inv_freq, 10_000.0 ** (-np.arange(0, dh, 2) / dh), rtol=1e-6)
  x = rng.standard_normal((2, 5, 3, dh)).astype(np.float32)
  positions = rng.integers(0, 1000, (2, 5))
  got = np.asarray(apply_rope(jnp.asarray(x), *rotary_cos_sin(jnp.asarray(positions), inv_freq)))
  expected = np_rope_complex(x.astype(np.float64), positions.astype(np.float64), inv_freq)
  np.testing.assert_allclose(got, expected, atol=2e-4)
  # <R_p q, R_s k> depends only on p - s.
  q, k = x[:1, :1], x[1:, :1]

  def dot(p, s):
    rq = apply_rope(jnp.asarray(q), *rotary_cos_sin(jnp.array([[p]]), inv_freq))
    rk = apply_rope(jnp.asarray(k), *rotary_cos_sin(jnp.array([[s]]), inv_freq))
    return float(jnp.sum(rq * rk))

  np.testing.assert_allclose(dot(7, 3), dot(104, 100), rtol=1e-4)


def test_rms_norm_matches_numpy():
  rng = np.random.default_rng(16)
  with nnx.use_eager_sharding(False):
    norm = RMSNorm(8, eps=1e-6, rngs=nnx.Rngs(0))
  scale = rng.standard_normal(8).astype(np.float32)
  norm.scale[...] = jnp.asarray(scale)
  x = rng.standard_normal((3, 4, 8)).astype(np.float32) * 5
  expected = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + 1e-6) * scale
  np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)
  assert norm(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("x_shape,kernel_shape,num_contract", [
    ((3, 5, 8), (8, 6), 1),            # MLP / LM head
    ((3, 5, 8), (8, 2, 4), 1),         # D -> (H, Dh)
    ((3, 5, 2, 4), (2, 4, 8), 2),      # (H, Dh) -> D
    ((8,), (8, 6), 1),                 # no leading axes
])
def test_flat_matmul_equals_tensordot_with_its_gradients(x_shape, kernel_shape, num_contract):
  rng = np.random.default_rng(18)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal(kernel_shape), jnp.float32)
  y = flat_matmul(x, kernel, num_contract)
  expected = np.tensordot(np.float64(x), np.float64(kernel), num_contract)
  assert y.shape == expected.shape
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  cotangent = jnp.asarray(rng.standard_normal(expected.shape), jnp.float32)
  grads = jax.grad(lambda a, b: jnp.sum(flat_matmul(a, b, num_contract) * cotangent),
                   argnums=(0, 1))(x, kernel)
  expected_grads = jax.grad(lambda a, b: jnp.sum(jnp.tensordot(a, b, num_contract) * cotangent),
                            argnums=(0, 1))(x, kernel)
  for got, want in zip(grads, expected_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_swiglu_equals_autodiff_of_silu_times_up(dtype, tol):
  rng = np.random.default_rng(18)
  gate, up, cotangent = (jnp.asarray(rng.standard_normal((3, 5, 16)) * 4, dtype) for _ in range(3))

  def plain(g, u):
    return jax.nn.silu(g) * u

  np.testing.assert_array_equal(np.asarray(swiglu(gate, up), np.float32),
                                np.asarray(plain(gate, up), np.float32))
  # The reference gradient in float64 numpy: d silu(g) / dg = s (1 + g (1 - s)).
  g, u, c = (np.asarray(a, np.float64) for a in (gate, up, cotangent))
  s = 1.0 / (1.0 + np.exp(-g))
  got = jax.vjp(swiglu, gate, up)[1](cotangent)
  np.testing.assert_array_equal(  # forward mode works too
      np.asarray(jax.jvp(swiglu, (gate, up), (cotangent, cotangent))[1], np.float32),
      np.asarray(jax.jvp(plain, (gate, up), (cotangent, cotangent))[1], np.float32))
  auto = jax.vjp(plain, gate, up)[1](cotangent)
  for got_i, auto_i, want in zip(got, auto, (c * u * s * (1 + g * (1 - s)), c * g * s)):
    assert got_i.dtype == dtype
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(got_i, np.float64) / scale, want / scale, atol=tol)
    np.testing.assert_allclose(np.asarray(auto_i, np.float64) / scale, want / scale, atol=tol)


def test_swiglu_backward_keeps_only_gate_and_up():
  """The saved residuals are the two inputs: no sigmoid or silu array is stored."""
  gate, up = jnp.ones((2, 8)), jnp.ones((2, 8))
  residuals = jax.vjp(swiglu, gate, up)[1]
  saved = [leaf for leaf in jax.tree.leaves(residuals) if hasattr(leaf, "shape")]
  assert len(saved) == 2 and all(leaf.shape == (2, 8) for leaf in saved)


def test_flat_matmul_rejects_mismatched_axes():
  with pytest.raises(ValueError, match=r"input trailing axes \(3, 8\).*contracted axes \(2, 4\)"):
    flat_matmul(jnp.zeros((5, 3, 8)), jnp.zeros((2, 4, 8)), 2)


# ------------------------------------------------------------------------------------------------
# Heads, dtypes, input validation
# ------------------------------------------------------------------------------------------------


def test_scores_and_last_token_scores():
  config = tiny()
  params = random_params(config, seed=17, score_head=True)
  model = build(config, params, score_head=True)
  tokens, mask = padded_batch(np.random.default_rng(18), [5, 2, 4], 5, 64, side="right")
  mask[2] = [0, 1, 1, 1, 1]  # left padded row in the same batch
  scores, h = apply(
      lambda m, t, msk: (
          m.scores(t, attention_mask_BxT=msk),
          m.hidden_states(t, attention_mask_BxT=msk),
      ),
      model, tokens, mask,
  )
  w, bias = params["score_head"]["kernel"], params["score_head"]["bias"]
  assert scores.shape == (3, 5) and scores.dtype == jnp.float32
  np.testing.assert_allclose(scores, (np.asarray(h) @ w)[..., 0] + bias, atol=1e-5)
  rewards = last_token_scores(scores, jnp.asarray(mask))
  expected = [scores[b, np.flatnonzero(mask[b])[-1]] for b in range(3)]
  np.testing.assert_allclose(rewards, expected)
  np.testing.assert_array_equal(
      last_token_scores(jnp.ones((2, 3)), jnp.array([[0, 0, 0], [0, 1, 0]])), [0.0, 1.0]
  )
  # A mask longer than the scores would index past the end (clamped silently by JAX): an error.
  with pytest.raises(ValueError, match="mask_BxT"):
    last_token_scores(jnp.ones((2, 3)), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="mask_BxT"):
    last_token_scores(jnp.ones((3,)), jnp.ones((3,)))
  with pytest.raises(ValueError, match="score_head"):
    build(config, random_params(config, seed=17)).scores(jnp.asarray(tokens))


def test_scores_are_float32_in_a_bfloat16_model():
  """The score head reads bfloat16 hidden states out in float32 (kernel and product)."""
  config = tiny(dtype="bfloat16")
  params = random_params(config, seed=21, score_head=True)
  model = build(config, params, score_head=True)
  tokens, mask = padded_batch(np.random.default_rng(22), [5, 3], 5, 64, side="left")
  scores, h = apply(
      lambda m, t, msk: (
          m.scores(t, attention_mask_BxT=msk),
          m.hidden_states(t, attention_mask_BxT=msk),
      ),
      model, tokens, mask,
  )
  assert h.dtype == jnp.bfloat16 and scores.dtype == jnp.float32
  w, bias = params["score_head"]["kernel"], params["score_head"]["bias"]
  expected = (np.asarray(h, np.float64) @ np.float64(w))[..., 0] + bias
  np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie_embeddings", [False, True])  # lm_head / transposed embedding
def test_bfloat16_compute_is_close_to_float32(tie_embeddings):
  config = tiny(tie_embeddings=tie_embeddings)
  params = random_params(config, seed=19)
  tokens, mask = padded_batch(np.random.default_rng(20), [6, 3], 6, 64, side="left")
  logits32 = np.asarray(logits_of(build(config, params), tokens, mask))
  bf16_model = build(dataclasses.replace(config, dtype="bfloat16"), params)
  logits16, h16 = apply(_logits_and_hidden, bf16_model, tokens, mask)
  assert logits16.dtype == jnp.float32 and h16.dtype == jnp.bfloat16
  assert bf16_model.embed_tokens.embedding[...].dtype == jnp.float32  # params stay float32
  real = mask.astype(bool)
  err = np.abs(np.asarray(logits16) - logits32)[real].max()
  # bfloat16 has 8 mantissa bits (relative rounding 2^-9 ~ 0.2%); allow a few percent overall.
  assert err < 0.05 * np.abs(logits32[real]).max(), err
  assert err > 0  # the bfloat16 path was really taken


def test_rejects_bad_inputs():
  model = build(TINY, random_params(TINY, seed=0))
  with pytest.raises(ValueError, match="tokens_BxT"):
    model(jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="attention_mask_BxT"):
    model(jnp.zeros((2, 4), jnp.int32), attention_mask_BxT=jnp.ones((2, 5)))
  with pytest.raises(ValueError, match="cache"):
    model(jnp.zeros((2, 4), jnp.int32), cache=model.init_cache(3, 8))
