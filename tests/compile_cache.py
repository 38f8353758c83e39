"""A persistent XLA compilation cache for one test module.

Experiment and trainer tests build many jitted closures that lower to the same programs (a model's
sampler, the same step in several stages); with the cache each such program compiles once per
module. Only programs above JAX's minimum compile time (1 s by default) are cached: caching every
small eager op as well (minimum 0) made a later module abort in XLA on CPU when it followed a
module run on another mesh in the same process.
"""

import contextlib

import jax
from jax.experimental.compilation_cache import compilation_cache


@contextlib.contextmanager
def persistent_compile_cache(path: str):
  """Caches compiled programs under `path` inside the block, then restores the setting."""
  previous = jax.config.jax_compilation_cache_dir
  compilation_cache.reset_cache()
  jax.config.update("jax_compilation_cache_dir", path)
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", previous)
    compilation_cache.reset_cache()
