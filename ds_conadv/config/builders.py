"""The one optimizer builder and the one scheduler factory behind every path: ``ds_conadv.initialize`` (DeepSpeed),
the Horovod job, the single-process trainers and ``ds-conadv train`` all turn a config's ``"optimizer"`` and
``"scheduler"`` sections into objects here, so that the same section gives the same param groups and
hyper-parameters everywhere.

``"optimizer": {"type": ..., "params": {...}}``
    ``type`` ``"LAMB"`` / ``"LARS"`` (case-insensitive) is ours; with ``allow_torch=True`` (Horovod, one process)
    any ``torch.optim`` optimizer by name; anything else is DeepSpeed's own (``ds_conadv.initialize`` passes it
    through). ``params`` are the optimizer's arguments plus ``exclude_norm_and_bias``: when true the params are
    grouped by :func:`~ds_conadv.optim.param_groups` (norm weights and biases: no decay, no trust ratio) and the
    decayed group gets ``weight_decay`` from ``params``, **or the optimizer's own default when not given** (0.01 for
    LAMB) — the same default the optimizer would apply without grouping.

Gradient clipping is one knob with two spellings, ``"gradient_clipping"`` (DeepSpeed) and
``"optimizer.params.max_grad_norm"``: :func:`resolve_clipping` gives the one value, the caller decides who clips
(DeepSpeed, the optimizer's fused clipping, or the trainer for a torch optimizer).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from .sections import ConfigError, optimizer_class, validate_optimizer_params

__all__ = [
    "OptimizerSpec",
    "optimizer_spec",
    "optimizer_params",
    "build_optimizer",
    "build_from_spec",
    "resolve_clipping",
    "scheduler_factory",
    "build_scheduler",
    "AUTO",
]

#: ``"scheduler.params.total_num_steps": "auto"``: the job's steps (epochs x steps per epoch)
AUTO = "auto"


@dataclass
class OptimizerSpec:
    """A checked ``"optimizer"`` section: the class, its keyword arguments (``max_grad_norm`` apart) and the
    grouping option."""

    cls: type
    kwargs: Dict[str, Any] = field(default_factory=dict)
    exclude_norm_and_bias: bool = False
    max_grad_norm: Optional[float] = None
    ours: bool = True

    @property
    def weight_decay(self) -> float:
        """``params.weight_decay``, else the optimizer's default (what the decayed group gets)."""
        if "weight_decay" in self.kwargs:
            value: float = self.kwargs["weight_decay"]  # as given (an int stays an int, as before)
            return value
        param = inspect.signature(self.cls).parameters.get("weight_decay")
        default: Any = param.default if param is not None else None
        if default is None or default is inspect.Parameter.empty:
            return 0.0
        found: float = default
        return found


def _torch_optimizer_class(type_name: Any) -> Optional[type]:
    names = {n.lower(): n for n in dir(torch.optim)}
    name = names.get(str(type_name).lower())
    klass = getattr(torch.optim, name, None) if name else None
    return klass if isinstance(klass, type) and issubclass(klass, torch.optim.Optimizer) else None


def optimizer_spec(section: Any, *, allow_torch: bool = False) -> Optional[OptimizerSpec]:
    """Check an ``"optimizer"`` section. None for a type that is not ours (DeepSpeed's own) when ``allow_torch``
    is false; with it, a torch.optim type is accepted and any other raises."""
    if not isinstance(section, dict) or "type" not in section:
        if allow_torch:
            raise ConfigError('"optimizer" must be {"type": "LAMB" | "LARS" | ..., "params": {...}}')
        return None
    cls = optimizer_class(section.get("type", ""))
    if cls is not None:
        unknown = sorted(set(section) - {"type", "params"})
        if unknown:
            raise ConfigError(f'unknown key "{unknown[0]}" in "optimizer"; allowed keys: type, params')
        kwargs, grouping = validate_optimizer_params(cls, section.get("params"))
        clip = kwargs.pop("max_grad_norm", None)
        return OptimizerSpec(cls, kwargs, bool(grouping.get("exclude_norm_and_bias", False)), clip, True)
    if not allow_torch:
        return None
    klass = _torch_optimizer_class(section["type"])
    if klass is None:
        raise ConfigError(f'"optimizer.type" = {section["type"]!r}: LAMB, LARS or a torch.optim optimizer')
    params = dict(section.get("params") or {})
    exclude = bool(params.pop("exclude_norm_and_bias", False))
    if "betas" in params and isinstance(params["betas"], list):
        params["betas"] = tuple(params["betas"])
    return OptimizerSpec(klass, params, exclude, None, False)


def optimizer_params(
    spec: OptimizerSpec, model: Optional[nn.Module] = None, model_parameters: Optional[Iterable[Any]] = None
) -> List[Any]:
    """The params (or param groups) the optimizer is built on: from ``model`` (grouped when
    ``exclude_norm_and_bias``), or ``model_parameters`` as given."""
    from ds_conadv.optim import param_groups

    if model_parameters is not None:
        if spec.exclude_norm_and_bias:
            raise ConfigError(
                '"exclude_norm_and_bias" builds the groups from model=; it cannot be combined with model_parameters='
            )
        return list(model_parameters)
    if model is None:
        raise ConfigError("building the optimizer from the config needs model= or model_parameters=")
    if spec.exclude_norm_and_bias:
        return param_groups(model, spec.weight_decay)
    return [p for p in model.parameters() if p.requires_grad]


def resolve_clipping(gradient_clipping: Any, max_grad_norm: Optional[float]) -> Optional[float]:
    """The one clipping norm from ``"gradient_clipping"`` and ``"optimizer.params.max_grad_norm"`` (equal if both
    are given; 0 or null: none)."""
    clip = float(gradient_clipping) if gradient_clipping else None
    if max_grad_norm is not None:
        if clip is not None and clip != float(max_grad_norm):
            raise ConfigError(
                f'"optimizer.params.max_grad_norm" = {max_grad_norm} and "gradient_clipping" = '
                f"{gradient_clipping} disagree; they are the same knob: give one, or equal values"
            )
        clip = float(max_grad_norm)
    return clip


def build_optimizer(
    section: Any,
    model: Optional[nn.Module] = None,
    *,
    model_parameters: Optional[Iterable[Any]] = None,
    max_grad_norm: Optional[float] = None,
    allow_torch: bool = False,
) -> Optional[torch.optim.Optimizer]:
    """The optimizer of an ``"optimizer"`` section (see the module docstring), or None for a type that is not ours
    when ``allow_torch`` is false. ``max_grad_norm`` is what our optimizer clips to (the caller resolves it with
    :func:`resolve_clipping`: None when DeepSpeed clips); it is ignored for torch optimizers."""
    spec = optimizer_spec(section, allow_torch=allow_torch)
    if spec is None:
        return None
    return build_from_spec(spec, optimizer_params(spec, model, model_parameters), max_grad_norm)


def build_from_spec(spec: OptimizerSpec, params: List[Any], max_grad_norm: Optional[float] = None) -> Any:
    """``spec``'s optimizer on ``params`` (from :func:`optimizer_params`)."""
    kwargs = dict(spec.kwargs)
    if spec.ours:
        kwargs["max_grad_norm"] = max_grad_norm
    return spec.cls(params, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# schedulers
# ----------------------------------------------------------------------------------------------------------
def _scheduler_classes(type_name: Any) -> Optional[type]:
    """Our scheduler class for ``type_name``, else DeepSpeed's of that name, else None."""
    from .schedulers import scheduler_class

    cls = scheduler_class(type_name)
    if cls is not None:
        return cls
    from deepspeed.runtime import lr_schedules as ds_schedules

    found = getattr(ds_schedules, str(type_name), None)
    return found if isinstance(found, type) else None


def scheduler_factory(section: Dict[str, Any], total_steps: Optional[int] = None) -> Callable[[Any], Any]:
    """Check a ``"scheduler"`` section (ours: :data:`~ds_conadv.config.schedulers.SCHEDULERS`, or a DeepSpeed
    scheduler type) and return ``optimizer -> scheduler`` (what ``deepspeed.initialize(lr_scheduler=...)``
    accepts). ``"total_num_steps": "auto"`` becomes ``total_steps``."""
    if not isinstance(section, dict) or "type" not in section:
        raise ConfigError('"scheduler" must be {"type": ..., "params": {...}}')
    params = dict(section.get("params") or {})
    if params.get("total_num_steps") == AUTO:
        if total_steps is None:
            raise ConfigError('"scheduler.params.total_num_steps" = "auto" needs the job\'s step count')
        params["total_num_steps"] = int(total_steps)
    section = {**section, "params": params}
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    from .schedulers import scheduler_class
    from .schedulers import scheduler_factory as ours

    if scheduler_class(section["type"]) is not None:
        return ours(section)
    cls = _scheduler_classes(section["type"])
    if cls is None:
        raise ConfigError(f'"scheduler.type" = {section["type"]!r}: not WarmupPolyDecayLR nor a DeepSpeed scheduler')

    def build(optimizer: Any) -> Any:
        return cls(optimizer, **params)

    build.scheduler_class = cls  # type: ignore[attr-defined]
    build.params = params  # type: ignore[attr-defined]
    return build


def build_scheduler(section: Optional[Dict[str, Any]], optimizer: Any, total_steps: Optional[int] = None) -> Any:
    """The LR scheduler of a ``"scheduler"`` section on ``optimizer`` (None without a section), DeepSpeed's
    construction-time log line silenced."""
    if section is None:
        return None
    factory = scheduler_factory(section, total_steps)
    import logging

    from ds_conadv.integrations.deepspeed import compat

    with compat.log_level(logging.ERROR):  # "lr before the scheduler started" at construction
        return factory(optimizer)
