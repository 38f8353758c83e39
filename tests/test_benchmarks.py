"""Benchmarks: their shared helpers, and each `run(config)` on a tiny configuration.

Wall-clock times are never asserted on (DESIGN.md); byte counts are, against exact closed forms:
AdamW keeps two float32 moments per parameter, Adam-mini one plus one float32 per block, and each
optax chain adds int32 step counters (optax.adamw and adam_mini: one in the Adam scaling, one in
`scale_by_learning_rate`'s schedule; `clip_by_global_norm` keeps none).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.bench import common as bench
from experiments.bench import memory
from experiments.bench import optimizers as bench_optimizers
from experiments.bench import train_step
from rlhfjax import sharding
from rlhfjax.models import Transformer, TransformerConfig, get_config, init_kv_cache, num_params
from rlhfjax.optim import BlockPartition, partition_table
from rlhfjax.train import optimizers
from rlhfjax.train import state as state_lib

COUNTERS = 2 * 4  # Two int32 step counters per optimizer chain (module docstring).


def _tiny_sizes():
  """(parameter bytes, Adam-mini second-moment bytes) of the tiny model, float32."""
  _, params, logical = state_lib.abstract_model(
      lambda: Transformer(get_config("tiny"), rngs=nnx.Rngs(0)))
  blocks = sum(b.num_blocks for b in partition_table(params, BlockPartition(logical_axes=logical)))
  return 4 * num_params(get_config("tiny")), 4 * blocks


# -- shared helpers ------------------------------------------------------------------------------


def test_median_seconds_drops_the_compiling_calls():
  assert bench.median_seconds([100.0, 1.0, 3.0, 2.0]) == 2.0
  assert bench.median_seconds([100.0, 50.0, 1.0], skip=2) == 1.0
  with pytest.raises(ValueError, match="skip=1"):
    bench.median_seconds([1.0])


def test_interleaved_times_calls_round_robin():
  calls = []
  times = bench.interleaved_times({"a": lambda: calls.append("a"),
                                   "b": lambda: calls.append("b")}, repeats=3)
  assert calls == ["a", "b"] * 3
  assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
  with pytest.raises(ValueError, match="repeats"):
    bench.interleaved_times({"a": lambda: None}, repeats=0)


@pytest.mark.parametrize("donate", [False, True])
def test_compiled_memory_counts_arguments_outputs_and_donation(donate):
  x = jax.ShapeDtypeStruct((1000,), jnp.float32)
  fn = jax.jit(lambda x: x * 2.0, donate_argnums=(0,) if donate else ())
  stats = bench.compiled_memory(fn, x)
  assert stats["argument_size_in_bytes"] == 4000
  assert stats["output_size_in_bytes"] == 4000
  assert stats["alias_size_in_bytes"] == (4000 if donate else 0)
  assert stats["peak_bytes"] == (4000 if donate else 8000) + stats["temp_size_in_bytes"]


def test_tree_bytes_of_arrays_and_shapes():
  tree = {"a": jnp.zeros((3, 4), jnp.bfloat16), "b": jax.ShapeDtypeStruct((5,), jnp.int32)}
  assert bench.tree_bytes(tree) == 3 * 4 * 2 + 5 * 4
  assert bench.tree_bytes(bench.abstract(tree)) == bench.tree_bytes(tree)


# -- optimizer benchmark -------------------------------------------------------------------------


def test_optimizer_benchmark_runs_and_reports(tmp_path):
  config = bench_optimizers.get_config()
  config.run_dir = str(tmp_path)
  config.models = ("tiny",)
  config.ratio_model = "tiny"
  config.optimizers = ("adamw", "adam_mini")
  config.num_devices = 1
  config.num_steps.tiny = 3
  config.batch_size.tiny = 4
  config.warmup_steps = 1
  config.num_train, config.num_eval = 32, 8
  config.update_repeats = 1
  results = bench_optimizers.run(config)

  with open(os.path.join(tmp_path, "results.json")) as f:
    saved = json.load(f)
  for key in ("state_bytes_ratio", "step_time_ratio", "update_time_ratio", "final_loss",
              "final_loss_ratio", "meets_targets", "models", "targets"):
    assert key in saved and key in results, key
  assert os.path.exists(os.path.join(tmp_path, "loss_curves.png"))
  per_optimizer = saved["models"]["tiny"]["optimizers"]
  for name in ("adamw", "adam_mini"):
    assert len(per_optimizer[name]["train_losses"]) == 3
    assert np.isfinite(saved["final_loss"]["tiny"][name])
    assert per_optimizer[name]["median_step_s"] > 0
  params, nu = _tiny_sizes()
  assert per_optimizer["adamw"]["state_bytes"] == 2 * params + COUNTERS
  assert per_optimizer["adam_mini"]["state_bytes"] == params + nu + COUNTERS
  assert saved["state_bytes_ratio"] == pytest.approx(
      (params + nu + COUNTERS) / (2 * params + COUNTERS))


def test_optimizer_benchmark_rejects_a_ratio_model_it_does_not_train():
  config = bench_optimizers.get_config()
  config.models = ("tiny",)
  with pytest.raises(ValueError, match="ratio_model"):
    bench_optimizers.run(config)


# -- memory planner ------------------------------------------------------------------------------


def _layout(data=1, fsdp=1, tensor=1, hbm_gb=1.0):
  return memory.Layout(name="test", hbm_gb=hbm_gb, data=data, fsdp=fsdp, tensor=tensor)


def test_state_bytes_on_one_device_are_exact():
  params, nu = _tiny_sizes()
  states = memory.state_bytes(get_config("tiny"), _layout().mesh(), ("adamw", "adam_mini"))
  assert states["params"] == params
  assert states["opt_state"] == {"adamw": 2 * params + COUNTERS,
                                 "adam_mini": params + nu + COUNTERS}


def test_state_bytes_are_divided_by_fsdp_except_norms():
  """Every tiny parameter has an 'embed' axis (64, divisible by 8) except the norm scales."""
  cfg = get_config("tiny")
  norms = 4 * (2 * cfg.num_layers + 1) * cfg.hidden_size
  params, _ = _tiny_sizes()
  states = memory.state_bytes(cfg, _layout(fsdp=8).mesh(), ("adamw",))
  assert states["params"] == (params - norms) // 8 + norms
  assert states["opt_state"]["adamw"] == 2 * states["params"] + COUNTERS


@pytest.mark.parametrize("tensor", [1, 2])
def test_kv_cache_bytes_match_the_model_cache(tensor):
  cfg = get_config("tiny", dtype="bfloat16")
  cache = jax.eval_shape(lambda: init_kv_cache(
      num_layers=cfg.num_layers, batch_size=3, max_len=40, num_kv_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, dtype=jnp.bfloat16))
  expected = bench.tree_bytes((cache.keys, cache.values)) / tensor  # K = 2 heads split by t.
  assert memory.kv_cache_bytes(cfg, sequences=3, seq_len=40, tensor=tensor) == expected


def test_llama3_70b_config_has_the_published_size():
  # 70.6e9 parameters: the count of HF meta-llama/Meta-Llama-3-70B (untied embeddings).
  assert num_params(memory.model_config("llama3_70b")) == pytest.approx(70.55e9, rel=1e-3)


def test_memory_planner_runs_and_its_formula_matches_xla(tmp_path):
  config = memory.get_config()
  config.run_dir = str(tmp_path)
  config.models = ("tiny",)
  config.layouts = [dict(name="test", hbm_gb=0.01, data=1, fsdp=8, tensor=1)]
  config.dpo.seq_len = config.grpo.seq_len = 32
  config.validation.cases = config.validation.cases[:1]
  results = memory.run(config)

  with open(os.path.join(tmp_path, "results.json")) as f:
    saved = json.load(f)
  assert set(saved) >= {"rows", "validation", "aot", "formula"}
  assert len(saved["rows"]) == 2 * 2  # algorithms x optimizers
  for row in saved["rows"]:
    for key in ("params_GB", "opt_state_GB", "activations_GB", "peak_GB", "fits", "max_seqs",
                "remat_peak_GB", "remat_fits"):
      assert key in row, key
    assert row["remat_activations_GB"] < row["activations_GB"]
  # The formula against XLA's compiled peak of the real DPO and GRPO steps, without and with
  # every block rematerialised: it over-predicts by 6-19% (1-20% rematerialised) on the default
  # validation cases, 9% (20%) on this one.
  assert [r["algorithm"] for r in results["validation"]] == ["dpo", "grpo"]
  for row in saved["validation"]:
    assert 0.85 < row["ratio"] < 1.15, row
    assert 0.85 < row["remat_ratio"] < 1.3, row
    assert row["remat_compiled_MB"] < row["compiled_MB"], row


@pytest.mark.parametrize("key, value, match", [
    ("usable_fraction", 1.5, "usable_fraction"),
    ("algorithms", ("dpo", "ppo"), "algorithms"),
    ("layouts", [dict(name="bad", hbm_gb=16.0, data=1, fsdp=0, tensor=1)], "fsdp"),
])
def test_memory_planner_rejects_bad_settings(key, value, match):
  config = memory.get_config()
  config.models = ("tiny",)
  config[key] = value
  with pytest.raises(ValueError, match=match):
    memory.plan_rows(config)


# -- train-step throughput and MFU ---------------------------------------------------------------


# A model whose matmuls dominate XLA's FLOP count (norms, softmax, AdamW are < 3% here).
FLOPS_MODEL = dict(vocab_size=256, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=32, mlp_dim=512)


def _flops_config():
  return TransformerConfig(**FLOPS_MODEL)


def test_matmul_params_is_num_params_without_embedding_and_norms():
  cfg = _flops_config()
  norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
  assert train_step.matmul_params(cfg) == num_params(cfg) - cfg.vocab_size * cfg.hidden_size - norms


def test_generation_flops_are_a_prefill_plus_one_token_per_step():
  cfg = _flops_config()
  attend = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim
  assert train_step.generation_flops(cfg, 3, 5, 1) == train_step.forward_flops(cfg, 3, 5)
  # The second new token is fed back: 2 N per row plus attention over 5 + 1 positions.
  assert (train_step.generation_flops(cfg, 3, 5, 2) - train_step.generation_flops(cfg, 3, 5, 1)
          == 3 * (2 * train_step.matmul_params(cfg) + attend * 6))


def test_train_step_benchmark_runs_and_reports(tmp_path):
  config = train_step.get_config()
  config.run_dir = str(tmp_path)
  config.model.update(FLOPS_MODEL)
  config.num_devices = 1
  config.repeats = 2
  config.matmul_size, config.matmul_repeats = 64, 1
  config.sft.batch_size, config.sft.seq_len = 2, 16
  config.dpo.pairs, config.dpo.prompt_len, config.dpo.response_len = 1, 32, 32
  config.grpo.prompts, config.grpo.group_size = 2, 2
  config.grpo.prompt_len, config.grpo.max_new_tokens = 8, 4
  config.algorithms = ("dpo", "grpo")  # sft and dpo_precomputed time the same kind of step.
  config.compare_trl = train_step.trl_available()
  results = train_step.run(config)

  with open(os.path.join(tmp_path, "results.json")) as f:
    saved = json.load(f)
  for key in ("tokens_per_s", "mfu", "seconds", "model_flops", "peak_flops", "device",
              "targets", "meets_targets", "config"):
    assert key in saved and key in results, key
  for algorithm in config.algorithms:
    assert saved["tokens_per_s"][algorithm] > 0 and saved["mfu"][algorithm] > 0
    assert saved["mfu"][algorithm] == pytest.approx(
        saved["model_flops"][algorithm] / saved["seconds"][algorithm] / saved["peak_flops"])
    # The nominal MFU credits the unpacked work (TRL's): above the work-done one when packed.
    assert saved["mfu_nominal"][algorithm] == pytest.approx(
        saved["model_flops_unpacked"][algorithm] / saved["seconds"][algorithm]
        / saved["peak_flops"])
    assert saved["mfu_nominal"][algorithm] > saved["mfu"][algorithm]
  # The analytic model FLOPs of the (packed) DPO step (policy forward + backward, reference
  # forward) against XLA's count of the compiled step, which also counts elementwise work (norms,
  # softmax, AdamW): above the matmul count, by less than 5% for this matmul-dominated model.
  cfg = _flops_config()
  assert saved["model_flops_unpacked"]["dpo"] == (train_step.train_flops(cfg, 2, 64)
                                                  + train_step.forward_flops(cfg, 2, 64))
  assert saved["model_flops"]["dpo"] == 4 * train_step.packed_forward_flops(cfg, 1, 2, 32, 32)
  assert 1.0 <= saved["xla_flops"]["dpo"] / saved["model_flops"]["dpo"] < 1.05
  assert saved["tokens_per_s"]["grpo"] == pytest.approx(4 * 12 / saved["seconds"]["grpo"])
  phases = saved["grpo_phases"]
  assert set(phases) >= {"generate_s", "score_s", "update_s", "iteration_s"}
  for phase in ("generate_s", "score_s", "update_s"):  # each call's phase <= its iteration
    assert 0 < phases[phase] <= phases["iteration_s"], phase
  if config.compare_trl:
    for key in ("dpo_speedup_vs_trl", "grpo_speedup_vs_trl"):
      assert saved[key] > 0, key
    for algorithm in config.algorithms:  # TRL does the unpacked work.
      assert saved["trl_mfu"][algorithm] == pytest.approx(
          saved["model_flops_unpacked"][algorithm] / saved["trl_seconds"][algorithm]
          / saved["peak_flops"])


def test_train_step_benchmark_declares_the_named_models_runtime_fields():
  # Locked as `config_flags` locks it: `--config.model_overrides.remat=full` needs the key declared.
  config = train_step.get_config()
  config.lock()
  config.model_name = "tiny"
  assert train_step.model_config(config) == get_config("tiny")  # the declared values: defaults
  config.model_overrides.remat, config.model_overrides.scan_layers = "full", True
  cfg = train_step.model_config(config)
  assert (cfg.remat, cfg.scan_layers) == ("full", True)


def test_train_step_benchmark_rejects_unknown_algorithms():
  config = train_step.get_config()
  config.algorithms = ("sft", "ppo")
  with pytest.raises(ValueError, match="algorithms"):
    train_step.run(config)
