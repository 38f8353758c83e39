"""Jit-compiled batched decoding with a KV cache.

Prompts are left-padded [B, Tp]; one prefill fills each model's cache, then a `lax.while_loop`
decodes one token per step until every row has emitted EOS or `max_new_tokens` is reached.
Responses come back right-padded [B, max_new_tokens], EOS included in the mask, in the layout the
data pipeline uses (prompt left-padded + response right-padded).

Several models can be decoded together, their logits combined as a geometric mixture (DeRa,
Nash-MD). Model 0 is "the policy": `logprobs` are its untempered log-probabilities of the sampled
tokens (what PPO-style ratios need) and `entropies` the entropies of its untempered next-token
distributions; `sampling_logprobs` are the log-probabilities under the distribution actually
sampled from (after mixing, temperature, top-k, top-p).

The sampler is compiled with `rlhfjax.xla_options.compiler_options()` (on CPU, without XLA's
YNNPACK dot fusions, 3-5x slower than XLA's own dots on the decode step's few-row matmuls).

Shapes and settings are static: calls with the same (bucketed) prompt shape reuse one compilation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rlhfjax import xla_options
from rlhfjax.models.cache import repeat_cache
from rlhfjax.sampling import processors as procs


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static decoding settings.

  Attributes:
    max_new_tokens: response length (slots); generation stops earlier when all rows hit EOS.
    eos_id: end-of-sequence token; a row stops after emitting it.
    pad_id: token written after a row has stopped.
    temperature: 0 for greedy decoding, else the softmax temperature.
    top_k: keep the k most likely tokens (0 = off).
    top_p: nucleus mass (1.0 = off).
    mixture_weights: one weight per model for the geometric mixture; None for a single model.
  """
  max_new_tokens: int
  eos_id: int
  pad_id: int = 0
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  mixture_weights: tuple[float, ...] | None = None

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  def processor(self) -> procs.Processor:
    chain = []
    if not self.greedy and self.temperature != 1.0:
      chain.append(procs.temperature(self.temperature))
    if self.top_k:
      chain.append(procs.top_k(self.top_k))
    if self.top_p < 1.0:
      chain.append(procs.top_p(self.top_p))
    return procs.compose(*chain)


class SampleOutput(NamedTuple):
  """Decoded responses, right-padded.

  Attributes:
    tokens_BxTr: sampled tokens, `pad_id` after EOS.
    mask_BxTr: 1 for generated tokens up to and including EOS.
    logprobs_BxTr: the policy's (model 0) untempered log-probabilities of the tokens; 0 on padding.
    sampling_logprobs_BxTr: log-probabilities under the distribution sampled from; 0 on padding.
    lengths_B: number of generated tokens (EOS included).
    entropies_BxTr: entropy of the policy's untempered next-token distribution at each generated
      token; 0 on padding (None where the responses did not come from the sampler).
  """
  tokens_BxTr: jax.Array
  mask_BxTr: jax.Array
  logprobs_BxTr: jax.Array
  sampling_logprobs_BxTr: jax.Array
  lengths_B: jax.Array
  entropies_BxTr: jax.Array | None = None


def _log_softmax_at(logits_BxV, token_B):
  logp = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, token_B[:, None], axis=-1)[:, 0]


def _entropy(logits_BxV):
  """Entropy of softmax(logits) per row, float32 (`losses.entropy_from_logits` for one step)."""
  logp = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * jnp.where(jnp.isfinite(logp), logp, 0.0), axis=-1)


def first_argmax(x_BxV: jax.Array) -> jax.Array:
  """`jnp.argmax(x, -1)` (first index on ties) as two plain reductions, which XLA:CPU runs about
  twice as fast as its variadic (value, index) argmax reduce."""
  v = x_BxV.shape[-1]
  at_max_BxV = x_BxV == jnp.max(x_BxV, axis=-1, keepdims=True)
  return jnp.min(jnp.where(at_max_BxV, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def draw(key: jax.Array, logits_BxV: jax.Array) -> jax.Array:
  """A token per row from softmax(logits): the Gumbel-max draw of `jax.random.categorical` (same
  key, same tokens) with `first_argmax`."""
  gumbel_BxV = jax.random.gumbel(key, logits_BxV.shape, jnp.float32)
  return first_argmax(logits_BxV.astype(jnp.float32) + gumbel_BxV)


def make_sampler(graphdefs: nnx.GraphDef | Sequence[nnx.GraphDef], config: SamplingConfig, *,
                 jit: bool = True, group_size: int = 1):
  """Builds `sample(params, prompt_tokens_PxTp, prompt_mask_PxTp, rng) -> SampleOutput`.

  Args:
    graphdefs: the model structure, or one per model for a mixture (model 0 is the policy).
    config: decoding settings.
    jit: return it jit-compiled (with `xla_options.compiler_options()`); False for a traceable
      function to call inside another jit (compile that one with the same options).
    group_size: G responses per prompt: each prompt is prefilled once and its cache repeated, so
      the B = P G output rows are prompt-major (the G samples of prompt p are rows p*G .. p*G +
      G - 1, as for prompts repeated with `jnp.repeat(prompts, G, axis=0)`).

  Returns:
    The sampling function. `params` is one params pytree, or a sequence matching `graphdefs`.
  """
  if group_size < 1:
    raise ValueError(f"group_size must be >= 1, got {group_size}")
  single = isinstance(graphdefs, nnx.GraphDef)
  graphdefs = (graphdefs,) if single else tuple(graphdefs)
  weights = config.mixture_weights
  if weights is None and len(graphdefs) > 1:
    raise ValueError(f"{len(graphdefs)} models need SamplingConfig.mixture_weights")
  if weights is not None and len(weights) != len(graphdefs):
    raise ValueError(
        f"mixture_weights has {len(weights)} entries for {len(graphdefs)} models")
  process = config.processor()

  def combine(logits):
    return logits[0].astype(jnp.float32) if weights is None else procs.geometric_mixture(
        logits, weights)

  def sample(params, prompt_tokens_PxTp, prompt_mask_PxTp, rng) -> SampleOutput:
    params = (params,) if single else tuple(params)
    models = [nnx.merge(g, p) for g, p in zip(graphdefs, params)]
    prompts, prompt_len = prompt_tokens_PxTp.shape
    batch = prompts * group_size
    max_new = config.max_new_tokens
    caches, last = [], []
    for model in models:
      cache = model.init_cache(prompts, prompt_len + max_new)
      logits, cache = model(prompt_tokens_PxTp, attention_mask_BxT=prompt_mask_PxTp, cache=cache)
      if group_size > 1:
        cache = repeat_cache(cache, group_size)
      caches.append(cache)
      last.append(jnp.repeat(logits[:, -1], group_size, axis=0))

    def cond(carry):
      t, _, _, done, *_ = carry
      return (t < max_new) & ~jnp.all(done)

    def body(carry):
      t, caches, last, done, out, rng = carry
      rng, key = jax.random.split(rng)
      mixed = process(combine(last))
      token = first_argmax(mixed) if config.greedy else draw(key, mixed)
      live = ~done
      token = jnp.where(live, token, config.pad_id)
      out = {
          "tokens": out["tokens"].at[:, t].set(token),
          "mask": out["mask"].at[:, t].set(live.astype(jnp.int32)),
          "logprobs": out["logprobs"].at[:, t].set(
              jnp.where(live, _log_softmax_at(last[0], token), 0.0)),
          "sampling_logprobs": out["sampling_logprobs"].at[:, t].set(
              jnp.where(live, _log_softmax_at(mixed, token), 0.0)),
          "entropies": out["entropies"].at[:, t].set(jnp.where(live, _entropy(last[0]), 0.0)),
      }
      done = done | (token == config.eos_id)
      new_caches, new_last = [], []
      for model, cache in zip(models, caches):
        logits, cache = model(token[:, None], attention_mask_BxT=live[:, None].astype(jnp.int32),
                              cache=cache)
        new_caches.append(cache)
        new_last.append(logits[:, -1])
      return t + 1, new_caches, new_last, done, out, rng

    out = {
        "tokens": jnp.full((batch, max_new), config.pad_id, jnp.int32),
        "mask": jnp.zeros((batch, max_new), jnp.int32),
        "logprobs": jnp.zeros((batch, max_new), jnp.float32),
        "sampling_logprobs": jnp.zeros((batch, max_new), jnp.float32),
        "entropies": jnp.zeros((batch, max_new), jnp.float32),
    }
    init = (jnp.zeros((), jnp.int32), caches, last, jnp.zeros((batch,), bool), out, rng)
    _, _, _, _, out, _ = jax.lax.while_loop(cond, body, init)
    return SampleOutput(out["tokens"], out["mask"], out["logprobs"], out["sampling_logprobs"],
                        out["mask"].sum(axis=-1), out["entropies"])

  return jax.jit(sample, compiler_options=xla_options.compiler_options()) if jit else sample


def to_sequences(prompt_tokens_BxTp: Any, prompt_mask_BxTp: Any,
                 output: SampleOutput) -> dict[str, jax.Array]:
  """Concatenates prompts and responses into the trainers' layout.

  Returns:
    {"tokens", "attention_mask", "loss_mask"} of shape [B, Tp + Tr]; the loss mask covers the
    generated tokens (EOS included).
  """
  prompt_mask = jnp.asarray(prompt_mask_BxTp, jnp.int32)
  return {
      "tokens": jnp.concatenate([jnp.asarray(prompt_tokens_BxTp, jnp.int32), output.tokens_BxTr],
                                axis=1),
      "attention_mask": jnp.concatenate([prompt_mask, output.mask_BxTr], axis=1),
      "loss_mask": jnp.concatenate([jnp.zeros_like(prompt_mask), output.mask_BxTr], axis=1),
  }
