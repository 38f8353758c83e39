"""The Nash / DeRa notebook runs end to end (small) and its printed checks hold."""

import re

from tests.notebooks import run_notebook


def _printed(outputs, label):
  """The number printed after `label = `."""
  match = re.search(re.escape(label) + r" = ([-+0-9.e]+)", outputs)
  assert match, f"{label!r} not printed"
  return float(match.group(1))


def test_nash_and_dera_notebook_runs():
  nb = run_notebook("nash_and_dera.ipynb", env={"RLHFJAX_NOTEBOOK_STEPS": "800",
                                                 "RLHFJAX_NOTEBOOK_ONLINE_ITERS": "3"})
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  # Two actions, P(1 > 2) = 0.7: Nash sigma(0.2) = 0.5498, RLHF 0.7 (ALGORITHMS.md section 5).
  assert abs(_printed(outputs, "Nash pi_1 at tau=1") - 0.5498) < 1e-3
  assert abs(_printed(outputs, "RLHF pi_1 at tau=1") - 0.7) < 1e-3
  # Nash-MD with decreasing rates reaches the Nash policy; RLHF and DPO agree and miss it.
  assert _printed(outputs, "KL(pi*, Nash-MD last iterate)") < 1e-4
  assert _printed(outputs, "TV(rlhf, nash)") > 0.1
  assert _printed(outputs, "TV(dpo, rlhf)") < 1e-2
  # Online IPO and INPO are stationary at the Nash policy, online IPO not at the reference.
  assert _printed(outputs, "max |online IPO gradient at pi*|") < 1e-5
  assert _printed(outputs, "max |online IPO gradient at mu|") > 1e-2
  assert _printed(outputs, "max |INPO gradient at pi_t = pi*|") < 1e-5
  # DeRa is exact on a bandit; RSO approaches its target, and is best-of-n as beta -> 0.
  assert _printed(outputs, "max |DeRa mixture - retrained|") < 1e-6
  assert _printed(outputs, "TV(RSO accepted, target)") < 0.03
  assert _printed(outputs, "TV(pi_sft, target)") > 0.1
  assert _printed(outputs, "RSO with beta -> 0 equals best-of-n") == 1
  # Online IPO on a tiny transformer runs its iterations; rewards are digit fractions.
  assert _printed(outputs, "online IPO iterations") == 3
  for label in ("first iteration", "last 5 iterations"):
    assert 0 <= _printed(outputs, f"digit fraction of policy samples, {label}") <= 1
