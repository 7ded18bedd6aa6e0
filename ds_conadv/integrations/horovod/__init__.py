"""Horovod integration: our LAMB/LARS (or any optimizer) under ``hvd.DistributedOptimizer``, state broadcast, the
ConAdv and ABSA trainers for ``horovodrun`` and elastic state. Importing it does not import Horovod; see
docs/horovod.md.

* :mod:`.optimizer` — ``distributed_optimizer`` (rebuild checked), ``broadcast_state``, ``require_horovod``;
* :mod:`.trainers` — ``HorovodConAdvTrainer`` (generation overlapped with the async allreduce),
  ``HorovodABSATrainer``;
* :mod:`.elastic` — ``ElasticConAdvState``;
* :mod:`.compat` — the only module that touches Horovod's / torch's private parts, with the supported range.

``ds_conadv.horovod`` is the same package under a short name.
"""
from .compat import repoint_scheduler
from .elastic import ElasticConAdvState
from .optimizer import _is_distributed_optimizer as _is_distributed_optimizer  # the old private name
from .optimizer import (INSTALL_HINT, available, broadcast_state, check_settings_survived,
                        distributed_optimizer, group_settings, is_distributed_optimizer, require_horovod)
from .trainers import HorovodABSATrainer, HorovodConAdvTrainer

_repoint_scheduler = repoint_scheduler  # the old private name

__all__ = ["available", "require_horovod", "group_settings", "check_settings_survived", "distributed_optimizer",
           "broadcast_state", "HorovodConAdvTrainer", "ElasticConAdvState", "INSTALL_HINT",
           "is_distributed_optimizer", "repoint_scheduler", "HorovodABSATrainer"]
