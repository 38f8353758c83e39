"""LoRA adapters: merge algebra, zero-init identity, adapter-only training, save/restore."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhfjax import sharding as shd
from rlhfjax.models import (
    LoRAAdapters,
    LoRAConfig,
    Transformer,
    get_config,
    load_adapters,
    lora_init,
    lora_loss,
    lora_merge,
    lora_unmerge,
    save_adapters,
)
from rlhfjax.train.objectives import make_sft_loss
from rlhfjax.train.state import abstract_model, init_train_state, param_shardings
from rlhfjax.train.steps import make_train_step

CONFIG = dataclasses.replace(get_config("tiny"), num_layers=1)
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "lm_head")
# One adapter config for the tests that draw real initial adapters: compiled draws are shared.
FULL = LoRAConfig(rank=3, alpha=6.0, targets=ALL_TARGETS)


# Jit-compiled once per structure: eager dispatch of many tiny ops dominates the test time.
_init = jax.jit(lora_init, static_argnums=1)
_merge = jax.jit(lora_merge, static_argnums=2)
_unmerge = jax.jit(lora_unmerge, static_argnums=2)


def _model_fn(config=CONFIG):
  return lambda: Transformer(config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def base():
  """(graphdef, params) of the tiny model, float32, on one device."""
  graphdef, abstract, _ = abstract_model(_model_fn())
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype) * 0.1,
                        abstract)
  return graphdef, params


def _random_adapters(params, config, seed):
  """Adapters of `lora_init`'s structure with B drawn too (a fresh B is zero, which would make
  most checks vacuous). Only the shapes come from lora_init (no compiled random draws)."""
  shapes = jax.eval_shape(lambda p, k: lora_init(p, config, k), params, jax.random.key(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), shapes)


def _module_paths(adapters, path=()):
  for key, value in adapters.items():
    if "lora_a" in value:
      yield path + (key,), value
    else:
      yield from _module_paths(value, path + (key,))


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def test_init_shapes_and_zero_b(base):
  _, params = base
  adapters = _init(params, FULL, jax.random.key(0))
  d, h, k, dh, f, v = 64, 4, 2, 16, 128, 64  # the tiny config's D, H, K, Dh, F, V
  layer = adapters["layers"][0]
  expected = {  # module -> (A shape, B shape): A over the kernel's input axes, B over its outputs
      ("self_attn", "q_proj"): ((d, 3), (3, h, dh)),
      ("self_attn", "k_proj"): ((d, 3), (3, k, dh)),
      ("self_attn", "o_proj"): ((h, dh, 3), (3, d)),
      ("mlp", "down_proj"): ((f, 3), (3, d)),
  }
  for path, (a_shape, b_shape) in expected.items():
    assert _get(layer, path)["lora_a"].shape == a_shape
    assert _get(layer, path)["lora_b"].shape == b_shape
  assert adapters["lm_head"]["lora_b"].shape == (3, v)
  for _, entry in _module_paths(adapters):
    assert entry["lora_a"].dtype == entry["lora_b"].dtype == jnp.float32
    np.testing.assert_array_equal(entry["lora_b"], 0.0)
    # A ~ N(0, 1/d_in): a loose check of the scale over a few hundred draws.
    d_in = np.prod(entry["lora_a"].shape[:-1])
    assert 0.5 < float(jnp.std(entry["lora_a"])) * np.sqrt(d_in) < 1.5


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_zero_b_leaves_model_unchanged(param_dtype):
  config = dataclasses.replace(CONFIG, param_dtype=param_dtype)
  graphdef, abstract, _ = abstract_model(_model_fn(config))
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), abstract)
  merged = _merge(params, _init(params, FULL, jax.random.key(1)), FULL)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(merged)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 5)), jnp.int32)
  forward = jax.jit(lambda p: nnx.merge(graphdef, p)(tokens))
  np.testing.assert_array_equal(forward(params), forward(merged))


@pytest.mark.parametrize("rank, alpha", [(1, 1.0), (4, 16.0)])
def test_merged_kernel_equals_adapter_applied_output(base, rank, alpha):
  """x W' == x W + (alpha/r) (x A) B for every adapted projection, and W' matches a matmul."""
  _, params = base
  config = LoRAConfig(rank=rank, alpha=alpha, targets=ALL_TARGETS)
  adapters = _random_adapters(params, config, seed=rank)
  merged = _merge(params, adapters, config)
  rng = np.random.default_rng(2)
  for path, entry in _module_paths(adapters):
    a, b = np.asarray(entry["lora_a"]), np.asarray(entry["lora_b"])
    w, w_merged = np.asarray(_get(params, path)["kernel"]), np.asarray(_get(merged, path)["kernel"])
    n_in = a.ndim - 1
    # Oracle 1: the update as a plain [d_in, r] @ [r, d_out] matrix product.
    d_in, d_out = int(np.prod(w.shape[:n_in])), int(np.prod(w.shape[n_in:]))
    expected = w + alpha / rank * (a.reshape(d_in, rank) @ b.reshape(rank, d_out)).reshape(w.shape)
    np.testing.assert_allclose(w_merged, expected, rtol=1e-5, atol=1e-5, err_msg=str(path))
    # Oracle 2: the projection with the merged kernel vs the unmerged adapter path.
    x = rng.standard_normal((3,) + w.shape[:n_in]).astype(np.float32)
    adapted = (np.tensordot(x, w, n_in) + alpha / rank * np.tensordot(np.tensordot(x, a, n_in),
                                                                       b, 1))
    np.testing.assert_allclose(np.tensordot(x, w_merged, n_in), adapted, rtol=1e-4, atol=1e-4)
  # Untargeted parameters are the very same arrays.
  eager = lora_merge(params, adapters, config)
  assert eager["layers"][0]["input_layernorm"]["scale"] is params["layers"][0][
      "input_layernorm"]["scale"]


def test_unmerge_inverts_merge(base):
  _, params = base
  config = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "o_proj", "up_proj"))
  adapters = _random_adapters(params, config, seed=3)
  restored = _unmerge(_merge(params, adapters, config), adapters, config)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
    # |W| ~ 0.1 and |scale A B| ~ 10: float32 rounding of W' leaves ~1e-6 absolute error.
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5)


def test_adapter_only_sft_steps_lower_loss_and_keep_base_bit_identical():
  """The generic jit step on a (2, 2, 2) mesh trains only the adapters."""
  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  graphdef, abstract, specs = abstract_model(_model_fn())
  base_shardings = param_shardings(abstract, specs, mesh)
  rng = np.random.default_rng(0)
  base_copy = jax.tree.map(
      lambda x: (0.1 * rng.standard_normal(x.shape)).astype(x.dtype), abstract)
  base_params = jax.device_put(base_copy, base_shardings)
  config = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
  optimizer = optax.adam(5e-2)
  lora_graphdef, state, shardings = init_train_state(
      lambda: LoRAAdapters(abstract, config, logical_specs=specs, rngs=nnx.Rngs(1)),
      optimizer, mesh)
  # B starts at zero; A's sharding follows the kernel's input axes (q: embed -> fsdp).
  q = state.params["adapters"]["layers"][0]["self_attn"]["q_proj"]
  assert q["lora_a"].sharding.spec == jax.sharding.PartitionSpec(shd.FSDP, None)
  np.testing.assert_array_equal(q["lora_b"], 0.0)
  step = make_train_step(lora_loss(make_sft_loss(), graphdef, config), optimizer, lora_graphdef,
                         mesh, shardings, frozen_shardings=(base_shardings,))
  batch = shd.shard_batch({
      "tokens": rng.integers(0, CONFIG.vocab_size, (8, 8)).astype(np.int32),
      "attention_mask": np.ones((8, 8), np.int32),
      "loss_mask": np.ones((8, 8), np.int32),
  }, mesh)
  losses = []
  for _ in range(6):
    state, metrics = step(state, batch, base_params)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.05, losses
  for a, b in zip(jax.tree.leaves(base_copy), jax.tree.leaves(base_params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  trained = nnx.state(nnx.merge(lora_graphdef, state.params)).to_pure_dict()["adapters"]
  assert float(jnp.abs(trained["layers"][0]["self_attn"]["q_proj"]["lora_b"]).max()) > 0
  # The step's loss is the loss of the merged model.
  merged = lora_merge(base_params, trained, config)
  loss, _ = make_sft_loss()(nnx.merge(graphdef, merged), batch)
  loss_again, _ = lora_loss(make_sft_loss(), graphdef, config)(
      nnx.merge(lora_graphdef, state.params), batch, base_params)
  np.testing.assert_allclose(float(loss), float(loss_again), rtol=1e-6)


def test_save_and_load_adapters_round_trip(base, tmp_path):
  pytest.importorskip("safetensors")
  _, params = base
  config = LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "o_proj", "lm_head"))
  adapters = _random_adapters(params, config, seed=4)
  path = str(tmp_path / "adapters.safetensors")
  save_adapters(adapters, config, path)
  restored, restored_config = load_adapters(path)
  assert restored_config == config
  assert jax.tree.structure(restored) == jax.tree.structure(adapters)
  for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), b)
  np.testing.assert_array_equal(
      lora_merge(params, restored, restored_config)["lm_head"]["kernel"],
      lora_merge(params, adapters, config)["lm_head"]["kernel"])


def test_load_adapters_rejects_other_files(tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  path = str(tmp_path / "plain.safetensors")
  safetensors_numpy.save_file({"x": np.zeros(2, np.float32)}, path)
  with pytest.raises(ValueError, match="not an rlhfjax adapter file"):
    load_adapters(path)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0, alpha=1.0), "rank"),
    (dict(rank=2, alpha=0.0), "alpha"),
    (dict(rank=2, alpha=1.0, targets="q_proj"), "targets"),
])
def test_config_rejects_bad_values(kwargs, message):
  with pytest.raises(ValueError, match=message):
    LoRAConfig(**kwargs)


def test_unknown_target_and_mismatched_adapters_raise(base):
  _, params = base
  with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no kernel"):
    lora_init(params, LoRAConfig(rank=2, alpha=1.0, targets=("q_proj", "qkv_proj")),
              jax.random.key(0))
  config = LoRAConfig(rank=2, alpha=1.0, targets=("q_proj",))
  adapters = _random_adapters(params, config, seed=5)
  bad = jax.tree.map(lambda x: x, adapters)
  bad["layers"][0]["self_attn"]["q_proj"]["lora_b"] = jnp.zeros((2, 3, 16))
  with pytest.raises(ValueError, match="q_proj makes an update of shape"):
    lora_merge(params, bad, config)
  with pytest.raises(ValueError, match="not in the params"):
    lora_merge(params, {"layers": {0: {"cross_attn": adapters["layers"][0]["self_attn"]}}},
               config)


def test_scanned_layers_get_one_adapter_per_layer():
  """Stacked kernels [L, ...] get stacked adapters; merging equals the per-layer merge, stacked."""
  from rlhfjax.models.transformer import stack_layers  # pylint: disable=g-import-not-at-top
  config = dataclasses.replace(CONFIG, num_layers=2)
  _, abstract, _ = abstract_model(_model_fn(config))
  rng = np.random.default_rng(4)
  params = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), abstract)
  adapters = _random_adapters(params, FULL, seed=5)
  stacked = stack_layers(params)
  stacked_adapters = stack_layers(adapters)
  # lora_init on the scanned layout has exactly the stacked structure and shapes.
  fresh = _init(stacked, FULL, jax.random.key(0))
  assert jax.tree.map(lambda x: x.shape, fresh) == jax.tree.map(lambda x: x.shape,
                                                                stacked_adapters)
  # Each layer's A ~ N(0, 1/d_in) with d_in over the kernel's input axes, not the layer axis.
  for path, entry in _module_paths(fresh):
    a = np.asarray(entry["lora_a"])
    d_in = np.prod(a.shape[1:-1]) if path[0] == "layers" else np.prod(a.shape[:-1])
    assert 0.8 < a.std() * np.sqrt(d_in) < 1.2, (path, a.std() * np.sqrt(d_in))
    np.testing.assert_array_equal(entry["lora_b"], 0.0)
  expected = stack_layers(_merge(params, adapters, FULL))
  merged = _merge(stacked, stacked_adapters, FULL)
  for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(merged)[0], jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6, err_msg=str(p))
  # The adapters of the scanned model carry the 'layers' axis in their logical axes.
  scanned_config = dataclasses.replace(config, scan_layers=True)
  _, scanned_abstract, specs = abstract_model(_model_fn(scanned_config))
  with nnx.use_eager_sharding(False):
    module = nnx.eval_shape(lambda: LoRAAdapters(scanned_abstract, FULL, logical_specs=specs,
                                                 rngs=nnx.Rngs(0)))
  q = nnx.get_partition_spec(nnx.state(module)).to_pure_dict()["adapters"]["layers"]["self_attn"][
      "q_proj"]
  assert tuple(q["lora_a"]) == ("layers", "embed", None)
  assert tuple(q["lora_b"]) == ("layers", None, "q_heads", "head_dim")
