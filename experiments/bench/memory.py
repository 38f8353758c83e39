"""Memory planner: per-device bytes of DPO and GRPO training for Llama-3 8B / 70B on real meshes.

    python -m experiments.bench.memory [--json PATH] [--config.dpo.seq_len=2048]

For every model x algorithm x optimizer x hardware layout it prints the per-device bytes of

- params: the policy, sharded by `rlhfjax.sharding`'s logical rules on the layout's mesh;
- reference: the frozen reference policy (same dtype and sharding; DPO and GRPO both keep one);
- grads: one gradient per parameter, sharded like it;
- opt_state: `make_optimizer(name)`'s state, sharded as `rlhfjax.train.state` shards it (AdamW
  keeps two parameter-sized moments; Adam-mini one plus a second moment per block);
- activations: what the policy's forward pass keeps for its backward pass (formula below);
- kv_cache (GRPO only): the rollout's key/value cache, which lives during generation (without
  gradients or activations) rather than during the train step,

their sum (`peak`: the larger of the train step and the rollout), whether it fits in
`usable_fraction` of the device's memory, and the largest number of sequences per data shard that
would fit (`max_seqs`). Sequences per data shard: the batch is split over the data and fsdp mesh
axes; tensor-parallel peers share their sequences.

The `remat_*` columns are the same with every decoder block rematerialised (`TransformerConfig(
remat="full")`, `jax.checkpoint` per block: only each block's input is kept, b T L c D, plus one
block's activations recomputed during the backward pass); `validation` checks this projection too.

Method. Shapes come from `jax.eval_shape` of the real model and optimizer (nothing is allocated)
and per-device shard shapes from `NamedSharding.shard_shape` on a `jax.sharding.AbstractMesh` of the
layout (no devices needed). Ahead-of-time compilation for GPU/TPU targets needs their compiler
plugins (`jax.experimental.topologies`), which a CPU-only machine lacks; the run records whether it
was available. Activations are therefore estimated by the formula below, and the formula is checked
against XLA's own `memory_analysis()` of the real jit-compiled DPO and GRPO train steps on CPU for
small configurations (`validation` in the results: predicted / compiled peak).

Activation formula (this library's model: unrolled layers, no rematerialisation, dense softmax
attention with float32 scores). Per layer and per token, with a compute dtype of c bytes and tensor
parallelism t over heads, MLP width and vocabulary (t is 1 for a dimension it does not divide):

    A_layer = c (1.5 D + 2 (H + K) Dh / t + 4 F / t) + (8 + c) H T / t
    A_head  = 2.5 * 4 V / t

and for b sequences of length T on a device: activations = b T (L A_layer + A_head).

Reading: per layer the residual stream and normed inputs (1.5 D-sized tensors, some fused away), q,
k, v and the attention output ((H + K) Dh, twice), the SwiGLU gate, up and product with a working
buffer of the backward pass (4 F-sized tensors: measured 3.6 per layer as the slope in L at two
widths F; `models.layers.swiglu` recomputes silu(gate) in the backward pass rather than keeping it
and sigmoid(gate), which made 5), and per query the softmax scores over T keys: float32 logits and
probabilities plus the probabilities in the compute dtype (8 + c bytes per score, the T^2 term that
dominates at long contexts); for the output head the float32 logits, their gradient and half a
shifted copy (2.5 V-sized float32 tensors). The tensor counts were measured, not assumed: they are
the per-token slopes of XLA's `memory_analysis()` of the compiled DPO train step on CPU in float32
when D, H, K, Dh, F, V, T and L are varied one at a time (the CPU compiler computes bfloat16 in
float32, so CPU measures counts, and c scales them on accelerators). The frozen reference's forward
pass keeps nothing for a backward pass and XLA schedules it before the policy's activations pile up,
so it adds no measurable peak. `validation` re-checks the formula on configurations it was not
fitted on.

Precision follows the library: float32 parameters and optimizer state (`param_dtype`) with bfloat16
compute (`compute_dtype`), both configurable.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from experiments import common
from experiments.bench import common as bench
from rlhfjax import losses
from rlhfjax import sharding as shd
# Named configs, `llama3_70b` included (Llama-3-70B, HF meta-llama/Meta-Llama-3-70B).
from rlhfjax.models import Transformer, TransformerConfig, get_config as model_config
from rlhfjax.models import num_params
from rlhfjax.train import objectives, optimizers
from rlhfjax.train import state as state_lib
from rlhfjax.train import steps as steps_lib

ALGORITHMS = ("dpo", "grpo")
GB = 1e9


@dataclasses.dataclass(frozen=True)
class Layout:
  """A hardware target: device count, memory per device and the (data, fsdp, tensor) mesh."""
  name: str
  hbm_gb: float
  data: int
  fsdp: int
  tensor: int

  def __post_init__(self):
    for field in ("data", "fsdp", "tensor"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"layout {self.name!r}: {field} ({value!r}) must be a positive int")
    if not self.hbm_gb > 0:
      raise ValueError(f"layout {self.name!r}: hbm_gb ({self.hbm_gb!r}) must be > 0")

  @property
  def num_devices(self) -> int:
    return self.data * self.fsdp * self.tensor

  def mesh(self) -> AbstractMesh:
    """The mesh without devices: enough for shardings and their shard shapes."""
    return AbstractMesh((self.data, self.fsdp, self.tensor), shd.MESH_AXES,
                        axis_types=(AxisType.Auto,) * len(shd.MESH_AXES))


def sharded_bytes(tree: Any, shardings: Any) -> int:
  """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) under `shardings`."""
  return sum(math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


@functools.lru_cache(maxsize=8)
def _abstract_model(cfg: TransformerConfig):
  """(graphdef, abstract params, logical specs), traced once per config (70B takes seconds)."""
  return state_lib.abstract_model(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


@functools.lru_cache(maxsize=16)
def _abstract_opt_state(cfg: TransformerConfig, optimizer: str):
  _, params, logical = _abstract_model(cfg)
  return jax.eval_shape(optimizers.make_optimizer(optimizer, 1e-5, logical_axes=logical).init,
                        params)


def state_bytes(cfg: TransformerConfig, mesh, optimizer_names) -> dict[str, Any]:
  """Per-device bytes of the parameters and of each optimizer's state (from eval_shape)."""
  _, params, logical = _abstract_model(cfg)
  p_shardings = state_lib.param_shardings(params, logical, mesh)
  out = {"params": sharded_bytes(params, p_shardings), "opt_state": {}}
  for name in optimizer_names:
    opt_state = _abstract_opt_state(cfg, name)
    out["opt_state"][name] = sharded_bytes(
        opt_state, state_lib.opt_state_shardings(opt_state, params, p_shardings, mesh))
  return out


def _split(n: int, t: int) -> int:
  """The tensor-parallel divisor of a dimension of size n: t if it divides n (the logical rules
  replicate a dimension otherwise)."""
  return t if n % t == 0 else 1


def activation_terms(cfg: TransformerConfig, *, seq_len: int, tensor: int = 1) -> dict[str, float]:
  """Bytes per token of the formula in the module docstring: per layer and for the head."""
  c = jnp.dtype(cfg.dtype).itemsize
  d, h, k, dh, f, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                       cfg.mlp_dim, cfg.vocab_size)
  t_heads, t_mlp, t_vocab = _split(k, tensor), _split(f, tensor), _split(v, tensor)
  layer = c * (1.5 * d + 2 * (h + k) * dh / t_heads + 4 * f / t_mlp)
  layer += (8 + c) * h * seq_len / t_heads
  return {"layer": layer, "head": 2.5 * 4 * v / t_vocab, "block_input": c * d}


def activation_bytes(cfg: TransformerConfig, *, sequences: float, seq_len: int,
                     tensor: int = 1, remat: bool = False) -> float:
  """Per-device activations of the policy's forward pass for `sequences` sequences.

  With `remat`, the projection for rematerialised blocks: every block's input plus one block.
  """
  terms = activation_terms(cfg, seq_len=seq_len, tensor=tensor)
  if remat:
    per_token = cfg.num_layers * terms["block_input"] + terms["layer"] + terms["head"]
  else:
    per_token = cfg.num_layers * terms["layer"] + terms["head"]
  return sequences * seq_len * per_token


def kv_cache_bytes(cfg: TransformerConfig, *, sequences: float, seq_len: int,
                   tensor: int = 1) -> float:
  """Rollout KV cache: keys and values [L, b, S, K, Dh] in the compute dtype."""
  c = jnp.dtype(cfg.dtype).itemsize
  k = cfg.num_kv_heads
  return 2 * cfg.num_layers * sequences * seq_len * k * cfg.head_dim * c / _split(k, tensor)


def _sequences(config: ml_collections.ConfigDict, algorithm: str) -> int:
  w = config[algorithm]
  return 2 * w.pairs_per_shard if algorithm == "dpo" else w.sequences_per_shard


def _check_config(config: ml_collections.ConfigDict) -> None:
  unknown = [a for a in config.algorithms if a not in ALGORITHMS]
  if unknown:
    raise ValueError(f"config.algorithms: {unknown} not in {ALGORITHMS}")
  unknown = [o for o in config.optimizers if o not in optimizers.OPTIMIZERS]
  if unknown:
    raise ValueError(f"config.optimizers: {unknown} not in {optimizers.OPTIMIZERS}")
  if not 0 < config.usable_fraction <= 1:
    raise ValueError(f"config.usable_fraction ({config.usable_fraction}) must be in (0, 1]")
  for algorithm in config.algorithms:
    if _sequences(config, algorithm) < 1 or config[algorithm].seq_len < 2:
      raise ValueError(f"config.{algorithm}: need >= 1 sequence per shard and seq_len >= 2")


def plan_rows(config: ml_collections.ConfigDict) -> list[dict]:
  """One row per model x layout x algorithm x optimizer (see the module docstring)."""
  _check_config(config)
  rows = []
  for model in config.models:
    cfg = model_config(model, dtype=config.compute_dtype, param_dtype=config.param_dtype)
    for layout in layouts(config):
      states = state_bytes(cfg, layout.mesh(), config.optimizers)
      budget = config.usable_fraction * layout.hbm_gb * GB
      for algorithm in config.algorithms:
        sequences, seq_len = _sequences(config, algorithm), config[algorithm].seq_len
        per_sequence = {remat: activation_bytes(cfg, sequences=1, seq_len=seq_len,
                                                tensor=layout.tensor, remat=remat)
                        for remat in (False, True)}
        kv = 0.0
        if algorithm == "grpo":
          kv = kv_cache_bytes(cfg, sequences=config.grpo.rollout_sequences_per_shard,
                              seq_len=seq_len, tensor=layout.tensor)
        for opt in config.optimizers:
          # Policy, reference and gradients, plus the optimizer state.
          fixed = 3 * states["params"] + states["opt_state"][opt]
          rollout_peak = fixed - states["params"] + kv  # No gradients while generating.
          row = {
              "model": model, "params_B": num_params(cfg) / 1e9, "layout": layout.name,
              "devices": layout.num_devices,
              "mesh": f"{layout.data}x{layout.fsdp}x{layout.tensor}",
              "algorithm": algorithm, "optimizer": opt, "seq_len": seq_len,
              "seqs_per_shard": sequences, "global_seqs": sequences * layout.data * layout.fsdp,
              "params_GB": states["params"] / GB, "reference_GB": states["params"] / GB,
              "grads_GB": states["params"] / GB, "opt_state_GB": states["opt_state"][opt] / GB,
              "kv_cache_GB": kv / GB, "hbm_GB": layout.hbm_gb,
          }
          for remat, prefix in ((False, ""), (True, "remat_")):
            act = sequences * per_sequence[remat]
            peak = max(fixed + act, rollout_peak)
            row.update({
                f"{prefix}activations_GB": act / GB, f"{prefix}peak_GB": peak / GB,
                f"{prefix}fits": bool(peak <= budget),
                f"{prefix}max_seqs": max(0, int((budget - fixed) // per_sequence[remat]))
                if rollout_peak <= budget else 0,
            })
          rows.append(row)
  return rows


def layouts(config: ml_collections.ConfigDict) -> list[Layout]:
  return [Layout(**dict(layout)) for layout in config.layouts]


# -- validation against XLA's compiled memory analysis (CPU) ------------------------------------


def _grpo_loss(reference_graphdef):
  """GRPO on the fly: policy and reference per-token log-probs, clipped surrogate + k3 KL."""

  def loss(model, batch, reference_params):
    tokens, attention_mask, loss_mask = (batch["tokens"], batch["attention_mask"],
                                         batch["loss_mask"])
    logp_BxT, _ = objectives.sequence_logps(model, tokens, attention_mask, loss_mask)
    ref_logp_BxT, _ = objectives.sequence_logps(
        nnx.merge(reference_graphdef, reference_params), tokens, attention_mask, loss_mask)
    return losses.grpo(logp_BxT, batch["old_logps"], jax.lax.stop_gradient(ref_logp_BxT),
                       batch["advantages"], loss_mask)

  return loss


def _abstract_batch(algorithm, sequences, seq_len, sharding):
  tokens = jax.ShapeDtypeStruct((sequences, seq_len), jnp.int32, sharding=sharding)
  if algorithm == "dpo":
    pairs = jax.ShapeDtypeStruct((sequences // 2, seq_len), jnp.int32, sharding=sharding)
    return {f"{side}_{key}": pairs for side in ("chosen", "rejected")
            for key in ("tokens", "attention_mask", "loss_mask")}
  floats = jax.ShapeDtypeStruct((sequences, seq_len), jnp.float32, sharding=sharding)
  return {"tokens": tokens, "attention_mask": tokens, "loss_mask": tokens, "old_logps": floats,
          "advantages": jax.ShapeDtypeStruct((sequences,), jnp.float32, sharding=sharding)}


def compiled_train_step_memory(cfg: TransformerConfig, algorithm: str, optimizer: str, *,
                               sequences: int, seq_len: int) -> dict[str, int]:
  """XLA's memory analysis of the real train step (policy + frozen reference), on one device."""
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  graphdef, params, logical = _abstract_model(cfg)
  tx = optimizers.make_optimizer(optimizer, 1e-5, logical_axes=logical)
  abstract = state_lib.TrainState(jax.ShapeDtypeStruct((), jnp.int32), params,
                                  jax.eval_shape(tx.init, params))
  shardings = state_lib.state_shardings(abstract, logical, mesh)
  if algorithm == "dpo":
    loss_fn = objectives.make_preference_loss("dpo", {"beta": 0.1}, reference_graphdef=graphdef)
  else:
    loss_fn = _grpo_loss(graphdef)
  step = steps_lib.make_train_step(loss_fn, tx, graphdef, mesh, shardings, (shardings.params,))
  with_sharding = lambda tree, sh: jax.tree.map(  # noqa: E731
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
  batch = _abstract_batch(algorithm, sequences, seq_len, shd.batch_sharding(mesh, 1))
  return bench.compiled_memory(step, with_sharding(abstract, shardings), batch,
                               with_sharding(params, shardings.params))


def validate(config: ml_collections.ConfigDict) -> list[dict]:
  """Predicted vs compiled peak bytes of small configurations on one CPU device, without and with
  every block rematerialised (the `remat_` columns: `remat="full"` with `scan_layers=True`; in an
  unrolled stack XLA:CPU schedules every block's recomputation early and the peak barely moves).

  Compiled peak: XLA's arguments + outputs - donated + temporaries of the whole train step.
  Predicted: policy, reference and gradients (3 x params) + optimizer state + activations.
  """
  rows = []
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  for case in config.validation.cases:
    case = dict(case)
    sequences, seq_len, opt = case.pop("sequences"), case.pop("seq_len"), case.pop("optimizer")
    cfg = TransformerConfig(**case, dtype=config.validation.compute_dtype)
    states = state_bytes(cfg, mesh, (opt,))
    predicted = {remat: 3 * states["params"] + states["opt_state"][opt]
                 + activation_bytes(cfg, sequences=sequences, seq_len=seq_len, remat=remat)
                 for remat in (False, True)}
    for algorithm in config.algorithms:
      row = {"case": f"D{cfg.hidden_size} L{cfg.num_layers} H{cfg.num_heads} "
                     f"K{cfg.num_kv_heads} F{cfg.mlp_dim} V{cfg.vocab_size} "
                     f"b{sequences} T{seq_len}",
             "algorithm": algorithm, "optimizer": opt}
      for remat, prefix in ((False, ""), (True, "remat_")):
        compiled = compiled_train_step_memory(
            dataclasses.replace(cfg, remat="full", scan_layers=True) if remat else cfg,
            algorithm, opt, sequences=sequences, seq_len=seq_len)
        row.update({f"{prefix}predicted_MB": predicted[remat] / 2**20,
                    f"{prefix}compiled_MB": compiled["peak_bytes"] / 2**20,
                    f"{prefix}ratio": predicted[remat] / compiled["peak_bytes"],
                    f"{prefix}compiled": compiled})
      rows.append(row)
  return rows


def aot_availability() -> dict[str, str]:
  """Whether this machine can compile for real GPU/TPU targets (needs their plugins)."""
  from jax.experimental import topologies

  out = {}
  for platform, name in (("tpu", "v5e:16x16"), ("cuda", "h100")):
    try:
      topologies.get_topology_desc(name, platform)
      out[platform] = "available"
    except Exception as e:  # noqa: BLE001 - any failure means "not here"; its message says why.
      out[platform] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
  return out


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.run_dir = ""  # Empty: runs/bench_memory-<timestamp>.
  config.models = ("llama3_8b", "llama3_70b")
  config.algorithms = ALGORITHMS
  config.optimizers = ("adamw", "adam_mini")
  config.param_dtype = "float32"
  config.compute_dtype = "bfloat16"
  # Fraction of device memory the step may use (runtime, fragmentation and XLA's own reserve).
  config.usable_fraction = 0.9
  # Hardware: memory per device (GB) and the (data, fsdp, tensor) mesh.
  config.layouts = [
      dict(name="8xH100-80GB", hbm_gb=80.0, data=1, fsdp=8, tensor=1),
      dict(name="32xH100-80GB", hbm_gb=80.0, data=1, fsdp=32, tensor=1),
      dict(name="TPUv5e-256-16GB", hbm_gb=16.0, data=1, fsdp=64, tensor=4),
  ]
  # Workloads per data shard. T = prompt + response tokens of every sequence.
  config.dpo = ml_collections.ConfigDict(dict(pairs_per_shard=1, seq_len=1024))
  config.grpo = ml_collections.ConfigDict(dict(
      sequences_per_shard=4, seq_len=1024, rollout_sequences_per_shard=32))
  # Validation on one CPU device, in float32 (the CPU compiler computes bfloat16 in float32).
  # None of these shapes was used to fit the formula's tensor counts.
  config.validation = ml_collections.ConfigDict(dict(
      compute_dtype="float32",
      cases=[
          dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=16, mlp_dim=128, sequences=2, seq_len=128, optimizer="adamw"),
          dict(vocab_size=1024, hidden_size=128, num_layers=3, num_heads=8, num_kv_heads=2,
               head_dim=16, mlp_dim=384, sequences=4, seq_len=256, optimizer="adam_mini"),
          dict(vocab_size=4096, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=4,
               head_dim=64, mlp_dim=768, sequences=4, seq_len=64, optimizer="adamw"),
      ]))
  return config


COLUMNS = ("model", "layout", "algorithm", "optimizer", "params_GB", "opt_state_GB",
           "activations_GB", "kv_cache_GB", "peak_GB", "fits", "max_seqs", "remat_peak_GB",
           "remat_fits", "remat_max_seqs")
VALIDATION_COLUMNS = ("case", "algorithm", "optimizer", "predicted_MB", "compiled_MB", "ratio",
                      "remat_predicted_MB", "remat_compiled_MB", "remat_ratio")


def run(config: ml_collections.ConfigDict) -> dict:
  """Plans every configuration, validates the formula; returns (and writes) the results."""
  t_start = time.perf_counter()
  run_dir = common.resolve_run_dir(config, "bench_memory")
  rows = plan_rows(config)
  validation = validate(config)
  results = {"rows": rows, "validation": validation, "aot": aot_availability(),
             "formula": __doc__.split("Activation formula")[1].split("Precision")[0].strip(),
             "run_dir": run_dir}
  results["total_s"] = time.perf_counter() - t_start
  common.write_json(os.path.join(run_dir, "results.json"), results)
  print(f"\nper-device GB; params = reference = grads; {config.param_dtype} parameters, "
        f"{config.compute_dtype} compute; fits: peak <= {config.usable_fraction} x device memory")
  print(common.format_table(rows, COLUMNS))
  print("\nformula vs XLA memory_analysis() of the compiled train step (CPU, small configs):")
  print(common.format_table(validation, VALIDATION_COLUMNS))
  print(f"\nAOT compilation for accelerators here: {results['aot']}")
  print(f"run directory: {run_dir}  (total {results['total_s']:.0f} s)")
  return results


if __name__ == "__main__":
  common.launch(run, get_config)
