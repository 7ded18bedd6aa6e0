"""Top eigenvalues (power iteration with deflation, Lanczos) and the trace (Hutchinson) of a symmetric operator
given only as ``matvec(v) -> A v`` on flat vectors.

Randomness comes from a ``torch.Generator`` on the CPU (drawn there, then moved): the same seed gives the same
vectors on every rank and device, which the distributed products need. Every decision (convergence, breakdown)
is taken on values every rank computes identically from the all-reduced products, so all ranks run the same
number of products.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

__all__ = ["power_iteration", "lanczos", "lanczos_eigenvalues", "hutchinson_trace", "TraceResult",
           "random_vector", "progress_bar"]

MatVec = Callable[[torch.Tensor], torch.Tensor]


def progress_bar(total: int, desc: str, enabled: Optional[bool], rank: int = 0):
    """tqdm over ``total`` steps; ``enabled=None`` lets tqdm decide (shown on a terminal); rank 0 only."""
    from tqdm.auto import tqdm

    disable = True if (enabled is False or rank != 0) else (None if enabled is None else False)
    return tqdm(total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True)


def random_vector(n: int, kind: str, generator: torch.Generator, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """``"rademacher"`` (±1) or ``"gaussian"``, drawn on the CPU from ``generator``, then moved."""
    if kind == "rademacher":
        v = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8).to(dtype).mul_(2).sub_(1)
    elif kind == "gaussian":
        v = torch.randn(n, generator=generator, dtype=torch.float64).to(dtype)
    else:
        raise ValueError(f"unknown random vector kind {kind!r}")
    return v.to(device)


def _orthogonalize(v: torch.Tensor, basis: List[torch.Tensor]) -> torch.Tensor:
    for _ in range(2):  # Gram-Schmidt twice: enough for working precision
        for b in basis:
            v = v - torch.dot(v, b) * b
    return v


def _normalize(v: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.vector_norm(v)
    return v / (norm + 1e-30)


def power_iteration(matvec: MatVec, n: int, top_n: int = 1, max_iter: int = 100, tol: float = 1e-3,
                    generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32,
                    device: torch.device = torch.device("cpu"), progress: Optional[bool] = None,
                    rank: int = 0) -> Tuple[List[float], List[torch.Tensor], List[int]]:
    """PyHessian's power iteration: the ``top_n`` eigenvalues of largest magnitude, one after another, each
    iterate orthogonalised against the eigenvectors already found (deflation).

    Stops an eigenvalue when its Rayleigh quotient changes by less than ``tol`` relative
    (``|λ_k - λ_{k-1}| / (|λ_{k-1}| + 1e-6) < tol``) or after ``max_iter`` products.
    Returns ``(values, unit vectors, products used per eigenvalue)``.
    """
    if not 1 <= top_n <= n:
        raise ValueError(f"top_n must be in [1, {n}], got {top_n}")
    generator = generator or torch.Generator().manual_seed(0)
    values: List[float] = []
    vectors: List[torch.Tensor] = []
    iters: List[int] = []
    bar = progress_bar(top_n * max_iter, "hessian eigenvalues (power)", progress, rank)
    try:
        for _ in range(top_n):
            v = _normalize(random_vector(n, "gaussian", generator, dtype, device))
            eig: Optional[float] = None
            used = 0
            for _ in range(max_iter):
                v = _normalize(_orthogonalize(v, vectors))
                hv = matvec(v)
                used += 1
                bar.update(1)
                new = float(torch.dot(hv, v))
                v = _normalize(hv)
                if eig is not None and abs(eig - new) / (abs(eig) + 1e-6) < tol:
                    eig = new
                    break
                eig = new
            bar.update(max_iter - used)
            values.append(float(eig))
            vectors.append(_normalize(_orthogonalize(v, vectors)))
            iters.append(used)
    finally:
        bar.close()
    return values, vectors, iters


@dataclass
class LanczosResult:
    """``T = tridiag(betas, alphas, betas)``, ``V`` (rows: the orthonormal Lanczos vectors v_1..v_m)."""

    alphas: List[float]
    betas: List[float]  # betas[j] couples v_j and v_{j+1}; len = len(alphas) - 1
    V: torch.Tensor
    last_beta: float  # the residual norm after the last step (0 on breakdown: invariant subspace)

    def tridiagonal(self) -> torch.Tensor:
        m = len(self.alphas)
        T = torch.diag(torch.tensor(self.alphas, dtype=torch.float64))
        if m > 1:
            b = torch.tensor(self.betas, dtype=torch.float64)
            T += torch.diag(b, 1) + torch.diag(b, -1)
        return T


def lanczos(matvec: MatVec, v0: torch.Tensor, steps: int, progress: Optional[bool] = None, rank: int = 0,
            desc: str = "hessian lanczos",
            stop: Optional[Callable[["LanczosResult"], bool]] = None) -> LanczosResult:
    """``steps`` Lanczos steps from ``v0`` with full reorthogonalisation (classical Gram-Schmidt, twice,
    against every previous vector). Stops early on breakdown (an invariant subspace was found: its Ritz values
    are then exact) or when ``stop(partial_result)`` returns True (checked after every step)."""
    n = v0.numel()
    steps = min(steps, n)
    V = torch.empty(steps, n, dtype=v0.dtype, device=v0.device)
    V[0] = _normalize(v0)
    alphas: List[float] = []
    betas: List[float] = []
    last_beta = 0.0
    bar = progress_bar(steps, desc, progress, rank)
    try:
        for j in range(steps):
            w = matvec(V[j])
            bar.update(1)
            alpha = float(torch.dot(w, V[j]))
            alphas.append(alpha)
            basis = V[:j + 1]
            for _ in range(2):  # full reorthogonalisation (includes removing alpha v_j and beta v_{j-1})
                w = w - basis.T @ (basis @ w)
            beta = float(torch.linalg.vector_norm(w))
            last_beta = beta
            scale = max(abs(a) for a in alphas) + (max(betas) if betas else 0.0)
            if beta <= 10 * torch.finfo(w.dtype).eps * max(scale, 1e-30):
                last_beta = 0.0  # breakdown: span(V) is invariant, its Ritz values are exact
                V = V[:j + 1]
                break
            if j + 1 == steps or (stop is not None and stop(LanczosResult(alphas, betas, V[:j + 1], beta))):
                V = V[:j + 1]
                break
            betas.append(beta)
            V[j + 1] = w / beta
    finally:
        bar.close()
    return LanczosResult(alphas, betas, V, last_beta)


def _pick(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    if which == "LM":
        order = torch.argsort(theta.abs(), descending=True, stable=True)
    elif which == "LA":
        order = torch.argsort(theta, descending=True, stable=True)
    elif which == "SA":
        order = torch.argsort(theta, descending=False, stable=True)
    else:
        raise ValueError(f"which must be 'LM', 'LA' or 'SA', got {which!r}")
    return order[:k]


def lanczos_eigenvalues(matvec: MatVec, n: int, top_n: int = 1, max_iter: int = 100, tol: float = 1e-3,
                        which: str = "LM", generator: Optional[torch.Generator] = None,
                        dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu"),
                        progress: Optional[bool] = None, rank: int = 0
                        ) -> Tuple[List[float], List[torch.Tensor], int]:
    """``top_n`` eigenpairs (``which``: ``"LM"`` largest magnitude, ``"LA"`` largest, ``"SA"`` smallest) from
    at most ``m = max_iter`` Lanczos steps with full reorthogonalisation (``top_n <= m``), from a Gaussian
    start vector. Stops when every wanted Ritz pair's residual bound ``|β_j y_{j,i}|`` is below
    ``tol * |θ_i|`` (``tol=0``: run all ``m`` steps). Returns ``(values, unit Ritz vectors, steps used)``."""
    if not 1 <= top_n <= n:
        raise ValueError(f"top_n must be in [1, {n}], got {top_n}")
    if top_n > max_iter:
        raise ValueError(f"Lanczos needs top_n <= max_iter (the number of steps m): {top_n} > {max_iter}")
    generator = generator or torch.Generator().manual_seed(0)
    v0 = random_vector(n, "gaussian", generator, dtype, device)

    def converged(res: LanczosResult) -> bool:
        if tol <= 0 or len(res.alphas) < top_n:
            return False
        theta, Y = torch.linalg.eigh(res.tridiagonal())
        idx = _pick(theta, top_n, which)
        bound = (res.last_beta * Y[-1, idx]).abs()
        return bool((bound <= tol * theta[idx].abs().clamp_min(1e-12)).all())

    res = lanczos(matvec, v0, max_iter, progress, rank, "hessian eigenvalues (lanczos)", converged)
    theta, Y = torch.linalg.eigh(res.tridiagonal())
    k = min(top_n, theta.numel())
    if k < top_n:
        raise RuntimeError(f"Lanczos found an invariant subspace of dimension {theta.numel()} < top_n={top_n} "
                           "(the start vector has no component along the other eigenvectors)")
    idx = _pick(theta, k, which)
    values = [float(theta[i]) for i in idx]
    ritz = (Y[:, idx].to(res.V.dtype).T @ res.V)  # k x n
    vectors = [_normalize(ritz[i]) for i in range(k)]
    return values, vectors, len(res.alphas)


class TraceResult:
    """Hutchinson's estimate: ``mean`` (the trace estimate), ``stderr`` (standard error of the mean of the
    samples ``v^T H v``), ``samples``. Unpacks as ``mean, stderr = result``; ``float(result)`` is the mean."""

    __slots__ = ("mean", "stderr", "samples")

    def __init__(self, mean: float, stderr: float, samples: List[float]):
        self.mean, self.stderr, self.samples = float(mean), float(stderr), list(samples)

    def __iter__(self):
        return iter((self.mean, self.stderr))

    def __float__(self) -> float:
        return self.mean

    def __repr__(self) -> str:
        return f"TraceResult(mean={self.mean:.6g}, stderr={self.stderr:.3g}, n={len(self.samples)})"


def hutchinson_trace(matvec: MatVec, n: int, max_iter: int = 100, tol: float = 1e-3, min_iter: int = 2,
                     generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32,
                     device: torch.device = torch.device("cpu"), progress: Optional[bool] = None,
                     rank: int = 0) -> TraceResult:
    """Hutchinson: ``tr(H) ≈ mean_i v_i^T H v_i`` with Rademacher ``v_i``. Stops (PyHessian's rule) when the
    running mean changes by less than ``tol`` relative, after at least ``min_iter`` samples (``tol=0``: take
    ``max_iter`` samples). ``stderr = std(samples, ddof=1) / sqrt(len)``."""
    if max_iter < 1:
        raise ValueError("max_iter must be >= 1")
    generator = generator or torch.Generator().manual_seed(0)
    samples: List[float] = []
    prev = 0.0
    bar = progress_bar(max_iter, "hessian trace (hutchinson)", progress, rank)
    try:
        for i in range(max_iter):
            v = random_vector(n, "rademacher", generator, dtype, device)
            samples.append(float(torch.dot(matvec(v), v)))
            bar.update(1)
            mean = math.fsum(samples) / len(samples)
            if len(samples) >= max(min_iter, 2) and tol > 0 and abs(mean - prev) / (abs(prev) + 1e-6) < tol:
                break
            prev = mean
    finally:
        bar.close()
    mean = math.fsum(samples) / len(samples)
    if len(samples) > 1:
        var = math.fsum((s - mean) ** 2 for s in samples) / (len(samples) - 1)
        stderr = math.sqrt(var / len(samples))
    else:
        stderr = float("inf")
    return TraceResult(mean, stderr, samples)
