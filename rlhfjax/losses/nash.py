"""Losses of preference games (Nash learning from human feedback), sequence level.

Every loss takes per-sequence log-probabilities ``lp(y) = sum_t m_t lp_t`` [B] of responses
sampled online and the preference probabilities ``P(y > y')`` [B] that a preference model (or a
judge) assigns to the sampled pairs, and returns per-example losses [B], unreduced. They run no
model and no sampler: the online loop samples y from the policy and y' from the policy, the
reference or their geometric mixture (`rlhfjax.sampling.SamplingConfig.mixture_weights`), scores
the pairs, and hands the arrays here. ``rho(y) = lp(y) - lp_ref(y)``.
"""

import jax

from rlhfjax.losses.preference import ipo


def nash_md_pg(policy_logps, reference_logps, preference_probs, *, tau=0.008):
  """Nash-MD policy-gradient surrogate: ``L = -lp(y) sg[P(y > y') - 1/2 - tau rho(y)]``.

  y is sampled from the policy pi and y' from the geometric mixture
  ``pi^mu ∝ pi^(1-b) mu^b`` (per token, `processors.geometric_mixture`). The gradient is
  ``-grad lp(y) [P(y > y') - 1/2 - tau rho(y)]``, an unbiased estimate of
  ``-grad_theta [P(pi_theta > pi^mu) - tau KL(pi_theta || mu)]`` (mixture held fixed): the score
  function of the win rate against the mixture, with baseline 1/2, and of the KL, whose
  ``grad E[log pi]`` term vanishes. The stop-gradient covers the whole advantage, rho included.
  The loss value itself is a surrogate (only its gradient is meaningful).

  Args:
    policy_logps: lp(y) summed over the response tokens of y ~ pi, shape [B].
    reference_logps: lp_ref(y), shape [B].
    preference_probs: P(y > y') for the sampled opponent y', shape [B].
    tau: KL regularisation (paper: 0.008).

  Returns:
    losses [B].

  References:
    Munos et al., "Nash Learning from Human Feedback", arXiv 2312.00886 (Nash-MD-PG; the
    experiments use tau = 0.008 and mixture coefficients b in [0.125, 0.375]).
  """
  rho = policy_logps - reference_logps
  advantage = jax.lax.stop_gradient(preference_probs - 0.5 - tau * rho)
  return -policy_logps * advantage


def online_ipo(
    policy_logps_1,
    policy_logps_2,
    reference_logps_1,
    reference_logps_2,
    preference_probs,
    *,
    tau=1.0,
):
  """Online IPO / IPO-MD: the IPO loss on a sampled pair, weighted by both label directions.

  ``L = p (h - 1/(2 tau))^2 + (1 - p) (-h - 1/(2 tau))^2`` with ``h = rho(y_1) - rho(y_2)`` and
  ``p = P(y_1 > y_2)``, which equals ``(h - (p - 1/2)/tau)^2`` plus a term free of h. With both
  responses sampled from sg(pi) (online IPO) its population stationary point satisfies
  ``rho(y) - E_pi[rho] = (P(y > pi) - 1/2) / tau``, i.e. the regularised Nash policy
  ``pi ∝ mu exp(P(y > pi) / tau)``. IPO-MD is the same loss on pairs sampled from the geometric
  mixture ``pi^(1-b) mu^b`` instead (paper: b = 0.125); the sampler decides, not the loss.

  Args:
    policy_logps_1, policy_logps_2: lp(y_1), lp(y_2), shape [B].
    reference_logps_1, reference_logps_2: lp_ref(y_1), lp_ref(y_2), shape [B].
    preference_probs: p = P(y_1 > y_2), shape [B] (a preference model's probability, or a 0/1
      label).
    tau: regularisation (paper: 1.0).

  Returns:
    losses [B].

  References:
    Calandriello et al., "Human Alignment of Large Language Models through Online Preference
    Optimisation", arXiv 2403.08635 (online IPO, IPO-MD); Azar et al., arXiv
    2310.12036, eq. 17 (the IPO loss, `rlhfjax.losses.ipo`).
  """
  first_wins = ipo(policy_logps_1, policy_logps_2, reference_logps_1, reference_logps_2, tau=tau)
  second_wins = ipo(policy_logps_2, policy_logps_1, reference_logps_2, reference_logps_1, tau=tau)
  return preference_probs * first_wins + (1.0 - preference_probs) * second_wins


def inpo(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    previous_chosen_logps,
    previous_rejected_logps,
    *,
    tau=0.05,
    eta=0.1,
):
  """Iterative Nash Policy Optimisation: IPO against a geometric reference.

  ``L = (log pi(y_w)/pi(y_l) - (tau/eta) log mu(y_w)/mu(y_l)
         - (1 - tau/eta) log pi_t(y_w)/pi_t(y_l) - 1/(2 eta))^2``

  where pi_t is the previous iterate (which sampled the pair) and mu the reference. This is
  `ipo` with tau -> eta and the reference log-probs replaced by those of the geometric mixture
  ``(tau/eta) lp_ref + (1 - tau/eta) lp_t``. Notation (our reading of the paper): eta is the
  *inverse* learning rate of online mirror descent, so the population minimiser over pairs from
  pi_t labelled by P is the OMD step

      pi_{t+1}(y) ∝ pi_t(y)^(1 - tau/eta) mu(y)^(tau/eta) exp(P(y > pi_t) / eta),

  whose fixed point is the regularised Nash policy ``pi ∝ mu exp(P(y > pi) / tau)``. Both facts
  are checked on a bandit in the tests. Needs ``tau <= eta`` for a convex combination.

  Args:
    policy_chosen_logps, policy_rejected_logps: lp(y_w), lp(y_l) under the policy, [B].
    reference_chosen_logps, reference_rejected_logps: lp_ref (mu), [B].
    previous_chosen_logps, previous_rejected_logps: lp_t under the previous iterate, [B].
    tau: KL regularisation toward mu (0.05, the trainer's `LOSS_DEFAULTS`; at tau = eta the
      previous iterate gets no weight and the loss is IPO against mu).
    eta: inverse learning rate of the mirror-descent step (> 0).

  Returns:
    losses [B].

  References:
    Zhang et al., "Iterative Nash Policy Optimization", arXiv 2407.00617 (the INPO loss;
    notation unverified, see above). ALGORITHMS.md section 5.
  """
  if isinstance(eta, (int, float)) and not eta > 0:
    raise ValueError(f"eta must be positive, got {eta}")
  if isinstance(tau, (int, float)) and isinstance(eta, (int, float)) and not 0 <= tau <= eta:
    raise ValueError(f"inpo needs 0 <= tau <= eta, got tau={tau}, eta={eta}")
  weight = tau / eta
  geometric_chosen = weight * reference_chosen_logps + (1.0 - weight) * previous_chosen_logps
  geometric_rejected = weight * reference_rejected_logps + (1.0 - weight) * previous_rejected_logps
  return ipo(policy_chosen_logps, policy_rejected_logps, geometric_chosen, geometric_rejected,
             tau=eta)

