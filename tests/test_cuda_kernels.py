"""The fused CUDA kernels (backend "cuda") against the reference kernels and the reference optimizer.

Every test runs on two targets:

* ``cuda``: the real kernels on a CUDA device (the extension is JIT-built on first use, about a minute);
  skipped with the reason "no CUDA device" on machines without one;
* ``emulated``: the same element code (kernels/cuda/dsc_multi_tensor.cuh) compiled for the host with g++ and
  run on CPU tensors by kernels/cuda/dsc_host_emulation.cpp, through the same Python layer (tables, caching,
  argument plumbing).  It runs where there is no GPU (CI); with a GPU present it is skipped unless
  ``DSC_TEST_EMULATION=1``.  It cannot check what only a GPU does: block reductions, streams, pinned uploads,
  no-sync, CUDA graphs (those tests are ``cuda`` only).

What is checked: ``CudaKernels`` vs ``ReferenceKernels`` on fp64 copies (odd sizes around the 4096-element work
item, flat buffers cut at arbitrary offsets with shared norm ids, empty and zero-norm segments, fp32 / bf16 /
fp16 params and grads, model copies, every kernel knob, skip); ``LAMB/LARS(backend="cuda")`` in fp32 (and
bf16/fp16 with master weights) vs ``backend="reference"`` in fp64 over 20 steps, every optimizer knob, lr as a
tensor, ZeRO-like segment layouts; the number of launches per step does not depend on the number of tensors;
sums are bitwise reproducible; no host sync (``torch.cuda.set_sync_debug_mode("error")``); CUDA-graph capture.
"""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

import ds_conadv.kernels.cuda as dsc
from ds_conadv.optim import LAMB, LARS, SegmentLayout
from ds_conadv.optim import backends as backends_mod
from ds_conadv.optim.functional import ReferenceKernels, Segments, bias_corrections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from optim_cases import LAMB_KNOBS, LARS_KNOBS, SIZES, assert_close_list, problem  # noqa: E402

REF = ReferenceKernels()
F64 = torch.float64
F32 = torch.float32
HAS_CUDA = torch.cuda.is_available()
CHUNK = dsc.CHUNK
BIG = (1 << 20) + 3  # a large odd size: 257 work items


class Target:
    def __init__(self, name, kernels, device):
        self.name, self.kernels, self.device = name, kernels, device

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@pytest.fixture(scope="module", params=["cuda", "emulated"])
def target(request, tmp_path_factory):
    if request.param == "cuda":
        if not HAS_CUDA:
            pytest.skip("no CUDA device")
        return Target("cuda", dsc.CudaKernels(), torch.device("cuda"))
    if HAS_CUDA and not os.environ.get("DSC_TEST_EMULATION"):
        pytest.skip("a CUDA device is present: the real kernels are tested (DSC_TEST_EMULATION=1 runs the "
                    "host emulation too)")
    try:
        kernels = dsc.load_host_emulation(str(tmp_path_factory.mktemp("dsc_emulation")))
    except RuntimeError as exc:
        pytest.skip(f"host emulation unavailable: {exc}")
    return Target("emulated", kernels, torch.device("cpu"))


@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread():
    """The CPU work here (fp64 references, the host emulation) is small: one intra-op thread avoids
    oversubscription on shared CI machines (a 2-core machine under load: 8 s instead of 0.2 s per run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def as_cuda_backend(target, monkeypatch):
    """``backend="cuda"`` in the optimizers resolves to the target's kernels (the emulation on CPU tensors)."""
    if not target.cuda:
        monkeypatch.setitem(backends_mod._cache, ("cuda", "cpu"), target.kernels)
    return target


def cuda_only(target):
    if not target.cuda:
        pytest.skip("needs a CUDA device")


def _big_sizes():
    return [1, 7, 1000, 4097, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 3, 65537, 1023, 0, 3]


def _rand(n, gen, scale=1.0):
    return torch.randn(n, generator=gen, dtype=F64) * scale


class Case:
    """Tensors of one kernel call on the target device, plus fp64 copies for the reference."""

    def __init__(self, sizes, device, *, seed=0, pdtype=F32, gdtype=F32, model_dtype=None, n_states=2, seg_ids=None,
                 num_ids=None, zero=(), steps=None, flat=False):
        gen = torch.Generator().manual_seed(seed)
        n = len(sizes)
        if flat:  # one flat buffer per role, cut at arbitrary (unaligned) offsets: views with storage offsets
            total = sum(sizes) + 5

            def cut(buf):
                buf = buf.to(device)
                out, off = [], 3
                for s in sizes:
                    out.append(buf[off:off + s])
                    off += s
                return out

            self.params = cut(_rand(total, gen, 0.3).to(pdtype))
            self.grads = cut(_rand(total, gen, 1e-2).to(gdtype))
            self.states = [cut(_rand(total, gen, 1e-3).to(F32)) for _ in range(n_states)]
            if n_states == 2:
                self.states[1] = cut(_rand(total, gen, 1e-3).square().to(F32))
        else:
            scales = [10.0 ** (k % 4 - 2) for k in range(n)]
            self.params = [_rand(s, gen, sc).to(pdtype).to(device) for s, sc in zip(sizes, scales)]
            self.grads = [_rand(s, gen, 1e-2 * sc).to(gdtype).to(device) for s, sc in zip(sizes, scales)]
            self.states = [[_rand(s, gen, 1e-3).to(F32).to(device) for s in sizes] for _ in range(n_states)]
            if n_states == 2:  # second moments are non-negative
                self.states[1] = [v * v for v in self.states[1]]
        for k in zero:
            self.params[k].zero_()
            self.grads[k].zero_()
            for st in self.states:
                st[k].zero_()
        self.model_params = None
        if model_dtype is not None:
            self.model_params = [torch.zeros(s, dtype=model_dtype, device=device) for s in sizes]
        steps = steps if steps is not None else torch.full((n,), 3.0)
        self.steps = steps.to(device)
        self.seg_ids = None if seg_ids is None else seg_ids.to(device)
        self.num_ids = num_ids if num_ids is not None else n

    def seg(self):
        return Segments(self.params, self.grads, self.states, self.steps, self.model_params, self.seg_ids,
                        self.num_ids)

    def seg64(self):
        """fp64 copies (the reference then computes in fp64; model copies stay in their dtype)."""
        mp = None if self.model_params is None else [m.clone() for m in self.model_params]
        return Segments([t.to(F64) for t in self.params], [t.to(F64) for t in self.grads],
                        [[t.to(F64) for t in st] for st in self.states], self.steps.clone(), mp, self.seg_ids,
                        self.num_ids)

    def snapshot(self):
        return [t.clone() for t in self.current()]

    def current(self):
        out = list(self.params) + list(self.grads) + [t for st in self.states for t in st]
        if self.model_params is not None:
            out += list(self.model_params)
        return out


def _close(actual, expected, rtol=1e-5, atol=1e-7, msg=""):
    assert len(actual) == len(expected), msg
    for i, (a, e) in enumerate(zip(actual, expected)):
        e = e.to(F64).cpu()
        scale = max(float(e.abs().max()), 1e-30) if e.numel() else 1.0
        torch.testing.assert_close(a.to(F64).cpu(), e, rtol=rtol, atol=atol * scale,
                                   msg=lambda m, i=i: f"{msg} [{i}] numel {e.numel()}: {m}")


def _lamb_kw(steps, beta1=0.9, beta2=0.999, grad_averaging=True, bias_correction=True):
    bc1, bc2 = bias_corrections(steps, beta1, beta2, bias_correction)
    return dict(bc1=bc1, bc2=bc2, beta1=beta1, beta2=beta2, beta3=(1 - beta1) if grad_averaging else 1.0, eps=1e-6)


def _t(x, device):
    return None if x is None else torch.tensor(x, dtype=F32).to(device)


# ------------------------------------------------------------------------------------------------------------
# sums of squares
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sumsq_matches_reference(target, dtype):
    k, dev = target.kernels, target.device
    sizes = _big_sizes() + [BIG]
    c = Case(sizes, dev, pdtype=dtype, zero=(2,))
    ids = torch.tensor([j % 5 for j in range(len(sizes))], device=dev)
    coef = _t(0.37, dev)
    for seg_ids, num_ids in ((None, len(sizes)), (ids, 6)):
        for cf in (None, coef):
            got = k.sumsq(c.params, seg_ids, num_ids, cf)
            want = REF.sumsq([p.to(F64) for p in c.params], seg_ids, num_ids, cf, dtype=F64)
            assert got.dtype == F32 and got.shape == (num_ids,) and got.is_contiguous()
            _close([got], [want], rtol=5e-6, atol=0)
            assert k.sumsq(c.params, seg_ids, num_ids, cf, dtype=F64).dtype == F64
    assert float(k.sumsq(c.params, ids, 6)[5]) == 0.0  # an id without segments
    assert float(k.sumsq(c.params, None, len(sizes))[2]) == 0.0  # a zero tensor
    # mixed dtypes in one call (one launch: the dtype is dispatched per work item)
    mixed = [c.params[0].float(), c.params[3].to(torch.bfloat16), c.params[4].half()]
    _close([k.sumsq(mixed, None, 3)], [REF.sumsq([m.to(F64) for m in mixed], None, 3, dtype=F64)], rtol=5e-6, atol=0)


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
    "eps_zero": dict(weight_decay=0.01, adam_w_mode=True, eps=0.0),
}


def _run_lamb(kernels, seg, knobs, step_size=None):
    knobs = dict(knobs)
    coef = knobs.pop("grad_coef", None)
    device = seg.params[0].device
    kw = _lamb_kw(seg.steps, grad_averaging=knobs.pop("grad_averaging", True),
                  bias_correction=knobs.pop("bias_correction", True))
    if "eps" in knobs:
        kw["eps"] = knobs.pop("eps")
    sums = kernels.lamb_phase1(seg, grad_coef=_t(coef, device), skip=None, **kw, **knobs)
    if step_size is None:
        step_size = torch.linspace(1e-3, 1e-2, seg.num_ids)
    kernels.lamb_phase2(seg, step_size=step_size.to(device), bc1=kw["bc1"], bc2=kw["bc2"], eps=kw["eps"],
                        skip=None, **knobs)
    return sums


@pytest.mark.parametrize("name", list(LAMB_KERNEL_KNOBS))
def test_lamb_passes_match_reference(target, name):
    knobs = LAMB_KERNEL_KNOBS[name]
    sizes = _big_sizes() + ([BIG] if name == "adamw_decay" else [])
    steps = torch.tensor([float(j % 4 + 1) for j in range(len(sizes))])
    zero = () if knobs.get("eps") == 0 else (3,)  # eps = 0 and zero moments: 0/0 (NaN) in both
    c = Case(sizes, target.device, zero=zero, steps=steps)
    s64 = c.seg64()
    got = _run_lamb(target.kernels, c.seg(), knobs)
    want = _run_lamb(REF, s64, knobs)
    assert got.dtype == F32 and got.shape == (len(sizes), 2) and got.is_contiguous()
    _close([got], [want], rtol=2e-5, atol=0, msg="sums")
    assert float(got[10].abs().sum()) == 0.0  # empty segment
    if zero:
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
@pytest.mark.parametrize("flat", [False, True])
def test_lamb_low_precision(target, pdtype, gdtype, model, flat):
    sizes = [1, 7, 1000, 4097, CHUNK + 9, 65537]
    c = Case(sizes, target.device, pdtype=pdtype, gdtype=gdtype, model_dtype=model, flat=flat)
    knobs = dict(weight_decay=0.01, adam_w_mode=True)
    before = [p.clone() for p in c.params]
    s64 = c.seg64()
    got = _run_lamb(target.kernels, c.seg(), knobs)
    want = _run_lamb(REF, s64, knobs)
    _close([got], [want], rtol=1e-4, atol=0, msg="sums")
    _close(c.states[0], s64.states[0], msg="exp_avg")
    if pdtype == torch.float32:
        _close(c.params, s64.params, msg="params")
    else:
        # in-place low-precision params: the fp64 result rounded once to the param dtype, within one ulp
        for p, e, b in zip(c.params, s64.params, before):
            e = e.cpu()
            ulp = torch.finfo(pdtype).eps * e.abs().clamp_min(torch.finfo(pdtype).tiny)
            assert ((p.cpu().to(F64) - e).abs() <= ulp + 1e-30).all()
            if p.numel() > 100:  # (a tiny tensor's update may be below half an ulp)
                assert not torch.equal(p, b)
    if model is not None:
        for mp, p in zip(c.model_params, c.params):
            assert torch.equal(mp, p.to(model)), "model copy must be the fp32 value rounded to nearest even"


def test_model_copy_rounding_is_torchs(target):
    """bf16/fp16 model copies: bit-identical to torch's round-to-nearest-even casts, including ties,
    subnormals, overflow to inf and values near the top of the range; unaligned starts too."""
    special = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 65519.0, 65520.0,
                            7e4, 3e38, 1e-40, 6e-8, -2.5e-8, 0.0, -0.0, 1e-5] * 10, dtype=F32)
    gen = torch.Generator().manual_seed(5)
    vals = torch.cat([special, torch.randn(50000, generator=gen) * 100]).to(target.device)
    one = torch.ones(1, device=target.device)
    for model in (torch.bfloat16, torch.float16):
        for start in (0, 1, 3):
            p = vals[start:].clone()
            m, v = torch.zeros_like(p), torch.ones_like(p)
            mp = torch.zeros(p.numel() + start, dtype=model, device=target.device)[start:]
            seg = Segments([p], [torch.zeros_like(p)], [[m], [v]], one, [mp])
            # zero moments and step size: p is unchanged and its copy is written
            target.kernels.lamb_phase2(seg, step_size=torch.zeros(1, device=target.device), bc1=one, bc2=one,
                                       eps=1e-6, weight_decay=0.0, adam_w_mode=True, skip=None)
            assert torch.equal(p, vals[start:])
            assert torch.equal(mp.view(torch.int16), vals[start:].to(model).view(torch.int16)), (model, start)


@pytest.mark.parametrize("flat", [False, True])
def test_lamb_segments_with_shared_ids(target, flat):
    """Tensors cut in pieces (several segments per norm id) give the same sums and update as the reference."""
    sizes = [5, CHUNK + 17, 3, 0, 1000, CHUNK * 2 - 5, 1, 4097, 2]
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 0])
    c = Case(sizes, target.device, seg_ids=ids, num_ids=5, flat=flat, zero=(6,))
    s64 = c.seg64()
    step_size = torch.tensor([1e-3, 2e-3, 3e-3, 4e-3, 5e-3])
    knobs = dict(weight_decay=0.01, adam_w_mode=True)
    got = _run_lamb(target.kernels, c.seg(), knobs, step_size)
    want = _run_lamb(REF, s64, knobs, step_size)
    _close([got], [want], rtol=2e-5, atol=0, msg="sums")
    assert float(got[4].abs().sum()) == 0.0
    _close(c.params, s64.params, msg="params")
    _close(c.states[1], s64.states[1], msg="exp_avg_sq")


def test_lamb_skip_writes_nothing(target):
    k, dev = target.kernels, target.device
    sizes = _big_sizes()
    c = Case(sizes, dev, model_dtype=torch.bfloat16)
    before = c.snapshot()
    kw = _lamb_kw(c.steps)
    for flag in (torch.tensor(True, device=dev), torch.tensor([True], device=dev), torch.tensor(True)):
        sums = k.lamb_phase1(c.seg(), grad_coef=_t(float("nan"), dev), weight_decay=0.01, adam_w_mode=True,
                             skip=flag, **kw)
        assert torch.equal(sums.cpu(), torch.zeros(len(sizes), 2))
        k.lamb_phase2(c.seg(), step_size=torch.full((len(sizes),), float("nan"), device=dev), bc1=kw["bc1"],
                      bc2=kw["bc2"], eps=1e-6, weight_decay=0.01, adam_w_mode=True, skip=flag)
    for a, b in zip(c.current(), before):
        assert torch.equal(a, b)
    sums = k.lamb_phase1(c.seg(), grad_coef=None, weight_decay=0.01, adam_w_mode=True,
                         skip=torch.tensor(False, device=dev), **kw)
    assert ((sums[:, 1] > 0).cpu() == torch.tensor([n > 0 for n in sizes])).all()


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
    kernels.lars_phase2(seg, grad_coef=coef, ratio=ratio.to(seg.params[0].device), lr=lr, skip=None, **knobs)
    return sums


@pytest.mark.parametrize("name", list(LARS_KERNEL_KNOBS))
@pytest.mark.parametrize("first", [True, False])
def test_lars_passes_match_reference(target, name, first):
    dev = target.device
    knobs = LARS_KERNEL_KNOBS[name]
    sizes = _big_sizes() + ([BIG] if name == "default" else [])
    steps = torch.ones(len(sizes)) if first else torch.tensor([float(1 + j % 3) for j in range(len(sizes))])
    c = Case(sizes, dev, n_states=1, zero=(4,), steps=steps)
    s64 = c.seg64()
    coef = _t(0.7, dev)
    lr = _t(0.2, dev) if first else 0.05  # a 0-d device tensor or a float
    got = _run_lars(target.kernels, c.seg(), knobs, coef, lr)
    want = _run_lars(REF, s64, knobs, coef, lr)
    assert got.dtype == F32 and got.shape == (len(sizes), 2)
    _close([got], [want], rtol=5e-6, atol=0, msg="sums")
    assert float(got[4].abs().sum()) == 0.0
    _close(c.params, s64.params, msg="params")
    _close(c.states[0], s64.states[0], msg="momentum_buffer")


def test_lars_lr_as_cpu_tensor(target):
    c = Case([7, 4097], target.device, n_states=1)
    s64 = c.seg64()
    knobs = LARS_KERNEL_KNOBS["nesterov"]
    _run_lars(target.kernels, c.seg(), knobs, lr=torch.tensor(0.3))
    _run_lars(REF, s64, knobs, lr=torch.tensor(0.3))
    _close(c.params, s64.params, msg="params")


@pytest.mark.parametrize("pdtype,gdtype,model", [
    (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16, None),
    (torch.float16, torch.float32, None),
])
def test_lars_low_precision(target, pdtype, gdtype, model):
    sizes = [1, 7, 1000, 4097, CHUNK + 9, 65537]
    c = Case(sizes, target.device, n_states=1, pdtype=pdtype, gdtype=gdtype, model_dtype=model, flat=True)
    s64 = c.seg64()
    knobs = LARS_KERNEL_KNOBS["nesterov"]
    got = _run_lars(target.kernels, c.seg(), knobs)
    want = _run_lars(REF, s64, knobs)
    _close([got], [want], rtol=1e-5, atol=0, msg="sums")
    _close(c.states[0], s64.states[0], msg="momentum_buffer")
    if pdtype == torch.float32:
        _close(c.params, s64.params, msg="params")
    else:
        for p, e in zip(c.params, s64.params):
            e = e.cpu()
            ulp = torch.finfo(pdtype).eps * e.abs().clamp_min(torch.finfo(pdtype).tiny)
            assert ((p.cpu().to(F64) - e).abs() <= ulp + 1e-30).all()
    if model is not None:
        for mp, p in zip(c.model_params, c.params):
            assert torch.equal(mp, p.to(model))


def test_lars_segments_and_skip(target):
    dev = target.device
    sizes = [5, CHUNK + 17, 3, 0, 1000, CHUNK * 2 - 5, 1, 4097, 2]
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 0])
    c = Case(sizes, dev, n_states=1, seg_ids=ids, num_ids=5, flat=True,
             steps=torch.tensor([1.0, 2, 1, 1, 3, 3, 3, 1, 2]))
    ratio = torch.tensor([0.5, 1.0, 2.0, 0.25, 9.0], device=dev)
    before = c.snapshot()
    sums = target.kernels.lars_phase1(c.seg(), grad_coef=None, skip=torch.tensor(True, device=dev))
    assert torch.equal(sums.cpu(), torch.zeros(5, 2))
    target.kernels.lars_phase2(c.seg(), grad_coef=None, ratio=ratio, lr=0.1, weight_decay=1e-4, momentum=0.9,
                               dampening=0.0, nesterov=False, skip=torch.tensor(True, device=dev))
    for a, b in zip(c.current(), before):
        assert torch.equal(a, b)
    s64 = c.seg64()
    knobs = LARS_KERNEL_KNOBS["dampening"]
    got = _run_lars(target.kernels, c.seg(), knobs, ratio=ratio)
    want = _run_lars(REF, s64, knobs, ratio=ratio)
    _close([got], [want], rtol=5e-6, atol=0, msg="sums")
    _close(c.params, s64.params, msg="params")
    _close(c.states[0], s64.states[0], msg="momentum_buffer")


# ------------------------------------------------------------------------------------------------------------
# determinism, launches, errors
# ------------------------------------------------------------------------------------------------------------
def test_sums_are_bitwise_reproducible(target):
    sizes = [CHUNK * 7 + 3, 17, CHUNK * 3, 5000] * 3
    ids = torch.tensor([j % 4 for j in range(len(sizes))])
    results = []
    for _ in range(3):
        c = Case(sizes, target.device, seg_ids=ids, num_ids=4, seed=3)
        kw = _lamb_kw(c.steps)
        lamb = target.kernels.lamb_phase1(c.seg(), grad_coef=None, weight_decay=0.01, adam_w_mode=True, skip=None,
                                          **kw)
        lars = target.kernels.lars_phase1(Segments(c.params, c.grads, [c.states[0]], c.steps, None, c.seg_ids, 4),
                                          grad_coef=None, skip=None)
        results.append((lamb, lars, target.kernels.sumsq(c.grads, c.seg_ids, 4)))
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert torch.equal(a, b)


def _count(fn):
    before = dsc.LAUNCHES
    fn()
    return dsc.LAUNCHES - before


@pytest.mark.parametrize("with_ids", [False, True])
def test_launches_do_not_depend_on_tensor_count(target, with_ids):
    k, dev = target.kernels, target.device
    counts = []
    for n in (3, 60):
        sizes = [(j * 37) % 3000 + 1 for j in range(n)]
        ids = torch.tensor([j // 2 for j in range(n)]) if with_ids else None
        num_ids = (n + 1) // 2 if with_ids else n
        lamb = Case(sizes, dev, seg_ids=ids, num_ids=num_ids, model_dtype=torch.bfloat16)
        lars = Case(sizes, dev, n_states=1, seg_ids=ids, num_ids=num_ids)
        kw = _lamb_kw(lamb.steps)
        step = torch.full((num_ids,), 1e-3, device=dev)
        counts.append((
            _count(lambda: k.lamb_phase1(lamb.seg(), grad_coef=None, weight_decay=0.01, adam_w_mode=True, skip=None,
                                         **kw)),
            _count(lambda: k.lamb_phase2(lamb.seg(), step_size=step, bc1=kw["bc1"], bc2=kw["bc2"], eps=1e-6,
                                         weight_decay=0.01, adam_w_mode=True, skip=None)),
            _count(lambda: k.lars_phase1(lars.seg(), grad_coef=None, skip=None)),
            _count(lambda: k.lars_phase2(lars.seg(), grad_coef=None, ratio=step, lr=0.1, weight_decay=1e-4,
                                         momentum=0.9, dampening=0.0, nesterov=False, skip=None)),
            _count(lambda: k.sumsq(lamb.grads, lamb.seg_ids, num_ids)),
        ))
    extra = 1 if with_ids else 0
    assert counts[0] == counts[1] == (2 + extra, 1, 2 + extra, 1, 2 + extra)


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_optimizer_step_launches_do_not_depend_on_tensor_count(as_cuda_backend, cls):
    dev = as_cuda_backend.device
    counts = []
    for n in (3, 60):
        params, grads = problem(sizes=[(j * 37) % 3000 + 1 for j in range(n)], steps=3)
        ps = [p.detach().float().to(dev).clone().requires_grad_() for p in params]
        opt = cls(ps, backend="cuda", max_grad_norm=1.0)
        per_step = []
        for step_grads in grads:
            for p, g in zip(ps, step_grads):
                p.grad = g.float().to(dev)
            per_step.append(_count(opt.step))
        counts.append(per_step)
    assert counts[0] == counts[1] == [counts[0][0]] * 3
    assert counts[0][0] == 3 + 2 + 1  # grad norm (sumsq over one id: 3), pass 1 + its reduction, pass 2


def test_errors_are_clean(target):
    k, dev = target.kernels, target.device
    c = Case([10, 20], dev)
    c64 = c.seg64()
    kw = _lamb_kw(c.steps)
    with pytest.raises(TypeError, match="float64"):
        k.lamb_phase1(c64, grad_coef=None, weight_decay=0.0, adam_w_mode=True, skip=None, **kw)
    with pytest.raises(TypeError, match="float64"):
        k.sumsq(c64.params, None, 2)
    with pytest.raises(TypeError, match="float64"):
        k.lars_phase1(Segments(c64.params, c64.grads, [c64.states[0]], c.steps), grad_coef=None, skip=None)
    bad = Segments([torch.zeros(4, 4, device=dev).t()], [torch.zeros(4, 4, device=dev)],
                   [[torch.zeros(16, device=dev)], [torch.zeros(16, device=dev)]], torch.ones(1, device=dev))
    with pytest.raises(ValueError, match="contiguous"):
        k.lamb_phase1(bad, grad_coef=None, weight_decay=0.0, adam_w_mode=True, skip=None,
                      **_lamb_kw(torch.ones(1, device=dev)))
    mismatch = Segments([torch.zeros(4, device=dev)], [torch.zeros(5, device=dev)], [[torch.zeros(4, device=dev)]],
                        torch.ones(1, device=dev))
    with pytest.raises(ValueError, match="elements"):
        k.lars_phase1(mismatch, grad_coef=None, skip=None)
    low = Case([10], dev, pdtype=torch.bfloat16, model_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="model copy"):
        k.lamb_phase1(low.seg(), grad_coef=None, weight_decay=0.0, adam_w_mode=True, skip=None,
                      **_lamb_kw(low.steps))
    other = torch.device("cpu") if target.cuda else torch.device("meta")
    with pytest.raises(ValueError):
        k.sumsq([torch.zeros(3, device=other)], None, 1)


# ------------------------------------------------------------------------------------------------------------
# GPU only: no host sync, CUDA graphs
# ------------------------------------------------------------------------------------------------------------
def _all_kernel_calls(k, lamb, lars, kw, coef, skip, lr):
    step = torch.full((lamb.num_ids,), 1e-3, device=lamb.steps.device)
    k.sumsq(lamb.grads, lamb.seg_ids, lamb.num_ids, coef)
    k.lamb_phase1(lamb.seg(), grad_coef=coef, weight_decay=0.01, adam_w_mode=True, skip=skip, **kw)
    k.lamb_phase2(lamb.seg(), step_size=step, bc1=kw["bc1"], bc2=kw["bc2"], eps=1e-6, weight_decay=0.01,
                  adam_w_mode=True, skip=skip)
    k.lars_phase1(lars.seg(), grad_coef=coef, skip=skip)
    k.lars_phase2(lars.seg(), grad_coef=coef, ratio=step, lr=lr, weight_decay=1e-4, momentum=0.9, dampening=0.1,
                  nesterov=True, skip=skip)


@pytest.mark.parametrize("with_ids", [False, True])
def test_no_host_sync_in_kernel_calls(target, with_ids):
    cuda_only(target)
    dev = target.device
    sizes = [1, 4097, 3, CHUNK * 2 + 1]
    ids = torch.tensor([0, 0, 1, 2]) if with_ids else None
    num_ids = 3 if with_ids else 4
    lamb = Case(sizes, dev, seg_ids=ids, num_ids=num_ids, model_dtype=torch.bfloat16, flat=True)
    lars = Case(sizes, dev, n_states=1, seg_ids=ids, num_ids=num_ids, steps=torch.tensor([1.0, 2, 3, 1]))
    kw = _lamb_kw(lamb.steps)
    coef, skip, lr = _t(0.5, dev), torch.tensor(False, device=dev), _t(0.1, dev)
    torch.cuda.synchronize()
    mode = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("error")
        _all_kernel_calls(target.kernels, lamb, lars, kw, coef, skip, lr)  # first call: tables are uploaded
        _all_kernel_calls(target.kernels, lamb, lars, kw, coef, skip, lr)  # cached tables
    finally:
        torch.cuda.set_sync_debug_mode(mode)
    torch.cuda.synchronize()


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_no_host_sync_in_optimizer_step(target, cls):
    cuda_only(target)
    dev = target.device
    params, grads = problem(steps=4)
    ps = [p.detach().float().to(dev).clone().requires_grad_() for p in params]
    lr = torch.tensor(1e-2 if cls is LAMB else 0.5, device=dev)
    opt = cls(ps, lr=lr, backend="cuda", max_grad_norm=1.0)
    grads = [[g.float().to(dev) for g in gs] for gs in grads]
    for p, g in zip(ps, grads[0]):
        p.grad = g
    opt.step()  # warm-up: state, tables
    torch.cuda.synchronize()
    mode = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("error")
        for step_grads in grads[1:]:
            for p, g in zip(ps, step_grads):
                p.grad = g
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(mode)
    torch.cuda.synchronize()


def test_cuda_graph_capture_replays_the_step(target):
    cuda_only(target)
    dev, k = target.device, target.kernels
    sizes = [7, 4097, CHUNK * 3 + 5, 1]
    eager = Case(sizes, dev, seed=9, model_dtype=torch.bfloat16, flat=True)
    graphed = Case(sizes, dev, seed=9, model_dtype=torch.bfloat16, flat=True)
    kw = _lamb_kw(eager.steps)
    coef = _t(0.5, dev)
    step = torch.linspace(1e-3, 4e-3, len(sizes), device=dev)

    def step_fn(c):
        sums = k.lamb_phase1(c.seg(), grad_coef=coef, weight_decay=0.01, adam_w_mode=True, skip=None, **kw)
        k.lamb_phase2(c.seg(), step_size=step * sums[:, 1].sqrt(), bc1=kw["bc1"], bc2=kw["bc2"], eps=1e-6,
                      weight_decay=0.01, adam_w_mode=True, skip=None)

    for _ in range(3):
        step_fn(eager)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step_fn(graphed)  # warm-up (caches the table), counts as step 1
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step_fn(graphed)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager.current(), graphed.current()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------------
# optimizer level: backend="cuda" (fp32 / low precision) vs backend="reference" in fp64
# ------------------------------------------------------------------------------------------------------------
def _opt_sizes(target, big=False):
    """optim_cases.SIZES plus a few around the work-item size; plus 2^20+3 when asked, on the GPU only."""
    return tuple(SIZES) + (65537, CHUNK * 2 + 1) + ((BIG,) if big and target.cuda else ())


def _run(cls, params, grads, backend, dtype, device, master_weights=False, lr_tensor=False, layout=None,
         grad_dtype=None, **knobs):
    ps = [p.detach().to(dtype).to(device).clone().requires_grad_(True) for p in params]
    lr = knobs.pop("lr", 1e-2 if cls is LAMB else 0.5)
    opt = cls(ps, lr=torch.tensor(lr, device=device) if lr_tensor else lr, backend=backend,
              master_weights=master_weights, **knobs)
    if layout is not None:
        opt.set_segment_layout(0, layout)
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = g.to(grad_dtype or dtype).to(device)
        opt.step()
    weights = [opt.state[p]["master"] if "master" in opt.state[p] else p.detach() for p in ps]
    return opt, ps, [w.to(F64).cpu() for w in weights]


OPT_CASES = [(LAMB, n, k) for n, k in LAMB_KNOBS.items()] + [(LARS, n, k) for n, k in LARS_KNOBS.items()]


@pytest.mark.parametrize("cls,name,knobs", OPT_CASES, ids=[f"{c.__name__}-{n}" for c, n, _ in OPT_CASES])
def test_optimizer_cuda_matches_reference_fp64(as_cuda_backend, cls, name, knobs):
    target = as_cuda_backend
    params, grads = problem(sizes=_opt_sizes(target, big=name in ("default", "max_grad_norm")), steps=20)
    _, _, want = _run(cls, params, grads, "reference", F64, target.device, **knobs)
    opt, _, got = _run(cls, params, grads, "cuda", F32, target.device, **knobs)
    assert opt.param_groups[0]["backend"] == "cuda"
    assert all(float(s["step"]) == 20 for s in opt.state.values())
    assert_close_list(got, want, msg=f"{cls.__name__}[cuda:{target.name}] {name}")


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_optimizer_lr_tensor(as_cuda_backend, cls):
    target = as_cuda_backend
    params, grads = problem(sizes=_opt_sizes(target, big=True), steps=20, seed=1)
    knobs = dict(trust_clip=True) if cls is LARS else dict(min_trust_ratio=0.1, max_trust_ratio=5.0)
    _, _, want = _run(cls, params, grads, "reference", F64, target.device, **knobs)
    _, _, got = _run(cls, params, grads, "cuda", F32, target.device, lr_tensor=True, **knobs)
    assert_close_list(got, want)


@pytest.mark.parametrize("cls", [LAMB, LARS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_optimizer_low_precision_master_weights(as_cuda_backend, cls, dtype):
    target = as_cuda_backend
    params, grads = problem(sizes=_opt_sizes(target), steps=20, seed=2, round_to=dtype)
    knobs = dict(max_grad_norm=1.0) if cls is LAMB else dict(nesterov=True)
    _, _, want = _run(cls, params, grads, "reference", F64, target.device, **knobs)
    _, ps, got = _run(cls, params, grads, "cuda", dtype, target.device, master_weights=True, **knobs)
    assert_close_list(got, want, rtol=5e-5, atol=5e-6, msg=f"{cls.__name__} {dtype} masters")
    for p, w in zip(ps, got):
        assert p.dtype == dtype
        assert torch.equal(p.detach().cpu(), w.to(F32).to(dtype))


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_optimizer_segment_layout(as_cuda_backend, cls):
    """Params cut into fragments (ZeRO-like), fragments of one tensor sharing its norm id: same as uncut."""
    target = as_cuda_backend
    sizes = _opt_sizes(target)
    params, grads = problem(sizes=sizes, steps=20, seed=3)
    fragments = []
    for j, n in enumerate(sizes):
        cuts = sorted({0, n} | {(n * i) // 3 + i for i in (1, 2) if (n * i) // 3 + i < n})
        fragments.append([(a, b - a, j) for a, b in zip(cuts[:-1], cuts[1:])])
    layout = SegmentLayout(fragments=fragments, num_ids=len(sizes))
    _, _, want = _run(cls, params, grads, "reference", F64, target.device)
    _, _, got = _run(cls, params, grads, "cuda", F32, target.device, layout=layout)
    assert_close_list(got, want)


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_optimizer_skip_is_bit_identical(as_cuda_backend, cls):
    dev = as_cuda_backend.device
    params, grads = problem(sizes=_opt_sizes(as_cuda_backend), steps=3, seed=6)
    ps = [p.detach().float().to(dev).clone().requires_grad_(True) for p in params]
    opt = cls(ps, backend="cuda", max_grad_norm=1.0)
    for step_grads in grads[:2]:
        for p, g in zip(ps, step_grads):
            p.grad = g.float().to(dev)
        opt.step()
    before_p = [p.detach().clone() for p in ps]
    before_s = copy.deepcopy(opt.state_dict()["state"])
    for p, g in zip(ps, grads[2]):
        p.grad = g.float().to(dev)
    ps[4].grad[0] = float("inf")  # non-finite global norm -> skipped step
    opt.step()
    for p, b in zip(ps, before_p):
        assert torch.equal(p.detach(), b)
    after_s = opt.state_dict()["state"]
    for key, st in before_s.items():
        for name, t in st.items():
            assert torch.equal(after_s[key][name], t), name
    assert int(opt.skipped_steps) == 1
    # GradScaler-style found_inf (read on the device)
    opt.grad_scale, opt.found_inf = torch.tensor(2.0, device=dev), torch.tensor(1.0, device=dev)
    ps[4].grad[0] = 0.0
    opt.step()
    for p, b in zip(ps, before_p):
        assert torch.equal(p.detach(), b)
    assert int(opt.skipped_steps) == 2
