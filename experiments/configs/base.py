"""Base configuration shared by every experiment; experiments override it, never copy it."""

import dataclasses

import ml_collections

from rlhfjax.data import PreferenceTaskConfig, VerifiableTaskConfig


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
  """Settings of `rlhfjax.train.optimizers.make_optimizer` (every key declared here)."""
  config = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=3e-3, warmup_steps=20, b1=0.9, b2=0.99, eps=1e-8,
      weight_decay=0.0, clip_norm=1.0, accumulation_steps=1))
  config.update(overrides)
  return config


def loop_config(**overrides) -> ml_collections.ConfigDict:
  """Settings of `rlhfjax.train.loop.LoopSettings` plus the batch size."""
  config = ml_collections.ConfigDict(dict(
      num_steps=300, batch_size=64, log_every=10, eval_every=0, checkpoint_every=100,
      max_to_keep=2, progress=True))
  config.update(overrides)
  return config


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Where the run writes; empty means `runs/<experiment>-<timestamp>`. Pass an existing run
  # directory to resume it from its last checkpoint.
  config.run_dir = ""
  # Where prepared TFDS datasets are cached (shared across runs).
  config.data_dir = "runs/data"
  config.model = "tiny"
  config.compute_dtype = "float32"  # or "bfloat16" (parameters stay float32)
  # Log-probs / cross-entropy over the vocabulary: None computes the full float32 [B, T, V]
  # logits; an int C computes them C positions at a time (`objectives.token_stats`).
  config.logits_chunk_size = ml_collections.config_dict.placeholder(int)
  # DPO pairs and online groups share their prompt: run it once per pair / group
  # (`rlhfjax.train.packing`; same objective, fewer FLOPs).
  config.shared_prompt = True
  # Online rollouts with recomputed log-probs score the policy and the reference in one vmapped
  # pass (`Rollouts(fuse_forward=True)`); off by default, no faster on a CPU.
  config.fuse_forward = False
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Sequence slots shared by both synthetic tasks: prompt left-padded, response right-padded.
  config.prompt_len = 9
  config.response_len = 9
  config.verifiable = ml_collections.ConfigDict(dataclasses.asdict(
      VerifiableTaskConfig(num_train=4096, num_test=256, min_digits=3, max_digits=6)))
  config.preference = ml_collections.ConfigDict(dataclasses.asdict(
      PreferenceTaskConfig(num_sft=4096, num_pairs=4096, num_test=256)))
  config.sft = ml_collections.ConfigDict(dict(
      loss="cross_entropy", gem_beta=0.7, gem_h="logsigmoid", aggregation="token_mean",
      optimizer=optimizer_config(), loop=loop_config()))
  config.reward_model = ml_collections.ConfigDict(dict(
      margin=0.0, center_coef=0.0, eval_fraction=0.1,
      optimizer=optimizer_config(learning_rate=1e-3), loop=loop_config(num_steps=200)))
  # Offline preference optimisation: `loss` picks one of the per-loss settings below.
  config.offline = ml_collections.ConfigDict(dict(
      loss="dpo", reference="on_the_fly",
      dpo=dict(beta=0.1), ipo=dict(tau=0.1, length_normalize=False), slic=dict(beta=0.1, lam=0.0),
      cdpo=dict(beta=0.1, label_smoothing=0.1), robust_dpo=dict(beta=0.1, label_noise=0.1),
      gpo=dict(beta=0.1, convex="logistic"), rpo=dict(beta=0.1, eta=1.0), spin=dict(beta=0.1),
      simpo=dict(beta=2.0, gamma=1.0), orpo=dict(lam=0.1),
      optimizer=optimizer_config(learning_rate=5e-4), loop=loop_config(num_steps=150)))
  config.eval = ml_collections.ConfigDict(dict(num_prompts=256, temperature=1.0))
  config.online = online_config()
  return config


def online_config() -> ml_collections.ConfigDict:
  """Online RL (`experiments.stages.run_online`): `algorithm` picks one of the per-algorithm
  settings below (split by `rlhfjax.train.online.OnlineSettings.from_algorithm_config` into the
  KL coefficient `beta`, the loss's and the advantage estimator's settings)."""
  return ml_collections.ConfigDict(dict(
      algorithm="grpo",
      # "verifiable" (digit task, exact-match reward) or "preference" (letters task).
      task="verifiable",
      # "programmatic" (verifiable task), "gold" (the preference task's hidden reward),
      # "reward_model" (trained by `run_reward_model`), "ensemble" (`ensemble_size` of them).
      reward_source="programmatic",
      ensemble_size=3, ensemble_mode="mean", ensemble_lam=1.0,
      num_iterations=100, prompts_per_iteration=16, group_size=4, num_epochs=1,
      num_minibatches=1, temperature=1.0, missing_eos_penalty=0.0, recompute_logprobs=True,
      # Adaptive KL controller: a target sequence KL > 0 turns it on; 0 keeps beta fixed.
      kl_target=0.0, kl_horizon=10_000.0,
      # "kl", or preference matching ("pm", "conditional_pm") for reward-penalty algorithms.
      regularizer="kl", pm_alpha=0.5,
      log_every=5, eval_every=25, checkpoint_every=0, progress=True,
      # Per-algorithm settings (defaults of `objectives.PG_LOSS_DEFAULTS` and
      # `online.ADVANTAGE_DEFAULTS`, from the papers).
      reinforce=dict(beta=0.05, baseline="batch_mean", mode="seq_mean_token_sum"),
      remax=dict(beta=0.05, gamma=1.0, clip=5.0, mode="token_mean"),
      rloo=dict(beta=0.05, mode="seq_mean_token_sum"),
      grpo=dict(beta=0.04, eps_lo=0.2, eps_hi=0.2, mode="seq_mean_token_mean", std_eps=1e-6),
      dr_grpo=dict(beta=0.04, eps_lo=0.2, eps_hi=0.2),
      dapo=dict(eps_lo=0.2, eps_hi=0.28, mode="token_mean", std_eps=1e-6, dynamic_sampling=True,
                overlong_cache_len=0),
      bnpo=dict(beta=0.04, eps_lo=0.2, eps_hi=0.2, mode="seq_mean_token_mean", r_min=0.0,
                r_max=1.0),
      reinforce_pp=dict(beta=0.05, eps=0.2, mode="token_mean", gamma=1.0),
      ppo=dict(beta=0.05, eps=0.2, mode="token_mean", gamma=1.0, lam=0.95, whiten=True,
               eps_v=0.2),
      copg=dict(beta=0.1),
      topr=dict(beta=0.05, mode="seq_mean_token_sum", baseline="group_mean"),
      # Component rewards are the task's rewards named in `components` ("accuracy" on the
      # verifiable task, "gold_reward" on the preference task), one threshold each.
      constrained=dict(beta=0.05, eps=0.2, mode="token_mean", baseline="group_mean",
                       components=("accuracy",), thresholds=(0.9,), dual_lr=0.5),
      optimizer=optimizer_config(learning_rate=3e-4, warmup_steps=0),
      critic_optimizer=optimizer_config(learning_rate=1e-3, warmup_steps=0)))
