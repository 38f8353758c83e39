"""Offline preference optimisation losses (sequence level).

Inputs are per-sequence log-probabilities ``lp(y) = sum_t m_t lp_t`` (see `sequence_logprobs`) of
shape [B]; outputs are per-pair losses of shape [B], unreduced (optax convention). The implicit
reward margin of a pair is ``h = rho(y_w) - rho(y_l)`` with ``rho(y) = lp(y) - lp_ref(y)``.

Every loss is written in terms of `jax.nn.log_sigmoid` / `softplus` or polynomials of h, so values
and gradients stay finite for log-ratio differences of +-1e4. The reference log-probs are
stop-gradiented inside every loss (`log_ratio`): no loss trains the reference.
"""

import jax
import jax.numpy as jnp
import optax

from rlhfjax.losses import tokens as tok


def log_ratio(policy_logps, reference_logps):
  """``rho(y) = lp(y) - sg(lp_ref(y))``, the implicit reward (the reference is held fixed)."""
  return policy_logps - jax.lax.stop_gradient(reference_logps)


def log_ratio_margin(
    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
):
  """``h = rho(y_w) - rho(y_l)`` (`log_ratio`), shape [B]."""
  return (log_ratio(policy_chosen_logps, reference_chosen_logps)
          - log_ratio(policy_rejected_logps, reference_rejected_logps))


def _check_fraction(name, value, upper):
  """ValueError unless 0 <= value < upper (checked only for Python numbers, not traced arrays)."""
  if isinstance(value, (int, float)) and not 0.0 <= value < upper:
    raise ValueError(f"{name} must be in [0, {upper}), got {value}")


def _logistic(z):
  """``-log sigma(z)``, the DPO / Bradley-Terry loss of a scaled margin."""
  return -jax.nn.log_sigmoid(z)


def _squared(h, tau):
  """``(h - 1/(2 tau))^2``, the IPO loss of a margin."""
  return jnp.square(h - 1.0 / (2.0 * tau))


def dpo(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta=0.1,
):
  """Direct Preference Optimisation: ``L = -log sigma(beta h)``.

  At the population optimum with preference probability p, ``sigma(beta h*) = p``; on a bandit
  with Bradley-Terry data over all pairs the minimiser is ``pi* ∝ pi_ref exp(r / beta)``.

  Args:
    policy_chosen_logps: lp(y_w), shape [B].
    policy_rejected_logps: lp(y_l), shape [B].
    reference_chosen_logps: lp_ref(y_w), shape [B].
    reference_rejected_logps: lp_ref(y_l), shape [B].
    beta: inverse strength of the implicit KL regulariser.

  Returns:
    losses [B].

  References:
    Rafailov et al., arXiv 2305.18290, eq. 7.
  """
  h = log_ratio_margin(
      policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
  )
  return _logistic(beta * h)


def spin(
    policy_real_logps,
    policy_generated_logps,
    previous_real_logps,
    previous_generated_logps,
    *,
    beta=0.1,
):
  """Self-Play fIne-tuNing: DPO with the SFT target as y_w, a self-generated y_l, and the previous
  iterate as the reference.

  ``L = -log sigma(beta [(lp(y) - lp_t(y)) - (lp(y') - lp_t(y'))])`` with y the SFT target,
  ``y' ~ pi_t`` and pi_t the previous iterate (frozen). A thin wrapper over `dpo`; the iteration
  (regenerate y', replace the reference) belongs to the training loop. SPIN's lambda is beta here.

  Args:
    policy_real_logps: lp(y) of the SFT target under the trained policy, [B].
    policy_generated_logps: lp(y') of the previous iterate's sample, [B].
    previous_real_logps: lp_t(y) under the previous iterate, [B].
    previous_generated_logps: lp_t(y'), [B].
    beta: as in DPO (paper: 0.1).

  Returns:
    losses [B].

  References:
    Chen et al., "Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models",
    arXiv 2401.01335, eq. 4.7 with the logistic loss.
  """
  return dpo(
      policy_real_logps,
      policy_generated_logps,
      previous_real_logps,
      previous_generated_logps,
      beta=beta,
  )


def ipo(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    tau=0.1,
    length_normalize=False,
    chosen_lengths=None,
    rejected_lengths=None,
):
  """Identity Preference Optimisation: ``L = (h - 1/(2 tau))^2``.

  Regressing h onto a fixed target keeps it bounded even for deterministic preferences; with both
  label directions present in frequencies p and 1 - p the optimum is ``h* = (2p - 1)/(2 tau)``.

  Args:
    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
      summed sequence log-probs, [B].
    tau: regularisation strength (the target margin is 1/(2 tau)).
    length_normalize: if True use per-token log-ratios ``rho(y)/|y|`` (as some libraries do); the
      paper uses summed log-ratios (the default).
    chosen_lengths, rejected_lengths: |y_w|, |y_l| (number of response tokens), [B]; required when
      length_normalize.

  Returns:
    losses [B].

  References:
    Azar et al., "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    arXiv 2310.12036, eq. 17 (empirical IPO).
  """
  rho_w = log_ratio(policy_chosen_logps, reference_chosen_logps)
  rho_l = log_ratio(policy_rejected_logps, reference_rejected_logps)
  if length_normalize:
    if chosen_lengths is None or rejected_lengths is None:
      raise ValueError("ipo with length_normalize=True needs chosen_lengths and rejected_lengths")
    rho_w = rho_w / chosen_lengths
    rho_l = rho_l / rejected_lengths
  elif chosen_lengths is not None or rejected_lengths is not None:
    raise ValueError("ipo got chosen_lengths/rejected_lengths without length_normalize=True")
  return _squared(rho_w - rho_l, tau)


def slic(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta=0.1,
    lam=0.0,
    sft_logps=None,
):
  """Sequence likelihood calibration (hinge): ``L = max(0, 1 - beta h) - lam lp(y_ref)``.

  The calibration term is GPO's hinge on beta h. SLiC-HF is reference-free with margin delta:
  ``max(0, delta - lp(y_w) + lp(y_l))``; pass zero reference log-probs and beta = 1/delta to get
  it up to the constant factor beta. The optional regulariser is the NLL of a target y_ref (the
  SFT target in SLiC-HF) under the policy.

  Args:
    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
      sequence log-probs, [B].
    beta: inverse margin.
    lam: weight of the regulariser (0 disables it).
    sft_logps: lp(y_ref) under the policy, [B]; defaults to policy_chosen_logps.

  Returns:
    losses [B].

  References:
    Zhao et al., "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", arXiv 2305.10425,
    eq. 1; Tang et al., arXiv 2402.05749 (hinge GPO).
  """
  h = log_ratio_margin(
      policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
  )
  loss = jax.nn.relu(1.0 - beta * h)
  if sft_logps is None:
    sft_logps = policy_chosen_logps
  return loss - lam * sft_logps


def cdpo(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta=0.1,
    label_smoothing=0.0,
):
  """Conservative DPO (label smoothing eps).

  ``L = (1 - eps)(-log sigma(beta h)) + eps(-log sigma(-beta h))``: binary cross-entropy with the
  label 1 - eps. Optimum: ``sigma(beta h*) = (1 - 2 eps) p + eps``.

  Args:
    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
      sequence log-probs, [B].
    beta: as in DPO.
    label_smoothing: eps in [0, 0.5).

  Returns:
    losses [B].

  References:
    Mitchell, "A note on DPO with noisy preferences and relationship to IPO" (2023), cDPO.
  """
  _check_fraction("label_smoothing", label_smoothing, 0.5)
  h = log_ratio_margin(
      policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
  )
  return optax.losses.sigmoid_binary_cross_entropy(beta * h, 1.0 - label_smoothing)


def robust_dpo(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta=0.1,
    label_noise=0.0,
):
  """Robust DPO: an unbiased DPO loss under labels flipped with known rate eps.

  ``L = [(1 - eps)(-log sigma(beta h)) - eps(-log sigma(-beta h))] / (1 - 2 eps)``. Averaged over
  the label noise (the pair kept with probability 1 - eps, swapped with probability eps) it equals
  the clean DPO loss exactly. It is not bounded below for eps > 0 (a single example can be driven
  to -inf); only its expectation is a proper loss.

  Args:
    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
      sequence log-probs, [B].
    beta: as in DPO.
    label_noise: flip rate eps in [0, 0.5).

  Returns:
    losses [B].

  References:
    Chowdhury, Kini, Natarajan, "Provably Robust DPO", arXiv 2403.00409, eq. 9.
  """
  _check_fraction("label_noise", label_noise, 0.5)
  h = log_ratio_margin(
      policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
  )
  eps = label_noise
  return ((1.0 - eps) * _logistic(beta * h) - eps * _logistic(-beta * h)) / (1.0 - 2.0 * eps)


def rpo(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta=0.1,
    eta=1.0,
    chosen_lengths=None,
):
  """Regularised preference optimisation: DPO plus an SFT (NLL) term on the chosen response.

  ``L = -log sigma(beta h) + eta NLL(y_w)`` with ``NLL(y_w) = -lp(y_w)``, or ``-lp(y_w)/|y_w|``
  when `chosen_lengths` is given (the per-token NLL used by Iterative RPO / TRL's ``rpo_alpha``).
  eta = 0 is DPO.

  Note: Liu et al. write the SFT weight as ``eta * beta``; pass ``eta = eta_paper * beta`` to match
  their parameterisation (unverified in their code).

  Args:
    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
      sequence log-probs, [B].
    beta: as in DPO.
    eta: weight of the NLL term.
    chosen_lengths: |y_w| in tokens, [B], to length-normalise the NLL; None keeps the sum.

  Returns:
    losses [B].

  References:
    Liu et al., "Provably Mitigating Overoptimization in RLHF: Your SFT Loss is Implicitly an
    Adversarial Regularizer", arXiv 2405.16436 (RPO); Pang et al., arXiv 2404.19733.
  """
  nll = -policy_chosen_logps
  if chosen_lengths is not None:
    nll = nll / chosen_lengths
  loss = dpo(
      policy_chosen_logps,
      policy_rejected_logps,
      reference_chosen_logps,
      reference_rejected_logps,
      beta=beta,
  )
  return loss + eta * nll


def _group_margin(
    policy_chosen_logps_BxG,
    policy_rejected_logps_BxG,
    reference_chosen_logps_BxG,
    reference_rejected_logps_BxG,
    chosen_mask_BxG,
    rejected_mask_BxG,
):
  """``mean_i rho(y_w^i) - mean_j rho(y_l^j)`` over the valid members of each group, [B]."""
  rho_w = log_ratio(policy_chosen_logps_BxG, reference_chosen_logps_BxG)
  rho_l = log_ratio(policy_rejected_logps_BxG, reference_rejected_logps_BxG)
  if chosen_mask_BxG is None:
    chosen_mask_BxG = jnp.ones(rho_w.shape)
  if rejected_mask_BxG is None:
    rejected_mask_BxG = jnp.ones(rho_l.shape)
  if rho_w.ndim != 2 or rho_l.ndim != 2:
    raise ValueError(
        f"group losses expect [B, G] log-probs per side, got {rho_w.shape} and {rho_l.shape}"
    )
  return tok.masked_mean(rho_w, chosen_mask_BxG, axis=-1) - tok.masked_mean(
      rho_l, rejected_mask_BxG, axis=-1
  )


def mdpo(
    policy_chosen_logps_BxG,
    policy_rejected_logps_BxG,
    reference_chosen_logps_BxG,
    reference_rejected_logps_BxG,
    *,
    beta=0.1,
    chosen_mask_BxG=None,
    rejected_mask_BxG=None,
):
  """Multi-sample DPO: DPO on the mean log-ratio of a group of responses per side.

  ``L = -log sigma(beta [mean_i rho(y_w^i) - mean_j rho(y_l^j)])``, each group carrying one label.
  This uses the mean of log-ratios (a geometric mean of the likelihood ratios); the paper's exact
  group-level estimator is unverified. With G = 1 it is `dpo`; it is invariant to permuting the
  members of a group.

  Args:
    policy_chosen_logps_BxG, policy_rejected_logps_BxG: sequence log-probs of the chosen and
      rejected groups (group sizes may differ between the sides).
    reference_chosen_logps_BxG, reference_rejected_logps_BxG: the same under the reference.
    beta: as in DPO.
    chosen_mask_BxG, rejected_mask_BxG: optional validity masks for groups of variable size.

  Returns:
    losses [B].

  References:
    Wang et al., "Preference Optimization with Multi-Sample Comparisons", arXiv 2410.12138.
  """
  h = _group_margin(
      policy_chosen_logps_BxG,
      policy_rejected_logps_BxG,
      reference_chosen_logps_BxG,
      reference_rejected_logps_BxG,
      chosen_mask_BxG,
      rejected_mask_BxG,
  )
  return _logistic(beta * h)


def mipo(
    policy_chosen_logps_BxG,
    policy_rejected_logps_BxG,
    reference_chosen_logps_BxG,
    reference_rejected_logps_BxG,
    *,
    tau=0.1,
    chosen_mask_BxG=None,
    rejected_mask_BxG=None,
):
  """Multi-sample IPO: ``L = (mean_i rho(y_w^i) - mean_j rho(y_l^j) - 1/(2 tau))^2``.

  The squared analogue of `mdpo` (same group estimator, same caveats); G = 1 gives `ipo`.

  Args:
    As `mdpo`, with tau as in `ipo`.

  Returns:
    losses [B].

  References:
    Wang et al., arXiv 2410.12138.
  """
  h = _group_margin(
      policy_chosen_logps_BxG,
      policy_rejected_logps_BxG,
      reference_chosen_logps_BxG,
      reference_rejected_logps_BxG,
      chosen_mask_BxG,
      rejected_mask_BxG,
  )
  return _squared(h, tau)


def simpo(
    policy_chosen_logps,
    policy_rejected_logps,
    chosen_lengths,
    rejected_lengths,
    *,
    beta=2.0,
    gamma=1.0,
):
  """Simple Preference Optimisation (reference-free, length-normalised, with a target margin).

  ``L = -log sigma(beta lp(y_w)/|y_w| - beta lp(y_l)/|y_l| - gamma)``.

  Args:
    policy_chosen_logps, policy_rejected_logps: summed sequence log-probs under the policy, [B]
      (no reference model).
    chosen_lengths, rejected_lengths: |y_w|, |y_l| in tokens, [B].
    beta: reward scale (paper: 2.0 to 2.5).
    gamma: target reward margin (paper's configs set gamma / beta of about 0.5; default here
      1.0 = 0.5 * 2.0).

  Returns:
    losses [B].

  References:
    Meng, Xia, Chen, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    arXiv 2405.14734, eq. 6.
  """
  margin = policy_chosen_logps / chosen_lengths - policy_rejected_logps / rejected_lengths
  return _logistic(beta * margin - gamma)


def _log1mexp(a):
  """``log(1 - exp(a))`` for a < 0, stable at both ends (Maechler 2012)."""
  near_zero = a > -jnp.log(2.0)
  # Each branch only sees inputs in its own safe range, so neither side produces inf or NaN
  # (jnp.where would otherwise propagate NaN gradients from the branch it discards).
  a_near = jnp.where(near_zero, a, -1.0)
  a_far = jnp.where(near_zero, -1.0, a)
  return jnp.where(near_zero, jnp.log(-jnp.expm1(a_near)), jnp.log1p(-jnp.exp(a_far)))


# ORPO's odds need P(y) < 1; cap the mean token log-prob just below 0 so log-odds stay finite.
_ORPO_MAX_MEAN_LOGP = -1e-6


def orpo(
    policy_chosen_logps,
    policy_rejected_logps,
    chosen_lengths,
    rejected_lengths,
    *,
    lam=0.1,
):
  """Odds-Ratio Preference Optimisation: SFT NLL plus an odds-ratio term (reference-free).

  With length-normalised log-probs ``a(y) = lp(y)/|y|`` (so ``P(y) = exp a(y)``) and
  ``log odds(y) = a(y) - log(1 - exp a(y))``:
  ``L = -a(y_w) - lam log sigma(log odds(y_w) - log odds(y_l))``.

  The NLL here is the chosen response's mean per-token NLL, per pair (the paper averages the SFT
  loss over tokens of the chosen response). a(y) is capped at -1e-6 so the odds stay finite when
  a response has probability ~1.

  Args:
    policy_chosen_logps, policy_rejected_logps: summed sequence log-probs under the policy (<= 0),
      [B].
    chosen_lengths, rejected_lengths: |y_w|, |y_l| in tokens, [B].
    lam: weight of the odds-ratio term (paper: 0.1; TRL calls it beta).

  Returns:
    losses [B].

  References:
    Hong, Lee, Thorne, "ORPO: Monolithic Preference Optimization without Reference Model",
    arXiv 2403.07691, eqs. 6-7.
  """
  a_w = jnp.minimum(policy_chosen_logps / chosen_lengths, _ORPO_MAX_MEAN_LOGP)
  a_l = jnp.minimum(policy_rejected_logps / rejected_lengths, _ORPO_MAX_MEAN_LOGP)
  log_odds_ratio = (a_w - _log1mexp(a_w)) - (a_l - _log1mexp(a_l))
  return -a_w + lam * _logistic(log_odds_ratio)
