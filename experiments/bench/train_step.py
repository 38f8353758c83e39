"""Train-step throughput and model-FLOPs utilisation (MFU), side by side with TRL on the CPU.

    python -m experiments.bench.train_step [--json PATH] [--config.algorithms="('sft','dpo')"]
        [--config.model.num_layers=4 ...] [--config.dpo.pairs=8] [--config.compare_trl=False]
        [--config.peak_flops=989.4e12]

What is timed (median seconds per call after the compiling call, `repeats` calls):

  - sft: one `make_train_step(make_sft_loss())` step on `sft.batch_size` x `sft.seq_len` tokens.
  - dpo: one `make_train_step(make_preference_loss("dpo"))` step on `dpo.pairs` pairs of
    `prompt_len + response_len` tokens, the reference log-probs computed inside the step
    (`dpo`, reference on the fly) and read from the batch (`dpo_precomputed`).
  - grpo: one `OnlineTrainer.iterate` of GRPO: `prompts` x `group_size` responses of
    `max_new_tokens` tokens sampled by the jit KV-cache sampler (EOS never sampled: every row fills
    the budget), scored (reference log-probs; the sampler's log-probs and entropies are the old
    ones, `recompute_logprobs=False`, as TRL uses the policy's own at one update per rollout),
    advantages, and one optimizer step.

With `shared_prompt` (default) DPO and GRPO use shared-prompt packing (`rlhfjax.train.packing`):
the policy and the reference run once per pair / group on [prompt | response 1 | ...], and the
output layer only where a response token is predicted. TRL recomputes the prompt in every row;
the work saved is the prompt's repeats, the objective and its gradients are the same.

All steps use AdamW (lr 1e-6, global-norm clipping at 1.0, TRL's defaults), float32 parameters,
and `compute_dtype` activations (float32 on a CPU, where bf16 matmuls are slower).

Model FLOPs (PaLM's MFU accounting, arXiv 2204.02311 appendix B, attention included):
  N = L (2 D H Dh + 2 D K Dh + 3 D F) + V D   matmul parameters (the embedding lookup is not a
                                               matmul; the LM head is, tied or not),
  forward(B, T) = 2 N B T + 4 L H Dh B T^2     (QK^T and AV over the full T x T square, as
                                               computed: the causal mask does not skip work),
  train(B, T) = 3 forward(B, T)                (the backward costs twice the forward).
Per algorithm: sft = train; dpo = train(2P, T) + forward(2P, T) for the reference (precomputed:
train only); grpo = generation + reference forward(B, T) + train(B, T), where generation =
forward(B, Tp) for the prompt plus, for each of the Tr - 1 fed-back tokens, 2 N B + 4 L H Dh B
(context length). Norms, softmax and the optimizer are not counted. Packed, forward(B, T) is
replaced by what the packed pass computes: the blocks over P rows of L = Tp + G Tr tokens, their
attention over the blocks a token sees (2 (N - V D) P L + 4 L H Dh P (Tp^2 + G Tr (Tp + Tr)):
the prompt's Tp x Tp square and each response's Tr x (Tp + Tr) block,
`models.attention.shared_prefix_attention`), and the output layer over the G (Tr + 1) response
views of each row (2 V D B (Tr + 1)); `model_flops` is that count (the work done), and
`model_flops_unpacked` the count above (the work TRL does) for comparison.

Two utilisations, both against the same peak:
  - `mfu`: `model_flops` (the work our step does) / seconds / peak.
  - `mfu_nominal`: `model_flops_unpacked` / seconds / peak: PaLM's per-token accounting applied to
    the sequences trained on (tokens/s x FLOPs per token of the unpacked batch), the figure to
    compare with MFUs quoted elsewhere and with TRL's (for TRL, which does the unpacked work, the two
    coincide). Issue 8's own estimate of the DPO step (about 78 GFLOP for 8 pairs x 128 tokens) is
    this count without attention. Without packing (`shared_prompt=False`) the two are equal.
`tokens_per_s` counts the tokens of the sequences trained on (sft B T, dpo 2P T, grpo B (Tp + Tr)).

MFU = model FLOPs / seconds / peak. CPU peak: the fastest float32 `size^3` matmul under XLA in the
same run (`bench.common.matmul_peak_flops`; PyTorch's is reported for context). GPU peak: the
spec-sheet dense bf16 figure of the device kind (`GPU_PEAK_FLOPS`, or `--config.peak_flops`);
there the benchmark runs the `gpu` section's model (Llama-3.2-1B shape, random init) SFT step.

TRL side (CPU, when torch + transformers + trl import): the same weights exported with
`rlhfjax.models.hf.save_pretrained` and loaded as `LlamaForCausalLM` in float32, a word-level
tokenizer whose word `t<i>` is token i (so the TRL datasets hold exactly our token ids), and
torch using as many threads as the CPU cores JAX uses.
  - DPO: `DPOTrainer` (sigmoid loss, beta as ours, gradient checkpointing off, reference model a
    second copy of the weights, or `precompute_ref_log_probs=True` for `dpo_precomputed`). The
    batch is collated once by TRL's own collator (outside the timing, as ours is built outside);
    timed: `trainer.training_step` (forward + backward) + `optimizer.step()` + `zero_grad()`.
  - GRPO: `GRPOTrainer` (no vLLM: generation through transformers `generate`, `num_generations`
    = G, `max_completion_length` = Tr with `min_new_tokens` = Tr so rows fill the budget as ours
    do, beta as ours so the reference forward runs on both sides). Timed: `training_step` on the
    P x G repeated prompt rows (generation, reward, reference log-probs, forward + backward) +
    `optimizer.step()` + `zero_grad()`. The reward is the same cheap function on both sides
    (fraction of even token ids).
Ours and TRL's calls are interleaved (`bench.common.interleaved_times`) so that load drift on a
shared machine hits both alike. `dpo_speedup_vs_trl` = TRL seconds / ours (reference on the fly),
`dpo_precomputed_speedup_vs_trl`, `grpo_speedup_vs_trl` likewise.

JSON keys: `tokens_per_s`, `mfu`, `mfu_nominal`, `seconds`, `model_flops` per algorithm (sft, dpo,
dpo_precomputed, grpo), `xla_flops` (XLA's `cost_analysis` count of each one-program step, a
check on the formula: it also counts norms, softmax and AdamW, so it is a few % above),
`grpo_phases` (median seconds of the iteration's generate / score / advantage / update phases),
`trl_seconds`, `trl_mfu` (of the unpacked work TRL does), the speedups, `peak_flops` (+ its
source), `torch_matmul_flops`, `device`, `threads`, `targets`, `meets_targets` and the
configuration.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from experiments import common
from experiments.bench import common as bench_common
from rlhfjax import sharding as shd
from rlhfjax.models import Transformer, TransformerConfig, get_config as named_config
from rlhfjax.sampling import SamplingConfig
from rlhfjax.train import objectives
from rlhfjax.train import optimizers
from rlhfjax.train import state as state_lib
from rlhfjax.train import steps as steps_lib
from rlhfjax.train.online import OnlineSettings, OnlineTrainer
from rlhfjax.train.rollout import Rollouts, programmatic_reward

ALGORITHMS = ("sft", "dpo", "dpo_precomputed", "grpo")

# Dense bf16 tensor-core peak FLOP/s by `jax.devices()[0].device_kind` substring (NVIDIA data
# sheets: H100 SXM 989.4 TFLOP/s, H200 the same die, A100 312 TFLOP/s). First match wins.
GPU_PEAK_FLOPS = (("H200", 989.4e12), ("H100", 989.4e12), ("A100", 312e12))

# The CPU targets (issue 8). The DPO MFU target is checked under both accountings (module
# doc): `dpo_mfu` counts the work our packed step does, `dpo_mfu_nominal` the unpacked work.
TARGETS = {"dpo_mfu": 0.7, "dpo_mfu_nominal": 0.7, "dpo_speedup_vs_trl": 0.9,
           "grpo_speedup_vs_trl": 1.5}
GPU_TARGETS = {"sft_mfu": 0.4}

PAD_ID, EOS_ID = 0, 1  # The word-level tokenizer's two special tokens; content ids start at 2.


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # The CPU model: the 4-layer, 256-wide Llama with a 2048-token vocabulary
      # (4.72M matmul parameters). `model_name` picks a named config instead.
      model=dict(vocab_size=2048, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                 head_dim=64, mlp_dim=1024),
      model_name="",
      # How a named model (`model_name`) runs: `TransformerConfig`'s runtime fields (defaults
      # here); on a GPU the `gpu` section's.
      model_overrides=dict(scan_layers=False, remat="none", attention_impl="xla"),
      compute_dtype="float32", param_dtype="float32",
      algorithms=ALGORITHMS,
      sft=dict(batch_size=16, seq_len=128),
      dpo=dict(pairs=8, prompt_len=64, response_len=64, beta=0.1),
      grpo=dict(prompts=4, group_size=4, prompt_len=32, max_new_tokens=64, beta=0.04),
      learning_rate=1e-6,
      # > 0: SFT and DPO log-probs from chunks of this many positions (`objectives`'
      # logits_chunk_size), never the whole [B, T, V] float32 logits.
      logits_chunk_size=0,
      shared_prompt=True,  # DPO and GRPO with shared-prompt packing (module doc).
      repeats=5, matmul_size=2048, matmul_repeats=5,
      peak_flops=0.0,  # > 0 overrides the measured / spec-sheet peak.
      compare_trl=True,
      num_devices=0,  # 0: every device JAX sees.
      # On a GPU: the ~1B SFT step of the GPU target.
      # scan + remat + cuDNN attention: without them 8 x 2048 does not fit an 80 GB H100.
      gpu=dict(model_name="llama3_2_1b", batch_size=8, seq_len=2048, compute_dtype="bfloat16",
               param_dtype="bfloat16", algorithms=("sft",), scan_layers=True,
               remat="dots_with_no_batch_dims_saveable", attention_impl="cudnn"),
      seed=0, run_dir=""))


# -- model FLOPs ---------------------------------------------------------------------------------


def matmul_params(cfg: TransformerConfig) -> int:
  """N: parameters that multiply activations in a matmul (blocks + LM head, no embedding/norms)."""
  attention = 2 * cfg.hidden_size * cfg.head_dim * (cfg.num_heads + cfg.num_kv_heads)
  return cfg.num_layers * (attention + 3 * cfg.hidden_size * cfg.mlp_dim) + (
      cfg.vocab_size * cfg.hidden_size)


def attention_flops(cfg: TransformerConfig, query_key_pairs: int) -> int:
  """4 L H Dh per query-key pair: QK^T and AV in every layer."""
  return 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * query_key_pairs


def forward_flops(cfg: TransformerConfig, batch: int, seq_len: int) -> int:
  """2 N B T + 4 L H Dh B T^2: one forward pass over B sequences of T tokens (module doc)."""
  return 2 * matmul_params(cfg) * batch * seq_len + attention_flops(cfg, batch * seq_len**2)


def packed_forward_flops(cfg: TransformerConfig, groups: int, group_size: int, prompt_len: int,
                         response_len: int) -> int:
  """The packed forward pass of P groups of G responses sharing a prompt (module doc)."""
  length = prompt_len + group_size * response_len
  head = cfg.vocab_size * cfg.hidden_size
  blocks = 2 * (matmul_params(cfg) - head) * groups * length
  pairs = prompt_len**2 + group_size * response_len * (prompt_len + response_len)
  return (blocks + attention_flops(cfg, groups * pairs)
          + 2 * head * groups * group_size * (response_len + 1))


def train_flops(cfg: TransformerConfig, batch: int, seq_len: int) -> int:
  """Forward + backward: 3 forward passes' FLOPs (the backward costs twice the forward)."""
  return 3 * forward_flops(cfg, batch, seq_len)


def generation_flops(cfg: TransformerConfig, batch: int, prompt_len: int, new_tokens: int) -> int:
  """Prefill of the prompt, then one token per step over a growing context (KV cache)."""
  per_token = 2 * matmul_params(cfg) * batch
  decode = sum(per_token + attention_flops(cfg, batch * (prompt_len + i + 1))
               for i in range(new_tokens - 1))
  return forward_flops(cfg, batch, prompt_len) + decode


def algorithm_flops(cfg: TransformerConfig, config: ml_collections.ConfigDict, *,
                    packed: bool) -> dict[str, int]:
  """Model FLOPs of one step / iteration of each algorithm (module doc), packed or not."""
  d, g = config.dpo, config.grpo
  seqs = g.prompts * g.group_size
  if packed:
    pairs = packed_forward_flops(cfg, d.pairs, 2, d.prompt_len, d.response_len)
    group = packed_forward_flops(cfg, g.prompts, g.group_size, g.prompt_len, g.max_new_tokens)
  else:
    pairs = forward_flops(cfg, 2 * d.pairs, d.prompt_len + d.response_len)
    group = forward_flops(cfg, seqs, g.prompt_len + g.max_new_tokens)
  return {
      "sft": train_flops(cfg, config.sft.batch_size, config.sft.seq_len),
      "dpo": 4 * pairs,  # train (3 forwards) + the reference's forward.
      "dpo_precomputed": 3 * pairs,
      "grpo": generation_flops(cfg, seqs, g.prompt_len, g.max_new_tokens) + 4 * group,
  }


def algorithm_tokens(config: ml_collections.ConfigDict) -> dict[str, int]:
  d, g = config.dpo, config.grpo
  pair_tokens = 2 * d.pairs * (d.prompt_len + d.response_len)
  return {"sft": config.sft.batch_size * config.sft.seq_len, "dpo": pair_tokens,
          "dpo_precomputed": pair_tokens,
          "grpo": g.prompts * g.group_size * (g.prompt_len + g.max_new_tokens)}


# -- data ----------------------------------------------------------------------------------------


def preference_ids(config: ml_collections.ConfigDict, vocab_size: int) -> dict[str, np.ndarray]:
  """Random prompt [P, Tp] and chosen / rejected responses [P, Tr] (each ending with EOS)."""
  d = config.dpo
  rng = np.random.default_rng(config.seed)
  draw = lambda n: rng.integers(EOS_ID + 1, vocab_size, size=(d.pairs, n))
  ids = {"prompt": draw(d.prompt_len), "chosen": draw(d.response_len),
         "rejected": draw(d.response_len)}
  for side in ("chosen", "rejected"):
    ids[side][:, -1] = EOS_ID
  return ids


def preference_batch(ids: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Our layout: `{side}_tokens`, `{side}_attention_mask`, `{side}_loss_mask` [P, Tp + Tr]."""
  batch = {}
  for side in ("chosen", "rejected"):
    tokens = np.concatenate([ids["prompt"], ids[side]], axis=1).astype(np.int32)
    loss_mask = np.zeros_like(tokens)
    loss_mask[:, ids["prompt"].shape[1]:] = 1
    batch.update({f"{side}_tokens": tokens, f"{side}_attention_mask": np.ones_like(tokens),
                  f"{side}_loss_mask": loss_mask})
  return batch


def even_fraction(prompt_tokens_BxTp, prompt_mask_BxTp, response_BxTr, response_mask_BxTr):
  """The GRPO benchmark's reward: fraction of even token ids in the response."""
  del prompt_tokens_BxTp, prompt_mask_BxTp
  even = (response_BxTr % 2 == 0) & (response_mask_BxTr != 0)
  return even.sum(-1) / jnp.maximum(response_mask_BxTr.sum(-1), 1)


# -- our steps -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
  """The model and everything our steps share."""
  cfg: TransformerConfig
  mesh: Any
  model_fn: Callable[[], Transformer]
  optimizer: Any
  logits_chunk_size: int = 0
  shared_prompt: bool = False

  @property
  def chunking(self) -> dict:
    """`logits_chunk_size` keyword of the objectives, when chunked log-probs are asked for."""
    return {"logits_chunk_size": self.logits_chunk_size} if self.logits_chunk_size else {}

  def train_state(self):
    return state_lib.init_train_state(self.model_fn, self.optimizer, self.mesh)

  def reference(self):
    """The reference: the same seeded initialisation as the policy, in its own buffers."""
    return state_lib.frozen_params(self.model_fn, self.mesh)[1]


def stepper(step, state, args: tuple) -> tuple[Callable[[], Any], float]:
  """(a zero-argument call that advances `state` (donated) by one step each time, XLA's FLOP count
  of the step): the step is compiled ahead of time for these arguments, once."""
  compiled = step.lower(state, *args).compile()
  box = [state]

  def call():
    box[0], metrics = compiled(box[0], *args)
    return metrics

  return call, float(compiled.cost_analysis()["flops"])


def sft_step(setup: Setup, config) -> tuple[Callable, Any, tuple]:
  """(jitted step, train state, the step's other arguments) of the SFT benchmark."""
  graphdef, state, shardings = setup.train_state()
  step = steps_lib.make_train_step(objectives.make_sft_loss(**setup.chunking), setup.optimizer,
                                   graphdef, setup.mesh, shardings)
  rng = np.random.default_rng(config.seed)
  shape = (config.sft.batch_size, config.sft.seq_len)
  tokens = rng.integers(EOS_ID + 1, setup.cfg.vocab_size, size=shape).astype(np.int32)
  batch = shd.shard_batch({"tokens": tokens, "attention_mask": np.ones_like(tokens),
                           "loss_mask": np.ones_like(tokens)}, setup.mesh)
  return step, state, (batch,)


def dpo_step(setup: Setup, config, precomputed: bool) -> tuple[Callable, Any, tuple]:
  """(jitted step, train state, the step's other arguments) of a DPO benchmark."""
  graphdef, state, shardings = setup.train_state()
  reference = setup.reference()
  batch = preference_batch(preference_ids(config, setup.cfg.vocab_size))
  loss_kwargs = {"beta": config.dpo.beta}
  shared = {}
  if setup.shared_prompt:
    shared = {"shared_prompt_len": config.dpo.prompt_len}
    objectives.check_shared_prompt_pairs(batch, config.dpo.prompt_len)
  if precomputed:
    reference_logps = jax.jit(lambda p, b: objectives.reference_logps(
        nnx.merge(graphdef, p), b, **shared, **setup.chunking))
    batch = {**batch, **jax.device_get(reference_logps(reference, batch))}
    loss = objectives.make_preference_loss("dpo", loss_kwargs, reference="precomputed",
                                           **shared, **setup.chunking)
    step = steps_lib.make_train_step(loss, setup.optimizer, graphdef, setup.mesh, shardings)
    return step, state, (shd.shard_batch(batch, setup.mesh),)
  loss = objectives.make_preference_loss("dpo", loss_kwargs, reference_graphdef=graphdef,
                                         **shared, **setup.chunking)
  step = steps_lib.make_train_step(loss, setup.optimizer, graphdef, setup.mesh, shardings,
                                   frozen_shardings=(shardings.params,))
  return step, state, (shd.shard_batch(batch, setup.mesh), reference)


def grpo_call(setup: Setup, config) -> Callable[[], Any]:
  """A zero-argument call running one GRPO iteration; each call's phase wall times
  (`OnlineTrainer.iterate`'s `*_s` metrics) are appended to its `phases` list."""
  g = config.grpo
  graphdef, state, shardings = setup.train_state()
  # EOS = vocab_size is never sampled: every row generates the whole budget.
  sampling = SamplingConfig(max_new_tokens=g.max_new_tokens, eos_id=setup.cfg.vocab_size,
                            pad_id=PAD_ID)
  rollouts = Rollouts(graphdef, sampling, mesh=setup.mesh, group_size=g.group_size,
                      reward=programmatic_reward(even_fraction), recompute_logprobs=False,
                      shared_prompt=setup.shared_prompt)
  trainer = OnlineTrainer(
      OnlineSettings("grpo", group_size=g.group_size, beta=g.beta, seed=config.seed), rollouts,
      mesh=setup.mesh, policy_graphdef=graphdef, optimizer=setup.optimizer,
      state_shardings=shardings, reference_params=setup.reference())
  rng = np.random.default_rng(config.seed + 1)
  tokens = rng.integers(EOS_ID + 1, setup.cfg.vocab_size, size=(g.prompts, g.prompt_len))
  prompts = shd.shard_batch({"prompt_tokens": tokens.astype(np.int32),
                             "prompt_mask": np.ones(tokens.shape, np.int32)}, setup.mesh)
  box = [trainer.init_state(state), 0]

  def call():
    box[0], metrics = trainer.iterate(box[0], prompts, jax.random.key(box[1]))
    box[1] += 1
    call.phases.append({k: float(v) for k, v in metrics.items() if k.endswith("_s")})
    return metrics

  call.phases = []
  return call


def our_calls(setup: Setup, config) -> tuple[dict[str, Callable[[], Any]], dict[str, float]]:
  """The timed calls, and XLA's FLOP count of each single-program step (sft, dpo)."""
  steps = {"sft": lambda: sft_step(setup, config),
           "dpo": lambda: dpo_step(setup, config, precomputed=False),
           "dpo_precomputed": lambda: dpo_step(setup, config, precomputed=True)}
  calls, xla_flops = {}, {}
  for name in config.algorithms:
    if name == "grpo":
      calls[name] = grpo_call(setup, config)
    else:
      calls[name], xla_flops[name] = stepper(*steps[name]())
  return calls, xla_flops


# -- TRL -----------------------------------------------------------------------------------------


def trl_available() -> bool:
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401
  except ImportError:
    return False
  return True


def word_tokenizer(vocab_size: int):
  """A transformers tokenizer whose word `t<i>` is token i (0 `<pad>`, 1 `<eos>`)."""
  import tokenizers
  import transformers

  vocab = {"<pad>": PAD_ID, "<eos>": EOS_ID, **{f"t{i}": i for i in range(EOS_ID + 1, vocab_size)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")


def words(ids) -> str:
  return " ".join(f"t{i}" for i in ids if i != EOS_ID)


class TRLSide:
  """TRL trainers on the same weights, data shapes and settings as ours (module doc)."""

  def __init__(self, graphdef, params, cfg: TransformerConfig, config, directory: str):
    import torch
    import transformers
    from rlhfjax.models import hf

    self.torch, self.transformers = torch, transformers
    self.config, self.cfg, self.directory = config, cfg, directory
    self.model_dir = os.path.join(directory, "model")
    hf.save_pretrained((graphdef, params), self.model_dir)
    self.tokenizer = word_tokenizer(cfg.vocab_size)

  def _model(self):
    model = self.transformers.LlamaForCausalLM.from_pretrained(self.model_dir,
                                                               dtype=self.torch.float32)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    return model

  def _common_args(self, name: str) -> dict:
    # Checkpointing off on both sides; transformers >= 5.x names it `activation_checkpointing`
    # (`gradient_checkpointing` is deprecated there).
    fields = {f.name for f in dataclasses.fields(self.transformers.TrainingArguments)}
    checkpointing = ("activation_checkpointing" if "activation_checkpointing" in fields
                     else "gradient_checkpointing")
    return {"output_dir": os.path.join(self.directory, name),
            "learning_rate": self.config.learning_rate, "max_grad_norm": 1.0, "weight_decay": 0.0,
            checkpointing: False, "bf16": False, "report_to": [], "use_cpu": True,
            "save_strategy": "no", "logging_steps": 10**9, "seed": self.config.seed,
            "dataloader_num_workers": 0}

  def _timed_step(self, trainer, inputs) -> Callable[[], Any]:
    """`training_step` + optimizer step + zero_grad, as the transformers Trainer loop runs them."""
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    trainer.current_gradient_accumulation_steps = 1  # What `Trainer.train` sets before its loop.
    model = trainer.model
    model.train()

    def call():
      loss = trainer.training_step(model, inputs, None)
      trainer.optimizer.step()
      trainer.lr_scheduler.step()
      model.zero_grad(set_to_none=True)
      return loss.item()

    return call

  def dpo(self, precomputed: bool) -> Callable[[], Any]:
    import datasets
    import trl

    ids = preference_ids(self.config, self.cfg.vocab_size)
    data = datasets.Dataset.from_dict({
        "prompt": [words(p) for p in ids["prompt"]],
        "chosen": [" " + words(c) for c in ids["chosen"]],
        "rejected": [" " + words(r) for r in ids["rejected"]]})
    args = trl.DPOConfig(**self._common_args("dpo"), per_device_train_batch_size=self.config.dpo.pairs,
                         beta=self.config.dpo.beta, loss_type=["sigmoid"], max_length=None,
                         precompute_ref_log_probs=precomputed)
    trainer = trl.DPOTrainer(model=self._model(), ref_model=None if precomputed else self._model(),
                             args=args, train_dataset=data, processing_class=self.tokenizer)
    inputs = next(iter(trainer.get_train_dataloader()))
    ours = preference_batch(ids)
    expected = np.concatenate([ours["chosen_tokens"], ours["rejected_tokens"]])
    # TRL's sampler shuffles the pairs: compare the rows as multisets.
    if sorted(map(tuple, inputs["input_ids"].tolist())) != sorted(map(tuple, expected.tolist())):
      raise RuntimeError("TRL's collated DPO batch differs from ours: the comparison is off")
    return self._timed_step(trainer, inputs)

  def grpo(self) -> Callable[[], Any]:
    import datasets
    import trl

    g = self.config.grpo
    rng = np.random.default_rng(self.config.seed + 1)
    tokens = rng.integers(EOS_ID + 1, self.cfg.vocab_size, size=(g.prompts, g.prompt_len))
    data = datasets.Dataset.from_dict({"prompt": [words(p) for p in tokens]})

    def reward(completion_ids, **kwargs):
      return [float(np.mean(np.asarray(c) % 2 == 0)) for c in completion_ids]

    args = trl.GRPOConfig(
        **self._common_args("grpo"), per_device_train_batch_size=g.prompts * g.group_size,
        num_generations=g.group_size, max_completion_length=g.max_new_tokens, beta=g.beta,
        temperature=1.0, top_k=0, top_p=1.0, use_vllm=False,
        generation_kwargs={"min_new_tokens": g.max_new_tokens}, log_completions=False)
    trainer = trl.GRPOTrainer(model=self._model(), reward_funcs=reward, args=args,
                              train_dataset=data, processing_class=self.tokenizer)
    rows = [{"prompt": words(p)} for p in tokens for _ in range(g.group_size)]
    return self._timed_step(trainer, rows)

  def calls(self, algorithms) -> dict[str, Callable[[], Any]]:
    builders = {"dpo": lambda: self.dpo(False), "dpo_precomputed": lambda: self.dpo(True),
                "grpo": self.grpo}
    return {name: builders[name]() for name in algorithms if name in builders}


# -- the benchmark -------------------------------------------------------------------------------


def gpu_peak(device_kind: str) -> float | None:
  for key, flops in GPU_PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return flops
  return None


def resolve(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, bool]:
  """On a GPU, the config with the `gpu` section's model, SFT shape and algorithms."""
  on_gpu = jax.default_backend() == "gpu"
  if on_gpu:
    config = ml_collections.ConfigDict(config.to_dict())
    g = config.gpu
    config.model_name, config.compute_dtype, config.param_dtype = (
        g.model_name, g.compute_dtype, g.param_dtype)
    config.model_overrides = dict(scan_layers=g.scan_layers, remat=g.remat,
                                  attention_impl=g.attention_impl)
    config.sft.batch_size, config.sft.seq_len = g.batch_size, g.seq_len
    config.algorithms = tuple(g.algorithms)
    config.compare_trl = False
  return config, on_gpu


def model_config(config) -> TransformerConfig:
  dtypes = dict(dtype=config.compute_dtype, param_dtype=config.param_dtype)
  if config.model_name:
    return named_config(config.model_name, **dtypes, **config.model_overrides)
  return TransformerConfig(**config.model.to_dict(), **dtypes)


def run(config) -> dict:
  unknown = sorted(set(config.algorithms) - set(ALGORITHMS))
  if unknown or not config.algorithms:
    raise ValueError(f"config.algorithms must be a non-empty subset of {ALGORITHMS}, got "
                     f"{config.algorithms}")
  if config.repeats < 2:
    raise ValueError(f"config.repeats must be >= 2 (the first call compiles), got "
                     f"{config.repeats}")
  config, on_gpu = resolve(config)
  run_dir = common.resolve_run_dir(config, "bench_train_step")
  cfg = model_config(config)
  devices = jax.devices()[:config.num_devices or None]
  mesh = shd.make_mesh(devices=devices)
  optimizer = optimizers.make_optimizer("adamw", config.learning_rate, clip_norm=1.0)
  setup = Setup(cfg, mesh, lambda: Transformer(cfg, rngs=nnx.Rngs(config.seed)), optimizer,
                config.logits_chunk_size, config.shared_prompt)
  threads = len(os.sched_getaffinity(0))

  device = devices[0]
  results: dict[str, Any] = {
      "device": f"{device.platform}:{device.device_kind}", "num_devices": len(devices),
      "threads": threads, "model": dataclasses.asdict(cfg),
      "matmul_params": matmul_params(cfg), "algorithms": list(config.algorithms),
      "flops_formula": "PaLM MFU: train 3 x (2 N T + 4 L H Dh T^2) per sequence, forward 1 x, "
                       "generation per processed token; see the module docstring"}
  if config.peak_flops > 0:
    results["peak_flops"], results["peak_source"] = float(config.peak_flops), "flag"
  elif on_gpu:
    peak = gpu_peak(device.device_kind)
    if peak is None:
      raise ValueError(f"no spec-sheet peak for GPU {device.device_kind!r}; pass "
                       "--config.peak_flops")
    results["peak_flops"], results["peak_source"] = peak, "spec sheet (dense bf16)"
  else:
    results["peak_flops"] = bench_common.matmul_peak_flops(config.matmul_size,
                                                           repeats=config.matmul_repeats)
    results["peak_source"] = f"XLA float32 {config.matmul_size}^3 matmul, best of " \
                             f"{config.matmul_repeats}"
  trl = config.compare_trl and not on_gpu and trl_available()
  if trl:
    import torch

    torch.set_num_threads(threads)
    results["torch_matmul_flops"] = bench_common.torch_matmul_peak_flops(
        config.matmul_size, repeats=config.matmul_repeats)

  calls, xla_flops = our_calls(setup, config)
  if trl:
    graphdef, params, _ = state_lib.frozen_params(setup.model_fn, mesh)
    with tempfile.TemporaryDirectory() as directory:
      side = TRLSide(graphdef, params, cfg, config, directory)
      trl_calls = side.calls(config.algorithms)
      calls.update({f"trl_{name}": call for name, call in trl_calls.items()})
      times = bench_common.interleaved_times(calls, config.repeats)
  else:
    times = bench_common.interleaved_times(calls, config.repeats)

  flops, tokens = algorithm_flops(cfg, config, packed=config.shared_prompt), algorithm_tokens(config)
  unpacked = algorithm_flops(cfg, config, packed=False)
  seconds = {name: bench_common.median_seconds(t) for name, t in times.items()}
  results.update(
      model_flops={a: flops[a] for a in config.algorithms},
      model_flops_unpacked={a: unpacked[a] for a in config.algorithms},
      # XLA's count of the compiled step (cost_analysis): matmuls + elementwise work + AdamW.
      xla_flops=xla_flops,
      seconds={a: seconds[a] for a in config.algorithms},
      tokens_per_s={a: tokens[a] / seconds[a] for a in config.algorithms},
      mfu={a: flops[a] / seconds[a] / results["peak_flops"] for a in config.algorithms},
      mfu_nominal={a: unpacked[a] / seconds[a] / results["peak_flops"]
                   for a in config.algorithms},
      trl=trl, trl_seconds={}, trl_mfu={})
  if "grpo" in calls:  # Median seconds of each phase, the compiling first call dropped.
    phases = calls["grpo"].phases
    results["grpo_phases"] = {k: bench_common.median_seconds([p[k] for p in phases])
                              for k in phases[0]}
  for a in config.algorithms:
    if f"trl_{a}" in seconds:
      results["trl_seconds"][a] = seconds[f"trl_{a}"]
      # TRL does the unpacked work: its MFU counts that (= its nominal MFU).
      results["trl_mfu"][a] = unpacked[a] / seconds[f"trl_{a}"] / results["peak_flops"]
      results[f"{a}_speedup_vs_trl"] = seconds[f"trl_{a}"] / seconds[a]
  targets = GPU_TARGETS if on_gpu else TARGETS
  measured = {"dpo_mfu": results["mfu"].get("dpo"), "sft_mfu": results["mfu"].get("sft"),
              "dpo_mfu_nominal": results["mfu_nominal"].get("dpo"),
              **{k: results.get(k) for k in TARGETS if k.endswith("_vs_trl")}}
  results["targets"] = targets
  results["meets_targets"] = {k: measured[k] is not None and measured[k] >= v
                              for k, v in targets.items()}
  results["config"] = config.to_dict()

  rows = [{"algorithm": a, "seconds": seconds[a], "tokens/s": results["tokens_per_s"][a],
           "GFLOP": flops[a] / 1e9, "GFLOP/s": flops[a] / seconds[a] / 1e9,
           "mfu": results["mfu"][a], "mfu nominal": results["mfu_nominal"][a],
           "trl seconds": results["trl_seconds"].get(a),
           "trl mfu": results["trl_mfu"].get(a), "speedup vs trl": results.get(f"{a}_speedup_vs_trl")}
          for a in config.algorithms]
  print(common.format_table(rows, list(rows[0])))
  torch_peak = results.get("torch_matmul_flops")
  print(f"device {results['device']}, peak {results['peak_flops'] / 1e9:.1f} GFLOP/s "
        f"({results['peak_source']})" + (f", torch matmul {torch_peak / 1e9:.1f} GFLOP/s"
                                         if torch_peak else ""))
  if "grpo_phases" in results:
    print("grpo phases (median s): " + ", ".join(
        f"{k.removesuffix('_s')} {v:.3f}" for k, v in results["grpo_phases"].items()))
  print(f"targets met: {results['meets_targets']}")
  common.write_json(os.path.join(run_dir, "results.json"), results)
  return results


if __name__ == "__main__":
  common.launch(run, get_config)
