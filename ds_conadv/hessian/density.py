"""Eigenvalue spectral density by stochastic Lanczos quadrature (SLQ), as in PyHessian / Ghorbani et al. 2019.

For each of ``n_v`` runs: a normalised Rademacher start vector ``v``, ``m`` Lanczos steps (full
reorthogonalisation) give ``T_m = Y diag(θ) Y^T``; the quadrature nodes are the Ritz values ``θ_j`` and the
weights ``τ_j = Y[0, j]^2`` (they sum to one), so that ``v^T f(H) v ≈ Σ_j τ_j f(θ_j)``. The density is the
average over runs of ``Σ_j τ_j N(t; θ_j, σ²)`` (Gaussian broadening), normalised to unit mass on the grid.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np
import torch

from ds_conadv.hessian.eigen import lanczos, random_vector

__all__ = ["SpectralDensity", "slq", "gaussian_density"]


def gaussian_density(nodes: np.ndarray, weights: np.ndarray, num_bins: int = 10000, sigma_squared: float = 1e-5,
                     overhead: float = 0.01):
    """PyHessian's ``density_generate``: grid from (mean over runs of the smallest node) − overhead to (mean of
    the largest) + overhead; variance ``σ² = sigma_squared · max(1, range)``; unit mass on the grid.

    ``nodes``, ``weights``: arrays ``(n_v, m)`` (runs with fewer nodes padded with weight 0)."""
    nodes = np.asarray(nodes, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    valid = weights > 0
    lo = np.mean([r[v].min() if v.any() else r.min() for r, v in zip(nodes, valid)]) - overhead
    hi = np.mean([r[v].max() if v.any() else r.max() for r, v in zip(nodes, valid)]) + overhead
    grid = np.linspace(lo, hi, num=num_bins)
    var = sigma_squared * max(1.0, hi - lo)
    density = np.zeros(num_bins)
    for r, w in zip(nodes, weights):
        diff = grid[:, None] - r[None, :]
        density += (np.exp(-diff ** 2 / (2 * var)) / np.sqrt(2 * np.pi * var)) @ w
    density /= len(nodes)
    mass = density.sum() * (grid[1] - grid[0])
    if mass > 0:
        density /= mass
    return grid, density, var


class SpectralDensity:
    """Result of :func:`slq`: ``grid`` and ``density`` (numpy, unit mass), the quadrature ``nodes`` and
    ``weights`` (lists of ``n_v`` lists: PyHessian's ``density()`` return value), ``sigma_squared`` (the
    broadening variance used)."""

    def __init__(self, nodes: List[List[float]], weights: List[List[float]], num_bins: int = 10000,
                 sigma_squared: float = 1e-5, overhead: float = 0.01):
        self.nodes, self.weights = nodes, weights
        m = max(len(r) for r in nodes)
        pad_n = np.array([r + [r[-1]] * (m - len(r)) for r in nodes])
        pad_w = np.array([w + [0.0] * (m - len(w)) for w in weights])
        self.grid, self.density, self.sigma_squared = gaussian_density(pad_n, pad_w, num_bins, sigma_squared,
                                                                         overhead)

    def mass_between(self, lo: float, hi: float) -> float:
        """Integral of the density over ``[lo, hi]`` (rectangle rule on the grid)."""
        dx = self.grid[1] - self.grid[0]
        sel = (self.grid >= lo) & (self.grid <= hi)
        return float(self.density[sel].sum() * dx)

    def plot(self, path: str, log: bool = True, title: Optional[str] = "Hessian eigenvalue density",
             dpi: int = 100, figsize=(5.0, 3.6)) -> str:
        """Write a PNG of the density (log scale by default, as PyHessian's ``get_esd_plot``) with the
        matplotlib Agg backend. Returns ``path``."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: the global backend is untouched
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize, dpi=dpi)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        if log:
            ax.semilogy(self.grid, self.density + 1e-7, lw=1.2)
            ax.set_ylabel("density (log scale)")
        else:
            ax.plot(self.grid, self.density, lw=1.2)
            ax.set_ylabel("density")
        ax.set_xlabel("eigenvalue")
        if title:
            ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
        return path

    def __repr__(self) -> str:
        lo, hi = self.grid[0], self.grid[-1]
        return f"SpectralDensity(n_v={len(self.nodes)}, steps={max(map(len, self.nodes))}, range=[{lo:.4g}, {hi:.4g}])"


def slq(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, steps: int = 100, n_v: int = 1,
        generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32,
        device: torch.device = torch.device("cpu"), progress: Optional[bool] = None, rank: int = 0,
        num_bins: int = 10000, sigma_squared: float = 1e-5, overhead: float = 0.01) -> SpectralDensity:
    """Stochastic Lanczos quadrature: ``n_v`` runs of ``steps`` Lanczos steps (fewer if ``n`` is smaller or
    the run breaks down on an invariant subspace) from normalised Rademacher vectors."""
    if n_v < 1 or steps < 1:
        raise ValueError("n_v and steps must be >= 1")
    generator = generator or torch.Generator().manual_seed(0)
    nodes: List[List[float]] = []
    weights: List[List[float]] = []
    for run in range(n_v):
        v0 = random_vector(n, "rademacher", generator, dtype, device)
        res = lanczos(matvec, v0, steps, progress, rank, f"hessian density (SLQ run {run + 1}/{n_v})")
        theta, Y = torch.linalg.eigh(res.tridiagonal())
        nodes.append([float(t) for t in theta])
        weights.append([float(y) ** 2 for y in Y[0]])
    return SpectralDensity(nodes, weights, num_bins, sigma_squared, overhead)
