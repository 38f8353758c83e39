"""Optimizer construction from plain settings: schedule and clipping (gradient accumulation is the
train step's: `steps.make_train_step(accumulation_steps=)`)."""

from __future__ import annotations

from typing import Any

import optax

OPTIMIZERS = ("adamw", "adam_mini", "sgd")


def learning_rate_schedule(learning_rate: float, *, warmup_steps: int = 0,
                           total_steps: int = 0) -> optax.Schedule:
  """Linear warmup then cosine decay to 10% over `total_steps`; constant if total_steps is 0."""
  if learning_rate <= 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
  if warmup_steps < 0 or total_steps < 0:
    raise ValueError(f"warmup_steps ({warmup_steps}) and total_steps ({total_steps}) must be >= 0")
  if total_steps == 0:
    if warmup_steps == 0:
      return optax.constant_schedule(learning_rate)
    return optax.linear_schedule(0.0, learning_rate, warmup_steps)
  if warmup_steps >= total_steps:
    raise ValueError(f"warmup_steps ({warmup_steps}) must be < total_steps ({total_steps})")
  return optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps, total_steps, end_value=0.1 * learning_rate)


def make_optimizer(
    name: str,
    learning_rate: float,
    *,
    warmup_steps: int = 0,
    total_steps: int = 0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
    logical_axes: Any = None,
) -> optax.GradientTransformation:
  """Builds `clip -> optimizer(schedule)`.

  Args:
    name: one of `OPTIMIZERS`.
    learning_rate: peak learning rate.
    warmup_steps, total_steps: schedule (see `learning_rate_schedule`).
    b1, b2, eps, weight_decay: Adam-family settings (sgd uses b1 as momentum).
    clip_norm: global-norm clipping threshold, or None for no clipping.
    logical_axes: optional logical axis names of the params (used by adam_mini's partition).

  Raises:
    ValueError: naming the bad setting.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer name must be one of {OPTIMIZERS}, got {name!r}")
  if clip_norm is not None and clip_norm <= 0:
    raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
  schedule = learning_rate_schedule(
      learning_rate, warmup_steps=warmup_steps, total_steps=total_steps)
  if name == "adamw":
    core = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  elif name == "adam_mini":
    # Imported here: optim is optional for other optimizers.
    from rlhfjax.optim import BlockPartition, adam_mini

    core = adam_mini(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                     partition=BlockPartition(logical_axes=logical_axes))
  else:
    core = optax.sgd(schedule, momentum=b1 or None)
  parts = ([optax.clip_by_global_norm(clip_norm)] if clip_norm is not None else []) + [core]
  return optax.chain(*parts)
