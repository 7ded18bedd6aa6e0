"""Old import path of :mod:`ds_conadv.config.schedulers`."""
from ds_conadv.config.schedulers import SCHEDULERS, WarmupPolyDecayLR, scheduler_class, scheduler_factory

__all__ = ["WarmupPolyDecayLR", "SCHEDULERS", "scheduler_class", "scheduler_factory"]
