"""The online-versus-offline gap on the synthetic preference task: online IPO and online DPO
against offline DPO on the same budget of judged pairs and gradient steps.

`config.gap` sets the shared budget (steps x pairs per step) and evaluation cadence; every other
setting is `config.offline`'s (offline DPO) and `config.online_preference`'s (online methods),
whose optimizer is the offline one so that only the data differ.
"""

import ml_collections

from experiments.configs import base
from experiments.configs import online_preference


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.sft.loop.num_steps = 400
  config.sft.loop.eval_every = 0
  # Several policies train into sub-directories of one run; nothing to resume.
  config.sft.loop.checkpoint_every = 0
  config.offline.loop.checkpoint_every = 0
  config.online_preference = online_preference.online_preference_config()
  op = config.online_preference
  # The online judge labels pairs the way the offline pairs were labelled: Bradley-Terry on the
  # gold reward at the task's label temperature.
  op.judge = "gold"
  op.judge_temperature = config.preference.get_ref("temperature")
  op.optimizer = config.offline.optimizer
  op.online_dpo.beta = config.offline.dpo.get_ref("beta")
  op.online_ipo.tau = config.offline.ipo.get_ref("tau")
  config.gap = ml_collections.ConfigDict(dict(
      # Online methods compared with offline DPO (any of rlhfjax.train.online_preference's).
      methods=("online_ipo", "online_dpo"),
      # The budget: gradient steps, each on `pairs_per_step` judged pairs (offline: labelled
      # pairs of the dataset; online: pairs sampled from the current policy and judged).
      num_steps=150, pairs_per_step=32, eval_every=25,
  ))
  return config
