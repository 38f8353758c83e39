"""Compiler options per backend: on CPU the library's compiled programs carry no YNNPACK fusion."""

import types

import jax
import numpy as np
import optax
from flax import nnx

from rlhfjax import sharding as shd
from rlhfjax import xla_options
from rlhfjax.train import state as state_lib
from rlhfjax.train import steps as steps_lib
from tests.train.toy import ToyLM, toy_batch, toy_loss


def _fake_mesh(platform):
  device = types.SimpleNamespace(platform=platform)
  return types.SimpleNamespace(devices=np.array([device], dtype=object))


def test_cpu_gets_the_options_other_backends_xla_defaults():
  assert xla_options.compiler_options(_fake_mesh("cpu")) == {
      "xla_cpu_experimental_ynn_fusion_type": ""}
  assert xla_options.compiler_options(_fake_mesh("gpu")) is None
  assert xla_options.compiler_options(_fake_mesh("tpu")) is None
  assert xla_options.compiler_options() == xla_options.compiler_options(_fake_mesh("cpu"))


def test_train_step_compiles_without_ynnpack_fusions_unless_nestable():
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  tx = optax.adamw(1e-3)
  graphdef, state, shardings = state_lib.init_train_state(lambda: ToyLM(rngs=nnx.Rngs(0)), tx,
                                                          mesh)
  batch = shd.shard_batch(toy_batch(0), mesh)
  make = lambda **kw: steps_lib.make_train_step(toy_loss, tx, graphdef, mesh, shardings,
                                                donate=False, **kw)
  ours = make().lower(state, batch).compile().as_text().lower()
  assert "__ynn_fusion" not in ours
  # nestable=True: XLA's defaults (YNNPACK fusions on this CPU, so the check above is not
  # vacuous), and the step runs inside the caller's own jit.
  nestable = make(nestable=True)
  assert "__ynn_fusion" in nestable.lower(state, batch).compile().as_text().lower()
  twice = jax.jit(lambda s, b: nestable(nestable(s, b)[0], b))(state, batch)
  assert int(twice[0].step) == 2
