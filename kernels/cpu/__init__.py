"""Fused C++ CPU kernels for LAMB and LARS (ds_conadv backend ``"cpp"``).

:class:`CppKernels` is a kernel set with the interface of
:class:`ds_conadv.optim.functional.ReferenceKernels`. The extension (``trust_ops.cpp``) is JIT-built on first
use with ``torch.utils.cpp_extension`` (``kernels/_build.py``: about a minute on two cores, then cached on disk)
and uses torch's OpenMP thread pool (``torch.set_num_threads``).

Compiler flags: ``-O3 -fopenmp``, plus ``-mavx2 -mfma -mf16c`` (and AVX-512 where the CPU has it) chosen
from ``/proc/cpuinfo`` (no ``-march=native``). The flags are part of the extension's cache key, so machines with
different CPUs sharing one cache directory get different builds. ``DS_CONADV_CPP_ISA=avx2|generic`` caps the
instruction set.

``DS_CONADV_DISABLE_CPP=1`` makes :class:`CppKernels` raise (``backend="auto"`` then uses ``foreach``).
A failed build raises once with the compiler's message; later constructions in the same process raise the
same error without rebuilding.
"""
from __future__ import annotations

import os
import platform
import threading
from typing import List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["CppKernels", "CppKernelsUnavailable", "load", "built", "compile_flags"]

_SOURCES = ["cpu/trust_ops.cpp"]
_lock = threading.Lock()
_module = None
_error: Optional[BaseException] = None


class CppKernelsUnavailable(RuntimeError):
    """The C++ CPU kernels cannot be built or loaded here."""


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compile_flags(isa: Optional[str] = None) -> List[str]:
    """Compiler flags for this machine: ISA flags only for features /proc/cpuinfo lists.

    ``isa`` (default: ``$DS_CONADV_CPP_ISA`` or ``"auto"``): ``"auto"`` (the best of the below this CPU has),
    ``"avx512"``, ``"avx2"`` or ``"generic"`` (plain -O3; the code then relies on auto-vectorization only).
    """
    isa = (isa or os.environ.get("DS_CONADV_CPP_ISA") or "auto").lower()
    if isa not in ("auto", "avx512", "avx2", "generic"):
        raise ValueError(f"DS_CONADV_CPP_ISA={isa!r}: expected auto, avx512, avx2 or generic")
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    if isa == "generic" or platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return flags
    cpu = _cpu_flags()
    has_avx2 = {"avx2", "fma", "f16c"} <= cpu
    has_avx512 = has_avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= cpu
    if has_avx2 and isa in ("auto", "avx2", "avx512"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    if has_avx512 and isa in ("auto", "avx512"):
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mprefer-vector-width=512"]
    return flags


def load():
    """Build (once) and import the extension; raises :class:`CppKernelsUnavailable` on failure."""
    global _module, _error
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if os.environ.get("DS_CONADV_DISABLE_CPP", "0") not in ("", "0"):
            raise CppKernelsUnavailable("disabled by DS_CONADV_DISABLE_CPP")
        if _error is not None:
            raise CppKernelsUnavailable(f"the C++ CPU kernels failed to build earlier: {_error}") from _error
        try:
            from .._build import load_extension

            _module = load_extension("ds_conadv_cpu_trust_ops", list(_SOURCES), extra_cflags=compile_flags(),
                                     label="the C++ CPU kernels")
        except BaseException as exc:  # noqa: BLE001 - compiler/linker/import errors of any kind
            if isinstance(exc, KeyboardInterrupt):
                raise
            msg = " ".join(str(exc).split())[-2000:] or type(exc).__name__
            _error = CppKernelsUnavailable(f"{type(exc).__name__}: {msg}")
            raise _error from exc
        return _module


def built() -> bool:
    """Whether :func:`load` would only import an earlier build (no compiler run): loaded, or on disk."""
    if _module is not None:
        return True
    if os.environ.get("DS_CONADV_DISABLE_CPP", "0") not in ("", "0") or _error is not None:
        return False
    try:
        from .._build import is_built

        return is_built("ds_conadv_cpu_trust_ops", list(_SOURCES), extra_cflags=compile_flags())
    except Exception:  # noqa: BLE001 - unreadable sources or cache: not built
        return False


def _check_cpu(seg) -> None:
    if seg.params and seg.params[0].device.type != "cpu":
        raise ValueError(f"backend 'cpp' runs on CPU tensors, got {seg.params[0].device}")


class CppKernels:
    """Fused two-pass LAMB/LARS kernels for CPU tensors (fp32/bf16/fp16 params and grads, fp32 state)."""

    name = "cpp"

    def __init__(self):
        self._ext = load()

    # -- sums of squares ---------------------------------------------------------------------------------
    def sumsq(self, tensors: Sequence[Tensor], seg_ids: Optional[Tensor], num_ids: int,
              coef: Optional[Tensor] = None, dtype: torch.dtype = torch.float32) -> Tensor:
        out = self._ext.sumsq(list(tensors), seg_ids, int(num_ids))
        if coef is not None:
            out = out * coef.to(torch.float64).square()
        return out.to(dtype)

    # -- LAMB ----------------------------------------------------------------------------------------------
    def lamb_phase1(self, seg, *, grad_coef, bc1, bc2, beta1, beta2, beta3, eps, weight_decay, adam_w_mode,
                    skip) -> Tensor:
        _check_cpu(seg)
        exp_avgs, exp_avg_sqs = seg.states
        return self._ext.lamb_phase1(seg.params, seg.grads, exp_avgs, exp_avg_sqs, seg.seg_ids, int(seg.num_ids),
                                     grad_coef, bc1, bc2, float(beta1), float(beta2), float(beta3), float(eps),
                                     float(weight_decay), bool(adam_w_mode), skip)

    def lamb_phase2(self, seg, *, step_size, bc1, bc2, eps, weight_decay, adam_w_mode, skip) -> None:
        _check_cpu(seg)
        exp_avgs, exp_avg_sqs = seg.states
        models = seg.model_params if seg.model_params is not None else []
        self._ext.lamb_phase2(seg.params, exp_avgs, exp_avg_sqs, models, seg.seg_ids, int(seg.num_ids), step_size,
                              bc1, bc2, float(eps), float(weight_decay), bool(adam_w_mode), skip)

    # -- LARS ----------------------------------------------------------------------------------------------
    def lars_phase1(self, seg, *, grad_coef, skip, dtype=torch.float32) -> Tensor:
        _check_cpu(seg)
        if seg.states and seg.states[0]:
            dtype = seg.states[0][0].dtype
        sums = self._ext.lars_phase1(seg.params, seg.grads, seg.seg_ids, int(seg.num_ids), skip)
        if grad_coef is not None and not (skip is not None and bool(skip)):  # a skipped step may carry a NaN coef
            sums[:, 0] *= grad_coef.to(torch.float64).square()
        return sums.to(dtype)

    def lars_phase2(self, seg, *, grad_coef, ratio, lr, weight_decay, momentum, dampening, nesterov,
                    skip) -> None:
        _check_cpu(seg)
        (bufs,) = seg.states
        models = seg.model_params if seg.model_params is not None else []
        lr_value = float(lr)  # a 0-d CPU tensor or a number (a host read is free on CPU)
        self._ext.lars_phase2(seg.params, seg.grads, bufs, models, seg.steps, seg.seg_ids, int(seg.num_ids),
                              grad_coef, ratio, lr_value, float(weight_decay), float(momentum), float(dampening),
                              bool(nesterov), skip)
