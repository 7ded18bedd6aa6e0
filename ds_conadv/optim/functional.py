"""The LAMB and LARS formulas, written once.

Everything a backend shares lives here:

* the scalar formulas (global clip coefficient, bias corrections, LAMB and LARS trust ratios), computed on
  small per-tensor vectors with torch ops, on the parameters' device, with no host sync;
* the orchestration of a step (norm pass -> optional all-reduce hook -> trust ratios -> update pass);
* the *reference kernels*: a readable per-tensor PyTorch implementation of the two passes, the oracle every
  fast backend (foreach, C++, Triton, CUDA) is tested against.

A backend is a "kernel set": an object with the four pass functions of :class:`ReferenceKernels`. It only
does element-wise work and sums of squares; it never decides a trust ratio.

Tensors are handled as *segments*: segment ``s`` is ``params[s]`` (any shape, treated as flat) and belongs to
norm id ``seg_ids[s]``. Normally segment == tensor == id. Under DeepSpeed ZeRO a segment is the fragment of
one original parameter that lives in this rank's flat partition; several segments (on several ranks) share
one id, and ``norm_hook`` all-reduces the per-id partial sums of squares before the trust ratios are taken.

Semantics (per original tensor, after optional global clipping ``g <- g * min(1, max_norm / ||all g||)``):

LAMB::

    g  <- g + wd * p                      (only when not adam_w_mode)
    m  <- b1 * m + (1 - b1 if grad_averaging else 1) * g
    v  <- b2 * v + (1 - b2) * g^2
    u  <- (m / bc1) / (sqrt(v / bc2) + eps)   (+ wd * p when adam_w_mode)
    r  <- ||p|| / ||u|| if both > 0 else 1; clamp to [min_trust_ratio, max_trust_ratio]; min(r, 1) if trust_clip
    r  <- 1 unless (wd != 0 or always_adapt)
    p  <- p - lr * r * u

LARS::

    d  <- g + wd * p
    r  <- tc * ||p|| / (||g|| + wd * ||p|| + eps) if (wd != 0 or always_adapt) and ||p||, ||g|| > 0 else 1
          (trust_clip: r <- min(r / lr, 1) on the adapted tensors, apex LARC's clip mode)
    d  <- r * d
    buf <- d on the first step, else momentum * buf + (1 - dampening) * d
    d  <- d + momentum * buf if nesterov else buf
    p  <- p - lr * d
    (momentum = 0: buf = d every step, so dampening is ignored, as in torch.optim.SGD and timm)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor

Scalar = Union[float, Tensor]
NormHook = Optional[Callable[[Tensor], None]]

__all__ = [
    "Segments",
    "ReferenceKernels",
    "clip_coefficient",
    "bias_corrections",
    "lamb_trust_ratio",
    "lars_trust_ratio",
    "lamb_update",
    "lars_update",
    "lars_sums",
    "grad_sumsq",
]


@dataclass
class Segments:
    """The tensors of one param group as a kernel sees them.

    ``params`` are the tensors updated in fp32 (fp32 params, or fp32 master copies); ``model_params`` are the
    low-precision params that receive a rounded copy when master weights are kept (else ``None``).
    ``seg_ids`` maps each segment to a norm id (``None``: segment ``s`` is id ``s``).
    """

    params: List[Tensor]
    grads: List[Tensor]
    states: List[List[Tensor]]  # LAMB: [exp_avgs, exp_avg_sqs]; LARS: [momentum_buffers]
    steps: Tensor  # float32 [n_seg], already incremented for this step
    model_params: Optional[List[Tensor]] = None
    seg_ids: Optional[Tensor] = None  # int64 [n_seg] on the params' device
    num_ids: Optional[int] = None

    def __post_init__(self):
        if self.num_ids is None:
            self.num_ids = len(self.params)

    def ids_list(self) -> List[int]:
        if self.seg_ids is None:
            return list(range(len(self.params)))
        return self.seg_ids.tolist()


# ----------------------------------------------------------------------------------------------------------
# Scalar formulas (vectors over norm ids), shared by every backend.
# ----------------------------------------------------------------------------------------------------------
def clip_coefficient(total_norm: Tensor, max_grad_norm: float) -> Tensor:
    """min(1, max_grad_norm / total_norm) without a host sync; 1 for a zero norm, NaN for a NaN norm."""
    return max_grad_norm / torch.clamp(total_norm, min=max_grad_norm)


def bias_corrections(steps: Tensor, beta1: float, beta2: float, enabled: bool, dtype=torch.float32):
    """Per-segment (1 - beta1^t, 1 - beta2^t), computed in fp64 so that fp32 kernels see exact factors."""
    if not enabled:
        one = torch.ones_like(steps, dtype=dtype)
        return one, one
    t = steps.to(torch.float64)
    if beta1 > 0 and beta2 > 0:  # both rows in one go: [2, n] = -expm1([log b1, log b2]^T * t) (fewer small ops)
        both = torch.expm1(_log_betas(beta1, beta2, t.device) * t).neg_().to(dtype)
        return both[0], both[1]
    bc1 = -torch.expm1(t * math.log(beta1)) if beta1 > 0 else torch.ones_like(t)
    bc2 = -torch.expm1(t * math.log(beta2)) if beta2 > 0 else torch.ones_like(t)
    return bc1.to(dtype), bc2.to(dtype)


_LOG_BETAS: dict = {}  # (beta1, beta2, device) -> fp64 [2, 1] column of their logs, made once (no copy per step)


def _log_betas(beta1: float, beta2: float, device: torch.device) -> Tensor:
    key = (beta1, beta2, device)
    logs = _LOG_BETAS.get(key)
    if logs is None:
        if len(_LOG_BETAS) >= 16:
            _LOG_BETAS.clear()
        logs = _LOG_BETAS[key] = torch.tensor([[math.log(beta1)], [math.log(beta2)]], dtype=torch.float64,
                                              device=device)
    return logs


def _adapts(weight_decay: float, always_adapt: bool) -> bool:
    return weight_decay != 0 or always_adapt


def lamb_trust_ratio(
    param_norm: Tensor,
    update_norm: Tensor,
    *,
    weight_decay: float,
    always_adapt: bool,
    trust_clip: bool,
    min_trust_ratio: Optional[float],
    max_trust_ratio: Optional[float],
) -> Tensor:
    if not _adapts(weight_decay, always_adapt):
        return torch.ones_like(param_norm)
    both_positive = torch.minimum(param_norm, update_norm) > 0  # (a NaN norm compares false, as it should)
    ratio = torch.where(both_positive, param_norm / update_norm, 1.0)  # other entries' x/0 are discarded
    if min_trust_ratio is not None or max_trust_ratio is not None:
        ratio = torch.clamp(ratio, min=min_trust_ratio, max=max_trust_ratio)
    if trust_clip:
        ratio = torch.clamp(ratio, max=1.0)
    return ratio


def lars_trust_ratio(
    param_norm: Tensor,
    grad_norm: Tensor,
    *,
    lr: Scalar,
    weight_decay: float,
    always_adapt: bool,
    trust_coefficient: float,
    eps: float,
    trust_clip: bool,
) -> Tensor:
    if not _adapts(weight_decay, always_adapt):
        return torch.ones_like(param_norm)
    both_positive = torch.minimum(param_norm, grad_norm) > 0
    ratio = trust_coefficient * param_norm / (grad_norm + weight_decay * param_norm + eps)
    if trust_clip:
        ratio = torch.clamp(ratio / lr, max=1.0)
    return torch.where(both_positive, ratio, 1.0)


# ----------------------------------------------------------------------------------------------------------
# The reference kernels: per-tensor PyTorch, readable, the oracle.
# ----------------------------------------------------------------------------------------------------------
def _lamb_direction(p, m, v, bc1, bc2, eps, weight_decay, adam_w_mode):
    """u = m_hat / (sqrt(v_hat) + eps) (+ wd * p): shared by both passes so they cannot disagree."""
    u = (m / bc1) / ((v / bc2).sqrt() + eps)
    if adam_w_mode and weight_decay != 0:
        u = u + weight_decay * p
    return u


def _as_compute(t: Tensor, like: Tensor) -> Tensor:
    return t.to(like.dtype).reshape(-1)


def _write_back(param: Tensor, new_value: Tensor, model_param: Optional[Tensor]):
    param.view(-1).copy_(new_value)
    if model_param is not None:
        model_param.view(-1).copy_(new_value)


def _skipped(skip: Optional[Tensor]) -> bool:
    # The reference (and the CPU paths) may read the flag on the host; the GPU kernels read it on device.
    return skip is not None and bool(skip)


class ReferenceKernels:
    """Per-tensor PyTorch passes. Compute dtype = the state's dtype (fp32 normally, fp64 in the tests)."""

    name = "reference"

    def sumsq(self, tensors: Sequence[Tensor], seg_ids: Optional[Tensor], num_ids: int, coef: Optional[Tensor] = None,
              dtype: torch.dtype = torch.float32) -> Tensor:
        device = tensors[0].device if tensors else torch.device("cpu")
        out = torch.zeros(num_ids, dtype=dtype, device=device)
        ids = range(len(tensors)) if seg_ids is None else seg_ids.tolist()
        for i, t in zip(ids, tensors):
            x = t.reshape(-1).to(dtype)
            if coef is not None:
                x = x * coef.to(dtype)
            out[i] += x.square().sum()
        return out

    def lamb_phase1(self, seg: Segments, *, grad_coef, bc1, bc2, beta1, beta2, beta3, eps, weight_decay,
                    adam_w_mode, skip) -> Tensor:
        exp_avgs, exp_avg_sqs = seg.states
        dtype = exp_avgs[0].dtype if exp_avgs else torch.float32
        out = torch.zeros(seg.num_ids, 2, dtype=dtype, device=seg.params[0].device)
        if _skipped(skip):
            return out
        for s, (i, p, g, m, v) in enumerate(zip(seg.ids_list(), seg.params, seg.grads, exp_avgs, exp_avg_sqs)):
            p32, g32, m1, v1 = _as_compute(p, m), _as_compute(g, m), m.view(-1), v.view(-1)
            if grad_coef is not None:
                g32 = g32 * grad_coef.to(m.dtype)
            if not adam_w_mode and weight_decay != 0:
                g32 = g32 + weight_decay * p32
            m1.mul_(beta1).add_(g32, alpha=beta3)
            v1.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
            u = _lamb_direction(p32, m1, v1, bc1[s].to(m.dtype), bc2[s].to(m.dtype), eps, weight_decay, adam_w_mode)
            out[i, 0] += u.square().sum()
            out[i, 1] += p32.square().sum()
        return out

    def lamb_phase2(self, seg: Segments, *, step_size, bc1, bc2, eps, weight_decay, adam_w_mode, skip) -> None:
        if _skipped(skip):
            return
        exp_avgs, exp_avg_sqs = seg.states
        models = seg.model_params or [None] * len(seg.params)
        for s, (i, p, m, v, mp) in enumerate(zip(seg.ids_list(), seg.params, exp_avgs, exp_avg_sqs, models)):
            p32 = _as_compute(p, m)
            u = _lamb_direction(p32, m.view(-1), v.view(-1), bc1[s].to(m.dtype), bc2[s].to(m.dtype), eps,
                                weight_decay, adam_w_mode)
            _write_back(p, p32 - step_size[i].to(m.dtype) * u, mp)

    def lars_phase1(self, seg: Segments, *, grad_coef, skip, dtype=torch.float32) -> Tensor:
        """Per id: (sum g^2, sum p^2), g already scaled by grad_coef."""
        if seg.states and seg.states[0]:
            dtype = seg.states[0][0].dtype
        if _skipped(skip):
            return torch.zeros(seg.num_ids, 2, dtype=dtype, device=seg.params[0].device)
        g = self.sumsq(seg.grads, seg.seg_ids, seg.num_ids, grad_coef, dtype)
        p = self.sumsq(seg.params, seg.seg_ids, seg.num_ids, None, dtype)
        return torch.stack([g, p], dim=1)

    def lars_phase2(self, seg: Segments, *, grad_coef, ratio, lr, weight_decay, momentum, dampening, nesterov,
                    skip) -> None:
        if _skipped(skip):
            return
        (bufs,) = seg.states
        models = seg.model_params or [None] * len(seg.params)
        first = (seg.steps == 1).tolist()
        for s, (i, p, g, buf, mp) in enumerate(zip(seg.ids_list(), seg.params, seg.grads, bufs, models)):
            p32, g32, b = _as_compute(p, buf), _as_compute(g, buf), buf.view(-1)
            if grad_coef is not None:
                g32 = g32 * grad_coef.to(buf.dtype)
            d = ratio[i].to(buf.dtype) * (g32 + weight_decay * p32)
            if first[s]:
                b.copy_(d)
            else:
                b.mul_(momentum).add_(d, alpha=1 - dampening)
            d = d + momentum * b if nesterov else b
            _write_back(p, p32 - _as_tensor(lr, buf) * d, mp)


def _as_tensor(x: Scalar, like: Tensor) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(device=like.device, dtype=like.dtype)
    return torch.tensor(x, device=like.device, dtype=like.dtype)


# ----------------------------------------------------------------------------------------------------------
# Orchestration: one step of one param group, the same for every backend.
# ----------------------------------------------------------------------------------------------------------
_ONE_ID: dict = {}  # (tensor count, device) -> all-zero id table (read only)


def grad_sumsq(kernels, grads: Sequence[Tensor]) -> Tensor:
    """Sum of squares of all gradients (one norm id), as a 0-d fp32 (fp64 for fp64 grads) device tensor."""
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    key = (len(grads), grads[0].device)
    ids = _ONE_ID.get(key)
    if ids is None:  # made once per tensor count and device: a new one per step is an allocation (+ a copy on GPU)
        if len(_ONE_ID) >= 16:
            _ONE_ID.clear()
        ids = _ONE_ID[key] = torch.zeros(len(grads), dtype=torch.int64, device=grads[0].device)
    dtype = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
    return kernels.sumsq(grads, ids, 1, None, dtype)[0]


def lamb_update(seg: Segments, *, kernels, lr: Scalar, beta1: float, beta2: float, eps: float, weight_decay: float,
                bias_correction: bool, grad_averaging: bool, adam_w_mode: bool, always_adapt: bool,
                trust_clip: bool, min_trust_ratio: Optional[float], max_trust_ratio: Optional[float],
                grad_coef: Optional[Tensor] = None, skip: Optional[Tensor] = None,
                norm_hook: NormHook = None) -> Tensor:
    """One LAMB step of one group. Returns the per-id trust ratios (on device)."""
    state_dtype = seg.states[0][0].dtype if seg.states[0] else torch.float32
    bc1, bc2 = bias_corrections(seg.steps, beta1, beta2, bias_correction, state_dtype)
    beta3 = 1 - beta1 if grad_averaging else 1.0
    sums = kernels.lamb_phase1(seg, grad_coef=grad_coef, bc1=bc1, bc2=bc2, beta1=beta1, beta2=beta2, beta3=beta3,
                               eps=eps, weight_decay=weight_decay, adam_w_mode=adam_w_mode, skip=skip)
    if norm_hook is not None:
        norm_hook(sums)
    update_norm, param_norm = sums.sqrt().unbind(1)
    ratio = lamb_trust_ratio(param_norm, update_norm, weight_decay=weight_decay, always_adapt=always_adapt,
                             trust_clip=trust_clip, min_trust_ratio=min_trust_ratio, max_trust_ratio=max_trust_ratio)
    kernels.lamb_phase2(seg, step_size=ratio * lr, bc1=bc1, bc2=bc2, eps=eps, weight_decay=weight_decay,
                        adam_w_mode=adam_w_mode, skip=skip)
    return ratio


def lars_update(seg: Segments, *, kernels, lr: Scalar, momentum: float, dampening: float, weight_decay: float,
                nesterov: bool, trust_coefficient: float, eps: float, trust_clip: bool, always_adapt: bool,
                grad_coef: Optional[Tensor] = None, skip: Optional[Tensor] = None,
                norm_hook: NormHook = None, sums: Optional[Tensor] = None) -> Tensor:
    """One LARS step of one group. Returns the per-id trust ratios (on device). ``sums``: pass 1's result
    (:func:`lars_sums`) when the caller has run it already (to see every group's gradient sums before any update)."""
    if momentum == 0:
        dampening = 0.0  # as torch.optim.SGD: without momentum the update is d itself, dampening has no role
    if sums is None:
        sums = lars_sums(seg, kernels=kernels, grad_coef=grad_coef, skip=skip, norm_hook=norm_hook)
    grad_norm, param_norm = sums.sqrt().unbind(1)
    ratio = lars_trust_ratio(param_norm, grad_norm, lr=lr, weight_decay=weight_decay, always_adapt=always_adapt,
                             trust_coefficient=trust_coefficient, eps=eps, trust_clip=trust_clip)
    kernels.lars_phase2(seg, grad_coef=grad_coef, ratio=ratio, lr=lr, weight_decay=weight_decay, momentum=momentum,
                        dampening=dampening, nesterov=nesterov, skip=skip)
    return ratio


def lars_sums(seg: Segments, *, kernels, grad_coef: Optional[Tensor] = None, skip: Optional[Tensor] = None,
              norm_hook: NormHook = None) -> Tensor:
    """LARS pass 1: per-id ``[sum g^2, sum p^2]`` (all-reduced by ``norm_hook``). Column 0 sums every gradient's
    squares, so a non-finite gradient anywhere shows in it."""
    sums = kernels.lars_phase1(seg, grad_coef=grad_coef, skip=skip)
    if norm_hook is not None:
        norm_hook(sums)
    return sums
