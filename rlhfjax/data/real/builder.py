"""Shared machinery of the real-dataset TFDS builders, and the functions that build and open them.

Each builder names its source files per split (`source_files`) and turns one source row into one
example (`parse_row`, raising `MalformedRow` for a row that does not fit). The base class resolves
the files (manual directory first, else download), reads the rows in file order, applies the
`on_malformed` policy, and records per split how many rows were skipped in the dataset metadata:

    builder = build_real_dataset("hh_rlhf", data_dir="runs/data", manual_dir="~/hh-rlhf")
    builder.info.metadata["malformed_rows"]  # {"train": {"skipped": 0, "messages": []}, ...}
    source = load_real_split("hh_rlhf", "train", data_dir="runs/data")
    decode_example(source[0])  # {"prompt": "\\n\\nHuman: ...", "chosen": "...", ...}

Records keep the source order (`disable_shuffling`): example i of a split is the i-th parsed row,
taking the files in the order the builder lists them. Text features come back from
`tfds.data_source` as bytes; `decode_example` turns them into `str`.

The policy is a constructor argument, not part of the builder config: a build under "raise" either
fails or writes exactly what a build under "skip" writes, so both share one prepared directory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from rlhfjax.data.real import sources

_TEXT = tfds.features.Text()
_MESSAGES = tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()})


def text():
  """Feature spec of one string field."""
  return _TEXT


def messages():
  """Feature spec of a conversation: parallel `role` / `content` string lists."""
  return _MESSAGES


def message(role: str, content: str) -> dict[str, str]:
  """One chat message `{"role": role, "content": content}`."""
  return {"role": role, "content": content}


class RealDatasetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Reads public source files (downloaded or from `manual_dir`) into array_record splits.

  Subclasses set `FEATURES`, `DESCRIPTION`, `HOMEPAGE`, `CITATION`, `MANUAL_DOWNLOAD_INSTRUCTIONS`
  and implement `source_files` and `parse_row` (and `row_split` when one file mixes splits).

  Args (constructor, besides the `tfds` ones such as `config` and `data_dir`):
    on_malformed: "skip" (default: count, log and record skipped rows in
      `info.metadata["malformed_rows"]`) or "raise" (a `ValueError` naming the file and row).
    file_format: array_record by default, which reads and writes without TensorFlow.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  FEATURES: dict
  DESCRIPTION: str
  HOMEPAGE: str = ""
  CITATION: str = ""

  def __init__(self, *, on_malformed: str = "skip", file_format="array_record", **kwargs):
    sources.check_on_malformed(on_malformed)
    self.on_malformed = on_malformed
    super().__init__(file_format=file_format, **kwargs)

  def source_files(self) -> dict[str, tuple[sources.SourceFile, ...]]:
    """The source files of each split of the current config, in reading order."""
    raise NotImplementedError

  def parse_row(self, record: Any, source: sources.SourceFile) -> dict:
    """One example from one row of `source`; raises `sources.MalformedRow` if it does not fit."""
    raise NotImplementedError

  def row_split(self, record: Any) -> str | None:
    """The split a row belongs to, in files that mix splits; None: the split the file is for.

    Raises `sources.MalformedRow` when the row's split cannot be read; such a row is reported once,
    by the first split that reads the file.
    """
    del record
    return None

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict(self.FEATURES),
        homepage=self.HOMEPAGE or None,
        citation=self.CITATION or None,
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    files = self.source_files()
    paths = sources.resolve_files(
        dl_manager, {source.url: source for split_files in files.values() for source in split_files})
    # A file listed for several splits (rows assigned by `row_split`) is read once per split; a row
    # whose split cannot be read is reported only by the first of them, so it is counted once.
    first_reader = {}
    for split, split_files in files.items():
      for source in split_files:
        first_reader.setdefault(source, split)
    return {
        split: self._generate_examples(
            split, [(source, paths[source.url], first_reader[source] == split)
                    for source in split_files])
        for split, split_files in files.items()
    }

  def _owner(self, record) -> str | None:
    if isinstance(record, sources.MalformedRow):  # the reader could not decode the row
      raise record
    return self.row_split(record)

  def _generate_examples(self, split, files):
    malformed = sources.MalformedRows(self.on_malformed, split)
    count = 0
    for file_index, (source, path, reports_unassigned) in enumerate(files):
      for row, record in sources.read_rows(path):
        try:
          owner = self._owner(record)
        except sources.MalformedRow as e:
          if reports_unassigned:
            malformed.report(path, row, e)
          continue
        if owner is not None and owner != split:
          continue
        try:
          example = self.parse_row(record, source)
        except sources.MalformedRow as e:
          malformed.report(path, row, e)
          continue
        count += 1
        yield f"{file_index:05d}-{row:010d}", example
    summary = malformed.summary()
    if not count:  # tfds would fail with "No examples were yielded", naming no file.
      raise ValueError(
          f"{self.name}/{split}: no examples in {[str(path) for _, path, _ in files]} "
          f"({summary['skipped']} malformed row(s) skipped"
          + (f", first: {summary['messages'][0]}" if summary["messages"] else "") + ")")
    if summary["skipped"]:
      logging.warning("%s/%s: skipped %d malformed row(s); see info.metadata['malformed_rows']",
                      self.name, split, summary["skipped"])
    self.info.metadata.setdefault("malformed_rows", {})[split] = summary


def _builder_class(name: str):
  from rlhfjax.data.real import REAL_BUILDERS  # the registry lives in the package's __init__

  if name not in REAL_BUILDERS:
    raise ValueError(f"unknown real dataset {name!r}; expected one of {sorted(REAL_BUILDERS)}")
  return REAL_BUILDERS[name]


def real_builder(name: str, *, data_dir, config: str | None = None, on_malformed: str = "skip"):
  """The (unprepared) builder of real dataset `name`, tfds config `config` (None or "": default)."""
  builder_cls = _builder_class(name)
  config = config or None
  if config is not None and config not in builder_cls.builder_configs:
    raise ValueError(f"unknown config {config!r} of {name}; expected one of "
                     f"{sorted(builder_cls.builder_configs)}")
  return builder_cls(config=config, data_dir=data_dir, on_malformed=on_malformed)


def build_real_dataset(name: str, *, data_dir, config: str | None = None, manual_dir=None,
                       on_malformed: str = "skip") -> tfds.core.DatasetBuilder:
  """Prepares (once) and returns the builder of a real dataset.

  Args:
    name: a key of `REAL_BUILDERS` ("hh_rlhf", "ultrafeedback_binarized", "tldr_comparisons",
      "tldr_sft", "grade_school_math", "math500").
    data_dir: root directory of the prepared datasets.
    config: the builder config (e.g. "helpful_base" of hh_rlhf); None or "" for the default.
    manual_dir: directory holding source files placed by hand (layouts in each builder's
      `MANUAL_DOWNLOAD_INSTRUCTIONS`); files missing there are downloaded.
    on_malformed: "skip" or "raise", see `RealDatasetBuilder`.

  Returns:
    The prepared builder (`builder.as_data_source()` gives every split).
  """
  builder = real_builder(name, data_dir=data_dir, config=config, on_malformed=on_malformed)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  if on_malformed == "raise":  # Also when an earlier "skip" build prepared the data.
    for split, summary in sorted(builder.info.metadata.get("malformed_rows", {}).items()):
      if summary["skipped"]:
        raise ValueError(
            f"{name}/{split} (prepared in {builder.data_dir}) skipped {summary['skipped']} "
            f"malformed row(s) and on_malformed is 'raise'; first: {summary['messages'][:1]}")
  return builder


def load_real_split(name: str, split: str, *, data_dir, config: str | None = None,
                    manual_dir=None, on_malformed: str = "skip"):
  """Random-access source of one split (prepared first if needed), via `tfds.data_source`.

  Returns:
    A sequence-like source: `len(source)`, `source[i]` -> dict (text fields as bytes; see
    `decode_example`).
  """
  builder = build_real_dataset(name, data_dir=data_dir, config=config, manual_dir=manual_dir,
                               on_malformed=on_malformed)
  if split not in builder.info.splits:
    raise ValueError(f"split must be one of {sorted(builder.info.splits)} for {name}, "
                     f"got {split!r}")
  config_kwargs = {"config": builder.builder_config.name} if builder.builder_config else {}
  return tfds.data_source(builder.name, split=split, data_dir=data_dir,
                          builder_kwargs=config_kwargs)


def malformed_rows(builder) -> dict:
  """Per split, the rows skipped when the dataset was prepared: `{split: {skipped, messages}}`."""
  return dict(builder.info.metadata.get("malformed_rows", {}))


def decode_example(example: dict) -> dict:
  """An example from `tfds.data_source` with bytes decoded to `str` and numpy scalars to Python.

  A conversation feature (`{"role": [...], "content": [...]}`) becomes a list of
  `{"role", "content"}` dicts, the form chat templates take.
  """
  out = {}
  for key, value in example.items():
    if isinstance(value, dict) and set(value) == {"role", "content"}:
      out[key] = [message(_to_python(r), _to_python(c))
                  for r, c in zip(value["role"], value["content"], strict=True)]
    else:
      out[key] = _to_python(value)
  return out


def _to_python(value):
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
    return [_to_python(v) for v in value.tolist()]
  if isinstance(value, (list, tuple)):
    return [_to_python(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value
