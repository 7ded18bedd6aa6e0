"""Fused multi-tensor LAMB / LARS passes in Triton: the ``backend="triton"`` kernel set.

Runs on CUDA tensors (compiled), and on CPU tensors when ``TRITON_INTERPRET=1`` was set before this package
was imported (the Triton interpreter; slow, for tests). :class:`TritonKernels` implements the interface of
:class:`ds_conadv.optim.functional.ReferenceKernels`.

Design (see also :mod:`.tables`):

* A call's tensors become one cached int64 work-item table on the device: one row per ``block * chunks``
  elements of a segment, holding (segment, start, numel, the raw data pointer of each tensor list). Every
  element-wise kernel has one program per row, so the number of launches per call is constant whatever the
  number of tensors:

  ====================  ==============================================================================
  ``sumsq``              sum-of-squares kernel + one reduction (per segment, or over everything when
                         ``num_ids == 1``) (+ id reduction when ``seg_ids`` is given and ``num_ids > 1``):
                         2 or 3 launches
  ``lamb_phase1``        pass-1 kernel + segment reduction (+ id reduction): 2 or 3
  ``lamb_phase2``        1
  ``lars_phase1``        sum-of-squares kernel on (g, p) + segment reduction (+ id reduction): 2 or 3
  ``lars_phase2``        1
  ====================  ==============================================================================

  A LAMB or LARS step is therefore 3 Triton launches (4 with a segment layout that shares norm ids), plus 2
  for the global gradient norm when ``max_grad_norm`` is set. Every launch goes through :func:`_launch`, which
  counts them in :data:`LAUNCHES`.
* Reductions are deterministic (no atomics): per-item partial sums, then fixed-order sums per segment and
  per norm id (:mod:`.norms`); results are bitwise reproducible run to run.
* Per-segment and per-id scalars (bias corrections, step counts, step sizes, trust ratios, the gradient
  coefficient, the skip flag, lr) are passed as device pointers and read in the kernels, so nothing in a
  step syncs with the host and a changing lr or step does not recompile. Only dtypes and on/off knobs are
  compile-time constants (one compiled variant per combination). The skip flag masks every load and store.
* Memory traffic with fp32 tensors: LAMB 24 + 16 = 40 B/param, LARS 8 + 20 = 28 B/param (the buffer is not
  read on a segment's first step); bf16/fp16 params or grads read/write 2 bytes instead of 4, and a
  low-precision model copy adds 2 B/param in pass 2. Measured step times against a device-to-device copy:
  ``benchmarks/triton_kernels.py``, results in docs/kernels.md (not here: they go stale). Issuing a step costs
  host time per tensor (the table-cache key: ``data_ptr()`` of every tensor).
* Arithmetic is fp32 (IEEE division and square root); bf16/fp16 values are upcast on load and rounded to
  nearest even on store (bf16 with integer arithmetic, so the interpreter writes the same bits as a GPU).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import lamb as _lamb
from . import lars as _lars
from . import norms as _norms
from .tables import TableCache

__all__ = ["TritonKernels", "LAUNCHES", "INTERPRET"]

#: number of Triton kernel launches made by this package since import (see :func:`_launch`)
LAUNCHES = 0

#: True when the kernels were defined under ``TRITON_INTERPRET=1`` (they then run on CPU tensors only)
INTERPRET = _norms.INTERPRET


def _launch(kernel, grid, *args, **kwargs):
    """Every kernel launch of this package goes through here (so tests can count them)."""
    global LAUNCHES
    LAUNCHES += 1
    kernel[grid](*args, **kwargs)


_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
_F32 = (torch.float32,)
_LAMB_SPECS = (("params", _FLOAT), ("grads", _FLOAT), ("exp_avg states", _F32), ("exp_avg_sq states", _F32),
               ("model params", _FLOAT))
_LARS_SPECS = (("params", _FLOAT), ("grads", _FLOAT), ("momentum buffers", _F32), ("model params", _FLOAT))
_SUMSQ_SPECS = (("tensors", _FLOAT),)


class TritonKernels:
    """The Triton kernel set (see the module docstring).

    A program handles one work item of ``chunks`` blocks of ``block`` elements of one segment. Defaults: on CUDA
    1024 x 1 with 4 warps (the fastest of the variants in ``benchmarks/triton_kernels.py`` on an H200, aligned
    and at odd offsets); in the interpreter (milliseconds per program) 4096 x 1."""

    name = "triton"

    def __init__(self, device=None, block: Optional[int] = None, chunks: Optional[int] = None,
                 num_warps: Optional[int] = None):
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda":
            if INTERPRET:
                raise RuntimeError("TRITON_INTERPRET=1 is set: the Triton kernels run in the interpreter, which "
                                   "takes CPU tensors only")
            if not torch.cuda.is_available():
                raise RuntimeError("backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)")
        elif device.type == "cpu":
            if not INTERPRET:
                raise RuntimeError("backend 'triton' runs CPU tensors only in the Triton interpreter: set "
                                   "TRITON_INTERPRET=1 before importing ds_conadv.kernels.triton")
        else:
            raise RuntimeError(f"backend 'triton' does not run on {device.type} tensors")
        self.device = device
        self.block = int(block or (4096 if INTERPRET else 1024))
        self.chunks = int(chunks or 1)
        if self.block & (self.block - 1) or self.block < 16 or self.chunks < 1:
            raise ValueError(f"block={self.block} must be a power of two >= 16 and chunks={self.chunks} >= 1")
        self.num_warps = int(num_warps or 4)
        self.reduce_block = 1024
        self.tables = TableCache(self.block * self.chunks)
        self._dummies = {}

    # -- helpers -------------------------------------------------------------------------------------------
    def _kw(self):
        kw = {"BLOCK": self.block, "CHUNKS": self.chunks}
        if not INTERPRET:
            kw["num_warps"] = self.num_warps
        return kw

    def _rkw(self):
        return {} if INTERPRET else {"num_warps": 4}

    def _dummy(self, device) -> Tensor:
        d = self._dummies.get(device)
        if d is None:
            d = self._dummies[device] = torch.zeros(2, dtype=torch.float32, device=device)
        return d

    @staticmethod
    def _device_ctx(device):
        if device.type == "cuda":
            return torch.cuda.device(device)
        return _Null()

    @staticmethod
    def _f32(x: Tensor, device) -> Tensor:
        return x.to(device=device, dtype=torch.float32).contiguous()

    def _coef(self, coef: Optional[Tensor], device):
        if coef is None:
            return self._dummy(device), False
        return self._f32(coef, device), True

    def _skip(self, skip: Optional[Tensor], device):
        if skip is None:
            return self._dummy(device), False
        skip = skip.to(device)
        if skip.dtype == torch.bool:
            skip = skip.view(torch.uint8)
        elif skip.dtype != torch.uint8:
            skip = (skip != 0).view(torch.uint8)
        return skip, True

    def _ids(self, seg_ids: Optional[Tensor], device):
        if seg_ids is None:
            return self._dummy(device), False
        return seg_ids.to(device=device, dtype=torch.int64).contiguous(), True

    @staticmethod
    def _lr(lr, device) -> Tensor:
        if isinstance(lr, Tensor):
            if lr.device != device and lr.device.type == "cpu":
                # a CPU scalar: reading it is no device sync, copying it from pageable memory would be
                return torch.full((), float(lr), dtype=torch.float32, device=device)
            return lr.to(device=device, dtype=torch.float32)
        return torch.full((), float(lr), dtype=torch.float32, device=device)

    def _reduce(self, partials: Tensor, table, seg_ids: Optional[Tensor], num_ids: int, ncol: int) -> Tensor:
        """Per-item partial sums -> [num_ids, ncol] fp32, deterministically (1 or 2 launches)."""
        device = partials.device
        kw = self._rkw()
        out = torch.empty(num_ids, ncol, dtype=torch.float32, device=device)
        if num_ids == 0:
            return out
        if seg_ids is None:
            if num_ids != table.n_seg:
                raise ValueError(f"num_ids={num_ids} without seg_ids needs one id per segment ({table.n_seg})")
            _launch(_norms.segment_sum_kernel, (table.n_seg,), partials, table.begin, out, table.n_items,
                    NCOL=ncol, ALL=False, RB=self.reduce_block, **kw)
        elif num_ids == 1:  # every segment is id 0: one program over all items
            _launch(_norms.segment_sum_kernel, (1,), partials, table.begin, out, table.n_items,
                    NCOL=ncol, ALL=True, RB=self.reduce_block, **kw)
        else:
            seg_sums = torch.empty(table.n_seg, ncol, dtype=torch.float32, device=device)
            _launch(_norms.segment_sum_kernel, (table.n_seg,), partials, table.begin, seg_sums, table.n_items,
                    NCOL=ncol, ALL=False, RB=self.reduce_block, **kw)
            ids, _ = self._ids(seg_ids, device)
            _launch(_norms.id_sum_kernel, (num_ids,), seg_sums, ids, out, table.n_seg,
                    NCOL=ncol, SB=self.reduce_block, **kw)
        return out

    @staticmethod
    def _models(seg):
        models = seg.model_params
        return models if models and any(m is not None for m in models) else None

    # -- the kernel-set interface --------------------------------------------------------------------------
    def sumsq(self, tensors: Sequence[Tensor], seg_ids: Optional[Tensor], num_ids: int,
              coef: Optional[Tensor] = None, dtype: torch.dtype = torch.float32) -> Tensor:
        tensors = list(tensors)
        if not tensors:
            return torch.zeros(num_ids, dtype=dtype)
        device = tensors[0].device
        with self._device_ctx(device):
            table = self.tables.get((tensors,), device, _SUMSQ_SPECS)
            (kind,) = table.kinds
            coef_t, has_coef = self._coef(coef, device)
            partials = torch.empty(table.grid, dtype=torch.float32, device=device)
            _launch(_norms.sumsq_kernel, (table.grid,), table.items, partials, coef_t, coef_t,
                    STRIDE=table.stride, COL_A=0, KIND_A=kind, COL_B=0, KIND_B=kind, NCOL=1, HAS_COEF=has_coef,
                    HAS_SKIP=False, ALIGNED=table.aligned, **self._kw())
            out = self._reduce(partials, table, seg_ids, num_ids, 1).view(num_ids)
        return out if dtype == torch.float32 else out.to(dtype)

    def _lamb_table(self, seg):
        exp_avgs, exp_avg_sqs = seg.states
        models = self._models(seg)
        device = seg.params[0].device
        table = self.tables.get((seg.params, seg.grads, exp_avgs, exp_avg_sqs, models), device, _LAMB_SPECS)
        return device, table, models is not None

    def lamb_phase1(self, seg, *, grad_coef, bc1, bc2, beta1, beta2, beta3, eps, weight_decay, adam_w_mode,
                    skip) -> Tensor:
        if not seg.params:
            return torch.zeros(seg.num_ids, 2, dtype=torch.float32)
        device, table, _ = self._lamb_table(seg)
        p_kind, g_kind = table.kinds[0], table.kinds[1]
        with self._device_ctx(device):
            coef_t, has_coef = self._coef(grad_coef, device)
            skip_t, has_skip = self._skip(skip, device)
            partials = torch.empty(table.grid, 2, dtype=torch.float32, device=device)
            _launch(_lamb.lamb_phase1_kernel, (table.grid,), table.items, partials,
                    self._f32(bc1, device), self._f32(bc2, device), coef_t, skip_t,
                    float(beta1), float(beta2), float(beta3), float(1.0 - beta2), float(eps), float(weight_decay),
                    P_KIND=p_kind, G_KIND=g_kind, HAS_COEF=has_coef, HAS_SKIP=has_skip,
                    L2_WD=(not adam_w_mode) and weight_decay != 0,
                    DECOUPLED_WD=bool(adam_w_mode) and weight_decay != 0,
                    ALIGNED=table.aligned, **self._kw())
            return self._reduce(partials, table, seg.seg_ids, seg.num_ids, 2)

    def lamb_phase2(self, seg, *, step_size, bc1, bc2, eps, weight_decay, adam_w_mode, skip) -> None:
        if not seg.params:
            return
        device, table, has_model = self._lamb_table(seg)
        with self._device_ctx(device):
            skip_t, has_skip = self._skip(skip, device)
            ids, has_ids = self._ids(seg.seg_ids, device)
            _launch(_lamb.lamb_phase2_kernel, (table.grid,), table.items, ids,
                    self._f32(step_size, device), self._f32(bc1, device), self._f32(bc2, device), skip_t,
                    float(eps), float(weight_decay),
                    P_KIND=table.kinds[0], MODEL_KIND=table.kinds[4], HAS_MODEL=has_model, HAS_IDS=has_ids,
                    HAS_SKIP=has_skip, DECOUPLED_WD=bool(adam_w_mode) and weight_decay != 0,
                    ALIGNED=table.aligned, **self._kw())

    def _lars_table(self, seg):
        (bufs,) = seg.states
        models = self._models(seg)
        device = seg.params[0].device
        table = self.tables.get((seg.params, seg.grads, bufs, models), device, _LARS_SPECS)
        return device, table, models is not None

    def lars_phase1(self, seg, *, grad_coef, skip, dtype=torch.float32) -> Tensor:
        if not seg.params:
            return torch.zeros(seg.num_ids, 2, dtype=torch.float32)
        device, table, _ = self._lars_table(seg)
        with self._device_ctx(device):
            coef_t, has_coef = self._coef(grad_coef, device)
            skip_t, has_skip = self._skip(skip, device)
            partials = torch.empty(table.grid, 2, dtype=torch.float32, device=device)
            _launch(_norms.sumsq_kernel, (table.grid,), table.items, partials, coef_t, skip_t,
                    STRIDE=table.stride, COL_A=_lars.COL_G, KIND_A=table.kinds[1], COL_B=_lars.COL_P,
                    KIND_B=table.kinds[0], NCOL=2, HAS_COEF=has_coef, HAS_SKIP=has_skip, ALIGNED=table.aligned,
                    **self._kw())
            return self._reduce(partials, table, seg.seg_ids, seg.num_ids, 2)

    def lars_phase2(self, seg, *, grad_coef, ratio, lr, weight_decay, momentum, dampening, nesterov,
                    skip) -> None:
        if not seg.params:
            return
        device, table, has_model = self._lars_table(seg)
        with self._device_ctx(device):
            coef_t, has_coef = self._coef(grad_coef, device)
            skip_t, has_skip = self._skip(skip, device)
            ids, has_ids = self._ids(seg.seg_ids, device)
            _launch(_lars.lars_phase2_kernel, (table.grid,), table.items, ids,
                    self._f32(ratio, device), self._f32(seg.steps, device), coef_t, skip_t, self._lr(lr, device),
                    float(weight_decay), float(momentum), float(1.0 - dampening),
                    P_KIND=table.kinds[0], G_KIND=table.kinds[1], MODEL_KIND=table.kinds[3], HAS_MODEL=has_model,
                    HAS_IDS=has_ids, HAS_COEF=has_coef, HAS_SKIP=has_skip, HAS_WD=weight_decay != 0,
                    NESTEROV=bool(nesterov), ALIGNED=table.aligned, **self._kw())


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
