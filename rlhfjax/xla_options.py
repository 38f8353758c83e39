"""XLA compiler options of the library's compiled programs (train steps, samplers, rollouts).

On CPU, XLA (jaxlib 0.10) sends dot products to YNNPACK fusions. At the sizes this library runs on
a CPU (test models and the benchmark's 4-layer, 256-wide Llama) XLA's own dots are faster:
  - decode step (16 rows): 8.4 ms with YNNPACK, 4.4 ms without; the [16, 1024] MLP matmuls
    0.5 ms vs 0.15 ms each;
  - DPO train step (8 pairs x 192 packed tokens): 1.11 s vs 0.97 s; SFT (16 x 128): 1.33 s vs
    1.27 s (2-core AMD EPYC, interleaved medians; `experiments.bench.train_step`).
A lone large (2048^3) matmul is the exception (151 vs 112 GFLOP/s), which is why the benchmark's
CPU peak is measured with XLA's defaults. Since dense layers contract as 2-D matmuls
(`models.layers.flat_matmul`) the train steps no longer differ (DPO 0.543 s without YNNPACK vs
0.531 s with it, within noise, 2026-11-24); the decode step still does (3.4-3.5 vs 4.6-5.1 ms).
Other backends get XLA's defaults.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh

_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _cpu_options() -> dict | None:
  """`_CPU_OPTIONS` if this XLA knows them, else None (an XLA without them rejects them)."""
  try:
    jax.jit(lambda x: x + 1).lower(0.0).compile(compiler_options=_CPU_OPTIONS)
  except Exception:  # noqa: BLE001
    return None
  return dict(_CPU_OPTIONS)


def compiler_options(mesh: Mesh | None = None) -> dict | None:
  """The options to compile a program for `mesh`'s devices (default: JAX's default backend) with:
  `_CPU_OPTIONS` on CPU, None (XLA's defaults) elsewhere. Pass to `jax.jit(compiler_options=)`."""
  platform = (mesh.devices.flat[0].platform if mesh is not None else jax.default_backend())
  return _cpu_options() if platform == "cpu" else None
