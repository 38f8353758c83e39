"""The generic training loop: steps, live progress, metrics, periodic eval, checkpoints, resume.

Resumption is exact: the loop restores the latest checkpoint in `<run_dir>/checkpoints`, and
batches are a pure function of the step (`get_batch(step)`), so a run killed mid-way and restarted
on its run directory ends with the same parameters as an uninterrupted one. `run_loop` is the loop
itself, shared with the online trainer (`online.train_online`).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from rlhfjax import sharding as shd
from rlhfjax.train.checkpoint import Checkpointer
from rlhfjax.train.metrics import MetricsWriter, to_python
from rlhfjax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """How long to train and how often to log, evaluate and checkpoint (0 disables)."""
  num_steps: int
  log_every: int = 10
  eval_every: int = 0
  checkpoint_every: int = 0
  max_to_keep: int = 2
  progress: bool = True
  name: str = "train"
  # Steps dispatched but not finished before the loop waits for the oldest. JAX dispatch is
  # asynchronous: unbounded, the host would queue every step at once, and on simulated CPU devices
  # (one shared thread pool) deep queues of collectives can miss XLA's 40 s rendezvous deadline,
  # which aborts the process. Two keeps the host preparing step k + 1 while step k runs.
  max_steps_in_flight: int = 2

  def __post_init__(self):
    for field in ("num_steps", "log_every", "eval_every", "checkpoint_every", "max_to_keep"):
      if getattr(self, field) < 0:
        raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
    if self.log_every == 0:
      raise ValueError("log_every must be >= 1")
    if self.max_steps_in_flight < 1:
      raise ValueError(f"max_steps_in_flight must be >= 1, got {self.max_steps_in_flight}")


def _due(step: int, every: int, last: int) -> bool:
  return step == last or (every > 0 and step % every == 0)


def train(
    *,
    run_dir: str,
    state: TrainState,
    state_shardings: TrainState,
    step_fn: Callable[..., tuple[TrainState, dict]],
    get_batch: Callable[[int], Mapping[str, Any]],
    mesh: Mesh,
    settings: LoopSettings,
    frozen: Sequence[Any] = (),
    eval_fn: Callable[[TrainState], Mapping[str, Any]] | None = None,
) -> tuple[TrainState, list[dict]]:
  """Runs `step_fn` from step 0 (or the latest checkpoint) to `settings.num_steps`.

  Args:
    run_dir: directory for `metrics.jsonl`, TensorBoard events and `checkpoints/`.
    state: the initial state (ignored if a checkpoint exists; used as the restore target).
    state_shardings: shardings of the state, used to restore checkpoints in place.
    step_fn: a compiled step `step_fn(state, batch, *frozen) -> (state, metrics)`.
    get_batch: host-local batch (dict of numpy arrays) for a given step index.
    mesh: the device mesh.
    settings: loop settings.
    frozen: extra non-trained inputs passed to every step (e.g. reference params).
    eval_fn: `eval_fn(state) -> metrics`, called every `eval_every` steps and at the end.

  Returns:
    (final state, list of logged records).
  """
  target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings)

  def advance(state: TrainState, step: int) -> tuple[TrainState, dict]:
    return step_fn(state, shd.global_batch(get_batch(step - 1), mesh), *frozen)

  return run_loop(run_dir=run_dir, state=state, advance=advance, settings=settings,
                  eval_fn=eval_fn, restore_target=target)


def run_loop(
    *,
    run_dir: str,
    state: Any,
    advance: Callable[[Any, int], tuple[Any, Mapping[str, Any]]],
    settings: LoopSettings,
    eval_fn: Callable[[Any], Mapping[str, Any]] | None = None,
    restore_target: Any = None,
    postfix: Sequence[str] | None = None,
) -> tuple[Any, list[dict]]:
  """The loop of every trainer: steps 1..num_steps with live progress, metrics, periodic eval,
  checkpoints, and resumption from the latest checkpoint in `<run_dir>/checkpoints`.

  Resumption is exact when `advance` is a pure function of (state, step): a checkpoint saved
  after step k holds the whole state, and the run goes on with step k + 1. `train` (one
  optimizer step per batch) and `online.train_online` (one rollout-and-update iteration per
  step) are this loop with their own `advance`.

  Args:
    run_dir: directory for `metrics.jsonl`, TensorBoard events and `checkpoints/`.
    state: the initial state, a pytree of arrays (NamedTuples are saved by their fields).
    advance: `advance(state, step) -> (state, scalar metrics)` for step = 1, 2, ...
    settings: loop settings.
    eval_fn: `eval_fn(state) -> metrics`, called every `eval_every` steps and at the end.
    restore_target: what a checkpoint is restored into (arrays or `ShapeDtypeStruct`s with
      shardings); default `state`.
    postfix: the metrics shown on the progress bar; default the first four.

  Returns:
    (final state, list of logged records).
  """
  from tqdm.auto import tqdm  # Lazy: only the loop needs the progress bar.

  checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"),
                              max_to_keep=max(settings.max_to_keep, 1))
  start = checkpointer.latest_step() or 0
  if start > settings.num_steps:
    raise ValueError(f"{run_dir} holds a checkpoint at step {start}, past num_steps = "
                     f"{settings.num_steps}: continue with num_steps >= {start}, or use another "
                     "run directory")
  if start:
    state = checkpointer.restore(state if restore_target is None else restore_target, start)
  # Records past the restored step (all of them without a checkpoint) are from the run being
  # redone: drop them, or a rerun would log its steps twice.
  writer = MetricsWriter(run_dir, resume_step=start)
  records: list[dict] = []
  last = settings.num_steps
  bar = tqdm(total=last, initial=start, desc=settings.name, disable=not settings.progress,
             dynamic_ncols=True, leave=False)
  t0 = time.perf_counter()
  in_flight: collections.deque = collections.deque()
  try:
    for step in range(start + 1, last + 1):
      state, metrics = advance(state, step)
      in_flight.append(metrics)
      if len(in_flight) >= settings.max_steps_in_flight:
        jax.block_until_ready(in_flight.popleft())
      if _due(step, settings.log_every, last):
        metrics = to_python(jax.device_get(metrics))
        metrics["steps_per_s"] = (step - start) / (time.perf_counter() - t0)
        records.append(writer.write(step, metrics))
        shown = list(metrics)[:4] if postfix is None else [k for k in postfix if k in metrics]
        bar.set_postfix({k: f"{metrics[k]:.4g}" for k in shown})
      if eval_fn is not None and _due(step, settings.eval_every, last):
        records.append(writer.write(step, eval_fn(state), split="eval"))
      if settings.checkpoint_every and _due(step, settings.checkpoint_every, last):
        checkpointer.save(step, state)
      bar.update(1)
  finally:
    bar.close()
    writer.close()
    checkpointer.close()
  return state, records
