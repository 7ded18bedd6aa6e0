"""LARS (You et al., 2017) with the knobs of apex LARC, timm Lars and the MLPerf ResNet recipe."""
from __future__ import annotations

import inspect
from typing import Optional

from . import functional as F
from .aliases import LARS_RENAMES, resolve
from .base import TrustRatioOptimizer, _check_bool, _check_float


class LARS(TrustRatioOptimizer):
    r"""Layer-wise Adaptive Rate Scaling on top of SGD with momentum.

    Per tensor, after optional global clipping of all gradients to ``max_grad_norm``::

        d   <- g + wd * p
        r   <- tc * ||p|| / (||g|| + wd * ||p|| + eps)   if (wd != 0 or always_adapt) and ||p||, ||g|| > 0
               min(r / lr, 1) instead when trust_clip (apex LARC clip mode), else r = 1
        d   <- r * d
        buf <- d on the first step, else momentum * buf + (1 - dampening) * d   (momentum > 0)
        d   <- d + momentum * buf if nesterov else buf                          (momentum = 0: d as is)
        p   <- p - lr * d

    Args: as :class:`torch.optim.SGD` plus ``trust_coefficient`` (eta), ``eps``, ``trust_clip``,
    ``always_adapt``, ``max_grad_norm`` (global clipping), ``skip_nonfinite`` (inf/NaN gradients skip the step),
    ``master_weights`` and ``backend`` (see :class:`~ds_conadv.optim.LAMB`). Aliases: timm's ``trust_coeff`` and
    ``eta`` for ``trust_coefficient``, torch's ``foreach`` / ``fused`` for ``backend``
    (:mod:`ds_conadv.optim.aliases`).
    """

    _state_names = ("momentum_buffer",)
    _pass1_sums_grads = True  # skip_nonfinite reads its verdict off pass 1 (base.py): no pass of its own

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, dampening: float = 0.0,
                 weight_decay: float = 1e-4, nesterov: bool = False, trust_coefficient: float = 0.001,
                 eps: float = 1e-8, trust_clip: bool = False, always_adapt: bool = False,
                 max_grad_norm: Optional[float] = None, master_weights: bool = False, backend: str = "auto",
                 skip_nonfinite: bool = True, **aliases):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, trust_coefficient=trust_coefficient, eps=eps, trust_clip=trust_clip,
                        always_adapt=always_adapt, max_grad_norm=max_grad_norm, master_weights=master_weights,
                        backend=backend, skip_nonfinite=skip_nonfinite)
        if aliases:
            defaults = resolve(type(self).__name__, defaults, aliases, LARS_RENAMES, _LARS_DEFAULTS)
        super().__init__(params, defaults)

    def _validate_hyperparameters(self, group: dict) -> None:
        lr = group["lr"]
        if not hasattr(lr, "item"):
            _check_float("lr", lr, low=0.0)
        _check_float("momentum", group["momentum"], low=0.0, high=1.0)  # >= 1 never forgets: the buffer grows
        _check_float("dampening", group["dampening"], low=0.0)
        _check_float("weight_decay", group["weight_decay"], low=0.0)
        _check_float("trust_coefficient", group["trust_coefficient"], low=0.0, low_open=True)
        _check_float("eps", group["eps"], low=0.0)
        for key in ("nesterov", "trust_clip", "always_adapt", "master_weights"):
            _check_bool(key, group[key])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0")
        if group["trust_clip"] and not hasattr(lr, "item") and lr == 0:
            raise ValueError("trust_clip=True divides by lr: lr must be > 0")

    def _update(self, group, seg, kernels, coef, skip, hook, sums=None):
        return F.lars_update(
            seg, kernels=kernels, lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
            weight_decay=group["weight_decay"], nesterov=group["nesterov"],
            trust_coefficient=group["trust_coefficient"], eps=group["eps"], trust_clip=group["trust_clip"],
            always_adapt=group["always_adapt"], grad_coef=coef, skip=skip, norm_hook=hook, sums=sums)

    def _pass1(self, seg, kernels):
        return F.lars_sums(seg, kernels=kernels)


_LARS_DEFAULTS = {name: p.default for name, p in inspect.signature(LARS.__init__).parameters.items()
                  if p.default is not inspect.Parameter.empty}
