"""ABSA: adaptive batch size with adversarial training, driven by the top Hessian eigenvalue.

* :mod:`.policy` — the ``"absa"`` section (:class:`ABSAConfig`) and :class:`ABSASchedule` (pure logic);
* :mod:`.driver` — :class:`ABSADriver` (the loop), :class:`ABSATrainer` (one process).

The DeepSpeed engine and the Horovod trainer live with their integrations
(:class:`ds_conadv.integrations.deepspeed.engine.DeepSpeedABSAEngine`,
:class:`ds_conadv.integrations.horovod.trainers.HorovodABSATrainer`).
"""
from .driver import LOG_FIELDS, ABSADriver, ABSATrainer, ScaledLRScheduler, adversarial_count, attack_config
from .policy import (ABSAConfig, ABSAEpoch, ABSASchedule, accumulation_steps, check_reachable_batches, plot_log,
                     reachable_batches)

__all__ = ["ABSAConfig", "ABSASchedule", "ABSAEpoch", "accumulation_steps", "reachable_batches",
           "check_reachable_batches", "plot_log", "ABSADriver", "ABSATrainer", "ScaledLRScheduler",
           "attack_config", "adversarial_count", "LOG_FIELDS"]
