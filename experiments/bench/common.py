"""Helpers every benchmark shares: timing compiled calls and reading compiled memory.

Timing: a jitted call returns before its work is done (asynchronous dispatch), so `timed` blocks on
the outputs; the first call of a jitted function includes tracing and compilation, so statistics
drop it (`median_seconds(times, skip=1)`). On a shared machine the load drifts while a benchmark
runs; `interleaved_times` times several contenders round-robin so that drift hits them alike, which
keeps their *ratio* meaningful even when absolute times are noisy.

Memory: `compiled_memory` compiles a jitted function ahead of time for the arguments' shapes
(arrays or `jax.ShapeDtypeStruct`s, nothing is allocated) and reports XLA's per-device
`memory_analysis()`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
  """Calls `fn(*args, **kwargs)`, waits for every output array; returns (outputs, seconds)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args, **kwargs))
  return out, time.perf_counter() - start


def median_seconds(times: Sequence[float], *, skip: int = 1) -> float:
  """Median of `times` after dropping the first `skip` (compiling) calls.

  Raises:
    ValueError: if no time is left after skipping.
  """
  kept = list(times)[skip:]
  if not kept:
    raise ValueError(f"median_seconds needs more than skip={skip} times, got {len(times)}")
  return statistics.median(kept)


def interleaved_times(calls: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, list]:
  """Times each zero-argument call `repeats` times, round-robin (a, b, c, a, b, c, ...).

  Each call is blocked on (see `timed`); a call that carries state (a train step) keeps it in its
  closure. Returns every time, the compiling first round included: drop it with `median_seconds`.
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      times[name].append(timed(call)[1])
  return times


# Fields of XLA's `CompiledMemoryStats`, per device, in bytes.
MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "temp_size_in_bytes", "generated_code_size_in_bytes")


def memory_stats(compiled: jax.stages.Compiled) -> dict[str, int]:
  """Per-device bytes of a compiled computation, plus `peak_bytes`.

  peak = arguments + outputs - aliased (donated inputs reused as outputs) + temporaries: the
  buffers live at once when the computation runs. XLA's own `peak_memory_in_bytes` is reported
  as well where the backend fills it in (0 otherwise).
  """
  analysis = compiled.memory_analysis()
  if analysis is None:
    raise ValueError("this backend gives no memory analysis for compiled computations")
  stats = {field: int(getattr(analysis, field)) for field in MEMORY_FIELDS}
  stats["peak_bytes"] = (stats["argument_size_in_bytes"] + stats["output_size_in_bytes"]
                         - stats["alias_size_in_bytes"] + stats["temp_size_in_bytes"])
  stats["xla_peak_memory_in_bytes"] = int(getattr(analysis, "peak_memory_in_bytes", 0) or 0)
  return stats


def compiled_memory(jitted: Any, *args: Any, **kwargs: Any) -> dict[str, int]:
  """`memory_stats` of `jitted` compiled ahead of time for these (possibly abstract) arguments."""
  return memory_stats(jitted.lower(*args, **kwargs).compile())


def tree_bytes(tree: Any) -> int:
  """Bytes of every array leaf of `tree` (arrays or `jax.ShapeDtypeStruct`s), summed."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def abstract(tree: Any) -> Any:
  """`jax.ShapeDtypeStruct`s (with shardings, where the leaves have them) of a pytree."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def matmul_peak_flops(size: int = 2048, *, repeats: int = 5, dtype: Any = "float32") -> float:
  """FLOP/s of the fastest of `repeats` jit-compiled `size`^3 matmuls (2 size^3 FLOPs each).

  The CPU "peak" of an MFU: what XLA reaches on the one operation a transformer is made of, timed
  in the same process as the model, so the ratio does not depend on the machine's nominal clock.
  The compiling call is not counted.
  """
  if size < 1 or repeats < 1:
    raise ValueError(f"size ({size}) and repeats ({repeats}) must be >= 1")
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (size, size), dtype)
  b = jax.random.normal(kb, (size, size), dtype)
  matmul = jax.jit(lambda a, b: a @ b)
  timed(matmul, a, b)
  return 2 * size**3 / min(timed(matmul, a, b)[1] for _ in range(repeats))


def torch_matmul_peak_flops(size: int = 2048, *, repeats: int = 5) -> float | None:
  """The same measurement as `matmul_peak_flops` with float32 PyTorch on the CPU (None without
  torch): context for how far XLA's CPU matmul is from the vendor library's."""
  try:
    import torch
  except ImportError:
    return None
  gen = torch.Generator().manual_seed(0)
  a, b = (torch.randn(size, size, generator=gen) for _ in range(2))
  a @ b
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best
