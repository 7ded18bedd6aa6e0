"""Multi-tensor sum of squares and the deterministic per-id reduction shared by every pass.

Shared ``@triton.jit`` helpers live here too: typed loads/stores through raw pointers taken from a work-item
table (fp32 / bf16 / fp16, chosen by a constexpr dtype code, see :data:`tables.KIND`), with bf16 stored by
explicit round-to-nearest-even bit arithmetic so that compiled kernels and the interpreter (whose fp32->bf16
cast truncates) write identical bits.

Reductions never use atomics: a pass writes one partial sum per work item, :func:`segment_sum_kernel` adds a
segment's items in a fixed order (one program per segment, or one program over all items when there is a
single norm id), and :func:`id_sum_kernel` adds the segments of each norm id in segment order (one program
per id, scanning the ``seg_ids`` vector on device). Results are bitwise reproducible run to run.
"""
from __future__ import annotations

import triton
import triton.language as tl


def _probe():
    pass


#: True when ``@triton.jit`` gives interpreted functions (``TRITON_INTERPRET=1`` was set before the import)
INTERPRET = not isinstance(triton.jit(_probe), triton.runtime.jit.JITFunction)


def device_fn(fn):
    """``@triton.jit`` for device helpers called from kernels. Under the interpreter a nested interpreted call
    re-patches ``triton.language`` on every call (most of a program's time), so there the helper
    stays a plain Python function: it runs inside the kernel's patched scope with identical semantics."""
    return fn if INTERPRET else triton.jit(fn)


@device_fn
def _ptr(addr, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    """A raw int64 address from a table, as a typed pointer (bf16 is handled as its uint16 bits)."""
    if KIND == 0:
        p = addr.to(tl.pointer_type(tl.float32))
    elif KIND == 1:
        p = addr.to(tl.pointer_type(tl.uint16))
    else:
        p = addr.to(tl.pointer_type(tl.float16))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@device_fn
def load_f32(addr, offs, mask, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    """Load elements ``offs`` of the tensor at ``addr`` and upcast to fp32 (masked lanes read 0)."""
    p = _ptr(addr, KIND, ALIGNED)
    if KIND == 1:
        bits = tl.load(p + offs, mask=mask, other=0)
        x = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(p + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@device_fn
def store_f32(addr, offs, x, mask, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    """Store fp32 ``x``, rounded to nearest even when the tensor is bf16 or fp16."""
    p = _ptr(addr, KIND, ALIGNED)
    if KIND == 0:
        tl.store(p + offs, x, mask=mask)
    elif KIND == 1:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        hi = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # NaN stays a (quiet) NaN
        tl.store(p + offs, hi.to(tl.uint16), mask=mask)
    else:
        tl.store(p + offs, x.to(tl.float16), mask=mask)


@device_fn
def item_row(items, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
    """(item index, its table row, segment, first element, segment numel) of this program's work item.

    A row is ``[segment, start, numel, ptr_0, ptr_1, ...]``: the column pointers are at ``row + 3 + col``, one
    dependent load away from the program id. ``start`` is a multiple of the item size, hence of BLOCK (the hint
    sits on the load, where constant folding cannot drop it)."""
    pid = tl.program_id(0).to(tl.int64)
    row = items + pid * STRIDE
    return pid, row, tl.load(row), tl.multiple_of(tl.load(row + 1), BLOCK), tl.load(row + 2)


@device_fn
def go_mask(skip_ptr, HAS_SKIP: tl.constexpr, BLOCK: tl.constexpr):
    """All-true lanes, or all-false when the on-device skip flag is set (uniform, so loads stay vectorized)."""
    go = tl.full([BLOCK], 1, tl.int1)
    if HAS_SKIP:
        go = go & (tl.load(skip_ptr) == 0)
    return go


# A work item is CHUNKS blocks of BLOCK elements of one segment, processed in a loop. Every block runs its body
# under one of two masks: a uniform one for full blocks (so the compiler can use vector loads/stores when the
# table is 16-byte aligned) and a per-lane one for a segment's tail.
@device_fn
def _sumsq_body(row, coef_ptr, offs, mask, COL_A: tl.constexpr, KIND_A: tl.constexpr, COL_B: tl.constexpr,
                KIND_B: tl.constexpr, NCOL: tl.constexpr, HAS_COEF: tl.constexpr, ALIGNED: tl.constexpr):
    a = load_f32(tl.load(row + 3 + COL_A), offs, mask, KIND_A, ALIGNED)
    if HAS_COEF:
        a = a * tl.load(coef_ptr)
    sa = tl.sum(a * a, axis=0)
    if NCOL == 2:
        b = load_f32(tl.load(row + 3 + COL_B), offs, mask, KIND_B, ALIGNED)
        sb = tl.sum(b * b, axis=0)
    else:
        sb = tl.zeros([], dtype=tl.float32)
    return sa, sb


@triton.jit
def sumsq_kernel(items, partials, coef_ptr, skip_ptr,
                 STRIDE: tl.constexpr, COL_A: tl.constexpr, KIND_A: tl.constexpr, COL_B: tl.constexpr,
                 KIND_B: tl.constexpr, NCOL: tl.constexpr, HAS_COEF: tl.constexpr, HAS_SKIP: tl.constexpr,
                 ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNKS: tl.constexpr):
    """partials[item] = (sum (coef * a)^2 [, sum b^2]) over this item's elements of columns A (and B)."""
    pid, row, s, start, n = item_row(items, STRIDE, BLOCK)
    go = go_mask(skip_ptr, HAS_SKIP, BLOCK)
    acc_a = tl.zeros([], dtype=tl.float32)
    acc_b = tl.zeros([], dtype=tl.float32)
    for j in range(CHUNKS):
        lo = start + j * BLOCK
        offs = lo + tl.arange(0, BLOCK).to(tl.int64)
        if lo + BLOCK <= n:
            sa, sb = _sumsq_body(row, coef_ptr, offs, go, COL_A, KIND_A, COL_B, KIND_B, NCOL, HAS_COEF, ALIGNED)
        else:
            sa, sb = _sumsq_body(row, coef_ptr, offs, go & (offs < n), COL_A, KIND_A, COL_B, KIND_B, NCOL,
                                 HAS_COEF, ALIGNED)
        acc_a += sa
        acc_b += sb
    tl.store(partials + pid * NCOL, acc_a)
    if NCOL == 2:
        tl.store(partials + pid * NCOL + 1, acc_b)


@triton.jit(do_not_specialize=["n_items"])
def segment_sum_kernel(partials, begin, out, n_items, NCOL: tl.constexpr, ALL: tl.constexpr, RB: tl.constexpr):
    """out[s, :] = sum of partials[begin[s]:begin[s+1], :] (ALL: one program, out[0, :] = sum of all items)."""
    s = tl.program_id(0).to(tl.int64)
    if ALL:
        b = 0
        e = n_items
    else:
        b = tl.load(begin + s)
        e = tl.load(begin + s + 1)
    cols = tl.arange(0, NCOL)
    acc = tl.zeros([RB, NCOL], dtype=tl.float32)
    for i in range(b, e, RB):
        idx = i + tl.arange(0, RB).to(tl.int64)
        acc += tl.load(partials + idx[:, None] * NCOL + cols[None, :], mask=(idx < e)[:, None], other=0.0)
    tl.store(out + s * NCOL + cols, tl.sum(acc, axis=0))


@triton.jit(do_not_specialize=["n_seg"])
def id_sum_kernel(seg_sums, seg_ids, out, n_seg, NCOL: tl.constexpr, SB: tl.constexpr):
    """out[i, :] = sum of seg_sums[s, :] over the segments s with seg_ids[s] == i, in segment order."""
    i = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, NCOL)
    acc = tl.zeros([SB, NCOL], dtype=tl.float32)
    for j in range(0, n_seg, SB):
        idx = j + tl.arange(0, SB).to(tl.int64)
        inside = idx < n_seg
        ids = tl.load(seg_ids + idx, mask=inside, other=-1)
        sel = inside & (ids == i)
        acc += tl.load(seg_sums + idx[:, None] * NCOL + cols[None, :], mask=sel[:, None], other=0.0)
    tl.store(out + i * NCOL + cols, tl.sum(acc, axis=0))
