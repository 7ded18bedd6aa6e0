"""Fused multi-tensor LAMB / LARS CUDA kernels (``backend="cuda"``).

Layout of this package:

* ``dsc_multi_tensor.cuh`` -- the per-thread element code (``__host__ __device__``), table layout, dtypes;
* ``dsc_kernels.cu``       -- ``__global__`` kernels, block reduction, launchers (CUDA headers only);
* ``dsc_api.h``            -- the C launcher interface (no CUDA, no torch headers);
* ``dsc_binding.cpp``      -- pybind11 binding: raw addresses, scalars and the stream as Python ints/floats
  (torch-free, so it compiles against a CPU-only torch too);
* ``dsc_host_emulation.cpp`` -- the launchers run on the CPU with the same element code (tests without GPU).

Design (one param group = a list of segments, see :class:`ds_conadv.optim.functional.Segments`):

* A host-built int64 *table* holds, per segment, the addresses of p / g / state0 / state1 / model copy, the
  numel, dtype codes and alignment, and a flat list of *work items* ``(segment, chunk of 4096 elements)``.
  It is built from ``data_ptr()`` ints (numpy), copied to pinned memory and uploaded with
  ``non_blocking=True``, and cached keyed by the tensors' (address, dtype) and numels: an unchanged set of
  tensors costs a dict lookup, no upload.
* One thread block per work item (256 threads x 4 groups x 4 elements); the dtype of p / g / model copy is
  dispatched per block (fp32 / bf16 / fp16, any mix in one launch), math is fp32, stores round to nearest
  even.  Segments may start at any element offset: a segment whose tensors share one misalignment uses 16-byte
  (fp32) / 8-byte (16-bit) vector accesses, otherwise scalar ones.
* Sums of squares: per-block partials -> one block per segment -> one block per norm id (only when ``seg_ids``
  is given), all in a fixed order: no atomics, bitwise reproducible.  The per-id kernel scans all segment ids
  (O(num_ids * n_seg) integer compares, trivial for the few thousand ids of real models).
* Per-segment / per-id vectors (bias corrections, step counts, step sizes, trust ratios), the gradient
  coefficient, ``lr`` (when a tensor) and the ``skip`` flag are read on the device: no host sync in a step, and
  a step can be captured in a CUDA graph (warm it up once first so that the tables are cached).

Kernel launches per call, whatever the number of tensors (counted in :data:`LAUNCHES`):
``sumsq``/``lamb_phase1``/``lars_phase1``: 2 (+1 with ``seg_ids``); ``lamb_phase2``/``lars_phase2``: 1.
A LAMB or LARS step is 3 fused launches (4 under ZeRO segment ids) plus the few small torch ops of
``functional.py`` for the trust ratios (+3 for ``max_grad_norm``: the global grad norm is a ``sumsq`` over one
id).

Measured bandwidths and step times (``benchmarks/optim_step.py``, ``benchmarks/triton_kernels.py``) are in
docs/kernels.md and docs/benchmarks.md, not here (they go stale).

Memory traffic (fp32): LAMB pass 1 reads p, g, m, v and writes m, v (24 B/param), pass 2 reads p, m, v and
writes p (16 B/param); LARS pass 1 reads g, p (8 B/param), pass 2 reads p, g, buf and writes buf, p (20 B/param;
the buffer is not read on a segment's first step).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["CudaKernels", "LAUNCHES", "build", "build_at_install", "build_table", "load_host_emulation",
           "cuda_include_dir", "SOURCES", "CHUNK"]

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["cuda/dsc_binding.cpp", "cuda/dsc_kernels.cu"]  # relative to kernels/ (kernels/_build.py)
HEADERS = ["dsc_api.h", "dsc_multi_tensor.cuh"]
EXTRA_CFLAGS = ["-O3", "-std=c++17"]
EXTRA_CUDA_CFLAGS = ["-O3", "-std=c++17"]
EXT_NAME = "ds_conadv_cuda_kernels"

CHUNK = 4096  # elements per work item; must equal dsc::kChunk (checked at load)
SLOTS = 5  # p, g, state0, state1, model copy
_P, _G, _S0, _S1, _M = range(SLOTS)
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_NONE = 3

#: Number of CUDA kernels launched by this backend so far (tests compare it across tensor counts).
LAUNCHES = 0


# ----------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------
def build(verbose: bool = False):
    """The compiled extension (JIT-built once with ``kernels/_build.py``, then loaded from its cache).

    A prebuilt module ``ds_conadv.kernels.cuda._dsc_ext`` (``setup.py`` with a ``CUDAExtension`` of
    :data:`SOURCES` named so) is used first when present.
    """
    try:
        from . import _dsc_ext  # type: ignore[attr-defined]

        return _dsc_ext
    except ImportError:
        pass
    from .._build import load_extension

    # load_extension names the build after its sources and flags; the headers go into the name here
    h = hashlib.sha1()
    for header in HEADERS:
        with open(os.path.join(HERE, header), "rb") as f:
            h.update(f.read())
    return load_extension(f"{EXT_NAME}_{h.hexdigest()[:8]}", SOURCES, extra_cflags=EXTRA_CFLAGS,
                          extra_cuda_cflags=EXTRA_CUDA_CFLAGS, verbose=verbose, label="the CUDA kernels")


def build_at_install(verbose: bool = True) -> bool:
    """Pre-build the extension into the JIT cache, e.g. in an image build step after installing
    (``python -c "from ds_conadv.kernels.cuda import build_at_install; build_at_install()"``).

    Needs nvcc and a CUDA build of torch (no GPU needed).  Returns True on success, False (with a message on
    stderr) otherwise, so that a set-up step never fails because of it; the kernels then build on first use.
    ``setup.py`` does not call this: with ``DS_CONADV_BUILD_CUDA=1`` it compiles the extension itself as
    ``ds_conadv.kernels.cuda._dsc_ext``, which :func:`build` imports first.
    """
    try:
        build(verbose=verbose)
        return True
    except Exception as exc:  # pragma: no cover - depends on the machine
        print(f"ds_conadv: building the CUDA kernels failed ({exc}); they will be built on first use",
              file=sys.stderr)
        return False


def cuda_include_dir() -> Optional[str]:
    """CUDA's include directory (for cuda_bf16.h / cuda_fp16.h), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "include", "cuda_bf16.h")):
            return os.path.join(root, "include")
    if nvcc:  # a wrapper script: ask nvcc where its headers are
        try:
            out = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60).stderr
        except (OSError, subprocess.SubprocessError):
            return None
        for line in out.splitlines():
            if "INCLUDES=" in line:
                for tok in line.split("INCLUDES=", 1)[1].strip().strip('"').split():
                    path = tok[2:].strip('"') if tok.startswith("-I") else None
                    if path and os.path.isfile(os.path.join(path, "cuda_bf16.h")):
                        return os.path.normpath(path)
    return None


class _EmulatedLib:
    """The launchers of dsc_host_emulation.cpp through ctypes, with the binding's call signatures."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        P, I64, F, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
        sig = {
            "dsc_sumsq2": [P, I64, I64, P, P, I64, P, P, P, P, I, P],
            "dsc_lamb_phase1": [P, I64, I64, P, P, P, F, F, F, F, F, F, I, P, I64, P, P, P, P, P],
            "dsc_lamb_phase2": [P, I64, I64, P, P, P, P, F, F, I, P, P],
            "dsc_lars_phase2": [P, I64, I64, P, P, P, P, P, F, F, F, F, I, P, P],
        }
        for name, argtypes in sig.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
            setattr(self, name[len("dsc_"):], fn)
        lib.dsc_chunk_elems.restype = ctypes.c_int
        lib.dsc_error_string.restype = ctypes.c_char_p
        lib.dsc_error_string.argtypes = [ctypes.c_int]
        self._lib = lib

    def chunk_elems(self) -> int:
        return self._lib.dsc_chunk_elems()

    def error_string(self, code: int) -> str:
        return self._lib.dsc_error_string(code).decode()


def load_host_emulation(build_dir: str, cxx: str = "g++"):
    """Build (if needed) dsc_host_emulation.cpp into ``build_dir`` and return :class:`CudaKernels` on it.

    The returned kernel set works on CPU tensors and runs the CUDA element code on the host: for tests and
    debugging on machines without a GPU.  Raises RuntimeError when no compiler / CUDA headers are found.
    """
    inc = cuda_include_dir()
    if inc is None:
        raise RuntimeError("CUDA headers (cuda_bf16.h) not found: set CUDA_HOME")
    src = os.path.join(HERE, "dsc_host_emulation.cpp")
    deps = [src, os.path.join(HERE, "dsc_multi_tensor.cuh"), os.path.join(HERE, "dsc_api.h")]
    os.makedirs(build_dir, exist_ok=True)
    out = os.path.join(build_dir, "libdsc_host_emulation.so")
    if not os.path.exists(out) or os.path.getmtime(out) < max(os.path.getmtime(d) for d in deps):
        cmd = [cxx, "-O1", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Werror", f"-I{inc}", src, "-o", out]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr}")
    return CudaKernels(lib=_EmulatedLib(out), device_type="cpu")


# ----------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------
def _code(t: Tensor, slot: int) -> int:
    if slot in (_S0, _S1):
        if t.dtype != torch.float32:
            raise TypeError(f"backend 'cuda' keeps optimizer state in float32, got {t.dtype}")
        return 0
    code = _CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"backend 'cuda' supports float32, bfloat16 and float16 tensors, got {t.dtype}"
                        + (" (use backend='foreach' or 'reference' for float64)" if t.dtype == torch.float64 else ""))
    return code


def build_table(slots: Sequence[Optional[Sequence[Optional[Tensor]]]], device_type: str = "cuda"):
    """The int64 table of dsc_multi_tensor.cuh for segments given as ``SLOTS`` lists (p, g, s0, s1, model).

    A list may be None (slot absent for every segment); entries of the model list may be None. Returns
    ``(table: np.ndarray[int64], n_seg, n_items)``.  Raises TypeError / ValueError for unsupported inputs.
    """
    present = [lst for lst in slots if lst is not None]
    n_seg = len(present[0]) if present else 0
    ptrs = np.zeros((n_seg, SLOTS), dtype=np.int64)
    numel = np.zeros(n_seg, dtype=np.int64)
    meta = np.zeros(n_seg, dtype=np.int64)
    offs = np.zeros(n_seg, dtype=np.int64)
    for lst in present:
        if len(lst) != n_seg:
            raise ValueError(f"segment lists of different lengths ({len(lst)} vs {n_seg})")
    for s in range(n_seg):
        codes = [_NONE] * SLOTS
        n = None
        misalign = set()
        for k, lst in enumerate(slots):
            t = None if lst is None else lst[s]
            if t is None:
                continue
            codes[k] = _code(t, k)
            if t.device.type != device_type:
                raise ValueError(f"backend 'cuda' needs {device_type} tensors, got one on {t.device}")
            if not t.is_contiguous():
                raise ValueError("backend 'cuda' needs contiguous tensors")
            if n is None:
                n = t.numel()
            elif t.numel() != n:
                raise ValueError(f"segment {s}: tensors of {n} and {t.numel()} elements")
            addr, size = t.data_ptr(), t.element_size()
            ptrs[s, k] = addr
            misalign.add((addr // size) % 4 if addr % size == 0 else -1)
        if codes[_M] != _NONE and codes[_P] != 0:
            raise ValueError("backend 'cuda': a model copy needs float32 (master) params, got a "
                             f"{slots[_P][s].dtype} param")
        numel[s] = n or 0
        vec = len(misalign) == 1 and -1 not in misalign
        off = misalign.pop() if vec else 0
        offs[s] = off
        meta[s] = codes[_P] | (codes[_G] << 2) | (codes[_M] << 4) | (off << 6) | (int(vec) << 8)
    chunks = np.where(numel > 0, (offs + numel + CHUNK - 1) // CHUNK, 0).astype(np.int64)
    item_begin = np.zeros(n_seg + 1, dtype=np.int64)
    np.cumsum(chunks, out=item_begin[1:])
    n_items = int(item_begin[-1])
    seg_of_item = np.repeat(np.arange(n_seg, dtype=np.int64), chunks)
    chunk_of_item = np.arange(n_items, dtype=np.int64) - np.repeat(item_begin[:-1], chunks)
    items = (seg_of_item << 32) | chunk_of_item
    table = np.concatenate([ptrs.reshape(-1), numel, meta, item_begin, items])
    return table, n_seg, n_items


def _key(slots, device) -> tuple:
    parts: list = [str(device)]
    for lst in slots:
        if lst is None:
            parts.append(None)
            continue
        parts.append(tuple(0 if t is None else t.data_ptr() for t in lst))
        parts.append(tuple(None if t is None else t.dtype for t in lst))
    first = next(lst for lst in slots if lst is not None)
    parts.append(tuple(t.numel() for t in first))
    return tuple(parts)


class _Table:
    __slots__ = ("device_table", "pinned", "n_seg", "n_items", "stream")

    def __init__(self, device_table, pinned, n_seg, n_items, stream):
        self.device_table, self.pinned, self.n_seg, self.n_items, self.stream = (
            device_table, pinned, n_seg, n_items, stream)


# ----------------------------------------------------------------------------------------------------------
# The kernel set
# ----------------------------------------------------------------------------------------------------------
class CudaKernels:
    """Fused multi-tensor CUDA kernels with the interface of :class:`~ds_conadv.optim.functional.ReferenceKernels`.

    ``lib`` / ``device_type`` are for tests (:func:`load_host_emulation`); normally ``CudaKernels()`` builds or
    loads the CUDA extension and works on CUDA tensors.
    """

    name = "cuda"

    def __init__(self, lib=None, device_type: str = "cuda", cache_size: int = 64):
        if lib is None:
            if not torch.cuda.is_available():
                raise RuntimeError("backend 'cuda' needs a CUDA device (torch.cuda.is_available() is False)")
            lib = build()
        if lib.chunk_elems() != CHUNK:
            raise RuntimeError(f"kernel chunk size {lib.chunk_elems()} != {CHUNK}: stale build")
        self._lib = lib
        self._device_type = device_type
        self._tables: "OrderedDict[tuple, _Table]" = OrderedDict()
        self._cache_size = cache_size

    # -- plumbing ------------------------------------------------------------------------------------------
    def _stream(self, device: torch.device) -> int:
        if device.type != "cuda":
            return 0
        return torch.cuda.current_stream(device).cuda_stream

    def _call(self, fn, *args) -> None:
        global LAUNCHES
        res = fn(*args)
        if res < 0:
            raise RuntimeError(f"ds_conadv cuda kernel failed: {self._lib.error_string(-res)}")
        LAUNCHES += res

    def _table(self, slots, device: torch.device, stream: int) -> _Table:
        key = _key(slots, device)
        entry = self._tables.get(key)
        if entry is not None:
            self._tables.move_to_end(key)
            if device.type == "cuda" and entry.stream != stream and not torch.cuda.is_current_stream_capturing():
                # used on another stream than the one it was allocated on: keep it alive for that stream too
                entry.device_table.record_stream(torch.cuda.current_stream(device))
            return entry
        array, n_seg, n_items = build_table(slots, self._device_type)
        host = torch.from_numpy(array)
        if device.type == "cuda":
            pinned = host.pin_memory()
            dev = pinned.to(device, non_blocking=True)
        else:
            pinned, dev = host, host
        entry = _Table(dev, pinned, n_seg, n_items, stream)
        self._tables[key] = entry
        while len(self._tables) > self._cache_size:
            self._tables.popitem(last=False)
        return entry

    def _check_device(self, device: torch.device) -> None:
        if device.type != self._device_type:
            raise ValueError(f"backend 'cuda' runs on {self._device_type} tensors, got {device}")

    @staticmethod
    def _vec(x: Tensor, n: int, device, what: str) -> Tensor:
        """A float32 contiguous vector of n entries on device (no copy when it already is one)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{what} must be a tensor")
        if x.numel() < n:
            raise ValueError(f"{what} has {x.numel()} entries, need {n}")
        x = x.to(device=device, dtype=torch.float32, non_blocking=True)
        return x.contiguous()

    @staticmethod
    def _scalar(x, device) -> Optional[Tensor]:
        """None, or a 0-d/1-element float32 tensor on device, for a coefficient read by the kernels."""
        if x is None:
            return None
        if not isinstance(x, Tensor):
            return torch.full((), float(x), dtype=torch.float32, device=device)
        return x.to(device=device, dtype=torch.float32, non_blocking=True).contiguous()

    @staticmethod
    def _skip(skip, device):
        """(flag tensor on device or None, skipped_on_host).  A CPU flag on a CUDA run is read on the host."""
        if skip is None:
            return None, False
        if not isinstance(skip, Tensor):
            return None, bool(skip)
        if skip.device != device:
            if skip.device.type == "cpu":
                return None, bool(skip)
            skip = skip.to(device, non_blocking=True)
        if skip.dtype != torch.bool:
            skip = skip != 0
        return skip.contiguous(), False

    @staticmethod
    def _ids(seg_ids, n_seg: int, num_ids: int, device) -> Optional[Tensor]:
        if seg_ids is None:
            if num_ids < n_seg:
                raise ValueError(f"{n_seg} segments need {n_seg} norm ids without seg_ids, got num_ids={num_ids}")
            return None
        if seg_ids.numel() != n_seg:
            raise ValueError(f"seg_ids has {seg_ids.numel()} entries for {n_seg} segments")
        return seg_ids.to(device=device, dtype=torch.int64, non_blocking=True).contiguous()

    @staticmethod
    def _ptr(t: Optional[Tensor]) -> int:
        return 0 if t is None else t.data_ptr()

    def _device_of(self, tensors) -> torch.device:
        device = tensors[0].device
        self._check_device(device)
        return device

    def _guard(self, device):
        if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
            return torch.cuda.device(device)
        return _NullContext()

    def _sums(self, slots, seg_ids, num_ids, device, launcher, cols: int = 2) -> Tensor:
        """Shared by the sum-of-squares passes: allocate partial / seg_sums / out, launch, return out."""
        stream = self._stream(device)
        table = self._table(slots, device, stream)
        ids = self._ids(seg_ids, table.n_seg, num_ids, device)
        f32 = dict(dtype=torch.float32, device=device)
        partial = torch.empty(2 * max(table.n_items, 1), **f32)
        seg_sums = torch.empty(2 * max(table.n_seg, 1), **f32) if ids is not None else None
        shape = (num_ids, 2) if cols == 2 else (num_ids,)
        # without seg_ids the segment reduction writes rows 0..n_seg-1 only
        out = (torch.zeros if ids is None and num_ids != table.n_seg else torch.empty)(shape, **f32)
        launcher(table, ids, partial, seg_sums, out, stream)
        return out

    # -- the interface -------------------------------------------------------------------------------------
    def sumsq(self, tensors: Sequence[Tensor], seg_ids: Optional[Tensor], num_ids: int,
              coef: Optional[Tensor] = None, dtype: torch.dtype = torch.float32) -> Tensor:
        tensors = list(tensors)
        if not tensors:
            device = seg_ids.device if seg_ids is not None else torch.device("cpu")
            return torch.zeros(num_ids, dtype=dtype, device=device)
        device = self._device_of(tensors)
        slots = [None, tensors, None, None, None]
        with self._guard(device):
            out = self._sumsq2(slots, seg_ids, num_ids, coef, None, device, cols=1)
        return out if dtype == torch.float32 else out.to(dtype)

    def _sumsq2(self, slots, seg_ids, num_ids, coef, skip, device, cols: int = 2) -> Tensor:
        coef_t = self._scalar(coef, device)
        skip_t, host_skip = self._skip(skip, device)
        if host_skip:
            return torch.zeros((num_ids, 2) if cols == 2 else (num_ids,), dtype=torch.float32, device=device)

        def launch(table, ids, partial, seg_sums, out, stream):
            self._call(self._lib.sumsq2, self._ptr(table.device_table), table.n_seg, table.n_items,
                       self._ptr(coef_t), self._ptr(ids), num_ids, self._ptr(skip_t), self._ptr(partial),
                       self._ptr(seg_sums), self._ptr(out), cols, stream)

        return self._sums(slots, seg_ids, num_ids, device, launch, cols)

    @staticmethod
    def _lamb_slots(seg) -> list:
        exp_avgs, exp_avg_sqs = seg.states
        return [list(seg.params), list(seg.grads), list(exp_avgs), list(exp_avg_sqs),
                None if seg.model_params is None else list(seg.model_params)]

    @staticmethod
    def _lars_slots(seg) -> list:
        (bufs,) = seg.states
        return [list(seg.params), list(seg.grads), list(bufs), None,
                None if seg.model_params is None else list(seg.model_params)]

    def lamb_phase1(self, seg, *, grad_coef, bc1, bc2, beta1, beta2, beta3, eps, weight_decay, adam_w_mode,
                    skip) -> Tensor:
        device = self._device_of(seg.params)
        with self._guard(device):
            n_seg = len(seg.params)
            coef_t = self._scalar(grad_coef, device)
            bc1_t, bc2_t = self._vec(bc1, n_seg, device, "bc1"), self._vec(bc2, n_seg, device, "bc2")
            skip_t, host_skip = self._skip(skip, device)
            if host_skip:
                return torch.zeros(seg.num_ids, 2, dtype=torch.float32, device=device)

            def launch(table, ids, partial, seg_sums, out, stream):
                self._call(self._lib.lamb_phase1, self._ptr(table.device_table), table.n_seg, table.n_items,
                           self._ptr(coef_t), self._ptr(bc1_t), self._ptr(bc2_t), float(beta1), float(beta2),
                           float(beta3), float(1.0 - beta2), float(eps), float(weight_decay), int(bool(adam_w_mode)),
                           self._ptr(ids), seg.num_ids, self._ptr(skip_t), self._ptr(partial), self._ptr(seg_sums),
                           self._ptr(out), stream)

            return self._sums(self._lamb_slots(seg), seg.seg_ids, seg.num_ids, device, launch)

    def lamb_phase2(self, seg, *, step_size, bc1, bc2, eps, weight_decay, adam_w_mode, skip) -> None:
        device = self._device_of(seg.params)
        with self._guard(device):
            n_seg = len(seg.params)
            skip_t, host_skip = self._skip(skip, device)
            if host_skip:
                return
            stream = self._stream(device)
            table = self._table(self._lamb_slots(seg), device, stream)
            ids = self._ids(seg.seg_ids, n_seg, seg.num_ids, device)
            step_t = self._vec(step_size, seg.num_ids, device, "step_size")
            bc1_t, bc2_t = self._vec(bc1, n_seg, device, "bc1"), self._vec(bc2, n_seg, device, "bc2")
            self._call(self._lib.lamb_phase2, self._ptr(table.device_table), table.n_seg, table.n_items,
                       self._ptr(step_t), self._ptr(ids), self._ptr(bc1_t), self._ptr(bc2_t), float(eps),
                       float(weight_decay), int(bool(adam_w_mode)), self._ptr(skip_t), stream)

    def lars_phase1(self, seg, *, grad_coef, skip, dtype=torch.float32) -> Tensor:
        device = self._device_of(seg.params)
        with self._guard(device):
            # the full LARS table (shared with pass 2: one cache entry); this pass reads only p and g
            return self._sumsq2(self._lars_slots(seg), seg.seg_ids, seg.num_ids, grad_coef, skip, device)

    def lars_phase2(self, seg, *, grad_coef, ratio, lr, weight_decay, momentum, dampening, nesterov,
                    skip) -> None:
        device = self._device_of(seg.params)
        with self._guard(device):
            n_seg = len(seg.params)
            skip_t, host_skip = self._skip(skip, device)
            if host_skip:
                return
            stream = self._stream(device)
            table = self._table(self._lars_slots(seg), device, stream)
            ids = self._ids(seg.seg_ids, n_seg, seg.num_ids, device)
            coef_t = self._scalar(grad_coef, device)
            ratio_t = self._vec(ratio, seg.num_ids, device, "ratio")
            steps_t = self._vec(seg.steps, n_seg, device, "steps")
            lr_t, lr_value = None, 0.0
            if isinstance(lr, Tensor):
                if lr.device.type == device.type and lr.device == device:
                    lr_t = lr.to(dtype=torch.float32).contiguous()
                elif lr.device.type == "cpu":
                    lr_value = float(lr)  # a CPU tensor: read on the host, no device sync
                else:
                    lr_t = lr.to(device=device, dtype=torch.float32, non_blocking=True).contiguous()
            else:
                lr_value = float(lr)
            self._call(self._lib.lars_phase2, self._ptr(table.device_table), table.n_seg, table.n_items,
                       self._ptr(coef_t), self._ptr(ratio_t), self._ptr(ids), self._ptr(steps_t), self._ptr(lr_t),
                       lr_value, float(weight_decay), float(momentum), float(1.0 - dampening),
                       int(bool(nesterov)), self._ptr(skip_t), stream)


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
