"""Decoding-time alignment: DeRa, best-of-n and statistical rejection sampling (RSO).

DeRa decodes from the per-token geometric mixture ``softmax(lam z_aligned + (1 - lam) z_ref)`` of
an aligned model and its reference, which changes the strength of the KL regularisation without
retraining: on a one-step bandit, if ``pi_aligned ∝ pi_ref exp(r / beta)`` then the lam-mixture is
exactly ``pi_ref exp(lam r / beta)``, the policy aligned at beta / lam.

Best-of-n and RSO work on N candidates sampled per prompt, laid out as [B, N] (candidate j of
prompt b at flat row ``b * N + j`` of the sampler's batch, see `repeat_prompts`). Candidates are
always keyed by their index, never by their text: two identical responses are two candidates.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rlhfjax.losses import ensemble_reward
from rlhfjax.sampling import processors as procs
from rlhfjax.sampling.sampler import SampleOutput
from rlhfjax.sampling.sampler import SamplingConfig
from rlhfjax.sampling.sampler import make_sampler
from rlhfjax.sampling.sampler import to_sequences

# reward(prompt_tokens_BxTp, prompt_mask_BxTp, response_tokens_BxTr, response_mask_BxTr) -> [B],
# the signature of `rlhfjax.rewards` and `rlhfjax.train.evaluation`.
RewardFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


# -- DeRa ------------------------------------------------------------------------------------------


def dera_mixture_weights(lam: float) -> tuple[float, float]:
  """Weights ``(lam, 1 - lam)`` of the models (aligned, reference) in a DeRa mixture."""
  return (float(lam), 1.0 - float(lam))


def nash_md_mixture_weights(mixture_coef: float) -> tuple[float, float]:
  """Weights ``(1 - b, b)`` of the models (policy, reference): the Nash-MD opponent
  ``pi^(1-b) mu^b`` (Munos et al., arXiv 2312.00886; b in [0.125, 0.375])."""
  if not 0.0 <= mixture_coef <= 1.0:
    raise ValueError(f"mixture_coef must be in [0, 1], got {mixture_coef}")
  return (1.0 - float(mixture_coef), float(mixture_coef))


def dera_logits(aligned_logits, reference_logits, lam):
  """``lam z_aligned + (1 - lam) z_ref``: logits of the DeRa distribution (any shape [..., V]).

  lam = 0 is the reference, 1 the aligned model, lam > 1 extrapolates beyond it.

  References:
    Liu et al., "Decoding-time Realignment of Language Models", arXiv 2402.02992.
  """
  return procs.geometric_mixture([aligned_logits, reference_logits], (lam, 1.0 - lam))


def dera_sampler(graphdef_aligned: nnx.GraphDef, graphdef_ref: nnx.GraphDef, lam: float,
                 config: SamplingConfig) -> Callable[..., SampleOutput]:
  """A sampler of the DeRa mixture ``softmax(lam z_aligned + (1 - lam) z_ref)`` for any lam.

  Built on `make_sampler` with ``mixture_weights = (lam, 1 - lam)``: both models decode together
  with their own KV caches. lam = 0 and lam = 1 reproduce the reference and aligned samplers
  token for token (same rng); lam > 1 extrapolates. The weights are static, so each lam compiles
  once.

  Args:
    graphdef_aligned: structure of the aligned model (model 0, "the policy": `logprobs_BxTr` are
      its log-probs; `sampling_logprobs_BxTr` those of the mixture actually sampled).
    graphdef_ref: structure of the reference model.
    lam: the realignment coefficient lambda (any real; >= 0 in practice).
    config: decoding settings without `mixture_weights`.

  Returns:
    ``sample((params_aligned, params_ref), prompt_tokens_BxTp, prompt_mask_BxTp, rng)``.

  References:
    Liu et al., "Decoding-time Realignment of Language Models", arXiv 2402.02992.
  """
  if config.mixture_weights is not None:
    raise ValueError("dera_sampler sets SamplingConfig.mixture_weights itself; pass a config "
                     f"without them (got {config.mixture_weights})")
  return make_sampler((graphdef_aligned, graphdef_ref),
                      dataclasses.replace(config, mixture_weights=dera_mixture_weights(lam)))


def _response_logits(model: nnx.Module, sequences: dict[str, jax.Array], response_len: int):
  """Logits [B, Tr, V] predicting each response token (position t predicts token t + 1)."""
  logits = model(sequences["tokens"], attention_mask_BxT=sequences["attention_mask"])
  total = sequences["tokens"].shape[1]
  return logits[:, total - response_len - 1:total - 1]


def dera_kl(graphdef_aligned: nnx.GraphDef, graphdef_ref: nnx.GraphDef, params, prompt_tokens_BxTp,
            prompt_mask_BxTp, output: SampleOutput, lam, config: SamplingConfig) -> jax.Array:
  """Per-sequence ``KL(pi_lam || pi_ref)`` on DeRa samples, summed exactly over the vocabulary.

  For each sampled prefix, the token-level KL of the distribution actually sampled (the lam
  mixture after `config`'s temperature / top-k / top-p) from the reference, summed over the
  response: by the chain rule its expectation over samples is the sequence-level KL, with less
  variance than the log-ratio of the sampled tokens. With greedy decoding (temperature 0) it is
  the KL of the untempered mixture along the greedy path.

  Args:
    graphdef_aligned, graphdef_ref: model structures.
    params: (params_aligned, params_ref).
    prompt_tokens_BxTp, prompt_mask_BxTp: the prompts that were decoded.
    output: the DeRa sampler's output for them.
    lam: lambda (may be traced).
    config: the decoding settings used.

  Returns:
    kl_B.
  """
  sequences = to_sequences(prompt_tokens_BxTp, prompt_mask_BxTp, output)
  response_len = output.tokens_BxTr.shape[1]
  aligned = _response_logits(nnx.merge(graphdef_aligned, params[0]), sequences, response_len)
  ref = _response_logits(nnx.merge(graphdef_ref, params[1]), sequences, response_len)
  sampled = config.processor()(dera_logits(aligned, ref, lam))
  log_q = jax.nn.log_softmax(sampled, axis=-1)
  log_p = jax.nn.log_softmax(ref.astype(jnp.float32), axis=-1)
  q = jnp.exp(log_q)
  # Tokens the processor removed have q = 0 and contribute nothing (avoid 0 * -inf).
  kl_BxTr = jnp.sum(jnp.where(q > 0, q * (log_q - log_p), 0.0), axis=-1)
  return jnp.sum(kl_BxTr * output.mask_BxTr, axis=-1)


def dera_sweep(graphdef_aligned: nnx.GraphDef, graphdef_ref: nnx.GraphDef, params,
               prompt_tokens_BxTp, prompt_mask_BxTp, *, lams: Sequence[float],
               config: SamplingConfig, reward_fn: RewardFn, rng: jax.Array,
               keep_samples: bool = False) -> list[dict]:
  """Reward and KL of DeRa decoding at several lambdas, from one aligned model (no retraining).

  Every lambda decodes the same prompts with the same rng (common random numbers, so differences
  between lambdas are not sampling noise).

  Args:
    graphdef_aligned, graphdef_ref: model structures.
    params: (params_aligned, params_ref).
    prompt_tokens_BxTp, prompt_mask_BxTp: left-padded prompts.
    lams: the lambdas to evaluate.
    config: decoding settings without `mixture_weights`.
    reward_fn: ``reward(prompt_tokens, prompt_mask, response_tokens, response_mask) -> [B]``.
    rng: sampling key.
    keep_samples: also return each lambda's `SampleOutput` under `samples`.

  Returns:
    one dict per lambda: `lam`, `reward` (mean), `kl` (mean `dera_kl`), `response_len` (mean),
    as Python floats (and `samples` if asked for).
  """
  kl_fn = jax.jit(lambda params, out, lam: jnp.mean(dera_kl(
      graphdef_aligned, graphdef_ref, params, prompt_tokens_BxTp, prompt_mask_BxTp, out, lam,
      config)))
  rows = []
  for lam in lams:
    out = dera_sampler(graphdef_aligned, graphdef_ref, lam, config)(
        params, prompt_tokens_BxTp, prompt_mask_BxTp, rng)
    reward = reward_fn(prompt_tokens_BxTp, prompt_mask_BxTp, out.tokens_BxTr, out.mask_BxTr)
    rows.append({"lam": float(lam), "reward": float(jnp.mean(reward)),
                 "kl": float(kl_fn(params, out, jnp.float32(lam))),
                 "response_len": float(jnp.mean(out.lengths_B.astype(jnp.float32)))})
    if keep_samples:
      rows[-1]["samples"] = out
  return rows


# -- candidates ------------------------------------------------------------------------------------


def repeat_prompts(prompt_tokens_BxTp, prompt_mask_BxTp, num_candidates: int):
  """Each prompt repeated N times in a row: [B * N, Tp] tokens and mask (row b * N + j)."""
  if num_candidates < 1:
    raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
  return (jnp.repeat(prompt_tokens_BxTp, num_candidates, axis=0),
          jnp.repeat(prompt_mask_BxTp, num_candidates, axis=0))


def split_candidates(tree: Any, num_candidates: int) -> Any:
  """[B * N, ...] leaves (e.g. a `SampleOutput` of repeated prompts) to [B, N, ...]."""

  def split(x):
    if x.shape[0] % num_candidates:
      raise ValueError(f"leading axis {x.shape[0]} is not a multiple of num_candidates "
                       f"{num_candidates}")
    return x.reshape(x.shape[0] // num_candidates, num_candidates, *x.shape[1:])

  return jax.tree.map(split, tree)


def select_candidates(tree: Any, indices_BxK) -> Any:
  """Gathers candidates by index: [B, N, ...] leaves and indices [B, K] (or [B]) to [B, K, ...]
  (or [B, ...])."""
  indices_BxK = jnp.asarray(indices_BxK)
  flat = indices_BxK.ndim == 1
  idx = indices_BxK[:, None] if flat else indices_BxK

  def gather(x):
    out = jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
    return out[:, 0] if flat else out

  return jax.tree.map(gather, tree)


def sample_candidates(sample: Callable[..., SampleOutput], params, prompt_tokens_BxTp,
                      prompt_mask_BxTp, rng, *, num_candidates: int) -> SampleOutput:
  """N responses per prompt from any sampler: a `SampleOutput` with fields [B, N, ...]."""
  tokens, mask = repeat_prompts(prompt_tokens_BxTp, prompt_mask_BxTp, num_candidates)
  return split_candidates(sample(params, tokens, mask, rng), num_candidates)


def score_candidates(reward_fn: RewardFn, prompt_tokens_BxTp, prompt_mask_BxTp,
                     candidates: SampleOutput) -> jax.Array:
  """Rewards [B, N] of candidates [B, N, Tr] (the prompt of row b scores all its candidates)."""
  num_candidates = candidates.tokens_BxTr.shape[1]
  tokens, mask = repeat_prompts(prompt_tokens_BxTp, prompt_mask_BxTp, num_candidates)
  flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), candidates)
  rewards = reward_fn(tokens, mask, flat.tokens_BxTr, flat.mask_BxTr)
  return rewards.reshape(-1, num_candidates)


# -- best-of-n -------------------------------------------------------------------------------------


def best_of_n_indices(rewards_BxN) -> jax.Array:
  """Index [B] of the best candidate of each prompt (the first one on ties)."""
  if jnp.ndim(rewards_BxN) != 2:
    raise ValueError(f"rewards_BxN must be [B, N], got shape {jnp.shape(rewards_BxN)}")
  return jnp.argmax(rewards_BxN, axis=1).astype(jnp.int32)


def ensemble_best_of_n_indices(rewards_ExBxN, mode: str = "mean", *, lam: float = 1.0):
  """Best-of-n under an ensemble of E reward models combined by `losses.ensemble_reward`
  (mean, worst_case, uncertainty_weighted with penalty lam; Coste et al., arXiv 2310.02743)."""
  if jnp.ndim(rewards_ExBxN) != 3:
    raise ValueError(f"rewards_ExBxN must be [E, B, N], got shape {jnp.shape(rewards_ExBxN)}")
  return best_of_n_indices(ensemble_reward(rewards_ExBxN, mode, lam=lam))


def best_of_n(sample: Callable[..., SampleOutput], params, prompt_tokens_BxTp, prompt_mask_BxTp,
              rng, *, num_candidates: int, reward_fn: RewardFn | Sequence[RewardFn],
              ensemble_mode: str = "mean", ensemble_lam: float = 1.0):
  """Samples N candidates per prompt and keeps the best under a reward model or an ensemble.

  Args:
    sample: ``sample(params, prompt_tokens, prompt_mask, rng) -> SampleOutput``.
    params: the sampler's params.
    prompt_tokens_BxTp, prompt_mask_BxTp: prompts.
    rng: key.
    num_candidates: N.
    reward_fn: one reward function, or a sequence of them (an ensemble combined with
      `ensemble_mode` / `ensemble_lam`).
    ensemble_mode: how an ensemble's rewards are combined, one of `losses.ENSEMBLE_MODES`
      (`losses.ensemble_reward`); a single reward function is left as it is by every mode.
    ensemble_lam: the uncertainty penalty of ``uncertainty_weighted``.

  Returns:
    (best `SampleOutput` with fields [B, ...], combined rewards [B, N], indices [B]).

  References:
    Nakano et al., WebGPT, arXiv 2112.09332 (best-of-n); Coste et al., arXiv 2310.02743
    (ensembles).
  """
  candidates = sample_candidates(sample, params, prompt_tokens_BxTp, prompt_mask_BxTp, rng,
                                 num_candidates=num_candidates)
  fns = list(reward_fn) if isinstance(reward_fn, Sequence) else [reward_fn]
  rewards_ExBxN = jnp.stack([score_candidates(fn, prompt_tokens_BxTp, prompt_mask_BxTp,
                                              candidates) for fn in fns])
  rewards_BxN = ensemble_reward(rewards_ExBxN, ensemble_mode, lam=ensemble_lam)
  indices = best_of_n_indices(rewards_BxN)
  return select_candidates(candidates, indices), rewards_BxN, indices


# -- statistical rejection sampling (RSO) ----------------------------------------------------------


def rso_indices(rewards_BxN, rng, *, num_samples: int, beta: float) -> jax.Array:
  """Statistical rejection sampling: K of N candidates per prompt, keyed by index.

  Repeatedly, with M the largest reward among the remaining candidates, each remaining candidate
  (in index order) is accepted with probability ``exp((r - M) / beta)`` and removed, until K are
  accepted. For N large the accepted responses are distributed as the optimal policy
  ``pi_sft(y) exp(r(y) / beta) / Z`` (the proposal pi_sft being what sampled the candidates);
  beta -> 0 gives best-of-N (K = 1 picks the argmax). Candidates are keyed by index, so
  duplicate responses are distinct candidates (the paper's reference code keys a dict by
  the response string, which merges them).

  Args:
    rewards_BxN: candidate rewards.
    rng: key.
    num_samples: K <= N, accepted per prompt (paper: 8 of 64).
    beta: temperature (> 0) of the target ``exp(r / beta)`` (paper: 0.5).

  Returns:
    accepted indices [B, K] in acceptance order.

  References:
    Liu et al., "Statistical Rejection Sampling Improves Preference Optimization", arXiv
    2309.06657, Algorithm 1.
  """
  if jnp.ndim(rewards_BxN) != 2:
    raise ValueError(f"rewards_BxN must be [B, N], got shape {jnp.shape(rewards_BxN)}")
  if not 1 <= num_samples <= rewards_BxN.shape[1]:
    raise ValueError(f"num_samples must be in [1, N = {rewards_BxN.shape[1]}], got {num_samples}")
  if not beta > 0:
    raise ValueError(f"beta must be positive, got {beta}")
  return _rso(jnp.asarray(rewards_BxN, jnp.float32), rng, num_samples, beta)


@functools.partial(jax.jit, static_argnums=2)
def _rso(rewards_BxN, rng, num_samples, beta):
  """`rso_indices` for a batch: K passes over the candidates of every prompt at once."""
  batch, num_candidates = rewards_BxN.shape
  rows_Bx1 = jnp.arange(batch)[:, None]
  positions_BxN = jnp.broadcast_to(jnp.arange(num_candidates), (batch, num_candidates))
  # One uniform per (pass, prompt, candidate), drawn up front: the same draws as the paper's
  # loop, which draws afresh for each remaining candidate in each pass.
  u_KxBxN = jax.random.uniform(rng, (num_samples, batch, num_candidates))

  def one_pass(carry, u_BxN):
    remaining, accepted, count = carry
    best_Bx1 = jnp.max(jnp.where(remaining, rewards_BxN, -jnp.inf), axis=1, keepdims=True)
    # The paper visits the remaining candidates in order and stops once K are accepted; with M
    # fixed during a pass that is: accept where u < exp((r - M) / beta), keep the first
    # K - count in index order. The best remaining candidate is always accepted.
    accept = remaining & (u_BxN < jnp.exp((rewards_BxN - best_Bx1) / beta))
    rank = jnp.cumsum(accept, axis=1)
    accept = accept & (count[:, None] + rank <= num_samples)
    slots = jnp.where(accept, count[:, None] + rank - 1, num_samples)  # out of range: dropped
    accepted = accepted.at[rows_Bx1, slots].set(positions_BxN, mode="drop")
    return (remaining & ~accept, accepted, count + jnp.sum(accept, axis=1)), None

  init = (jnp.ones((batch, num_candidates), bool), jnp.full((batch, num_samples), -1, jnp.int32),
          jnp.zeros((batch,), jnp.int32))
  # Each pass accepts at least one candidate until K are accepted, so K passes suffice.
  (_, accepted, _), _ = jax.lax.scan(one_pass, init, u_KxBxN)
  return accepted


def rso_sample(sample: Callable[..., SampleOutput], params, prompt_tokens_BxTp, prompt_mask_BxTp,
               rng, *, num_candidates: int, num_samples: int, beta: float, reward_fn: RewardFn):
  """RSO end to end: N candidates per prompt from `sample` (the SFT policy), scored by
  `reward_fn`, K accepted by `rso_indices`.

  Returns:
    (candidates `SampleOutput` [B, N, ...], rewards [B, N], accepted indices [B, K]); gather the
    accepted responses with `select_candidates` or turn them into pairs with `preference_pairs`
    and `pairs_to_batch`.
  """
  sample_key, accept_key = jax.random.split(rng)
  candidates = sample_candidates(sample, params, prompt_tokens_BxTp, prompt_mask_BxTp,
                                 sample_key, num_candidates=num_candidates)
  rewards_BxN = score_candidates(reward_fn, prompt_tokens_BxTp, prompt_mask_BxTp, candidates)
  indices = rso_indices(rewards_BxN, accept_key, num_samples=num_samples, beta=beta)
  return candidates, rewards_BxN, indices


PAIRINGS = ("consecutive", "all")


def preference_pairs(indices_BxK, rewards_BxN, *, pairing: str = "consecutive"):
  """Preference pairs among accepted candidates, ordered by reward (chosen = higher reward).

  ``consecutive``: accepted samples (0, 1), (2, 3), ... as in RSO (K/2 pairs per prompt, K even);
  ``all``: every unordered pair of accepted samples (K (K - 1) / 2 per prompt). Ties keep the
  first of the pair as chosen; filter them with the returned margins if needed.

  Args:
    indices_BxK: candidate indices, e.g. from `rso_indices`.
    rewards_BxN: candidate rewards (any scorer, e.g. a reward model).
    pairing: one of `PAIRINGS`.

  Returns:
    (chosen_BxP, rejected_BxP) candidate indices and margins_BxP = r(chosen) - r(rejected) >= 0.

  References:
    Liu et al., arXiv 2309.06657 (pairs built from the sampled responses and labelled
    by a reward-ranking model).
  """
  if pairing not in PAIRINGS:
    raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
  num_samples = jnp.shape(indices_BxK)[1]
  if pairing == "consecutive":
    if num_samples % 2:
      raise ValueError(f"consecutive pairing needs an even number of samples, got {num_samples}")
    first, second = indices_BxK[:, 0::2], indices_BxK[:, 1::2]
  else:
    i, j = jnp.triu_indices(num_samples, k=1)
    first, second = indices_BxK[:, i], indices_BxK[:, j]
  r_first = jnp.take_along_axis(rewards_BxN, first, axis=1)
  r_second = jnp.take_along_axis(rewards_BxN, second, axis=1)
  first_wins = r_first >= r_second
  chosen = jnp.where(first_wins, first, second)
  rejected = jnp.where(first_wins, second, first)
  return chosen, rejected, jnp.abs(r_first - r_second)


def pairs_to_batch(prompt_tokens_BxTp, prompt_mask_BxTp, candidates: SampleOutput, chosen_BxP,
                   rejected_BxP) -> dict[str, jax.Array]:
  """A preference batch (the `data.preference_batch` layout, [B * P, Tp + Tr] fields
  `{chosen,rejected}_{tokens,attention_mask,loss_mask}`) from candidate indices.

  Args:
    prompt_tokens_BxTp, prompt_mask_BxTp: the prompts.
    candidates: a `SampleOutput` with fields [B, N, ...] (`sample_candidates`).
    chosen_BxP, rejected_BxP: candidate indices (`preference_pairs`).
  """
  num_pairs = chosen_BxP.shape[1]
  tokens, mask = repeat_prompts(prompt_tokens_BxTp, prompt_mask_BxTp, num_pairs)
  batch = {}
  for side, idx in (("chosen", chosen_BxP), ("rejected", rejected_BxP)):
    picked = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]),
                          select_candidates(candidates, idx))
    seqs = to_sequences(tokens, mask, picked)
    batch.update({f"{side}_{k}": v for k, v in seqs.items()})
  return batch

