"""The fused C++ CPU kernels (backend "cpp") against the reference kernels and the reference optimizer.

* kernel level: ``CppKernels`` vs ``ReferenceKernels`` run on fp64 copies of the same inputs (segments of odd
  sizes, several work items per tensor, flat buffers cut at arbitrary offsets with shared norm ids, empty and
  zero-norm segments, bf16/fp16 params and grads, model copies, skip, errors);
* optimizer level: ``LAMB/LARS(backend="cpp")`` in fp32 (and bf16/fp16 with master weights) vs
  ``backend="reference"`` in fp64 over 20 steps, every knob.

The extension is built on first use (about a minute, cached); a build failure fails these tests. What the
kernel tests of every backend share (cases, runners, asserts, common checks) is in kernel_cases.py.
"""
from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

from ds_conadv.optim import LAMB, LARS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_cases import (  # noqa: E402
    F64, LAMB_KERNEL_KNOBS, LAMB_LOW_PRECISION_DTYPES, LARS_KERNEL_KNOBS, LARS_LOW_PRECISION_DTYPES, OPT_CASE_IDS,
    OPT_CASES, REF, Case, Target, check_lamb_low_precision, check_lamb_segments_with_shared_ids,
    check_lamb_skip_writes_nothing, check_lars_low_precision, check_lars_segments_and_skip,
    check_model_copy_rounding, check_optimizer_lr_tensor, check_optimizer_master_weights,
    check_optimizer_matches_reference, check_optimizer_segment_layout, check_optimizer_skip_is_bit_identical, close,
    close_states, lamb_kw, lamb_vs_reference, lars_vs_reference, malformed_segments, run_lamb, run_optimizer_on,
    sumsq_vs_reference,
)
from optim_cases import SIZES, problem  # noqa: E402


@contextlib.contextmanager
def one_thread():
    """Run the (torch-op) reference on one thread: on a busy 2-core machine torch's own multi-threaded small
    ops were seen to stall for ~200 ms each, which made these tests minutes long. The C++ kernels keep the
    default thread count so their parallel path is what is tested."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cpp():
    from ds_conadv.kernels.cpu import CppKernels

    return CppKernels()


@pytest.fixture(scope="module")
def chunk(cpp):
    return cpp._ext.chunk_size()


@pytest.fixture(scope="module")
def target(cpp):
    """The C++ kernels on CPU tensors; the reference runs on one thread."""
    return Target("cpp", cpp, "cpu", ref_ctx=one_thread)


def _big_sizes(chunk):
    # several work items per tensor, cuts right at / around item and block boundaries, and enough elements in
    # total that the calls run on several threads
    return [1, 7, 1000, 4097, chunk - 1, chunk + 1, 2 * chunk + 3, 65537, 1023, 1025, 0, 3]


def _segment_layout(chunk):
    """Sizes around the work item cut into segments over norm ids 0..3 (id 4 has none), and their ids."""
    return [5, chunk + 17, 3, 0, 1000, chunk * 2 - 5, 1, 4097, 2], torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 0])


# ------------------------------------------------------------------------------------------------------------
# sums of squares
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sumsq_matches_reference(target, chunk, dtype):
    cpp = target.kernels
    sizes = _big_sizes(chunk)
    c = Case(sizes, pdtype=dtype, zero=(2,))
    ids = torch.tensor([k % 5 for k in range(len(sizes))])
    coef = torch.tensor(0.37)
    for seg_ids, num_ids in ((None, len(sizes)), (ids, 6)):
        for cf in (None, coef):
            _, want = sumsq_vs_reference(target, c.params, seg_ids, num_ids, cf, rtol=1e-6)
            got64 = cpp.sumsq(c.params, seg_ids, num_ids, cf, dtype=F64)
            close([got64], [want], rtol=1e-7, atol=0)  # fp32 partials of a few terms, then double
    assert cpp.sumsq(c.params, ids, 6)[5] == 0  # an id without segments
    assert float(cpp.sumsq(c.params, None, len(sizes))[2]) == 0.0  # a zero tensor


# ------------------------------------------------------------------------------------------------------------
# LAMB passes
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LAMB_KERNEL_KNOBS))
def test_lamb_passes_match_reference(target, chunk, name):
    sizes = _big_sizes(chunk)
    c = Case(sizes, zero=(3,), steps=torch.tensor([float(k % 4 + 1) for k in range(len(sizes))]))
    got, s64 = lamb_vs_reference(target, c, LAMB_KERNEL_KNOBS[name], sums_rtol=2e-5)
    assert float(got[3, 1]) == 0.0  # zero param norm
    close_states(c, s64, "params", "exp_avg", "exp_avg_sq")


@pytest.mark.parametrize("pdtype,gdtype,model", LAMB_LOW_PRECISION_DTYPES)
def test_lamb_low_precision(target, chunk, pdtype, gdtype, model):
    sizes = [1, 7, 1000, 4097, chunk + 9, 65537]
    c = check_lamb_low_precision(target, sizes, pdtype, gdtype, model)
    if pdtype != torch.float32:
        # in-place low-precision params: exactly what the reference does in fp32 (modulo one rounding of the
        # fp32 intermediate)
        c2 = Case(sizes, pdtype=pdtype, gdtype=gdtype)
        with one_thread():
            run_lamb(REF, c2.seg(), dict(weight_decay=0.01, adam_w_mode=True))
        for p, r in zip(c.params, c2.params):
            diff = (p.to(F64) - r.to(F64)).abs()
            assert (diff <= torch.finfo(pdtype).eps * r.to(F64).abs()).all()


def test_model_copy_rounding_is_torchs(target):
    """bf16/fp16 model copies: bit-identical to torch's round-to-nearest-even casts."""
    check_model_copy_rounding(target)


@pytest.mark.parametrize("flat", [False, True])
def test_lamb_segments_with_shared_ids(target, chunk, flat):
    """Tensors cut into pieces (several segments per norm id) give the same sums and update as uncut ones."""
    check_lamb_segments_with_shared_ids(target, *_segment_layout(chunk), zero=6, flat=flat)


def test_lamb_skip_writes_nothing(target, chunk):
    check_lamb_skip_writes_nothing(target, _big_sizes(chunk), flags=(torch.tensor(True), torch.tensor([True])))


# ------------------------------------------------------------------------------------------------------------
# LARS passes
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LARS_KERNEL_KNOBS))
@pytest.mark.parametrize("first", [True, False])
def test_lars_passes_match_reference(target, chunk, name, first):
    sizes = _big_sizes(chunk)
    steps = torch.ones(len(sizes)) if first else torch.tensor([float(1 + k % 3) for k in range(len(sizes))])
    c = Case(sizes, n_states=1, zero=(4,), steps=steps)
    lr = torch.tensor(0.2) if first else 0.05  # a 0-d tensor or a float
    got, s64 = lars_vs_reference(target, c, LARS_KERNEL_KNOBS[name], torch.tensor(0.7), lr, sums_rtol=2e-6)
    assert got[4].abs().sum() == 0
    close_states(c, s64, "params", "momentum_buffer")


@pytest.mark.parametrize("pdtype,gdtype,model", LARS_LOW_PRECISION_DTYPES)
def test_lars_low_precision(target, chunk, pdtype, gdtype, model):
    check_lars_low_precision(target, [1, 7, 1000, 4097, chunk + 9, 65537], pdtype, gdtype, model)


def test_lars_segments_and_skip(target, chunk):
    # skipped: zeros as the reference, even with a non-finite coefficient
    check_lars_segments_and_skip(target, *_segment_layout(chunk), torch.tensor([1.0, 2, 1, 1, 3, 3, 3, 1, 2]),
                                 sums_rtol=2e-6, skip_coef=torch.tensor(float("nan")))


# ------------------------------------------------------------------------------------------------------------
# determinism, errors
# ------------------------------------------------------------------------------------------------------------
def test_sums_do_not_depend_on_thread_count(cpp, chunk):
    sizes = [chunk * 7 + 3, 17, chunk * 3, 5000] * 3
    ids = torch.tensor([k % 4 for k in range(len(sizes))])
    results = []
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            c = Case(sizes, seg_ids=ids, num_ids=4, seed=3)
            kw = lamb_kw(c.steps)
            lamb = cpp.lamb_phase1(c.seg(), grad_coef=None, weight_decay=0.01, adam_w_mode=True, skip=None, **kw)
            lars = cpp.lars_phase1(c.seg(), grad_coef=None, skip=None)
            results.append((lamb, lars, cpp.sumsq(c.grads, ids, 4), [m.clone() for m in c.states[0]]))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        for a, b in zip(r[:3], results[0][:3]):
            assert torch.equal(a, b)
        for a, b in zip(r[3], results[0][3]):
            assert torch.equal(a, b)


def test_errors_are_clean(cpp):
    c = Case([10, 20])
    c64 = c.seg64()
    kw = lamb_kw(c.steps)
    with pytest.raises(TypeError, match="Double|float64"):
        cpp.lamb_phase1(c64, grad_coef=None, weight_decay=0.0, adam_w_mode=True, skip=None, **kw)
    with pytest.raises(TypeError, match="Double|float64"):
        cpp.sumsq(c64.params, None, 2)
    with pytest.raises(TypeError, match="Double|float64"):
        cpp.lars_phase1(c64, grad_coef=None, skip=None)
    bad, mismatch = malformed_segments()
    with pytest.raises(RuntimeError, match="contiguous"):
        cpp.lamb_phase1(bad, grad_coef=None, weight_decay=0.0, adam_w_mode=True, skip=None,
                        **lamb_kw(torch.full((1,), 3.0)))
    with pytest.raises(RuntimeError, match="elements"):
        cpp.lars_phase1(mismatch, grad_coef=None, skip=None)
    with pytest.raises(IndexError):
        cpp.sumsq([torch.zeros(3)], torch.tensor([2]), 2)


def test_build_failure_is_a_clean_exception(monkeypatch, tmp_path):
    import ds_conadv.kernels.cpu as cpu
    from ds_conadv.optim import backends

    monkeypatch.setattr(cpu, "_module", None)
    monkeypatch.setattr(cpu, "_error", None)
    # a source that does not compile (built in a scratch cache directory)
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++;\n")
    monkeypatch.setenv("DS_CONADV_EXT_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(cpu, "_SOURCES", [str(broken)])
    with pytest.raises(cpu.CppKernelsUnavailable):
        cpu.CppKernels()
    with pytest.raises(cpu.CppKernelsUnavailable, match="earlier"):  # remembered, not rebuilt
        cpu.CppKernels()
    # backend="auto" then falls back to foreach with a warning; backend="cpp" names the reason
    monkeypatch.setattr(backends, "_cache", {})
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="cpp"):
        assert backends.get_kernels("auto", torch.device("cpu")).name == "foreach"
    with pytest.raises(backends.BackendUnavailable, match="cpp"):
        backends.get_kernels("cpp", torch.device("cpu"))
    monkeypatch.setattr(cpu, "_error", None)
    monkeypatch.setenv("DS_CONADV_DISABLE_CPP", "1")
    with pytest.raises(cpu.CppKernelsUnavailable, match="disabled"):
        cpu.CppKernels()


# ------------------------------------------------------------------------------------------------------------
# optimizer level: backend="cpp" (fp32 / low precision) vs backend="reference" in fp64
# ------------------------------------------------------------------------------------------------------------
def _opt_sizes(chunk):
    return tuple(SIZES) + (65537, chunk * 2 + 1)


@pytest.mark.parametrize("cls,name,knobs", OPT_CASES, ids=OPT_CASE_IDS)
def test_optimizer_cpp_matches_reference_fp64(target, chunk, cls, name, knobs):
    check_optimizer_matches_reference(target, cls, _opt_sizes(chunk), knobs, msg=f"{cls.__name__}[cpp] {name}")


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_optimizer_lr_tensor(target, chunk, cls):
    check_optimizer_lr_tensor(target, cls, _opt_sizes(chunk))


@pytest.mark.parametrize("cls", [LAMB, LARS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_optimizer_low_precision_master_weights(target, chunk, cls, dtype):
    check_optimizer_master_weights(target, cls, _opt_sizes(chunk), dtype)


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_optimizer_low_precision_params_in_place(cpp, chunk, cls):
    """bf16 params without master weights: the same as the reference kernels on the same bf16 tensors."""
    params, grads = problem(sizes=_opt_sizes(chunk), steps=5, seed=4, round_to=torch.bfloat16)
    with one_thread():
        _, ref_ps, _ = run_optimizer_on(cls, params, grads, "reference", torch.bfloat16)
    _, ps, _ = run_optimizer_on(cls, params, grads, "cpp", torch.bfloat16)
    for p, r in zip(ps, ref_ps):
        diff = (p.detach().to(F64) - r.detach().to(F64)).abs()
        # at most one bf16 ulp apart (the fp32 intermediate may round differently by an ulp)
        assert (diff <= 2 * torch.finfo(torch.bfloat16).eps * r.detach().to(F64).abs() + 1e-30).all()


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_optimizer_segment_layout(target, chunk, cls):
    """Params cut into fragments (ZeRO-like), fragments of one tensor sharing its norm id: same result as uncut."""
    check_optimizer_segment_layout(target, cls, _opt_sizes(chunk))


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_optimizer_skip_is_bit_identical(target, chunk, cls):
    """A non-finite grad norm, then a GradScaler-style found_inf: skipped, bitwise."""
    check_optimizer_skip_is_bit_identical(target, cls, _opt_sizes(chunk))


def test_a_build_says_so_once_on_stderr(tmp_path, monkeypatch, capsys):
    """The first use compiles for about a minute: one line on stderr says so and where the build is cached; a
    later load of the cached build prints nothing."""
    import torch.utils.cpp_extension

    from ds_conadv.kernels import _build

    def fake_load(name, build_directory, **kwargs):
        open(f"{build_directory}/{name}.so", "w").close()  # what a real build leaves behind
        return object()

    monkeypatch.setenv("DS_CONADV_EXT_DIR", str(tmp_path))
    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    monkeypatch.setattr(_build, "_loaded", {})
    _build.load_extension("dsc_fake", ["cpu/trust_ops.cpp"], label="the C++ CPU kernels")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "building the C++ CPU kernels (first use" in err and str(tmp_path) in err
    monkeypatch.setattr(_build, "_loaded", {})  # a new process: the build is on disk
    _build.load_extension("dsc_fake", ["cpu/trust_ops.cpp"], label="the C++ CPU kernels")
    assert capsys.readouterr().err == ""


def test_a_killed_build_does_not_block_the_next(tmp_path, monkeypatch, capsys):
    """A build killed mid-way (SIGKILL) leaves torch's ``lock`` file in the build folder, on which every later
    build would wait forever: the next load takes the folder's OS lock (freed by the kernel when the killed
    process died), removes the dead build's lock file, says so, and builds."""
    import signal
    import subprocess
    import textwrap

    import torch.utils.cpp_extension

    from ds_conadv.kernels import _build

    monkeypatch.setenv("DS_CONADV_EXT_DIR", str(tmp_path))
    monkeypatch.setattr(_build, "_loaded", {})
    seen = {}

    def fake_load(name, build_directory, **kwargs):
        seen["lock_left"] = os.path.exists(os.path.join(build_directory, "lock"))
        open(os.path.join(build_directory, f"{name}.so"), "w").close()
        return object()

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    # the killed build: holds the folder's lock, has written torch's lock file, then dies by SIGKILL
    full = f"dsc_fake_{_build._digest([os.path.join(_build.HERE, 'cpu/trust_ops.cpp')], [])}"
    folder = _build.build_dir(full)
    script = textwrap.dedent(f"""
        import os, sys, time
        from ds_conadv.kernels import _build
        with _build._build_lock({folder!r}):
            open(os.path.join({folder!r}, "lock"), "w").close()
            print("holding", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "holding"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert os.path.exists(os.path.join(folder, "lock"))
    _build.load_extension("dsc_fake", ["cpu/trust_ops.cpp"], label="the C++ CPU kernels")
    assert seen == {"lock_left": False}
    assert "removed the lock file of an interrupted build" in capsys.readouterr().err
