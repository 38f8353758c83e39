"""Fixed-shape numpy batches in the layout every trainer uses.

Layout: the prompt is LEFT-padded to `prompt_len` and the response (EOS included) RIGHT-padded to
`response_len`, so every row is `[pad.. prompt | response ..pad]` with T = prompt_len + response_len
and the response always starts at column `prompt_len`. Left-padding the prompt puts the last prompt
token at the same column in every row, which is where batched sampling starts generating.

Masks are int32 (1 on real tokens). A sequence longer than its slot is an error, never truncated.

Dimension letters: B batch, T = Tp + Tr, Tp prompt length, Tr response length.
"""

from collections.abc import Mapping, Sequence

import numpy as np

from rlhfjax.data.validation import check_int


def _check_length(value, name):
  check_int(value, name, minimum=1)


def _field(examples, key):
  """`[ex[key] for ex in examples]`, with a ValueError naming the missing field."""
  if isinstance(examples, Mapping) or not isinstance(examples, Sequence) or not examples:
    raise ValueError(
        f"examples must be a non-empty sequence of dicts, got {type(examples).__name__}"
    )
  values = []
  for i, example in enumerate(examples):
    if not isinstance(example, Mapping):
      raise ValueError(f"example {i} is a {type(example).__name__}, expected a dict of fields")
    if key not in example:
      raise ValueError(f"example {i} has no field {key!r} (it has {sorted(example)})")
    values.append(example[key])
  return values


def _token_ids(value, *, field, index):
  """A non-empty 1-D int32 array of non-negative token ids, or a ValueError saying what is wrong."""
  ids_T = np.asarray(value)
  if ids_T.ndim != 1:
    raise ValueError(f"{field} of example {index} must be 1-D token ids, got shape {ids_T.shape}")
  if ids_T.size == 0:
    raise ValueError(f"{field} of example {index} is empty")
  if not np.issubdtype(ids_T.dtype, np.integer):
    raise ValueError(f"{field} of example {index} must hold integer ids, got dtype {ids_T.dtype}")
  if np.any(ids_T < 0):
    raise ValueError(f"{field} of example {index} holds negative ids: {ids_T.tolist()}")
  if np.any(ids_T > np.iinfo(np.int32).max):  # Would wrap around in the int32 cast.
    raise ValueError(f"{field} of example {index} holds ids beyond int32: "
                     f"{ids_T[ids_T > np.iinfo(np.int32).max].tolist()}")
  return ids_T.astype(np.int32)


def pad_sequences(sequences, length, *, side, field, pad_id=0):
  """Stacks variable-length token sequences into a padded [B, length] batch.

  Args:
    sequences: B sequences of token ids (lists or 1-D integer arrays).
    length: the slot length; a longer sequence is an error.
    side: "left" (prompts) or "right" (responses).
    field: the field's name, used in error messages.
    pad_id: id written into padding positions.

  Returns:
    `(tokens_BxL, mask_BxL)`, both int32, mask 1 on real tokens.

  Raises:
    ValueError: on a sequence longer than `length`, an empty or non-integer sequence, or a bad
      `side` / `length`.
  """
  if side not in ("left", "right"):
    raise ValueError(f"side must be 'left' or 'right', got {side!r}")
  _check_length(length, f"{field} slot length")
  tokens_BxL = np.full((len(sequences), length), pad_id, np.int32)
  mask_BxL = np.zeros((len(sequences), length), np.int32)
  for b, value in enumerate(sequences):
    ids_T = _token_ids(value, field=field, index=b)
    if len(ids_T) > length:
      raise ValueError(
          f"{field} of example {b} has {len(ids_T)} tokens, more than the limit {length}"
      )
    columns = slice(length - len(ids_T), length) if side == "left" else slice(0, len(ids_T))
    tokens_BxL[b, columns] = ids_T
    mask_BxL[b, columns] = 1
  return tokens_BxL, mask_BxL


def _prompt_response_layout(prompts, responses, *, prompt_len, response_len, response_field):
  """Concatenated `[left-padded prompt | right-padded response]` rows with their masks."""
  _check_length(prompt_len, "prompt_len")
  _check_length(response_len, "response_len")
  prompt_BxTp, prompt_mask_BxTp = pad_sequences(prompts, prompt_len, side="left", field="prompt")
  response_BxTr, response_mask_BxTr = pad_sequences(
      responses, response_len, side="right", field=response_field
  )
  tokens_BxT = np.concatenate([prompt_BxTp, response_BxTr], axis=1)
  attention_mask_BxT = np.concatenate([prompt_mask_BxTp, response_mask_BxTr], axis=1)
  loss_mask_BxT = np.concatenate([np.zeros_like(prompt_mask_BxTp), response_mask_BxTr], axis=1)
  return tokens_BxT, attention_mask_BxT, loss_mask_BxT


def sft_batch(examples, *, prompt_len, response_len):
  """A supervised batch from examples with `prompt` and `response` token ids.

  Args:
    examples: B dicts with 1-D int fields `prompt` and `response` (EOS included in the response).
    prompt_len: Tp, the prompt slot (left-padded).
    response_len: Tr, the response slot (right-padded).

  Returns:
    dict of int32 [B, Tp + Tr] arrays: `tokens`, `attention_mask` (real tokens), `loss_mask`
    (response tokens, EOS included).
  """
  tokens_BxT, attention_mask_BxT, loss_mask_BxT = _prompt_response_layout(
      _field(examples, "prompt"), _field(examples, "response"),
      prompt_len=prompt_len, response_len=response_len, response_field="response",
  )
  return {"tokens": tokens_BxT, "attention_mask": attention_mask_BxT, "loss_mask": loss_mask_BxT}


def _optional_scalars(examples, key):
  """float32 [B] of `key` if every example has it, None if none has it, else a ValueError."""
  has_key = [isinstance(ex, Mapping) and key in ex for ex in examples]
  if not any(has_key):
    return None
  if not all(has_key):
    raise ValueError(f"field {key!r} is present in some examples but not all")
  values = []
  for index, ex in enumerate(examples):
    value = np.asarray(ex[key])
    if value.size != 1 or not (np.issubdtype(value.dtype, np.number)
                               and not np.issubdtype(value.dtype, np.complexfloating)):
      raise ValueError(f"{key} of example {index} must be a real number, got {ex[key]!r}")
    if not np.isfinite(value.item()):
      raise ValueError(f"{key} of example {index} must be finite, got {value.item()}")
    values.append(value.item())
  return np.asarray(values, np.float32)


def preference_batch(examples, *, prompt_len, response_len):
  """A pairwise batch from examples with `prompt`, `chosen` and `rejected` token ids.

  Both sides use the `sft_batch` layout, with the same prompt.

  Args:
    examples: B dicts with 1-D int fields `prompt`, `chosen`, `rejected`; optionally scalar
      `chosen_gold_reward` and `rejected_gold_reward` (in all examples or none).
    prompt_len: Tp, the prompt slot (left-padded).
    response_len: Tr, the slot of each response (right-padded).

  Returns:
    dict with int32 [B, Tp + Tr] `{chosen,rejected}_{tokens,attention_mask,loss_mask}` and, when
    present in the examples, float32 [B] `chosen_gold_reward` and `rejected_gold_reward`.
  """
  prompts = _field(examples, "prompt")
  batch = {}
  for side in ("chosen", "rejected"):
    tokens_BxT, attention_mask_BxT, loss_mask_BxT = _prompt_response_layout(
        prompts, _field(examples, side),
        prompt_len=prompt_len, response_len=response_len, response_field=side,
    )
    batch[f"{side}_tokens"] = tokens_BxT
    batch[f"{side}_attention_mask"] = attention_mask_BxT
    batch[f"{side}_loss_mask"] = loss_mask_BxT
    gold_B = _optional_scalars(examples, f"{side}_gold_reward")
    if gold_B is not None:
      batch[f"{side}_gold_reward"] = gold_B
  return batch


def prompt_batch(examples, *, prompt_len, response_len=None):
  """A batch of left-padded prompts for sampling, with reference answers when asked for.

  Args:
    examples: B dicts with a 1-D int field `prompt`; with `response_len`, also `answer`.
    prompt_len: Tp, the prompt slot (left-padded).
    response_len: if given, the examples' `answer` (the verifiable task's reference, EOS
      included) is returned right-padded to this length.

  Returns:
    dict with int32 [B, Tp] `prompt_tokens`, `prompt_mask` and, with `response_len`, int32
    [B, Tr] `answer_tokens`, `answer_mask`.
  """
  _check_length(prompt_len, "prompt_len")
  prompt_BxTp, prompt_mask_BxTp = pad_sequences(
      _field(examples, "prompt"), prompt_len, side="left", field="prompt"
  )
  batch = {"prompt_tokens": prompt_BxTp, "prompt_mask": prompt_mask_BxTp}
  if response_len is not None:
    _check_length(response_len, "response_len")
    batch["answer_tokens"], batch["answer_mask"] = pad_sequences(
        _field(examples, "answer"), response_len, side="right", field="answer"
    )
  return batch
