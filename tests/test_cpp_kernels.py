"""The fused C++ CPU kernels (backend "cpp") against the reference kernels and the reference optimizer.

* kernel level: ``CppKernels`` vs ``ReferenceKernels`` run on fp64 copies of the same inputs (segments of odd
  sizes, several work items per tensor, flat buffers cut at arbitrary offsets with shared norm ids, empty and
  zero-norm segments, bf16/fp16 params and grads, model copies, skip, errors);
* optimizer level: ``LAMB/LARS(backend="cpp")`` in fp32 (and bf16/fp16 with master weights) vs
  ``backend="reference"`` in fp64 over 20 steps, every knob.

The extension is built on first use (about a minute, cached); a build failure fails these tests.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys

import pytest
import torch

from ds_conadv.optim import LAMB, LARS, SegmentLayout
from ds_conadv.optim.functional import ReferenceKernels, Segments, bias_corrections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from optim_cases import LAMB_KNOBS, LARS_KNOBS, SIZES, assert_close_list, problem  # noqa: E402


@pytest.fixture(scope="module")
def cpp():
    from ds_conadv.kernels.cpu import CppKernels

    return CppKernels()


@pytest.fixture(scope="module")
def chunk(cpp):
    return cpp._ext.chunk_size()


REF = ReferenceKernels()
F64 = torch.float64


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


def _big_sizes(chunk):
    # several work items per tensor, cuts right at / around item and block boundaries, and enough elements in
    # total that the calls run on several threads
    return [1, 7, 1000, 4097, chunk - 1, chunk + 1, 2 * chunk + 3, 65537, 1023, 1025, 0, 3]


def _rand(n, gen, scale=1.0):
    return torch.randn(n, generator=gen, dtype=F64) * scale


def _to64(ts):
    return None if ts is None else [t.to(F64) for t in ts]


class Case:
    """Tensors of one kernel call, plus fp64 copies for the reference."""

    def __init__(self, sizes, *, seed=0, pdtype=torch.float32, gdtype=torch.float32, model_dtype=None,
                 n_states=2, seg_ids=None, num_ids=None, zero=(), steps=None, flat=False):
        gen = torch.Generator().manual_seed(seed)
        n = len(sizes)
        if flat:  # one flat buffer per role, cut at arbitrary offsets (views with storage offsets)
            total = sum(sizes) + 5

            def cut(buf):
                out, off = [], 3
                for s in sizes:
                    out.append(buf[off:off + s])
                    off += s
                return out

            pbuf = (_rand(total, gen, 0.3)).to(pdtype)
            gbuf = (_rand(total, gen, 1e-2)).to(gdtype)
            self.params, self.grads = cut(pbuf), cut(gbuf)
            self.states = [cut(_rand(total, gen, 1e-3).to(torch.float32)) for _ in range(n_states)]
            if n_states == 2:
                self.states[1] = cut(_rand(total, gen, 1e-3).square().to(torch.float32))
        else:
            scales = [10.0 ** (k % 4 - 2) for k in range(n)]
            self.params = [_rand(s, gen, sc).to(pdtype) for s, sc in zip(sizes, scales)]
            self.grads = [_rand(s, gen, 1e-2 * sc).to(gdtype) for s, sc in zip(sizes, scales)]
            self.states = [[_rand(s, gen, 1e-3).to(torch.float32) for s in sizes] for _ in range(n_states)]
            if n_states == 2:  # second moments are non-negative
                self.states[1] = [(v * v) for v in self.states[1]]
        for k in zero:
            self.params[k].zero_()
            self.grads[k].zero_()
            for st in self.states:
                st[k].zero_()
        self.model_params = None
        if model_dtype is not None:
            self.model_params = [torch.zeros(s, dtype=model_dtype) for s in sizes]
        self.steps = steps if steps is not None else torch.full((n,), 3.0)
        self.seg_ids = seg_ids
        self.num_ids = num_ids if num_ids is not None else n

    def seg(self):
        return Segments(self.params, self.grads, self.states, self.steps, self.model_params, self.seg_ids, self.num_ids)

    def seg64(self):
        """fp64 copies (the reference then computes in fp64; model copies stay in their dtype)."""
        mp = None if self.model_params is None else [m.clone() for m in self.model_params]
        return Segments(_to64(self.params), _to64(self.grads), [_to64(s) for s in self.states], self.steps.clone(),
                        mp, self.seg_ids, self.num_ids)

    def snapshot(self):
        out = [t.clone() for t in self.params] + [t.clone() for t in self.grads]
        out += [t.clone() for st in self.states for t in st]
        if self.model_params is not None:
            out += [t.clone() for t in self.model_params]
        return out

    def current(self):
        out = list(self.params) + list(self.grads) + [t for st in self.states for t in st]
        if self.model_params is not None:
            out += list(self.model_params)
        return out


def _close(actual, expected, rtol=1e-5, atol=1e-7, msg=""):
    assert len(actual) == len(expected), msg
    for i, (a, e) in enumerate(zip(actual, expected)):
        e = e.to(F64)
        scale = max(float(e.abs().max()), 1e-30) if e.numel() else 1.0
        torch.testing.assert_close(a.to(F64), e, rtol=rtol, atol=atol * scale,
                                   msg=lambda m, i=i: f"{msg} [{i}] numel {e.numel()}: {m}")


def _lamb_kw(n_seg, beta1=0.9, beta2=0.999, grad_averaging=True, bias_correction=True, steps=None):
    steps = steps if steps is not None else torch.full((n_seg,), 3.0)
    bc1, bc2 = bias_corrections(steps, beta1, beta2, bias_correction)
    return dict(bc1=bc1, bc2=bc2, beta1=beta1, beta2=beta2, beta3=(1 - beta1) if grad_averaging else 1.0, eps=1e-6)


# ------------------------------------------------------------------------------------------------------------
# sums of squares
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sumsq_matches_reference(cpp, chunk, dtype):
    sizes = _big_sizes(chunk)
    c = Case(sizes, pdtype=dtype, zero=(2,))
    ids = torch.tensor([k % 5 for k in range(len(sizes))])
    coef = torch.tensor(0.37)
    for seg_ids, num_ids in ((None, len(sizes)), (ids, 6)):
        for cf in (None, coef):
            got = cpp.sumsq(c.params, seg_ids, num_ids, cf)
            with one_thread():
                want = REF.sumsq(_to64(c.params), seg_ids, num_ids, cf, dtype=F64)
            assert got.dtype == torch.float32 and got.shape == (num_ids,)
            _close([got], [want], rtol=1e-6, atol=0)
            got64 = cpp.sumsq(c.params, seg_ids, num_ids, cf, dtype=F64)
            _close([got64], [want], rtol=1e-7, atol=0)  # fp32 partials of a few terms, then double
    assert cpp.sumsq(c.params, ids, 6)[5] == 0  # an id without segments
    assert float(cpp.sumsq(c.params, None, len(sizes))[2]) == 0.0  # a zero tensor


# ------------------------------------------------------------------------------------------------------------
# LAMB passes
# ------------------------------------------------------------------------------------------------------------
LAMB_KERNEL_KNOBS = {
    "adamw_decay": dict(weight_decay=0.01, adam_w_mode=True),
    "adamw_no_decay": dict(weight_decay=0.0, adam_w_mode=True),
    "l2": dict(weight_decay=0.05, adam_w_mode=False),
    "l2_no_decay": dict(weight_decay=0.0, adam_w_mode=False),
    "coef": dict(weight_decay=0.01, adam_w_mode=True, grad_coef=0.25),
    "no_bias_correction": dict(weight_decay=0.01, adam_w_mode=True, bias_correction=False),
    "no_grad_averaging": dict(weight_decay=0.01, adam_w_mode=True, grad_averaging=False),
}


def _run_lamb(kernels, seg, knobs, step_size=None):
    knobs = dict(knobs)
    coef = knobs.pop("grad_coef", None)
    kw = _lamb_kw(len(seg.params), grad_averaging=knobs.pop("grad_averaging", True),
                  bias_correction=knobs.pop("bias_correction", True), steps=seg.steps)
    sums = kernels.lamb_phase1(seg, grad_coef=None if coef is None else torch.tensor(coef), skip=None, **kw, **knobs)
    if step_size is None:
        step_size = torch.linspace(1e-3, 1e-2, seg.num_ids)
    kernels.lamb_phase2(seg, step_size=step_size, bc1=kw["bc1"], bc2=kw["bc2"], eps=kw["eps"], skip=None, **knobs)
    return sums


@pytest.mark.parametrize("name", list(LAMB_KERNEL_KNOBS))
def test_lamb_passes_match_reference(cpp, chunk, name):
    knobs = LAMB_KERNEL_KNOBS[name]
    sizes = _big_sizes(chunk)
    c = Case(sizes, zero=(3,), steps=torch.tensor([float(k % 4 + 1) for k in range(len(sizes))]))
    s64 = c.seg64()
    got = _run_lamb(cpp, c.seg(), knobs)
    with one_thread():
        want = _run_lamb(REF, s64, knobs)
    assert got.dtype == torch.float32 and got.shape == (len(sizes), 2)
    _close([got], [want], rtol=2e-5, atol=0, msg="sums")
    assert float(got[3, 1]) == 0.0  # zero param norm
    _close(c.params, s64.params, msg="params")
    _close(c.states[0], s64.states[0], msg="exp_avg")
    _close(c.states[1], s64.states[1], msg="exp_avg_sq")


@pytest.mark.parametrize("pdtype,gdtype,model", [
    (torch.float32, torch.bfloat16, None),
    (torch.float32, torch.float16, None),
    (torch.float32, torch.float32, torch.bfloat16),
    (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16, None),
    (torch.float16, torch.float16, None),
    (torch.bfloat16, torch.float32, None),
])
def test_lamb_low_precision(cpp, chunk, pdtype, gdtype, model):
    sizes = [1, 7, 1000, 4097, chunk + 9, 65537]
    c = Case(sizes, pdtype=pdtype, gdtype=gdtype, model_dtype=model)
    knobs = dict(weight_decay=0.01, adam_w_mode=True)
    before = [p.clone() for p in c.params]
    s64 = c.seg64()
    got = _run_lamb(cpp, c.seg(), knobs)
    with one_thread():
        want = _run_lamb(REF, s64, knobs)
    _close([got], [want], rtol=1e-4, atol=0, msg="sums")
    _close(c.states[0], s64.states[0], msg="exp_avg")
    if pdtype == torch.float32:
        _close(c.params, s64.params, msg="params")
    else:
        # in-place low-precision params: the fp64 result rounded once to the param dtype, within one ulp
        for p, e, b in zip(c.params, s64.params, before):
            ulp = torch.finfo(pdtype).eps * e.abs().clamp_min(torch.finfo(pdtype).tiny)
            assert ((p.to(F64) - e).abs() <= ulp + 1e-30).all()
            assert not torch.equal(p, b)
        # and exactly what the reference does in fp32 (modulo one rounding of the fp32 intermediate)
        c2 = Case(sizes, pdtype=pdtype, gdtype=gdtype)
        with one_thread():
            _run_lamb(REF, c2.seg(), knobs)
        for p, r in zip(c.params, c2.params):
            diff = (p.to(F64) - r.to(F64)).abs()
            assert (diff <= torch.finfo(pdtype).eps * r.to(F64).abs()).all()
    if model is not None:
        for mp, p in zip(c.model_params, c.params):
            assert torch.equal(mp, p.to(model)), "model copy must be the fp32 value rounded to nearest even"


def test_model_copy_rounding_is_torchs(cpp):
    """bf16/fp16 model copies and in-place params: bit-identical to torch's round-to-nearest-even casts,
    including ties, subnormals, overflow to inf, and values near the top of the range."""
    special = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 65519.0, 65520.0,
                            7e4, 3e38, 1e-40, 6e-8, -2.5e-8, 0.0, -0.0, 1e-5] * 10, dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    vals = torch.cat([special, torch.randn(50000, generator=gen) * 100])
    for model in (torch.bfloat16, torch.float16):
        p = vals.clone()
        m = torch.zeros_like(p)
        v = torch.ones_like(p)
        mp = torch.zeros(p.numel(), dtype=model)
        seg = Segments([p], [torch.zeros_like(p)], [[m], [v]], torch.ones(1), [mp])
        one = torch.ones(1)
        # step 0 with zero moments: p is unchanged and its copy is written
        cpp.lamb_phase2(seg, step_size=torch.zeros(1), bc1=one, bc2=one, eps=1e-6, weight_decay=0.0,
                        adam_w_mode=True, skip=None)
        assert torch.equal(p, vals)
        assert torch.equal(mp.view(torch.int16), vals.to(model).view(torch.int16)), model


@pytest.mark.parametrize("flat", [False, True])
def test_lamb_segments_with_shared_ids(cpp, chunk, flat):
    """Tensors cut into pieces (several segments per norm id) give the same sums and update as uncut ones."""
    sizes = [5, chunk + 17, 3, 0, 1000, chunk * 2 - 5, 1, 4097, 2]
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 0])
    c = Case(sizes, seg_ids=ids, num_ids=5, flat=flat, zero=(6,))
    s64 = c.seg64()
    step_size = torch.tensor([1e-3, 2e-3, 3e-3, 4e-3, 5e-3])
    knobs = dict(weight_decay=0.01, adam_w_mode=True)
    got = _run_lamb(cpp, c.seg(), knobs, step_size)
    with one_thread():
        want = _run_lamb(REF, s64, knobs, step_size)
    _close([got], [want], rtol=2e-5, atol=0, msg="sums")
    assert got[4].abs().sum() == 0
    _close(c.params, s64.params, msg="params")
    _close(c.states[1], s64.states[1], msg="exp_avg_sq")


def test_lamb_skip_writes_nothing(cpp, chunk):
    sizes = _big_sizes(chunk)
    c = Case(sizes, model_dtype=torch.bfloat16)
    before = c.snapshot()
    kw = _lamb_kw(len(sizes))
    for flag in (torch.tensor(True), torch.tensor([True])):
        sums = cpp.lamb_phase1(c.seg(), grad_coef=torch.tensor(float("nan")), weight_decay=0.01, adam_w_mode=True,
                               skip=flag, **kw)
        assert torch.equal(sums, torch.zeros(len(sizes), 2))
        cpp.lamb_phase2(c.seg(), step_size=torch.full((len(sizes),), float("nan")), bc1=kw["bc1"], bc2=kw["bc2"],
                        eps=1e-6, weight_decay=0.01, adam_w_mode=True, skip=flag)
    for a, b in zip(c.current(), before):
        assert torch.equal(a, b)
    # skip=False runs
    sums = cpp.lamb_phase1(c.seg(), grad_coef=None, weight_decay=0.01, adam_w_mode=True, skip=torch.tensor(False),
                           **kw)
    assert ((sums[:, 1] > 0) == torch.tensor([n > 0 for n in sizes])).all()


# ------------------------------------------------------------------------------------------------------------
# LARS passes
# ------------------------------------------------------------------------------------------------------------
LARS_KERNEL_KNOBS = {
    "default": dict(weight_decay=1e-4, momentum=0.9, dampening=0.0, nesterov=False),
    "no_decay": dict(weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False),
    "nesterov": dict(weight_decay=1e-4, momentum=0.9, dampening=0.0, nesterov=True),
    "dampening": dict(weight_decay=1e-4, momentum=0.8, dampening=0.3, nesterov=False),
    "no_momentum": dict(weight_decay=5e-4, momentum=0.0, dampening=0.0, nesterov=False),
}


def _run_lars(kernels, seg, knobs, coef=None, lr=0.1, ratio=None):
    sums = kernels.lars_phase1(seg, grad_coef=coef, skip=None)
    if ratio is None:
        ratio = torch.linspace(0.5, 1.5, seg.num_ids)
    kernels.lars_phase2(seg, grad_coef=coef, ratio=ratio, lr=lr, skip=None, **knobs)
    return sums


@pytest.mark.parametrize("name", list(LARS_KERNEL_KNOBS))
@pytest.mark.parametrize("first", [True, False])
def test_lars_passes_match_reference(cpp, chunk, name, first):
    knobs = LARS_KERNEL_KNOBS[name]
    sizes = _big_sizes(chunk)
    steps = torch.ones(len(sizes)) if first else torch.tensor([float(1 + k % 3) for k in range(len(sizes))])
    c = Case(sizes, n_states=1, zero=(4,), steps=steps)
    s64 = c.seg64()
    coef = torch.tensor(0.7)
    lr = torch.tensor(0.2) if first else 0.05  # a 0-d tensor or a float
    got = _run_lars(cpp, c.seg(), knobs, coef, lr)
    with one_thread():
        want = _run_lars(REF, s64, knobs, coef, lr)
    assert got.dtype == torch.float32 and got.shape == (len(sizes), 2)
    _close([got], [want], rtol=2e-6, atol=0, msg="sums")
    assert got[4].abs().sum() == 0
    _close(c.params, s64.params, msg="params")
    _close(c.states[0], s64.states[0], msg="momentum_buffer")


@pytest.mark.parametrize("pdtype,gdtype,model", [
    (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16, None),
    (torch.float16, torch.float32, None),
])
def test_lars_low_precision(cpp, chunk, pdtype, gdtype, model):
    sizes = [1, 7, 1000, 4097, chunk + 9, 65537]
    c = Case(sizes, n_states=1, pdtype=pdtype, gdtype=gdtype, model_dtype=model)
    s64 = c.seg64()
    knobs = LARS_KERNEL_KNOBS["nesterov"]
    got = _run_lars(cpp, c.seg(), knobs)
    with one_thread():
        want = _run_lars(REF, s64, knobs)
    _close([got], [want], rtol=1e-5, atol=0, msg="sums")
    _close(c.states[0], s64.states[0], msg="momentum_buffer")
    if pdtype == torch.float32:
        _close(c.params, s64.params, msg="params")
    else:
        for p, e in zip(c.params, s64.params):
            ulp = torch.finfo(pdtype).eps * e.abs().clamp_min(torch.finfo(pdtype).tiny)
            assert ((p.to(F64) - e).abs() <= ulp + 1e-30).all()
    if model is not None:
        for mp, p in zip(c.model_params, c.params):
            assert torch.equal(mp, p.to(model))


def test_lars_segments_and_skip(cpp, chunk):
    sizes = [5, chunk + 17, 3, 0, 1000, chunk * 2 - 5, 1, 4097, 2]
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 0])
    c = Case(sizes, n_states=1, seg_ids=ids, num_ids=5, flat=True, steps=torch.tensor([1.0, 2, 1, 1, 3, 3, 3, 1, 2]))
    ratio = torch.tensor([0.5, 1.0, 2.0, 0.25, 9.0])
    before = c.snapshot()
    sums = cpp.lars_phase1(c.seg(), grad_coef=torch.tensor(float("nan")), skip=torch.tensor(True))
    assert torch.equal(sums, torch.zeros(5, 2))  # as the reference: zeros, even with a non-finite coefficient
    cpp.lars_phase2(c.seg(), grad_coef=None, ratio=ratio, lr=0.1, weight_decay=1e-4, momentum=0.9, dampening=0.0,
                    nesterov=False, skip=torch.tensor(True))
    for a, b in zip(c.current(), before):
        assert torch.equal(a, b)
    s64 = c.seg64()
    knobs = LARS_KERNEL_KNOBS["dampening"]
    got = _run_lars(cpp, c.seg(), knobs, ratio=ratio)
    with one_thread():
        want = _run_lars(REF, s64, knobs, ratio=ratio)
    _close([got], [want], rtol=2e-6, atol=0, msg="sums")
    _close(c.params, s64.params, msg="params")
    _close(c.states[0], s64.states[0], msg="momentum_buffer")


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
            kw = _lamb_kw(len(sizes))
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
    kw = _lamb_kw(2)
    with pytest.raises(TypeError, match="Double|float64"):
        cpp.lamb_phase1(c64, grad_coef=None, weight_decay=0.0, adam_w_mode=True, skip=None, **kw)
    with pytest.raises(TypeError, match="Double|float64"):
        cpp.sumsq(c64.params, None, 2)
    with pytest.raises(TypeError, match="Double|float64"):
        cpp.lars_phase1(c64, grad_coef=None, skip=None)
    bad = Segments([torch.zeros(4, 4).t()], [torch.zeros(4, 4)], [[torch.zeros(16)], [torch.zeros(16)]],
                   torch.ones(1))
    with pytest.raises(RuntimeError, match="contiguous"):
        cpp.lamb_phase1(bad, grad_coef=None, weight_decay=0.0, adam_w_mode=True, skip=None, **_lamb_kw(1))
    mismatch = Segments([torch.zeros(4)], [torch.zeros(5)], [[torch.zeros(4)]], torch.ones(1))
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


def _run(cls, params, grads, backend, dtype, master_weights=False, lr_tensor=False, layout=None, grad_dtype=None,
         **knobs):
    ps = [p.to(dtype).clone().requires_grad_(True) for p in params]
    lr = knobs.pop("lr", 1e-2 if cls is LAMB else 0.5)
    opt = cls(ps, lr=torch.tensor(lr) if lr_tensor else lr, backend=backend, master_weights=master_weights, **knobs)
    if layout is not None:
        opt.set_segment_layout(0, layout)
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = g.to(grad_dtype or dtype)
        opt.step()
    weights = [opt.state[p]["master"] if "master" in opt.state[p] else p.detach() for p in ps]
    return opt, ps, [w.to(F64) for w in weights]


OPT_CASES = [(LAMB, n, k) for n, k in LAMB_KNOBS.items()] + [(LARS, n, k) for n, k in LARS_KNOBS.items()]


@pytest.mark.parametrize("cls,name,knobs", OPT_CASES, ids=[f"{c.__name__}-{n}" for c, n, _ in OPT_CASES])
def test_optimizer_cpp_matches_reference_fp64(cpp, chunk, cls, name, knobs):
    params, grads = problem(sizes=_opt_sizes(chunk), steps=20)
    with one_thread():
        _, _, want = _run(cls, params, grads, "reference", F64, **knobs)
    opt, _, got = _run(cls, params, grads, "cpp", torch.float32, **knobs)
    assert all(s["step"].item() == 20 for s in opt.state.values())
    assert_close_list(got, want, msg=f"{cls.__name__}[cpp] {name}")


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_optimizer_lr_tensor(cpp, chunk, cls):
    params, grads = problem(sizes=_opt_sizes(chunk), steps=20, seed=1)
    knobs = dict(trust_clip=True) if cls is LARS else dict(min_trust_ratio=0.1, max_trust_ratio=5.0)
    with one_thread():
        _, _, want = _run(cls, params, grads, "reference", F64, **knobs)
    _, _, got = _run(cls, params, grads, "cpp", torch.float32, lr_tensor=True, **knobs)
    assert_close_list(got, want)


@pytest.mark.parametrize("cls", [LAMB, LARS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_optimizer_low_precision_master_weights(cpp, chunk, cls, dtype):
    params, grads = problem(sizes=_opt_sizes(chunk), steps=20, seed=2, round_to=dtype)
    knobs = dict(max_grad_norm=1.0) if cls is LAMB else dict(nesterov=True)
    with one_thread():
        _, _, want = _run(cls, params, grads, "reference", F64, **knobs)
    _, ps, got = _run(cls, params, grads, "cpp", dtype, master_weights=True, **knobs)
    assert_close_list(got, want, rtol=5e-5, atol=5e-6, msg=f"{cls.__name__} {dtype} masters")
    for p, w in zip(ps, got):
        assert p.dtype == dtype
        assert torch.equal(p.detach(), w.to(torch.float32).to(dtype))


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_optimizer_low_precision_params_in_place(cpp, chunk, cls):
    """bf16 params without master weights: the same as the reference kernels on the same bf16 tensors."""
    params, grads = problem(sizes=_opt_sizes(chunk), steps=5, seed=4, round_to=torch.bfloat16)
    with one_thread():
        _, ref_ps, _ = _run(cls, params, grads, "reference", torch.bfloat16)
    _, ps, _ = _run(cls, params, grads, "cpp", torch.bfloat16)
    for p, r in zip(ps, ref_ps):
        diff = (p.detach().to(F64) - r.detach().to(F64)).abs()
        # at most one bf16 ulp apart (the fp32 intermediate may round differently by an ulp)
        assert (diff <= 2 * torch.finfo(torch.bfloat16).eps * r.detach().to(F64).abs() + 1e-30).all()


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_optimizer_segment_layout(cpp, chunk, cls):
    """Params cut into fragments (ZeRO-like), fragments of one tensor sharing its norm id: same result as uncut."""
    sizes = _opt_sizes(chunk)
    params, grads = problem(sizes=sizes, steps=20, seed=3)
    fragments, num_ids = [], 0
    for k, n in enumerate(sizes):
        cuts = sorted({0, n} | {(n * j) // 3 + j for j in (1, 2) if (n * j) // 3 + j < n})
        fragments.append([(a, b - a, k) for a, b in zip(cuts[:-1], cuts[1:])])
        num_ids = k + 1
    layout = SegmentLayout(fragments=fragments, num_ids=num_ids)
    with one_thread():
        _, _, want = _run(cls, params, grads, "reference", F64)
    _, _, got = _run(cls, params, grads, "cpp", torch.float32, layout=layout)
    assert_close_list(got, want)


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_optimizer_skip_is_bit_identical(cpp, chunk, cls):
    params, grads = problem(sizes=_opt_sizes(chunk), steps=3, seed=6)
    ps = [p.float().clone().requires_grad_(True) for p in params]
    opt = cls(ps, backend="cpp", max_grad_norm=1.0)
    for step_grads in grads[:2]:
        for p, g in zip(ps, step_grads):
            p.grad = g.float()
        opt.step()
    before_p = [p.detach().clone() for p in ps]
    before_s = copy.deepcopy(opt.state_dict()["state"])
    for p, g in zip(ps, grads[2]):
        p.grad = g.float()
    ps[4].grad[0] = float("inf")  # non-finite global norm -> skipped step
    opt.step()
    for p, b in zip(ps, before_p):
        assert torch.equal(p.detach(), b)
    after_s = opt.state_dict()["state"]
    for k, st in before_s.items():
        for name, t in st.items():
            assert torch.equal(after_s[k][name], t), name
    assert int(opt.skipped_steps) == 1
    # GradScaler-style found_inf
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    ps[4].grad[0] = 0.0
    opt.step()
    for p, b in zip(ps, before_p):
        assert torch.equal(p.detach(), b)
    assert int(opt.skipped_steps) == 2
