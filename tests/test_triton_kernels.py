"""The multi-tensor Triton kernels (backend "triton") against the reference kernels and the reference optimizer.

Runs on CUDA tensors when a GPU is present, else on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1``, set here and in conftest.py before any ``@triton.jit`` runs). The interpreter costs
milliseconds per program, so problems stay around 1e4 elements and optimizer runs use 20 steps for the
main cases and 4-8 steps for the rest of the knob matrix.

* kernel level: ``TritonKernels`` vs ``ReferenceKernels`` on fp64 copies (odd sizes, full and tail work
  items, empty and zero-norm segments, flat buffers cut at arbitrary offsets with shared norm ids,
  bf16/fp16 params/grads/model copies, rounding bit-identical to torch, skip, errors, determinism,
  launch count independent of the tensor count, no host sync);
* optimizer level: ``LAMB/LARS(backend="triton")`` in fp32 (bf16/fp16 with master weights) vs
  ``backend="reference"`` in fp64, every knob.

What the kernel tests of every backend share (cases, runners, asserts, common checks) is in kernel_cases.py.
"""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import ds_conadv.kernels.triton as kt  # noqa: E402
from ds_conadv.optim import LAMB, LARS, SegmentLayout  # noqa: E402
from ds_conadv.optim import functional as F  # noqa: E402
from ds_conadv.optim.functional import Segments  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_cases import (  # noqa: E402
    F64, LAMB_KERNEL_KNOBS, LARS_KERNEL_KNOBS, LARS_LOW_PRECISION_DTYPES, OPT_CASE_IDS, OPT_CASES, REF, Case,
    Target, assert_model_copies, check_lamb_low_precision, check_lamb_segments_with_shared_ids,
    check_lamb_skip_writes_nothing, check_lars_low_precision, check_lars_segments_and_skip, close, close_states,
    lamb_kw, lamb_vs_reference, lars_vs_reference, rand, run_lamb, run_lars, scalar, sumsq_vs_reference, to64,
)
from optim_cases import assert_close_list, problem, run_optimizer  # noqa: E402

if kt.INTERPRET:
    DEV = torch.device("cpu")
elif torch.cuda.is_available():
    DEV = torch.device("cuda")
else:  # pragma: no cover - kernels compiled for a GPU that is not there
    pytest.skip("no CUDA device and TRITON_INTERPRET was not set before ds_conadv.kernels.triton was imported",
                allow_module_level=True)

ON_GPU = DEV.type == "cuda"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device (compiled Triton kernels)")

TK = kt.TritonKernels(DEV)
TARGET = Target("triton", TK, DEV)
BLOCK = TK.block

# odd sizes around the work-item size: full items, tails, a single element, an empty segment
SIZES = [1, 7, 1000, BLOCK + 1, 2 * BLOCK - 3, 0, 33]


def _segment_layout():
    """Sizes around the work item cut into segments over norm ids 0..3 (id 4 has none), and their ids."""
    return [5, BLOCK + 17, 3, 0, 1000, 1, BLOCK - 1, 2], torch.tensor([0, 0, 1, 1, 2, 2, 3, 0])


# ------------------------------------------------------------------------------------------------------------
# sums of squares
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sumsq_matches_reference(dtype):
    c = Case(SIZES, DEV, pdtype=dtype, zero=(2,))
    n = len(SIZES)
    shared = torch.tensor([k % 3 for k in range(n)], device=DEV)
    coef = scalar(0.37, DEV)
    cases = [(None, n, None), (None, n, coef), (shared, 4, coef), (torch.zeros(n, dtype=torch.int64, device=DEV), 1,
                                                                   None)]
    for seg_ids, num_ids, cf in cases:
        got, _ = sumsq_vs_reference(TARGET, c.params, seg_ids, num_ids, cf, rtol=2e-6)
        assert got.device.type == DEV.type
    got = TK.sumsq(c.params, shared, 4)
    assert float(got[3]) == 0.0  # an id without segments
    assert float(TK.sumsq(c.params, None, n)[2]) == 0.0  # a zero tensor
    assert TK.sumsq(c.params, None, n, dtype=F64).dtype == F64


# ------------------------------------------------------------------------------------------------------------
# LAMB passes
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LAMB_KERNEL_KNOBS))
def test_lamb_passes_match_reference(name):
    c = Case(SIZES, DEV, zero=(1,), steps=torch.tensor([float(k % 4 + 1) for k in range(len(SIZES))]))
    got, s64 = lamb_vs_reference(TARGET, c, LAMB_KERNEL_KNOBS[name], sums_rtol=2e-5)
    assert float(got[1, 1]) == 0.0 and float(got[1, 0]) == 0.0  # zero param, zero grad, zero moments
    close_states(c, s64, "params", "exp_avg", "exp_avg_sq")


@pytest.mark.parametrize("pdtype,gdtype,model", [
    (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16, torch.float16),
    (torch.float32, torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16, None),
    (torch.float16, torch.float16, None),
    (torch.bfloat16, torch.float32, None),
])
def test_lamb_low_precision(pdtype, gdtype, model):
    check_lamb_low_precision(TARGET, [1, 7, 1000, BLOCK + 9], pdtype, gdtype, model,
                             moments=("exp_avg", "exp_avg_sq"))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy, fp16 overflow
def test_rounding_is_torchs():
    """bf16/fp16 model copies and in-place params: bit-identical to torch's round-to-nearest-even casts,
    including ties, subnormals, overflow to inf, NaN and infinities (the interpreter's own fp32->bf16 cast
    truncates; the kernels round with integer arithmetic)."""
    special = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 65519.0, 65520.0,
                            7e4, 3e38, 3.4e38, 1e-40, 6e-8, -2.5e-8, 0.0, -0.0, 1e-5, float("inf"), -float("inf"),
                            float("nan")] * 4, dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    vals = torch.cat([special, torch.randn(3000, generator=gen) * 100, torch.randn(1000, generator=gen) * 1e-38])
    vals = vals.to(DEV)
    one = torch.ones(1, device=DEV)
    for low in (torch.bfloat16, torch.float16):
        # model copy of an fp32 param: step size 0 and zero moments leave p as it is and write its copy
        p = vals.clone()
        mp = torch.zeros(p.numel(), dtype=low, device=DEV)
        seg = Segments([p], [torch.zeros_like(p)], [[torch.zeros_like(p)], [torch.ones_like(p)]], one.clone(), [mp])
        TK.lamb_phase2(seg, step_size=torch.zeros(1, device=DEV), bc1=one, bc2=one, eps=1e-6, weight_decay=0.0,
                       adam_w_mode=True, skip=None)
        nan = torch.isnan(vals)
        assert torch.isnan(p[nan]).all()  # (a GPU returns the canonical NaN from arithmetic)
        assert torch.equal(p[~nan].view(torch.int32), vals[~nan].view(torch.int32))
        assert torch.isnan(mp[nan]).all()  # NaN stays NaN (its bit pattern differs between torch's own casts)
        assert torch.equal(mp[~nan].view(torch.int16), vals[~nan].to(low).view(torch.int16)), low
        # in-place low-precision param: p' = p - 1 * u with u = -x exactly (m = -x, v = 0, eps = 1, bc = 1)
        x = vals[torch.isfinite(vals) & (vals != 0)]
        p = torch.zeros(x.numel(), dtype=low, device=DEV)
        seg = Segments([p], [torch.zeros_like(x)], [[-x], [torch.zeros_like(x)]], one.clone())
        TK.lamb_phase2(seg, step_size=torch.ones(1, device=DEV), bc1=one, bc2=one, eps=1.0, weight_decay=0.0,
                       adam_w_mode=True, skip=None)
        assert torch.equal(p.view(torch.int16), x.to(low).view(torch.int16)), low


@pytest.mark.parametrize("flat", [False, True])
def test_lamb_segments_with_shared_ids(flat):
    """Tensors cut into pieces (several segments per norm id, unaligned views of flat buffers) give the same
    sums and update as the reference."""
    check_lamb_segments_with_shared_ids(TARGET, *_segment_layout(), zero=5, flat=flat)


def test_flat_buffer_cut_equals_uncut_tensors():
    """One flat buffer per state cut at arbitrary offsets into segments sharing norm ids == the uncut tensors."""
    sizes = [1000, 7, BLOCK + 5, 33]
    gen = torch.Generator().manual_seed(11)
    uncut = [[rand(n, gen, s).float().to(DEV) for n in sizes] for s in (0.3, 1e-2, 1e-3, 1e-3)]
    uncut[3] = [v * v for v in uncut[3]]
    flats = [torch.cat(ts) for ts in uncut]
    inner_cuts = {0: [211], 1: [3], 2: [500], 3: [0, 10]}  # cuts inside tensors (3: an empty piece first)
    offsets, owner, base = [0], [], 0
    for k, n in enumerate(sizes):
        for c in inner_cuts[k] + [n]:
            offsets.append(base + c)
            owner.append(k)
        base += n
    pieces = [[f[a:b] for a, b in zip(offsets, offsets[1:])] for f in flats]
    steps_cut = torch.full((len(owner),), 2.0, device=DEV)
    steps = torch.full((len(sizes),), 2.0, device=DEV)
    cut = Segments(pieces[0], pieces[1], [pieces[2], pieces[3]], steps_cut,
                   seg_ids=torch.tensor(owner, device=DEV), num_ids=len(sizes))
    whole = Segments(to64(uncut[0]), to64(uncut[1]), [to64(uncut[2]), to64(uncut[3])], steps)
    step_size = torch.tensor([1e-2, 2e-2, 3e-2, 4e-2], device=DEV)
    knobs = dict(weight_decay=0.01, adam_w_mode=True)
    got = run_lamb(TK, cut, knobs, step_size)
    want = run_lamb(REF, whole, knobs, step_size)
    close([got], [want], rtol=2e-5, atol=0, msg="sums")
    for k in range(4):
        close([flats[k]], [torch.cat(whole.params if k == 0 else whole.grads if k == 1 else whole.states[k - 2])],
              msg=f"state {k}")


def test_lamb_skip_writes_nothing():
    check_lamb_skip_writes_nothing(TARGET, SIZES, flags=(torch.tensor(True, device=DEV),))


# ------------------------------------------------------------------------------------------------------------
# LARS passes
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LARS_KERNEL_KNOBS))
@pytest.mark.parametrize("first", [True, False])
def test_lars_passes_match_reference(name, first):
    n = len(SIZES)
    steps = torch.ones(n) if first else torch.tensor([float(1 + k % 3) for k in range(n)])  # mixed first steps
    c = Case(SIZES, DEV, n_states=1, zero=(4,), steps=steps)
    lr = scalar(0.2, DEV) if first else 0.05  # a 0-d tensor or a float
    got, s64 = lars_vs_reference(TARGET, c, LARS_KERNEL_KNOBS[name], scalar(0.7, DEV), lr, sums_rtol=2e-6)
    assert float(got[4].abs().sum()) == 0.0
    close_states(c, s64, "params", "momentum_buffer")


@pytest.mark.parametrize("pdtype,gdtype,model", LARS_LOW_PRECISION_DTYPES)
def test_lars_low_precision(pdtype, gdtype, model):
    check_lars_low_precision(TARGET, [1, 7, 1000, BLOCK + 9], pdtype, gdtype, model)


def test_lars_segments_and_skip():
    check_lars_segments_and_skip(TARGET, *_segment_layout(), torch.tensor([1.0, 2, 1, 1, 3, 3, 1, 2]), sums_rtol=2e-6,
                                 model_dtype=torch.float16)


def test_chunked_work_items_match_reference():
    """Work items of several blocks (the loop inside a program, full and tail blocks) give the same results."""
    chunked = Target("triton", kt.TritonKernels(DEV, block=256, chunks=3), DEV)
    sizes = [1, 255, 256, 257, 767, 768, 769, 2000, 0]
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 4, 5, 5])
    c = Case(sizes, DEV, model_dtype=torch.bfloat16, seg_ids=ids, num_ids=6, flat=True)
    _, s64 = lamb_vs_reference(chunked, c, dict(weight_decay=0.01, adam_w_mode=True), sums_rtol=2e-5)
    close_states(c, s64, "params")
    assert_model_copies(c, torch.bfloat16)
    c = Case(sizes, DEV, n_states=1, steps=torch.tensor([1.0, 2.0] * 4 + [1.0]))
    _, s64 = lars_vs_reference(chunked, c, LARS_KERNEL_KNOBS["nesterov"], sums_rtol=2e-6)
    close_states(c, s64, "params", "momentum_buffer")
    close([chunked.kernels.sumsq(c.grads, None, len(sizes))], [REF.sumsq(s64.grads, None, len(sizes), dtype=F64)],
          rtol=2e-6, atol=0)


# ------------------------------------------------------------------------------------------------------------
# determinism, caching, errors, launches, host syncs
# ------------------------------------------------------------------------------------------------------------
def test_sums_are_deterministic_and_tables_cached():
    sizes = [3 * BLOCK + 3, 17, BLOCK, 500] * 2
    ids = torch.tensor([k % 3 for k in range(len(sizes))])
    c = Case(sizes, DEV, seg_ids=ids, num_ids=3, seed=3)
    kw = lamb_kw(c.steps)
    TK.tables.clear()  # (a freed tensor's address may come back with the same size: its table is then valid)
    misses = TK.tables.misses
    results = []
    for _ in range(2):
        saved = [[t.clone() for t in st] for st in c.states]
        lamb = TK.lamb_phase1(c.seg(), grad_coef=None, weight_decay=0.01, adam_w_mode=True, skip=None, **kw)
        for st, sv in zip(c.states, saved):  # restore the moments: same inputs twice
            for t, s in zip(st, sv):
                t.copy_(s)
        results.append((lamb, TK.lars_phase1(Segments(c.params, c.grads, [c.states[0]], c.steps, None, c.seg_ids, 3),
                                             grad_coef=None, skip=None), TK.sumsq(c.grads, c.seg_ids, 3)))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    # one table for LAMB, one for LARS, one for sumsq; the second round found them all in the cache
    assert TK.tables.misses - misses == 3
    c.params[0] = c.params[0].clone()  # a new tensor: a new table
    TK.sumsq(c.params, c.seg_ids, 3)
    assert TK.tables.misses - misses == 4


def test_rejects_unsupported_dtypes():
    c = Case([5, 9], DEV)
    with pytest.raises(TypeError, match="float64"):
        TK.sumsq([t.double() for t in c.params], None, 2)
    with pytest.raises(TypeError, match="float64"):
        run_lamb(TK, Case([5, 9], DEV).seg64(), dict(weight_decay=0.0, adam_w_mode=True))
    with pytest.raises(TypeError, match="mix"):
        TK.sumsq([c.params[0], c.params[1].half()], None, 2)
    mixed = Case([5, 9], DEV)
    mixed.grads[1] = mixed.grads[1].bfloat16()
    with pytest.raises(TypeError, match="grads mix"):
        run_lars(TK, Segments(mixed.params, mixed.grads, [mixed.states[0]], mixed.steps), LARS_KERNEL_KNOBS["default"])
    bad_state = Case([5, 9], DEV)
    bad_state.states[0] = [t.half() for t in bad_state.states[0]]
    with pytest.raises(TypeError, match="exp_avg"):
        run_lamb(TK, bad_state.seg(), dict(weight_decay=0.0, adam_w_mode=True))


def _count_step_launches(n_tensors, cls):
    params = [torch.randn(3 + k % 5, device=DEV, requires_grad=True) for k in range(n_tensors)]
    opt = cls(params, backend="triton", max_grad_norm=1.0)
    for p in params:
        p.grad = torch.randn_like(p)
    before = kt.LAUNCHES
    opt.step()
    return kt.LAUNCHES - before


class _StubKernel:
    """Stands in for a Triton kernel: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_launch_count_does_not_depend_on_tensor_count(cls, monkeypatch):
    few = _count_step_launches(3, cls)
    if kt.INTERPRET:
        # 300 tensors are 300+ interpreted programs per launch (seconds): the launch count is decided on the
        # host, so count it with no-op kernels (the real kernels run for 3 tensors above and everywhere else)
        from ds_conadv.kernels.triton import lamb, lars, norms

        for mod in (lamb, lars, norms):
            for name in dir(mod):
                if name.endswith("_kernel"):
                    monkeypatch.setattr(mod, name, _StubKernel())
    many = _count_step_launches(300, cls)
    # global grad norm (sumsq + one reduction), pass 1 (+ segment reduction), pass 2
    assert few == many == 5, (few, many)


def test_launch_count_with_segments():
    c = Case([5, BLOCK + 17, 3, 0], DEV, seg_ids=torch.tensor([0, 0, 1, 2]), num_ids=3)
    before = kt.LAUNCHES
    run_lamb(TK, c.seg(), dict(weight_decay=0.01, adam_w_mode=True), torch.ones(3, device=DEV))
    assert kt.LAUNCHES - before == 4  # pass 1 + segment and id reductions + pass 2


class _NoSync:
    """Make the host-syncing tensor methods raise while active."""

    NAMES = ("item", "tolist", "__bool__", "cpu", "__float__", "__int__", "numpy")

    def __init__(self, monkeypatch):
        self.mp = monkeypatch

    def __enter__(self):
        for name in self.NAMES:
            def boom(*a, _name=name, **k):
                raise AssertionError(f"host sync: Tensor.{_name} called in the step path")
            self.mp.setattr(torch.Tensor, name, boom)
        return self

    def __exit__(self, *exc):
        self.mp.undo()
        return False


def _scalars():
    return scalar(0.5, DEV), torch.tensor(False, device=DEV), scalar(0.01, DEV)


def _functional_steps(seg_lamb, seg_lars, scalars):
    """A LAMB and a LARS update through the shared orchestration, every scalar a device tensor."""
    coef, skip, lr = scalars
    F.grad_sumsq(TK, seg_lamb.grads)
    F.lamb_update(seg_lamb, kernels=TK, lr=lr, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01,
                  bias_correction=True, grad_averaging=True, adam_w_mode=True, always_adapt=False, trust_clip=False,
                  min_trust_ratio=None, max_trust_ratio=None, grad_coef=coef, skip=skip)
    F.lars_update(seg_lars, kernels=TK, lr=lr, momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=True,
                  trust_coefficient=0.001, eps=1e-8, trust_clip=True, always_adapt=False, grad_coef=coef, skip=skip)


def test_no_host_sync_in_step(monkeypatch):
    """Nothing in a step reads a tensor on the host (seg_ids, steps, lr, coef and skip stay on device).

    On CPU the interpreter runs the kernels; it reads its own arguments through raw pointers and numpy, not
    through these tensor methods, so the check holds there as well. On a GPU,
    :func:`test_no_cuda_sync_in_step` checks the same with ``torch.cuda.set_sync_debug_mode``."""
    ids = torch.tensor([0, 0, 1], device=DEV)
    lamb = Case([9, BLOCK + 3, 4], DEV, seg_ids=ids, num_ids=2, model_dtype=torch.bfloat16).seg()
    lars = Case([9, BLOCK + 3, 4], DEV, n_states=1, seg_ids=ids, num_ids=2,
                steps=torch.tensor([1.0, 2.0, 2.0])).seg()
    scalars = _scalars()
    _functional_steps(lamb, lars, scalars)  # warm: tables cached, kernels compiled
    with _NoSync(monkeypatch):
        _functional_steps(lamb, lars, scalars)
    lamb.params = [p.clone() for p in lamb.params]
    with _NoSync(monkeypatch):  # a table miss (new tensors) does not sync either
        _functional_steps(lamb, lars, scalars)


@needs_gpu
def test_no_cuda_sync_in_step():
    ids = torch.tensor([0, 0, 1], device=DEV)
    lamb = Case([9, BLOCK + 3, 4], DEV, seg_ids=ids, num_ids=2, model_dtype=torch.bfloat16).seg()
    lars = Case([9, BLOCK + 3, 4], DEV, n_states=1, seg_ids=ids, num_ids=2,
                steps=torch.tensor([1.0, 2.0, 2.0])).seg()
    scalars = _scalars()
    _functional_steps(lamb, lars, scalars)
    lamb.params = [p.clone() for p in lamb.params]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _functional_steps(lamb, lars, scalars)  # a table miss: pinned upload, non_blocking
        _functional_steps(lamb, lars, scalars)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@needs_gpu
def test_optimizer_step_has_no_cuda_sync():
    params = [torch.randn(n, device=DEV, requires_grad=True) for n in (5, 1000, BLOCK + 1)]
    opt = LAMB(params, backend="triton", max_grad_norm=1.0, lr=torch.tensor(1e-3, device=DEV))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cpu_tensors_need_the_interpreter():
    if kt.INTERPRET:
        with pytest.raises(RuntimeError, match="interpreter"):
            kt.TritonKernels("cuda")
    else:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            kt.TritonKernels("cpu")


# ------------------------------------------------------------------------------------------------------------
# the optimizers end to end: fp32 triton vs fp64 reference
# ------------------------------------------------------------------------------------------------------------
MAIN = {"default", "max_grad_norm"}


def _on_dev(ts):
    return [t.to(DEV) for t in ts]


def _run(cls, params, grads, backend, **kw):
    return run_optimizer(cls, _on_dev(params), [_on_dev(g) for g in grads], backend, **kw)


@pytest.mark.parametrize("cls,name,knobs", OPT_CASES, ids=OPT_CASE_IDS)
def test_optimizer_matches_fp64_reference(cls, name, knobs):
    steps = 20 if name in MAIN else 5
    params, grads = problem(steps=steps)
    _, _, expected = _run(cls, params, grads, "reference", dtype=F64, **knobs)
    opt, _, weights = _run(cls, params, grads, "triton", **knobs)
    assert_close_list([w.cpu() for w in weights], [e.cpu() for e in expected], msg=f"{cls.__name__} {name}")
    assert opt.trust_ratios[0].device.type == DEV.type


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_optimizer_lr_as_tensor(cls):
    params, grads = problem(steps=5)
    knobs = dict(trust_clip=True) if cls is LARS else {}
    _, _, expected = _run(cls, params, grads, "reference", dtype=F64, lr_tensor=True, **knobs)
    _, _, weights = _run(cls, params, grads, "triton", lr_tensor=True, **knobs)
    assert_close_list([w.cpu() for w in weights], [e.cpu() for e in expected])


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_optimizer_low_precision_with_master_weights(cls, low):
    params, grads = problem(steps=6, round_to=low)
    knobs = dict(max_grad_norm=1.0)
    _, _, expected = _run(cls, params, grads, "reference", dtype=F64, **knobs)
    opt, ps, masters = _run(cls, params, grads, "triton", dtype=low, master_weights=True, **knobs)
    assert_close_list([m.cpu() for m in masters], [e.cpu() for e in expected], msg=f"{low} master")
    for p, m in zip(ps, masters):  # the model copy is the master rounded to nearest: exactly, since same fp32
        assert p.dtype == low
        assert torch.equal(p.detach(), m.to(low))
    for p, e in zip(ps, expected):  # and within one ulp of the fp64 reference rounded
        torch.testing.assert_close(p.detach().cpu(), e.cpu().to(low), rtol=2 ** -7 if low == torch.bfloat16
                                   else 2 ** -10, atol=0)


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_optimizer_segment_layout_equals_whole_tensors(cls):
    """A flat buffer cut at arbitrary edges (as ZeRO does) gives the same step as the original tensors."""
    params, grads = problem(steps=4)
    _, _, expected = _run(cls, params, grads, "reference", dtype=F64)
    flat = torch.cat([p.reshape(-1) for p in params]).float().to(DEV).requires_grad_()
    fragments, offset = [], 0
    for i, p in enumerate(params):
        n = p.numel()
        cuts = sorted({0, n, n // 3, (2 * n) // 3 + 1} & set(range(n + 1)))
        fragments += [(offset + a, b - a, i) for a, b in zip(cuts, cuts[1:]) if b > a]
        offset += n
    opt = cls([flat], lr=1e-2 if cls is LAMB else 0.5, backend="triton")
    opt.set_segment_layout(0, SegmentLayout([fragments], num_ids=len(params)))
    for step_grads in grads:
        flat.grad = torch.cat([g.reshape(-1) for g in step_grads]).float().to(DEV)
        opt.step()
    got, offset = [], 0
    for p in params:
        got.append(flat.detach()[offset:offset + p.numel()].reshape(p.shape).double().cpu())
        offset += p.numel()
    assert_close_list(got, [e.cpu() for e in expected], msg=f"{cls.__name__} segments")


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_optimizer_nonfinite_grad_skips_bit_identically(cls):
    params = [torch.randn(n, device=DEV, requires_grad=True) for n in (5, 1000, BLOCK + 1)]
    opt = cls(params, backend="triton", max_grad_norm=1.0, master_weights=False)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    params[1].grad[3] = float("inf")
    opt.step()
    for p, b, s in zip(params, before, state):
        assert torch.equal(p.detach(), b)
        for k, v in s.items():
            assert torch.equal(opt.state[p][k], v), k
    assert int(opt.skipped_steps) == 1
