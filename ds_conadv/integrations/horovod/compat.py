"""The one place that touches Horovod's (and, for the scheduler repoint, torch's) private internals, with the
Horovod versions this integration is written and tested against (``setup.py``'s ``horovod`` extra).

* :func:`repoint_scheduler` — redoes torch's private ``step`` patch of ``LRScheduler`` (``_wrapped_by_lr_sched``,
  ``_opt_called``) on the optimizer that ``hvd.DistributedOptimizer`` rebuilt; without it torch warns on every
  ``scheduler.step()`` (nothing else breaks);
* :func:`elastic_object_state` — ``horovod.common.elastic.ObjectState`` (not re-exported by ``horovod.torch``);
* ``DistributedOptimizer.set_backward_passes_per_step`` (ABSA's growing batch) needs Horovod >= 0.21.
"""

from __future__ import annotations

import functools
import re
import warnings
import weakref
from typing import Any, Tuple

import torch

__all__ = [
    "SUPPORTED",
    "MIN_VERSION",
    "MAX_VERSION",
    "HorovodCompatWarning",
    "check_version",
    "repoint_scheduler",
    "elastic_object_state",
]

MIN_VERSION = "0.28.1"
MAX_VERSION = "0.29"  # exclusive
SUPPORTED = f">={MIN_VERSION},<{MAX_VERSION}"


class HorovodCompatWarning(RuntimeWarning):
    """Horovod is outside the supported range, or a private part this integration uses is missing."""


def _version_tuple(text: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


_checked = False


def check_version(version: Any = None) -> bool:
    """Whether ``version`` (default: the installed Horovod's) is in :data:`SUPPORTED`; warns (once) if not."""
    global _checked
    if version is None:
        if _checked:
            return True
        _checked = True
        import horovod

        version = getattr(horovod, "__version__", "0")
    v = _version_tuple(str(version))
    if _version_tuple(MIN_VERSION) <= v < _version_tuple(MAX_VERSION):
        return True
    warnings.warn(
        f"ds_conadv supports Horovod {SUPPORTED}, this is {version}: DistributedOptimizer's rebuild (checked "
        "at wrap time), set_backward_passes_per_step (ABSA) and horovod.common.elastic.ObjectState "
        "(ElasticConAdvState) may differ",
        HorovodCompatWarning,
        stacklevel=2,
    )
    return False


def repoint_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Point an LR scheduler built on the original optimizer at its Horovod rebuild. The rebuild shares the
    param-group dicts, so the learning rates already reach it; this also redoes torch's ``step`` patch that
    tells the scheduler the optimizer stepped (else torch warns on every ``scheduler.step()``)."""
    scheduler.optimizer = optimizer
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler) or hasattr(
        optimizer.step, "_wrapped_by_lr_sched"
    ):
        return
    opt_ref, func = weakref.ref(optimizer), optimizer.step.__func__  # type: ignore[attr-defined]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = opt_ref()
        opt._opt_called = True  # type: ignore[union-attr]
        return func.__get__(opt, opt.__class__)(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]


def elastic_object_state() -> type:
    """Horovod's ``ObjectState`` (the base of :func:`~.elastic.ElasticConAdvState`)."""
    try:
        from horovod.common.elastic import ObjectState
    except ImportError as exc:
        raise ImportError(
            f"horovod.common.elastic.ObjectState is missing (ds_conadv supports Horovod {SUPPORTED}): "
            f"ElasticConAdvState needs it ({exc})"
        ) from exc
    return ObjectState
