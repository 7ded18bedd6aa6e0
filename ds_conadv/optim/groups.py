"""The MLPerf / LARS recipe: no weight decay and no trust ratio for norm weights and biases."""
from __future__ import annotations

import fnmatch
from typing import Callable, Iterable, List, Union

import torch.nn as nn

from ds_conadv.torch_compat import BatchNormBase, InstanceNormBase

_NORM_TYPES = (BatchNormBase, nn.LayerNorm, nn.GroupNorm, InstanceNormBase,
               nn.LocalResponseNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

Skip = Union[Iterable[str], Callable[[str, nn.Parameter], bool], None]


def param_groups(model: nn.Module, weight_decay: float, skip: Skip = (), exclude_1d: bool = True,
                 **group_options) -> List[dict]:
    """Two param groups for LAMB/LARS: ``[decayed, excluded]``.

    Excluded (``weight_decay=0``, ``always_adapt=False``, so neither decay nor trust ratio applies):
    weights and biases of normalization layers (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm),
    every bias, every 1-D param when ``exclude_1d`` (timm's rule), and names matching ``skip`` — glob patterns
    (``"*.pos_embed"``) or a predicate ``skip(name, param) -> bool``. Frozen params are left out.
    ``group_options`` (e.g. ``lr``) are added to both groups. Empty groups are dropped.
    """
    if isinstance(skip, str):
        skip = (skip,)
    matches = skip if callable(skip) else (lambda name, _p, pats=tuple(skip or ()): any(
        fnmatch.fnmatchcase(name, pat) for pat in pats))
    norm_params = {id(p) for m in model.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        excluded = (id(p) in norm_params or name.endswith("bias") or (exclude_1d and p.ndim <= 1)
                    or matches(name, p))
        (no_decay if excluded else decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay, **group_options),
              dict(params=no_decay, weight_decay=0.0, always_adapt=False, **group_options)]
    return [g for g in groups if g["params"]]
