"""Tests of the model configurations: validation, named configs, analytic parameter counts."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from rlhfjax.models import (
    CONFIGS,
    Llama3RopeScaling,
    Transformer,
    TransformerConfig,
    config_from_hf,
    get_config,
    num_params,
)

# Published parameter counts: the "Model size" on the HF model cards, exactly the safetensors
# index `total_size` in bytes / 2 (bf16 checkpoints); recomputed by hand from each config.json.
PUBLISHED_NUM_PARAMS = {
    "llama3_8b": 8_030_261_248,  # meta-llama/Meta-Llama-3-8B
    "llama3_2_1b": 1_235_814_400,  # meta-llama/Llama-3.2-1B (tied embeddings)
    "qwen2_5_7b": 7_615_616_512,  # Qwen/Qwen2.5-7B (card: 7.61B)
    "qwen2_5_0_5b": 494_032_768,  # Qwen/Qwen2.5-0.5B (card: 0.49B, tied embeddings)
}


def _eval_shape_num_params(config, score_head=False):
  """Counts the parameters of an abstract (never allocated) model."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0), score_head=score_head))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", sorted(PUBLISHED_NUM_PARAMS))
def test_num_params_matches_published_and_eval_shape(name):
  config = get_config(name)
  assert num_params(config) == PUBLISHED_NUM_PARAMS[name]
  assert _eval_shape_num_params(config) == PUBLISHED_NUM_PARAMS[name]


@pytest.mark.parametrize("name", ["llama3_70b", "llama3_1_70b"])
def test_70b_num_params_matches_published_and_scanned_eval_shape(name):
  # meta-llama/Meta-Llama-3-70B (rope scaling adds no parameters). The scanned model traces one
  # block instead of 80, so its eval_shape is fast; the layouts hold the same parameters.
  config = get_config(name, scan_layers=True)
  assert num_params(config) == 70_553_706_496
  assert _eval_shape_num_params(config) == 70_553_706_496


@pytest.mark.parametrize("name", ["tiny", "small", "llama3_1_8b"])
@pytest.mark.parametrize("score_head", [False, True])
def test_num_params_matches_eval_shape(name, score_head):
  config = get_config(name)
  expected = num_params(config, score_head=score_head)
  assert _eval_shape_num_params(config, score_head=score_head) == expected


def test_named_configs():
  assert set(CONFIGS) >= {
      "tiny", "small", "llama2_7b", "llama3_8b", "llama3_2_1b", "llama3_1_8b", "qwen2_5_0_5b",
      "qwen2_5_7b",
  }
  assert 10e6 <= num_params(get_config("small")) <= 30e6
  # Vocabulary sizes of the HF tokenizers' config.json (Qwen2.5-7B pads its embedding to 152064).
  assert get_config("llama3_8b").vocab_size == get_config("llama3_2_1b").vocab_size == 128_256
  assert get_config("qwen2_5_0_5b").vocab_size == 151_936
  assert get_config("qwen2_5_7b").vocab_size == 152_064
  assert get_config("llama2_7b").vocab_size == 32_000
  assert get_config("llama3_2_1b").rope_scaling.factor == 32.0
  assert get_config("llama3_1_8b").rope_scaling.factor == 8.0
  assert get_config("llama3_1_70b").rope_scaling == get_config("llama3_1_8b").rope_scaling
  assert get_config("llama3_1_70b").max_seq_len == 131_072
  assert get_config("llama3_70b").rope_scaling is None
  assert get_config("llama3_70b").max_seq_len == 8192
  assert get_config("llama3_8b").rope_scaling is None
  assert get_config("qwen2_5_0_5b").tie_embeddings and get_config("llama3_2_1b").tie_embeddings
  assert get_config("qwen2_5_0_5b").attention_bias and get_config("qwen2_5_7b").attention_bias
  assert not get_config("llama3_8b").attention_bias


def _llama(**fields):
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16", **fields}


def _qwen2(**fields):
  return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
          "use_sliding_window": False, "torch_dtype": "bfloat16", **fields}


_LLAMA3_ROPE_SCALING = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192, "rope_type": "llama3"}

# The architecture fields of each model's config.json on the HF Hub (the repositories named in
# `configs.py`), so that fields no parameter count sees (rope_theta, rms_norm_eps, context) are
# pinned too.
PUBLISHED_CONFIG_JSON = {
    "llama2_7b": _llama(  # meta-llama/Llama-2-7b-hf (no rope_theta: the default 10000)
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        rms_norm_eps=1e-05, rope_scaling=None, tie_word_embeddings=False),
    "llama3_8b": _llama(  # meta-llama/Meta-Llama-3-8B
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rms_norm_eps=1e-05, rope_theta=500000.0, rope_scaling=None, tie_word_embeddings=False),
    "llama3_2_1b": _llama(  # meta-llama/Llama-3.2-1B
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-05, rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE_SCALING, tie_word_embeddings=True),
    "qwen2_5_0_5b": _qwen2(  # Qwen/Qwen2.5-0.5B
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rms_norm_eps=1e-06, rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen2_5_7b": _qwen2(  # Qwen/Qwen2.5-7B
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
        rms_norm_eps=1e-06, rope_theta=1000000.0, tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIG_JSON))
def test_named_config_equals_its_published_config_json(name):
  assert config_from_hf(PUBLISHED_CONFIG_JSON[name], dtype="float32") == get_config(name)


def test_get_config_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match="llama3_8b"):
    get_config("gpt5")


def test_get_config_overrides():
  config = get_config("tiny", dtype="bfloat16", num_layers=3)
  assert config.dtype == "bfloat16" and config.num_layers == 3
  assert get_config("tiny").num_layers == 2  # the registry is not mutated
  with pytest.raises(ValueError, match="num_layerz"):
    get_config("tiny", num_layerz=3)


def test_dtype_accepts_jnp_types_and_is_hashable():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  a = get_config("tiny", dtype=jnp.bfloat16)
  b = get_config("tiny", dtype="bfloat16")
  assert a == b and hash(a) == hash(b) and a.dtype == "bfloat16"


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_heads=6, num_kv_heads=4), "num_kv_heads"),
        (dict(num_heads=0), "num_heads"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(hidden_size=64.0), "hidden_size"),
        (dict(num_layers=True), "num_layers"),
        (dict(head_dim=15), "head_dim"),
        (dict(mlp_dim=0), "mlp_dim"),
        (dict(max_seq_len=0), "max_seq_len"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(rms_norm_eps=-1e-6), "rms_norm_eps"),
        (dict(dtype="int8"), "dtype"),
        (dict(param_dtype="float64x"), "param_dtype"),
        (dict(rope_scaling=8.0), "rope_scaling"),
        (dict(attention_bias=1), "attention_bias"),
        (dict(scan_layers=1), "scan_layers"),
        (dict(remat="dots"), "remat"),
        (dict(attention_impl="flash"), "attention_impl"),
    ],
)
def test_validation_names_the_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    dataclasses.replace(get_config("tiny"), **overrides)


def test_validation_message_names_both_head_counts():
  with pytest.raises(ValueError, match=r"num_heads \(6\) must be divisible by num_kv_heads \(4\)"):
    TransformerConfig(
        vocab_size=8, hidden_size=8, num_layers=1, num_heads=6, num_kv_heads=4, head_dim=2,
        mlp_dim=8,
    )


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(factor=0.0), "factor"),
        (dict(low_freq_factor=4.0, high_freq_factor=1.0), "high_freq_factor"),
        (dict(original_max_position_embeddings=0), "original_max_position_embeddings"),
    ],
)
def test_rope_scaling_validation(overrides, field):
  kwargs = dict(
      factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
  )
  with pytest.raises(ValueError, match=field):
    Llama3RopeScaling(**{**kwargs, **overrides})
