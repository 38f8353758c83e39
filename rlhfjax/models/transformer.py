"""The Llama-family decoder (Llama 2/3, Qwen2.5) as a Flax NNX module, with a KV-cache path.

Parameter paths and shapes follow the HF checkpoints (`layers.<i>.self_attn.q_proj.kernel`, ...),
with the head axis split out of the attention kernels ((D, H, Dh) rather than (D, H Dh)) so that
sharding rules and per-head optimisers (Adam-mini) can name it. Logical axis names used:
'vocab', 'embed', 'norm', 'q_heads', 'kv_heads', 'head_dim', 'mlp', and None.

With `config.scan_layers` the blocks are one `DecoderBlock` whose parameters carry a leading
'layers' axis (L), created with `nnx.vmap` and run with `jax.lax.scan` over its split state; the
KV cache is then stacked [L, B, K, S, Dh]. `stack_layers` / `unstack_layers` convert parameter
dicts between the layouts. `config.remat` wraps each block in `jax.checkpoint` with the named
`jax.checkpoint_policies` policy. Measured (train step, compiled temp bytes): remat "full" cuts
activation memory both ways on an H100 (1B-wide, 8 layers, 4 x 1024 tokens: 6.2 -> 1.6 GB
unrolled, 13.1 -> 0.6 GB scanned), but on XLA:CPU only under scan (the unrolled schedule
recomputes every block up front). Without remat a scanned stack keeps more residuals than an
unrolled one (13.1 vs 6.2 GB above): scan pairs best with remat.

Calling conventions shared by every entry point:
- `attention_mask_BxT` marks real tokens (1) against padding (0); default all real.
- `positions_BxT` default to `cumsum(mask) - 1` clipped at 0 (continuing from the cache's
  `next_position_B` when a cache is given), so left- and right-padded rows get the positions of
  their unpadded versions.
- Attention is causal over token slots and never sees padded keys; padded queries produce finite
  but meaningless outputs, which callers mask.

References: Llama 2 (arXiv 2307.09288), Llama 3 (arXiv 2407.21783), Qwen2 (arXiv 2407.10671).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rlhfjax.models.attention import Attention, attention_mask
from rlhfjax.models.cache import KVCache, init_kv_cache
from rlhfjax.models.configs import TransformerConfig
from rlhfjax.models.layers import MLP, DenseGeneral, Embed, RMSNorm, flat_matmul
from rlhfjax.models.rope import inverse_frequencies, rotary_cos_sin


def default_positions(mask_BxT: jax.Array, start_B: jax.Array | None = None) -> jax.Array:
  """Rotary positions `start + cumsum(mask) - 1`, clipped at 0 (so leading padding gets 0).

  Args:
    mask_BxT: 1 for real tokens, 0 for padding.
    start_B: position of each row's first real token (the cache's `next_position_B`); default 0.

  Returns:
    positions_BxT int32.
  """
  positions_BxT = jnp.cumsum(mask_BxT.astype(jnp.int32), axis=1) - 1
  if start_B is not None:
    positions_BxT = positions_BxT + start_B[:, None]
  return jnp.maximum(positions_BxT, 0)


# `TransformerConfig.remat` -> (whether to rematerialise, the `jax.checkpoint` policy).
_REMAT_POLICIES = {
    "none": (False, None),
    "full": (True, None),
    "dots_saveable": (True, jax.checkpoint_policies.dots_saveable),
    "dots_with_no_batch_dims_saveable": (
        True, jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
    "nothing_saveable": (True, jax.checkpoint_policies.nothing_saveable),
}
# Transform metadata of the stacked axis: `nnx.vmap` adds the logical name, the scan body strips it.
_LAYERS_METADATA = {nnx.PARTITION_NAME: "layers"}


def _block_fn(graphdef: nnx.GraphDef, remat: str, *, prevent_cse: bool, static_kwargs: dict):
  """`fn(block_state, x, kv_cache, attention_kwargs)` running one block, rematerialised per `remat`.

  A pure function of the block's state (`nnx.split`), so that `jax.checkpoint` and `jax.lax.scan`
  apply directly; NNX's own transforms would refuse a model merged outside an enclosing JAX loop
  (the sampler's `while_loop`).

  Args:
    graphdef: the block's structure.
    remat: a `TransformerConfig.remat` name.
    prevent_cse: passed to `jax.checkpoint`; False under `scan`, where the loop already keeps XLA
      from merging the recomputation into the forward pass.
    static_kwargs: attention keywords that are Python values, not arrays (`shared_prefix`).
  """
  def call(block_state, x_BxTxD, kv_cache, attention_kwargs):
    block = nnx.merge(graphdef, block_state)
    return block(x_BxTxD, kv_cache=kv_cache, **attention_kwargs, **static_kwargs)

  enabled, policy = _REMAT_POLICIES[remat]
  return jax.checkpoint(call, policy=policy, prevent_cse=prevent_cse) if enabled else call


class DecoderBlock(nnx.Module):
  """Pre-norm block: `x += attn(norm(x)); x += mlp(norm(x))`."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    self.input_layernorm = RMSNorm(
        c.hidden_size, eps=c.rms_norm_eps, param_dtype=param_dtype, rngs=rngs
    )
    self.self_attn = Attention(
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        use_bias=c.attention_bias,
        impl=c.attention_impl,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )
    self.post_attention_layernorm = RMSNorm(
        c.hidden_size, eps=c.rms_norm_eps, param_dtype=param_dtype, rngs=rngs
    )
    self.mlp = MLP(c.hidden_size, c.mlp_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_BxTxD: jax.Array, **attention_kwargs):
    """Returns (x_BxTxD, updated layer kv cache or None); kwargs go to `Attention`."""
    y_BxTxD, kv_cache = self.self_attn(self.input_layernorm(x_BxTxD), **attention_kwargs)
    x_BxTxD = x_BxTxD + y_BxTxD
    x_BxTxD = x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD))
    return x_BxTxD, kv_cache


class Transformer(nnx.Module):
  """Decoder-only language model with optional tied embeddings and a scalar score head.

  Entry points: `__call__` (tokens -> float32 logits), `hidden_states` (after the final norm),
  `scores` (per-token scalar from the score head), `embed` + `forward_embeddings` (logits as a
  function of input embeddings), `init_cache` and the `cache=` argument for incremental decoding.

  Parameters carry logical axis names only. Flax shards annotated variables eagerly by default,
  which needs a mesh and logical rules; construct under `with nnx.use_eager_sharding(False):`
  (e.g. inside `jax.eval_shape` / `jax.jit(out_shardings=...)`) and let `rlhfjax.sharding` place
  the parameters.

  Attributes:
    config: the `TransformerConfig`.
    embed_tokens: token embedding [V, D].
    layers: `nnx.List` of `DecoderBlock`, or one `DecoderBlock` with stacked [L, ...] parameters
      when `config.scan_layers`.
    norm: final RMSNorm.
    lm_head: output projection [D, V], only when `config.tie_embeddings` is False.
    score_head: [D, 1] kernel and [1] bias, only when constructed with `score_head=True`.
  """

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs, score_head: bool = False):
    c = config
    self.config = c
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    self.embed_tokens = Embed(
        c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    if c.scan_layers:

      @nnx.split_rngs(splits=c.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_LAYERS_METADATA)
      def stacked_blocks(rngs):
        return DecoderBlock(c, rngs=rngs)

      self.layers = stacked_blocks(rngs)
    else:
      self.layers = nnx.List([DecoderBlock(c, rngs=rngs) for _ in range(c.num_layers)])
    self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    if not c.tie_embeddings:
      self.lm_head = DenseGeneral(
          (c.hidden_size,),
          (c.vocab_size,),
          kernel_axes=("embed", "vocab"),
          dtype=dtype,
          param_dtype=param_dtype,
          rngs=rngs,
      )
    self.has_score_head = score_head
    if score_head:
      # Scores are read out in float32: they are compared across sequences (rewards, values).
      self.score_head = DenseGeneral(
          (c.hidden_size,),
          (1,),
          kernel_axes=("embed", None),
          use_bias=True,
          dtype=jnp.float32,
          param_dtype=param_dtype,
          rngs=rngs,
      )

  # -- pieces ------------------------------------------------------------------------------------

  def embed(self, tokens_BxT: jax.Array) -> jax.Array:
    """Input embeddings x_BxTxD (compute dtype) of integer tokens."""
    _check_tokens(tokens_BxT)
    return self.embed_tokens(tokens_BxT)

  def unembed(self, h_BxTxD: jax.Array) -> jax.Array:
    """Logits `h W_out` [B, T, V] in float32, W_out = `lm_head` or the transposed embedding."""
    if self.config.tie_embeddings:
      return self.embed_tokens.attend(h_BxTxD)
    dtype = jnp.dtype(self.config.dtype)
    return flat_matmul(h_BxTxD.astype(dtype), self.lm_head.kernel[...].astype(dtype), 1,
                       preferred_element_type=jnp.float32)

  def trunk(
      self,
      x_BxTxD: jax.Array,
      *,
      attention_mask_BxT: jax.Array | None = None,
      positions_BxT: jax.Array | None = None,
      cache: KVCache | None = None,
      shared_prefix: tuple[int, int] | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Runs the decoder blocks and the final norm on input embeddings.

    Without a cache, the T tokens attend to each other. With a cache, their keys and values are
    written at slots `cache.index .. cache.index + T - 1` and they attend to every filled slot;
    this serves both the prefill of a (left-padded) prompt and single-token steps.

    Args:
      x_BxTxD: input embeddings.
      attention_mask_BxT: 1 real, 0 padding; default all ones.
      positions_BxT: rotary positions; default `default_positions` (continuing the cache).
      cache: optional `KVCache` with at least `cache.index + T` slots. The slot count is static
        and writes past it are clamped by `dynamic_update_slice`, so size the cache for the prompt
        plus every generated token.
      shared_prefix: (Tp, Tr) for rows of packed continuations of a shared prefix (no cache):
        columns Tp + (g - 1) Tr .. Tp + g Tr - 1 are continuation g, which sees the Tp-column
        prefix and itself only (`attention.shared_prefix_attention`, block by block); pass each
        token's own `positions_BxT` with it.

    Returns:
      (h_BxTxD after the final norm, updated cache or None).
    """
    b, t = x_BxTxD.shape[:2]
    if attention_mask_BxT is None:
      attention_mask_BxT = jnp.ones((b, t), bool)
    _check_shape("attention_mask_BxT", attention_mask_BxT, (b, t))
    attention_mask_BxT = attention_mask_BxT.astype(bool)
    if positions_BxT is not None:
      _check_shape("positions_BxT", positions_BxT, (b, t))
    inv_freq = inverse_frequencies(
        self.config.head_dim, self.config.rope_theta, self.config.rope_scaling
    )
    query_slots_T = jnp.arange(t, dtype=jnp.int32)

    if cache is None:
      if positions_BxT is None:
        positions_BxT = default_positions(attention_mask_BxT)
      mask_BxTxS = attention_mask(query_slots_T, query_slots_T, attention_mask_BxT)
      kv_caches = None
      cache_index = None
    else:
      if shared_prefix is not None:
        raise ValueError("shared_prefix is for cache-free forward passes; decode packed "
                         "continuations as separate rows")
      num_layers = self.config.num_layers
      if cache.mask_BxS.shape[0] != b or len(cache.keys) != num_layers:
        raise ValueError(
            f"cache holds batch {cache.mask_BxS.shape[0]} and {len(cache.keys)} layers; the "
            f"inputs have batch {b} and the model {num_layers} layers"
        )
      if cache.stacked != self.config.scan_layers:
        raise ValueError(
            f"cache keys are {'stacked' if cache.stacked else 'per-layer'} but the model has "
            f"scan_layers={self.config.scan_layers}; build the cache with model.init_cache"
        )
      if t > cache.max_len:
        raise ValueError(f"{t} new tokens do not fit a cache of {cache.max_len} slots")
      if positions_BxT is None:
        positions_BxT = default_positions(attention_mask_BxT, cache.next_position_B)
      cache_index = cache.index
      key_mask_BxS = jax.lax.dynamic_update_slice(
          cache.mask_BxS, attention_mask_BxT, (0, cache_index)
      )
      key_slots_S = jnp.arange(cache.max_len, dtype=jnp.int32)
      mask_BxTxS = attention_mask(cache_index + query_slots_T, key_slots_S, key_mask_BxS)
      kv_caches = (cache.keys, cache.values)

    attention_kwargs = dict(
        rotary=rotary_cos_sin(positions_BxT, inv_freq), mask_BxTxS=mask_BxTxS,
        cache_index=cache_index,
    )
    static_kwargs = {"shared_prefix": None if shared_prefix is None else tuple(shared_prefix)}
    if self.config.scan_layers:
      x_BxTxD, new_kv_caches = self._scan_blocks(x_BxTxD, kv_caches, attention_kwargs,
                                                 static_kwargs)
    else:
      x_BxTxD, new_kv_caches = self._loop_blocks(x_BxTxD, kv_caches, attention_kwargs,
                                                 static_kwargs)
    h_BxTxD = self.norm(x_BxTxD)

    if cache is None:
      return h_BxTxD, None
    # Next position: one past the last real token of this call, or unchanged if it had none.
    seen_B = jnp.max(jnp.where(attention_mask_BxT, positions_BxT + 1, 0), axis=1)
    new_cache = KVCache(
        keys=new_kv_caches[0],
        values=new_kv_caches[1],
        mask_BxS=key_mask_BxS,
        next_position_B=jnp.maximum(cache.next_position_B, seen_B.astype(jnp.int32)),
        index=cache.index + t,
    )
    return h_BxTxD, new_cache

  def _loop_blocks(self, x_BxTxD, kv_caches, attention_kwargs, static_kwargs):
    """Runs the unrolled blocks; kv_caches is (keys, values) tuples of per-layer arrays or None.

    Returns:
      (x_BxTxD, (keys, values) tuples or None).
    """
    new_keys, new_values = [], []
    for i, layer in enumerate(self.layers):
      kv_cache = None if kv_caches is None else (kv_caches[0][i], kv_caches[1][i])
      if self.config.remat == "none":
        x_BxTxD, kv_cache = layer(x_BxTxD, kv_cache=kv_cache, **attention_kwargs, **static_kwargs)
      else:
        graphdef, state = nnx.split(layer)
        block_fn = _block_fn(graphdef, self.config.remat, prevent_cse=True,
                             static_kwargs=static_kwargs)
        x_BxTxD, kv_cache = block_fn(state, x_BxTxD, kv_cache, attention_kwargs)
      if kv_cache is not None:
        new_keys.append(kv_cache[0])
        new_values.append(kv_cache[1])
    return x_BxTxD, (None if kv_caches is None else (tuple(new_keys), tuple(new_values)))

  def _scan_blocks(self, x_BxTxD, kv_caches, attention_kwargs, static_kwargs):
    """Scans the stacked block over its 'layers' axis; kv_caches is stacked (keys, values) or None.

    Returns:
      (x_BxTxD, stacked (keys_LxBxKxSxDh, values_LxBxKxSxDh) or None).
    """
    graphdef, stacked_state = nnx.split(self.layers)
    block_fn = _block_fn(graphdef, self.config.remat, prevent_cse=False,
                         static_kwargs=static_kwargs)

    def body(x_BxTxD, layer_inputs):
      block_state, kv_cache = layer_inputs
      # The slice of one layer: drop the 'layers' name from the variables' logical axes.
      block_state = nnx.spmd.remove_axis(block_state, 0, _LAYERS_METADATA)
      return block_fn(block_state, x_BxTxD, kv_cache, attention_kwargs)

    return jax.lax.scan(body, x_BxTxD, (stacked_state, kv_caches))

  # -- public entry points -----------------------------------------------------------------------

  def forward_embeddings(
      self,
      x_BxTxD: jax.Array,
      *,
      attention_mask_BxT: jax.Array | None = None,
      positions_BxT: jax.Array | None = None,
      cache: KVCache | None = None,
  ):
    """Logits from input embeddings (e.g. `embed(tokens)`, or soft prompts).

    Returns:
      logits_BxTxV float32, or (logits_BxTxV, new_cache) when `cache` is given.
    """
    h_BxTxD, new_cache = self.trunk(
        x_BxTxD, attention_mask_BxT=attention_mask_BxT, positions_BxT=positions_BxT, cache=cache
    )
    logits_BxTxV = self.unembed(h_BxTxD)
    return logits_BxTxV if cache is None else (logits_BxTxV, new_cache)

  def __call__(
      self,
      tokens_BxT: jax.Array,
      *,
      attention_mask_BxT: jax.Array | None = None,
      positions_BxT: jax.Array | None = None,
      cache: KVCache | None = None,
  ):
    """Next-token logits: `logits[b, t]` scores the token following `tokens[b, t]`.

    Args:
      tokens_BxT: integer tokens.
      attention_mask_BxT: 1 real, 0 padding; default all ones.
      positions_BxT: rotary positions; default `cumsum(mask) - 1` clipped at 0, continuing from
        `cache.next_position_B` when a cache is given.
      cache: optional `KVCache` (see `trunk`); prefill and decode steps both pass one.

    Returns:
      logits_BxTxV float32, or (logits_BxTxV, new_cache) when `cache` is given.
    """
    return self.forward_embeddings(
        self.embed(tokens_BxT),
        attention_mask_BxT=attention_mask_BxT,
        positions_BxT=positions_BxT,
        cache=cache,
    )

  def hidden_states(
      self,
      tokens_BxT: jax.Array,
      *,
      attention_mask_BxT: jax.Array | None = None,
      positions_BxT: jax.Array | None = None,
      shared_prefix: tuple[int, int] | None = None,
  ) -> jax.Array:
    """Final-norm hidden states h_BxTxD (compute dtype), the input of the output heads
    (`shared_prefix`: packed continuations of a shared prefix, see `trunk`)."""
    h_BxTxD, _ = self.trunk(
        self.embed(tokens_BxT), attention_mask_BxT=attention_mask_BxT, positions_BxT=positions_BxT,
        shared_prefix=shared_prefix,
    )
    return h_BxTxD

  def scores(
      self,
      tokens_BxT: jax.Array,
      *,
      attention_mask_BxT: jax.Array | None = None,
      positions_BxT: jax.Array | None = None,
  ) -> jax.Array:
    """Per-token scalar `s_t = w . h_t + b` from the score head, float32 [B, T].

    A value model reads every position; a reward model reads the last real token
    (`last_token_scores`).
    """
    if not self.has_score_head:
      raise ValueError("scores() needs a model constructed with score_head=True")
    h_BxTxD = self.hidden_states(
        tokens_BxT, attention_mask_BxT=attention_mask_BxT, positions_BxT=positions_BxT
    )
    return self.score_head(h_BxTxD)[..., 0]

  def init_cache(self, batch_size: int, max_len: int, *, dtype=None) -> KVCache:
    """An empty `KVCache` of `max_len` slots (keys/values in `dtype`, default compute dtype).

    Keys and values are per-layer tuples, or stacked [L, B, K, S, Dh] when `config.scan_layers`.
    """
    c = self.config
    return init_kv_cache(
        num_layers=c.num_layers,
        batch_size=batch_size,
        max_len=max_len,
        num_kv_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        dtype=jnp.dtype(c.dtype if dtype is None else dtype),
        stacked=c.scan_layers,
    )


def stack_layers(params: dict[str, Any]) -> dict[str, Any]:
  """Unscanned params (`params["layers"][i]...`) -> scanned ones (`params["layers"]...`, [L, ...]).

  Works on pure params dicts (`nnx.state(model, nnx.Param).to_pure_dict()`, or the train code's
  params); jit it with the scanned model's shardings as `out_shardings` to stack on the mesh.

  Args:
    params: a pure params dict of a model with `scan_layers=False`.

  Returns:
    The params of the same model with `scan_layers=True`; other entries are the same arrays.

  Raises:
    ValueError: if `params["layers"]` is not keyed by the layer indices 0 .. L-1.
  """
  layers = params["layers"]
  if not (isinstance(layers, Mapping) and layers
          and sorted(layers) == list(range(len(layers)))):
    raise ValueError("stack_layers needs params['layers'] keyed by layer indices 0 .. L-1 (the "
                     "unscanned layout)")
  blocks = [layers[i] for i in range(len(layers))]
  return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
  """Scanned params (stacked [L, ...] under `params["layers"]`) -> unscanned, the inverse of
  `stack_layers`.

  Raises:
    ValueError: if `params["layers"]` is already in the unscanned layout.
  """
  layers = params["layers"]
  if isinstance(layers, Mapping) and layers and all(isinstance(k, int) for k in layers):
    raise ValueError("unstack_layers needs stacked params['layers'] (the scanned layout)")
  num_layers = {x.shape[0] for x in jax.tree.leaves(layers)}
  if len(num_layers) != 1:
    raise ValueError(f"stacked params disagree on the number of layers: {sorted(num_layers)}")
  (n,) = num_layers
  return {**params, "layers": {i: jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n)}}


def _check_tokens(tokens_BxT: jax.Array) -> None:
  if tokens_BxT.ndim != 2 or not jnp.issubdtype(tokens_BxT.dtype, jnp.integer):
    raise ValueError(
        f"tokens_BxT must be a [B, T] integer array, got {tokens_BxT.dtype}{tokens_BxT.shape}"
    )


def _check_shape(name: str, x: jax.Array, shape: tuple[int, ...]) -> None:
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")
