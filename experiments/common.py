"""Pieces every experiment module shares: run directories, meshes, tasks, stage training, tables."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from rlhfjax import data as data_lib
from rlhfjax import sharding as shd
from rlhfjax.models import Transformer, get_config as model_config
from rlhfjax.rewards import GoldReward, verifiable_reward
from rlhfjax.train import loop as loop_lib
from rlhfjax.train import objectives
from rlhfjax.train import optimizers
from rlhfjax.train import state as state_lib
from rlhfjax.train import steps as steps_lib
from rlhfjax.train.evaluation import score_samples, win_rate


def quiet_logs() -> None:
  """Keeps experiment output to the progress bar and tables (orbax logs every save at INFO)."""
  from absl import logging

  logging.set_verbosity(logging.WARNING)


def launch(run: Callable[[ml_collections.ConfigDict], dict],
           get_config: Callable[[], ml_collections.ConfigDict]) -> None:
  """The `__main__` of an experiment module: `--config.<key>=<value>` overrides of `get_config()`,
  `--json PATH` for an extra copy of the returned results, quiet logs, then `run(config)`.

  Flags are defined here, at launch, not at import: absl allows one `--config` per process, and
  tests import several experiment modules.
  """
  from absl import app, flags
  from ml_collections import config_flags

  config_flag = config_flags.DEFINE_config_dict("config", get_config())
  json_flag = flags.DEFINE_string("json", None, "Also write the results JSON to this path.")

  def main(argv):
    del argv
    quiet_logs()
    results = run(config_flag.value)
    if json_flag.value:
      write_json(json_flag.value, results)

  app.run(main)


# Config keys (last component) a resumed run may change: how long it runs and what it logs.
RESUMABLE_CHANGES = ("num_steps", "num_iterations", "log_every", "eval_every", "checkpoint_every",
                     "max_to_keep", "progress")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{dotted key: leaf} of a nested dict."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  return {k: v for key, sub in tree.items()
          for k, v in _flat(sub, f"{prefix}.{key}" if prefix else str(key)).items()}


def config_differences(old: dict, new: dict) -> list[str]:
  """Dotted keys present in one config (as JSON dicts) but not the other, or with other values."""
  a, b = _flat(old), _flat(new)
  missing = object()
  return sorted(k for k in set(a) | set(b) if a.get(k, missing) != b.get(k, missing))


def resolve_run_dir(config: ml_collections.ConfigDict, experiment: str) -> str:
  """Creates the run directory and writes the resolved config there as `config.json`.

  Reusing a directory resumes its run, so its saved config is never lost: one that differs is kept
  as `config.<time>.json`, and when the directory already holds checkpoints a difference outside
  `RESUMABLE_CHANGES` (the run's length and logging) is a ValueError naming the keys, before
  anything is written.
  """
  run_dir = config.run_dir or os.path.join(
      "runs", f"{experiment}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
  os.makedirs(run_dir, exist_ok=True)
  path = os.path.join(run_dir, "config.json")
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if os.path.exists(path):
    with open(path) as f:
      saved = f.read()
    if saved != text:
      changed = config_differences(json.loads(saved), json.loads(text))
      blocking = [k for k in changed if k.rsplit(".", 1)[-1] not in RESUMABLE_CHANGES]
      has_checkpoints = any("checkpoints" in dirs and os.listdir(os.path.join(root, "checkpoints"))
                            for root, dirs, _ in os.walk(run_dir))
      if blocking and has_checkpoints:
        raise ValueError(
            f"{run_dir} holds checkpoints of a run with another config (it differs in "
            f"{blocking[:10]}{' ...' if len(blocking) > 10 else ''}): resume it with its "
            "config.json, or use another run_dir")
      stamp = f"{datetime.datetime.now():%Y%m%d-%H%M%S-%f}"
      os.replace(path, os.path.join(run_dir, f"config.{stamp}.json"))
  with open(path, "w") as f:
    f.write(text)
  return run_dir


TRAINING_STAGES = ("sft", "reward_model", "offline")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every setting the base config declares before anything is built or compiled.

  Raises:
    ValueError: naming the key (e.g. `config.sft.optimizer: ...`).
  """
  def check(key, build):
    try:
      return build()
    except (ValueError, TypeError) as e:
      raise ValueError(f"config.{key}: {e}") from e

  check("model", lambda: dataclasses.replace(model_config(config.model),
                                            dtype=config.compute_dtype))
  tasks = {"verifiable": data_lib.VerifiableTaskConfig, "preference": data_lib.PreferenceTaskConfig}
  for name, task_cls in tasks.items():
    check(name, lambda: task_cls(**config[name].to_dict()))
    task = task_cls(**config[name].to_dict())
    for key, longest in (("prompt_len", task.max_prompt_len),
                         ("response_len", task.max_response_len)):
      if config[key] < longest:
        raise ValueError(f"config.{key} ({config[key]}) is shorter than the longest {name} "
                         f"{key.split('_')[0]} ({longest})")
  if config.sft.loss not in objectives.SFT_LOSSES:
    raise ValueError(f"config.sft.loss must be one of {objectives.SFT_LOSSES}, "
                     f"got {config.sft.loss!r}")
  if config.offline.loss not in objectives.PREFERENCE_LOSSES:
    raise ValueError(f"config.offline.loss must be one of {objectives.PREFERENCE_LOSSES}, "
                     f"got {config.offline.loss!r}")
  check("offline", lambda: objectives.check_preference_loss(
      config.offline.loss, config.offline[config.offline.loss].to_dict(),
      config.offline.reference))
  shards = shd.num_batch_shards(check("mesh", lambda: make_mesh(config)))
  if config.eval.num_prompts < shards:
    raise ValueError(f"config.eval.num_prompts ({config.eval.num_prompts}) must be at least the "
                     f"{shards} data-parallel devices of config.mesh")
  for stage in TRAINING_STAGES:
    if stage not in config:
      continue
    sc = config[stage]
    check(f"{stage}.optimizer", lambda: make_optimizer(sc.optimizer, sc.loop.num_steps))
    check(f"{stage}.loop", lambda: loop_settings(sc.loop))
    if sc.loop.batch_size < 1 or sc.loop.batch_size % shards:
      raise ValueError(f"config.{stage}.loop.batch_size ({sc.loop.batch_size}) must be a positive "
                       f"multiple of the {shards} data-parallel devices of config.mesh")


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  return shd.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)


def model_fn(config: ml_collections.ConfigDict, *, seed: int, score_head: bool = False
             ) -> Callable[[], Transformer]:
  """A seeded constructor of the configured model (compute dtype from `config.compute_dtype`)."""
  cfg = dataclasses.replace(model_config(config.model), dtype=config.compute_dtype)
  return lambda: Transformer(cfg, rngs=nnx.Rngs(seed), score_head=score_head)


@dataclasses.dataclass(frozen=True)
class Tasks:
  """The two built-in synthetic tasks, as random-access sources, plus their reward functions."""
  verifiable_train: Any
  verifiable_test: Any
  preference_sft: Any
  preference_pairs: Any
  preference_test: Any
  gold_reward: GoldReward

  def rewards(self) -> dict[str, Callable]:
    return {"accuracy": verifiable_reward, "gold_reward": self.gold_reward}


def load_tasks(config: ml_collections.ConfigDict) -> Tasks:
  """Builds (once, cached under `config.data_dir`) and opens both synthetic datasets."""
  ver = config.verifiable.to_dict()
  pref = config.preference.to_dict()
  load_v = functools.partial(data_lib.load_split, "synthetic_verifiable",
                             data_dir=config.data_dir, **ver)
  load_p = functools.partial(data_lib.load_split, "synthetic_preference",
                             data_dir=config.data_dir, **pref)
  return Tasks(
      verifiable_train=load_v("train"), verifiable_test=load_v("test"),
      preference_sft=load_p("sft"), preference_pairs=load_p("pairs"),
      preference_test=load_p("test"),
      gold_reward=data_lib.PreferenceTaskConfig(**pref).gold_reward())


class ConcatSource:
  """Random access over several sources, one after another."""

  def __init__(self, sources: Sequence[Any]):
    self._sources = list(sources)
    self._offsets = np.cumsum([0] + [len(s) for s in self._sources])

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def __getitem__(self, i: int):
    k = int(np.searchsorted(self._offsets, i, side="right")) - 1
    return self._sources[k][i - int(self._offsets[k])]


class Subset:
  """Random access to `source[indices[i]]`."""

  def __init__(self, source: Any, indices: Sequence[int]):
    self._source, self._indices = source, np.asarray(indices)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int):
    return self._source[int(self._indices[i])]


def batch_fn(source: Any, collate: Callable, *, batch_size: int, seed: int,
             extras: dict[str, np.ndarray] | None = None) -> Callable[[int], dict]:
  """`get_batch(step)`: this host's share of the global batch at `step` (a pure function).

  `extras` are per-example arrays (e.g. precomputed reference log-probs) added to the batch.
  """

  def get_batch(step: int) -> dict:
    indices = data_lib.batch_indices(
        len(source), batch_size=batch_size, seed=seed, step=step,
        process_index=jax.process_index(), process_count=jax.process_count())
    batch = collate(data_lib.gather(source, indices))
    batch.update({name: values[indices] for name, values in (extras or {}).items()})
    return batch

  return get_batch


def prompts_of(config: ml_collections.ConfigDict, source: Any, mesh) -> dict:
  """The first `config.eval.num_prompts` prompts of `source`, left-padded and sharded."""
  n = min(config.eval.num_prompts, len(source))
  n -= n % shd.num_batch_shards(mesh)
  examples = data_lib.gather(source, range(n))
  batch = data_lib.prompt_batch(examples, prompt_len=config.prompt_len)
  return shd.shard_batch(batch, mesh)


def logp_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """How preference objectives compute log-probs (`config.logits_chunk_size`,
  `config.shared_prompt`): keywords of `objectives.make_preference_loss` / `reference_logps`."""
  return {"logits_chunk_size": config.logits_chunk_size,
          "shared_prompt_len": config.prompt_len if config.shared_prompt else None}


def make_optimizer(oc: ml_collections.ConfigDict, total_steps: int, logical_axes: Any = None):
  """The optax transform of an optimizer config; `total_steps` counts optimizer updates (each of
  `accumulation_steps(oc)` micro-batches). Raises ValueError naming a bad setting."""
  accumulation_steps(oc)
  return optimizers.make_optimizer(
      oc.name, oc.learning_rate, warmup_steps=oc.warmup_steps, total_steps=total_steps,
      b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay, clip_norm=oc.clip_norm,
      logical_axes=logical_axes)


def accumulation_steps(oc: ml_collections.ConfigDict) -> int:
  """`oc.accumulation_steps`: micro-batches per optimizer update, accumulated inside the train
  step (`steps.make_train_step`); raises ValueError below 1."""
  if oc.accumulation_steps < 1:
    raise ValueError(f"accumulation_steps must be >= 1, got {oc.accumulation_steps}")
  return oc.accumulation_steps


def accumulated_batches(get_batch: Callable[[int], dict], k: int) -> Callable[[int], dict]:
  """`get_batch` for a step of k micro-batches: step s holds `get_batch(s k + i)`, i < k (the
  micro-batch order of k steps without accumulation), interleaved as the step splits them
  (`steps.interleave_micro_batches`)."""
  if k == 1:
    return get_batch
  return lambda step: steps_lib.interleave_micro_batches(
      [get_batch(step * k + i) for i in range(k)])


def train_stage(
    stage: ml_collections.ConfigDict,
    *,
    name: str,
    run_dir: str,
    mesh,
    build_model: Callable[[], nnx.Module],
    loss_fn: Callable,
    get_batch: Callable[[int], dict],
    frozen: Sequence[Any] = (),
    frozen_shardings: Sequence[Any] = (),
    init_params: Any = None,
    eval_fn: Callable[[Any], dict] | None = None,
) -> tuple[nnx.GraphDef, state_lib.TrainState, list[dict]]:
  """Trains one stage (SFT, reward model, DPO, ...) in `<run_dir>/<name>` with the generic loop.

  Args:
    stage: a config with `optimizer` and `loop` sub-configs (see `configs.base`).
    init_params: start from these parameters (e.g. the SFT policy) instead of `build_model`'s;
      parameters the model has beyond them (a new score head) keep their initialisation
      (`state.state_from_params`: the model is initialised only then).
    eval_fn: `eval_fn(params) -> metrics`.

  Returns:
    (graphdef, final state, logged records).
  """
  lc = stage.loop
  _, _, logical = state_lib.abstract_model(build_model)
  tx = make_optimizer(stage.optimizer, lc.num_steps, logical_axes=logical)
  if init_params is None:
    graphdef, state, shardings = state_lib.init_train_state(build_model, tx, mesh)
  else:
    graphdef, state, shardings = state_lib.state_from_params(init_params, tx, mesh, build_model)
  k = accumulation_steps(stage.optimizer)
  step = steps_lib.make_train_step(loss_fn, tx, graphdef, mesh, shardings, frozen_shardings,
                                   accumulation_steps=k)
  state, records = loop_lib.train(
      run_dir=os.path.join(run_dir, name), state=state, state_shardings=shardings, step_fn=step,
      get_batch=accumulated_batches(get_batch, k), mesh=mesh, settings=loop_settings(lc, name),
      frozen=frozen,
      eval_fn=None if eval_fn is None else (lambda s: eval_fn(s.params)))
  return graphdef, state, records


def loop_settings(lc: ml_collections.ConfigDict, name: str = "train") -> loop_lib.LoopSettings:
  """`loop.LoopSettings` of a stage's `loop` config (`configs.base.loop_config`)."""
  return loop_lib.LoopSettings(
      num_steps=lc.num_steps, log_every=lc.log_every, eval_every=lc.eval_every,
      checkpoint_every=lc.checkpoint_every, max_to_keep=lc.max_to_keep, progress=lc.progress,
      name=name)


def final_eval(records: Sequence[dict], evaluate: Callable[[], dict]) -> dict:
  """A stage's held-out metrics: its last eval record (without `step` and `split`), or
  `evaluate()` when it logged none (a finished stage, resumed)."""
  evals = [r for r in records if r["split"] == "eval"]
  final = evals[-1] if evals else evaluate()
  return {k: v for k, v in final.items() if k not in ("step", "split")}


def curve(records: Sequence[dict], key: str, split: str = "train") -> tuple[list, list]:
  rows = [r for r in records if r["split"] == split and key in r]
  return [r["step"] for r in rows], [r[key] for r in rows]


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
  """A plain-text table; floats with 3 decimals, missing cells as '-'."""
  def cell(v):
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

  body = [[cell(r.get(c)) for c in columns] for r in rows]
  widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
  line = lambda cells: "  ".join(s.ljust(w) for s, w in zip(cells, widths))
  return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(b) for b in body])


def write_json(path: str, obj: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)


def write_report(results: dict[str, Any], filename: str, text: str) -> dict[str, Any]:
  """Writes `results` to `<run_dir>/<filename>`, prints `text` and the run directory with the
  total time; returns `results` (which holds `run_dir` and `total_s`)."""
  write_json(os.path.join(results["run_dir"], filename), results)
  print("\n" + text)
  print(f"\nrun directory: {results['run_dir']}  (total {results['total_s']:.0f} s)")
  return results


def report_run(summary: dict[str, Any], columns: Sequence[str]) -> dict[str, Any]:
  """`write_report` of an experiment summary: `summary.json`, its `rows` as a table."""
  return write_report(summary, "summary.json", format_table(summary["rows"], columns))


class PolicyEvaluator:
  """Scores a policy on both tasks: greedy exact-match accuracy, and on sampled responses the
  gold reward, the length, and (given a reference) KL(policy || reference) and the win rate
  against the reference's own samples.

  Callable as `evaluator(params, reference_params=None) -> dict`; every piece compiles once.
  """

  def __init__(self, config: ml_collections.ConfigDict, tasks: Tasks, graphdef: nnx.GraphDef,
               mesh):
    from rlhfjax.rewards import vocab
    from rlhfjax.sampling import SamplingConfig, make_sampler

    settings = dict(max_new_tokens=config.response_len, eos_id=vocab.EOS_ID, pad_id=vocab.PAD_ID)
    self._greedy = make_sampler(graphdef, SamplingConfig(temperature=0.0, **settings))
    self._sampled = make_sampler(graphdef, SamplingConfig(temperature=config.eval.temperature,
                                                          **settings))
    self._verifiable = prompts_of(config, tasks.verifiable_test, mesh)
    self._preference = prompts_of(config, tasks.preference_test, mesh)
    self._gold = tasks.gold_reward
    self._graphdef = graphdef
    self._rng = jax.random.key(config.seed + 1)
    self._kl = jax.jit(self._kl_estimate)
    # The rewards compile too: run eagerly, their dozens of small sharded ops queue up behind
    # each other on the simulated devices of a CPU.
    self._score = jax.jit(self._score_outputs)
    self._win_rate = jax.jit(self._win_rate_against)

  def _score_outputs(self, verifiable, preference, greedy, sampled):
    """Greedy exact-match accuracy and the sampled responses' gold reward and length."""
    return {"accuracy": score_samples(verifiable, greedy, {"accuracy": verifiable_reward})[
        "accuracy"], **score_samples(preference, sampled, {"gold_reward": self._gold})}

  def _win_rate_against(self, preference, sampled, ref_sampled):
    return win_rate(self._gold, preference, sampled, ref_sampled)

  def _kl_estimate(self, out, reference_params):
    """k1 estimate of KL(pi || ref) per sequence on the policy's own samples, averaged."""
    from rlhfjax.losses import sequence_logprobs, token_logprobs
    from rlhfjax.sampling import to_sequences

    seqs = to_sequences(self._preference["prompt_tokens"], self._preference["prompt_mask"], out)
    ref = nnx.merge(self._graphdef, reference_params)
    ref_logp = token_logprobs(ref(seqs["tokens"], attention_mask_BxT=seqs["attention_mask"]),
                              seqs["tokens"])[:, -out.tokens_BxTr.shape[1]:]
    return jnp.mean(sequence_logprobs(out.logprobs_BxTr - ref_logp, out.mask_BxTr))

  def __call__(self, params, reference_params=None) -> dict[str, float]:
    p = self._preference
    greedy = self._greedy(params, self._verifiable["prompt_tokens"],
                          self._verifiable["prompt_mask"], self._rng)
    sampled = self._sampled(params, p["prompt_tokens"], p["prompt_mask"], self._rng)
    metrics = self._score(self._verifiable, p, greedy, sampled)
    if reference_params is not None:
      ref_sampled = self._sampled(reference_params, p["prompt_tokens"], p["prompt_mask"],
                                  jax.random.fold_in(self._rng, 1))
      metrics["kl"] = self._kl(sampled, reference_params)
      metrics["win_rate"] = self._win_rate(p, sampled, ref_sampled)
    return {k: float(v) for k, v in jax.device_get(metrics).items()}
