"""ds_conadv: fused LAMB/LARS optimizers and ConAdv large-batch training for DeepSpeed/Horovod.

Layout (docs/index.md): ``optim`` (optimizer core), ``conadv``, ``absa``, ``hessian``, ``config`` (sections,
the one optimizer builder, schedulers), ``integrations.deepspeed`` / ``integrations.horovod`` (the only modules that
know those libraries; their ``compat`` modules the only ones that touch private internals), ``app`` (the jobs and
the ``ds-conadv`` CLI on top). This module is the composition root: it wires the DeepSpeed wrapper resolver into
the optimizer core lazily, so that neither imports the other.
"""
import sys as _sys

from ds_conadv._registry import register_wrapper_resolver as _register

__version__ = "0.1.0"


def initialize(*args, **kwargs):
    """Drop-in for ``deepspeed.initialize`` (see :mod:`ds_conadv.integrations.deepspeed`)."""
    from ds_conadv.integrations.deepspeed.initialize import initialize as _initialize

    return _initialize(*args, **kwargs)


def _deepspeed_wrapper_resolver(optimizer):
    """Find the DeepSpeed wrapper that flattened ``optimizer``'s params (only when DeepSpeed is loaded)."""
    if "deepspeed" not in _sys.modules:
        return None
    from ds_conadv.integrations.deepspeed.zero_layout import resolve_wrapper

    return resolve_wrapper(optimizer)


_register(_deepspeed_wrapper_resolver)
