"""Which kernel set runs a step.

``backend=`` names one of:

* ``"reference"`` — per-tensor PyTorch (:class:`~ds_conadv.optim.functional.ReferenceKernels`), the oracle.
* ``"foreach"``  — ``torch._foreach_*`` multi-tensor ops, any device; no Python work per element.
* ``"cpp"``      — fused C++ CPU kernels (two passes, OpenMP), JIT-built once with ``torch.utils.cpp_extension``.
* ``"triton"``   — fused multi-tensor Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).
* ``"cuda"``     — fused multi-tensor CUDA C++ kernels, JIT-built once.
* ``"auto"``     — CUDA tensors: ``cuda`` if it builds, else ``triton``, else ``foreach``;
  CPU tensors: ``cpp`` if it builds, else ``foreach``. A fallback warns once, naming why.
"""
from __future__ import annotations

import warnings
from typing import Dict, Tuple

import torch

from .functional import ReferenceKernels

BACKENDS = ("auto", "reference", "foreach", "cpp", "triton", "cuda")

_cache: Dict[Tuple[str, str], object] = {}
_warned: set = set()


class BackendUnavailable(RuntimeError):
    """A backend cannot run here (missing package, failed build, wrong device)."""


def check_backend_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend={name!r} is not supported; allowed: {', '.join(BACKENDS)}")
    return name.lower()


def _load(name: str, device: torch.device):
    if name == "reference":
        return ReferenceKernels()
    if name == "foreach":
        from ._foreach import ForeachKernels

        return ForeachKernels()
    if name == "cpp":
        if device.type != "cpu":
            raise BackendUnavailable(f"backend 'cpp' runs on CPU tensors, got {device}")
        from ds_conadv.kernels.cpu import CppKernels

        return CppKernels()
    if name == "triton":
        from ds_conadv.kernels.triton import TritonKernels

        return TritonKernels(device)
    if name == "cuda":
        if device.type != "cuda":
            raise BackendUnavailable(f"backend 'cuda' runs on CUDA tensors, got {device}")
        from ds_conadv.kernels.cuda import CudaKernels

        return CudaKernels()
    raise ValueError(f"backend={name!r} is not supported; allowed: {', '.join(BACKENDS)}")


def _auto_order(device: torch.device):
    if device.type == "cuda":
        return ("cuda", "triton", "foreach")
    if device.type == "cpu":
        return ("cpp", "foreach")
    return ("foreach",)


def get_kernels(name: str, device: torch.device):
    """The kernel set for ``name`` on ``device`` (cached). Explicit names raise; ``auto`` falls back."""
    hit = _cache.get((name, device.type))  # every step asks: the cached answer first
    if hit is not None:
        return hit
    name = check_backend_name(name)
    key = (name, device.type)
    if key in _cache:
        return _cache[key]
    if name != "auto":
        try:
            kernels = _load(name, device)
        except BackendUnavailable:
            raise
        except Exception as exc:  # import or build failure: name it
            raise BackendUnavailable(f"backend {name!r} is unavailable on {device}: {exc}") from exc
        _cache[key] = kernels
        return kernels
    reasons = []
    for candidate in _auto_order(device):
        try:
            kernels = get_kernels(candidate, device)
        except Exception as exc:
            reasons.append(f"{candidate}: {exc}")
            continue
        if reasons and key not in _warned:
            _warned.add(key)
            warnings.warn(f"ds_conadv backend 'auto' on {device.type} uses {candidate!r}; "
                          f"skipped {'; '.join(reasons)}", RuntimeWarning, stacklevel=3)
        _cache[key] = kernels
        return kernels
    raise BackendUnavailable(f"no backend available on {device}: {'; '.join(reasons)}")
