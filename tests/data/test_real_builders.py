"""Tests for rlhfjax.data.real: each builder on small fixture files in its source format.

Nothing is downloaded: fixtures are written into a manual directory (with every file a config
reads, so the download fallback never runs), and the download path itself is exercised with a
stub download manager that serves fixture files under tfds-style extensionless names.
"""

import dataclasses
import gzip
import importlib
import json
import re
import sys
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from rlhfjax.data import real
from rlhfjax.data.real import hh_rlhf
from rlhfjax.data.real import sources
from rlhfjax.data.real import tldr


def _write_jsonl(path, rows, *, compress=False):
  """Writes rows as JSON lines; a str row is written verbatim (to plant broken lines)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
  if compress:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(lines)
  else:
    path.write_text(lines, encoding="utf-8")


def _write_parquet(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), path)


def _msg(role, content):
  return {"role": role, "content": content}


@dataclasses.dataclass(frozen=True)
class Fixture:
  """A dataset's fixture: `write(manual_dir, malformed)` writes its files (planting malformed rows
  when asked) and returns the examples every split must hold, in order; `bad_file` / `bad_rows`
  say where the malformed rows are (the first is what a "raise" build must name), and `skipped`
  how many each split must count under "skip"."""
  name: str
  config: str | None
  write: Callable
  bad_file: str
  bad_rows: tuple[int, ...]
  skipped: dict


# -- HH-RLHF ---------------------------------------------------------------------------------------


def _hh_transcript(turns, final):
  names = {"user": "Human", "assistant": "Assistant"}
  turns_text = "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in turns)
  return turns_text + f"\n\nAssistant: {final}"


def _hh_prompt(turns):
  return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                 for m in turns) + "\n\nAssistant:"


def _write_hh(manual_dir, malformed):
  expected = {}
  for split in hh_rlhf.SPLITS:
    expected[split] = []
    for subset in hh_rlhf.SUBSETS:
      tag = f"[{subset}/{split}]"
      cases = [
          ([_msg("user", f"{tag} Hi there")], "Hello! How can I help?", "What do you want?"),
          # The responses share their first words: the prompt must still end at the marker.
          ([_msg("user", f"{tag} Is the sky blue?"), _msg("assistant", "Mostly."),
            _msg("user", "Why?")], "I think Rayleigh scattering.", "I think magic."),
          # Identical transcripts are a labelling fact, kept as they are.
          ([_msg("user", f"{tag} Same?")], "Same answer.", "Same answer."),
      ]
      rows = [{"chosen": _hh_transcript(t, c), "rejected": _hh_transcript(t, r)}
              for t, c, r in cases]
      if malformed and (subset, split) == ("helpful-base", "train"):
        first = [_msg("user", "Q1"), _msg("assistant", "A1"), _msg("user", "Q2")]
        other = [_msg("user", "Q1"), _msg("assistant", "B1"), _msg("user", "Q2")]
        rows[1:1] = [
            '{"chosen": "broken',                                   # row 2: invalid JSON
            {"chosen": _hh_transcript(first, "x"),                   # row 3: diverges earlier
             "rejected": _hh_transcript(other, "y")},
            {"chosen": 3, "rejected": "\n\nHuman: a\n\nAssistant: b"},  # row 4: not a string
            {"chosen": "Human: no newlines\n\nAssistant: a",          # row 5: bad start
             "rejected": "Human: no newlines\n\nAssistant: b"},
        ]
      _write_jsonl(manual_dir / subset / f"{split}.jsonl.gz", rows, compress=True)
      expected[split] += [
          {"prompt": _hh_prompt(t), "prompt_messages": t, "chosen": c, "rejected": r,
           "subset": subset} for t, c, r in cases]
  return expected


HH = Fixture("hh_rlhf", "all", _write_hh, "helpful-base/train.jsonl.gz", (2, 3, 4, 5),
             {"train": 4, "test": 0})


# -- UltraFeedback ---------------------------------------------------------------------------------


def _write_ultrafeedback(manual_dir, malformed):
  expected = {}
  for split in real.ultrafeedback.SPLITS:
    rows, expected[split] = [], []
    for i in range(3):
      prompt = f"{split} question {i}?"
      turns = [_msg("user", prompt)] if i != 1 else [
          _msg("system", "Be brief."), _msg("user", prompt)]
      chosen, rejected = f"  good answer {i} ", f"bad answer {i}"
      rows.append({
          "prompt": prompt, "prompt_id": f"id-{split}-{i}",
          "chosen": turns + [_msg("assistant", chosen)],
          "rejected": turns + [_msg("assistant", rejected)],
          "messages": turns + [_msg("assistant", chosen)],
          "score_chosen": 8.5 - i, "score_rejected": 2.0 + 0.25 * i,
      })
      expected[split].append({
          "prompt": prompt, "prompt_id": f"id-{split}-{i}", "prompt_messages": turns,
          "chosen": chosen.strip(), "rejected": rejected, "score_chosen": 8.5 - i,
          "score_rejected": 2.0 + 0.25 * i})
    if malformed and split == "test_prefs":
      good = rows[0]
      rows[1:1] = [
          {**good, "chosen": [_msg("user", "q"), _msg("user", "not an answer")]},     # row 2
          {**good, "rejected": [_msg("user", "other q"), _msg("assistant", "a")]},    # row 3
          {**good, "score_rejected": None},                                           # row 4
      ]
    _write_parquet(manual_dir / "data" / f"{split}-00000-of-00001.parquet", rows)
  return expected


ULTRAFEEDBACK = Fixture("ultrafeedback_binarized", None, _write_ultrafeedback,
                        "data/test_prefs-00000-of-00001.parquet", (2, 3, 4),
                        {"train_prefs": 0, "test_prefs": 3, "train_sft": 0, "test_sft": 0})


# -- TL;DR -----------------------------------------------------------------------------------------


def _comparison(i, split, choice):
  info = {"id": f"t3_{i}", "post": f"Post {i}\n\nwith paragraphs.", "title": f"Title {i}",
          "subreddit": "tifu"}
  summaries = [{"text": f" summary A{i}", "policy": "ref", "note": None},
               {"text": f" summary B{i}", "policy": "sup4", "note": "n"}]
  row = {"info": info, "summaries": summaries, "choice": choice, "worker": "w",
         "batch": "batch3", "split": split, "extra": {"confidence": 7}}
  prompt = f"SUBREDDIT: r/tifu\n\nTITLE: Title {i}\n\nPOST: Post {i}\n\nwith paragraphs.\n\nTL;DR:"
  example = {"prompt": prompt, "prompt_messages": [_msg("user", prompt)], "post_id": f"t3_{i}",
             "subreddit": "tifu", "title": f"Title {i}", "post": info["post"],
             "chosen": f"summary {'AB'[choice]}{i}", "rejected": f"summary {'BA'[choice]}{i}",
             "chosen_policy": ["ref", "sup4"][choice],
             "rejected_policy": ["sup4", "ref"][choice], "batch": "batch3"}
  return row, example


def _write_tldr_comparisons(manual_dir, malformed):
  # Rows of all three splits interleave within files; most batch files are empty.
  plan = {3: [("train", 0), ("valid2", 1), ("train", 1), ("valid1", 0)],
          22: [("valid1", 1), ("train", 0)]}
  expected = {s: [] for s in tldr.COMPARISON_SPLITS}
  for batch in tldr.COMPARISON_BATCHES:
    rows = []
    for j, (split, choice) in enumerate(plan.get(batch, [])):
      row, example = _comparison(100 * batch + j, split, choice)
      rows.append(row)
      expected[split].append(example)
    if malformed and batch == 22:
      rows[1:1] = [
          "not json",                                            # row 2: no split: train reports
          {**rows[0], "split": "valid3"},                        # row 3: unknown split: train
          {**rows[0], "split": "train", "choice": 2},            # row 4: train
          {**rows[0], "split": "valid2", "summaries": []},       # row 5: valid2
      ]
    _write_jsonl(manual_dir / "comparisons" / f"batch{batch}.json", rows)
  return expected


TLDR_COMPARISONS = Fixture("tldr_comparisons", None, _write_tldr_comparisons,
                           "comparisons/batch22.json", (2, 3, 4, 5),
                           {"train": 3, "valid1": 0, "valid2": 1})


def _write_tldr_sft(manual_dir, malformed):
  expected = {}
  for split in tldr.SFT_SPLITS:
    rows = [{"id": f"{split}{i}", "subreddit": "AskReddit", "title": f"T{i}",
             "post": f"P{i}", "summary": f" my summary {i}"} for i in range(2)]
    prompt = "SUBREDDIT: r/AskReddit\n\nTITLE: T{i}\n\nPOST: P{i}\n\nTL;DR:"
    expected[split] = [
        {"prompt": prompt.format(i=i), "prompt_messages": [_msg("user", prompt.format(i=i))],
         "post_id": f"{split}{i}", "subreddit": "AskReddit", "title": f"T{i}", "post": f"P{i}",
         "response": f"my summary {i}"} for i in range(2)]
    if malformed and split == "valid":
      rows.insert(1, {"id": "x", "subreddit": "a", "title": "t", "post": "p"})  # no summary
    _write_jsonl(manual_dir / "tldr_3_filtered" / f"{split}.jsonl", rows)
  return expected


TLDR_SFT = Fixture("tldr_sft", None, _write_tldr_sft, "tldr_3_filtered/valid.jsonl", (2,),
                   {"train": 0, "valid": 1, "test": 0})


# -- GSM8K and MATH-500 ----------------------------------------------------------------------------


def _gsm8k_rows(split):
  return [
      ({"question": f"{split}: Natalia sold 48 clips, then half as many. How many in all?",
        "answer": "She sold 48/2 = <<48/2=24>>24 in May.\n48+24 = <<48+24=72>>72\n#### 72"}, "72"),
      ({"question": f"{split}: How much is 1000 + 234?",
        "answer": "It is 1,234.\n####  1,234 "}, "1,234"),
  ]


def _gsm8k_writer(parquet):
  def write(manual_dir, malformed):
    expected = {}
    for split in ("train", "test"):
      pairs = _gsm8k_rows(split)
      rows = [r for r, _ in pairs]
      if malformed and split == "test":
        rows.insert(1, {"question": "q", "answer": "no marker here"})         # row 2
        rows.insert(2, {"question": "q", "answer": "marker, no answer ####"})  # row 3
      if parquet:
        _write_parquet(manual_dir / "main" / f"{split}-00000-of-00001.parquet", rows)
      else:  # the original repository's files, accepted as an alternative manual layout
        _write_jsonl(manual_dir / f"{split}_socratic.jsonl", rows)
      expected[split] = [{"question": r["question"], "solution": r["answer"], "answer": a}
                         for r, a in pairs]
    return expected
  return write


GSM8K_MAIN = Fixture("grade_school_math", "main", _gsm8k_writer(parquet=True),
                     "main/test-00000-of-00001.parquet", (2, 3), {"train": 0, "test": 2})
GSM8K_SOCRATIC = Fixture("grade_school_math", "socratic", _gsm8k_writer(parquet=False),
                         "test_socratic.jsonl", (2, 3), {"train": 0, "test": 2})


def _write_math500(manual_dir, malformed):
  rows = [
      {"problem": "Compute $\\frac{1}{2} + \\frac{1}{4}$.",
       "solution": "It is $\\boxed{\\frac34}$.",
       "answer": "\\frac34", "subject": "Prealgebra", "level": 2,
       "unique_id": "test/prealgebra/1.json"},
      {"problem": "Find $x$.", "solution": "So $x = \\boxed{5}$.", "answer": " 5 ",
       "subject": "Algebra", "level": 5, "unique_id": "test/algebra/2.json"},
  ]
  expected = [{"question": r["problem"], "solution": r["solution"], "answer": r["answer"].strip(),
               "subject": r["subject"], "level": r["level"], "unique_id": r["unique_id"]}
              for r in rows]
  if malformed:
    rows.insert(1, {**rows[0], "answer": "  "})   # row 2: empty answer
    rows.insert(2, {**rows[0], "level": "3"})     # row 3: level is not an int
  _write_jsonl(manual_dir / "test.jsonl", rows)
  return {"test": expected}


MATH500 = Fixture("math500", None, _write_math500, "test.jsonl", (2, 3), {"test": 2})

FIXTURES = [HH, ULTRAFEEDBACK, TLDR_COMPARISONS, TLDR_SFT, GSM8K_MAIN, GSM8K_SOCRATIC, MATH500]
_IDS = [f"{f.name}/{f.config}" for f in FIXTURES]


def _build(fixture, tmp_path, *, malformed=False, on_malformed="skip", data_dir="data"):
  manual_dir = tmp_path / "manual"
  expected = fixture.write(manual_dir, malformed)
  builder = real.build_real_dataset(fixture.name, data_dir=tmp_path / data_dir,
                                    config=fixture.config, manual_dir=manual_dir,
                                    on_malformed=on_malformed)
  return builder, expected


def _read_all(builder):
  return {split: [real.decode_example(source[i]) for i in range(len(source))]
          for split, source in builder.as_data_source().items()}


def _assert_examples_equal(got, expected):
  assert sorted(got) == sorted(expected)
  for split in expected:
    # Exact equality: the fixtures' scores are exactly representable in float32.
    assert got[split] == expected[split], split


@pytest.mark.parametrize("fixture", FIXTURES, ids=_IDS)
def test_builder_parses_its_source_format_in_source_order(fixture, tmp_path):
  builder, expected = _build(fixture, tmp_path)
  assert builder.info.file_format.value == "array_record"
  _assert_examples_equal(_read_all(builder), expected)
  assert real.malformed_rows(builder) == {
      split: {"skipped": 0, "messages": []} for split in expected}
  # The usual tfds entry point reads the same records, by registered name and config.
  split = sorted(expected)[0]
  source = real.load_real_split(fixture.name, split, data_dir=tmp_path / "data",
                                config=fixture.config)
  assert [real.decode_example(source[i]) for i in range(len(source))] == _read_all(builder)[split]
  assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("fixture", [HH, ULTRAFEEDBACK, TLDR_COMPARISONS], ids=lambda f: f.name)
def test_building_twice_gives_identical_records(fixture, tmp_path):
  first, _ = _build(fixture, tmp_path, data_dir="a")
  second, _ = _build(fixture, tmp_path, data_dir="b")
  assert _read_all(first) == _read_all(second)
  for split, info in first.info.splits.items():
    assert second.info.splits[split].num_examples == info.num_examples


@pytest.mark.parametrize("fixture", FIXTURES, ids=_IDS)
def test_raise_policy_names_the_file_and_the_first_bad_row(fixture, tmp_path):
  with pytest.raises(ValueError, match="malformed row") as error:
    _build(fixture, tmp_path, malformed=True, on_malformed="raise")
  message = str(error.value)
  assert str(tmp_path / "manual" / fixture.bad_file) in message
  assert f"row {fixture.bad_rows[0]}:" in message
  # Nothing half-built is left behind as a finished dataset.
  assert not list((tmp_path / "data").glob("*/*/1.0.0/dataset_info.json"))


@pytest.mark.parametrize("fixture", FIXTURES, ids=_IDS)
def test_skip_policy_counts_and_records_each_bad_row_once(fixture, tmp_path):
  builder, expected = _build(fixture, tmp_path, malformed=True, on_malformed="skip")
  _assert_examples_equal(_read_all(builder), expected)  # every good row survives, in order
  report = real.malformed_rows(builder)
  assert {split: r["skipped"] for split, r in report.items()} == fixture.skipped
  messages = [m for r in report.values() for m in r["messages"]]
  assert sorted(int(m.split(", row ")[1].split(":")[0]) for m in messages) == list(
      fixture.bad_rows)
  assert all(m.startswith(str(tmp_path / "manual" / fixture.bad_file)) for m in messages)
  # The report is part of the prepared dataset: a fresh builder reads it back from disk.
  reopened = real.real_builder(fixture.name, data_dir=tmp_path / "data", config=fixture.config)
  assert real.malformed_rows(reopened) == report


def test_hh_split_transcripts_cuts_at_the_last_shared_assistant_marker():
  turns = [_msg("user", "a"), _msg("assistant", "b"), _msg("user", "c")]
  prompt, chosen, rejected = real.split_transcripts(
      _hh_transcript(turns, "Sure, here it is "), _hh_transcript(turns, "Sure thing"))
  assert (prompt, chosen, rejected) == (_hh_prompt(turns), "Sure, here it is", "Sure thing")
  assert real.transcript_turns(prompt)[:-1] == turns
  with pytest.raises(real.MalformedRow, match="share no"):
    real.split_transcripts("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: c")
  # A second assistant turn after the shared prompt (no Human turn between) is not a response.
  with pytest.raises(real.MalformedRow, match="chosen transcript has more turns"):
    real.split_transcripts(_hh_transcript(turns, "a\n\nAssistant: b"), _hh_transcript(turns, "c"))


def _ultrafeedback_row(**changes):
  turns = [_msg("user", "q?")]
  return {"prompt": "q?", "prompt_id": "id-0", "chosen": turns + [_msg("assistant", "good")],
          "rejected": turns + [_msg("assistant", "bad")], "messages": [], "score_chosen": 8.0,
          "score_rejected": 2.0, **changes}


@pytest.mark.parametrize("changes, match", [
    (dict(score_chosen=float("nan")), "score_chosen must be finite"),
    (dict(score_rejected=float("-inf")), "score_rejected must be finite"),
    (dict(chosen=[_msg("tool", "q?"), _msg("assistant", "good")],
          rejected=[_msg("tool", "q?"), _msg("assistant", "bad")]), r"chosen\[0\] has role 'tool'"),
])
def test_ultrafeedback_rejects_non_finite_scores_and_unknown_roles(changes, match, tmp_path):
  builder = real.real_builder("ultrafeedback_binarized", data_dir=tmp_path)
  assert builder.parse_row(_ultrafeedback_row(), None) == {
      "prompt": "q?", "prompt_id": "id-0", "prompt_messages": [_msg("user", "q?")],
      "chosen": "good", "rejected": "bad", "score_chosen": 8.0, "score_rejected": 2.0}
  with pytest.raises(real.MalformedRow, match=match):
    builder.parse_row(_ultrafeedback_row(**changes), None)


@pytest.mark.parametrize("solution, answer", [
    ("x\n#### 72", "72"), ("#### 1 #### -3 ", "-3"), ("a ####  1,234\n", "1,234")])
def test_gsm8k_final_answer_is_the_text_after_the_last_marker(solution, answer):
  assert real.gsm8k_final_answer(solution) == answer


class _StubDownloads:
  """A download manager without a network: serves fixture files for known URLs, under tfds-style
  names without extensions, and records which URLs were requested."""

  def __init__(self, tmp_path, manual_dir, served):
    self._tmp_path, self._manual_dir, self._served = tmp_path, manual_dir, served
    self.requested = {}

  @property
  def manual_dir(self):
    if self._manual_dir is None or not self._manual_dir.exists():
      raise AssertionError("no manual directory")  # what tfds raises
    return self._manual_dir

  def download(self, urls):
    self.requested.update(urls)
    out = {}
    for key, url in urls.items():
      path = self._tmp_path / "downloads" / url.replace("/", "_").replace(":", "")[-60:]
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(self._served[url])
      out[key] = path
    return out


def test_missing_manual_files_are_downloaded_from_the_hub(tmp_path):
  manual_dir = tmp_path / "manual"
  expected = _write_hh(manual_dir, malformed=False)
  url = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/helpful-base/test.jsonl.gz"
  served = {url: (manual_dir / "helpful-base" / "test.jsonl.gz").read_bytes()}
  (manual_dir / "helpful-base" / "test.jsonl.gz").unlink()
  builder = real.real_builder("hh_rlhf", data_dir=tmp_path / "data", config="helpful_base")
  stub = _StubDownloads(tmp_path, manual_dir, served)
  generators = builder._split_generators(stub)  # the builder's own hook, given the stub
  assert list(stub.requested.values()) == [url]  # train stays manual; only test is fetched
  got = [real.decode_example(dict(e)) for _, e in generators["test"]]
  want = [e for e in expected["test"] if e["subset"] == "helpful-base"]
  assert [g["prompt"] for g in got] == [w["prompt"] for w in want]


def test_without_a_manual_dir_every_file_is_downloaded_and_parquet_is_sniffed(tmp_path):
  staging = tmp_path / "staging"
  expected = _gsm8k_writer(parquet=True)(staging, False)
  served = {f"https://huggingface.co/datasets/openai/gsm8k/resolve/main/main/{s}-00000-of-00001"
            ".parquet": (staging / "main" / f"{s}-00000-of-00001.parquet").read_bytes()
            for s in ("train", "test")}
  builder = real.real_builder("grade_school_math", data_dir=tmp_path / "data", config="main")
  stub = _StubDownloads(tmp_path, None, served)
  generators = builder._split_generators(stub)
  assert sorted(stub.requested.values()) == sorted(served)
  assert [dict(e) for _, e in generators["test"]] == expected["test"]


def test_read_rows_tells_gzip_by_its_bytes_not_its_name(tmp_path):
  # tfds names downloads after their URLs, and a user may decompress a `.gz` file by hand.
  _write_jsonl(tmp_path / "download_without_extension", [{"a": 1}], compress=True)
  _write_jsonl(tmp_path / "decompressed.jsonl.gz", [{"a": 2}])
  assert list(real.read_rows(tmp_path / "download_without_extension")) == [(1, {"a": 1})]
  assert list(real.read_rows(tmp_path / "decompressed.jsonl.gz")) == [(1, {"a": 2})]


def test_read_rows_numbers_lines_and_skips_blank_ones(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_bytes(b'{"a": 1}\n\n{"a": 2}\n\xff\xfe\n')
  rows = list(real.read_rows(path))
  assert [r for r, _ in rows] == [1, 3, 4]
  assert rows[0][1] == {"a": 1} and rows[1][1] == {"a": 2}
  assert isinstance(rows[2][1], real.MalformedRow) and "UTF-8" in str(rows[2][1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="nope"), "unknown real dataset"),
    (dict(name="hh_rlhf", config="nope"), "unknown config"),
    (dict(name="hh_rlhf", on_malformed="ignore"), "on_malformed"),
])
def test_bad_arguments_raise_value_errors(kwargs, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    real.real_builder(data_dir=tmp_path, **kwargs)


def test_field_checks_paths_and_types():
  record = {"info": {"post": "p", "n": 3, "flag": True}, "summaries": [{"text": "t"}]}
  assert sources.field(record, "summaries.0.text") == "t"
  assert sources.field(record, "info.n", int) == 3
  for path, kind, match in [("info.title", str, "missing field 'info.title'"),
                            ("info.n", str, "must be str, got int"),
                            ("info.flag", int, "must be int, got bool"),
                            ("summaries.1.text", str, "missing field")]:
    with pytest.raises(real.MalformedRow, match=match):
      sources.field(record, path, kind)


def test_all_builders_are_registered_with_tfds():
  assert set(real.REAL_BUILDERS) == {"hh_rlhf", "ultrafeedback_binarized", "tldr_comparisons",
                                     "tldr_sft", "grade_school_math", "math500"}
  for name, cls in real.REAL_BUILDERS.items():
    assert tfds.builder_cls(name) is cls


@pytest.mark.parametrize("module", ["real_dpo_hh", "real_grpo_gsm8k", "real_gem_ultrafeedback"])
def test_real_experiment_configs_name_a_builder_config_and_its_splits(module, tmp_path):
  config = importlib.import_module(f"experiments.configs.{module}").get_config()
  assert config.checkpoint == ""  # the user must point it at local weights
  builder = real.real_builder(config.dataset.name, data_dir=tmp_path,
                              config=config.dataset.config)
  splits = builder.source_files()  # the splits the builder will generate, without building it
  assert config.dataset.train_split in splits and config.dataset.eval_split in splits
  assert config.dataset.on_malformed in real.ON_MALFORMED


def test_a_truncated_gzip_file_is_an_error_naming_the_file(tmp_path):
  path = tmp_path / "train.jsonl.gz"
  with gzip.open(path, "wt") as f:
    f.write("".join(json.dumps({"a": i}) + "\n" for i in range(2000)))
  path.write_bytes(path.read_bytes()[:-200])
  with pytest.raises(ValueError, match=re.escape(f"{path} is not a readable")):
    list(real.read_rows(path))


def test_a_parquet_file_with_corrupt_data_pages_is_an_error_naming_the_file(tmp_path):
  path = tmp_path / "train-00000-of-00001.parquet"
  rows = [{"question": f"q{i} " * 20, "answer": f"work {i} " * 20 + f"#### {i}"}
          for i in range(2000)]
  pq.write_table(pa.Table.from_pylist(rows), path, compression="snappy")
  data = bytearray(path.read_bytes())  # Footer intact, data pages scrambled.
  for i in range(200, min(len(data) - 2000, 20000)):
    data[i] = (data[i] * 7 + 13) % 256
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=re.escape(f"{path}: rows after 0 cannot be read")):
    list(real.read_rows(path))


def test_raise_policy_also_holds_for_data_an_earlier_skip_build_prepared(tmp_path):
  _build(HH, tmp_path, malformed=True, on_malformed="skip")
  with pytest.raises(ValueError, match=r"skipped \d+ malformed row\(s\) and on_malformed is 'r"):
    real.build_real_dataset(HH.name, data_dir=tmp_path / "data", config=HH.config,
                            manual_dir=tmp_path / "manual", on_malformed="raise")


def test_a_split_without_examples_is_an_error_naming_its_files(tmp_path):
  manual_dir = tmp_path / "manual"
  HH.write(manual_dir, False)
  bad = sorted(manual_dir.rglob("train.jsonl.gz"))  # Every file of the train split.
  for path in bad:
    with gzip.open(path, "wt") as f:
      f.write("{not json\n" * 3)
  message = f"hh_rlhf/train: no examples in {[str(p) for p in bad]} ({3 * len(bad)} malformed"
  with pytest.raises(ValueError, match=re.escape(message)):
    real.build_real_dataset(HH.name, data_dir=tmp_path / "data", config=HH.config,
                            manual_dir=manual_dir)
