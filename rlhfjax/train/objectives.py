"""Model losses: where a model meets a loss.

A loss in `rlhfjax.losses` never runs a model; an objective here runs the model on a batch and
hands arrays to a loss, returning `(loss, metrics)` as `make_train_step` expects. Batches follow the
data pipeline's layout: `tokens`, `attention_mask`, `loss_mask` of shape [B, T] (prompt
left-padded, response right-padded); preference batches carry `chosen_*` and `rejected_*` copies.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rlhfjax import losses
from rlhfjax.models import last_token_scores
from rlhfjax.train import packing

SFT_LOSSES = ("cross_entropy", "gem")

# Chunked log-probs. Every objective that reads next-token log-probs takes `logits_chunk_size`:
# None computes the float32 [B, T, V] logits of the whole batch (`model(tokens)`); an int C
# computes them C positions at a time from the final hidden states and the output kernel
# (`losses.map_logit_chunks`), so that at most [B, C, V] float32 logits exist in the forward or
# the backward pass, at the price of recomputing each chunk's [B, C, D] x [D, V] matmul in the
# backward pass. Worth it when V is large (Llama 3: 128256).
#
# Shared-prompt packing. The objectives that run a policy on groups of rows sharing a prompt (a
# DPO pair, a GRPO group) take `shared_prompt_len`: the prompt's columns in the pipeline layout.
# The model then runs once per group on [prompt | response 1 | ... | response G]
# (`rlhfjax.train.packing`), and the output layer only where a response token is predicted. Same
# log-probs up to float summation order; the prompt columns of per-token results are 0.


def check_logits_chunk_size(logits_chunk_size: int | None) -> None:
  """Raises unless `logits_chunk_size` is None (full logits) or a positive int."""
  if logits_chunk_size is not None and (not isinstance(logits_chunk_size, int)
                                        or logits_chunk_size < 1):
    raise ValueError(f"logits_chunk_size must be None or a positive int, got "
                     f"{logits_chunk_size!r}")


def output_kernel(model: nnx.Module) -> jax.Array:
  """The output projection W_out [D, V] of a `Transformer` (what `unembed` multiplies by): the
  `lm_head` kernel, or the transposed embedding when the embeddings are tied."""
  if model.config.tie_embeddings:
    return model.embed_tokens.embedding[...].T
  return model.lm_head.kernel[...]


def _hidden_and_kernel(model: nnx.Module, tokens_BxT, attention_mask_BxT):
  """(final hidden states [B, T, D], W_out [D, V], compute dtype): the chunked path's inputs."""
  h_BxTxD = model.hidden_states(tokens_BxT, attention_mask_BxT=attention_mask_BxT)
  return h_BxTxD, output_kernel(model), jnp.dtype(model.config.dtype)


def _logit_stats(logits_BxTxV, tokens_BxT, with_entropy: bool) -> losses.TokenStats:
  return losses.TokenStats(losses.token_logprobs(logits_BxTxV, tokens_BxT),
                           losses.entropy(logits_BxTxV) if with_entropy else None)


def hidden_token_stats(model: nnx.Module, h_BxTxD, tokens_BxT, *,
                       logits_chunk_size: int | None = None,
                       with_entropy: bool = False) -> losses.TokenStats:
  """`TokenStats` [B, T] of the tokens from the final hidden states that precede them (full
  logits `model.unembed(h)`, or chunked)."""
  if logits_chunk_size is None:
    return _logit_stats(model.unembed(h_BxTxD), tokens_BxT, with_entropy)
  return losses.chunked_token_stats(h_BxTxD, output_kernel(model), tokens_BxT,
                                    chunk_size=logits_chunk_size, with_entropy=with_entropy,
                                    dtype=jnp.dtype(model.config.dtype))


def token_stats(model: nnx.Module, tokens_BxT, attention_mask_BxT, *,
                logits_chunk_size: int | None = None, with_entropy: bool = False,
                shared: packing.SharedPrompt | None = None) -> losses.TokenStats:
  """The model's log-probs of the tokens [B, T] (and the entropies [B, T] of the distributions
  that predicted them), aligned with the tokens; full or chunked logits, see above.

  With `shared`, each group of `shared.group_size` consecutive rows shares its first
  `shared.prompt_len` columns (the prompt) and goes through the model as one packed row; results
  are then 0 on the prompt columns.
  """
  if shared is None:
    if logits_chunk_size is None:
      logits = model(tokens_BxT, attention_mask_BxT=attention_mask_BxT)
      return _logit_stats(logits, tokens_BxT, with_entropy)
    h_BxTxD = model.hidden_states(tokens_BxT, attention_mask_BxT=attention_mask_BxT)
    return hidden_token_stats(model, h_BxTxD, tokens_BxT, logits_chunk_size=logits_chunk_size,
                              with_entropy=with_entropy)
  rows = packing.pack(tokens_BxT, attention_mask_BxT, shared)
  h_PxLxD = model.hidden_states(rows.tokens, attention_mask_BxT=rows.attention_mask,
                                positions_BxT=rows.positions, shared_prefix=rows.shared_prefix)
  h_BxSxD, tokens_BxS = packing.response_views(h_PxLxD, tokens_BxT, shared)
  stats = hidden_token_stats(model, h_BxSxD, tokens_BxS, logits_chunk_size=logits_chunk_size,
                             with_entropy=with_entropy)
  return jax.tree.map(lambda x_BxS: packing.place_responses(x_BxS, shared), stats)


def fused_token_stats(graphdef: nnx.GraphDef, params: Sequence[Any], tokens_BxT,
                      attention_mask_BxT, **stats_kwargs) -> list[losses.TokenStats]:
  """`token_stats` of several models of one structure (a policy and its reference) from one
  forward pass: their parameters are stacked on a new leading axis and the pass is vmapped over
  it, so each layer runs one batched matmul over [M, ...] weights instead of M matmuls (M times
  fewer kernels, larger work per kernel). For passes without gradients (rollout scoring): under
  `jax.grad` the backward would compute the gradients of every stacked copy.

  Args:
    graphdef: the shared structure.
    params: M params pytrees of that structure.
    tokens_BxT, attention_mask_BxT, stats_kwargs: as `token_stats`.

  Returns:
    One `TokenStats` per params pytree, in order.

  Raises:
    ValueError: if the params pytrees differ in structure or shapes.
  """
  shapes = [jax.tree.map(jnp.shape, p) for p in params]
  if any(s != shapes[0] for s in shapes[1:]):
    raise ValueError("fused_token_stats needs params of one structure and shapes; got "
                     f"{len(params)} pytrees that differ")
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *params)
  stats = jax.vmap(lambda p: token_stats(nnx.merge(graphdef, p), tokens_BxT, attention_mask_BxT,
                                         **stats_kwargs))(stacked)
  return [jax.tree.map(lambda x: x[m], stats) for m in range(len(params))]


def sequence_logps(model: nnx.Module, tokens_BxT, attention_mask_BxT, loss_mask_BxT, *,
                   logits_chunk_size: int | None = None,
                   shared: packing.SharedPrompt | None = None):
  """Per-token log-probs [B, T] and their masked sum [B] over the response."""
  logp_BxT = token_stats(model, tokens_BxT, attention_mask_BxT,
                         logits_chunk_size=logits_chunk_size, shared=shared).logp
  return logp_BxT, losses.sequence_logprobs(logp_BxT, loss_mask_BxT)


def packed_groups(shared_prompt_len: int | None, group_size: int) -> packing.SharedPrompt | None:
  """The packing of `shared_prompt_len` (None: no packing) for groups of `group_size` rows."""
  return None if shared_prompt_len is None else packing.SharedPrompt(shared_prompt_len, group_size)


def make_sft_loss(kind: str = "cross_entropy", *, aggregation: str = "token_mean",
                  gem_beta: float = 0.7, gem_h: str = "logsigmoid",
                  logits_chunk_size: int | None = None) -> Callable:
  """`loss(model, batch) -> (loss, metrics)` for supervised fine-tuning on response tokens.

  With `logits_chunk_size` the loss comes from `losses.chunked_cross_entropy` /
  `losses.chunked_gem` on the model's hidden states (same value, metrics and gradients up to
  float summation order).
  """
  if kind not in SFT_LOSSES:
    raise ValueError(f"sft loss must be one of {SFT_LOSSES}, got {kind!r}")
  check_logits_chunk_size(logits_chunk_size)
  gem_kwargs = dict(beta=gem_beta, h=gem_h) if kind == "gem" else {}

  def loss(model, batch):
    tokens, mask = batch["tokens"], batch["loss_mask"]
    if logits_chunk_size is None:
      logits = model(tokens, attention_mask_BxT=batch["attention_mask"])
      full = losses.gem if kind == "gem" else losses.cross_entropy
      return full(logits, tokens, mask, aggregation=aggregation, **gem_kwargs)
    h_BxTxD, w_DxV, dtype = _hidden_and_kernel(model, tokens, batch["attention_mask"])
    chunked = losses.chunked_gem if kind == "gem" else losses.chunked_cross_entropy
    return chunked(h_BxTxD, w_DxV, tokens, mask, chunk_size=logits_chunk_size,
                   aggregation=aggregation, dtype=dtype, **gem_kwargs)

  return loss


def response_scores(model: nnx.Module, tokens_BxT, attention_mask_BxT) -> jax.Array:
  """Scalar score per sequence: the score head at the last real token."""
  scores = model.scores(tokens_BxT, attention_mask_BxT=attention_mask_BxT)
  return last_token_scores(scores, attention_mask_BxT)


def pair_fields(batch: dict[str, Any], side: str) -> tuple[Any, Any, Any]:
  """(tokens, attention_mask, loss_mask) of one side ("chosen" or "rejected") of a pair batch."""
  return (batch[f"{side}_tokens"], batch[f"{side}_attention_mask"], batch[f"{side}_loss_mask"])


def stack_pairs(batch: dict[str, Any]) -> tuple[Any, Any, Any]:
  """Concatenates chosen and rejected along the batch axis: one forward pass for both sides."""
  chosen, rejected = pair_fields(batch, "chosen"), pair_fields(batch, "rejected")
  return tuple(jnp.concatenate([c, r], axis=0) for c, r in zip(chosen, rejected))


def interleave_pairs(batch: dict[str, Any]) -> tuple[Any, Any, Any]:
  """(tokens, attention_mask, loss_mask) [2P, T] with rows c0, r0, c1, r1, ...: each pair is a
  group of two rows (`packing`)."""
  chosen, rejected = pair_fields(batch, "chosen"), pair_fields(batch, "rejected")
  return tuple(jnp.stack([c, r], axis=1).reshape(-1, c.shape[1])
               for c, r in zip(chosen, rejected))


def check_shared_prompt_pairs(batch: dict[str, Any], shared_prompt_len: int) -> None:
  """Raises ValueError unless `make_preference_loss(shared_prompt_len=...)` may pack the batch:
  chosen and rejected agree on the prompt columns, where nothing is loss-masked (host-side)."""
  packing.check_shared_prompts(*interleave_pairs(batch), packing.SharedPrompt(shared_prompt_len, 2))


def pair_logps(model: nnx.Module, batch: dict[str, Any], *,
               logits_chunk_size: int | None = None,
               shared_prompt_len: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Sequence log-probs (chosen [P], rejected [P]) of a preference batch, both sides in one
  forward pass (`interleave_pairs`: one packed group per pair with `shared_prompt_len`)."""
  _, logps = sequence_logps(model, *interleave_pairs(batch), logits_chunk_size=logits_chunk_size,
                            shared=packed_groups(shared_prompt_len, 2))
  return logps[0::2], logps[1::2]


def make_reward_model_loss(*, margin: float = 0.0, center_coef: float = 0.0) -> Callable:
  """`loss(model, batch)`: Bradley-Terry on the score head's last-token rewards.

  Metrics: `accuracy` (chosen scored above rejected), `margin` (mean r_w - r_l), and, when the
  batch carries gold rewards, `gold_agreement` (the model orders the pair as the gold reward does).
  """

  def loss(model, batch):
    tokens, attention_mask, _ = stack_pairs(batch)
    rewards = response_scores(model, tokens, attention_mask)
    r_w, r_l = jnp.split(rewards, 2)
    per_pair = losses.bradley_terry(r_w, r_l, margin=margin, center_coef=center_coef)
    metrics = {"accuracy": jnp.mean(r_w > r_l), "margin": jnp.mean(r_w - r_l),
               "reward_mean": jnp.mean(rewards)}
    if "chosen_gold_reward" in batch:
      gold = batch["chosen_gold_reward"] - batch["rejected_gold_reward"]
      metrics["gold_agreement"] = jnp.mean((r_w - r_l) * gold > 0)
    return jnp.mean(per_pair), metrics

  return loss


# Sequence-level losses that compare the policy with a reference, and reference-free ones.
REFERENCE_LOSSES = {
    "dpo": losses.dpo, "ipo": losses.ipo, "slic": losses.slic, "cdpo": losses.cdpo,
    "robust_dpo": losses.robust_dpo, "gpo": losses.gpo, "rpo": losses.rpo, "spin": losses.spin,
}
REFERENCE_FREE_LOSSES = {"simpo": losses.simpo, "orpo": losses.orpo}
PREFERENCE_LOSSES = tuple(REFERENCE_LOSSES) + tuple(REFERENCE_FREE_LOSSES)


# Settings of the preference losses that must be > 0 (a KL strength, a margin's scale) or >= 0.
_POSITIVE_SETTINGS = ("beta", "tau")
_NONNEGATIVE_SETTINGS = ("lam", "eta", "gamma")


def check_preference_loss(kind: str, loss_kwargs: dict | None = None,
                          reference: str = "on_the_fly") -> None:
  """Raises ValueError for an unknown loss or reference mode, a setting the loss does not take,
  or a setting out of range (beta, tau > 0; lam, eta, gamma >= 0), before anything runs."""
  if kind not in PREFERENCE_LOSSES:
    raise ValueError(f"preference loss must be one of {PREFERENCE_LOSSES}, got {kind!r}")
  if reference not in REFERENCE_MODES:
    raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {reference!r}")
  fn = {**REFERENCE_LOSSES, **REFERENCE_FREE_LOSSES}[kind]
  accepted = {name for name, p in inspect.signature(fn).parameters.items()
              if p.kind == inspect.Parameter.KEYWORD_ONLY}
  for name, value in (loss_kwargs or {}).items():
    if name not in accepted:
      raise ValueError(f"{kind} has no setting {name!r}; it takes {sorted(accepted)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      if name in _POSITIVE_SETTINGS and not value > 0:
        raise ValueError(f"{kind}.{name} must be > 0, got {value}")
      if name in _NONNEGATIVE_SETTINGS and not value >= 0:
        raise ValueError(f"{kind}.{name} must be >= 0, got {value}")


def _length_kwargs(kind: str, loss_kwargs: dict, chosen_lengths, rejected_lengths) -> dict:
  """Response lengths for the losses that use them: length-normalised IPO, and RPO (whose NLL
  term is then per token, as in Iterative RPO / TRL's `rpo_alpha`)."""
  if kind == "ipo" and loss_kwargs.get("length_normalize", False):
    return {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
  if kind == "rpo":
    return {"chosen_lengths": chosen_lengths}
  return {}
REFERENCE_MODES = ("on_the_fly", "precomputed")


def make_preference_loss(kind: str, loss_kwargs: dict | None = None, *,
                         reference: str = "on_the_fly",
                         reference_graphdef: nnx.GraphDef | None = None,
                         logits_chunk_size: int | None = None,
                         shared_prompt_len: int | None = None) -> Callable:
  """`loss(model, batch, *frozen)` for offline preference optimisation with any loss above.

  Chosen and rejected go through the policy in one forward pass. The reference log-probs come
  either from the batch (`reference="precomputed"`: `reference_chosen_logps`,
  `reference_rejected_logps`, see `reference_logps`) or from a forward pass of the frozen
  reference model (`"on_the_fly"`: `frozen = (reference_params,)` and `reference_graphdef`), under
  `stop_gradient`. Reference-free losses (SimPO, ORPO) ignore both.

  Metrics: `reward_accuracy` (implicit reward h > 0), `margin` (mean h), `chosen_logps`,
  `rejected_logps`, `log_ratio` (mean policy - reference log-prob of the data, a KL proxy; the
  evaluator measures the KL on policy samples).

  `logits_chunk_size` chunks the log-probs of both models (`token_stats`);
  `shared_prompt_len` (the batch's prompt columns) runs both models once per pair on
  [prompt | chosen | rejected] (shared-prompt packing; `check_shared_prompt_pairs` checks a
  batch on the host).
  """
  check_preference_loss(kind, loss_kwargs, reference)
  if kind in REFERENCE_LOSSES and reference == "on_the_fly" and reference_graphdef is None:
    raise ValueError("reference='on_the_fly' needs reference_graphdef")
  check_logits_chunk_size(logits_chunk_size)
  loss_kwargs = dict(loss_kwargs or {})
  packed_groups(shared_prompt_len, 2)  # Validates it.
  logps_of = functools.partial(pair_logps, logits_chunk_size=logits_chunk_size,
                               shared_prompt_len=shared_prompt_len)

  def loss(model, batch, *frozen):
    pc, pr = logps_of(model, batch)
    lc, lr = (batch[f"{side}_loss_mask"].sum(-1).astype(jnp.float32)
              for side in ("chosen", "rejected"))
    metrics = {"chosen_logps": jnp.mean(pc), "rejected_logps": jnp.mean(pr)}
    if kind in REFERENCE_FREE_LOSSES:
      per_pair = REFERENCE_FREE_LOSSES[kind](pc, pr, lc, lr, **loss_kwargs)
      metrics["reward_accuracy"] = jnp.mean(pc / lc > pr / lr)
      return jnp.mean(per_pair), metrics
    if reference == "precomputed":
      rc, rr = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
    else:
      ref_model = nnx.merge(reference_graphdef, frozen[0])
      rc, rr = jax.lax.stop_gradient(logps_of(ref_model, batch))
    per_pair = REFERENCE_LOSSES[kind](pc, pr, rc, rr, **_length_kwargs(kind, loss_kwargs, lc, lr),
                                      **loss_kwargs)
    h = losses.log_ratio_margin(pc, pr, rc, rr)
    metrics.update(reward_accuracy=jnp.mean(h > 0), margin=jnp.mean(h),
                   log_ratio=jnp.mean(jnp.concatenate([pc - rc, pr - rr])))
    return jnp.mean(per_pair), metrics

  return loss


def reference_logps(model: nnx.Module, batch: dict[str, Any], *,
                    logits_chunk_size: int | None = None,
                    shared_prompt_len: int | None = None) -> dict[str, jax.Array]:
  """Reference log-probs of a preference batch, to precompute once per dataset example."""
  rc, rr = pair_logps(model, batch, logits_chunk_size=logits_chunk_size,
                      shared_prompt_len=shared_prompt_len)
  return {"reference_chosen_logps": rc, "reference_rejected_logps": rr}


# -- Online policy-gradient objectives (used by `rlhfjax.train.online`) ----------------------------
#
# An online batch is a rollout in the trainers' layout (`tokens`, `attention_mask`, `loss_mask`
# [B, T], prompt left-padded + response right-padded) plus per-token arrays aligned with the tokens
# like `losses.token_logprobs` (`logp_old`, `logp_ref`, `returns`, `values`, all [B, T] and 0
# off the response) and per-sequence arrays [B] (`rewards`, `shaped_rewards`, `greedy_rewards`).
# `advantages` is [B] for algorithms with one advantage per sequence and [B, T] for the others.
# Rows are prompt-major: the G samples of prompt p are rows p*G .. p*G + G - 1.
# Batch-level quantities (group baselines, whitening, GAE) are computed before the batch is split
# into minibatches (`rlhfjax.train.online.prepare_batch`); the objectives below only run the
# policy and hand arrays to the losses of `rlhfjax.losses`. Coefficients that change during
# training without recompiling (the KL coefficient of an adaptive controller) arrive in a frozen
# `coefs` dict of scalars: `loss(model, batch, coefs)`.

PG_ALGORITHMS = ("reinforce", "remax", "rloo", "grpo", "dr_grpo", "dapo", "bnpo", "reinforce_pp",
                 "ppo", "copg", "topr", "constrained")

# The keyword arguments each algorithm's loss accepts, with their defaults (the papers').
PG_LOSS_DEFAULTS: dict[str, dict[str, Any]] = {
    "reinforce": dict(mode="seq_mean_token_sum"),
    "remax": dict(gamma=1.0, clip=5.0, mode="token_mean"),
    "rloo": dict(mode="seq_mean_token_sum"),
    "grpo": dict(eps_lo=0.2, eps_hi=0.2, mode="seq_mean_token_mean"),
    "dr_grpo": dict(eps_lo=0.2, eps_hi=0.2),
    "dapo": dict(eps_lo=0.2, eps_hi=0.28, mode="token_mean"),
    "bnpo": dict(eps_lo=0.2, eps_hi=0.2, mode="seq_mean_token_mean"),
    "reinforce_pp": dict(eps=0.2, mode="token_mean"),
    "ppo": dict(eps=0.2, mode="token_mean"),
    "copg": dict(),
    "topr": dict(mode="seq_mean_token_sum"),
    "constrained": dict(eps=0.2, mode="token_mean"),
}


def policy_token_stats(model: nnx.Module, batch: dict[str, Any], *,
                       logits_chunk_size: int | None = None,
                       shared: packing.SharedPrompt | None = None) -> tuple[jax.Array, jax.Array]:
  """Log-probs [B, T] of the batch's tokens and the entropy [B, T] of the distributions that
  predicted them (both aligned with the tokens, entry 0 is 0), from one pass over the logits."""
  stats = token_stats(model, batch["tokens"], batch["attention_mask"],
                      logits_chunk_size=logits_chunk_size, with_entropy=True, shared=shared)
  return stats.logp, stats.entropy


def token_values(model: nnx.Module, tokens_BxT, attention_mask_BxT) -> jax.Array:
  """Critic values ``V_t`` of the state before token t, aligned with the tokens, [B, T].

  The score head at position t - 1 has read tokens 0 .. t - 1, i.e. the state in which token t is
  chosen (entry 0 is 0), which is what `losses.gae` expects.
  """
  scores = model.scores(tokens_BxT, attention_mask_BxT=attention_mask_BxT)
  return losses.pad_first_position(scores[:, :-1])


def _check_kwargs(algorithm: str, kwargs: dict) -> dict:
  unknown = sorted(set(kwargs) - set(PG_LOSS_DEFAULTS[algorithm]))
  if unknown:
    raise ValueError(f"{algorithm} loss got unknown settings {unknown}; it accepts "
                     f"{sorted(PG_LOSS_DEFAULTS[algorithm])}")
  return {**PG_LOSS_DEFAULTS[algorithm], **kwargs}


def _pair_rows(x):
  """Rows (0, 2, 4, ...) and (1, 3, 5, ...): the CoPG pairs inside each group of even size."""
  return x[0::2], x[1::2]


def make_policy_gradient_loss(algorithm: str, *, group_size: int = 1,
                              response_len: int | None = None,
                              logits_chunk_size: int | None = None,
                              shared_prompt: bool = False, **loss_kwargs) -> Callable:
  """`loss(model, batch, coefs) -> (loss, metrics)` for one online policy-gradient algorithm.

  The policy runs once on the batch; its per-token log-probs go to the named loss (batch fields
  it reads in brackets):

    - reinforce: `losses.reinforce` [advantages = R - beta KL - baseline].
    - remax: `losses.remax`, beta = coefs['beta'] [rewards, greedy_rewards, logp_old, logp_ref].
    - rloo: `losses.rloo` on `shaped_rewards` regrouped as [P, G] [shaped_rewards = R - beta KL].
    - grpo, bnpo: `losses.grpo`, k3 KL with beta = coefs['beta'] [advantages, logp_old, logp_ref].
    - dr_grpo: `losses.dr_grpo` with max_len = response_len [as grpo].
    - dapo: `losses.dapo`, no KL [advantages, logp_old; dropped groups have loss_mask 0].
    - reinforce_pp: `losses.reinforce_pp` [advantages = whitened returns, logp_old].
    - ppo: `losses.clipped_surrogate`, the policy part; the critic has its own step
      (`make_value_loss`) [advantages from GAE, logp_old].
    - copg: `losses.copg` on the pairs (2k, 2k + 1) of each group, beta = coefs['beta']
      [rewards, logp_ref].
    - topr: `losses.topr` [advantages [B], logp_old].
    - constrained: `losses.clipped_surrogate` on the mixed advantage [advantages, logp_old].

  Args:
    algorithm: one of `PG_ALGORITHMS`.
    group_size: G, samples per prompt (rloo regroups rewards as [P, G]; copg needs G even).
    response_len: generation budget Tr: the batch's last Tr columns are the responses (Dr. GRPO's
      constant normaliser; required for dr_grpo and for `shared_prompt`).
    logits_chunk_size: None for full logits, or positions per chunk (`token_stats`); the
      log-probs and the entropy come from the same chunked pass.
    shared_prompt: run the policy once per group of `group_size` rows, which share the prompt in
      the columns before the last `response_len` (shared-prompt packing; minibatches must hold
      whole groups, as `online.group_minibatches` makes them).
    **loss_kwargs: the algorithm's loss settings, see `PG_LOSS_DEFAULTS`.

  Returns:
    The model loss. Metrics: the loss's own (e.g. `clip_frac`, `approx_kl`, `kl`) plus `entropy`
    (token mean over the response) and `logp` (mean sequence log-prob).
  """
  if algorithm not in PG_ALGORITHMS:
    raise ValueError(f"online algorithm must be one of {PG_ALGORITHMS}, got {algorithm!r}")
  kw = _check_kwargs(algorithm, loss_kwargs)
  if algorithm in ("rloo", "copg") and group_size < 2:
    raise ValueError(f"{algorithm} needs group_size >= 2 samples per prompt, got {group_size}")
  if algorithm == "copg" and group_size % 2:
    raise ValueError(f"copg pairs the samples of a prompt: group_size must be even, got "
                     f"{group_size}")
  if algorithm == "dr_grpo" and response_len is None:
    raise ValueError("dr_grpo needs response_len (the constant of its normaliser)")
  if shared_prompt and response_len is None:
    raise ValueError("shared_prompt needs response_len (the responses' columns)")
  check_logits_chunk_size(logits_chunk_size)

  # The aggregation the loss uses (dr_grpo's is fixed; copg averages pairs: no weight needed).
  weight_mode = "sum_over_constant" if algorithm == "dr_grpo" else kw.get("mode")

  def loss(model, batch, coefs):
    prompt_len = batch["tokens"].shape[1] - response_len if shared_prompt else None
    logp, entropy = policy_token_stats(model, batch, logits_chunk_size=logits_chunk_size,
                                       shared=packed_groups(prompt_len, group_size))
    mask = batch["loss_mask"]
    beta = coefs["beta"]
    if algorithm == "reinforce":
      value, metrics = losses.reinforce(logp, batch["advantages"], mask, **kw)
    elif algorithm == "remax":
      value, metrics = losses.remax(logp, batch["logp_old"], batch["logp_ref"], batch["rewards"],
                                    batch["greedy_rewards"], mask, beta=beta, **kw)
    elif algorithm == "rloo":
      value, metrics = losses.rloo(logp, batch["shaped_rewards"].reshape(-1, group_size), mask,
                                   **kw)
    elif algorithm in ("grpo", "bnpo"):
      value, metrics = losses.grpo(logp, batch["logp_old"], batch["logp_ref"],
                                   batch["advantages"], mask, beta=beta, **kw)
    elif algorithm == "dr_grpo":
      value, metrics = losses.dr_grpo(logp, batch["logp_old"], batch["logp_ref"],
                                      batch["advantages"], mask, beta=beta,
                                      max_len=response_len, **kw)
    elif algorithm == "dapo":
      value, metrics = losses.dapo(logp, batch["logp_old"], None, batch["advantages"], mask, **kw)
    elif algorithm == "reinforce_pp":
      value, metrics = losses.reinforce_pp(logp, batch["logp_old"], batch["advantages"], mask,
                                           **kw)
    elif algorithm in ("ppo", "constrained"):
      value, metrics = losses.clipped_surrogate(logp, batch["logp_old"], batch["advantages"], mask,
                                                eps_lo=kw["eps"], mode=kw["mode"])
    elif algorithm == "copg":
      lp = losses.sequence_logprobs(logp, mask)
      ref = losses.sequence_logprobs(batch["logp_ref"], mask)
      (lp1, lp2), (ref1, ref2), (r1, r2) = (_pair_rows(x) for x in (lp, ref, batch["rewards"]))
      value = jnp.mean(losses.copg(lp1, ref1, r1, lp2, ref2, r2, beta=beta))
      metrics = {}
    else:  # topr
      value, metrics = losses.topr(logp, batch["logp_old"], batch["advantages"], mask, **kw)
    metrics = {**metrics, "entropy": jax.lax.stop_gradient(losses.masked_mean(entropy, mask)),
               "logp": jax.lax.stop_gradient(jnp.mean(losses.sequence_logprobs(logp, mask)))}
    if weight_mode is not None:
      metrics[losses.LOSS_WEIGHT] = losses.aggregation_weight(mask, weight_mode)
    return value, metrics

  return loss


def make_value_loss(*, eps_v: float = 0.2, mode: str = "token_mean") -> Callable:
  """`loss(critic, batch) -> (loss, metrics)`: the PPO critic's clipped value loss.

  ``agg(0.5 max((V - G)^2, (clip(V, V_old +- eps_v) - G)^2))`` with V from `token_values`, V_old
  the rollout's `values` and G its GAE `returns` (`losses.clipped_value_loss`).

  Metrics: `value_clip_frac`, `value_mean`, `value_error` (token mean of |V - G|).
  """

  def loss(model, batch):
    mask = batch["loss_mask"]
    values = token_values(model, batch["tokens"], batch["attention_mask"])
    per_token, clipped = losses.clipped_value_loss(values, batch["values"], batch["returns"], mask,
                                                   eps_v=eps_v)
    sg = jax.lax.stop_gradient
    metrics = {"value_clip_frac": sg(losses.masked_mean(clipped.astype(jnp.float32), mask)),
               "value_mean": sg(losses.masked_mean(values, mask)),
               "value_error": sg(losses.masked_mean(jnp.abs(values - batch["returns"]), mask)),
               losses.LOSS_WEIGHT: losses.aggregation_weight(mask, mode)}
    return losses.aggregate(per_token, mask, mode), metrics

  return loss


# -- Pairwise preference model P(y > y' | x) (Nash learning from human feedback) -------------------
#
# Design choice: one score head read on the *concatenated pair* [x, y, y'], not a difference of
# per-response scores. A difference r(x, y) - r(x, y') is a Bradley-Terry model and can only
# express transitive preferences; the concatenated pair can express any P, including the
# non-transitive ones that Nash methods exist for. Antisymmetry is built in:
# ``s(x, y, y') = (f(x, y, y') - f(x, y', y)) / 2`` and ``P(y > y') = sigma(s)``, so
# ``P(y > y') = 1 - P(y' > y)`` exactly and the order in which a pair is shown cannot be a shortcut
# (both orders go through the model in one forward pass).


def concat_pair(first: tuple[Any, Any, Any], second: tuple[Any, Any, Any]) -> tuple[Any, Any]:
  """Tokens and attention mask [B, 2T] of ``[x, y, y']`` from two sequences of one prompt.

  `first` and `second` are (tokens, attention_mask, loss_mask) in the pipeline layout [B, T]. The
  second copy of the prompt is masked out (attention 0, so it is padding in the middle, which the
  decoder handles like any padding: positions follow the cumulative mask), leaving prompt, first
  response, second response. The first response's EOS (when it has one) separates the two.
  """
  tokens_a, attention_a, _ = first
  tokens_b, _, loss_mask_b = second
  return (jnp.concatenate([tokens_a, tokens_b], axis=1),
          jnp.concatenate([attention_a, loss_mask_b], axis=1))


def pair_logits(model: nnx.Module, first: tuple[Any, Any, Any], second: tuple[Any, Any, Any]
                ) -> tuple[jax.Array, jax.Array]:
  """Raw scores ``(f(x, y, y'), f(x, y', y))`` [B] each, both orders in one forward pass."""
  ab_tokens, ab_mask = concat_pair(first, second)
  ba_tokens, ba_mask = concat_pair(second, first)
  scores = response_scores(model, jnp.concatenate([ab_tokens, ba_tokens]),
                           jnp.concatenate([ab_mask, ba_mask]))
  return tuple(jnp.split(scores, 2))


def pairwise_preference_logits(model: nnx.Module, first: tuple[Any, Any, Any],
                               second: tuple[Any, Any, Any]) -> jax.Array:
  """The antisymmetric preference logit s [B]: ``P(y > y' | x) = sigma(s)``, ``s(y', y) = -s``.

  Args:
    model: a `Transformer` with a score head, trained by `make_pairwise_preference_loss`.
    first, second: (tokens, attention_mask, loss_mask) [B, T] of y and y' for the same prompts
      (e.g. `pair_fields(batch, "chosen")` or `sampling.to_sequences(...)` values).
  """
  return losses.antisymmetrize(*pair_logits(model, first, second))


def make_pairwise_preference_loss() -> Callable:
  """`loss(model, batch)`: BCE of the antisymmetric pairwise preference model on labelled pairs.

  The batch is a preference batch (chosen preferred to rejected, label 1);
  `losses.preference_model_loss` with both orders. Metrics: `accuracy` (P(chosen > rejected) >
  1/2), `prob_chosen` (mean P), and with gold rewards in the batch `gold_agreement`.

  References:
    Munos et al., "Nash Learning from Human Feedback", arXiv 2312.00886, section 3 (a preference
    model on pairs); Jiang et al., PairRM, arXiv 2306.02561 (scoring the concatenated pair).
  """

  def loss(model, batch):
    logits_ab, logits_ba = pair_logits(model, pair_fields(batch, "chosen"),
                                       pair_fields(batch, "rejected"))
    per_pair = losses.preference_model_loss(logits_ab, jnp.ones_like(logits_ab),
                                            logits_ba=logits_ba, antisymmetric=True)
    s = losses.antisymmetrize(logits_ab, logits_ba)
    metrics = {"accuracy": jnp.mean(s > 0), "prob_chosen": jnp.mean(jax.nn.sigmoid(s))}
    if "chosen_gold_reward" in batch:
      gold = batch["chosen_gold_reward"] - batch["rejected_gold_reward"]
      metrics["gold_agreement"] = jnp.mean(s * gold > 0)
    return jnp.mean(per_pair), metrics

  return loss
