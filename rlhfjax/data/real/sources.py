"""Source files of the real datasets: where each comes from, how its rows are read, and what
happens to a row that cannot be parsed.

A `SourceFile` has one download URL and the relative path(s) under which a user may place the same
file in a manual directory. `resolve_files` takes the manual copy when there is one and downloads
the rest with `dl_manager.download`, so a dataset can be prepared offline from files fetched by
hand.

Rows are read lazily from JSON lines (gzip-compressed or not) or Parquet, told apart by the files'
first bytes (tfds names downloads after their URLs, not their formats), each with its 1-based row
number: for JSON lines the line number in the file, so an editor jumps straight to it (blank lines
are not rows); for Parquet the position in the table.

A row that cannot be parsed raises `MalformedRow` inside the parser; `MalformedRows` then applies
the chosen policy: "raise" turns it into a `ValueError` naming the file and row, "skip" counts it,
logs it and keeps the first few messages for the dataset's metadata. Nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Iterator, Mapping
from typing import Any

from absl import logging
from etils import epath

ON_MALFORMED = ("raise", "skip")
# How many skipped-row messages are logged and kept in the metadata per split (all are counted).
MAX_REPORTED = 20
_HF_URL = "https://huggingface.co/datasets/{repo}/resolve/main/{path}"


class MalformedRow(ValueError):
  """A row whose content does not fit its dataset's format; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class SourceFile:
  """One file of a public dataset.

  Attributes:
    url: where `dl_manager.download` fetches it.
    manual_paths: paths relative to the manual directory where a user may place the same file
      instead, tried in order (the first is the layout of the dataset's own repository).
  """

  url: str
  manual_paths: tuple[str, ...]

  def __post_init__(self):
    if not self.manual_paths:
      raise ValueError(f"SourceFile {self.url!r} needs at least one manual path")


def hf_file(repo: str, path: str, *alternatives: str) -> SourceFile:
  """A file of a Hugging Face dataset repository, by its path in the repository (`resolve/main`)."""
  return SourceFile(url=_HF_URL.format(repo=repo, path=path), manual_paths=(path, *alternatives))


def manual_dir(dl_manager) -> epath.Path | None:
  """The manual directory of a tfds download manager, or None when there is none (or it is empty).

  `DownloadManager.manual_dir` raises AssertionError for a missing or empty directory: that only
  means "download everything" here.
  """
  try:
    return epath.Path(dl_manager.manual_dir)
  except AssertionError:
    return None


def resolve_files(dl_manager, files: Mapping[str, SourceFile]) -> dict[str, epath.Path]:
  """Local paths of `files`: the manual copy where one exists, else downloaded.

  Args:
    dl_manager: a `tfds.download.DownloadManager` (or any object with `manual_dir` and
      `download(dict_of_urls) -> dict_of_paths`).
    files: source files by key.

  Returns:
    The local path of each file, by the same keys.
  """
  root = manual_dir(dl_manager)
  paths, urls = {}, {}
  for key, source in files.items():
    candidates = [root / p for p in source.manual_paths] if root is not None else []
    local = next((p for p in candidates if p.exists()), None)
    if local is not None:
      paths[key] = local
    else:
      urls[key] = source.url
  if urls:
    if root is not None:
      logging.info("manual directory %s lacks %d file(s); downloading them", root, len(urls))
    paths.update({k: epath.Path(p) for k, p in dl_manager.download(urls).items()})
  return paths


def _read_json_lines(path: epath.Path) -> Iterator[tuple[int, Any]]:
  with path.open("rb") as raw:
    # Decide by the magic bytes, not the name: tfds names downloads after the URL, and a user may
    # have decompressed a `.gz` file by hand.
    is_gzip = raw.read(2) == b"\x1f\x8b"
    raw.seek(0)
    lines = iter(gzip.GzipFile(fileobj=raw) if is_gzip else raw)
    row = 0
    while True:
      try:
        # Lines split on b"\n" only (JSON lines' separator); each is decoded on its own so that a
        # bad byte sequence is one malformed row rather than the end of the file.
        line = next(lines)
      except StopIteration:
        return
      except (OSError, EOFError) as e:  # a corrupt or truncated gzip stream (BadGzipFile: OSError)
        raise ValueError(f"{path} is not a readable (gzip) JSON-lines file after row {row}: "
                         f"{e}") from e
      row += 1
      if not line.strip():
        continue
      try:
        yield row, json.loads(line.decode("utf-8"))
      except UnicodeDecodeError as e:
        yield row, MalformedRow(f"invalid UTF-8 ({e.reason} at byte {e.start})")
      except json.JSONDecodeError as e:
        yield row, MalformedRow(f"invalid JSON ({e.msg} at column {e.colno})")


def _read_parquet(path: epath.Path) -> Iterator[tuple[int, Any]]:
  import pyarrow.parquet as pq  # only the Parquet datasets need it

  with path.open("rb") as f:
    try:
      table = pq.ParquetFile(f)
    except Exception as e:  # pyarrow raises its own error types; say which file it was
      raise ValueError(f"{path} is not a readable Parquet file: {e}") from e
    row = 0
    batches = table.iter_batches(batch_size=1024)
    while True:
      try:  # A corrupt data page fails here, inside pyarrow: say which file and rows it was.
        records = next(batches).to_pylist()
      except StopIteration:
        return
      except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: rows after {row} cannot be read (corrupt data?): {e}") from e
      for record in records:
        row += 1
        yield row, record


def _is_parquet(path: epath.Path) -> bool:
  with path.open("rb") as f:
    return f.read(4) == b"PAR1"


def read_rows(path: epath.PathLike) -> Iterator[tuple[int, Any]]:
  """Yields `(row_number, record)` for each row of a JSON-lines or Parquet file.

  A JSON line that does not decode is yielded as a `MalformedRow` instance in place of the record,
  so the caller's policy decides what happens to it.
  """
  path = epath.Path(path)
  if _is_parquet(path):
    yield from _read_parquet(path)
  else:
    yield from _read_json_lines(path)


class MalformedRows:
  """Applies the `on_malformed` policy to the malformed rows of one split.

  Args:
    on_malformed: "raise" (a `ValueError` naming the file and row) or "skip" (count, log, and keep
      the first `MAX_REPORTED` messages).
    split: the split being generated, for the messages.
  """

  def __init__(self, on_malformed: str, split: str):
    check_on_malformed(on_malformed)
    self.on_malformed = on_malformed
    self.split = split
    self.count = 0
    self.messages: list[str] = []

  def report(self, path, row: int, reason) -> None:
    message = f"{path}, row {row}: {reason}"
    if self.on_malformed == "raise":
      raise ValueError(f"malformed row in {message} (build with on_malformed='skip' to skip and"
                       " count such rows instead)")
    self.count += 1
    if len(self.messages) < MAX_REPORTED:
      self.messages.append(message)
      logging.warning("split %s: skipping malformed row in %s", self.split, message)

  def summary(self) -> dict:
    """`{"skipped": count, "messages": [first messages]}`, as stored in the dataset metadata."""
    return {"skipped": self.count, "messages": list(self.messages)}


def check_on_malformed(on_malformed) -> None:
  """Raises ValueError unless `on_malformed` is one of `ON_MALFORMED`."""
  if on_malformed not in ON_MALFORMED:
    raise ValueError(f"on_malformed must be one of {ON_MALFORMED}, got {on_malformed!r}")


def field(record, path: str, kind: type | tuple[type, ...] = str):
  """`record[a][b]...` for `path` "a.b...", checked to be of type `kind`, else `MalformedRow`.

  Integer list indices are allowed in the path ("summaries.0.text"). A bool never counts as a
  number.
  """
  value = record
  for part in path.split("."):
    if isinstance(value, dict):
      if part not in value:
        raise MalformedRow(f"missing field {path!r}")
      value = value[part]
    elif isinstance(value, list) and part.isdigit():
      if int(part) >= len(value):
        raise MalformedRow(f"missing field {path!r} (list of length {len(value)})")
      value = value[int(part)]
    else:
      raise MalformedRow(f"field {path!r}: {type(value).__name__} has no entry {part!r}")
  kinds = kind if isinstance(kind, tuple) else (kind,)
  if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
    names = " or ".join(k.__name__ for k in kinds)
    raise MalformedRow(f"field {path!r} must be {names}, got {type(value).__name__}")
  return value
