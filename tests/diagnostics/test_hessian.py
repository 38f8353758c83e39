"""Hessian block diagnostics on quadratics whose Hessian is known exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.spatial.distance

from rlhfjax import diagnostics


def spd_matrix(rng, eigenvalues):
  """Q diag(eigenvalues) Q^T with a random orthogonal Q."""
  q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
  return (q * np.asarray(eigenvalues)) @ q.T


def quadratic(blocks, coupling_scale, seed):
  """0.5 theta^T A theta over params {name: (n,)} with diagonal blocks `blocks` and random
  off-diagonal coupling (which the per-block spectra must ignore)."""
  rng = np.random.default_rng(seed)
  sizes = [len(b) for b in blocks.values()]
  full = coupling_scale * rng.standard_normal((sum(sizes), sum(sizes)))
  full = 0.5 * (full + full.T)
  offsets = np.cumsum([0] + sizes)
  for (name, a), lo, hi in zip(blocks.items(), offsets[:-1], offsets[1:]):
    full[lo:hi, lo:hi] = a
  full_j = jnp.asarray(full, jnp.float32)
  names = list(blocks)

  def loss_fn(params):
    theta = jnp.concatenate([params[n] for n in names])
    return 0.5 * theta @ full_j @ theta

  params = {n: jnp.asarray(rng.standard_normal(len(b)), jnp.float32) for n, b in blocks.items()}
  return loss_fn, params


@pytest.mark.parametrize("seed", [0, 1])
def test_lanczos_quadrature_is_exact_with_full_krylov_space(seed):
  rng = np.random.default_rng(seed)
  eigenvalues = np.array([-2.0, 0.5, 1.0, 3.0, 10.0, 40.0])
  a = spd_matrix(rng, eigenvalues)
  probe = rng.standard_normal(len(eigenvalues))
  a_j = jnp.asarray(a, jnp.float32)
  nodes, weights = jax.jit(
      lambda v: diagnostics.lanczos_quadrature(lambda x: a_j @ x, v, num_steps=len(eigenvalues))
  )(jnp.asarray(probe, jnp.float32))
  # Gauss quadrature with m = n: nodes are the eigenvalues, weights (u_k^T v)^2 / |v|^2.
  w_exact, u_exact = np.linalg.eigh(a)
  np.testing.assert_allclose(nodes, w_exact, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(weights, (u_exact.T @ probe) ** 2 / (probe @ probe), rtol=1e-3,
                             atol=1e-6)


@pytest.mark.parametrize("c", [3.0, 1e6])
def test_lanczos_early_breakdown_gives_zero_weight_nodes(c):
  """A = c I: the Krylov space of any probe is one-dimensional, at any scale of A (the breakdown
  threshold is relative to |A v|, so round-off of size eps c is not taken for a new direction)."""
  nodes, weights = diagnostics.lanczos_quadrature(
      lambda x: c * x, jnp.ones(5, jnp.float32), num_steps=4)
  np.testing.assert_allclose(np.sum(weights), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.sum(weights * nodes), c, rtol=1e-6)
  assert np.all(np.isfinite(nodes))
  assert np.count_nonzero(weights) == 1  # the padding nodes get exactly zero weight


def test_slq_rademacher_probes_are_exact_on_a_diagonal_matrix():
  """With m = n, weights are (u_k^T v)^2 / |v|^2 = v_k^2 / n for A diagonal: exactly 1/n for
  Rademacher probes (|v_k| = 1), so every probe sees the uniform spectral measure."""
  d = jnp.array([0.5, 1.0, 2.0, 3.0, 5.0, 8.0], jnp.float32)
  nodes, weights = diagnostics.slq(lambda x: d * x, 6, jax.random.key(0), num_steps=6,
                                   num_probes=3)
  assert nodes.shape == weights.shape == (3, 6)
  np.testing.assert_allclose(nodes, np.broadcast_to(d, (3, 6)), rtol=1e-5)
  np.testing.assert_allclose(weights, 1 / 6, rtol=1e-4)


def test_block_spectra_match_the_diagonal_blocks():
  rng = np.random.default_rng(3)
  spectra_exact = {"a": [1.0, 2.0, 4.0, 8.0], "b": [0.01, 0.1, 50.0], "c": [5.0] * 2 + [6.0]}
  blocks = {n: spd_matrix(rng, e) for n, e in spectra_exact.items()}
  loss_fn, params = quadratic(blocks, coupling_scale=1.0, seed=4)
  spectra = diagnostics.block_spectra(loss_fn, params, jax.random.key(0), num_steps=8,
                                      num_probes=3)
  assert list(spectra) == ["a", "b", "c"]
  selected = diagnostics.block_spectra(loss_fn, params, jax.random.key(0), num_steps=8,
                                       num_probes=3, select=lambda name, _: name != "b")
  assert list(selected) == ["a", "c"]
  np.testing.assert_allclose(selected["c"].nodes_PxM, spectra["c"].nodes_PxM, rtol=1e-6)
  for name, exact in spectra_exact.items():
    nodes, weights = spectra[name]
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
    # Nodes that carry weight are eigenvalues of the diagonal block (not of the coupled matrix).
    for node in nodes[weights > 1e-6]:
      assert np.min(np.abs(node - np.array(exact))) < 1e-3 * max(exact), (name, node)
    # Every eigenvalue is found by some probe.
    for e in set(exact):
      assert np.min(np.abs(nodes[weights > 1e-6] - e)) < 1e-3 * max(exact), (name, e)


def test_js_distance_matches_scipy():
  rng = np.random.default_rng(0)
  p, q = rng.random(50), rng.random(50)
  expected = scipy.spatial.distance.jensenshannon(p, q, base=2)
  np.testing.assert_allclose(diagnostics.js_distance(p, q), expected, rtol=1e-10)
  assert diagnostics.js_distance(p, p) == 0.0
  np.testing.assert_allclose(diagnostics.js_distance([1, 0], [0, 1]), 1.0)


def test_js_distance_zero_for_identical_blocks_positive_for_different():
  rng = np.random.default_rng(5)
  same = spd_matrix(rng, [1.0, 2.0, 3.0, 4.0, 5.0])
  different = spd_matrix(rng, [0.01, 0.02, 0.03, 30.0, 60.0])
  loss_fn, params = quadratic({"x": same, "y": same, "z": different}, coupling_scale=0.0, seed=6)
  spectra = diagnostics.block_spectra(loss_fn, params, jax.random.key(1), num_steps=5,
                                      num_probes=2)
  names, distances = diagnostics.block_js_distances(spectra)
  assert names == ["x", "y", "z"]
  np.testing.assert_allclose(distances, distances.T)
  assert distances[0, 1] < 1e-6
  assert distances[0, 2] > 0.5 and distances[1, 2] > 0.5


def test_density_grid_ignores_zero_weight_padding_nodes():
  """A Krylov space that closes early pads with zero-weight nodes at 0: they must not stretch
  the shared grid and its default sigma (JS distances would then depend on num_steps)."""
  spectra = {
      "a": diagnostics.BlockSpectrum(np.array([[0.0, 0.0, 0.0, 100.0]]),
                                     np.array([[0.0, 0.0, 0.0, 1.0]])),
      "b": diagnostics.BlockSpectrum(np.array([[101.0]]), np.array([[1.0]])),
  }
  grid, sigma = diagnostics.density_grid(spectra)
  np.testing.assert_allclose(sigma, 0.01)
  np.testing.assert_allclose([grid[0], grid[-1]], [99.97, 101.03])
  np.testing.assert_allclose(diagnostics.block_js_distances(spectra)[1][0, 1], 1.0, atol=1e-6)


def test_spectral_density_is_normalised_and_rejects_bad_sigma():
  spectrum = diagnostics.BlockSpectrum(np.array([[1.0, 2.0]]), np.array([[0.25, 0.75]]))
  grid = np.linspace(0, 3, 301)
  density = diagnostics.spectral_density(spectrum, grid, sigma=0.05)
  np.testing.assert_allclose(density.sum(), 1.0)
  # Mass splits 1:3 between the two nodes (the kernels do not overlap at 20 sigma).
  np.testing.assert_allclose(density[grid < 1.5].sum(), 0.25, rtol=1e-6)
  with pytest.raises(ValueError, match="sigma"):
    diagnostics.spectral_density(spectrum, grid, sigma=0.0)
  # One node: the normalised Gaussian kernel exp(-(t - theta)^2 / (2 sigma^2)) itself.
  single = diagnostics.BlockSpectrum(np.array([[1.0]]), np.array([[1.0]]))
  kernel = np.exp(-0.5 * ((grid - 1.0) / 0.2) ** 2)
  np.testing.assert_allclose(diagnostics.spectral_density(single, grid, sigma=0.2),
                             kernel / kernel.sum(), rtol=1e-10)


def test_plot_returns_a_figure():
  spectra = {
      "a": diagnostics.BlockSpectrum(np.array([[1.0, 2.0]]), np.array([[0.5, 0.5]])),
      "b": diagnostics.BlockSpectrum(np.array([[1.0, 9.0]]), np.array([[0.9, 0.1]])),
  }
  fig = diagnostics.plot_block_spectra(spectra)
  assert len(fig.axes) == 3  # densities, JS matrix, colorbar
  assert [line.get_label() for line in fig.axes[0].get_lines()] == ["a", "b"]
