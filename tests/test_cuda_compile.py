"""The CUDA backend's sources build, and its table builder is right, on machines without a GPU.

* every ``kernels/cuda/*.cu`` compiles with nvcc to object code for sm_80 and sm_90, with the flags torch's
  cpp_extension adds (no implicit half/bfloat16 conversions); skipped when nvcc is missing;
* the torch binding ``dsc_binding.cpp`` is torch-free: it compiles with g++ against the (CPU) torch's pybind11
  and the Python headers, and -- linked with the host emulation instead of the CUDA launchers -- imports and
  drives the kernels through exactly the calls the GPU build gets (argument order, types, return codes);
* ``build_table`` (pure Python): work items cover every segment exactly once, alignment / vector flags, dtype
  codes, errors.

The numerical tests of the kernels (GPU, and the host emulation on CPU) are in test_cuda_kernels.py.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import torch

import ds_conadv.kernels.cuda as dsc
from ds_conadv.optim.functional import Segments, bias_corrections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_cases import cut  # noqa: E402

CUDA_DIR = os.path.dirname(os.path.abspath(dsc.__file__))
NVCC = shutil.which("nvcc")
CXX = shutil.which("g++") or shutil.which("c++")
# what torch.utils.cpp_extension adds to every nvcc command
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]


def _cu_files():
    return sorted(f for f in os.listdir(CUDA_DIR) if f.endswith(".cu"))


def test_there_are_cuda_sources():
    assert "dsc_kernels.cu" in _cu_files()
    for rel in dsc.SOURCES:
        assert os.path.isfile(os.path.join(os.path.dirname(CUDA_DIR), rel)), rel


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("cu", _cu_files())
def test_cu_compiles_for_sm80_and_sm90(cu, tmp_path):
    out = tmp_path / "k.o"
    cmd = [NVCC, "-c", "-O3", "-std=c++17", "--threads", "2",
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
           *TORCH_NVCC_FLAGS, "-Werror", "all-warnings", "-Xcompiler", "-Wall",
           os.path.join(CUDA_DIR, cu), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    assert out.stat().st_size > 0


def _python_include():
    return sysconfig.get_paths()["include"]


@pytest.fixture(scope="module")
def binding_module(tmp_path_factory):
    """dsc_binding.cpp + dsc_host_emulation.cpp built into a Python module with g++ (no nvcc, no GPU)."""
    if CXX is None:
        pytest.skip("no C++ compiler")
    inc = dsc.cuda_include_dir()
    if inc is None:
        pytest.skip("CUDA headers not found")
    from torch.utils.cpp_extension import include_paths

    name = "dsc_binding_on_host_emulation"
    out_dir = tmp_path_factory.mktemp("dsc_binding")
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    out = out_dir / f"{name}{suffix}"
    cmd = [CXX, "-O1", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Werror", f"-DTORCH_EXTENSION_NAME={name}",
           *[f"-I{p}" for p in include_paths()], f"-I{_python_include()}", f"-I{inc}",
           os.path.join(CUDA_DIR, "dsc_binding.cpp"), os.path.join(CUDA_DIR, "dsc_host_emulation.cpp"),
           "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"
    spec = importlib.util.spec_from_file_location(name, out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_binding_compiles_against_cpu_torch_and_drives_the_kernels(binding_module, tmp_path):
    mod = binding_module
    assert mod.chunk_elems() == dsc.CHUNK
    assert isinstance(mod.error_string(1), str)
    via_binding = dsc.CudaKernels(lib=mod, device_type="cpu")
    via_ctypes = dsc.load_host_emulation(str(tmp_path))
    results = []
    for k in (via_binding, via_ctypes):
        gen = torch.Generator().manual_seed(0)
        sizes = [1, 4097, 0, 9000]
        flat = torch.randn(sum(sizes) + 3, generator=gen)

        def views(buf):  # unaligned: the first at element 1
            return cut(buf, sizes, 1)

        pbuf = flat.clone()
        ps, gs = views(pbuf), views(torch.randn(flat.numel(), generator=gen).to(torch.bfloat16))
        ms, vs = views(torch.zeros_like(flat)), views(torch.zeros_like(flat))
        bufs, models = views(torch.zeros_like(flat)), views(torch.zeros(flat.numel(), dtype=torch.float16))
        ids, steps = torch.tensor([0, 1, 1, 0]), torch.tensor([1.0, 1.0, 2.0, 2.0])
        lamb = Segments(ps, gs, [ms, vs], steps, models, ids, 2)
        bc1, bc2 = bias_corrections(steps, 0.9, 0.999, True)
        coef, skip, lr = torch.tensor(0.5), torch.tensor(False), torch.tensor(0.1)
        r = [k.sumsq(gs, None, 4, coef), k.sumsq(gs, ids, 2)]
        r.append(k.lamb_phase1(lamb, grad_coef=coef, bc1=bc1, bc2=bc2, beta1=0.9, beta2=0.999, beta3=0.1, eps=1e-6,
                               weight_decay=0.01, adam_w_mode=True, skip=skip))
        k.lamb_phase2(lamb, step_size=torch.tensor([1e-2, 2e-2]), bc1=bc1, bc2=bc2, eps=1e-6, weight_decay=0.01,
                      adam_w_mode=True, skip=skip)
        lars = Segments(ps, gs, [bufs], steps, models, ids, 2)
        r.append(k.lars_phase1(lars, grad_coef=coef, skip=None))
        k.lars_phase2(lars, grad_coef=coef, ratio=torch.tensor([0.5, 2.0]), lr=lr, weight_decay=1e-4, momentum=0.9,
                      dampening=0.1, nesterov=True, skip=None)
        r += [pbuf, *ms, *vs, *bufs, *models]
        results.append(r)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert float(results[0][0][2]) == 0.0 and results[0][2][0, 0] > 0


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_binding_syntax_only(tmp_path):
    """The binding alone, exactly as cpp_extension compiles it (syntax check against the CPU torch)."""
    from torch.utils.cpp_extension import include_paths

    cmd = [CXX, "-fsyntax-only", "-std=c++17", "-Wall", "-Werror", "-DTORCH_EXTENSION_NAME=dsc_check",
           *[f"-I{p}" for p in include_paths()], f"-I{_python_include()}", os.path.join(CUDA_DIR, "dsc_binding.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


# ------------------------------------------------------------------------------------------------------------
# the table builder
# ------------------------------------------------------------------------------------------------------------
def _decode(table, n_seg, n_items):
    S = dsc.SLOTS
    ptrs = table[:S * n_seg].reshape(n_seg, S)
    numel = table[S * n_seg:(S + 1) * n_seg]
    meta = table[(S + 1) * n_seg:(S + 2) * n_seg]
    begin = table[(S + 2) * n_seg:(S + 3) * n_seg + 1]
    items = table[(S + 3) * n_seg + 1:]
    assert items.size == n_items
    return ptrs, numel, meta, begin, items


def test_table_items_cover_every_element_once():
    flat = torch.zeros(50000)
    starts = [0, 1, 2, 3, 5, 4096, 4097, 9000, 12345]
    sizes = [1, 7, 0, 4095, 4096, 4097, 8193, 3, 20000]
    ps = [flat[s:s + n] for s, n in zip(starts, sizes)]
    gs = [torch.zeros(n) for n in sizes]
    table, n_seg, n_items = dsc.build_table([ps, gs, None, None, None], "cpu")
    assert table.dtype == np.int64 and n_seg == len(sizes)
    ptrs, numel, meta, begin, items = _decode(table, n_seg, n_items)
    assert list(numel) == sizes
    assert begin[0] == 0 and begin[-1] == n_items
    for s, n in enumerate(sizes):
        assert ptrs[s, 0] == ps[s].data_ptr() and ptrs[s, 1] == gs[s].data_ptr() and ptrs[s, 2:].sum() == 0
        off, vec = (meta[s] >> 6) & 3, (meta[s] >> 8) & 1
        mine = items[begin[s]:begin[s + 1]]
        assert all(int(w) >> 32 == s for w in mine)
        chunks = [int(w) & 0xFFFFFFFF for w in mine]
        assert chunks == list(range(len(chunks)))
        # the items' virtual ranges [c*CHUNK, (c+1)*CHUNK) minus off cover [0, n) exactly, none is empty
        covered = np.zeros(n, dtype=np.int64)
        for c in chunks:
            lo, hi = c * dsc.CHUNK - off, (c + 1) * dsc.CHUNK - off
            assert max(lo, 0) < min(hi, n)
            covered[max(lo, 0):min(hi, n)] += 1
        assert (covered == 1).all()
        if n:
            # p is a view at element offset starts[s] of an aligned buffer, g a fresh (aligned) tensor:
            # one shared misalignment -> vector path, else scalar
            same = starts[s] % 4 == 0
            assert vec == int(same) and off == (starts[s] % 4 if same else 0)


def test_table_alignment_and_codes():
    base = torch.zeros(100)
    half = torch.zeros(100, dtype=torch.bfloat16)
    # same misalignment (3 elements) in fp32 and bf16: one vector path with off = 3
    table, n_seg, n_items = dsc.build_table([[base[3:50]], [half[3:50]], None, None, None], "cpu")
    _, _, meta, _, _ = _decode(table, n_seg, n_items)
    assert meta[0] & 3 == 0 and (meta[0] >> 2) & 3 == 1 and (meta[0] >> 4) & 3 == 3
    assert (meta[0] >> 6) & 3 == 3 and (meta[0] >> 8) & 1 == 1
    # a model copy of another misalignment: scalar path
    model = torch.zeros(100, dtype=torch.float16)
    table, n_seg, n_items = dsc.build_table([[base[3:50]], [half[3:50]], None, None, [model[1:48]]], "cpu")
    _, _, meta, _, _ = _decode(table, n_seg, n_items)
    assert (meta[0] >> 4) & 3 == 2 and (meta[0] >> 8) & 1 == 0 and (meta[0] >> 6) & 3 == 0
    # None entries in the model list (mixed groups)
    table, n_seg, n_items = dsc.build_table([[base[:4], base[4:8]], [base[:4], base[4:8]], None, None,
                                             [None, model[:4]]], "cpu")
    _, _, meta, _, _ = _decode(table, n_seg, n_items)
    assert (meta[0] >> 4) & 3 == 3 and (meta[1] >> 4) & 3 == 2


def test_table_errors():
    with pytest.raises(TypeError, match="float64"):
        dsc.build_table([[torch.zeros(3, dtype=torch.float64)], None, None, None, None], "cpu")
    with pytest.raises(TypeError, match="float32"):
        dsc.build_table([[torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3, dtype=torch.bfloat16)], None, None],
                        "cpu")
    with pytest.raises(ValueError, match="elements"):
        dsc.build_table([[torch.zeros(3)], [torch.zeros(4)], None, None, None], "cpu")
    with pytest.raises(ValueError, match="contiguous"):
        dsc.build_table([[torch.zeros(3, 3).t()], None, None, None, None], "cpu")
    with pytest.raises(ValueError, match="cuda"):
        dsc.build_table([[torch.zeros(3)], None, None, None, None], "cuda")


def test_cuda_kernels_without_gpu_is_a_clean_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="CUDA device"):
        dsc.CudaKernels()
