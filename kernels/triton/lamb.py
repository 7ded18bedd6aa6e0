"""LAMB's two element-wise passes as multi-tensor Triton kernels (one program per work item).

Table columns (see :mod:`.tables`): ``param, grad, exp_avg, exp_avg_sq, model_param``.

* pass 1 reads g, m, v, p; writes m, v; partials[item] = (sum u^2, sum p^2)   (24 B/param with fp32 tensors)
* pass 2 reads p, m, v; recomputes u exactly as pass 1; writes p (+ the rounded model copy)  (16 B/param)

The skip flag is read on device: when set, every load and store is masked off (no memory traffic, nothing
written) and the partial sums are zero.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .norms import device_fn, go_mask, item_row, load_f32, store_f32

COL_P, COL_G, COL_M, COL_V, COL_MODEL = 0, 1, 2, 3, 4
N_COLS = 5
ITEM_STRIDE = tl.constexpr(3 + N_COLS)  # work-item row: segment, start, numel, 5 pointers


@device_fn
def _direction(p, m, v, bc1, bc2, eps, wd, mask, DECOUPLED_WD: tl.constexpr):
    """u = (m / bc1) / (sqrt(v / bc2) + eps) (+ wd * p), IEEE-rounded division and square root."""
    denom = tl.sqrt_rn(tl.div_rn(v, bc2)) + eps
    denom = tl.where(mask, denom, 1.0)  # masked lanes: no 0/0
    u = tl.div_rn(tl.div_rn(m, bc1), denom)
    if DECOUPLED_WD:
        u = u + wd * p
    return u


@device_fn
def _phase1_body(row, s, offs, mask, bc1_ptr, bc2_ptr, coef_ptr, beta1, beta2, beta3, one_minus_beta2, eps, wd,
                 P_KIND: tl.constexpr, G_KIND: tl.constexpr, HAS_COEF: tl.constexpr, L2_WD: tl.constexpr,
                 DECOUPLED_WD: tl.constexpr, ALIGNED: tl.constexpr):
    p = load_f32(tl.load(row + 3), offs, mask, P_KIND, ALIGNED)
    g = load_f32(tl.load(row + 4), offs, mask, G_KIND, ALIGNED)
    m_addr = tl.load(row + 5)
    v_addr = tl.load(row + 6)
    m = load_f32(m_addr, offs, mask, 0, ALIGNED)
    v = load_f32(v_addr, offs, mask, 0, ALIGNED)
    if HAS_COEF:
        g = g * tl.load(coef_ptr)
    if L2_WD:
        g = g + wd * p
    m = beta1 * m + beta3 * g
    v = beta2 * v + one_minus_beta2 * (g * g)
    store_f32(m_addr, offs, m, mask, 0, ALIGNED)
    store_f32(v_addr, offs, v, mask, 0, ALIGNED)
    u = _direction(p, m, v, tl.load(bc1_ptr + s), tl.load(bc2_ptr + s), eps, wd, mask, DECOUPLED_WD)
    u = tl.where(mask, u, 0.0)
    return tl.sum(u * u, axis=0), tl.sum(p * p, axis=0)


@triton.jit
def lamb_phase1_kernel(items, partials, bc1_ptr, bc2_ptr, coef_ptr, skip_ptr,
                       beta1, beta2, beta3, one_minus_beta2, eps, wd,
                       P_KIND: tl.constexpr, G_KIND: tl.constexpr, HAS_COEF: tl.constexpr,
                       HAS_SKIP: tl.constexpr, L2_WD: tl.constexpr, DECOUPLED_WD: tl.constexpr,
                       ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNKS: tl.constexpr):
    pid, row, s, start, n = item_row(items, ITEM_STRIDE, BLOCK)
    go = go_mask(skip_ptr, HAS_SKIP, BLOCK)
    acc_u = tl.zeros([], dtype=tl.float32)
    acc_p = tl.zeros([], dtype=tl.float32)
    for j in range(CHUNKS):
        lo = start + j * BLOCK
        offs = lo + tl.arange(0, BLOCK).to(tl.int64)
        if lo + BLOCK <= n:
            su, sp = _phase1_body(row, s, offs, go, bc1_ptr, bc2_ptr, coef_ptr,
                                  beta1, beta2, beta3, one_minus_beta2, eps, wd,
                                  P_KIND, G_KIND, HAS_COEF, L2_WD, DECOUPLED_WD, ALIGNED)
        else:
            su, sp = _phase1_body(row, s, offs, go & (offs < n), bc1_ptr, bc2_ptr, coef_ptr,
                                  beta1, beta2, beta3, one_minus_beta2, eps, wd,
                                  P_KIND, G_KIND, HAS_COEF, L2_WD, DECOUPLED_WD, ALIGNED)
        acc_u += su
        acc_p += sp
    tl.store(partials + pid * 2, acc_u)
    tl.store(partials + pid * 2 + 1, acc_p)


@device_fn
def _phase2_body(row, s, nid, offs, mask, step_size, bc1_ptr, bc2_ptr, eps, wd,
                 P_KIND: tl.constexpr, MODEL_KIND: tl.constexpr, HAS_MODEL: tl.constexpr,
                 DECOUPLED_WD: tl.constexpr, ALIGNED: tl.constexpr):
    p_addr = tl.load(row + 3)
    p = load_f32(p_addr, offs, mask, P_KIND, ALIGNED)
    m = load_f32(tl.load(row + 5), offs, mask, 0, ALIGNED)
    v = load_f32(tl.load(row + 6), offs, mask, 0, ALIGNED)
    u = _direction(p, m, v, tl.load(bc1_ptr + s), tl.load(bc2_ptr + s), eps, wd, mask, DECOUPLED_WD)
    p = p - tl.load(step_size + nid) * u
    store_f32(p_addr, offs, p, mask, P_KIND, ALIGNED)
    if HAS_MODEL:
        model_addr = tl.load(row + 7)  # 0: this segment has no model copy
        store_f32(model_addr, offs, p, mask & (model_addr != 0), MODEL_KIND, ALIGNED)


@triton.jit
def lamb_phase2_kernel(items, seg_ids, step_size, bc1_ptr, bc2_ptr, skip_ptr, eps, wd,
                       P_KIND: tl.constexpr, MODEL_KIND: tl.constexpr, HAS_MODEL: tl.constexpr,
                       HAS_IDS: tl.constexpr, HAS_SKIP: tl.constexpr, DECOUPLED_WD: tl.constexpr,
                       ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNKS: tl.constexpr):
    pid, row, s, start, n = item_row(items, ITEM_STRIDE, BLOCK)
    go = go_mask(skip_ptr, HAS_SKIP, BLOCK)
    if HAS_IDS:
        nid = tl.load(seg_ids + s)
    else:
        nid = s
    for j in range(CHUNKS):
        lo = start + j * BLOCK
        offs = lo + tl.arange(0, BLOCK).to(tl.int64)
        if lo + BLOCK <= n:
            _phase2_body(row, s, nid, offs, go, step_size, bc1_ptr, bc2_ptr, eps, wd,
                         P_KIND, MODEL_KIND, HAS_MODEL, DECOUPLED_WD, ALIGNED)
        else:
            _phase2_body(row, s, nid, offs, go & (offs < n), step_size, bc1_ptr, bc2_ptr, eps, wd,
                         P_KIND, MODEL_KIND, HAS_MODEL, DECOUPLED_WD, ALIGNED)
