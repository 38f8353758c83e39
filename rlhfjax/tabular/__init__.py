"""Exact tabular (bandit) solutions: ground truth for preference-learning tests and demos."""

from rlhfjax.tabular.bandit import bt_preference_matrix
from rlhfjax.tabular.bandit import expected_policy_gradient_loss
from rlhfjax.tabular.bandit import gpo_optimal_margin
from rlhfjax.tabular.bandit import implicit_rewards
from rlhfjax.tabular.bandit import ipo_optimum
from rlhfjax.tabular.bandit import kl_regularized_optimum
from rlhfjax.tabular.bandit import minimize
from rlhfjax.tabular.bandit import minimize_scalar
from rlhfjax.tabular.bandit import noisy_preferences
from rlhfjax.tabular.bandit import pairwise_margins
from rlhfjax.tabular.bandit import population_loss
from rlhfjax.tabular.bandit import uniform_pair_weights
from rlhfjax.tabular.nash import nash_equilibrium
from rlhfjax.tabular.nash import nash_md_iterates
from rlhfjax.tabular.nash import nash_md_learning_rates
from rlhfjax.tabular.nash import preference_matching_optimum
from rlhfjax.tabular.nash import win_rates
