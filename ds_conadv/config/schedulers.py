"""LR schedules DeepSpeed lacks, selectable from the ``"scheduler"`` section of a ds_conadv config.

DeepSpeed's ``WarmupDecayLR`` decays linearly after the warm-up. The LARS large-batch recipes (MLPerf
ResNet-50, the ConAdv 96K recipe) decay polynomially: ``WarmupPolyDecayLR`` is ``WarmupDecayLR`` with a
``power`` (``power: 1`` is exactly ``WarmupDecayLR``)::

    "scheduler": {"type": "WarmupPolyDecayLR",
                  "params": {"warmup_min_lr": 0, "warmup_max_lr": 43.0, "warmup_num_steps": 534,
                             "total_num_steps": 1301, "warmup_type": "linear", "power": 1.6}}

:func:`ds_conadv.config.builders.build_scheduler` builds it, and DeepSpeed's own types, for every path (DeepSpeed,
Horovod, one process); it steps with the engine at every optimizer step and checkpoints like DeepSpeed's
schedulers.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional

from deepspeed.runtime.lr_schedules import WarmupDecayLR

from ds_conadv.integrations.deepspeed import compat

from .sections import ConfigError

compat.check_scheduler_hook(WarmupDecayLR)  # WarmupPolyDecayLR overrides its private _get_gamma

__all__ = ["WarmupPolyDecayLR", "SCHEDULERS", "scheduler_class", "scheduler_factory"]


class WarmupPolyDecayLR(WarmupDecayLR):
    """Warm-up from ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps`` steps (``linear`` or
    ``log``, as DeepSpeed's), then ``lr = min_lr + (max_lr - min_lr) * ((T - t) / (T - W)) ** power`` until
    ``total_num_steps`` T (``min_lr`` after it)."""

    def __init__(self, optimizer, total_num_steps: int, warmup_min_lr: float = 0.0, warmup_max_lr: float = 0.001,
                 warmup_num_steps: int = 1000, warmup_type: str = "log", power: float = 1.0,
                 last_batch_iteration: int = -1):
        if not power > 0:
            raise ValueError(f"power must be > 0, got {power!r}")
        self.power = float(power)  # before super().__init__: it sets the first lr through _get_gamma
        super().__init__(optimizer, total_num_steps, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)

    def _get_gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return super()._get_gamma()
        return super()._get_gamma() ** self.power


#: our scheduler types, by the ``"scheduler.type"`` name that selects them
SCHEDULERS: Dict[str, type] = {"WarmupPolyDecayLR": WarmupPolyDecayLR}


def scheduler_class(type_name: Any) -> Optional[type]:
    """Our scheduler class for a config ``type`` (exact name), or None for DeepSpeed's / torch's types."""
    return SCHEDULERS.get(type_name) if isinstance(type_name, str) else None


def scheduler_factory(section: Dict[str, Any]) -> Callable:
    """Check a ``"scheduler"`` section of one of our types and return ``optimizer -> scheduler`` (what
    ``deepspeed.initialize(lr_scheduler=...)`` accepts). Unknown keys are errors naming the allowed ones."""
    cls = scheduler_class(section.get("type"))
    if cls is None:
        raise ConfigError(f'"scheduler.type" = {section.get("type")!r} is not one of ours ({", ".join(SCHEDULERS)})')
    unknown = sorted(set(section) - {"type", "params"})
    if unknown:
        raise ConfigError(f'unknown key "{unknown[0]}" in "scheduler"; allowed keys: type, params')
    params = dict(section.get("params") or {})
    allowed = [n for n in inspect.signature(cls).parameters
               if n not in ("self", "optimizer", "last_batch_iteration")]
    for key in params:
        if key not in allowed:
            raise ConfigError(f'unknown key "{key}" in "scheduler.params" for type {cls.__name__}; '
                              f'allowed keys: {", ".join(allowed)}')
    if "total_num_steps" not in params:
        raise ConfigError(f'"scheduler.params.total_num_steps" is required for type {cls.__name__}')
    for key in ("total_num_steps", "warmup_num_steps"):
        if key in params and (isinstance(params[key], bool) or not isinstance(params[key], int)
                              or params[key] < 1):
            raise ConfigError(f'"scheduler.params.{key}" = {params[key]!r}: must be a positive integer')
    if "power" in params and (isinstance(params["power"], bool) or not isinstance(params["power"], (int, float))
                              or not params["power"] > 0):
        raise ConfigError(f'"scheduler.params.power" = {params["power"]!r}: must be a number > 0')

    def build(optimizer):
        return cls(optimizer, **params)

    build.scheduler_class = cls  # type: ignore[attr-defined]
    build.params = params  # type: ignore[attr-defined]
    return build
