"""Swap-ins for code written against apex: ``FusedLAMB`` and ``LARC``.

``FusedLAMB`` takes apex FusedLAMB's arguments and is our :class:`~ds_conadv.optim.LAMB`:

=====================  ===========================================================================
apex FusedLAMB          ds_conadv
=====================  ===========================================================================
``use_nvlamb``          ``always_adapt`` (trust ratio also for weight_decay == 0 groups)
``max_grad_norm=1.0``   ``max_grad_norm`` (same default: global clipping is on, as in apex);
                        ``0``/``None`` turns it off (apex divides by zero there)
``set_grad_none``       ``zero_grad()`` default ``set_to_none``
``amsgrad``             rejected, as apex does
``adam_w_mode``,        same meaning
``grad_averaging``,
``bias_correction``
=====================  ===========================================================================

Deliberate differences: fp32 state for bf16/fp16 params (apex keeps state in the param dtype), bf16 support,
inf/NaN gradients skip the step instead of writing NaNs, CPU tensors work.

``LARC(optimizer, trust_coefficient=0.02, clip=True, eps=1e-8)`` wraps any optimizer like apex LARC: before
the inner step each gradient becomes ``r * (g + wd * p)`` with the LARS trust ratio ``r`` (the same formula
and kernels as :class:`~ds_conadv.optim.LARS`) and the inner optimizer runs with ``weight_decay = 0``.
``LARC(torch.optim.SGD(...))`` therefore equals ``LARS(..., trust_clip=clip)``. Differences from apex: norms
are taken in fp32 for fp16/bf16 grads (apex takes fp16 norms, which overflow: apex issue #1030 family), all
norms are computed in one multi-tensor pass without per-tensor host syncs, and a tensor with a zero gradient
norm keeps its weight decay (apex drops it for that step).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.optim import Optimizer

from . import functional as F
from .backends import check_backend_name, get_kernels
from .lamb import LAMB


class FusedLAMB(LAMB):
    """apex.optimizers.FusedLAMB's signature on top of :class:`LAMB` (see the module docstring)."""

    def __init__(self, params, lr: float = 1e-3, bias_correction: bool = True, betas=(0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, amsgrad: bool = False, adam_w_mode: bool = True,
                 grad_averaging: bool = True, set_grad_none: bool = True, max_grad_norm: Optional[float] = 1.0,
                 use_nvlamb: bool = False, backend: str = "auto", **lamb_options):
        if amsgrad:
            raise RuntimeError("FusedLAMB does not support the AMSGrad variant (amsgrad=True).")
        if max_grad_norm is not None and max_grad_norm <= 0:
            max_grad_norm = None
        self.set_grad_none = set_grad_none
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         bias_correction=bias_correction, grad_averaging=grad_averaging, adam_w_mode=adam_w_mode,
                         always_adapt=use_nvlamb, max_grad_norm=max_grad_norm, backend=backend, **lamb_options)

    def zero_grad(self, set_to_none: Optional[bool] = None):
        super().zero_grad(set_to_none=getattr(self, "set_grad_none", True) if set_to_none is None else set_to_none)


class LARC:
    """apex.parallel.LARC: LARS trust ratios around any optimizer (see the module docstring)."""

    def __init__(self, optimizer: Optimizer, trust_coefficient: float = 0.02, clip: bool = True, eps: float = 1e-8,
                 backend: str = "auto"):
        if trust_coefficient <= 0:
            raise ValueError(f"trust_coefficient={trust_coefficient!r} must be > 0")
        self.optim = optimizer
        self.trust_coefficient = trust_coefficient
        self.clip = clip
        self.eps = eps
        self.backend = check_backend_name(backend)

    # behave like the wrapped optimizer
    def __getstate__(self):
        return self.optim.__getstate__()

    def __setstate__(self, state):
        self.optim.__setstate__(state)

    @property
    def state(self):
        return self.optim.state

    @property
    def param_groups(self):
        return self.optim.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optim.param_groups = value

    @property
    def defaults(self):
        return self.optim.defaults

    def __repr__(self):
        return f"LARC({self.optim!r}, trust_coefficient={self.trust_coefficient}, clip={self.clip})"

    def state_dict(self):
        return self.optim.state_dict()

    def load_state_dict(self, state_dict):
        self.optim.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True):
        self.optim.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group):
        self.optim.add_param_group(param_group)

    @torch.no_grad()
    def _scale_group_grads(self, group) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        kernels = get_kernels(self.backend, params[0].device)
        p_sq = kernels.sumsq(params, None, len(params))
        g_sq = kernels.sumsq(grads, None, len(grads))
        weight_decay = group.get("weight_decay", 0.0)
        ratio = F.lars_trust_ratio(p_sq.sqrt(), g_sq.sqrt(), lr=group["lr"], weight_decay=weight_decay,
                                   always_adapt=True, trust_coefficient=self.trust_coefficient, eps=self.eps,
                                   trust_clip=self.clip)
        if weight_decay != 0:
            torch._foreach_add_(grads, params, alpha=weight_decay)
        torch._foreach_mul_(grads, list(ratio.to(grads[0].dtype).unbind(0)))

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        saved = []
        for group in self.optim.param_groups:
            saved.append(group.get("weight_decay", 0.0))
            self._scale_group_grads(group)
            group["weight_decay"] = 0.0
        try:
            self.optim.step()
        finally:
            for group, weight_decay in zip(self.optim.param_groups, saved):
                group["weight_decay"] = weight_decay
        return loss
