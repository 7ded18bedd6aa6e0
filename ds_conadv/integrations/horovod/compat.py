"""The one place that touches Horovod's private internals, with the Horovod versions this integration is written
and tested against (``pyproject.toml``'s ``horovod`` extra).

* :func:`repoint_scheduler` (from :mod:`ds_conadv.torch_compat`, which owns torch's private ``step`` patch) points
  an LR scheduler at the optimizer that ``hvd.DistributedOptimizer`` rebuilt;
* :func:`elastic_object_state` — ``horovod.common.elastic.ObjectState`` (not re-exported by ``horovod.torch``);
* ``DistributedOptimizer.set_backward_passes_per_step`` (ABSA's growing batch) needs Horovod >= 0.21.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Tuple

from ds_conadv.torch_compat import repoint_scheduler

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
