"""Multi-tensor (``torch._foreach_*``) passes: a handful of launches per group whatever the tensor count.

Portable fallback for any device. Unlike the fused kernels it keeps the update direction ``u`` of the
first pass for the second (one temporary the size of the params) instead of recomputing it.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from .functional import ReferenceKernels, Segments, _skipped


def _flat(ts: List[Tensor]) -> List[Tensor]:
    return [t.view(-1) for t in ts]


def _per_id(norms_sq: List[Tensor], seg: Segments, device) -> Tensor:
    """Sum per-segment values into per-id values."""
    vals = torch.stack(norms_sq) if norms_sq else torch.zeros(0, device=device)
    if seg.seg_ids is None:
        return vals
    out = torch.zeros(seg.num_ids, dtype=vals.dtype, device=device)
    return out.index_add_(0, seg.seg_ids, vals)


def _sq(norms: List[Tensor]) -> List[Tensor]:
    return torch._foreach_mul(norms, norms)


def _per_seg(values: Tensor, seg: Segments) -> List[Tensor]:
    per_seg = values if seg.seg_ids is None else values.index_select(0, seg.seg_ids)
    return list(per_seg.unbind(0))


class ForeachKernels:
    name = "foreach"

    def __init__(self):
        self._directions = None

    def sumsq(self, tensors, seg_ids, num_ids, coef=None, dtype=torch.float32) -> Tensor:
        device = tensors[0].device
        sq = _sq(torch._foreach_norm(_flat(tensors), 2, dtype=dtype))
        seg = Segments(list(tensors), [], [], torch.zeros(0), seg_ids=seg_ids, num_ids=num_ids)
        out = _per_id(sq, seg, device)
        if coef is not None:
            out = out * coef.to(dtype).square()
        return out

    def lamb_phase1(self, seg: Segments, *, grad_coef, bc1, bc2, beta1, beta2, beta3, eps, weight_decay,
                    adam_w_mode, skip) -> Tensor:
        device = seg.params[0].device
        exp_avgs, exp_avg_sqs = _flat(seg.states[0]), _flat(seg.states[1])
        dtype = exp_avgs[0].dtype
        if _skipped(skip):
            return torch.zeros(seg.num_ids, 2, dtype=dtype, device=device)
        params = _flat(seg.params)
        params32 = params if params[0].dtype == dtype else [p.to(dtype) for p in params]
        grads = [g.view(-1).to(dtype) for g in seg.grads]
        if grad_coef is not None:
            grads = torch._foreach_mul(grads, grad_coef.to(dtype))
        if not adam_w_mode and weight_decay != 0:
            grads = torch._foreach_add(grads, params32, alpha=weight_decay)
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=beta3)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        # u = (m / bc1) / (sqrt(v / bc2) + eps): bias corrections differ per segment (per-tensor step)
        denom = torch._foreach_div(exp_avg_sqs, list(bc2.to(dtype).unbind(0)))
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        u = torch._foreach_div(exp_avgs, list(bc1.to(dtype).unbind(0)))
        torch._foreach_div_(u, denom)
        del denom
        if adam_w_mode and weight_decay != 0:
            torch._foreach_add_(u, params32, alpha=weight_decay)
        self._directions = u
        u_sq = _sq(torch._foreach_norm(u, 2))
        p_sq = _sq(torch._foreach_norm(params32, 2))
        return torch.stack([_per_id(u_sq, seg, device), _per_id(p_sq, seg, device)], dim=1)

    def lamb_phase2(self, seg: Segments, *, step_size, bc1, bc2, eps, weight_decay, adam_w_mode, skip) -> None:
        u, self._directions = self._directions, None
        if _skipped(skip):
            return
        torch._foreach_mul_(u, _per_seg(-step_size.to(u[0].dtype), seg))
        self._apply(seg, u)

    @staticmethod
    def _apply(seg: Segments, delta: List[Tensor]) -> None:
        params = _flat(seg.params)
        if params[0].dtype == delta[0].dtype:
            torch._foreach_add_(params, delta)
            new = params
        else:  # low-precision params updated in place: compute in fp32, round once
            new = torch._foreach_add([p.to(delta[0].dtype) for p in params], delta)
            torch._foreach_copy_(params, new)
        if seg.model_params is not None:
            torch._foreach_copy_(_flat(seg.model_params), new)

    # (Σg², Σp²) per id is two sums of squares: the reference composition, over this class's sumsq
    lars_phase1 = ReferenceKernels.lars_phase1

    def lars_phase2(self, seg: Segments, *, grad_coef, ratio, lr, weight_decay, momentum, dampening, nesterov,
                    skip) -> None:
        if _skipped(skip):
            return
        bufs = _flat(seg.states[0])
        dtype = bufs[0].dtype
        params = _flat(seg.params)
        params32 = params if params[0].dtype == dtype else [p.to(dtype) for p in params]
        grads = [g.view(-1).to(dtype) for g in seg.grads]
        scale = _per_seg(ratio.to(dtype), seg)
        if grad_coef is not None:
            grads = torch._foreach_mul(grads, grad_coef.to(dtype))
        d = torch._foreach_add(grads, params32, alpha=weight_decay) if weight_decay != 0 else list(grads)
        d = torch._foreach_mul(d, scale)
        # a buffer starts as d (torch SGD); params that got their first gradient late start later
        first = (seg.steps == 1).tolist()
        fresh = [i for i, f in enumerate(first) if f]
        later = [i for i, f in enumerate(first) if not f]
        if fresh:
            torch._foreach_copy_([bufs[i] for i in fresh], [d[i] for i in fresh])
        if later:
            rest_bufs = [bufs[i] for i in later]
            torch._foreach_mul_(rest_bufs, momentum)
            torch._foreach_add_(rest_bufs, [d[i] for i in later], alpha=1 - dampening)
        if nesterov:
            torch._foreach_add_(d, bufs, alpha=momentum)
        else:
            d = bufs
        lr_t = lr.to(dtype) if isinstance(lr, Tensor) else lr
        self._apply(seg, torch._foreach_mul(d, -lr_t))
