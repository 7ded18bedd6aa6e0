"""LAMB (You et al., 2019) with the knobs of apex FusedLAMB, DeepSpeed FusedLamb, timm and ColossalAI."""
from __future__ import annotations

import inspect
from typing import Optional, Tuple

from . import functional as F
from .aliases import LAMB_RENAMES, resolve
from .base import TrustRatioOptimizer, _check_bool, _check_float


class LAMB(TrustRatioOptimizer):
    r"""Layer-wise Adaptive Moments for Batch training.

    Per tensor, after optional global clipping of all gradients to ``max_grad_norm``::

        g  <- g + wd * p                         (only when adam_w_mode=False: L2 folded into the moments)
        m  <- b1 * m + (1 - b1 if grad_averaging else 1) * g
        v  <- b2 * v + (1 - b2) * g^2
        u  <- (m / bc1) / (sqrt(v / bc2) + eps)  (+ wd * p when adam_w_mode=True: decoupled decay)
        r  <- ||p|| / ||u||  if both > 0 else 1, clamped to [min_trust_ratio, max_trust_ratio],
              min(r, 1) if trust_clip; r = 1 unless weight_decay != 0 or always_adapt
        p  <- p - lr * r * u

    with ``bc1 = 1 - b1^t``, ``bc2 = 1 - b2^t`` when ``bias_correction`` (else 1).

    Args:
        params: iterable of params or param groups (every argument below can be set per group, except
            ``max_grad_norm`` which is one norm over all groups).
        always_adapt: apply the trust ratio also to groups with ``weight_decay == 0`` (apex ``use_nvlamb``).
        trust_clip: clip the trust ratio at 1 (timm ``trust_clip``).
        min_trust_ratio, max_trust_ratio: clamp the trust ratio (DeepSpeed FusedLamb ``min_coeff``/``max_coeff``).
        max_grad_norm: clip all gradients together to this global L2 norm first (apex FusedLAMB).
        skip_nonfinite: a step whose gradients hold inf/NaN anywhere (any group, any rank under ZeRO) is
            skipped, params and state untouched, and counted in ``skipped_steps``. Costs one read of the
            gradients when ``max_grad_norm`` is not set (with clipping the norm is taken anyway); ``False``
            drops that pass and lets inf/NaN reach the params, as torch's optimizers do.
        master_weights: keep an fp32 master copy of bf16/fp16 params (state is fp32 in any case).
        backend: ``"auto"``, ``"reference"``, ``"foreach"``, ``"cpp"``, ``"triton"`` or ``"cuda"``
            (see :mod:`ds_conadv.optim.backends`).
        **aliases: names from other libraries (:mod:`ds_conadv.optim.aliases`): DeepSpeed ``max_coeff`` /
            ``min_coeff``, apex ``use_nvlamb``, torch ``foreach`` / ``fused`` (as ``backend``); switches such as
            timm's ``caution`` only at the value that is our behaviour. Others: TypeError with "did you mean".

    Works with ``torch.amp.GradScaler`` (unscaling and inf/NaN skipping happen inside the step) and LR
    schedulers; ``lr`` may be a 0-d tensor. After each step, ``trust_ratios[i]`` holds group i's per-tensor
    trust ratios as a device tensor (no host sync).
    """

    _state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, bias_correction: bool = True, grad_averaging: bool = True,
                 adam_w_mode: bool = True, always_adapt: bool = False, trust_clip: bool = False,
                 min_trust_ratio: Optional[float] = None, max_trust_ratio: Optional[float] = None,
                 max_grad_norm: Optional[float] = None, master_weights: bool = False, backend: str = "auto",
                 skip_nonfinite: bool = True, **aliases):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, grad_averaging=grad_averaging, adam_w_mode=adam_w_mode,
                        always_adapt=always_adapt, trust_clip=trust_clip, min_trust_ratio=min_trust_ratio,
                        max_trust_ratio=max_trust_ratio, max_grad_norm=max_grad_norm,
                        master_weights=master_weights, backend=backend,
                        skip_nonfinite=skip_nonfinite)
        if aliases:
            defaults = resolve(type(self).__name__, defaults, aliases, LAMB_RENAMES, _LAMB_DEFAULTS)
        super().__init__(params, defaults)

    def _validate_hyperparameters(self, group: dict) -> None:
        lr = group["lr"]
        if not hasattr(lr, "item"):
            _check_float("lr", lr, low=0.0)
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas={betas!r} must be a pair (beta1, beta2)")
        _check_float("betas[0]", betas[0], low=0.0, high=1.0)
        _check_float("betas[1]", betas[1], low=0.0, high=1.0)
        _check_float("eps", group["eps"], low=0.0)
        _check_float("weight_decay", group["weight_decay"], low=0.0)
        for key in ("bias_correction", "grad_averaging", "adam_w_mode", "always_adapt", "trust_clip", "master_weights"):
            _check_bool(key, group[key])
        lo, hi = group["min_trust_ratio"], group["max_trust_ratio"]
        for key, value in (("min_trust_ratio", lo), ("max_trust_ratio", hi)):
            if value is not None:
                _check_float(key, value, low=0.0)
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"min_trust_ratio={lo} is larger than max_trust_ratio={hi}")

    def _update(self, group, seg, kernels, coef, skip, hook):
        beta1, beta2 = group["betas"]
        return F.lamb_update(
            seg, kernels=kernels, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], bias_correction=group["bias_correction"],
            grad_averaging=group["grad_averaging"], adam_w_mode=group["adam_w_mode"],
            always_adapt=group["always_adapt"], trust_clip=group["trust_clip"],
            min_trust_ratio=group["min_trust_ratio"], max_trust_ratio=group["max_trust_ratio"],
            grad_coef=coef, skip=skip, norm_hook=hook)


_LAMB_DEFAULTS = {name: p.default for name, p in inspect.signature(LAMB.__init__).parameters.items()
                  if p.default is not inspect.Parameter.empty}
