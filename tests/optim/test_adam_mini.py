"""Adam-mini as an optax transform: exact semantics against a brute-force loop, memory, optax
composition, weight decay, sharding (1 vs 8 devices) and checkpointing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from rlhfjax import optim
from rlhfjax.models import Transformer, get_config

HP = dict(learning_rate=1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)

# ---------------------------------------------------------------------------------------------
# A tiny parameter set in this library's layout with head_dim (3) != hidden / heads (8 / 4 = 2)
# and grouped-query attention (4 query heads, 2 kv heads), plus a Flax 2-D layout of the same.
D, H, KV, DH, F, V = 8, 4, 2, 3, 10, 6

LIBRARY = {  # path: (shape, logical axes)
    "embed_tokens.embedding": ((V, D), ("vocab", "embed")),
    "layers.0.input_layernorm.scale": ((D,), ("norm",)),
    "layers.0.self_attn.q_proj.kernel": ((D, H, DH), ("embed", "q_heads", "head_dim")),
    "layers.0.self_attn.q_proj.bias": ((H, DH), ("q_heads", "head_dim")),
    "layers.0.self_attn.k_proj.kernel": ((D, KV, DH), ("embed", "kv_heads", "head_dim")),
    "layers.0.self_attn.k_proj.bias": ((KV, DH), ("kv_heads", "head_dim")),
    "layers.0.self_attn.v_proj.kernel": ((D, KV, DH), ("embed", "kv_heads", "head_dim")),
    "layers.0.self_attn.o_proj.kernel": ((H, DH, D), ("q_heads", "head_dim", "embed")),
    "layers.0.mlp.gate_proj.kernel": ((D, F), ("embed", "mlp")),
    "layers.0.mlp.down_proj.kernel": ((F, D), ("mlp", "embed")),
    "norm.scale": ((D,), ("norm",)),
    "lm_head.kernel": ((D, V), ("embed", "vocab")),
}
FLAX_2D = {  # Flax-style attention with fused heads: (D, heads * head_dim) kernels.
    "attn.query.kernel": ((D, H * DH), None),
    "attn.key.kernel": ((D, KV * DH), None),
    "attn.value.kernel": ((D, KV * DH), None),
    "attn.out.kernel": ((H * DH, D), None),
    "attn.out.bias": ((D,), None),
}


def brute_force_masks(path, shape):
  """Blocks as boolean masks, written out loop by loop from the Adam-mini 1.1.1 rules."""
  masks = []

  def add(index):
    m = np.zeros(shape, bool)
    m[index] = True
    masks.append(m)

  s = slice(None)
  if path.endswith("bias"):
    for i in np.ndindex(*shape):  # elementwise
      add(i)
  elif path.endswith("embedding"):
    for r in range(shape[0]):  # one per token
      add((r, s))
  elif path.endswith(("q_proj.kernel", "k_proj.kernel")):
    for h in range(shape[1]):  # one per head
      add((s, h, s))
  elif path.endswith(("query.kernel", "key.kernel")):
    heads = H if "query" in path else KV
    for h in range(heads):  # one per head of the fused axis
      add((s, slice(h * DH, (h + 1) * DH)))
  elif path.endswith("v_proj.kernel"):
    for k in range(shape[1]):  # one per output neuron
      for j in range(shape[2]):
        add((s, k, j))
  elif path.endswith("o_proj.kernel"):
    for d in range(shape[2]):  # one per output neuron
      add((s, s, d))
  elif path.endswith("kernel"):
    for c in range(shape[1]):  # one per output neuron / token of the head
      add((s, c))
  else:
    add((s,) * len(shape))  # one per tensor
  return masks


def brute_force_adam_mini(params, grads, learning_rate, b1, b2, eps, weight_decay):
  """float64 loop over blocks, steps and entries; norms and biases are not decayed."""
  params = {p: np.asarray(x, np.float64) for p, x in params.items()}
  m = {p: np.zeros_like(x) for p, x in params.items()}
  masks = {p: brute_force_masks(p, x.shape) for p, x in params.items()}
  v = {p: np.zeros(len(ms)) for p, ms in masks.items()}
  for t, g_t in enumerate(grads, start=1):
    for p in params:
      g = np.asarray(g_t[p], np.float64)
      m[p] = b1 * m[p] + (1 - b1) * g
      lr = learning_rate
      decay = 0.0 if p.endswith(("bias", "scale")) else weight_decay
      new = params[p] * (1 - lr * decay)
      for b, mask in enumerate(masks[p]):
        v[p][b] = b2 * v[p][b] + (1 - b2) * np.mean(g[mask] ** 2)
        denom = np.sqrt(v[p][b] / (1 - b2**t)) + eps
        new[mask] -= lr * (m[p][mask] / (1 - b1**t)) / denom
      params[p] = new
  return params


def nest(flat):
  out = {}
  for path, x in flat.items():
    node = out
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = x
  return out


def flatten(tree):
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {".".join(optim.path_names(p)): x for p, x in leaves}


def random_problem(layout, num_steps, seed):
  rng = np.random.default_rng(seed)
  params = {p: (0.1 * rng.standard_normal(s)).astype(np.float32) for p, (s, _) in layout.items()}
  scales = {p: np.exp(rng.uniform(-2, 2, size=s)) for p, (s, _) in layout.items()}
  grads = [{p: (scales[p] * rng.standard_normal(s)).astype(np.float32)
            for p, (s, _) in layout.items()} for _ in range(num_steps)]
  return params, grads


def run(tx, params, grads):
  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for g in grads:
    params, state = step(params, state, g)
  return params, state


@pytest.mark.parametrize("layout, partition", [
    (LIBRARY, optim.BlockPartition(
        logical_axes=nest({p: P(*a) for p, (_, a) in LIBRARY.items()}))),
    (LIBRARY, optim.BlockPartition()),  # same blocks from path names and shapes
    (FLAX_2D, optim.BlockPartition(num_heads=H, num_kv_heads=KV)),
], ids=["library-logical", "library-paths", "flax-2d"])
def test_matches_brute_force_per_head_semantics(layout, partition):
  params, grads = random_problem(layout, num_steps=5, seed=0)
  got, _ = run(optim.adam_mini(**HP, partition=partition), nest(params), [nest(g) for g in grads])
  expected = brute_force_adam_mini(params, grads, **HP)
  for p, x in flatten(got).items():
    np.testing.assert_allclose(x, expected[p], rtol=2e-6, atol=2e-7, err_msg=p)


def test_brute_force_detects_wrong_head_split():
  """The reference's row-major head split (rows of D * D / H entries) differs when Dh != D / H."""
  params, grads = random_problem(LIBRARY, num_steps=3, seed=1)
  expected = brute_force_adam_mini(params, grads, **HP)
  wrong = optim.BlockPartition(axes_fn=lambda path, p: (0, 1) if "q_proj.kernel" in path else None)
  got, _ = run(optim.adam_mini(**HP, partition=wrong), nest(params), [nest(g) for g in grads])
  q = "layers.0.self_attn.q_proj.kernel"
  assert np.max(np.abs(flatten(got)[q] - expected[q])) > 1e-4


@pytest.mark.parametrize("scale", [1e-8, 1.0])
def test_first_step_closed_form_with_eps_outside_the_root(scale):
  # Step 1: bias-corrected moments are g and mean_b(g^2), so u = g / (sqrt(mean_b g^2) + eps).
  # With |g| = eps = 1e-8 this is 0.5; eps inside the root would give about 1e-4.
  g = {"mlp": {"kernel": scale * jnp.array([[1.0, -2.0], [3.0, 4.0], [-5.0, 6.0]])}}
  tx = optim.scale_by_adam_mini(b1=0.9, b2=0.999, eps=1e-8)
  u, _ = jax.jit(tx.update)(g, tx.init(g))
  x = np.asarray(g["mlp"]["kernel"], np.float64)
  expected = x / (np.sqrt(np.mean(x**2, axis=0, keepdims=True)) + 1e-8)  # per output neuron
  np.testing.assert_allclose(u["mlp"]["kernel"], expected, rtol=1e-6)


SPEC_DEFAULTS = dict(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)


def test_defaults_are_the_reference_defaults():
  """adam_mini() is Adam-mini 1.1.1 with lr 1e-3, betas (0.9, 0.999), eps 1e-8, wd 0."""
  # Gradients about as large as eps and varying over steps, so eps, b2 and b1 all show.
  params, grads = random_problem(LIBRARY, num_steps=6, seed=5)
  grads = [{p: 1e-8 * (1 + 3 * (t % 2)) * g for p, g in step.items()}
           for t, step in enumerate(grads)]
  got, _ = run(optim.adam_mini(), nest(params), [nest(g) for g in grads])
  expected = brute_force_adam_mini(params, grads, **SPEC_DEFAULTS)
  # Compare the displacements, which are about lr * steps: a 1% change of any default shows.
  for p, x in flatten(got).items():
    np.testing.assert_allclose(x - params[p], expected[p] - params[p], rtol=1e-3, atol=1e-7,
                               err_msg=p)
  # scale_by_adam_mini has the same b1, b2 and eps defaults.
  scaled, _ = run(optax.chain(optim.scale_by_adam_mini(), optax.scale(-1e-3)), nest(params),
                  [nest(g) for g in grads])
  for p, x in flatten(scaled).items():
    np.testing.assert_allclose(x - params[p], expected[p] - params[p], rtol=1e-3, atol=1e-7,
                               err_msg=p)


def test_init_on_shape_dtype_structs():
  params = nest({p: jax.ShapeDtypeStruct(s, jnp.bfloat16) for p, (s, _) in LIBRARY.items()})
  tx = optim.scale_by_adam_mini(mu_dtype=jnp.float32)
  abstract = jax.eval_shape(tx.init, params)
  concrete = tx.init(params)
  table = {b.path: b for b in optim.partition_table(params)}
  for state in (abstract, concrete):
    assert isinstance(state, optim.ScaleByAdamMiniState)
    for p, nu in flatten(state.nu).items():
      assert nu.shape == table[p].nu_shape and nu.dtype == jnp.float32, p
    for p, mu in flatten(state.mu).items():
      assert mu.shape == table[p].shape and mu.dtype == jnp.float32, p
  assert float(jnp.sum(jax.tree.leaves(concrete.nu)[0])) == 0.0
  # Without mu_dtype the first moment keeps the parameter dtype.
  assert jax.tree.leaves(jax.eval_shape(optim.scale_by_adam_mini().init, params).mu)[0].dtype == (
      jnp.bfloat16)


def state_bytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("config_name", ["tiny", "small", "llama3_2_1b", "llama3_8b"])
def test_state_is_about_half_of_adamw(config_name):
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: Transformer(get_config(config_name), rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  params = state.to_pure_dict()
  partition = optim.BlockPartition(logical_axes=nnx.get_partition_spec(state).to_pure_dict())
  mini = jax.eval_shape(optim.adam_mini(partition=partition).init, params)
  adamw = jax.eval_shape(optax.adamw(1e-3).init, params)
  assert state_bytes(mini) <= 0.51 * state_bytes(adamw)
  if config_name == "llama3_8b":
    # Paper claim: v is >= 99.9% smaller than Adam's (arXiv 2406.16793, Sec. 1).
    nu = jax.tree.leaves(mini[0].nu)
    assert state_bytes(nu) <= 1e-3 * state_bytes(params)


def small_problem(seed=0, num_steps=4):
  layout = {p: v for p, v in LIBRARY.items() if "layers" not in p or "self_attn" in p}
  params, grads = random_problem(layout, num_steps, seed)
  return nest(params), [nest(g) for g in grads]


def assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_scanned_params_match_unstacked_params():
  """Adam-mini on the scan_layers layout equals Adam-mini on the per-layer layout, stacked."""
  # pylint: disable-next=g-import-not-at-top
  from rlhfjax.models.transformer import stack_layers, unstack_layers
  from tests.optim.test_partition import library_model  # pylint: disable=g-import-not-at-top
  abstract, logical, _ = library_model(attention_bias=True)
  _, stacked_logical, _ = library_model(attention_bias=True, scan_layers=True)
  rng = np.random.default_rng(7)
  params = jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(np.float32),
                        abstract)
  # Per-entry gradient scales: layers (and heads, neurons) have different second moments.
  scales = jax.tree.map(lambda x: np.exp(rng.uniform(-2, 2, x.shape)), abstract)
  grads = [jax.tree.map(lambda s: (s * rng.standard_normal(s.shape)).astype(np.float32), scales)
           for _ in range(3)]
  expected, _ = run(optim.adam_mini(**HP, partition=optim.BlockPartition(logical_axes=logical)),
                    params, grads)
  stacked_grads = [stack_layers(g) for g in grads]
  for partition in (optim.BlockPartition(logical_axes=stacked_logical), optim.BlockPartition()):
    got, _ = run(optim.adam_mini(**HP, partition=partition), stack_layers(params), stacked_grads)
    assert_trees_close(unstack_layers(got), expected, rtol=1e-6, atol=1e-6)
  # Control: averaging over the layer axis too gives different parameters.
  pooled = optim.BlockPartition(axes_fn=lambda path, p: (
      tuple(range(len(p.shape))) if path.startswith("layers.") else None))
  got, _ = run(optim.adam_mini(**HP, partition=pooled), stack_layers(params), stacked_grads)
  assert not np.allclose(got["layers"]["mlp"]["up_proj"]["kernel"],
                         stack_layers(expected)["layers"]["mlp"]["up_proj"]["kernel"], atol=1e-6)


def test_clip_by_global_norm_composes():
  params, grads = small_problem()
  clip = jax.jit(lambda g: optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())[0])
  clipped = [clip(g) for g in grads]
  assert optax.global_norm(grads[0]) > 2.0  # the clip is active
  got, _ = run(optax.chain(optax.clip_by_global_norm(1.0), optim.adam_mini(**HP)), params, grads)
  expected, _ = run(optim.adam_mini(**HP), params, clipped)
  assert_trees_close(got, expected)


def test_inject_hyperparams_schedule():
  params, grads = small_problem()
  schedule = optax.linear_schedule(1e-2, 1e-3, transition_steps=3)
  hp = {**HP, "learning_rate": schedule}
  injected = optax.inject_hyperparams(optim.adam_mini)(**hp, partition=optim.BlockPartition())
  got, state = run(injected, params, grads)
  expected, _ = run(optim.adam_mini(**hp), params, grads)
  assert_trees_close(got, expected)
  np.testing.assert_allclose(state.hyperparams["learning_rate"], schedule(len(grads)), rtol=1e-6)
  # A numeric (unscheduled) hyperparameter can be changed in the state: without weight decay the
  # update differs by exactly lr * wd * p on decayed parameters.
  no_decay = state._replace(hyperparams={**state.hyperparams, "weight_decay": jnp.zeros([])})
  update = jax.jit(injected.update)
  with_wd, _ = update(grads[0], state, got)
  without_wd, _ = update(grads[0], no_decay, got)
  lr = state.hyperparams["learning_rate"]
  q = ("layers", 0, "self_attn", "q_proj", "kernel")
  pick = lambda tree: functools.reduce(lambda t, k: t[k], q, tree)  # noqa: E731
  np.testing.assert_allclose(pick(with_wd) - pick(without_wd), -lr * HP["weight_decay"] * pick(got),
                             rtol=1e-4, atol=1e-9)


def test_multi_steps_equals_one_step_on_the_mean_gradient():
  params, grads = small_problem(num_steps=4)
  got, _ = run(optax.MultiSteps(optim.adam_mini(**HP), every_k_schedule=2), params, grads)
  means = [jax.tree.map(lambda a, b: (a + b) / 2, grads[i], grads[i + 1]) for i in (0, 2)]
  expected, _ = run(optim.adam_mini(**HP), params, means)
  assert_trees_close(got, expected)


def test_masked_trains_only_the_masked_subtree():
  params, grads = small_problem()
  mask = jax.tree_util.tree_map_with_path(
      lambda path, _: "self_attn" in optim.path_names(path), params)
  tx = optax.chain(optax.masked(optim.adam_mini(**HP), mask), optax.masked(
      optax.set_to_zero(), jax.tree.map(lambda m: not m, mask)))
  got, _ = run(tx, params, grads)
  sub = lambda tree: {"layers": tree["layers"]}  # noqa: E731  the self_attn subtree
  expected, _ = run(optim.adam_mini(**HP), sub(params), [sub(g) for g in grads])
  assert_trees_close(sub(got), expected)
  assert_trees_close({k: v for k, v in got.items() if k != "layers"},
                     {k: v for k, v in params.items() if k != "layers"}, rtol=0, atol=0)


@pytest.mark.parametrize("custom_mask", [False, True])
def test_weight_decay_exempts_norms_and_biases(custom_mask):
  params, _ = small_problem()
  zeros = jax.tree.map(jnp.zeros_like, params)
  lr, wd = 0.5, 0.1
  mask = jax.tree.map(lambda _: True, params) if custom_mask else None
  tx = optim.adam_mini(lr, weight_decay=wd, weight_decay_mask=mask)
  # With zero gradients Adam's direction is 0 / (0 + eps) = 0: only the decay moves parameters.
  got, _ = run(tx, params, [zeros])
  for p, x in flatten(got).items():
    exempt = p.endswith(("bias", "scale")) and not custom_mask
    np.testing.assert_allclose(x, flatten(params)[p] * (1.0 if exempt else 1 - lr * wd),
                               rtol=1e-6, err_msg=p)


# ---------------------------------------------------------------------------------------------
# Sharding: the same training on 1 device and on an 8-device (fsdp=2, tensor=4) mesh.
SPECS = {  # mesh specs for the LIBRARY params (the fused-axis FLAX_2D kernels get (fsdp, tensor))
    "embed_tokens.embedding": P(None, "fsdp"),
    "layers.0.input_layernorm.scale": P("fsdp"),
    "layers.0.self_attn.q_proj.kernel": P("fsdp", "tensor", None),
    "layers.0.self_attn.q_proj.bias": P("tensor", None),
    "layers.0.self_attn.k_proj.kernel": P("fsdp", None, None),
    "layers.0.self_attn.k_proj.bias": P(None, None),
    "layers.0.self_attn.v_proj.kernel": P("fsdp", None, None),
    "layers.0.self_attn.o_proj.kernel": P("tensor", None, "fsdp"),
    "layers.0.mlp.gate_proj.kernel": P("fsdp", None),
    "layers.0.mlp.down_proj.kernel": P(None, "fsdp"),
    "norm.scale": P("fsdp"),
    "lm_head.kernel": P("fsdp", None),
    "attn.query.kernel": P("fsdp", "tensor"),  # 12 = 4 heads x 3: tensor=4 splits whole heads
}


def sharded_problem():
  layout = {**LIBRARY, "attn.query.kernel": FLAX_2D["attn.query.kernel"]}
  params, _ = random_problem(layout, 0, seed=3)
  rng = np.random.default_rng(4)
  targets = {p: rng.standard_normal(x.shape).astype(np.float32) for p, x in params.items()}
  return nest(params), nest(targets), nest(SPECS)


def loss_fn(params, targets):
  # A smooth loss with cross-entry coupling, so gradients depend on the sharded reductions.
  sq = sum(jnp.sum(jnp.tanh(p) * t) + jnp.sum(p * p) ** 1.5
           for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(targets)))
  return sq


def train(tx, params, targets, num_steps, **jit_kwargs):
  def step(params, state):
    g = jax.grad(loss_fn)(params, targets)
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params) if "init_state" not in jit_kwargs else jit_kwargs.pop("init_state")
  step = jax.jit(step, **jit_kwargs)
  for _ in range(num_steps):
    params, state = step(params, state)
  return params, state


PARTITION = optim.BlockPartition(num_heads=H)
NUM_SHARDED_STEPS = 3


@functools.cache
def one_device_result():
  params, targets, _ = sharded_problem()
  return train(optim.adam_mini(**HP, partition=PARTITION), params, targets, NUM_SHARDED_STEPS)[0]


@pytest.mark.parametrize("wrap", ["plain", "multi_steps", "inject"])
def test_state_partition_specs_follow_the_state(wrap):
  params, _, specs = sharded_problem()
  tx = {"plain": lambda: optim.adam_mini(**HP, partition=PARTITION),
        "multi_steps": lambda: optax.MultiSteps(optim.adam_mini(**HP, partition=PARTITION), 2),
        "inject": lambda: optax.inject_hyperparams(optim.adam_mini)(**HP, partition=PARTITION),
        }[wrap]()
  got = optim.state_partition_specs(tx, params, specs, PARTITION)
  abstract = jax.eval_shape(tx.init, params)
  is_spec = lambda x: isinstance(x, P)  # noqa: E731
  assert jax.tree.structure(got, is_leaf=is_spec) == jax.tree.structure(abstract)
  for spec, leaf in zip(jax.tree.leaves(got, is_leaf=is_spec), jax.tree.leaves(abstract)):
    assert len(spec) in (0, leaf.ndim)
  nu_specs = [s for path, s in jax.tree_util.tree_flatten_with_path(got, is_leaf=is_spec)[0]
              if any(getattr(k, "name", None) == "nu" for k in path)]
  assert nu_specs == jax.tree.leaves(optim.nu_partition_specs(params, specs, PARTITION),
                                     is_leaf=is_spec)


def test_eight_devices_match_one_device_auto_mesh():
  params, targets, specs = sharded_problem()
  tx = optim.adam_mini(**HP, partition=PARTITION)
  expected = one_device_result()

  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
  named = lambda tree: jax.tree.map(lambda s: NamedSharding(mesh, s), tree)  # noqa: E731
  p_sh = named(specs)
  s_sh = named(optim.state_partition_specs(tx, params, specs, PARTITION))
  sharded = jax.device_put(params, p_sh)
  state = jax.jit(tx.init, out_shardings=s_sh)(sharded)
  got, state = train(tx, sharded, targets, NUM_SHARDED_STEPS, init_state=state,
                     in_shardings=(p_sh, s_sh), out_shardings=(p_sh, s_sh))
  assert_trees_close(got, expected, rtol=1e-5, atol=1e-6)
  nu = flatten(state[0].nu)
  assert nu["layers.0.self_attn.q_proj.kernel"].sharding.spec == P(None, "tensor", None)
  assert nu["attn.query.kernel"].sharding.spec == P(None, "tensor", None)
  assert nu["embed_tokens.embedding"].sharding.spec == P(None, None)
  assert got["attn"]["query"]["kernel"].sharding.spec == P("fsdp", "tensor")


def test_eight_devices_match_one_device_explicit_mesh():
  params, targets, specs = sharded_problem()
  tx = optim.adam_mini(**HP, partition=PARTITION)
  expected = one_device_result()

  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    state = jax.jit(tx.init)(sharded)  # shardings follow the parameters' types
    expected_nu = flatten(optim.nu_partition_specs(params, specs, PARTITION))
    for p, nu in flatten(state[0].nu).items():
      assert nu.sharding.spec == expected_nu[p], p
    got, _ = train(tx, sharded, targets, NUM_SHARDED_STEPS, init_state=state)
  assert_trees_close(got, expected, rtol=1e-5, atol=1e-6)


def test_orbax_save_restore(tmp_path):
  params, grads = small_problem()
  tx = optim.adam_mini(**HP)
  params, state = run(tx, params, grads[:1])
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "state", jax.eval_shape(tx.init, params))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert_trees_close(restored, state, rtol=0, atol=0)
  step = jax.jit(tx.update)
  assert_trees_close(step(grads[1], restored, params), step(grads[1], state, params),
                     rtol=0, atol=0)
