"""PyHessian-style front end: ``Hessian(model, criterion, data=(inputs, targets))`` or ``dataloader=...``, with
``.eigenvalues()``, ``.trace()``, ``.density()``; distributed over data-parallel ranks, DeepSpeed engines
(ZeRO 0/1/2) and Horovod. See docs/hessian.md."""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from ds_conadv.hessian.density import SpectralDensity, slq
from ds_conadv.hessian.eigen import TraceResult, hutchinson_trace, lanczos_eigenvalues, power_iteration
from ds_conadv.hessian.hvp import HessianOperator, select_params, unwrap_model

__all__ = ["Hessian", "layer_spectra"]

_UNSET = object()


def _alias(name: str, value: Any, alias_name: str, alias_value: Any, default: Any) -> Any:
    """One value from a PyHessian-style name and its pythonic alias (both given and different: error)."""
    if alias_value is not None and value is not _UNSET and value != alias_value:
        raise TypeError(f"got both {name}={value!r} and {alias_name}={alias_value!r}")
    if alias_value is not None:
        return alias_value
    return default if value is _UNSET else value


class Hessian:
    """Hessian of the mean loss of ``model`` over the data, w.r.t. its parameters (or ``params``).

    PyHessian-compatible constructor: ``Hessian(model, criterion, data=(inputs, targets))`` or
    ``Hessian(model, criterion, dataloader=loader)``. ``cuda`` is accepted for compatibility and ignored:
    batches always move to the device of the parameters.

    Keyword-only options (see :class:`~ds_conadv.hessian.hvp.HessianOperator` for the details):
    ``params`` (restrict to some parameters: a module, tensors or names), ``loss_fn(model, batch)``,
    ``hvp`` (``"auto"`` = ``"double"``, or ``"func"``), ``bn_eval=True``, ``dropout_eval=True``, ``cache``,
    ``distributed`` / ``process_group`` (default: automatic, see below), ``sync_buffers=True``, ``seed=0``,
    ``progress`` (tqdm bars:
    ``None`` = on a terminal only, ``True``, ``False``; rank 0 only), ``batch_size_fn``.

    Distributed: when torch.distributed is initialised with more than one rank (or ``process_group`` is given,
    or ``model`` is a DeepSpeed engine: its data-parallel group; or Horovod runs more than one rank), each rank
    passes its own share of the data and every product is summed over ranks weighted by their sample counts,
    giving the Hessian of the mean loss over the union of the data (with rank 0's BatchNorm statistics,
    ``sync_buffers``). The seed is broadcast from rank 0, so the
    random vectors, and therefore every result, are the same on all ranks. Every rank must call the same
    methods with the same arguments.
    """

    def __init__(self, model: Any, criterion: Optional[Callable] = None, data: Any = None,
                 dataloader: Optional[Iterable[Any]] = None, cuda: Optional[bool] = None, *, params: Any = None,
                 loss_fn: Optional[Callable] = None, hvp: str = "auto", bn_eval: bool = True,
                 dropout_eval: bool = True, cache: Optional[bool] = None,
                 distributed: Optional[Union[bool, str]] = None, process_group: Any = None, seed: int = 0,
                 progress: Optional[bool] = None, batch_size_fn: Optional[Callable[[Any], int]] = None,
                 sync_buffers: bool = True):
        del cuda  # PyHessian compatibility only
        self.op = HessianOperator(model, criterion, data, dataloader, params=params, loss_fn=loss_fn,
                                  backend=hvp, bn_eval=bn_eval, dropout_eval=dropout_eval, cache=cache,
                                  distributed=distributed, process_group=process_group, batch_size_fn=batch_size_fn,
                                  sync_buffers=sync_buffers)
        self.model = self.op.module
        self.seed = self.op.comm.broadcast_int(seed)
        self.progress = progress
        self.last_info: Dict[str, Any] = {}

    # ----- PyHessian-like attributes
    @property
    def params(self) -> List[torch.Tensor]:
        return self.op.params

    @property
    def names(self) -> List[str]:
        return self.op.names

    @property
    def dim(self) -> int:
        """Number of scalar parameters (the Hessian is ``dim x dim``)."""
        return self.op.dim

    @property
    def rank(self) -> int:
        return self.op.comm.rank

    @property
    def world_size(self) -> int:
        return self.op.comm.world_size

    @property
    def num_samples(self) -> Optional[int]:
        """Samples over all ranks seen by the last product (None before the first)."""
        return self.op.num_samples

    # ----- products
    def hvp(self, v: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """``H v``, ``v`` given per parameter; the same on every rank."""
        return self.op.hvp(v)

    def dataloader_hv_product(self, v: Sequence[torch.Tensor]) -> Tuple[float, List[torch.Tensor]]:
        """PyHessian's name: returns ``(v^T H v, H v)``."""
        hv = self.op.hvp(v)
        return float(sum(torch.sum(a.to(self.op.dtype) * b) for a, b in zip(hv, v))), hv

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector of length :attr:`dim`."""
        return self.op.matvec(v)

    def _generator(self, seed: Optional[int]) -> torch.Generator:
        s = self.seed if seed is None else self.op.comm.broadcast_int(seed)
        return torch.Generator().manual_seed(int(s))

    def _kw(self) -> Dict[str, Any]:
        return dict(dtype=self.op.dtype, device=self.op.device, progress=self.progress, rank=self.rank)

    # ----- algorithms
    def eigenvalues(self, maxIter: Any = _UNSET, tol: float = 1e-3, top_n: int = 1, method: Optional[str] = None, *,
                    max_iter: Optional[int] = None, which: str = "LM", seed: Optional[int] = None
                    ) -> Tuple[List[float], List[List[torch.Tensor]]]:
        """The ``top_n`` eigenvalues of largest magnitude and their unit eigenvectors (each a list of tensors
        shaped like the parameters, PyHessian's layout). Positional order as PyHessian's
        ``eigenvalues(maxIter=100, tol=1e-3, top_n=1)``.

        ``method="power"``: PyHessian's power iteration with deflation; ``maxIter`` products at most
        per eigenvalue, stop when the eigenvalue changes by less than ``tol`` relative.
        ``method="lanczos"``: at most ``maxIter`` (= m >= top_n) Lanczos steps with full reorthogonalisation,
        stop when each wanted Ritz pair's residual bound is below ``tol`` relative; ``which`` may then also be
        ``"LA"`` (largest algebraic) or ``"SA"`` (smallest). It keeps its m basis vectors (m x the parameter count).
        ``method=None`` (default): power iteration for ``top_n=1`` (PyHessian's result), Lanczos for ``top_n > 1``
        with power iteration's budget of products (m = ``maxIter * top_n``): its stopping rule bounds the error,
        and it reaches a given error with fewer products (``docs/hessian.md``).
        """
        max_iter = _alias("maxIter", maxIter, "max_iter", max_iter, 100)
        if method is None:
            method = "power" if top_n == 1 and which == "LM" else "lanczos"
            if method == "lanczos":
                max_iter = min(max_iter * top_n, self.dim)
        gen = self._generator(seed)
        with self.op.session():
            start = self.op.num_products
            if method == "power":
                if which != "LM":
                    raise ValueError("power iteration finds the eigenvalues of largest magnitude (which='LM'); "
                                     "use method='lanczos' for 'LA' / 'SA'")
                values, vecs, iters = power_iteration(self.op.matvec, self.dim, top_n, max_iter, tol, gen,
                                                      **self._kw())
                self.last_info = {"method": "power", "iterations": iters}
            elif method == "lanczos":
                values, vecs, steps = lanczos_eigenvalues(self.op.matvec, self.dim, top_n, max_iter, tol, which,
                                                          gen, **self._kw())
                self.last_info = {"method": "lanczos", "steps": steps}
            else:
                raise ValueError(f"method must be 'power' or 'lanczos', got {method!r}")
            self.last_info["products"] = self.op.num_products - start
        return values, [self.op.to_list(v) for v in vecs]

    def trace(self, maxIter: Any = _UNSET, tol: float = 1e-3, *, max_iter: Optional[int] = None,
              min_iter: int = 2, seed: Optional[int] = None) -> TraceResult:
        """Hutchinson's trace estimate with Rademacher vectors: at most ``maxIter`` products, stop when the
        running mean changes by less than ``tol`` relative (``tol=0``: all ``maxIter``). Returns a
        :class:`TraceResult` (``mean, stderr = h.trace()``; ``.samples`` holds PyHessian's list)."""
        max_iter = _alias("maxIter", maxIter, "max_iter", max_iter, 100)
        with self.op.session():
            start = self.op.num_products
            res = hutchinson_trace(self.op.matvec, self.dim, max_iter, tol, min_iter, self._generator(seed),
                                   **self._kw())
            self.last_info = {"method": "hutchinson", "products": self.op.num_products - start}
        return res

    def density(self, iter: Any = _UNSET, n_v: int = 1, *, steps: Optional[int] = None, num_bins: int = 10000,
                sigma_squared: float = 1e-5, overhead: float = 0.01, seed: Optional[int] = None
                ) -> SpectralDensity:
        """Eigenvalue spectral density by stochastic Lanczos quadrature: ``n_v`` runs of ``iter`` (alias
        ``steps``) Lanczos steps, Gaussian broadening as PyHessian. Returns a :class:`SpectralDensity`
        (``.grid``, ``.density``, ``.nodes``/``.weights`` = PyHessian's return value, ``.plot(path)``)."""
        steps = _alias("iter", iter, "steps", steps, 100)
        with self.op.session():
            start = self.op.num_products
            res = slq(self.op.matvec, self.dim, steps, n_v, self._generator(seed), num_bins=num_bins,
                      sigma_squared=sigma_squared, overhead=overhead, **self._kw())
            self.last_info = {"method": "slq", "products": self.op.num_products - start}
        return res


def layer_spectra(model: Any, criterion: Optional[Callable] = None, data: Any = None,
                  dataloader: Optional[Iterable[Any]] = None, *, modules: Optional[Sequence[str]] = None,
                  method: str = "power", max_iter: int = 100, tol: float = 1e-3, **hessian_kwargs: Any
                  ) -> Dict[str, float]:
    """Top eigenvalue (largest magnitude) of the Hessian block of each named module's own parameters
    (``recurse=False``: e.g. ``"0"`` for the weight and bias of the first layer of a Sequential).

    ``modules``: names to include (default: every module that owns parameters requiring grad). Other keyword
    arguments go to :class:`Hessian` (``loss_fn``, ``bn_eval``, ``distributed``, ``seed``, ...).
    Returns ``{module name: eigenvalue}`` in module order.
    """
    module, _ = unwrap_model(model)
    out: Dict[str, float] = {}
    wanted = None if modules is None else set(modules)
    allowed = {id(p) for p in select_params(module, None)[1]}  # trainable, less ConAdv's idle adversarial BN
    for name, m in module.named_modules():
        own = [p for p in m.parameters(recurse=False) if id(p) in allowed]
        if not own or (wanted is not None and name not in wanted):
            continue
        h = Hessian(model, criterion, data=data, dataloader=dataloader, params=own, **hessian_kwargs)
        values, _ = h.eigenvalues(top_n=1, max_iter=max_iter, tol=tol, method=method)
        out[name] = values[0]
    if wanted is not None and set(out) != wanted:
        raise ValueError(f"modules without own trainable parameters (or unknown): {sorted(wanted - set(out))}")
    return out
