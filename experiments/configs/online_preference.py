"""Online preference optimisation on the synthetic preference task: SFT on the tiny model, then one
online preference algorithm (`rlhfjax.train.online_preference`).

    python -m experiments.online_preference --config.online_preference.algorithm=nash_md_pg \
        --config.online_preference.judge=preference_model
"""

import ml_collections

from experiments.configs import base


def online_preference_config() -> ml_collections.ConfigDict:
  """Settings of `experiments.online_preference.run_online_preference` (every key declared)."""
  return ml_collections.ConfigDict(dict(
      # online_dpo | online_ipo | ipo_md | nash_md_pg | spin | inpo
      algorithm="online_dpo",
      # "gold": Bradley-Terry on the task's hidden gold reward at `judge_temperature` (the process
      # that labelled the offline pairs); "reward_model": Bradley-Terry on a reward model trained
      # on the pairs (`stages.run_reward_model`); "preference_model": the pairwise preference
      # model P(y > y' | x) trained on the pairs (`preference_model` below).
      judge="gold",
      judge_temperature=1.0,
      # "sampled" (a label drawn from the judge's p), "argmax", "probability" (soft labels,
      # online_ipo / ipo_md only), or "" for the algorithm's default (`DEFAULT_LABELS`: soft for
      # the IPO losses, sampled for the others).
      labels="",
      num_iterations=100, prompts_per_iteration=32, pairs_per_prompt=1, steps_per_iteration=1,
      temperature=1.0,
      # b of the Nash-MD geometric mixture pi^(1-b) mu^b (ipo_md, nash_md_pg; papers: 0.125).
      mixture_coef=0.125,
      # Iterations between refreshes of the previous iterate pi_t (spin, inpo).
      refresh_every=10,
      log_every=5, eval_every=25, progress=True,
      # Per-algorithm loss settings (`rlhfjax.train.online_preference.LOSS_DEFAULTS`), scaled for
      # log-ratios summed over the synthetic task's short responses (like `config.offline`).
      online_dpo=dict(beta=0.1), online_ipo=dict(tau=0.1), ipo_md=dict(tau=0.1),
      nash_md_pg=dict(tau=0.05), spin=dict(beta=0.1), inpo=dict(tau=0.05, eta=0.1),
      optimizer=base.optimizer_config(learning_rate=5e-4, warmup_steps=0),
      # The pairwise preference model (judge="preference_model"), trained from the SFT policy.
      preference_model=ml_collections.ConfigDict(dict(
          optimizer=base.optimizer_config(learning_rate=1e-3),
          loop=base.loop_config(num_steps=200, checkpoint_every=0))),
  ))


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.sft.loop.num_steps = 400
  config.sft.loop.eval_every = 200
  config.sft.loop.checkpoint_every = 200
  config.online_preference = online_preference_config()
  return config
