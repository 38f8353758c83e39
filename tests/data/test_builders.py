"""Tests for rlhfjax.data.builders: tfds array_record round trip, determinism, configs, errors."""

import dataclasses
import functools
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from rlhfjax import data

SMALL = {
    "synthetic_verifiable": dict(num_train=48, num_test=16),
    "synthetic_preference": dict(num_sft=24, num_pairs=24, num_test=8, label_noise=0.1),
}
GENERATORS = {
    "synthetic_verifiable": (data.VerifiableTaskConfig, data.generate_verifiable),
    "synthetic_preference": (data.PreferenceTaskConfig, data.generate_preference),
}


def _assert_source_equals_records(source, records):
  assert len(source) == len(records)
  for i, record in enumerate(records):
    example = source[i]
    assert sorted(example) == sorted(record)
    for key, value in record.items():
      got = np.asarray(example[key])
      assert got.dtype.kind == np.asarray(value).dtype.kind, key
      np.testing.assert_array_equal(got, value, err_msg=key)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_records_read_through_data_source_equal_the_generator(name, tmp_path):
  builder = data.build_dataset(name, data_dir=tmp_path, seed=1, **SMALL[name])
  assert builder.info.file_format.value == "array_record"
  assert list(tmp_path.glob(f"{name}/*/1.0.0/*.array_record-*"))
  config_cls, generate = GENERATORS[name]
  config = config_cls(seed=1, **SMALL[name])
  for split in data.BUILDERS[name].SPLITS:
    records = generate(config, split)
    tfds_config = data.builder_config(name, seed=1, **SMALL[name])
    source = tfds.data_source(name, split=split, data_dir=tmp_path,
                              builder_kwargs={"config": tfds_config})
    _assert_source_equals_records(source, records)
    source = data.load_split(name, split, data_dir=tmp_path, seed=1, **SMALL[name])
    _assert_source_equals_records(source, records)
  # Writing and reading array_record never needs TensorFlow.
  assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("name", sorted(SMALL))
def test_building_twice_is_identical_and_another_seed_differs(name, tmp_path):
  split = data.BUILDERS[name].SPLITS[0]
  first = data.load_split(name, split, data_dir=tmp_path / "a", seed=3, **SMALL[name])
  second = data.load_split(name, split, data_dir=tmp_path / "b", seed=3, **SMALL[name])
  _assert_source_equals_records(second, [first[i] for i in range(len(first))])
  other = data.load_split(name, split, data_dir=tmp_path / "a", seed=4, **SMALL[name])
  assert any(not np.array_equal(first[i]["prompt"], other[i]["prompt"]) for i in range(len(first)))
  # Different settings live side by side in their own config folders.
  assert len(list((tmp_path / "a" / name).glob("seed*"))) == 2


def test_default_settings_use_the_predefined_config():
  config = data.builder_config("synthetic_verifiable")
  assert config is data.SyntheticVerifiable.builder_configs[config.name]
  assert data.builder_config("synthetic_verifiable", seed=1).name != config.name
  custom = data.builder_config("synthetic_verifiable", seed=1)
  assert custom.task == data.VerifiableTaskConfig(seed=1)


def test_a_loaded_split_feeds_the_batch_iterator(tmp_path):
  source = data.load_split("synthetic_verifiable", "train", data_dir=tmp_path,
                           **SMALL["synthetic_verifiable"])
  collate = functools.partial(data.sft_batch, prompt_len=9, response_len=7)
  (step, batch), = data.iterate_batches(source, collate, batch_size=8, seed=0, start_step=2,
                                        num_steps=1)
  assert step == 2 and batch["tokens"].shape == (8, 16)
  indices = data.batch_indices(len(source), batch_size=8, seed=0, step=2)
  expected = collate([source[int(i)] for i in indices])
  np.testing.assert_array_equal(batch["tokens"], expected["tokens"])


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("synthetic_verifiable", {"num_train": -3}, "num_train"),
        ("synthetic_verifiable", {"demo_error_rate": 1.1}, "demo_error_rate"),
        ("synthetic_preference", {"label_noise": -0.2}, "label_noise"),
        ("synthetic_preference", {"num_sft": -1}, "num_sft"),
        # A setting of the other task is unknown here.
        ("synthetic_preference", {"demo_error_rate": 0.1}, "demo_error_rate"),
        ("synthetic_sorting", {}, "synthetic_sorting"),
    ],
)
def test_bad_config_raises_before_building(name, kwargs, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    data.build_dataset(name, data_dir=tmp_path, **kwargs)
  with pytest.raises(ValueError, match=match):
    data.load_split(name, "test", data_dir=tmp_path, **kwargs)
  assert not list(tmp_path.iterdir())  # nothing was written


def test_unknown_split_raises(tmp_path):
  with pytest.raises(ValueError, match="split must be one of .* got 'pairs'"):
    data.load_split("synthetic_verifiable", "pairs", data_dir=tmp_path)
  assert not list(tmp_path.iterdir())  # raised before building anything


def _changed(value):
  """A valid value of a task setting different from its default `value`."""
  if isinstance(value, str):
    return "reverse"  # the only str setting is `operation` ("sort" by default)
  if isinstance(value, int):
    return value + 1
  return value / 2 + 0.05  # floats in [0, 1] (or a positive temperature) stay valid


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_setting_is_part_of_the_config_name(name):
  """Datasets with different settings must never share a prepared directory."""
  fields = dataclasses.fields(data.BUILDERS[name].TASK_CONFIG)
  names = {data.builder_config(name).name}
  for f in fields:
    names.add(data.builder_config(name, **{f.name: _changed(f.default)}).name)
  assert len(names) == len(fields) + 1
