"""Shared test material for every LAMB/LARS backend.

* ``SIZES``: odd tensor sizes (plus a zero-param and a zero-grad tensor in every problem);
* ``LAMB_KNOBS`` / ``LARS_KNOBS``: one case per knob of the optimizers;
* ``textbook_lamb`` / ``textbook_lars``: an fp64 implementation written straight from the formulas in the
  issue, independent of ``ds_conadv.optim.functional`` (no shared code), the oracle of the tests;
* ``run_optimizer``: drive one of our optimizers over the same problem.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

SIZES = (1, 7, 1000, 4097, 33, 129, 2047, 5, 300, 3001, 12)
SHAPES = {1000: (40, 25), 4097: (17, 241), 300: (3, 10, 10)}
ZERO_PARAM = 3  # index of the tensor whose param starts at zero
ZERO_GRAD = 5  # index of the tensor whose gradient is always zero

LAMB_KNOBS: Dict[str, dict] = {
    "default": {},
    "no_decay": dict(weight_decay=0.0),
    "always_adapt": dict(weight_decay=0.0, always_adapt=True),
    "trust_clip": dict(trust_clip=True),
    "min_max_ratio": dict(min_trust_ratio=0.5, max_trust_ratio=2.0),
    "l2_mode": dict(adam_w_mode=False),
    "no_grad_averaging": dict(grad_averaging=False),
    "no_bias_correction": dict(bias_correction=False),
    "max_grad_norm": dict(max_grad_norm=1.0),
    "betas_eps": dict(betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1),
}
LARS_KNOBS: Dict[str, dict] = {
    "default": {},
    "no_decay": dict(weight_decay=0.0),
    "always_adapt": dict(weight_decay=0.0, always_adapt=True),
    "trust_clip": dict(trust_clip=True),
    "nesterov": dict(nesterov=True),
    "dampening": dict(dampening=0.1),
    "no_momentum": dict(momentum=0.0),
    "dampening_without_momentum": dict(momentum=0.0, dampening=0.5),
    "max_grad_norm": dict(max_grad_norm=1.0),
    "coefficient_eps": dict(trust_coefficient=0.02, eps=0.0, weight_decay=5e-4),
}
LAMB_LR, LARS_LR = 1e-2, 0.5


def problem(sizes=SIZES, steps: int = 20, seed: int = 0, round_to: Optional[torch.dtype] = None):
    """Initial params and per-step grads (fp64), with scales spread over 3 decades so trust ratios vary.

    ``round_to``: values pre-rounded to a low-precision dtype (for bf16/fp16 parameter tests).
    """
    gen = torch.Generator().manual_seed(seed)
    params, grads = [], [[] for _ in range(steps)]
    for i, n in enumerate(sizes):
        shape = SHAPES.get(n, (n,))
        scale = 10.0 ** (2 * torch.rand((), generator=gen, dtype=torch.float64).item() - 1.5)
        p = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        if i == ZERO_PARAM:
            p.zero_()
        params.append(p)
        for t in range(steps):
            g = torch.randn(shape, generator=gen, dtype=torch.float64) * (0.1 + 0.05 * t) * scale
            if i == ZERO_GRAD:
                g.zero_()
            grads[t].append(g)
    if round_to is not None:
        params = [p.to(round_to).to(torch.float64) for p in params]
        grads = [[g.to(round_to).to(torch.float64) for g in gs] for gs in grads]
    return params, grads


def _global_clip(grads: List[torch.Tensor], max_grad_norm: Optional[float]) -> List[torch.Tensor]:
    if max_grad_norm is None:
        return grads
    total = math.sqrt(sum(float((g * g).sum()) for g in grads))
    if total <= max_grad_norm:
        return grads
    return [g * (max_grad_norm / total) for g in grads]


def textbook_lamb(params, grads, lr=LAMB_LR, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
                  grad_averaging=True, adam_w_mode=True, always_adapt=False, trust_clip=False, min_trust_ratio=None,
                  max_trust_ratio=None, max_grad_norm=None, lrs=None):
    b1, b2 = betas
    p = [x.clone() for x in params]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    for t, step_grads in enumerate(grads, start=1):
        step_lr = lrs[t - 1] if lrs is not None else lr
        for i, g in enumerate(_global_clip(step_grads, max_grad_norm)):
            if not adam_w_mode:
                g = g + weight_decay * p[i]
            m[i] = b1 * m[i] + ((1 - b1) if grad_averaging else 1.0) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat = m[i] / (1 - b1 ** t) if bias_correction else m[i]
            v_hat = v[i] / (1 - b2 ** t) if bias_correction else v[i]
            u = m_hat / (torch.sqrt(v_hat) + eps)
            if adam_w_mode:
                u = u + weight_decay * p[i]
            p_norm, u_norm = float(p[i].norm()), float(u.norm())
            r = p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0
            if min_trust_ratio is not None:
                r = max(r, min_trust_ratio)
            if max_trust_ratio is not None:
                r = min(r, max_trust_ratio)
            if trust_clip:
                r = min(r, 1.0)
            if weight_decay == 0 and not always_adapt:
                r = 1.0
            p[i] = p[i] - step_lr * r * u
    return p


def textbook_lars(params, grads, lr=LARS_LR, momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=False,
                  trust_coefficient=0.001, eps=1e-8, trust_clip=False, always_adapt=False, max_grad_norm=None,
                  lrs=None):
    p = [x.clone() for x in params]
    buf: List[Optional[torch.Tensor]] = [None] * len(p)
    for t, step_grads in enumerate(grads, start=1):
        step_lr = lrs[t - 1] if lrs is not None else lr
        for i, g in enumerate(_global_clip(step_grads, max_grad_norm)):
            d = g + weight_decay * p[i]
            p_norm, g_norm = float(p[i].norm()), float(g.norm())
            r = 1.0
            if (weight_decay != 0 or always_adapt) and p_norm > 0 and g_norm > 0:
                r = trust_coefficient * p_norm / (g_norm + weight_decay * p_norm + eps)
                if trust_clip:
                    r = min(r / step_lr, 1.0)
            d = r * d
            if momentum != 0:  # torch.optim.SGD: no buffer (and no dampening) without momentum
                buf[i] = d.clone() if buf[i] is None else momentum * buf[i] + (1 - dampening) * d
                d = d + momentum * buf[i] if nesterov else buf[i]
            p[i] = p[i] - step_lr * d
    return p


def run_optimizer(cls, params, grads, backend: str, dtype=torch.float32, lr=None, lr_tensor=False,
                  master_weights=False, grad_dtype=None, **knobs):
    """Run ``cls`` over the problem. Returns (optimizer, params, fp64 view of the fp32 weights)."""
    ps = [p.to(dtype).clone().requires_grad_(True) for p in params]
    if lr is None:
        lr = LAMB_LR if cls.__name__ == "LAMB" else LARS_LR
    lr_value = torch.tensor(lr, dtype=torch.float32) if lr_tensor else lr
    opt = cls(ps, lr=lr_value, backend=backend, master_weights=master_weights, **knobs)
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = g.to(grad_dtype or dtype)
        opt.step()
    weights = [opt.state[p]["master"] if "master" in opt.state[p] else p.detach() for p in ps]
    return opt, ps, [w.to(torch.float64) for w in weights]


def assert_close_list(actual, expected, rtol=2e-5, atol=2e-6, msg=""):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        scale = max(float(e.abs().max()), 1e-30) if e.numel() else 1.0
        torch.testing.assert_close(a.to(torch.float64), e, rtol=rtol, atol=atol * scale,
                                   msg=lambda m, i=i: f"{msg} tensor {i} (numel {e.numel()}): {m}")
