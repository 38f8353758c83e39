"""Shared-prompt packing: one forward pass per prompt for all of its continuations.

A DPO pair (chosen, rejected) and a GRPO group (G samples) repeat the same prompt in every row.
In the data pipeline's layout (prompt left-padded to `prompt_len` columns, response right-padded
after it) the rows of a group differ only after column `prompt_len`, so the prompt's activations
are the same in each. Packing lays a group out as one row,

    [ prompt (Tp) | response 1 (Tr) | response 2 (Tr) | ... | response G (Tr) ]

Response g attends to the prompt and to itself only, and every token keeps the rotary position it
has in its own unpacked row, so the hidden states of each response equal the unpacked ones (up to
float summation order). The trunk then runs Tp + G Tr positions per group instead of G (Tp + Tr),
and attention computes only the blocks a response sees (`models.attention.shared_prefix_attention`:
Tp^2 + G Tr (Tp + Tr) query-key pairs, not (Tp + G Tr)^2).

Log-probs need the output layer only where a response token is predicted: the last prompt column
(it predicts each response's first token) and the response columns. `response_views` gathers
exactly those, Tr + 1 positions per response, which also skips the output layer on the prompt
(for G = 1 that is the only saving).

Rows of a [B, T] batch are grouped prompt-major: rows g*G .. g*G + G - 1 share a prompt (the
online trainers' layout; DPO interleaves chosen and rejected to get it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhfjax.models import default_positions


@dataclasses.dataclass(frozen=True)
class SharedPrompt:
  """Static packing settings.

  Attributes:
    prompt_len: Tp, the prompt's columns (the pipeline's `prompt_len`); responses start there.
    group_size: G, consecutive rows sharing one prompt.
  """
  prompt_len: int
  group_size: int

  def __post_init__(self):
    for name in ("prompt_len", "group_size"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"SharedPrompt.{name} must be a positive int, got {value!r}")

  def check_shape(self, tokens_BxT: Any) -> tuple[int, int]:
    """(P groups, Tr response columns) of a [B, T] batch; raises if it cannot be packed."""
    b, t = tokens_BxT.shape
    if b % self.group_size:
      raise ValueError(f"batch of {b} rows is not a whole number of groups of "
                       f"{self.group_size} (shared-prompt packing)")
    if t <= self.prompt_len:
      raise ValueError(f"sequences of {t} columns leave no response after the "
                       f"{self.prompt_len}-column prompt (shared-prompt packing)")
    return b // self.group_size, t - self.prompt_len


class PackedRows(NamedTuple):
  """One row per group, [P, Tp + G Tr]: the inputs of `Transformer.hidden_states`, and its
  static `shared_prefix` (Tp, Tr)."""
  tokens: jax.Array
  attention_mask: jax.Array
  positions: jax.Array
  shared_prefix: tuple[int, int]


def pack(tokens_BxT, attention_mask_BxT, shared: SharedPrompt) -> PackedRows:
  """Packs each group's rows into one row (the prompt taken from the group's first row)."""
  p, tr = shared.check_shape(tokens_BxT)
  g, tp = shared.group_size, shared.prompt_len
  positions_BxT = default_positions(attention_mask_BxT)

  def lay_out(x_BxT):
    x_PxGxT = x_BxT.reshape(p, g, tp + tr)
    return jnp.concatenate([x_PxGxT[:, 0, :tp], x_PxGxT[:, :, tp:].reshape(p, g * tr)], axis=1)

  return PackedRows(
      tokens=lay_out(tokens_BxT),
      attention_mask=lay_out(attention_mask_BxT),
      positions=lay_out(positions_BxT),
      shared_prefix=(tp, tr))


def response_views(h_PxLxD, tokens_BxT, shared: SharedPrompt) -> tuple[jax.Array, jax.Array]:
  """Each row's columns Tp - 1 .. T - 1 as the unpacked forward pass would give them.

  Args:
    h_PxLxD: hidden states of the packed rows.
    tokens_BxT: the unpacked batch.
    shared: the packing.

  Returns:
    (h_BxSxD, tokens_BxS), S = Tr + 1: the last prompt column then the row's response columns.
    Next-token statistics of these (`losses.token_logprobs` alignment) are those of the
    response tokens; `place_responses` puts them back in [B, T].
  """
  p, tr = shared.check_shape(tokens_BxT)
  g, tp = shared.group_size, shared.prompt_len
  d = h_PxLxD.shape[-1]
  last_prompt_PxGx1xD = jnp.broadcast_to(h_PxLxD[:, None, tp - 1:tp], (p, g, 1, d))
  responses_PxGxTrxD = h_PxLxD[:, tp:].reshape(p, g, tr, d)
  h_BxSxD = jnp.concatenate([last_prompt_PxGx1xD, responses_PxGxTrxD], axis=2)
  return h_BxSxD.reshape(p * g, tr + 1, d), tokens_BxT[:, tp - 1:]


def place_responses(x_BxS, shared: SharedPrompt) -> jax.Array:
  """Per-token values of `response_views` rows ([B, Tr + 1], entry 0 unused) back at their
  columns of the unpacked [B, Tp + Tr] batch, 0 on the prompt."""
  return jnp.pad(x_BxS[:, 1:], ((0, 0), (shared.prompt_len, 0)))


def check_shared_prompts(tokens_BxT, attention_mask_BxT, loss_mask_BxT,
                         shared: SharedPrompt) -> None:
  """Raises ValueError unless the batch can be packed: each group's rows agree on the prompt
  columns (tokens and mask) and no loss-masked token lies among them. A host-side (numpy) check
  of a data-pipeline batch, run before training on it: the packed forward pass reads only the
  first row's prompt of each group."""
  p, _ = shared.check_shape(tokens_BxT)
  g, tp = shared.group_size, shared.prompt_len
  for name, x_BxT in (("tokens", tokens_BxT), ("attention_mask", attention_mask_BxT)):
    prompts_PxGxTp = np.asarray(x_BxT)[:, :tp].reshape(p, g, tp)
    differ_P = np.any(prompts_PxGxTp != prompts_PxGxTp[:, :1], axis=(1, 2))
    if differ_P.any():
      raise ValueError(f"shared-prompt packing: the rows of group {int(np.argmax(differ_P))} "
                       f"differ in the {name} of their first {tp} (prompt) columns")
  trained = np.flatnonzero(np.any(np.asarray(loss_mask_BxT)[:, :tp] != 0, axis=1))
  if trained.size:
    raise ValueError(f"shared-prompt packing: row {int(trained[0])} has loss-masked tokens in "
                     f"its first {tp} (prompt) columns")
