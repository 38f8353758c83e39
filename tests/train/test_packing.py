"""Shared-prompt packing: packed log-probs, losses and gradients equal the unpacked ones."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhfjax.models import Transformer, attention, get_config
from rlhfjax.train import objectives, packing

PROMPT_LEN, RESPONSE_LEN, VOCAB = 5, 7, 64


def model(scan_layers=False, seed=0):
  config = get_config("tiny", scan_layers=scan_layers)
  with nnx.use_eager_sharding(False):
    return Transformer(config, rngs=nnx.Rngs(seed))


def grouped_rows(num_prompts, group_size, seed=0):
  """[P G, Tp + Tr] rows in the pipeline layout: a left-padded prompt repeated over each group,
  right-padded responses of random lengths (one row with an empty prompt: all padding)."""
  rng = np.random.default_rng(seed)
  rows = num_prompts * group_size
  tokens = rng.integers(2, VOCAB, size=(rows, PROMPT_LEN + RESPONSE_LEN)).astype(np.int32)
  mask = np.ones_like(tokens)
  for p in range(num_prompts):
    pad = p % (PROMPT_LEN + 1)  # 0 .. Tp padding columns; Tp: no prompt token at all.
    group = slice(p * group_size, (p + 1) * group_size)
    tokens[group, :PROMPT_LEN] = tokens[p * group_size, :PROMPT_LEN]
    tokens[group, :pad] = 0
    mask[group, :pad] = 0
  for r in range(rows):
    length = 1 + rng.integers(RESPONSE_LEN)
    tokens[r, PROMPT_LEN + length:] = 0
    mask[r, PROMPT_LEN + length:] = 0
  loss_mask = mask.copy()
  loss_mask[:, :PROMPT_LEN] = 0
  return tokens, mask, loss_mask


def test_shared_prefix_mask_matches_definition():
  seg = np.array([[0, 0, 1, 1, 2, 2, 3], [0, 1, 1, 1, 2, 0, 0]], np.int32)
  got = np.asarray(attention.shared_prefix_mask(jnp.asarray(seg)))
  for b, t, s in itertools.product(range(2), range(7), range(7)):
    assert got[b, t, s] == (seg[b, s] == 0 or seg[b, s] == seg[b, t])


def test_pack_layout():
  tokens, mask, _ = grouped_rows(2, 3)
  shared = packing.SharedPrompt(PROMPT_LEN, 3)
  rows = packing.pack(jnp.asarray(tokens), jnp.asarray(mask), shared)
  tp, tr = PROMPT_LEN, RESPONSE_LEN
  assert rows.tokens.shape == (2, tp + 3 * tr)
  positions = np.cumsum(mask, axis=1) - 1
  for p, g in itertools.product(range(2), range(3)):
    row, cols = p * 3 + g, slice(tp + g * tr, tp + (g + 1) * tr)
    np.testing.assert_array_equal(rows.tokens[p, :tp], tokens[row, :tp])
    np.testing.assert_array_equal(rows.tokens[p, cols], tokens[row, tp:])
    np.testing.assert_array_equal(rows.attention_mask[p, cols], mask[row, tp:])
    np.testing.assert_array_equal(rows.positions[p, cols], np.maximum(positions[row, tp:], 0))
  assert rows.shared_prefix == (tp, tr)


@pytest.mark.parametrize("attend", [attention.dot_product_attention,
                                    attention.fused_dot_product_attention])
def test_shared_prefix_attention_equals_masked_attention_with_gradients(attend):
  """Block by block = the whole rows under `shared_prefix_mask` (GQA; a left-padded prefix and
  right-padded continuations, one of them empty), outputs and gradients."""
  b, tp, tr, g, h, k, dh = 2, 3, 4, 3, 4, 2, 8
  t = tp + g * tr
  rng = np.random.default_rng(3)
  q, key, v, cot = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
                    for shape in ((b, t, h, dh), (b, t, k, dh), (b, t, k, dh), (b, t, h, dh)))
  real = np.ones((b, t), bool)
  real[0, 0] = False                      # left padding in row 0's prefix
  real[1, tp + tr - 1] = False            # continuation 1 of row 1 is one token short
  real[1, tp + tr:tp + 2 * tr] = False    # continuation 2 of row 1 is empty
  slots = jnp.arange(t)
  mask = attention.attention_mask(slots, slots, jnp.asarray(real))
  segments = np.concatenate([np.zeros(tp, np.int32), np.repeat(np.arange(1, g + 1), tr)])
  full_mask = mask & attention.shared_prefix_mask(jnp.asarray(np.tile(segments, (b, 1))))

  def blocked(q, key, v):
    return attention.shared_prefix_attention(attend, q, key, v, mask, prefix_len=tp,
                                             segment_len=tr)

  def whole(q, key, v):
    return attend(q, key, v, full_mask)

  np.testing.assert_allclose(jax.jit(blocked)(q, key, v), jax.jit(whole)(q, key, v), rtol=1e-5,
                             atol=1e-6)
  grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cot), argnums=(0, 1, 2)))(q, key, v)
           for f in (blocked, whole)]
  for got, want in zip(*grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"\(Tp, Tr\) = \(3, 5\): 15 positions are not a "
                                       "prefix of 3 and whole continuations of 5"):
    attention.shared_prefix_attention(attend, q, key, v, mask, prefix_len=tp, segment_len=5)


@pytest.mark.parametrize("group_size,chunk,scan", [(3, None, False), (2, 4, True), (1, None, False)])
def test_packed_token_stats_equal_unpacked(group_size, chunk, scan):
  m = model(scan_layers=scan)
  tokens, mask, loss_mask = grouped_rows(4, group_size)
  shared = packing.SharedPrompt(PROMPT_LEN, group_size)
  stats = jax.jit(lambda t, a, s: objectives.token_stats(
      m, t, a, logits_chunk_size=chunk, with_entropy=True, shared=s), static_argnums=2)
  packed = stats(tokens, mask, shared)
  plain = stats(tokens, mask, None)
  on = loss_mask != 0
  for field in ("logp", "entropy"):
    got, want = np.asarray(getattr(packed, field)), np.asarray(getattr(plain, field))
    np.testing.assert_allclose(got[on], want[on], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[:, :PROMPT_LEN], 0.0)
  # The responses of a group are independent: changing one leaves the others' log-probs alone.
  if group_size > 1:
    edited = tokens.copy()
    edited[1, PROMPT_LEN:] = (edited[1, PROMPT_LEN:] + 1) % VOCAB
    again = np.asarray(stats(edited, mask, shared).logp)
    np.testing.assert_array_equal(again[0], np.asarray(packed.logp)[0])


def test_packed_dpo_loss_and_gradients_equal_unpacked():
  policy, reference = model(seed=0), model(seed=1)
  graphdef, params = nnx.split(policy)
  ref_graphdef, ref_params = nnx.split(reference)
  tokens, mask, loss_mask = grouped_rows(3, 2, seed=1)
  batch = {f"{side}_{k}": v[i::2] for i, side in enumerate(("chosen", "rejected"))
           for k, v in (("tokens", tokens), ("attention_mask", mask), ("loss_mask", loss_mask))}

  def value_and_grad(shared_prompt_len):
    loss_fn = objectives.make_preference_loss("dpo", {"beta": 0.5},
                                              reference_graphdef=ref_graphdef,
                                              shared_prompt_len=shared_prompt_len)
    f = lambda p: loss_fn(nnx.merge(graphdef, p), batch, ref_params)
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

  (loss_p, metrics_p), grads_p = value_and_grad(PROMPT_LEN)
  (loss_u, metrics_u), grads_u = value_and_grad(None)
  np.testing.assert_allclose(loss_p, loss_u, rtol=1e-5)
  for key in metrics_u:
    np.testing.assert_allclose(metrics_p[key], metrics_u[key], rtol=1e-4, atol=1e-5)
  for g_p, g_u in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_u)):
    np.testing.assert_allclose(g_p, g_u, rtol=1e-4, atol=1e-6)
  # Compiled (one program each) rather than op by op: the same log-probs, far fewer compilations.
  reference_logps = nnx.jit(objectives.reference_logps, static_argnames="shared_prompt_len")
  refs = reference_logps(reference, batch, shared_prompt_len=PROMPT_LEN)
  want = reference_logps(reference, batch)
  for key in want:
    np.testing.assert_allclose(refs[key], want[key], rtol=1e-5)


def test_check_shared_prompts():
  """Host-side validation of packable batches (groups of rows, and preference pairs)."""
  tokens, mask, loss_mask = grouped_rows(2, 2)
  shared = packing.SharedPrompt(PROMPT_LEN, 2)
  packing.check_shared_prompts(tokens, mask, loss_mask, shared)
  bad = tokens.copy()
  bad[3, PROMPT_LEN - 1] += 1
  with pytest.raises(ValueError, match="group 1 differ in the tokens"):
    packing.check_shared_prompts(bad, mask, loss_mask, shared)
  bad_mask = mask.copy()
  bad_mask[1, 0] = 1 - bad_mask[1, 0]
  with pytest.raises(ValueError, match="group 0 differ in the attention_mask"):
    packing.check_shared_prompts(tokens, bad_mask, loss_mask, shared)
  trained = loss_mask.copy()
  trained[2, 1] = 1
  with pytest.raises(ValueError, match="row 2 has loss-masked tokens"):
    packing.check_shared_prompts(tokens, mask, trained, shared)
  trained = loss_mask.copy()
  trained[3, PROMPT_LEN - 1] = 1  # the last prompt column is part of the prompt too
  with pytest.raises(ValueError, match="row 3 has loss-masked tokens"):
    packing.check_shared_prompts(tokens, mask, trained, shared)
  pairs = {f"{side}_{k}": v[i::2] for i, side in enumerate(("chosen", "rejected"))
           for k, v in (("tokens", bad), ("attention_mask", mask), ("loss_mask", loss_mask))}
  with pytest.raises(ValueError, match="group 1 differ in the tokens"):
    objectives.check_shared_prompt_pairs(pairs, PROMPT_LEN)
  pairs["rejected_tokens"] = pairs["chosen_tokens"]
  objectives.check_shared_prompt_pairs(pairs, PROMPT_LEN)


def test_bad_packing_settings():
  with pytest.raises(ValueError, match="prompt_len must be a positive int"):
    packing.SharedPrompt(0, 2)
  with pytest.raises(ValueError, match="group_size must be a positive int"):
    packing.SharedPrompt(3, 0)
  tokens = jnp.zeros((6, PROMPT_LEN + RESPONSE_LEN), jnp.int32)
  with pytest.raises(ValueError, match="6 rows is not a whole number of groups of 4"):
    packing.pack(tokens, tokens, packing.SharedPrompt(PROMPT_LEN, 4))
  with pytest.raises(ValueError, match="leave no response"):
    packing.pack(tokens, tokens, packing.SharedPrompt(PROMPT_LEN + RESPONSE_LEN, 2))
  m = model()
  with pytest.raises(ValueError, match="shared_prefix is for cache-free"):
    m.trunk(m.embed(tokens[:, :2]), cache=m.init_cache(6, 4), shared_prefix=(1, 1))
  with pytest.raises(ValueError, match=r"\(Tp, Tr\) = \(3, 4\): 10 positions are not"):
    m.hidden_states(tokens[:, :10], shared_prefix=(3, 4))
