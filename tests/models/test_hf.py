"""Hugging Face checkpoints: parity with transformers, exact round trips, sharded loading, errors.

Reference models are tiny RANDOM transformers models (`LlamaForCausalLM(LlamaConfig(...))`, ...;
nothing is downloaded) whose weights are redrawn at unit scale: under HF's 0.02 init attention is
nearly uniform and a wrong rotary layout or head split would hide below the tolerance.
"""

import dataclasses
import json
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx  # pylint: disable=g-import-not-at-top,wrong-import-position

from rlhfjax import sharding as shd  # pylint: disable=g-import-not-at-top,wrong-import-position
from rlhfjax.models import (  # pylint: disable=g-import-not-at-top,wrong-import-position
    Llama3RopeScaling,
    TransformerConfig,
    config_from_hf,
    config_to_hf,
    from_pretrained,
    load_pretrained,
    save_pretrained,
)
from rlhfjax.models import hf as hf_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from rlhfjax.models.transformer import stack_layers  # pylint: disable=wrong-import-position
from rlhfjax.sampling import SamplingConfig, make_sampler  # pylint: disable=wrong-import-position

# Tolerance of the brief: fp32 logits within 1e-4 of transformers'.
LOGIT_ATOL = 1e-4
VOCAB = 96
_LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=64)

# name -> (transformers config class, causal LM class, config kwargs). With head_dim 16 and
# theta 5e5 the rotary wavelengths 2 pi theta^(2i/16) span 6.3 .. 1.1e6, so an original context
# of 64 (low 1, high 4) puts frequencies in all three Llama-3.1 regimes (kept, smoothed, divided).
CASES = {
    # Llama 2: multi-head attention (K = H), untied, no rope scaling.
    "llama2_mha": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
        rope_theta=10_000.0, rms_norm_eps=1e-5)),
    # Llama 3.1: GQA, explicit head_dim 16 != D / H = 8, llama3 rope scaling.
    "llama3_1_gqa_head_dim": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, rope_theta=500_000.0, rope_scaling=_LLAMA3_SCALING, rms_norm_eps=1e-5)),
    # Llama 3.2: multi-query attention, tied embeddings, llama3 rope scaling.
    "llama3_2_tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, rope_theta=500_000.0, rope_scaling={**_LLAMA3_SCALING, "factor": 32.0},
        tie_word_embeddings=True)),
    # Qwen2.5: q/k/v biases, GQA, tied embeddings, theta 1e6.
    "qwen2_biases": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)),
}


def _randomise(model, seed):
  """Unit-scale weights: N(0, 1/fan_in) kernels, N(0, 1) embeddings, 1 + N(0, 0.2^2) norms."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      z = torch.randn(p.shape, generator=gen)
      if "norm" in name:
        p.copy_(1.0 + 0.2 * z)
      elif name.endswith("bias"):
        p.copy_(0.5 * z)
      elif "embed_tokens" in name:
        p.copy_(z)
      else:
        p.copy_(z / np.sqrt(p.shape[1]))


def _hf_model(case, seed=0):
  config_cls, model_cls, kwargs = CASES[case]
  config = getattr(transformers, config_cls)(
      vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=128, bos_token_id=1,
      eos_token_id=2, pad_token_id=0, **kwargs)
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(config).eval()
  _randomise(model, seed)
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """case -> (transformers model, directory of its save_pretrained)."""
  out = {}
  for i, case in enumerate(CASES):
    model = _hf_model(case, seed=i)
    path = str(tmp_path_factory.mktemp(case))
    model.save_pretrained(path)
    out[case] = (model, path)
  return out


def _hf_logits(model, tokens_BxT):
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens_BxT), dtype=torch.long)).logits.numpy()


def _tokens(seed, shape=(2, 12)):
  return np.random.default_rng(seed).integers(3, VOCAB, shape).astype(np.int32)


@jax.jit
def _forward(graphdef, params, tokens_BxT):
  return nnx.merge(graphdef, params)(tokens_BxT)


# -- parity with transformers --------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(checkpoints, case):
  hf_model, path = checkpoints[case]
  graphdef, params = load_pretrained(path, dtype="float32")
  tokens = _tokens(1)
  logits = np.asarray(_forward(graphdef, params, jnp.asarray(tokens)))
  ref = _hf_logits(hf_model, tokens)
  diff = float(np.max(np.abs(logits - ref)))
  print(f"\n[{case}] import: max |logits - transformers| = {diff:.2e} (|logits| <= "
        f"{np.max(np.abs(ref)):.1f})")
  assert logits.shape == ref.shape == (2, 12, VOCAB)
  assert diff <= LOGIT_ATOL


def test_config_mapping_of_each_case(checkpoints):
  """The loaded TransformerConfig carries every field the cases vary; from_pretrained's model."""
  configs = {case: from_pretrained(path).config for case, (_, path) in checkpoints.items()}
  assert configs["llama2_mha"].num_kv_heads == 4 and configs["llama2_mha"].head_dim == 8
  assert configs["llama2_mha"].rope_scaling is None
  assert configs["llama3_1_gqa_head_dim"].head_dim == 16
  assert configs["llama3_1_gqa_head_dim"].rope_scaling == Llama3RopeScaling(
      factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
  assert configs["llama3_2_tied"].tie_embeddings and configs["llama3_2_tied"].num_kv_heads == 1
  assert configs["qwen2_biases"].attention_bias and configs["qwen2_biases"].rope_theta == 1e6
  assert not configs["llama3_1_gqa_head_dim"].attention_bias


@pytest.mark.parametrize("case", ["llama3_1_gqa_head_dim", "qwen2_biases"])
def test_greedy_generation_matches_transformers(checkpoints, case):
  hf_model, path = checkpoints[case]
  graphdef, params = load_pretrained(path, dtype="float32")
  prompt = _tokens(2, (2, 6))
  eos, max_new = 2, 10
  sampler = make_sampler(graphdef, SamplingConfig(max_new_tokens=max_new, eos_id=eos, pad_id=0,
                                                  temperature=0.0))
  out = sampler(params, jnp.asarray(prompt), jnp.ones_like(prompt), jax.random.key(0))
  with torch.no_grad():
    ref = hf_model.generate(torch.as_tensor(prompt, dtype=torch.long),
                            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                            do_sample=False, max_new_tokens=max_new, eos_token_id=eos,
                            pad_token_id=0).numpy()[:, prompt.shape[1]:]
  ours = np.asarray(out.tokens_BxTr)
  # transformers stops early once every row has emitted EOS; the rest of ours is padding.
  np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
  assert np.all(ours[:, ref.shape[1]:] == 0)


# -- export --------------------------------------------------------------------------------------


# Between them: untied lm_head, GQA, explicit head_dim, rope scaling; q/k/v biases, tied embedding.
@pytest.mark.parametrize("case", ["llama3_1_gqa_head_dim", "qwen2_biases"])
def test_export_loads_in_transformers(checkpoints, case, tmp_path):
  """save_pretrained of new parameters -> transformers gives the same logits."""
  _, path = checkpoints[case]
  graphdef, params = load_pretrained(path, dtype="float32")
  # Perturb every parameter so the exported model differs from the imported checkpoint.
  rng = np.random.default_rng(3)
  params = jax.tree.map(
      lambda x: np.asarray(x) * (1.0 + 0.1 * rng.standard_normal(x.shape, np.float32)), params)
  save_pretrained((graphdef, params), str(tmp_path))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert type(hf_model).__name__ == CASES[case][1]
  tokens = _tokens(4)
  logits = np.asarray(_forward(graphdef, params, jnp.asarray(tokens)))
  diff = float(np.max(np.abs(logits - _hf_logits(hf_model, tokens))))
  print(f"\n[{case}] export: max |logits - transformers| = {diff:.2e}")
  assert diff <= LOGIT_ATOL


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_import_is_bit_identical_and_sharded(checkpoints, dtype, tmp_path):
  """Round trip through a multi-file checkpoint, loaded onto a (2, 2, 2) mesh."""
  _, path = checkpoints["llama3_1_gqa_head_dim"]
  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  graphdef, params = load_pretrained(path, dtype=dtype, mesh=mesh)
  save_pretrained((graphdef, params), str(tmp_path), max_shard_bytes=4096)
  files = sorted(os.listdir(tmp_path))
  assert hf_lib.INDEX_FILE in files and sum(f.endswith(".safetensors") for f in files) > 2
  graphdef2, params2 = load_pretrained(str(tmp_path), mesh=mesh)
  assert graphdef2 == graphdef
  for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(params2)):
    assert a.dtype == b.dtype == jnp.dtype(dtype), p
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    assert b.sharding == a.sharding, p
  # The rules shard the heads of q over `tensor` and the model width over `fsdp`.
  q = params2["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(shd.FSDP, shd.TENSOR, None)
  with open(os.path.join(tmp_path, hf_lib.CONFIG_FILE), encoding="utf-8") as f:
    assert json.load(f)["torch_dtype"] == dtype


def test_scanned_import_export_round_trip(checkpoints, tmp_path):
  """scan_layers=True reads per-layer tensors into stacked [L, ...] shards and writes them back."""
  hf_model, path = checkpoints["qwen2_biases"]
  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  _, params = load_pretrained(path, mesh=mesh)
  graphdef, stacked = load_pretrained(path, mesh=mesh, scan_layers=True)
  expected = stack_layers(params)
  assert jax.tree.structure(stacked) == jax.tree.structure(expected)
  for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(stacked)[0], jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(p))
  q = stacked["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.shape[0] == 2
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, shd.FSDP, shd.TENSOR, None)
  tokens = _tokens(21)
  np.testing.assert_allclose(_forward(graphdef, stacked, tokens), _hf_logits(hf_model, tokens),
                             atol=LOGIT_ATOL)
  save_pretrained((graphdef, stacked), str(tmp_path), max_shard_bytes=4096)
  _, params2 = load_pretrained(str(tmp_path))
  for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(p))


def test_read_block_equals_slice_of_full_parameter():
  """Any block a device may ask for (inner axes cut too) equals the slice of the whole param."""
  rng = np.random.default_rng(0)
  cases = [  # (parameter shape, HF tensor map)
      ((6, 4, 8), hf_lib._TensorMap("q", (1, 2), True)),
      ((4, 8, 6), hf_lib._TensorMap("o", (2, 1), True)),
      ((4, 8), hf_lib._TensorMap("b", (2,), False)),
      ((10, 6), hf_lib._TensorMap("e", (1, 1), False)),
  ]

  class Handle:
    def __init__(self, tensors):
      self.tensors = tensors

    def get_slice(self, name):
      return self.tensors[name]

  for shape, tmap in cases:
    full = rng.standard_normal(shape).astype(np.float32)
    handle = Handle({tmap.name: hf_lib._to_hf_tensor(full, tmap)})
    for _ in range(20):
      index = []
      for n in shape:
        lo = int(rng.integers(0, n))
        index.append(slice(lo, int(rng.integers(lo + 1, n + 1))))
      block = hf_lib._read_block(handle, tmap, shape, tuple(index), np.float32)
      np.testing.assert_array_equal(block, full[tuple(index)])


# -- config mapping ------------------------------------------------------------------------------


def _llama3_8b_v4():
  """The transformers-4.x config.json of meta-llama/Llama-3.1-8B (rope keys at the top level)."""
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
      "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
      "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
      "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
      "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      "tie_word_embeddings": False, "torch_dtype": "bfloat16", "attention_bias": False,
      "mlp_bias": False,
  }


def test_config_from_hf_reads_both_layouts_and_matches_named_config():
  from rlhfjax.models import get_config  # pylint: disable=g-import-not-at-top
  v4 = _llama3_8b_v4()
  v5 = dict(v4)
  v5["rope_parameters"] = {**v5.pop("rope_scaling"), "rope_theta": v5.pop("rope_theta")}
  v5["dtype"] = v5.pop("torch_dtype")
  expected = get_config("llama3_1_8b", dtype="bfloat16", param_dtype="bfloat16")
  assert config_from_hf(v4) == expected
  assert config_from_hf(v5) == expected
  # Pre-4.45 spelling `type`, and no head_dim (D / H).
  old = dict(v4, rope_scaling={**v4["rope_scaling"], "type": "llama3"})
  del old["rope_scaling"]["rope_type"]
  assert config_from_hf(old, dtype="float32") == dataclasses.replace(
      expected, dtype="float32", param_dtype="float32")


@pytest.mark.parametrize("config_cls, name", [("LlamaConfig", "llama3_2_1b"),
                                               ("Qwen2Config", "qwen2_5_0_5b")])
def test_config_from_hf_defaults_of_absent_fields_follow_transformers(config_cls, name):
  """A config.json may leave out fields at their transformers defaults; read them as it does."""
  from rlhfjax.models import get_config  # pylint: disable=g-import-not-at-top
  hf = config_to_hf(get_config(name))
  for key in ("tie_word_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling"):
    del hf[key]
  reference = getattr(transformers, config_cls)(**hf)
  config = config_from_hf(hf)
  assert config.tie_embeddings == reference.tie_word_embeddings
  assert config.rms_norm_eps == reference.rms_norm_eps
  assert config.rope_theta == reference.rope_parameters["rope_theta"]
  assert config.rope_scaling is None


@pytest.mark.parametrize("name", ["llama2_7b", "llama3_2_1b", "qwen2_5_0_5b", "tiny"])
def test_config_to_hf_round_trip(name):
  from rlhfjax.models import get_config  # pylint: disable=g-import-not-at-top
  config = get_config(name)
  assert config_from_hf(config_to_hf(config)) == config


def test_config_to_hf_torch_dtype_is_the_storage_dtype():
  """Tensors are written in the parameter dtype, so config.json names it, not the compute dtype."""
  from rlhfjax.models import get_config  # pylint: disable=g-import-not-at-top
  config = get_config("tiny", dtype="bfloat16", param_dtype="float32")
  assert config_to_hf(config)["torch_dtype"] == "float32"
  assert config_from_hf(config_to_hf(config)).param_dtype == "float32"


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "'gpt2'.*GPT2LMHeadModel"),
    (dict(architectures=["LlamaForSequenceClassification"]), "LlamaForSequenceClassification"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (dict(use_sliding_window=True), "sliding"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "sliding"),  # transformers 5.x
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(vocab_size=None), "vocab_size"),
])
def test_config_from_hf_rejects_unsupported(change, message):
  with pytest.raises(ValueError, match=message):
    config_from_hf({**_llama3_8b_v4(), **change})


# -- checkpoint errors ---------------------------------------------------------------------------


def _rewrite(src, dst, *, config_change=None, drop=(), add=None):
  """Copies a single-file checkpoint with tensors dropped/added or config.json changed."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  os.makedirs(dst, exist_ok=True)
  with safe_open(os.path.join(src, "model.safetensors"), framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
  tensors.update(add or {})
  safetensors_numpy.save_file(tensors, os.path.join(dst, "model.safetensors"),
                              metadata={"format": "pt"})
  with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  config.update(config_change or {})
  with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f)
  return dst


@pytest.mark.parametrize("kwargs, message", [
    (dict(config_change={"vocab_size": VOCAB + 4}),
     rf"model.embed_tokens.weight has shape \({VOCAB}, 32\).*needs \({VOCAB + 4}, 32\)"),
    (dict(drop=["model.layers.1.mlp.up_proj.weight"]),
     r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"),
    (dict(add={"model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)}),
     r"unexpected tensors \['model.layers.0.self_attn.o_proj.bias'\]"),
    (dict(config_change={"model_type": "mistral", "architectures": ["MistralForCausalLM"]}),
     "'mistral'.*MistralForCausalLM"),
])
def test_load_errors_name_the_problem(checkpoints, tmp_path, kwargs, message):
  _, path = checkpoints["llama2_mha"]
  bad = _rewrite(path, str(tmp_path / "bad"), **kwargs)
  with pytest.raises(ValueError, match=message):
    load_pretrained(bad)


def test_untied_copy_check_reads_every_chunk():
  """The tied-copy check compares lm_head and the embedding `rows_per_read` rows at a time: a
  difference in any chunk, the last (partial) one included, is found and located."""
  rng = np.random.default_rng(0)
  embed = rng.standard_normal((10, 3)).astype(np.float32)

  class Slice:
    def __init__(self, x):
      self.x = x

    def get_shape(self):
      return list(self.x.shape)

    def __getitem__(self, index):
      return self.x[index]

  class Handle:
    def __init__(self, tensors):
      self.tensors = tensors

    def get_slice(self, name):
      return Slice(self.tensors[name])

  assert hf_lib._untied_copy_problem(Handle({"lm_head.weight": embed.copy()}),
                                     Handle({"model.embed_tokens.weight": embed}),
                                     rows_per_read=4) is None
  for row in range(10):
    head = embed.copy()
    head[row, 1] += 1.0
    problem = hf_lib._untied_copy_problem(Handle({"lm_head.weight": head}),
                                          Handle({"model.embed_tokens.weight": embed}),
                                          rows_per_read=4)
    assert problem is not None and f"rows from {row - row % 4}" in problem, row


def test_checkpoint_with_rotary_buffers_loads(checkpoints, tmp_path):
  """Old checkpoints carry each layer's `rotary_emb.inv_freq` buffer: skipped, not an error."""
  hf_model, path = checkpoints["llama2_mha"]
  inv_freq = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)
              for i in range(2)}
  old = _rewrite(path, str(tmp_path / "old"), add=inv_freq)
  graphdef, params = load_pretrained(old)
  tokens = _tokens(5)
  np.testing.assert_allclose(_forward(graphdef, params, tokens), _hf_logits(hf_model, tokens),
                             atol=LOGIT_ATOL)


def test_save_pretrained_writes_the_requested_dtype(checkpoints, tmp_path):
  """save_pretrained(dtype=bfloat16) of float32 parameters writes bfloat16 tensors, which load
  as the parameters rounded to bfloat16."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  _, path = checkpoints["qwen2_biases"]
  graphdef, params = load_pretrained(path, dtype="float32")
  save_pretrained((graphdef, params), str(tmp_path), dtype="bfloat16")
  with safe_open(os.path.join(tmp_path, hf_lib.WEIGHTS_FILE), framework="numpy") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  _, params2 = load_pretrained(str(tmp_path))
  for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(params2)):
    assert b.dtype == jnp.bfloat16, p
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a).astype(jnp.bfloat16), err_msg=str(p))


def test_tied_checkpoint_with_lm_head_copy_loads(checkpoints, tmp_path):
  """Some tied checkpoints still store lm_head.weight; it is the embedding and is skipped."""
  _, path = checkpoints["qwen2_biases"]
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(os.path.join(path, "model.safetensors"), framework="numpy") as f:
    embed = f.get_tensor("model.embed_tokens.weight")
  copy = _rewrite(path, str(tmp_path / "copy"), add={"lm_head.weight": embed})
  _, params = load_pretrained(copy)
  assert "lm_head" not in params


@pytest.mark.parametrize("change", ["values", "shape"])
def test_tied_config_with_a_different_lm_head_raises(checkpoints, tmp_path, change):
  """A tied config over a checkpoint whose lm_head.weight is not the embedding (an untied
  fine-tune saved with a stale config) would silently drop the trained output layer: it raises,
  naming both tensors and the fix."""
  _, path = checkpoints["qwen2_biases"]
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(os.path.join(path, "model.safetensors"), framework="numpy") as f:
    embed = f.get_tensor("model.embed_tokens.weight")
  head = embed.copy()
  if change == "values":
    head[-1, 0] += 1.0  # One entry in the last row.
  else:
    head = head[:, :-1]
  bad = _rewrite(path, str(tmp_path / change), add={"lm_head.weight": head})
  with pytest.raises(ValueError, match="lm_head.weight .*model.embed_tokens.weight.*"
                                       "tie_word_embeddings to false"):
    load_pretrained(bad)


def test_save_pretrained_rejects_score_head(tmp_path):
  from rlhfjax.models import Transformer, get_config  # pylint: disable=g-import-not-at-top
  config = get_config("tiny")
  assert isinstance(config, TransformerConfig)
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0), score_head=True))
  with pytest.raises(ValueError, match="score head"):
    save_pretrained(model, str(tmp_path))
