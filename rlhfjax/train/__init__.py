"""Training: train state and sharded initialisation, the generic jit step, objectives (losses that
run a model), optimizers, the resumable loop, checkpoints, metrics, evaluation, and online RL
(rollouts and the `OnlineTrainer`).

Submodules depend one way: state <- steps, checkpoint, metrics <- loop <- online; objectives and
rollout <- online. None of them imports this package's namespace, so importing a submodule
directly (`rlhfjax.train.state`) and importing `rlhfjax.train` both work without cycles.
"""

from rlhfjax.train.checkpoint import Checkpointer
from rlhfjax.train.evaluation import evaluate
from rlhfjax.train.evaluation import score_samples
from rlhfjax.train.evaluation import win_rate
from rlhfjax.train.loop import LoopSettings
from rlhfjax.train.loop import run_loop
from rlhfjax.train.loop import train
from rlhfjax.train.metrics import MetricsWriter
from rlhfjax.train.metrics import plot_panels
from rlhfjax.train.metrics import read_jsonl
from rlhfjax.train.objectives import PG_ALGORITHMS
from rlhfjax.train.objectives import PREFERENCE_LOSSES
from rlhfjax.train.objectives import SFT_LOSSES
from rlhfjax.train.objectives import check_preference_loss
from rlhfjax.train.objectives import make_pairwise_preference_loss
from rlhfjax.train.objectives import make_policy_gradient_loss
from rlhfjax.train.objectives import make_preference_loss
from rlhfjax.train.objectives import make_reward_model_loss
from rlhfjax.train.objectives import make_sft_loss
from rlhfjax.train.objectives import make_value_loss
from rlhfjax.train.online import CriticSetup
from rlhfjax.train.online import OnlineSettings
from rlhfjax.train.online import OnlineState
from rlhfjax.train.online import OnlineTrainer
from rlhfjax.train.online import group_minibatches
from rlhfjax.train.online import prepare_batch
from rlhfjax.train.online import train_online
from rlhfjax.train.online_preference import OnlinePreferenceTrainer
from rlhfjax.train.online_preference import PreferenceSettings
from rlhfjax.train.online_preference import bradley_terry_judge
from rlhfjax.train.online_preference import make_online_preference_loss
from rlhfjax.train.online_preference import preference_model_judge
from rlhfjax.train.optimizers import OPTIMIZERS
from rlhfjax.train.optimizers import learning_rate_schedule
from rlhfjax.train.optimizers import make_optimizer
from rlhfjax.train.rollout import Rollout
from rlhfjax.train.rollout import Rollouts
from rlhfjax.train.rollout import ensemble_reward
from rlhfjax.train.rollout import programmatic_reward
from rlhfjax.train.rollout import reward_model_reward
from rlhfjax.train.state import TrainState
from rlhfjax.train.state import abstract_model
from rlhfjax.train.state import frozen_params
from rlhfjax.train.state import init_train_state
from rlhfjax.train.state import merge_params
from rlhfjax.train.state import state_from_params
from rlhfjax.train.state import state_shardings
from rlhfjax.train.steps import interleave_micro_batches
from rlhfjax.train.steps import make_eval_step
from rlhfjax.train.steps import make_train_step
from rlhfjax.train.steps import split_micro_batches

__all__ = [
    "OnlinePreferenceTrainer",
    "PreferenceSettings",
    "bradley_terry_judge",
    "make_online_preference_loss",
    "preference_model_judge",
    "Checkpointer",
    "CriticSetup",
    "LoopSettings",
    "MetricsWriter",
    "OPTIMIZERS",
    "OnlineSettings",
    "OnlineState",
    "OnlineTrainer",
    "PG_ALGORITHMS",
    "PREFERENCE_LOSSES",
    "Rollout",
    "Rollouts",
    "SFT_LOSSES",
    "TrainState",
    "abstract_model",
    "check_preference_loss",
    "ensemble_reward",
    "evaluate",
    "frozen_params",
    "group_minibatches",
    "init_train_state",
    "interleave_micro_batches",
    "learning_rate_schedule",
    "make_eval_step",
    "make_optimizer",
    "make_pairwise_preference_loss",
    "make_policy_gradient_loss",
    "make_preference_loss",
    "make_reward_model_loss",
    "make_sft_loss",
    "make_train_step",
    "make_value_loss",
    "merge_params",
    "plot_panels",
    "prepare_batch",
    "programmatic_reward",
    "read_jsonl",
    "reward_model_reward",
    "run_loop",
    "score_samples",
    "split_micro_batches",
    "state_from_params",
    "state_shardings",
    "train",
    "train_online",
    "win_rate",
]
