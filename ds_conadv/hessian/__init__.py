"""Hessian spectrum tools: Hessian-vector products, top eigenvalues (power iteration, Lanczos), trace
(Hutchinson) and eigenvalue density (stochastic Lanczos quadrature) of the mean loss of any ``nn.Module``, over
one batch or a loader, single-process or data-parallel (torch.distributed, DeepSpeed ZeRO 0/1/2, Horovod).

    from ds_conadv.hessian import Hessian
    h = Hessian(model, criterion, data=(inputs, targets))       # or dataloader=loader
    values, vectors = h.eigenvalues(top_n=3)                     # or method="lanczos"
    mean, stderr = h.trace()
    h.density(iter=100, n_v=1).plot("density.png")

The command ``ds-conadv hessian --config CFG --checkpoint CKPT`` is :func:`ds_conadv.app.hessian_cli.hessian_main`
(application layer; ``ds_conadv.hessian.hessian_main`` still finds it). See docs/hessian.md.
"""
from __future__ import annotations

from typing import Any

from ds_conadv.hessian.density import SpectralDensity, gaussian_density, slq
from ds_conadv.hessian.eigen import (TraceResult, hutchinson_trace, lanczos, lanczos_eigenvalues, power_iteration,
                                     random_vector)
from ds_conadv.hessian.hessian import Hessian, layer_spectra
from ds_conadv.hessian.hvp import (BACKENDS, HessianOperator, batch_size_of, make_communicator, select_params,
                                   unwrap_model)

__all__ = ["Hessian", "layer_spectra", "HessianOperator", "SpectralDensity", "TraceResult", "power_iteration",
           "lanczos", "lanczos_eigenvalues", "hutchinson_trace", "slq", "gaussian_density", "random_vector",
           "select_params", "unwrap_model", "batch_size_of", "make_communicator", "BACKENDS"]

#: the CLI's names, kept at their old import path; resolved on first use (the CLI is the application layer's)
_CLI_NAMES = ("hessian_main", "HESSIAN_CLI_DEFAULTS", "load_hessian_config", "load_checkpoint")


def __getattr__(name: str) -> Any:
    if name in _CLI_NAMES:  # the one library -> app edge, allowed by tests/test_layout.py as an old import path
        from ds_conadv.app import hessian_cli

        return getattr(hessian_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
