"""Test configuration: 8 simulated CPU devices, set before JAX is imported; and the order and
grouping of the suite's tests over pytest-xdist workers."""

import os

import pytest

# LLVM's backend optimisation off: the suite's programs are small and mostly compiled once, so
# compiling them faster saves more than their slower code costs (suite CPU time 2721 -> 1736 s).
# XLA:CPU aborts the process when a collective's participant is late (40 s by default); two
# workers' 8 simulated devices each on a 2-core CI machine can starve one that long, so the tests
# allow 10 minutes for the rendezvous and the collective (a true deadlock still fails, later).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    + " --xla_cpu_collective_call_terminate_timeout_seconds=600"
    + " --xla_cpu_collective_timeout_seconds=600"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Modules whose tests share an expensive module-scoped run: with pytest-xdist, each goes to one
# worker as a whole, so that run happens once.
SHARED_RUN_MODULES = (
    "test_reproduce_preference_synthetic.py",
    "test_reproduce_dera.py",
    "test_reproduce_online_offline.py",
    "test_reproduce_games.py",
    "test_reproduce_preference.py",
    "test_real_runs.py",
    "test_multihost.py",
    "test_pairwise_preference.py",
    "test_online.py",  # `ppo_runs` (functools.cache): seven tests read one PPO run.
)
# The slowest tests (a module: all its tests), slowest first. They start first: a long test started
# last keeps one worker busy while the other idles.
SLOW_FIRST = (
    "test_quickstart.py::test_quickstart_writes_run_directory",
    "test_reproduce_preference_synthetic.py",
    "test_reproduce_dera.py",
    "test_reproduce_online_offline.py",
    "test_online_preference_experiment.py::test_runs_nash_md_pg_with_the_preference_model",
    "test_colab_online_rl.py::test_online_rl_notebook_runs",
    "test_online_experiments.py::test_online_rl_writes_run_directory",
    "test_multihost.py",
    "test_real_runs.py",
    "test_online.py",
    "test_colab_nash_and_dera.py::test_nash_and_dera_notebook_runs",
    "test_online_preference.py::test_one_device_equals_eight_devices",
)


def _module(nodeid: str) -> str:
  return nodeid.split("::")[0].split("/")[-1]


def _rank(item) -> int:
  """Position of `item` (or its module) in `SLOW_FIRST`; `len(SLOW_FIRST)` if in neither."""
  module = _module(item.nodeid)
  name = module + "::" + item.nodeid.split("::")[-1].split("[")[0]
  for key in (name, module):
    if key in SLOW_FIRST:
      return SLOW_FIRST.index(key)
  return len(SLOW_FIRST)


def pytest_collection_modifyitems(items):
  items.sort(key=_rank)  # Stable: every other test keeps its collection order.


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """`-n N` (`--dist load`): tests are sent one at a time in collection order, except that the
  tests of a `SHARED_RUN_MODULES` module go to one worker together (xdist's `loadgroup` would do
  this, but pytest 9 ignores the node ids it rewrites)."""
  if config.option.dist != "load":
    return None
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=import-outside-toplevel

  class SharedRunScheduling(LoadScopeScheduling):

    def _split_scope(self, nodeid):
      return nodeid.split("::")[0] if _module(nodeid) in SHARED_RUN_MODULES else nodeid

  config.option.loadscopereorder = False  # Keep the slow-first order.
  return SharedRunScheduling(config, log)
