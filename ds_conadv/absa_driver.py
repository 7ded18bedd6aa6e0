"""Old import path: ABSA's driver is :mod:`ds_conadv.absa.driver`; its DeepSpeed engine and Horovod trainer live
with their integrations."""
from ds_conadv.absa.driver import *  # noqa: F401,F403
from ds_conadv.absa.driver import __all__ as _driver_all
from ds_conadv.integrations.deepspeed.engine import DeepSpeedABSAEngine  # noqa: F401
from ds_conadv.integrations.horovod.trainers import HorovodABSATrainer  # noqa: F401

__all__ = list(_driver_all) + ["DeepSpeedABSAEngine", "HorovodABSATrainer"]
