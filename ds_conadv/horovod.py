"""``ds_conadv.horovod``: short name for :mod:`ds_conadv.integrations.horovod` (Horovod glue; see docs/horovod.md).
Importing it does not import Horovod; :func:`train_horovod` is the main job under ``horovodrun``."""
from ds_conadv.integrations.horovod import *  # noqa: F401,F403
from ds_conadv.integrations.horovod import __all__ as _glue_all
from ds_conadv.integrations.horovod_train import train_horovod  # noqa: F401

__all__ = list(_glue_all) + ["train_horovod"]
