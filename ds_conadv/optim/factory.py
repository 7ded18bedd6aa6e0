"""``create_optimizer("lamb", model_or_params, **kwargs)``: our optimizers by the names users type (timm-style).

Names (case, ``-`` and ``_`` ignored): ``lamb``; ``lambc`` (LAMB with ``trust_clip=True``, timm); ``fusedlamb``
(:class:`~ds_conadv.optim.FusedLAMB`, apex's signature and defaults: global clipping at 1.0); ``lars``;
``larc`` (LARS with ``trust_clip=True``: apex LARC's clip mode, timm ``larc``); ``nlars`` / ``nlarc`` (the same
with Nesterov momentum, timm). Keyword arguments are the class's own, plus the aliases of
:mod:`ds_conadv.optim.aliases`.

Given an ``nn.Module``, the params are split as timm's ``filter_bias_and_bn`` and the MLPerf recipe do
(:func:`~ds_conadv.optim.param_groups`: no weight decay and no trust ratio for norm layers, biases and 1-D
params) unless ``filter_bias_and_norm=False`` or the weight decay is 0.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Dict, Iterable, Tuple, Type, Union

from torch import nn

from .apex_compat import FusedLAMB
from .base import TrustRatioOptimizer
from .groups import param_groups
from .lamb import LAMB
from .lars import LARS

__all__ = ["create_optimizer", "OPTIMIZER_NAMES", "TORCH_OPTIM_NAMES"]

#: name -> (class, arguments the name implies)
OPTIMIZER_NAMES: Dict[str, Tuple[Type[TrustRatioOptimizer], Dict[str, Any]]] = {
    "lamb": (LAMB, {}),
    "lambc": (LAMB, {"trust_clip": True}),
    "fusedlamb": (FusedLAMB, {}),
    "lars": (LARS, {}),
    "larc": (LARS, {"trust_clip": True}),
    "nlars": (LARS, {"nesterov": True}),
    "nlarc": (LARS, {"nesterov": True, "trust_clip": True}),
}

#: the names under which ``import ds_conadv`` registers our classes in ``torch.optim``: a DeepSpeed config's
#: ``"optimizer": {"type": "ds_conadv.LAMB"}`` then builds ours under plain ``deepspeed.initialize`` (DeepSpeed
#: looks a type that is not one of its own up as ``getattr(torch.optim, type)``; ``"LAMB"`` is its FusedLamb)
TORCH_OPTIM_NAMES: Dict[str, Type[TrustRatioOptimizer]] = {"ds_conadv.LAMB": LAMB, "ds_conadv.LARS": LARS}


def _key(name: str) -> str:
    return str(name).strip().lower().replace("-", "").replace("_", "")


def create_optimizer(name: str, model_or_params: Union[nn.Module, Iterable], *, filter_bias_and_norm: bool = True,
                     **kwargs) -> TrustRatioOptimizer:
    """Build the optimizer called ``name`` (see the module docstring) on a model or params/param groups."""
    if not isinstance(name, str):
        raise TypeError(f"create_optimizer: the name must be a string, got {type(name).__name__}")
    key = _key(name)
    if key not in OPTIMIZER_NAMES:
        close = difflib.get_close_matches(key, OPTIMIZER_NAMES, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"create_optimizer: unknown optimizer {name!r}; {hint}allowed: {', '.join(OPTIMIZER_NAMES)}")
    cls, implied = OPTIMIZER_NAMES[key]
    for option, value in implied.items():
        if option in kwargs and kwargs[option] != value:
            raise ValueError(f"create_optimizer: {name!r} means {option}={value!r}, but {option}={kwargs[option]!r} "
                             f"was given; use {'lamb' if cls is LAMB else 'lars'!r} for that")
    kwargs = {**implied, **kwargs}
    params = model_or_params
    if isinstance(model_or_params, nn.Module):
        weight_decay = kwargs.get("weight_decay", inspect.signature(cls).parameters["weight_decay"].default)
        if filter_bias_and_norm and weight_decay:
            params = param_groups(model_or_params, weight_decay)
        else:
            params = [p for p in model_or_params.parameters() if p.requires_grad]
    return cls(params, **kwargs)
