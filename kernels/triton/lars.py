"""LARS's update pass as a multi-tensor Triton kernel; its first pass is :func:`.norms.sumsq_kernel`.

Table columns (see :mod:`.tables`): ``param, grad, momentum_buffer, model_param``.

* pass 1 (norms) reads g, p; partials[item] = (sum (coef * g)^2, sum p^2)           (8 B/param, fp32)
* pass 2 reads g, p, buf (buf not read on a segment's first step); writes buf, p (+ model copy)  (20 B/param)
"""
from __future__ import annotations

import triton
import triton.language as tl

from .norms import device_fn, go_mask, item_row, load_f32, store_f32

COL_P, COL_G, COL_BUF, COL_MODEL = 0, 1, 2, 3
N_COLS = 4
ITEM_STRIDE = tl.constexpr(3 + N_COLS)  # work-item row: segment, start, numel, 4 pointers


@device_fn
def _phase2_body(row, s, nid, offs, mask, ratio_ptr, steps_ptr, coef_ptr, lr_ptr, wd, momentum,
                 one_minus_dampening, P_KIND: tl.constexpr, G_KIND: tl.constexpr, MODEL_KIND: tl.constexpr,
                 HAS_MODEL: tl.constexpr, HAS_COEF: tl.constexpr, HAS_WD: tl.constexpr, NESTEROV: tl.constexpr,
                 ALIGNED: tl.constexpr):
    p_addr = tl.load(row + 3)
    buf_addr = tl.load(row + 5)
    p = load_f32(p_addr, offs, mask, P_KIND, ALIGNED)
    g = load_f32(tl.load(row + 4), offs, mask, G_KIND, ALIGNED)
    first = tl.load(steps_ptr + s) == 1.0  # a segment's first step: the buffer starts as d (torch SGD)
    buf = load_f32(buf_addr, offs, mask & (first == 0), 0, ALIGNED)
    if HAS_COEF:
        g = g * tl.load(coef_ptr)
    if HAS_WD:
        g = g + wd * p
    d = tl.load(ratio_ptr + nid) * g
    buf = tl.where(first, d, momentum * buf + one_minus_dampening * d)
    if NESTEROV:
        d = d + momentum * buf
    else:
        d = buf
    p = p - tl.load(lr_ptr) * d
    store_f32(buf_addr, offs, buf, mask, 0, ALIGNED)
    store_f32(p_addr, offs, p, mask, P_KIND, ALIGNED)
    if HAS_MODEL:
        model_addr = tl.load(row + 6)  # 0: this segment has no model copy
        store_f32(model_addr, offs, p, mask & (model_addr != 0), MODEL_KIND, ALIGNED)


@triton.jit
def lars_phase2_kernel(items, seg_ids, ratio_ptr, steps_ptr, coef_ptr, skip_ptr, lr_ptr,
                       wd, momentum, one_minus_dampening,
                       P_KIND: tl.constexpr, G_KIND: tl.constexpr, MODEL_KIND: tl.constexpr,
                       HAS_MODEL: tl.constexpr, HAS_IDS: tl.constexpr, HAS_COEF: tl.constexpr,
                       HAS_SKIP: tl.constexpr, HAS_WD: tl.constexpr, NESTEROV: tl.constexpr,
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
            _phase2_body(row, s, nid, offs, go, ratio_ptr, steps_ptr, coef_ptr, lr_ptr, wd, momentum,
                         one_minus_dampening, P_KIND, G_KIND, MODEL_KIND, HAS_MODEL, HAS_COEF, HAS_WD, NESTEROV,
                         ALIGNED)
        else:
            _phase2_body(row, s, nid, offs, go & (offs < n), ratio_ptr, steps_ptr, coef_ptr, lr_ptr, wd,
                         momentum, one_minus_dampening, P_KIND, G_KIND, MODEL_KIND, HAS_MODEL, HAS_COEF, HAS_WD,
                         NESTEROV, ALIGNED)
