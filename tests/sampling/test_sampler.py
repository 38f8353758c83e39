"""Sampler: log-prob parity with the full forward pass, EOS handling, greedy, processors, no recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.compiles import count_compiles
from rlhfjax.losses.tokens import entropy, entropy_from_logits, token_logprobs
from rlhfjax.models import Transformer, get_config
from rlhfjax.sampling import processors as procs
from rlhfjax.sampling.sampler import (SamplingConfig, draw, first_argmax, make_sampler,
                                      to_sequences)

EOS = 2


def _model(seed=0):
  with nnx.use_eager_sharding(False):
    model = Transformer(get_config("tiny"), rngs=nnx.Rngs(seed))
  return nnx.split(model)


def _prompts():
  # Left-padded prompts of lengths 5, 3 and 1 (pad id 0).
  tokens = np.array([[5, 6, 7, 8, 9], [0, 0, 10, 11, 12], [0, 0, 0, 0, 13]], np.int32)
  return jnp.asarray(tokens), jnp.asarray((tokens != 0).astype(np.int32))


def test_logprobs_equal_full_forward_and_no_recompilation():
  graphdef, params = _model()
  sample = make_sampler(graphdef, SamplingConfig(max_new_tokens=8, eos_id=EOS))
  tokens, mask = _prompts()
  out = sample(params, tokens, mask, jax.random.key(0))
  seqs = to_sequences(tokens, mask, out)
  model = nnx.merge(graphdef, params)
  logits = model(seqs["tokens"], attention_mask_BxT=seqs["attention_mask"])
  full = token_logprobs(logits, seqs["tokens"])[:, tokens.shape[1]:]
  np.testing.assert_allclose(np.where(out.mask_BxTr, full, 0.0), out.logprobs_BxTr, atol=2e-5)
  entropies = entropy(logits)[:, tokens.shape[1]:]
  np.testing.assert_allclose(np.where(out.mask_BxTr, entropies, 0.0), out.entropies_BxTr,
                             atol=2e-5)
  # At temperature 1 without filtering, the sampling distribution is the policy.
  np.testing.assert_allclose(out.sampling_logprobs_BxTr, out.logprobs_BxTr, atol=1e-6)
  with count_compiles() as events:
    jax.block_until_ready(sample(params, tokens, mask, jax.random.key(1)))
  assert events == []


def test_group_sampling_equals_sampling_repeated_prompts():
  """group_size=G prefills each prompt once and repeats its cache: the same tokens, log-probs and
  entropies as sampling the prompts repeated G times, with the same key."""
  graphdef, params = _model()
  tokens, mask = _prompts()
  config = SamplingConfig(max_new_tokens=6, eos_id=EOS)
  grouped = make_sampler(graphdef, config, group_size=3)(params, tokens, mask, jax.random.key(2))
  repeated = make_sampler(graphdef, config)(params, jnp.repeat(tokens, 3, axis=0),
                                            jnp.repeat(mask, 3, axis=0), jax.random.key(2))
  np.testing.assert_array_equal(grouped.tokens_BxTr, repeated.tokens_BxTr)
  for field in ("logprobs_BxTr", "entropies_BxTr", "sampling_logprobs_BxTr"):
    np.testing.assert_allclose(getattr(grouped, field), getattr(repeated, field), atol=1e-5)
  assert len({tuple(row) for row in np.asarray(grouped.tokens_BxTr)[:3]}) > 1


def test_draw_and_first_argmax_match_jax():
  logits = jax.random.normal(jax.random.key(0), (64, 50))
  for seed in range(3):
    key = jax.random.key(seed)
    np.testing.assert_array_equal(draw(key, logits), jax.random.categorical(key, logits))
  ties = jnp.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [-jnp.inf, 0.0, 5.0, 5.0]])
  np.testing.assert_array_equal(first_argmax(ties), jnp.argmax(ties, axis=-1))
  np.testing.assert_array_equal(first_argmax(logits), jnp.argmax(logits, axis=-1))


def test_greedy_equals_argmax_of_full_forward():
  graphdef, params = _model(1)
  max_new = 6
  tokens, mask = _prompts()
  out = make_sampler(graphdef, SamplingConfig(max_new_tokens=max_new, eos_id=-1,
                                              temperature=0.0))(
      params, tokens, mask, jax.random.key(0))
  # The model is causal, so one forward pass over prompt + greedy tokens gives the logits each
  # decoding step saw: greedy means every generated token is the argmax at the position before it.
  seqs = to_sequences(tokens, mask, out)
  logits = nnx.merge(graphdef, params)(seqs["tokens"], attention_mask_BxT=seqs["attention_mask"])
  prompt_len = tokens.shape[1]
  want = jnp.argmax(logits[:, prompt_len - 1:-1], axis=-1)
  np.testing.assert_array_equal(out.tokens_BxTr, want)


def test_scanned_model_samples_like_the_unscanned_one():
  """Same weights, stacked for scan_layers: the stacked KV cache decodes the same tokens."""
  from rlhfjax.models.transformer import stack_layers  # pylint: disable=g-import-not-at-top
  graphdef, params = _model(4)
  with nnx.use_eager_sharding(False):
    scanned = Transformer(get_config("tiny", scan_layers=True), rngs=nnx.Rngs(0))
  scanned_graphdef = nnx.split(scanned)[0]
  scanned_params = nnx.State(stack_layers(nnx.to_pure_dict(params)))
  cfg = SamplingConfig(max_new_tokens=5, eos_id=EOS, temperature=1.0)
  tokens, mask = _prompts()
  out = make_sampler(graphdef, cfg)(params, tokens, mask, jax.random.key(5))
  scanned_out = make_sampler(scanned_graphdef, cfg)(scanned_params, tokens, mask,
                                                    jax.random.key(5))
  np.testing.assert_array_equal(scanned_out.tokens_BxTr, out.tokens_BxTr)
  np.testing.assert_array_equal(scanned_out.mask_BxTr, out.mask_BxTr)
  np.testing.assert_allclose(scanned_out.logprobs_BxTr, out.logprobs_BxTr, atol=1e-5)


def test_rows_stop_at_eos():
  graphdef, params = _model(2)
  cfg = SamplingConfig(max_new_tokens=5, eos_id=EOS, temperature=1.0)
  tokens, mask = _prompts()
  out = make_sampler(graphdef, cfg)(params, tokens, mask, jax.random.key(3))
  out_tokens, out_mask = np.asarray(out.tokens_BxTr), np.asarray(out.mask_BxTr)
  for row, m in zip(out_tokens, out_mask):
    eos_at = np.flatnonzero(row == EOS)
    n = eos_at[0] + 1 if eos_at.size else len(row)
    np.testing.assert_array_equal(m, np.arange(len(row)) < n)
    assert (row[n:] == cfg.pad_id).all()
  np.testing.assert_array_equal(out.lengths_B, out_mask.sum(-1))


def test_eos_forced_stops_immediately():
  graphdef, params = _model(3)
  # Greedy decoding with eos_id set to whatever the greedy first token is: every row stops at 1.
  tokens, mask = _prompts()
  first = make_sampler(graphdef, SamplingConfig(max_new_tokens=1, eos_id=-1, temperature=0.0))(
      params, tokens, mask, jax.random.key(0)).tokens_BxTr[:, 0]
  if len(set(np.asarray(first).tolist())) != 1:
    tokens, mask = tokens[:1], mask[:1]
    first = first[:1]
  out = make_sampler(graphdef, SamplingConfig(max_new_tokens=4, eos_id=int(first[0]),
                                              temperature=0.0))(params, tokens, mask,
                                                                jax.random.key(0))
  np.testing.assert_array_equal(out.lengths_B, np.ones(tokens.shape[0]))
  assert (np.asarray(out.tokens_BxTr)[:, 1:] == 0).all()


def _numpy_top_k(z, k):
  kth = np.sort(z, axis=-1)[:, -k][:, None]
  return np.where(z < kth, -np.inf, z)


def _numpy_top_p(z, p):
  out = np.full_like(z, -np.inf)
  for b in range(z.shape[0]):
    order = np.argsort(-z[b], kind="stable")
    probs = np.exp(z[b] - z[b].max())
    probs /= probs.sum()
    mass = 0.0
    for idx in order:
      out[b, idx] = z[b, idx]
      mass += probs[idx]
      if mass >= p:
        break
  return out


@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_k_matches_numpy(k):
  z = np.asarray(jax.random.normal(jax.random.key(k), (4, 7)))
  np.testing.assert_array_equal(jax.jit(procs.top_k(k))(z), _numpy_top_k(z, k))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1.0])
def test_top_p_matches_numpy(p):
  z = np.asarray(jax.random.normal(jax.random.key(7), (5, 9)) * 2)
  np.testing.assert_array_equal(jax.jit(procs.top_p(p))(z), _numpy_top_p(z, p))


def test_top_k_keeps_ties_at_the_kth_value():
  z = np.array([[3.0, 1.0, 2.0, 2.0, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0, 5.0, -1.0]], np.float32)
  got = np.asarray(jax.jit(procs.top_k(2))(z))
  np.testing.assert_array_equal(got, _numpy_top_k(z, 2))
  np.testing.assert_array_equal(np.isfinite(got), [[1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 0]])


def test_top_p_token_reaching_p_exactly_closes_the_nucleus():
  # p is the top token's float32 probability, so the mass before the second token equals p
  # exactly: the smallest set with mass >= p is the top token alone.
  z = np.asarray(jax.random.normal(jax.random.key(8), (1, 9)) * 2)
  p = float(np.max(np.asarray(jax.nn.softmax(jnp.asarray(z)))))
  got = np.asarray(jax.jit(procs.top_p(p))(z))
  np.testing.assert_array_equal(np.isfinite(got), z == z.max())
  # A hair more than that mass needs the second token too.
  got = np.asarray(jax.jit(procs.top_p(float(np.nextafter(np.float32(p), np.float32(1)))))(z))
  assert np.isfinite(got).sum() == 2


def test_geometric_mixture_is_normalised_product():
  za, zb = jax.random.normal(jax.random.key(0), (2, 3, 11))
  for lam in (0.0, 0.5, 1.0, 1.7):
    mixed = jax.nn.softmax(procs.geometric_mixture([za, zb], [lam, 1 - lam]))
    prod = jax.nn.softmax(za) ** lam * jax.nn.softmax(zb) ** (1 - lam)
    np.testing.assert_allclose(mixed, prod / prod.sum(-1, keepdims=True), rtol=1e-5)


def test_mixture_sampler_first_token_distribution():
  (g1, p1), (g2, p2) = _model(4), _model(5)
  tokens, mask = _prompts()
  lam = 1.5
  cfg = SamplingConfig(max_new_tokens=1, eos_id=-1, mixture_weights=(lam, 1 - lam))
  out = make_sampler([g1, g2], cfg)([p1, p2], tokens, mask, jax.random.key(0))
  za = nnx.merge(g1, p1)(tokens, attention_mask_BxT=mask)[:, -1]
  zb = nnx.merge(g2, p2)(tokens, attention_mask_BxT=mask)[:, -1]
  want = jax.nn.log_softmax(lam * za + (1 - lam) * zb)
  tok = out.tokens_BxTr[:, 0]
  np.testing.assert_allclose(out.sampling_logprobs_BxTr[:, 0],
                             jnp.take_along_axis(want, tok[:, None], -1)[:, 0], atol=1e-5)
  np.testing.assert_allclose(out.logprobs_BxTr[:, 0],
                             jnp.take_along_axis(jax.nn.log_softmax(za), tok[:, None], -1)[:, 0],
                             atol=1e-5)
  np.testing.assert_allclose(out.entropies_BxTr[:, 0], entropy_from_logits(za), atol=1e-5)


def test_sampling_logprobs_follow_temperature_then_top_k_then_top_p():
  """sampling_logprobs are those of softmax(top_p(top_k(z / T))); logprobs and entropies stay the
  policy's untempered ones."""
  graphdef, params = _model(6)
  tokens, mask = _prompts()
  temp, k, p = 0.6, 12, 0.7
  cfg = SamplingConfig(max_new_tokens=4, eos_id=-1, temperature=temp, top_k=k, top_p=p)
  out = make_sampler(graphdef, cfg)(params, tokens, mask, jax.random.key(7))
  seqs = to_sequences(tokens, mask, out)
  logits = nnx.merge(graphdef, params)(seqs["tokens"], attention_mask_BxT=seqs["attention_mask"])
  prompt_len = tokens.shape[1]
  z = np.asarray(logits[:, prompt_len - 1:-1], np.float64)  # the logits each step saw
  sampled = np.asarray(out.tokens_BxTr)
  for t in range(cfg.max_new_tokens):
    filtered = _numpy_top_p(_numpy_top_k(z[:, t] / temp, k), p)
    log_q = filtered - np.max(filtered, -1, keepdims=True)
    log_q -= np.log(np.sum(np.exp(log_q), -1, keepdims=True))
    want = np.take_along_axis(log_q, sampled[:, t:t + 1], -1)[:, 0]
    np.testing.assert_allclose(out.sampling_logprobs_BxTr[:, t], want, atol=2e-5)
    assert np.all(np.isfinite(filtered).sum(-1) < k)  # top-p cut inside the top k
  full = token_logprobs(logits, seqs["tokens"])[:, prompt_len:]
  np.testing.assert_allclose(out.logprobs_BxTr, full, atol=2e-5)
  np.testing.assert_allclose(out.entropies_BxTr, entropy(logits)[:, prompt_len:], atol=2e-5)


def test_successive_draws_use_fresh_randomness():
  """Each step draws with a new key: at a high temperature (nearly uniform steps) the second token
  repeats the first as often as its exact conditional probability says (about 1/V), not almost
  always, as reusing the first step's Gumbel noise would make it."""
  graphdef, params = _model(7)
  tokens, mask = _prompts()
  temp, group = 20.0, 512
  cfg = SamplingConfig(max_new_tokens=2, eos_id=-1, temperature=temp)
  out = make_sampler(graphdef, cfg, group_size=group)(params, tokens, mask, jax.random.key(8))
  seqs = to_sequences(jnp.repeat(tokens, group, axis=0), jnp.repeat(mask, group, axis=0), out)
  logits = nnx.merge(graphdef, params)(seqs["tokens"], attention_mask_BxT=seqs["attention_mask"])
  y = np.asarray(out.tokens_BxTr)
  q_second = jax.nn.softmax(logits[:, tokens.shape[1]].astype(jnp.float32) / temp)
  expected = float(jnp.mean(jnp.take_along_axis(q_second, jnp.asarray(y[:, :1]), -1)))
  rate = float(np.mean(y[:, 1] == y[:, 0]))
  std_err = np.sqrt(expected * (1 - expected) / len(y))
  assert abs(rate - expected) < 5 * std_err, (rate, expected)


def test_bad_sampling_config_raises():
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(max_new_tokens=3, eos_id=2, top_p=0.0)
  with pytest.raises(ValueError, match="max_new_tokens"):
    SamplingConfig(max_new_tokens=0, eos_id=2)
  graphdef, _ = _model()
  with pytest.raises(ValueError, match="mixture_weights"):
    make_sampler([graphdef, graphdef], SamplingConfig(max_new_tokens=3, eos_id=2))
  with pytest.raises(ValueError, match="group_size must be >= 1"):
    make_sampler(graphdef, SamplingConfig(max_new_tokens=3, eos_id=2), group_size=0)
