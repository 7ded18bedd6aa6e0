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
What the kernel tests of every backend share (cases, runners, asserts, common checks) is in kernel_cases.py.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import ds_conadv.kernels.cuda as dsc
from ds_conadv.optim import LAMB, LARS
from ds_conadv.optim import backends as backends_mod
from ds_conadv.optim.functional import Segments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_cases  # noqa: E402
from kernel_cases import (  # noqa: E402
    F64, LAMB_LOW_PRECISION_DTYPES, LARS_KERNEL_KNOBS, LARS_LOW_PRECISION_DTYPES, OPT_CASE_IDS, OPT_CASES, REF,
    Case, Target, check_lamb_low_precision, check_lamb_segments_with_shared_ids, check_lamb_skip_writes_nothing,
    check_lars_low_precision, check_lars_segments_and_skip, check_model_copy_rounding, check_optimizer_lr_tensor,
    check_optimizer_master_weights, check_optimizer_matches_reference, check_optimizer_segment_layout,
    check_optimizer_skip_is_bit_identical, close, close_states, lamb_kw, lamb_vs_reference, lars_vs_reference,
    malformed_segments, run_lars, scalar, sumsq_vs_reference,
)
from optim_cases import SIZES, problem  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
CHUNK = dsc.CHUNK
BIG = (1 << 20) + 3  # a large odd size: 257 work items
# the shared kernel knobs, plus one only this file runs: eps = 0
LAMB_KERNEL_KNOBS = {**kernel_cases.LAMB_KERNEL_KNOBS, "eps_zero": dict(weight_decay=0.01, adam_w_mode=True, eps=0.0)}


@pytest.fixture(scope="module", params=["cuda", "emulated"])
def target(request, tmp_path_factory):
    """The kernels under test: the real ones on the GPU, or their host emulation on CPU tensors."""
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
    return Target("emulated", kernels, torch.device("cpu"), backend="cuda")


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


def _segment_layout():
    """Sizes around the work item cut into segments over norm ids 0..3 (id 4 has none), and their ids."""
    return [5, CHUNK + 17, 3, 0, 1000, CHUNK * 2 - 5, 1, 4097, 2], torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 0])


# ------------------------------------------------------------------------------------------------------------
# sums of squares
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sumsq_matches_reference(target, dtype):
    k, dev = target.kernels, target.device
    sizes = _big_sizes() + [BIG]
    c = Case(sizes, dev, pdtype=dtype, zero=(2,))
    ids = torch.tensor([j % 5 for j in range(len(sizes))], device=dev)
    coef = scalar(0.37, dev)
    for seg_ids, num_ids in ((None, len(sizes)), (ids, 6)):
        for cf in (None, coef):
            got, _ = sumsq_vs_reference(target, c.params, seg_ids, num_ids, cf, rtol=5e-6)
            assert got.is_contiguous()
            assert k.sumsq(c.params, seg_ids, num_ids, cf, dtype=F64).dtype == F64
    assert float(k.sumsq(c.params, ids, 6)[5]) == 0.0  # an id without segments
    assert float(k.sumsq(c.params, None, len(sizes))[2]) == 0.0  # a zero tensor
    # mixed dtypes in one call (one launch: the dtype is dispatched per work item)
    mixed = [c.params[0].float(), c.params[3].to(torch.bfloat16), c.params[4].half()]
    sumsq_vs_reference(target, mixed, None, 3, None, rtol=5e-6)


# ------------------------------------------------------------------------------------------------------------
# LAMB passes
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LAMB_KERNEL_KNOBS))
def test_lamb_passes_match_reference(target, name):
    knobs = LAMB_KERNEL_KNOBS[name]
    sizes = _big_sizes() + ([BIG] if name == "adamw_decay" else [])
    steps = torch.tensor([float(j % 4 + 1) for j in range(len(sizes))])
    zero = () if knobs.get("eps") == 0 else (3,)  # eps = 0 and zero moments: 0/0 (NaN) in both
    c = Case(sizes, target.device, zero=zero, steps=steps)
    got, s64 = lamb_vs_reference(target, c, knobs, sums_rtol=2e-5)
    assert got.is_contiguous()
    assert float(got[10].abs().sum()) == 0.0  # empty segment
    if zero:
        assert float(got[3, 1]) == 0.0  # zero param norm
    close_states(c, s64, "params", "exp_avg", "exp_avg_sq")


@pytest.mark.parametrize("pdtype,gdtype,model", LAMB_LOW_PRECISION_DTYPES)
@pytest.mark.parametrize("flat", [False, True])
def test_lamb_low_precision(target, pdtype, gdtype, model, flat):
    # (a tiny tensor's update may be below half an ulp: only params of over 100 elements must change)
    check_lamb_low_precision(target, [1, 7, 1000, 4097, CHUNK + 9, 65537], pdtype, gdtype, model, flat=flat,
                             changed_above_numel=100)


def test_model_copy_rounding_is_torchs(target):
    """bf16/fp16 model copies: bit-identical to torch's round-to-nearest-even casts; unaligned starts too."""
    check_model_copy_rounding(target, starts=(0, 1, 3))


@pytest.mark.parametrize("flat", [False, True])
def test_lamb_segments_with_shared_ids(target, flat):
    """Tensors cut in pieces (several segments per norm id) give the same sums and update as the reference."""
    check_lamb_segments_with_shared_ids(target, *_segment_layout(), zero=6, flat=flat)


def test_lamb_skip_writes_nothing(target):
    dev = target.device
    # skip as a 0-d or one-element device tensor, or a 0-d CPU tensor
    flags = (torch.tensor(True, device=dev), torch.tensor([True], device=dev), torch.tensor(True))
    check_lamb_skip_writes_nothing(target, _big_sizes(), flags)


# ------------------------------------------------------------------------------------------------------------
# LARS passes
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LARS_KERNEL_KNOBS))
@pytest.mark.parametrize("first", [True, False])
def test_lars_passes_match_reference(target, name, first):
    dev = target.device
    sizes = _big_sizes() + ([BIG] if name == "default" else [])
    steps = torch.ones(len(sizes)) if first else torch.tensor([float(1 + j % 3) for j in range(len(sizes))])
    c = Case(sizes, dev, n_states=1, zero=(4,), steps=steps)
    lr = scalar(0.2, dev) if first else 0.05  # a 0-d device tensor or a float
    got, s64 = lars_vs_reference(target, c, LARS_KERNEL_KNOBS[name], scalar(0.7, dev), lr, sums_rtol=5e-6)
    assert float(got[4].abs().sum()) == 0.0
    close_states(c, s64, "params", "momentum_buffer")


def test_lars_lr_as_cpu_tensor(target):
    c = Case([7, 4097], target.device, n_states=1)
    s64 = c.seg64()
    knobs = LARS_KERNEL_KNOBS["nesterov"]
    run_lars(target.kernels, c.seg(), knobs, lr=torch.tensor(0.3))
    run_lars(REF, s64, knobs, lr=torch.tensor(0.3))
    close(c.params, s64.params, msg="params")


@pytest.mark.parametrize("pdtype,gdtype,model", LARS_LOW_PRECISION_DTYPES)
def test_lars_low_precision(target, pdtype, gdtype, model):
    check_lars_low_precision(target, [1, 7, 1000, 4097, CHUNK + 9, 65537], pdtype, gdtype, model, flat=True)


def test_lars_segments_and_skip(target):
    check_lars_segments_and_skip(target, *_segment_layout(), torch.tensor([1.0, 2, 1, 1, 3, 3, 3, 1, 2]),
                                 sums_rtol=5e-6)


# ------------------------------------------------------------------------------------------------------------
# determinism, launches, errors
# ------------------------------------------------------------------------------------------------------------
def test_sums_are_bitwise_reproducible(target):
    sizes = [CHUNK * 7 + 3, 17, CHUNK * 3, 5000] * 3
    ids = torch.tensor([j % 4 for j in range(len(sizes))])
    results = []
    for _ in range(3):
        c = Case(sizes, target.device, seg_ids=ids, num_ids=4, seed=3)
        kw = lamb_kw(c.steps)
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
        kw = lamb_kw(lamb.steps)
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
    kw = lamb_kw(c.steps)
    with pytest.raises(TypeError, match="float64"):
        k.lamb_phase1(c64, grad_coef=None, weight_decay=0.0, adam_w_mode=True, skip=None, **kw)
    with pytest.raises(TypeError, match="float64"):
        k.sumsq(c64.params, None, 2)
    with pytest.raises(TypeError, match="float64"):
        k.lars_phase1(Segments(c64.params, c64.grads, [c64.states[0]], c.steps), grad_coef=None, skip=None)
    bad, mismatch = malformed_segments(dev)
    with pytest.raises(ValueError, match="contiguous"):
        k.lamb_phase1(bad, grad_coef=None, weight_decay=0.0, adam_w_mode=True, skip=None,
                      **lamb_kw(torch.ones(1, device=dev)))
    with pytest.raises(ValueError, match="elements"):
        k.lars_phase1(mismatch, grad_coef=None, skip=None)
    low = Case([10], dev, pdtype=torch.bfloat16, model_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="model copy"):
        k.lamb_phase1(low.seg(), grad_coef=None, weight_decay=0.0, adam_w_mode=True, skip=None,
                      **lamb_kw(low.steps))
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
    kw = lamb_kw(lamb.steps)
    coef, skip, lr = scalar(0.5, dev), torch.tensor(False, device=dev), scalar(0.1, dev)
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
    kw = lamb_kw(eager.steps)
    coef = scalar(0.5, dev)
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


@pytest.mark.parametrize("cls,name,knobs", OPT_CASES, ids=OPT_CASE_IDS)
def test_optimizer_cuda_matches_reference_fp64(as_cuda_backend, cls, name, knobs):
    target = as_cuda_backend
    opt = check_optimizer_matches_reference(target, cls, _opt_sizes(target, big=name in ("default", "max_grad_norm")),
                                            knobs, msg=f"{cls.__name__}[cuda:{target.name}] {name}")
    assert opt.param_groups[0]["backend"] == "cuda"


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_optimizer_lr_tensor(as_cuda_backend, cls):
    check_optimizer_lr_tensor(as_cuda_backend, cls, _opt_sizes(as_cuda_backend, big=True))


@pytest.mark.parametrize("cls", [LAMB, LARS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_optimizer_low_precision_master_weights(as_cuda_backend, cls, dtype):
    check_optimizer_master_weights(as_cuda_backend, cls, _opt_sizes(as_cuda_backend), dtype)


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_optimizer_segment_layout(as_cuda_backend, cls):
    """Params cut into fragments (ZeRO-like), fragments of one tensor sharing its norm id: same as uncut."""
    check_optimizer_segment_layout(as_cuda_backend, cls, _opt_sizes(as_cuda_backend))


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_optimizer_skip_is_bit_identical(as_cuda_backend, cls):
    """A non-finite grad norm, then a GradScaler-style found_inf (read on the device): skipped, bitwise."""
    check_optimizer_skip_is_bit_identical(as_cuda_backend, cls, _opt_sizes(as_cuda_backend))
