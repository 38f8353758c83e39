"""DeRa on the synthetic preference task: one aligned model decoded at several lambdas against
models retrained at beta / lambda.

Overrides the base config; every key this experiment adds is declared in `config.dera`. The
aligned model is `config.offline` with `config.dera.loss` (its strength: DPO's beta or IPO's tau).
"""

import ml_collections

from experiments.configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.sft.loop.num_steps = 400
  config.sft.loop.eval_every = 0
  # Several policies train into sub-directories of one run; nothing to resume.
  config.sft.loop.checkpoint_every = 0
  config.offline.loop.checkpoint_every = 0
  config.dera = ml_collections.ConfigDict(dict(
      # "dpo" (strength beta) or "ipo" (strength tau); the aligned model uses config.offline's.
      loss="dpo",
      # DeRa decodes softmax(lam z_aligned + (1 - lam) z_sft): 0 is the SFT policy, 1 the aligned
      # model, > 1 extrapolates (Liu et al., arXiv 2402.02992).
      lams=(0.0, 0.5, 1.0, 1.5, 2.0),
      # Models trained separately at strength / lam, the exact counterpart on a bandit.
      retrained_lams=(0.5, 2.0),
  ))
  return config
