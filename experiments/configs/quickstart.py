"""Quick start: the built-in synthetic tasks end to end on the tiny model, on a CPU in minutes."""

import ml_collections

from experiments.configs import base


def get_config():
  config = base.get_config()
  config.sft.loop.num_steps = 400
  config.sft.loop.eval_every = 100
  config.sft.loop.checkpoint_every = 200
  config.reward_model.loop.num_steps = 200
  config.reward_model.loop.eval_every = 100
  config.offline.loop.num_steps = 150
  config.offline.loop.eval_every = 50
  # ReMax and GRPO on the verifiable task's exact-match reward (`experiments.stages.run_online`),
  # 16 prompts x 4 samples per iteration: compiling and evaluating cost more than the iterations.
  config.online.num_iterations = 100
  config.online.eval_every = 50
  config.online.checkpoint_every = 50
  config.quickstart = ml_collections.ConfigDict(dict(
      offline_losses=("dpo", "ipo"), online_algorithms=("remax", "grpo")))
  return config
