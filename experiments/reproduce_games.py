"""Reproduces three claims about preference games and decoding-time alignment, exactly (tabular).

    python -m experiments.reproduce_games [--json PATH] [--config.game.tau=0.5]

1. Nash learning from human feedback (Munos et al., arXiv 2312.00886): on a non-transitive game
   (rock-paper-scissors plus a weak fourth action, a reference that favours rock) tabular Nash-MD
   converges to the regularised Nash policy `pi* ∝ mu exp(P(y > pi*) / tau)` (found by
   `tabular.nash_equilibrium`), within the paper's bound `KL(pi*, pi_{t+1}) <= (1 - eta tau)
   KL(pi*, pi_t) + 2 eta^2` at every step; the RLHF optimum (Bradley-Terry reward fitted to P,
   then `mu exp(r / tau)`) and DPO's population optimum (beta = tau) coincide with each other and
   differ from it: a Bradley-Terry reward sees rock, paper and scissors as equals and keeps the
   reference's bias toward rock, which paper exploits; the Nash policy corrects it.
2. The two-action example of ALGORITHMS.md section 5: P(1 > 2) = 0.7, uniform reference. Nash
   `pi_1 = sigma(0.2 / tau)` (0.550 at tau = 1) against RLHF / DPO `sigma(logit(0.7) / tau)`.
3. DeRa (Liu et al., arXiv 2402.02992) is exact on a one-step bandit: the lambda-mixture of the
   reference and the policy aligned at beta is the policy aligned at beta / lambda, for every
   lambda including extrapolation (lambda > 1), so the mixtures trace the same reward-KL frontier
   as retraining.

The synthetic-task DeRa sweep (lambda against separately trained DPO models) is
`experiments.reproduce_dera`; the online-versus-offline gap is `experiments.reproduce_online_offline`.

Writes to the run directory: `config.json`, `results.json` (also copied to `--json PATH`) and
`reproduce_games.png`, and prints one table per claim.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from experiments.configs import reproduce_games as reproduce_config
from rlhfjax import losses
from rlhfjax import sampling
from rlhfjax import tabular


def _check_config(config) -> None:
  """ValueError naming the first invalid key."""
  game, two, dera = config.game, config.two_action, config.dera
  p = np.asarray(game.preference, np.float64)
  mu = np.asarray(game.reference, np.float64)
  square = p.ndim == 2 and p.shape[0] == p.shape[1] >= 2
  checks = [
      ("game.preference", square and np.allclose(p + p.T, 1.0) and np.all((p >= 0) & (p <= 1))),
      ("game.reference", mu.shape == p.shape[:1] and np.all(mu > 0)
       and abs(mu.sum() - 1.0) < 1e-6),
      ("game.tau", game.tau > 0),
      ("game.eta", game.eta > 0 and game.eta * game.tau <= 1.0),
      ("game.num_steps", game.num_steps >= 10),
      ("game.learning_rate", game.learning_rate > 0),
      ("game.fit_steps", game.fit_steps > 0),
      ("two_action.preference", 0.5 < two.preference < 1.0),
      ("two_action.taus", len(two.taus) > 0 and all(t > 0 for t in two.taus)),
      ("two_action.num_steps", two.num_steps > 0),
      ("dera.num_actions", dera.num_actions >= 2),
      ("dera.beta", dera.beta > 0),
      ("dera.lams", len(dera.lams) > 0 and all(lam >= 0 for lam in dera.lams)),
  ]
  for key, ok in checks:
    if not ok:
      section, name = key.split(".")
      raise ValueError(f"invalid config.{key}: {config[section][name]!r}")


def _kl(p, q) -> np.ndarray:
  """KL(p || q) over the last axis, in float64; actions with p = 0 contribute nothing."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  safe_p = np.where(p > 0, p, 1.0)
  return np.sum(np.where(p > 0, p * (np.log(safe_p) - np.log(q)), 0.0), axis=-1)


def _tv(p, q) -> float:
  return float(0.5 * np.sum(np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64))))


@functools.partial(jax.jit, static_argnames=("num_steps",))
def fit_bradley_terry(preference, learning_rate, *, num_steps):
  """Maximum-likelihood Bradley-Terry rewards r [A] for P, every ordered pair equally often.

  `population_loss` with the BT loss on its "log-probabilities" log_softmax(theta): rewards are
  defined up to a constant, so the softmax shift changes nothing.
  """
  num_actions = preference.shape[0]
  uniform = jnp.full((num_actions,), 1.0 / num_actions)
  bt = lambda r_w, r_l, _, __: losses.bradley_terry(r_w, r_l)
  objective = lambda t: tabular.population_loss(bt, t, uniform, preference)
  theta = tabular.minimize(objective, jnp.zeros(num_actions),
                           optimizer=optax.sgd(learning_rate), num_steps=num_steps)
  reward = jax.nn.log_softmax(theta)
  return reward - jnp.mean(reward)


@functools.partial(jax.jit, static_argnames=("num_steps",))
def dpo_optimum(preference, reference, beta, learning_rate, *, num_steps):
  """DPO's population optimum (every ordered pair, labels from P), by gradient descent.

  The step is learning_rate / beta^2: DPO depends on theta only through beta h, so this is plain
  gradient descent in beta * theta (conditioning independent of beta).
  """
  loss_fn = functools.partial(losses.dpo, beta=beta)
  objective = lambda t: tabular.population_loss(loss_fn, t, reference, preference)
  theta = tabular.minimize(objective, jnp.log(reference),
                           optimizer=optax.sgd(learning_rate / beta**2), num_steps=num_steps)
  return jax.nn.softmax(theta)


def _checkpoints(num_steps: int) -> list[int]:
  """Roughly log-spaced steps 0 .. num_steps for the convergence curves."""
  return sorted({0, *np.unique(np.geomspace(1, num_steps, 40).astype(int)).tolist()})


def run_game(cfg) -> dict:
  """Claim 1: Nash-MD -> Nash policy; RLHF and DPO optima elsewhere."""
  preference = jnp.asarray(cfg.preference, jnp.float32)
  reference = jnp.asarray(cfg.reference, jnp.float32)
  tau, eta, num_steps = cfg.tau, cfg.eta, cfg.num_steps
  nash = tabular.nash_equilibrium(preference, reference, tau)
  z = np.log(np.asarray(reference, np.float64)) + np.asarray(preference, np.float64) @ np.asarray(
      nash, np.float64) / tau
  residual = float(np.max(np.abs(np.exp(z - z.max()) / np.exp(z - z.max()).sum() - nash)))

  constant = np.asarray(tabular.nash_md_iterates(preference, reference, tau, eta, num_steps))
  decreasing = np.asarray(tabular.nash_md_iterates(
      preference, reference, tau, tabular.nash_md_learning_rates(tau, num_steps), num_steps))
  kl_constant, kl_decreasing = _kl(nash, constant), _kl(nash, decreasing)
  # The paper's one-step bound, at every step of the constant-rate run.
  bound_gap = kl_constant[1:] - ((1 - eta * tau) * kl_constant[:-1] + 2 * eta**2)
  steps = _checkpoints(num_steps)

  reward = fit_bradley_terry(preference, cfg.learning_rate, num_steps=cfg.fit_steps)
  rlhf = tabular.kl_regularized_optimum(reward, reference, tau)
  dpo = dpo_optimum(preference, reference, tau, cfg.learning_rate, num_steps=cfg.fit_steps)
  policies = {"reference": reference, "nash": nash, "nash_md_last": decreasing[-1],
              "rlhf": rlhf, "dpo": dpo}
  rows = []
  for name, pi in policies.items():
    win = np.asarray(tabular.win_rates(preference, pi))
    rows.append({
        "policy": name, "probs": np.asarray(pi).tolist(),
        "tv_to_nash": _tv(pi, nash),
        # How well the best single response does against pi (1/2 at an unexploitable policy).
        "best_response_win_rate": float(win.max()),
        # P(pi* > pi): the Nash policy's win rate against pi (>= 1/2 up to regularisation).
        "nash_win_rate": float(np.asarray(nash) @ np.asarray(preference) @ np.asarray(pi)),
    })
  return {
      "tau": tau, "eta": eta, "num_steps": num_steps, "nash": np.asarray(nash).tolist(),
      "fixed_point_residual": residual, "bt_reward": np.asarray(reward).tolist(),
      "steps": steps,
      "kl_constant_eta": kl_constant[steps].tolist(),
      "kl_decreasing_eta": kl_decreasing[steps].tolist(),
      "bound_constant_eta": ((1 - eta * tau) ** np.asarray(steps) * kl_constant[0]
                             + 2 * eta / tau).tolist(),
      "bound_decreasing_eta": [None] + [8.0 / (tau**2 * (t + 1)) for t in steps[1:]],
      "max_one_step_bound_gap": float(bound_gap.max()),
      "final_kl_constant_eta": float(kl_constant[-1]),
      "final_kl_decreasing_eta": float(kl_decreasing[-1]),
      "rlhf_vs_dpo_tv": _tv(rlhf, dpo),
      "policies": rows,
  }


def run_two_action(cfg) -> dict:
  """Claim 2: pi_1 of the Nash, Nash-MD, RLHF and DPO solutions against the closed forms."""
  p = cfg.preference
  preference = jnp.array([[0.5, p], [1.0 - p, 0.5]])
  reference = jnp.array([0.5, 0.5])
  logit = float(jax.scipy.special.logit(p))
  rows = []
  num_steps = cfg.num_steps
  for tau in cfg.taus:
    nash_md = tabular.nash_md_iterates(preference, reference, tau,
                                       tabular.nash_md_learning_rates(tau, num_steps), num_steps)
    rlhf = tabular.kl_regularized_optimum(jnp.array([logit, 0.0]), reference, tau)
    rows.append({
        "tau": tau,
        "nash": float(tabular.nash_equilibrium(preference, reference, tau)[0]),
        "nash_closed_form": float(jax.nn.sigmoid((p - 0.5) / tau)),
        "nash_md": float(nash_md[-1, 0]),
        "rlhf": float(rlhf[0]),
        "dpo": float(dpo_optimum(preference, reference, tau, 1.0, num_steps=num_steps)[0]),
        "rlhf_closed_form": float(jax.nn.sigmoid(logit / tau)),
    })
  return {"preference": p, "rows": rows}


def run_dera(cfg, seed: int) -> dict:
  """Claim 3: DeRa mixtures against the policies retrained at beta / lambda."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  reward = jax.random.normal(k1, (cfg.num_actions,))
  reference = jax.nn.softmax(jax.random.normal(k2, (cfg.num_actions,)))
  aligned = tabular.kl_regularized_optimum(reward, reference, cfg.beta)

  def summary(pi):
    return float(pi @ reward), float(_kl(pi, reference))

  rows = []
  for lam in cfg.lams:
    mixture = jax.nn.softmax(sampling.dera_logits(jnp.log(aligned), jnp.log(reference), lam))
    retrained = (reference if lam == 0
                 else tabular.kl_regularized_optimum(reward, reference, cfg.beta / lam))
    r, kl = summary(mixture)
    rows.append({"lam": lam, "effective_beta": None if lam == 0 else cfg.beta / lam,
                 "reward": r, "kl": kl,
                 "max_abs_error": float(jnp.max(jnp.abs(mixture - retrained)))})
  # The reward-KL frontier of retrained policies, for the plot.
  betas = np.geomspace(cfg.beta / 20, cfg.beta * 20, 60)
  frontier = [summary(tabular.kl_regularized_optimum(reward, reference, float(b)))
              for b in betas]
  return {"beta": cfg.beta, "rows": rows, "frontier_reward": [f[0] for f in frontier],
          "frontier_kl": [f[1] for f in frontier]}


def plot(results: dict, path: str) -> str:
  """Saves one PNG: Nash-MD convergence, the policies, the two-action curves, the DeRa frontier."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
  game = results["game"]
  ax = axes[0]
  steps = np.asarray(game["steps"])
  ax.plot(steps[1:], game["kl_constant_eta"][1:], "-", label=f"constant eta={game['eta']}")
  ax.plot(steps[1:], game["kl_decreasing_eta"][1:], "-", label="eta_t = 2/(tau(t+2))")
  ax.plot(steps[1:], game["bound_constant_eta"][1:], "--", lw=0.8, label="bound (constant)")
  ax.plot(steps[1:], game["bound_decreasing_eta"][1:], ":", lw=0.8, label="bound 8/(tau^2(T+1))")
  ax.set(xscale="log", yscale="log", xlabel="Nash-MD step", ylabel="KL(pi*, pi_t)",
         title=f"Nash-MD on RPS + 1, tau={game['tau']}")
  ax.legend(fontsize=7)

  ax = axes[1]
  names = [r["policy"] for r in game["policies"]]
  probs = np.asarray([r["probs"] for r in game["policies"]])
  width = 0.8 / len(names)
  for k, name in enumerate(names):
    ax.bar(np.arange(probs.shape[1]) + k * width, probs[k], width, label=name)
  ax.set(xticks=np.arange(probs.shape[1]) + 0.4 - width / 2, xlabel="action",
         ylabel="probability", title="Nash vs RLHF / DPO optima")
  ax.set_xticklabels(["rock", "paper", "scissors", "weak"][:probs.shape[1]]
                     if probs.shape[1] == 4 else range(probs.shape[1]))
  ax.legend(fontsize=7)

  two = results["two_action"]
  ax = axes[2]
  taus = np.geomspace(min(r["tau"] for r in two["rows"]) / 2, max(r["tau"] for r in two["rows"])
                      * 2, 100)
  p = two["preference"]
  ax.plot(taus, 1 / (1 + np.exp(-(p - 0.5) / taus)), "-", label="Nash sigma((p-1/2)/tau)")
  ax.plot(taus, 1 / (1 + np.exp(-np.log(p / (1 - p)) / taus)), "-",
          label="RLHF/DPO sigma(logit p/tau)")
  rows = two["rows"]
  ax.plot([r["tau"] for r in rows], [r["nash"] for r in rows], "o", label="Nash solver")
  ax.plot([r["tau"] for r in rows], [r["nash_md"] for r in rows], "x", label="Nash-MD")
  ax.plot([r["tau"] for r in rows], [r["dpo"] for r in rows], "s", mfc="none", label="DPO")
  ax.set(xscale="log", xlabel="tau (= beta)", ylabel="pi(action 1)",
         title=f"Two actions, P(1 > 2) = {p}")
  ax.legend(fontsize=7)

  dera = results["dera"]
  ax = axes[3]
  ax.plot(dera["frontier_kl"], dera["frontier_reward"], "-", color="gray",
          label="retrained at beta'")
  for row in dera["rows"]:
    ax.plot(row["kl"], row["reward"], "o", label=f"DeRa lambda={row['lam']}")
  ax.set(xlabel="KL(pi || pi_ref)", ylabel="expected reward",
         title=f"DeRa mixtures of pi_ref and pi_beta (beta={dera['beta']})")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _sci(x: float) -> str:
  return f"{x:.1e}"


def tables(results: dict) -> str:
  """The three claims as plain-text tables."""
  game = results["game"]
  out = [f"1. Non-transitive game (tau = {game['tau']}): fixed-point residual of the Nash solver "
         f"{_sci(game['fixed_point_residual'])}; KL(pi*, Nash-MD last iterate) = "
         f"{_sci(game['final_kl_decreasing_eta'])} (eta_t = 2/(tau(t+2))), "
         f"{_sci(game['final_kl_constant_eta'])} (eta = {game['eta']}); max gap to the one-step "
         f"bound {_sci(game['max_one_step_bound_gap'])} (<= 0 holds)"]
  rows = [{"policy": r["policy"], "probs": "(" + ", ".join(f"{v:.3f}" for v in r["probs"]) + ")",
           "tv_to_nash": r["tv_to_nash"], "best_response_win_rate": r["best_response_win_rate"],
           "nash_win_rate": r["nash_win_rate"]} for r in game["policies"]]
  out.append(common.format_table(rows, ["policy", "probs", "tv_to_nash",
                                        "best_response_win_rate", "nash_win_rate"]))
  two = results["two_action"]
  out += ["", f"2. Two actions, P(1 > 2) = {two['preference']}, uniform reference: pi(action 1)",
          common.format_table(two["rows"], ["tau", "nash", "nash_closed_form", "nash_md", "rlhf",
                                            "dpo", "rlhf_closed_form"])]
  dera = results["dera"]
  rows = [{**r, "max_abs_error": _sci(r["max_abs_error"])} for r in dera["rows"]]
  out += ["", f"3. DeRa on a bandit: mixture of pi_ref and pi_beta (beta = {dera['beta']}) vs the "
          "policy retrained at beta / lambda",
          common.format_table(rows, ["lam", "effective_beta", "reward", "kl", "max_abs_error"])]
  return "\n".join(out)


def run(config) -> dict:
  """Runs the three tabular reproductions; returns (and writes) the results."""
  _check_config(config)
  t_start = time.perf_counter()
  run_dir = common.resolve_run_dir(config, "reproduce_games")
  results = {
      "run_dir": run_dir,
      "game": run_game(config.game),
      "two_action": run_two_action(config.two_action),
      "dera": run_dera(config.dera, config.seed),
  }
  results["plot"] = plot(results, os.path.join(run_dir, "reproduce_games.png"))
  results["total_s"] = time.perf_counter() - t_start
  return common.write_report(results, "results.json", tables(results))


if __name__ == "__main__":
  common.launch(run, reproduce_config.get_config)
