"""The backend interface: what a kernel set (``backend=`` "reference", "foreach", "cpp", "triton", "cuda") provides.

A kernel set only does element passes and sums of squares over :class:`~ds_conadv.optim.functional.Segments`; the
formulas (trust ratios, bias corrections, clipping) live once in :mod:`ds_conadv.optim.functional`. Every set
returned by :func:`ds_conadv.optim.backends.get_kernels` satisfies this protocol (``tests/test_kernel_set.py``
checks the ones that load here).
"""
from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from .functional import Segments

__all__ = ["KernelSet"]


@runtime_checkable
class KernelSet(Protocol):
    """Per-segment passes of LAMB and LARS and the per-id sums of squares they need."""

    name: str

    def sumsq(self, tensors: Sequence[Tensor], seg_ids: Optional[Tensor], num_ids: int,
              coef: Optional[Tensor] = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """``[num_ids, 1]``-shaped sums of squares of ``coef * t`` per norm id (segment ``i`` has id
        ``seg_ids[i]``, or ``i`` without ids)."""

    def lamb_phase1(self, seg: Segments, *, grad_coef: Any, bc1: Any, bc2: Any, beta1: float, beta2: float,
                    beta3: float, eps: float, weight_decay: float, adam_w_mode: bool, skip: Any) -> Tensor:
        """Moments updated in place; returns the per-id sums of squares of (param, update)."""

    def lamb_phase2(self, seg: Segments, *, step_size: Any, bc1: Any, bc2: Any, eps: float, weight_decay: float,
                    adam_w_mode: bool, skip: Any) -> None:
        """The parameter update with the per-segment step sizes (trust ratio x lr)."""

    def lars_phase1(self, seg: Segments, *, grad_coef: Any, skip: Any, dtype: torch.dtype = torch.float32) -> Tensor:
        """Per-id sums of squares of (param, gradient)."""

    def lars_phase2(self, seg: Segments, *, grad_coef: Any, ratio: Any, lr: Any, weight_decay: float,
                    momentum: float, dampening: float, nesterov: bool, skip: Any) -> None:
        """Momentum buffer and parameter update with the per-segment trust ratios."""
