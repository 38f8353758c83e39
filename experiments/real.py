"""Fine-tunes a local Hugging Face checkpoint on a real dataset: SFT (cross-entropy or GEM), offline
preference optimisation (DPO or any loss of `config.offline`), and GRPO with a verifiable reward.

    python -m experiments.real --config=experiments/configs/real_dpo_hh.py \\
        --config.checkpoint=~/ckpt/qwen2.5-0.5b [--config.run_dir=runs/dpo-hh] [--json out.json]

`config.stages` lists the stages to run, in order; each starts from the previous one's policy
(the first from the checkpoint):
- "sft": `config.sft` on the dataset's demonstrations (the `chosen` response of a preference
  dataset, or `response` / `solution`), prompt outside and response inside the loss mask.
- "offline": `config.offline.loss` on the preference pairs; the frozen reference is the policy the
  stage starts from (same weights), its log-probs computed on the fly or precomputed once
  (`config.offline.reference`).
- "grpo": `config.grpo` on the dataset's questions with a host-side answer checker
  (`rlhfjax.rewards.REWARD_FNS[config.grpo.reward]`) as the verifiable reward, through
  `rlhfjax.train.online.OnlineTrainer`; the reference is the stage's starting policy.

Data. The split is read with `rlhfjax.data.real.load_real_split` (prepared under
`config.data_dir` on first use, from `config.dataset.manual_dir` or the public URLs) and every
conversation is rendered with the tokenizer's chat format (`rlhfjax.data.tokenizers`: prompt =
conversation + assistant header, left-padded to `config.prompt_len`; response = answer + end of
turn, right-padded to `config.response_len`). Over-long examples follow `config.dataset.overlong`:
"skip" (default) drops an example whose prompt or any response does not fit its slot; "truncate"
keeps the last `prompt_len` prompt tokens and the first `response_len` tokens of each response
(a cut response loses its end-of-turn token, and a cut prompt its first turns). Either way the
counts are printed and written to `<run_dir>/data_stats.json`, next to the malformed source rows
the dataset builder skipped. Tokenised splits are cached in `<data_dir>/tokenized/` under a key
of everything they depend on (tokenizer files, chat format, slots, policy, instruction).

Writes `<run_dir>/config.json`, `data_stats.json`, per stage `<stage>/metrics.jsonl` (train
records and held-out `eval` records), TensorBoard events and orbax checkpoints
(`<stage>/checkpoints`, resumed when the run directory is reused), `curves.png`, `summary.json`
and, with `config.export`, the final policy as a Hugging Face checkpoint with the tokenizer files
in `<run_dir>/export`.

Held-out metrics use the first `config.eval.num_prompts` examples of `config.dataset.eval_split`
(padded cyclically to whole batches): the stage's loss metrics for SFT and offline stages, and
the answer accuracy of decoded samples at `config.eval.temperature` for GRPO.

Parameters train in float32 (`config.compute_dtype` sets the activations); each stage starts
from a copy of its starting weights with a fresh optimizer state, without a random
initialisation first. Stage directories are `sft/`, `<offline loss>/` (e.g. `dpo/`) and `grpo/`.

Limitations: the GRPO stage and the precomputed reference log-probs run single-host (prompts are
placed with `sharding.shard_batch`, rewards decoded on the host); `precompute_reference` of
`experiments.stages` runs 256 pairs per forward pass.

References: SFT with GEM, Li et al. arXiv 2408.16673; DPO, Rafailov et al. arXiv 2305.18290
(Eq. 7); GRPO, Shao et al. arXiv 2402.03300 (Eq. 3), Dr. GRPO, Liu et al. arXiv 2503.20783.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from experiments import common
from experiments import stages as stages_lib
from rlhfjax import data as data_lib
from rlhfjax import losses as losses_lib
from rlhfjax import sharding as shd
from rlhfjax.data import real
from rlhfjax.models import Transformer, config_from_hf, load_pretrained, save_pretrained
from rlhfjax.models.hf import read_hf_config
from rlhfjax.rewards import REWARD_FNS, batch_rewards
from rlhfjax.train import objectives
from rlhfjax.train import state as state_lib
from rlhfjax.train import steps as steps_lib

STAGES = ("sft", "offline", "grpo")
OVERLONG = ("skip", "truncate")
EXPORT_DTYPES = ("", "float32", "bfloat16", "float16")
# Which field of a dataset example is the demonstration an SFT stage learns, in order of preference.
SFT_RESPONSE_FIELDS = ("chosen", "response", "solution")
# Encoded example kinds: the fields each holds (token ids), for `sft_batch` / `preference_batch` /
# `prompt_batch`. Prompt examples also carry the reference `answer` (text).
KINDS = {"sft": ("prompt", "response"), "preference": ("prompt", "chosen", "rejected"),
         "prompt": ("prompt",)}
# Files of a tokenizer directory: hashed into the cache key and copied next to an export.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja")
# Parameters train in float32 whatever the checkpoint stores; `compute_dtype` sets activations.
PARAM_DTYPE = "float32"


def _path(p: str) -> str:
  return os.path.expanduser(p) if p else p


# -- validation ------------------------------------------------------------------------------------


def _check(key: str, build: Callable[[], Any]) -> None:
  try:
    build()
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.{key}: {e}") from e


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the settings a real run uses before anything is loaded or compiled.

  Raises:
    ValueError: naming the key.
  """
  if not config.checkpoint:
    raise ValueError("config.checkpoint is empty: pass --config.checkpoint=/path/to/checkpoint "
                     "(a directory with config.json and *.safetensors)")
  for key in ("checkpoint", "tokenizer"):
    if config[key] and not os.path.isdir(_path(config[key])):
      raise ValueError(f"config.{key} {config[key]!r} is not a directory")
  stages = tuple(config.stages)
  unknown = sorted(set(stages) - set(STAGES))
  if not stages or unknown:
    raise ValueError(f"config.stages must be a non-empty tuple of {STAGES}, got {stages!r}")
  d = config.dataset
  if d.overlong not in OVERLONG:
    raise ValueError(f"config.dataset.overlong must be one of {OVERLONG}, got {d.overlong!r}")
  if d.on_malformed not in real.ON_MALFORMED:
    raise ValueError(f"config.dataset.on_malformed must be one of {real.ON_MALFORMED}, got "
                     f"{d.on_malformed!r}")
  if d.max_examples < 0:
    raise ValueError(f"config.dataset.max_examples must be >= 0 (0: all), got {d.max_examples}")
  for key in ("prompt_len", "response_len"):
    if config[key] < 1:
      raise ValueError(f"config.{key} must be >= 1, got {config[key]}")
  if config.export_dtype not in EXPORT_DTYPES:
    raise ValueError(f"config.export_dtype must be one of {EXPORT_DTYPES}, got "
                     f"{config.export_dtype!r}")
  if config.eval.num_prompts < 0:
    raise ValueError(f"config.eval.num_prompts must be >= 0, got {config.eval.num_prompts}")
  for stage in stages:
    if stage not in config:
      raise ValueError(f"config.stages has {stage!r} but the config has no {stage} section")
    sc = config[stage]
    _check(f"{stage}.optimizer",
           lambda: common.make_optimizer(sc.optimizer, num_updates(config, stage)))
    _check(f"{stage}.loop", lambda: common.loop_settings(sc.loop))
    if sc.loop.batch_size < 1:
      raise ValueError(f"config.{stage}.loop.batch_size must be >= 1, got {sc.loop.batch_size}")
  if "sft" in stages and config.sft.loss not in objectives.SFT_LOSSES:
    raise ValueError(f"config.sft.loss must be one of {objectives.SFT_LOSSES}, got "
                     f"{config.sft.loss!r}")
  if "offline" in stages:
    oc = config.offline
    if oc.loss not in objectives.PREFERENCE_LOSSES:
      raise ValueError(f"config.offline.loss must be one of {objectives.PREFERENCE_LOSSES}, got "
                       f"{oc.loss!r}")
    if oc.reference not in objectives.REFERENCE_MODES:
      raise ValueError(f"config.offline.reference must be one of {objectives.REFERENCE_MODES}, "
                       f"got {oc.reference!r}")
  if "grpo" in stages:
    _validate_grpo(config)


def num_updates(config: ml_collections.ConfigDict, stage: str) -> int:
  """Optimizer steps of a stage: `loop.num_steps`, times the minibatch steps per rollout for GRPO
  (`updates_per_rollout` passes over `prompts_per_step * group_size / loop.batch_size`)."""
  sc = config[stage]
  if stage != "grpo":
    return sc.loop.num_steps
  minibatches = max(sc.prompts_per_step * sc.group_size // max(sc.loop.batch_size, 1), 1)
  return sc.loop.num_steps * sc.updates_per_rollout * minibatches


def _validate_grpo(config: ml_collections.ConfigDict) -> None:
  gc = config.grpo
  if gc.reward not in REWARD_FNS:
    raise ValueError(f"config.grpo.reward must be one of {sorted(REWARD_FNS)}, got {gc.reward!r}")
  for key, minimum in (("group_size", 2), ("prompts_per_step", 1), ("max_new_tokens", 1),
                       ("updates_per_rollout", 1)):
    if gc[key] < minimum:
      raise ValueError(f"config.grpo.{key} must be >= {minimum}, got {gc[key]}")
  if gc.max_new_tokens > config.response_len:
    raise ValueError(f"config.grpo.max_new_tokens ({gc.max_new_tokens}) exceeds "
                     f"config.response_len ({config.response_len}), the response slot")
  if not gc.temperature > 0:
    raise ValueError(f"config.grpo.temperature must be > 0 (G samples per prompt), got "
                     f"{gc.temperature}")
  samples = gc.prompts_per_step * gc.group_size
  if samples % gc.loop.batch_size or gc.prompts_per_step % (samples // gc.loop.batch_size):
    raise ValueError(
        f"config.grpo.loop.batch_size ({gc.loop.batch_size}) must split the rollout of "
        f"prompts_per_step * group_size = {samples} samples into minibatches of whole groups")


# -- the run ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class RealRun:
  """What every stage of one real run shares: config, mesh, tokenizer, model structure, records."""
  config: ml_collections.ConfigDict
  run_dir: str
  mesh: Any
  tokenizer: data_lib.TextTokenizer
  tokenizer_dir: str
  chat_format: str
  model_config: Any
  graphdef: nnx.GraphDef
  param_shardings: Any
  records: dict = dataclasses.field(default_factory=dict)
  data_stats: dict = dataclasses.field(default_factory=dict)
  _encoded: dict = dataclasses.field(default_factory=dict)

  def build_model(self) -> Transformer:
    """The checkpoint's model, randomly initialised: what `state.state_from_params` traces for
    the structure and logical axes (it is not run when the parameters cover the model)."""
    return Transformer(self.model_config, rngs=nnx.Rngs(self.config.seed))

  def train_stage(self, stage: ml_collections.ConfigDict, *, name: str, params: Any,
                  loss_fn: Callable, get_batch: Callable[[int], dict], frozen: Sequence[Any] = (),
                  frozen_shardings: Sequence[Any] = (),
                  eval_fn: Callable[[Any], dict] | None = None) -> tuple[Any, list[dict]]:
    """`common.train_stage` from a copy of `params` with a fresh optimizer state, in
    `<run_dir>/<name>`. Returns (final params, logged records)."""
    _, state, records = common.train_stage(
        stage, name=name, run_dir=self.run_dir, mesh=self.mesh, build_model=self.build_model,
        loss_fn=loss_fn, get_batch=get_batch, frozen=frozen, frozen_shardings=frozen_shardings,
        init_params=params, eval_fn=eval_fn)
    self.records[name] = records
    return state.params, records

  def encoded(self, split: str, kind: str) -> list[dict]:
    """The split's examples encoded as `kind` (memoised, and cached on disk)."""
    if (split, kind) not in self._encoded:
      examples, stats = encode_split(self.config, self.tokenizer, self.tokenizer_dir,
                                     self.chat_format, split, kind)
      print(format_stats(stats))
      self.data_stats[f"{split}/{kind}"] = stats
      common.write_json(os.path.join(self.run_dir, "data_stats.json"), self.data_stats)
      self._encoded[(split, kind)] = examples
    return self._encoded[(split, kind)]


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The run's mesh; `mesh.fsdp = -1` (the real configs' default) takes every device left over by
  `mesh.data` and `mesh.tensor`, as `mesh.data = -1` does."""
  m = config.mesh
  if m.fsdp != -1:
    return common.make_mesh(config)
  if m.data < 1 or m.tensor < 1 or jax.device_count() % (m.data * m.tensor):
    raise ValueError(f"config.mesh.fsdp = -1 needs mesh.data and mesh.tensor >= 1 dividing the "
                     f"{jax.device_count()} devices, got data {m.data}, tensor {m.tensor}")
  return shd.make_mesh(m.data, jax.device_count() // (m.data * m.tensor), m.tensor)


def load_policy(config: ml_collections.ConfigDict) -> tuple[RealRun, Any]:
  """Opens the run directory, mesh, tokenizer and checkpoint: (run, sharded float32 params)."""
  validate(config)
  run_dir = common.resolve_run_dir(
      config, f"real-{config.dataset.name}-{'-'.join(config.stages)}")
  mesh = make_mesh(config)
  checkpoint = _path(config.checkpoint)
  tokenizer_dir = _path(config.tokenizer) or checkpoint
  tokenizer = data_lib.load_tokenizer(tokenizer_dir)
  chat_format = data_lib.resolve_chat_format(tokenizer, config.chat_format or None)
  model_config = config_from_hf(read_hf_config(checkpoint), dtype=config.compute_dtype,
                                param_dtype=PARAM_DTYPE)
  data_lib.check_vocab(tokenizer, model_config)
  if config.prompt_len + config.response_len > model_config.max_seq_len:
    raise ValueError(f"config.prompt_len + config.response_len = "
                     f"{config.prompt_len + config.response_len} exceeds the checkpoint's "
                     f"max_position_embeddings ({model_config.max_seq_len})")
  graphdef, params = load_pretrained(checkpoint, dtype=config.compute_dtype,
                                     param_dtype=PARAM_DTYPE, mesh=mesh)
  run = RealRun(config, run_dir, mesh, tokenizer, tokenizer_dir, chat_format, model_config,
                graphdef, jax.tree.map(lambda x: x.sharding, params))
  return run, params


def run(config: ml_collections.ConfigDict) -> dict:
  """Runs `config.stages` from `config.checkpoint`; returns the summary (also `summary.json`)."""
  t_start = time.perf_counter()
  ctx, params = load_policy(config)
  rows = []
  for stage in config.stages:
    params, row = STAGE_FNS[stage](ctx, params)
    rows.append(row)
  export_dir = None
  if config.export:
    export_dir = os.path.join(ctx.run_dir, "export")
    export_policy(ctx, params, export_dir)
  plot(ctx, os.path.join(ctx.run_dir, "curves.png"))
  summary = {"run_dir": ctx.run_dir, "stages": list(config.stages), "rows": rows,
             "data": ctx.data_stats, "export_dir": export_dir,
             "total_s": time.perf_counter() - t_start}
  columns = ["stage"] + sorted({k for r in rows for k in r} - {"stage"})
  return common.report_run(summary, columns)


# -- data ------------------------------------------------------------------------------------------


def conversation(example: dict, instruction: str = "") -> list[dict[str, str]]:
  """The messages before the answer: `prompt_messages`, or `question` as one user turn;
  `instruction` is appended to the last message (after a blank line)."""
  if "prompt_messages" in example:
    messages = [dict(m) for m in example["prompt_messages"]]
  elif "question" in example:
    messages = [{"role": "user", "content": example["question"]}]
  else:
    raise ValueError(f"dataset examples have neither prompt_messages nor question (fields "
                     f"{sorted(example)})")
  if instruction:
    messages[-1]["content"] = f"{messages[-1]['content']}\n\n{instruction}"
  return messages


def encode_example(tokenizer: data_lib.TextTokenizer, example: dict, kind: str, *,
                   chat_format: str | None = None, instruction: str = "") -> dict:
  """One decoded dataset example as token ids of `kind` ("sft", "preference" or "prompt").

  Raises:
    ValueError: if the example lacks the fields `kind` needs.
  """
  messages = conversation(example, instruction)
  if kind == "sft":
    field = next((f for f in SFT_RESPONSE_FIELDS if f in example), None)
    if field is None:
      raise ValueError(f"SFT needs one of the fields {SFT_RESPONSE_FIELDS}; the dataset has "
                       f"{sorted(example)}")
    return data_lib.encode_sft_example(tokenizer, messages, example[field],
                                       chat_format=chat_format)
  if kind == "preference":
    if "chosen" not in example or "rejected" not in example:
      raise ValueError(f"preference optimisation needs chosen and rejected responses; the "
                       f"dataset has {sorted(example)}")
    return data_lib.encode_preference_example(tokenizer, messages, example["chosen"],
                                              example["rejected"], chat_format=chat_format)
  if kind == "prompt":
    if "answer" not in example:
      raise ValueError(f"a verifiable reward needs the reference answer; the dataset has "
                       f"{sorted(example)}")
    return {"prompt": data_lib.encode_prompt(tokenizer, messages, chat_format=chat_format),
            "answer": example["answer"]}
  raise ValueError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")


def fit_to_slots(example: dict, *, prompt_len: int, response_len: int,
                 overlong: str) -> tuple[dict | None, bool]:
  """Fits an encoded example to the slots: (the example or None when skipped, was it over-long).

  "skip" drops an example whose prompt is longer than `prompt_len` or any response longer than
  `response_len`; "truncate" keeps the last `prompt_len` prompt tokens (the turns next to the
  answer) and the first `response_len` tokens of each response.
  """
  if overlong not in OVERLONG:
    raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
  limits = {name: prompt_len if name == "prompt" else response_len
            for name in example if name != "answer"}
  too_long = any(len(example[name]) > limit for name, limit in limits.items())
  if not too_long:
    return example, False
  if overlong == "skip":
    return None, True
  out = dict(example)
  for name, limit in limits.items():
    out[name] = example[name][-limit:] if name == "prompt" else example[name][:limit]
  return out, True


def _tokenizer_fingerprint(tokenizer_dir: str) -> str:
  digest = hashlib.sha256()
  for name in TOKENIZER_FILES:
    path = os.path.join(tokenizer_dir, name)
    if os.path.exists(path):
      with open(path, "rb") as f:
        digest.update(name.encode() + b"\0" + f.read())
  return digest.hexdigest()


def _cache_path(config, tokenizer_dir: str, chat_format: str, split: str, kind: str) -> str:
  d = config.dataset
  key = {"dataset": d.name, "config": d.config, "split": split, "kind": kind,
         "max_examples": d.max_examples, "instruction": d.instruction, "overlong": d.overlong,
         "prompt_len": config.prompt_len, "response_len": config.response_len,
         "chat_format": chat_format, "tokenizer": _tokenizer_fingerprint(tokenizer_dir)}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  return os.path.join(_path(config.data_dir), "tokenized",
                      f"{d.name}-{d.config or 'default'}-{split}-{kind}-{digest}.npz")


def _save_encoded(path: str, examples: list[dict], kind: str, stats: dict) -> None:
  arrays = {"stats": np.asarray(json.dumps(stats))}
  for name in KINDS[kind]:
    ids = [np.asarray(ex[name], np.int32) for ex in examples]
    arrays[f"{name}_lengths"] = np.asarray([len(x) for x in ids], np.int64)
    arrays[f"{name}_ids"] = np.concatenate(ids) if ids else np.zeros((0,), np.int32)
  if kind == "prompt":
    arrays["answer"] = np.asarray([ex["answer"] for ex in examples], dtype=np.str_)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none


def _load_encoded(path: str, kind: str) -> tuple[list[dict], dict]:
  with np.load(path) as f:
    columns = {name: np.split(f[f"{name}_ids"], np.cumsum(f[f"{name}_lengths"])[:-1])
               for name in KINDS[kind]}
    if kind == "prompt":
      columns["answer"] = [str(a) for a in f["answer"]]
    stats = json.loads(str(f["stats"]))
  return [{name: values[i] for name, values in columns.items()}
          for i in range(stats["kept"])], stats


def encode_split(config: ml_collections.ConfigDict, tokenizer: data_lib.TextTokenizer,
                 tokenizer_dir: str, chat_format: str, split: str,
                 kind: str) -> tuple[list[dict], dict]:
  """Encodes and fits one split of `config.dataset` (or reads the cached result).

  Returns:
    (examples, stats): stats has `source_examples` (rows read), `kept`, `overlong` (skipped or
    truncated, per `overlong_policy`) and `malformed_rows_skipped` (by the dataset builder).
  """
  d = config.dataset
  path = _cache_path(config, tokenizer_dir, chat_format, split, kind)
  if os.path.exists(path):
    return _load_encoded(path, kind)
  common_kwargs = dict(data_dir=_path(config.data_dir), config=d.config or None,
                       manual_dir=_path(d.manual_dir) or None, on_malformed=d.on_malformed)
  source = real.load_real_split(d.name, split, **common_kwargs)
  malformed = real.malformed_rows(real.build_real_dataset(d.name, **common_kwargs))
  n = len(source) if d.max_examples == 0 else min(d.max_examples, len(source))
  examples, overlong = [], 0
  for start in range(0, n, 1024):
    for raw in data_lib.gather(source, range(start, min(start + 1024, n))):
      encoded = encode_example(tokenizer, real.decode_example(raw), kind,
                               chat_format=chat_format, instruction=d.instruction)
      fitted, was_overlong = fit_to_slots(encoded, prompt_len=config.prompt_len,
                                          response_len=config.response_len, overlong=d.overlong)
      overlong += was_overlong
      if fitted is not None:
        examples.append(fitted)
  stats = {"dataset": d.name, "split": split, "kind": kind, "source_examples": n,
           "kept": len(examples), "overlong": overlong, "overlong_policy": d.overlong,
           "prompt_len": config.prompt_len, "response_len": config.response_len,
           "malformed_rows_skipped": int(malformed.get(split, {}).get("skipped", 0))}
  if not examples:
    raise ValueError(f"no example of {d.name}/{split} fits prompt_len {config.prompt_len} and "
                     f"response_len {config.response_len} ({overlong} over-long of {n}); raise "
                     "the slots or set config.dataset.overlong='truncate'")
  if jax.process_index() == 0:
    _save_encoded(path, examples, kind, stats)
  return examples, stats


def format_stats(stats: dict) -> str:
  action = "skipped" if stats["overlong_policy"] == "skip" else "truncated"
  return (f"{stats['dataset']}/{stats['split']} ({stats['kind']}): {stats['source_examples']} "
          f"examples, {stats['kept']} kept, {stats['overlong']} over-long {action} (prompt_len "
          f"{stats['prompt_len']}, response_len {stats['response_len']}); "
          f"{stats['malformed_rows_skipped']} malformed source rows skipped at build time")


# -- held-out evaluation ---------------------------------------------------------------------------


def eval_chunks(num_examples: int, num_wanted: int, batch_size: int, mesh, *,
                cyclic: bool = True) -> list[np.ndarray]:
  """Index chunks over the first n = min(num_wanted, num_examples) examples, each chunk's size
  divisible by the mesh's batch shards.

  cyclic: every chunk of one size (one compiled program), the last one filled cyclically from the
  start (for per-example outputs, trimmed to n). Otherwise each example at most once (for means
  over a chunk): chunks of one size and a smaller last one, over the first n rounded down to the
  shards (all n when n < shards is impossible: then the cyclic fill, a single chunk).
  """
  n = min(num_wanted, num_examples)
  if n == 0:
    return []
  shards = shd.num_batch_shards(mesh)
  if not cyclic and n >= shards:
    n -= n % shards
    size = min(batch_size - batch_size % shards or shards, n)
    return [np.arange(start, min(start + size, n)) for start in range(0, n, size)]
  size = -(-min(batch_size, n) // shards) * shards
  total = -(-n // size) * size
  return list((np.arange(total) % n).reshape(-1, size))


def loss_evaluator(ctx: RealRun, loss_fn: Callable, examples: Sequence[dict], collate: Callable,
                   *, batch_size: int, frozen: Sequence[Any] = (),
                   frozen_shardings: Sequence[Any] = (),
                   extras: dict[str, np.ndarray] | None = None) -> Callable[[Any], dict]:
  """`evaluate(params) -> metrics`: the loss and its metrics over the held-out examples, each
  counted once (`eval_chunks(cyclic=False)`), chunks weighted by their loss's `LOSS_WEIGHT`
  metric (tokens for a token-mean loss) or else their number of examples."""
  chunks = eval_chunks(len(examples), ctx.config.eval.num_prompts, batch_size, ctx.mesh,
                       cyclic=False)
  batches = []
  for idx in chunks:
    batch = collate(data_lib.gather(examples, idx))
    batch.update({name: values[idx] for name, values in (extras or {}).items()})
    batches.append(shd.shard_batch(batch, ctx.mesh))

  def metrics_fn(model, batch, *frozen_args):
    loss, metrics = loss_fn(model, batch, *frozen_args)
    return {**metrics, "loss": loss}

  step = steps_lib.make_eval_step(metrics_fn, ctx.graphdef, ctx.mesh, ctx.param_shardings,
                                  frozen_shardings)

  def evaluate(params) -> dict[str, float]:
    if not batches:
      return {}
    per_chunk = jax.device_get([step(params, b, *frozen) for b in batches])
    weights = np.asarray([m.pop(losses_lib.LOSS_WEIGHT, len(idx))
                          for m, idx in zip(per_chunk, chunks)], np.float64)
    weights = weights / weights.sum() if weights.sum() > 0 else np.ones(len(chunks)) / len(chunks)
    return {k: float(np.sum(weights * np.asarray([m[k] for m in per_chunk])))
            for k in per_chunk[0]}

  return evaluate


def _final_eval(records: list[dict], evaluate: Callable[[Any], dict], params) -> dict:
  """`common.final_eval` of a stage, its names prefixed `eval_`."""
  return {f"eval_{k}": v for k, v in common.final_eval(records, lambda: evaluate(params)).items()}


# -- SFT and offline preference optimisation -------------------------------------------------------


def run_sft(ctx: RealRun, params: Any) -> tuple[Any, dict]:
  """SFT on the train split's demonstrations. Returns (params, summary row)."""
  c, sc = ctx.config, ctx.config.sft
  collate = functools.partial(data_lib.sft_batch, prompt_len=c.prompt_len,
                              response_len=c.response_len)
  loss_fn = objectives.make_sft_loss(sc.loss, aggregation=sc.aggregation, gem_beta=sc.gem_beta,
                                     gem_h=sc.gem_h, logits_chunk_size=c.logits_chunk_size)
  train = ctx.encoded(c.dataset.train_split, "sft")
  evaluate = loss_evaluator(ctx, loss_fn, ctx.encoded(c.dataset.eval_split, "sft"), collate,
                            batch_size=sc.loop.batch_size)
  t0 = time.perf_counter()
  params, records = ctx.train_stage(
      sc, name="sft", params=params, loss_fn=loss_fn,
      get_batch=common.batch_fn(train, collate, batch_size=sc.loop.batch_size, seed=c.seed),
      eval_fn=evaluate)
  return params, {"stage": "sft", "loss": sc.loss, **_final_eval(records, evaluate, params),
                  "train_s": time.perf_counter() - t0}


def run_offline(ctx: RealRun, params: Any) -> tuple[Any, dict]:
  """`config.offline.loss` on the train pairs against the starting policy as the frozen reference.

  Returns (params, summary row).
  """
  c, oc = ctx.config, ctx.config.offline
  loss = oc.loss
  collate = functools.partial(data_lib.preference_batch, prompt_len=c.prompt_len,
                              response_len=c.response_len)
  train = ctx.encoded(c.dataset.train_split, "preference")
  held_out = ctx.encoded(c.dataset.eval_split, "preference")
  frozen, frozen_shardings, extras, eval_extras = (), (), None, None
  if loss in objectives.REFERENCE_LOSSES:
    # The reference is the starting policy itself: same weights, no copy (the stage trains a copy).
    ref_params, ref_shardings = params, ctx.param_shardings
    if oc.reference == "precomputed":
      n_eval = min(len(held_out), c.eval.num_prompts)
      extras = stages_lib.precompute_reference(ctx.graphdef, ctx.mesh, ref_params, train,
                                               collate, **common.logp_kwargs(c))
      eval_extras = (stages_lib.precompute_reference(
          ctx.graphdef, ctx.mesh, ref_params, common.Subset(held_out, range(n_eval)), collate,
          **common.logp_kwargs(c))
                     if n_eval else None)
      del ref_params  # Only the log-probs are needed from here on.
    else:
      frozen, frozen_shardings = (ref_params,), (ref_shardings,)
  loss_fn = objectives.make_preference_loss(loss, oc[loss].to_dict(), reference=oc.reference,
                                            reference_graphdef=ctx.graphdef,
                                            **common.logp_kwargs(c))
  evaluate = loss_evaluator(ctx, loss_fn, held_out, collate, batch_size=oc.loop.batch_size,
                            frozen=frozen, frozen_shardings=frozen_shardings, extras=eval_extras)
  t0 = time.perf_counter()
  params, records = ctx.train_stage(
      oc, name=loss, params=params, loss_fn=loss_fn,
      get_batch=common.batch_fn(train, collate, batch_size=oc.loop.batch_size, seed=c.seed,
                                extras=extras),
      frozen=frozen, frozen_shardings=frozen_shardings, eval_fn=evaluate)
  return params, {"stage": loss, **_final_eval(records, evaluate, params),
                  "train_s": time.perf_counter() - t0}


# -- GRPO with a verifiable reward -----------------------------------------------------------------


def decode_responses(tokenizer: data_lib.TextTokenizer, tokens_BxTr, mask_BxTr) -> list[str]:
  """The text of each sampled response (its masked tokens, special tokens dropped)."""
  tokens_BxTr, mask_BxTr = np.asarray(tokens_BxTr), np.asarray(mask_BxTr)
  return [tokenizer.decode(t[m != 0], skip_special_tokens=True)
          for t, m in zip(tokens_BxTr, mask_BxTr)]


def _prompt_key(ids) -> bytes:
  return np.asarray(ids, np.int32).tobytes()


def text_reward(tokenizer: data_lib.TextTokenizer, reward_fn: str | Callable[[str, str], float],
                examples: Sequence[dict], mesh=None) -> Callable:
  """A reward source for `rlhfjax.train.rollout.Rollouts` from a host-side checker of text.

  ``r_b = reward_fn(decode(response_b), answer(prompt_b))``: each prompt's reference answer is
  looked up by its token ids (the unpadded ones), so the reward needs only the rollout's arrays.
  The checker runs on the host through `jax.pure_callback` (the token arrays are replicated first;
  they are small next to the logits). Identical prompts share the first such example's answer.

  Args:
    tokenizer: decodes the responses.
    reward_fn: a checker `(completion, reference) -> float` or its name in `REWARD_FNS`.
    examples: encoded prompt examples (`prompt` ids, `answer` text) the rollouts draw from.
    mesh: the device mesh (None outside a sharded program).

  Returns:
    `reward(params, prompt_tokens_BxTp, prompt_mask_BxTp, response_tokens_BxTr,
    response_mask_BxTr) -> float32 [B]`; params are ignored.
  """
  answers: dict[bytes, str] = {}
  for example in examples:
    answers.setdefault(_prompt_key(example["prompt"]), example["answer"])

  def host(prompt_tokens_BxTp, prompt_mask_BxTp, response_tokens_BxTr, response_mask_BxTr):
    references = []
    for row, mask in zip(np.asarray(prompt_tokens_BxTp), np.asarray(prompt_mask_BxTp)):
      key = _prompt_key(row[mask != 0])
      if key not in answers:
        raise ValueError("a rollout prompt is not one of the reward's dataset prompts: "
                         f"{tokenizer.decode(row[mask != 0])!r}")
      references.append(answers[key])
    completions = decode_responses(tokenizer, response_tokens_BxTr, response_mask_BxTr)
    return batch_rewards(reward_fn, completions, references)

  def reward(params, prompt_tokens_BxTp, prompt_mask_BxTp, response_tokens_BxTr,
             response_mask_BxTr):
    del params
    arrays = (prompt_tokens_BxTp, prompt_mask_BxTp, response_tokens_BxTr, response_mask_BxTr)
    if mesh is not None:
      arrays = jax.lax.with_sharding_constraint(arrays, shd.replicated(mesh))
    return jax.pure_callback(host, jax.ShapeDtypeStruct(prompt_tokens_BxTp.shape[:1], jnp.float32),
                             *arrays, vmap_method="sequential")

  return reward


def grpo_settings(config: ml_collections.ConfigDict):
  """`OnlineSettings` of `config.grpo`: GRPO, or Dr. GRPO when `scale_by_std` is False (no std in
  the advantages and a constant length normaliser in the loss, so `aggregation` is unused)."""
  from rlhfjax.train import online as online_lib

  gc = config.grpo
  algorithm = "grpo" if gc.scale_by_std else "dr_grpo"
  algorithm_config = {"beta": gc.beta, "eps_lo": gc.eps_lo, "eps_hi": gc.eps_hi}
  if algorithm == "grpo":
    algorithm_config["mode"] = gc.aggregation
  samples = gc.prompts_per_step * gc.group_size
  return online_lib.OnlineSettings.from_algorithm_config(
      algorithm, algorithm_config, group_size=gc.group_size, num_epochs=gc.updates_per_rollout,
      num_minibatches=samples // gc.loop.batch_size,
      accumulation_steps=common.accumulation_steps(gc.optimizer), seed=config.seed)


def answer_evaluator(ctx: RealRun, examples: Sequence[dict], sampling, *, reward: str,
                     batch_size: int) -> Callable[[Any], dict]:
  """`evaluate(params) -> {accuracy, response_len, eos_frac}` of responses sampled with `sampling`
  to the first `config.eval.num_prompts` held-out prompts, scored by the `reward` checker."""
  from rlhfjax.sampling import make_sampler

  c = ctx.config
  n = min(c.eval.num_prompts, len(examples))
  chunks = eval_chunks(len(examples), c.eval.num_prompts, batch_size, ctx.mesh)
  prompts = [shd.shard_batch(data_lib.prompt_batch(data_lib.gather(examples, idx),
                                                   prompt_len=c.prompt_len), ctx.mesh)
             for idx in chunks]
  sample = make_sampler(ctx.graphdef, sampling)
  rng = jax.random.key(c.seed + 1)

  def evaluate(params) -> dict[str, float]:
    if not chunks:
      return {}
    rewards, lengths, eos = [], [], []
    for k, (idx, batch) in enumerate(zip(chunks, prompts)):
      out = sample(params, batch["prompt_tokens"], batch["prompt_mask"], jax.random.fold_in(rng, k))
      tokens, mask = jax.device_get((out.tokens_BxTr, out.mask_BxTr))
      rewards.append(batch_rewards(reward, decode_responses(ctx.tokenizer, tokens, mask),
                                   [examples[int(i)]["answer"] for i in idx]))
      lengths.append(mask.sum(-1))
      eos.append(np.any((tokens == sampling.eos_id) & (mask != 0), axis=-1))
    # The last chunk is filled cyclically: score each of the n prompts once.
    return {"accuracy": float(np.mean(np.concatenate(rewards)[:n])),
            "response_len": float(np.mean(np.concatenate(lengths)[:n])),
            "eos_frac": float(np.mean(np.concatenate(eos)[:n]))}

  return evaluate


def run_grpo(ctx: RealRun, params: Any) -> tuple[Any, dict]:
  """GRPO on the train split's questions with `config.grpo.reward`, from and against `params`.

  Each iteration samples `group_size` responses to `prompts_per_step` train prompts, scores them
  with the answer checker, and takes `updates_per_rollout` passes of minibatches of
  `loop.batch_size` samples (whole groups). `loop.num_steps` counts iterations.

  Returns (params, summary row: held-out answer accuracy, last rollout reward, median seconds
  per logged iteration, train_s).
  """
  from rlhfjax.sampling import SamplingConfig
  from rlhfjax.train import online as online_lib
  from rlhfjax.train import rollout as rollout_lib

  c, gc, lc, mesh = ctx.config, ctx.config.grpo, ctx.config.grpo.loop, ctx.mesh
  train = ctx.encoded(c.dataset.train_split, "prompt")
  held_out = ctx.encoded(c.dataset.eval_split, "prompt")
  settings = grpo_settings(c)
  graphdef, ref_params = ctx.graphdef, params  # the reference: the starting weights, not copied
  _, _, logical_specs = state_lib.abstract_model(ctx.build_model)
  tx = common.make_optimizer(gc.optimizer, num_updates(c, "grpo"), logical_axes=logical_specs)
  _, policy_state, shardings = state_lib.state_from_params(params, tx, mesh, ctx.build_model)

  eos_id = data_lib.end_of_turn_id(ctx.tokenizer, ctx.chat_format)
  pad_id = ctx.tokenizer.pad_id if ctx.tokenizer.pad_id is not None else eos_id
  sampling = SamplingConfig(max_new_tokens=gc.max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                            temperature=gc.temperature)
  rollouts = rollout_lib.Rollouts(graphdef, sampling, mesh=mesh, group_size=gc.group_size,
                                  reward=text_reward(ctx.tokenizer, gc.reward, train, mesh),
                                  logits_chunk_size=c.logits_chunk_size,
                                  shared_prompt=c.shared_prompt, fuse_forward=c.fuse_forward)
  trainer = online_lib.OnlineTrainer(
      settings, rollouts, mesh=mesh, policy_graphdef=graphdef, optimizer=tx,
      state_shardings=shardings, reference_params=ref_params, response_len=gc.max_new_tokens)
  evaluate = answer_evaluator(
      ctx, held_out, dataclasses.replace(sampling, temperature=c.eval.temperature),
      reward=gc.reward, batch_size=lc.batch_size)

  def prompts_at(iteration: int) -> dict:
    indices = data_lib.batch_indices(len(train), batch_size=gc.prompts_per_step, seed=c.seed,
                                     step=iteration)
    return shd.shard_batch(data_lib.prompt_batch(data_lib.gather(train, indices),
                                                 prompt_len=c.prompt_len), mesh)

  t0 = time.perf_counter()
  state, records = online_lib.train_online(
      trainer, trainer.init_state(policy_state), run_dir=os.path.join(ctx.run_dir, "grpo"),
      prompts_at=prompts_at, rng=jax.random.key(c.seed + 11),
      settings=common.loop_settings(lc, "grpo"), eval_fn=lambda s: evaluate(s.policy.params))
  ctx.records["grpo"] = records
  row = {"stage": "grpo", **_final_eval(records, evaluate, state.policy.params),
         **stages_lib.online_summary(records), "train_s": time.perf_counter() - t0}
  return state.policy.params, row


STAGE_FNS = {"sft": run_sft, "offline": run_offline, "grpo": run_grpo}


# -- outputs ---------------------------------------------------------------------------------------


def export_policy(ctx: RealRun, params: Any, path: str) -> None:
  """Writes the policy as a Hugging Face checkpoint with the tokenizer files beside it.

  Tensors are stored in `config.export_dtype` ("" keeps float32, so `load_pretrained` of the
  export gives the trained parameters bit for bit); the source config's special token ids are
  kept.
  """
  c = ctx.config
  checkpoint = _path(c.checkpoint)
  hf = read_hf_config(checkpoint)
  extra = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if hf.get(k) is not None}
  save_pretrained((ctx.graphdef, params), path, dtype=c.export_dtype or None, extra_config=extra)
  if jax.process_index() == 0:
    files = [os.path.join(ctx.tokenizer_dir, name) for name in TOKENIZER_FILES]
    files.append(os.path.join(checkpoint, "generation_config.json"))
    for src in files:
      if os.path.exists(src):
        shutil.copy2(src, os.path.join(path, os.path.basename(src)))


def plot(ctx: RealRun, path: str) -> None:
  """One panel per stage: the train loss (rollout reward for GRPO) and its held-out counterpart."""
  from rlhfjax.train import metrics as metrics_lib

  panels = {}
  for name, records in ctx.records.items():
    train_key, eval_key = ("reward", "accuracy") if name == "grpo" else ("loss", "loss")
    panels[name] = {f"train {train_key}": common.curve(records, train_key),
                    f"held-out {eval_key}": common.curve(records, eval_key, "eval")}
  if panels:
    metrics_lib.plot_panels(panels, path)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  # Defined here, not at import: absl allows one `--config` per process, and tests import this.
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "A real-run config file, e.g. experiments/configs/real_dpo_hh.py.")
  _JSON = flags.DEFINE_string("json", None, "Also write the summary JSON to this path.")
  flags.mark_flags_as_required(["config"])

  def main(argv):
    del argv
    shd.initialize_distributed()
    common.quiet_logs()
    summary = run(_CONFIG.value)
    if _JSON.value:
      common.write_json(_JSON.value, summary)

  app.run(main)
