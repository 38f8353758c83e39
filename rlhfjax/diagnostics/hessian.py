"""Block heterogeneity of the Hessian: per-block spectra, their Jensen-Shannon distances, a plot.

"Why Transformers Need Adam" (Zhang et al., arXiv 2402.16788) measures, for each parameter block b
(a weight tensor), the spectrum of the diagonal Hessian block H_bb = d^2 L / d theta_b^2 by
stochastic Lanczos quadrature, smooths it into a density with a Gaussian kernel, and compares blocks
by the Jensen-Shannon distance between densities: Transformers show large distances between blocks
(heterogeneity), CNNs small ones. Here:

  H_bb x = [jvp(grad L)(theta; x on block b, 0 elsewhere)]_b        (Hessian-vector product)
  phi_b(t) = mean_p sum_k tau_pk N(t; theta_pk, sigma^2)             (SLQ nodes, weights)
  JSD(b, c) = sqrt(JS(phi_b, phi_c)),  JS = (KL(p|m) + KL(q|m)) / 2, m = (p + q) / 2,
with densities discretised on one grid shared by all blocks and logarithms in base 2 (so the
distance lies in [0, 1]).

Probes: every block draws its Rademacher probes from the same `key`, so blocks of equal size see the
same probe vectors (common random numbers: two blocks with the same Hessian get the same density
and distance exactly 0, and differences between blocks are not blurred by probe noise).

Choices not fixed by the paper (unverified against the authors' code): the grid spans the smallest
to the largest node of all blocks, padded by 3 sigma; the default sigma is 1% of that range.

References: arXiv 2402.16788, Sec. 3 and Fig. 1-3; Ghorbani et al., arXiv 1901.10159, Sec. 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhfjax.diagnostics.lanczos import hvp, slq
from rlhfjax.optim.partition import path_names


class BlockSpectrum(NamedTuple):
  """SLQ estimate of one Hessian block's spectrum.

  Attributes:
    nodes_PxM: quadrature nodes (Ritz values) per probe.
    weights_PxM: quadrature weights per probe (each row sums to 1).
  """
  nodes_PxM: np.ndarray
  weights_PxM: np.ndarray


def block_spectra(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    key: jax.Array,
    *,
    num_steps: int = 32,
    num_probes: int = 4,
    select: Callable[[str, Any], bool] | None = None,
) -> dict[str, BlockSpectrum]:
  """SLQ spectra of the diagonal Hessian blocks H_bb, one block per parameter tensor.

  Args:
    loss_fn: scalar loss of the parameter pytree (close over the batch).
    params: the parameters where the Hessian is taken.
    key: PRNG key for the probes (shared by all blocks, see the module docstring).
    num_steps: Lanczos steps per probe (capped at the block size; equal to it gives the exact
      eigenvalues as nodes).
    num_probes: probes per block.
    select: optional `(path, param) -> bool` choosing which blocks to measure (default all).

  Returns:
    {path: BlockSpectrum}, paths joined by '.', in tree-flatten order.
  """
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = [x for _, x in leaves_with_paths]
  out = {}
  for i, (path, leaf) in enumerate(leaves_with_paths):
    name = ".".join(path_names(path))
    if select is not None and not select(name, leaf):
      continue
    dtype = jnp.result_type(leaf.dtype, jnp.float32)

    @jax.jit
    def run(params, key, i=i, leaf=leaf, dtype=dtype):
      def matvec(x_N):
        tangent = [jnp.zeros_like(x) for x in jax.tree.leaves(params)]
        tangent[i] = x_N.reshape(leaf.shape).astype(leaf.dtype)
        out = hvp(loss_fn, params, jax.tree.unflatten(treedef, tangent))
        return jax.tree.leaves(out)[i].reshape(-1).astype(dtype)
      return slq(matvec, math.prod(leaf.shape), key, num_steps=num_steps,
                 num_probes=num_probes, dtype=dtype)

    nodes, weights = run(jax.tree.unflatten(treedef, leaves), key)
    out[name] = BlockSpectrum(np.asarray(nodes), np.asarray(weights))
  return out


def spectral_density(spectrum: BlockSpectrum, grid_G: np.ndarray, sigma: float) -> np.ndarray:
  """Gaussian-smoothed SLQ density on a grid, normalised to a probability vector over the grid.

  phi(t_g) = mean_p sum_k tau_pk N(t_g; theta_pk, sigma^2), then divided by sum_g phi(t_g).

  Args:
    spectrum: SLQ nodes and weights.
    grid_G: evaluation points (evenly spaced).
    sigma: Gaussian kernel width.

  Returns:
    density_G, non-negative, summing to 1.
  """
  if sigma <= 0:
    raise ValueError(f"sigma ({sigma}) must be positive")
  nodes = np.asarray(spectrum.nodes_PxM, np.float64).reshape(-1)
  weights = np.asarray(spectrum.weights_PxM, np.float64).reshape(-1)
  z = (np.asarray(grid_G, np.float64)[:, None] - nodes[None, :]) / sigma
  density = np.exp(-0.5 * z**2) @ weights
  total = density.sum()
  if total <= 0:
    raise ValueError("the density vanishes on the grid; widen the grid or sigma")
  return density / total


def js_distance(p_G: np.ndarray, q_G: np.ndarray) -> float:
  """Jensen-Shannon distance sqrt((KL(p|m) + KL(q|m)) / 2), m = (p + q) / 2, base-2 logarithms.

  Args:
    p_G: probability vector (normalised inside).
    q_G: probability vector on the same support.

  Returns:
    A distance in [0, 1]; 0 iff p = q.
  """
  p = np.asarray(p_G, np.float64)
  q = np.asarray(q_G, np.float64)
  if p.shape != q.shape:
    raise ValueError(f"p and q must have the same shape, got {p.shape} and {q.shape}")
  p, q = p / p.sum(), q / q.sum()
  m = 0.5 * (p + q)

  def kl(a):
    # 0 log 0 = 0; where a > 0 also m > 0.
    nz = a > 0
    return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

  return math.sqrt(max(0.5 * (kl(p) + kl(q)), 0.0))


def density_grid(
    spectra: dict[str, BlockSpectrum], num_points: int = 1000, sigma: float | None = None
) -> tuple[np.ndarray, float]:
  """A grid shared by all blocks: [min node - 3 sigma, max node + 3 sigma], over the nodes with
  weight (a Krylov space that closes early pads with zero-weight nodes at 0, which are not part of
  the spectrum).

  Returns:
    (grid_G, sigma); sigma defaults to 1% of the node range (1e-3 if all nodes coincide).
  """
  nodes = np.concatenate([np.asarray(s.nodes_PxM)[np.asarray(s.weights_PxM) > 0]
                          for s in spectra.values()])
  lo, hi = float(nodes.min()), float(nodes.max())
  if sigma is None:
    sigma = 0.01 * (hi - lo) if hi > lo else 1e-3
  return np.linspace(lo - 3 * sigma, hi + 3 * sigma, num_points), sigma


def block_js_distances(
    spectra: dict[str, BlockSpectrum], *, num_points: int = 1000, sigma: float | None = None
) -> tuple[list[str], np.ndarray]:
  """Pairwise Jensen-Shannon distances between the blocks' smoothed spectral densities.

  Args:
    spectra: output of `block_spectra`.
    num_points: grid size.
    sigma: Gaussian width (default: see `density_grid`).

  Returns:
    (names, distances_BxB), symmetric with a zero diagonal.
  """
  grid, sigma = density_grid(spectra, num_points, sigma)
  names = list(spectra)
  densities = [spectral_density(spectra[n], grid, sigma) for n in names]
  out = np.zeros((len(names), len(names)))
  for a in range(len(names)):
    for b in range(a + 1, len(names)):
      out[a, b] = out[b, a] = js_distance(densities[a], densities[b])
  return names, out


def plot_block_spectra(
    spectra: dict[str, BlockSpectrum],
    *,
    num_points: int = 1000,
    sigma: float | None = None,
    names: Sequence[str] | None = None,
):
  """Plots each block's smoothed Hessian spectrum (log density) and the JS-distance matrix.

  Args:
    spectra: output of `block_spectra`.
    num_points: grid size.
    sigma: Gaussian width (default: see `density_grid`).
    names: optional subset/order of blocks.

  Returns:
    A `matplotlib.figure.Figure` (not attached to pyplot; display or `savefig` it).
  """
  from matplotlib.figure import Figure  # Plotting is optional: import only when asked.

  if names is not None:
    spectra = {n: spectra[n] for n in names}
  grid, sigma = density_grid(spectra, num_points, sigma)
  labels, distances = block_js_distances(spectra, num_points=num_points, sigma=sigma)
  fig = Figure(figsize=(12, 4.5), layout="constrained")
  ax_density, ax_js = fig.subplots(1, 2, width_ratios=(1.3, 1))
  step = grid[1] - grid[0]
  for name in labels:
    density = spectral_density(spectra[name], grid, sigma) / step
    ax_density.semilogy(grid, np.maximum(density, 1e-12), label=name)
  ax_density.set_xlabel("eigenvalue")
  ax_density.set_ylabel("density")
  ax_density.set_ylim(bottom=1e-6 * max(ax_density.get_ylim()[1], 1e-12))
  ax_density.set_title("Hessian block spectra (SLQ)")
  ax_density.legend(fontsize="small")
  image = ax_js.imshow(distances, vmin=0, vmax=1, cmap="viridis")
  ax_js.set_xticks(range(len(labels)), labels, rotation=90, fontsize="small")
  ax_js.set_yticks(range(len(labels)), labels, fontsize="small")
  ax_js.set_title("JS distance between blocks")
  fig.colorbar(image, ax=ax_js)
  return fig
