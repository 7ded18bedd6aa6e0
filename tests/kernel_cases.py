"""Shared scaffolding of the kernel tests: test_triton_kernels.py, test_cuda_kernels.py, test_cpp_kernels.py.

Every backend's kernels (``sumsq``, ``lamb_phase1/2``, ``lars_phase1/2``) are tested the same way: build the
tensors of one call, run the backend on them and ``ReferenceKernels`` on fp64 copies, compare. This module holds
that common part; each test file keeps what is its backend's own (device, sizes around its work item,
tolerances, skip conditions, launch counts, thread counts, features only it has).

* ``Target``: the kernels under test, the device of their tensors, the backend name the optimizers take, and
  the context the fp64 reference runs in (test_cpp_kernels.py: one thread);
* ``Case`` (with ``cut``): the tensors of one kernel call -- odd sizes, flat buffers cut at unaligned offsets,
  shared norm ids, zero segments, bf16/fp16 params and grads, model copies -- and their fp64 copies;
* ``LAMB_KERNEL_KNOBS`` / ``LARS_KERNEL_KNOBS`` and ``run_lamb`` / ``run_lars`` (both passes of one step);
  ``lamb_vs_reference`` / ``lars_vs_reference`` / ``sumsq_vs_reference``: the target and the reference on
  the same inputs, sums compared;
* asserts: ``close`` (tolerances scaled to the expected tensor), ``close_states``, ``assert_params_match``
  (fp32, or in-place bf16/fp16 within one ulp), ``assert_model_copies``, ``assert_unchanged``;
* ``check_*``: whole kernel-level checks that several backends run with only sizes and tolerances differing;
* optimizer level: ``OPT_CASES``, ``run_optimizer_on`` (an optimizer over an ``optim_cases.problem`` on a
  device, optionally with a segment layout) and ``check_optimizer_*`` (backend vs fp64 reference).
"""
from __future__ import annotations

import contextlib
import copy

import torch

from ds_conadv.optim import LAMB, LARS, SegmentLayout
from ds_conadv.optim.functional import ReferenceKernels, Segments, bias_corrections
from optim_cases import LAMB_KNOBS, LAMB_LR, LARS_KNOBS, LARS_LR, assert_close_list, problem

REF = ReferenceKernels()
F32 = torch.float32
F64 = torch.float64
CPU = torch.device("cpu")


class Target:
    """The kernels under test and where their tensors live.

    ``backend``: the name ``LAMB/LARS(backend=...)`` resolve to these kernels (default: ``name``);
    ``ref_ctx``: a context-manager factory the fp64 reference runs in (default: none)."""

    def __init__(self, name, kernels, device, backend=None, ref_ctx=contextlib.nullcontext):
        self.name, self.kernels, self.device = name, kernels, torch.device(device)
        self.backend = backend or name
        self.ref_ctx = ref_ctx

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# ------------------------------------------------------------------------------------------------------------
# the tensors of one kernel call
# ------------------------------------------------------------------------------------------------------------
def rand(n, gen, scale=1.0):
    return torch.randn(n, generator=gen, dtype=F64) * scale


def to64(ts):
    return None if ts is None else [t.to(F64) for t in ts]


def scalar(x, device):
    """``x`` as an fp32 0-d tensor on ``device`` (None stays None)."""
    return None if x is None else torch.tensor(x, dtype=F32).to(device)


def cut(buf, sizes, start):
    """Consecutive views of ``buf`` of the given sizes, the first at element ``start``."""
    out, off = [], start
    for s in sizes:
        out.append(buf[off:off + s])
        off += s
    return out


class Case:
    """Tensors of one kernel call on ``device``, plus fp64 copies for the reference.

    Params, grads and ``n_states`` fp32 states (2: LAMB's moments, the second non-negative; 1: LARS's momentum)
    of the given sizes; ``flat``: one buffer per role cut at odd offsets (unaligned views with storage offsets),
    else one tensor each with scales over 4 decades; ``zero``: indices zeroed in every role; ``model_dtype``:
    zeroed model copies; ``steps`` (default 3 everywhere), ``seg_ids`` and ``num_ids`` as in ``Segments``."""

    def __init__(self, sizes, device=CPU, *, seed=0, pdtype=F32, gdtype=F32, model_dtype=None, n_states=2,
                 seg_ids=None, num_ids=None, zero=(), steps=None, flat=False):
        gen = torch.Generator().manual_seed(seed)
        n = len(sizes)
        if flat:
            total = sum(sizes) + 5

            def views(buf):
                return cut(buf.to(device), sizes, 3)

            self.params = views(rand(total, gen, 0.3).to(pdtype))
            self.grads = views(rand(total, gen, 1e-2).to(gdtype))
            self.states = [views(rand(total, gen, 1e-3).to(F32)) for _ in range(n_states)]
            if n_states == 2:
                self.states[1] = views(rand(total, gen, 1e-3).square().to(F32))
        else:
            scales = [10.0 ** (k % 4 - 2) for k in range(n)]
            self.params = [rand(s, gen, sc).to(pdtype).to(device) for s, sc in zip(sizes, scales)]
            self.grads = [rand(s, gen, 1e-2 * sc).to(gdtype).to(device) for s, sc in zip(sizes, scales)]
            self.states = [[rand(s, gen, 1e-3).to(F32).to(device) for s in sizes] for _ in range(n_states)]
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
        self.steps = (steps if steps is not None else torch.full((n,), 3.0)).to(device)
        self.seg_ids = None if seg_ids is None else seg_ids.to(device)
        self.num_ids = num_ids if num_ids is not None else n

    def seg(self):
        return Segments(self.params, self.grads, self.states, self.steps, self.model_params, self.seg_ids,
                        self.num_ids)

    def seg64(self):
        """fp64 copies (the reference then computes in fp64; model copies keep their dtype)."""
        mp = None if self.model_params is None else [m.clone() for m in self.model_params]
        return Segments(to64(self.params), to64(self.grads), [to64(s) for s in self.states], self.steps.clone(),
                        mp, self.seg_ids, self.num_ids)

    def current(self):
        out = list(self.params) + list(self.grads) + [t for st in self.states for t in st]
        return out + (list(self.model_params) if self.model_params is not None else [])

    def snapshot(self):
        return [t.clone() for t in self.current()]


# ------------------------------------------------------------------------------------------------------------
# asserts
# ------------------------------------------------------------------------------------------------------------
def close(actual, expected, rtol=1e-5, atol=1e-7, msg=""):
    """Tensor by tensor, in fp64 on the CPU: |a - e| <= atol * max|e| + rtol * |e|."""
    assert len(actual) == len(expected), msg
    for i, (a, e) in enumerate(zip(actual, expected)):
        e = e.to(F64).cpu()
        scale = max(float(e.abs().max()), 1e-30) if e.numel() else 1.0
        torch.testing.assert_close(a.to(F64).cpu(), e, rtol=rtol, atol=atol * scale,
                                   msg=lambda m, i=i: f"{msg} [{i}] numel {e.numel()}: {m}")


_ROLES = {"params": lambda s: s.params, "exp_avg": lambda s: s.states[0], "momentum_buffer": lambda s: s.states[0],
          "exp_avg_sq": lambda s: s.states[1]}


def close_states(case, s64, *names):
    """``close`` (default tolerances) of the named tensors of ``case`` and the reference's segments ``s64``:
    "params", "exp_avg" / "momentum_buffer" (state 0), "exp_avg_sq" (state 1)."""
    for name in names:
        close(_ROLES[name](case), _ROLES[name](s64), msg=name)


def assert_params_match(case, s64, pdtype, before=None, changed_above_numel=0):
    """fp32 params: ``close`` to the reference's. bf16/fp16 params updated in place: the fp64 result rounded
    once to the param dtype, within one ulp; given ``before``, every param with more than
    ``changed_above_numel`` elements has changed."""
    if pdtype == F32:
        close(case.params, s64.params, msg="params")
        return
    for k, (p, e) in enumerate(zip(case.params, s64.params)):
        e = e.cpu()
        ulp = torch.finfo(pdtype).eps * e.abs().clamp_min(torch.finfo(pdtype).tiny)
        assert ((p.cpu().to(F64) - e).abs() <= ulp + 1e-30).all()
        if before is not None and p.numel() > changed_above_numel:
            assert not torch.equal(p, before[k])


def assert_model_copies(case, dtype):
    for mp, p in zip(case.model_params, case.params):
        assert torch.equal(mp, p.to(dtype)), "model copy must be the fp32 value rounded to nearest even"


def assert_unchanged(case, before):
    """Every tensor of ``case`` is bitwise what ``before`` (a ``snapshot``) holds."""
    for a, b in zip(case.current(), before):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------------
# one step of the kernels
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
LARS_KERNEL_KNOBS = {
    "default": dict(weight_decay=1e-4, momentum=0.9, dampening=0.0, nesterov=False),
    "no_decay": dict(weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False),
    "nesterov": dict(weight_decay=1e-4, momentum=0.9, dampening=0.0, nesterov=True),
    "dampening": dict(weight_decay=1e-4, momentum=0.8, dampening=0.3, nesterov=False),
    "no_momentum": dict(weight_decay=5e-4, momentum=0.0, dampening=0.0, nesterov=False),
}


# (param dtype, grad dtype, model-copy dtype or None) of the low-precision kernel tests
LAMB_LOW_PRECISION_DTYPES = [
    (torch.float32, torch.bfloat16, None),
    (torch.float32, torch.float16, None),
    (torch.float32, torch.float32, torch.bfloat16),
    (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16, None),
    (torch.float16, torch.float16, None),
    (torch.bfloat16, torch.float32, None),
]
LARS_LOW_PRECISION_DTYPES = [
    (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16, None),
    (torch.float16, torch.float32, None),
]


def lamb_kw(steps, beta1=0.9, beta2=0.999, grad_averaging=True, bias_correction=True):
    """The scalar arguments of ``lamb_phase1`` for per-segment ``steps`` (eps 1e-6)."""
    bc1, bc2 = bias_corrections(steps, beta1, beta2, bias_correction)
    return dict(bc1=bc1, bc2=bc2, beta1=beta1, beta2=beta2, beta3=(1 - beta1) if grad_averaging else 1.0, eps=1e-6)


def run_lamb(kernels, seg, knobs, step_size=None):
    """LAMB pass 1 then pass 2 over ``seg``; ``knobs`` as in ``LAMB_KERNEL_KNOBS`` (``grad_coef``,
    ``grad_averaging``, ``bias_correction`` and ``eps`` are taken out, the rest goes to both passes).
    ``step_size`` per norm id (default a ramp 1e-3..1e-2) is moved to seg's device. Returns pass 1's sums."""
    knobs = dict(knobs)
    coef = knobs.pop("grad_coef", None)
    device = seg.params[0].device
    kw = lamb_kw(seg.steps, grad_averaging=knobs.pop("grad_averaging", True),
                 bias_correction=knobs.pop("bias_correction", True))
    if "eps" in knobs:
        kw["eps"] = knobs.pop("eps")
    sums = kernels.lamb_phase1(seg, grad_coef=scalar(coef, device), skip=None, **kw, **knobs)
    if step_size is None:
        step_size = torch.linspace(1e-3, 1e-2, seg.num_ids)
    kernels.lamb_phase2(seg, step_size=step_size.to(device), bc1=kw["bc1"], bc2=kw["bc2"], eps=kw["eps"],
                        skip=None, **knobs)
    return sums


def run_lars(kernels, seg, knobs, coef=None, lr=0.1, ratio=None):
    """LARS pass 1 then pass 2 over ``seg``; ``ratio`` per norm id (default a ramp 0.5..1.5) is moved to seg's
    device. Returns pass 1's sums."""
    sums = kernels.lars_phase1(seg, grad_coef=coef, skip=None)
    if ratio is None:
        ratio = torch.linspace(0.5, 1.5, seg.num_ids)
    kernels.lars_phase2(seg, grad_coef=coef, ratio=ratio.to(seg.params[0].device), lr=lr, skip=None, **knobs)
    return sums


def lamb_vs_reference(target, case, knobs, step_size=None, *, sums_rtol):
    """``run_lamb`` with the target on ``case`` and with the reference on fp64 copies taken before: pass 1's
    sums are fp32 of shape (num_ids, 2) and agree within ``sums_rtol``. Returns (sums, the reference's
    segments after the step) for the caller to compare the tensors it cares about."""
    s64 = case.seg64()
    got = run_lamb(target.kernels, case.seg(), knobs, step_size)
    with target.ref_ctx():
        want = run_lamb(REF, s64, knobs, step_size)
    assert got.dtype == F32 and got.shape == (case.num_ids, 2)
    close([got], [want], rtol=sums_rtol, atol=0, msg="sums")
    return got, s64


def lars_vs_reference(target, case, knobs, coef=None, lr=0.1, ratio=None, *, sums_rtol):
    """``lamb_vs_reference`` for LARS (``run_lars``)."""
    s64 = case.seg64()
    got = run_lars(target.kernels, case.seg(), knobs, coef, lr, ratio)
    with target.ref_ctx():
        want = run_lars(REF, s64, knobs, coef, lr, ratio)
    assert got.dtype == F32 and got.shape == (case.num_ids, 2)
    close([got], [want], rtol=sums_rtol, atol=0, msg="sums")
    return got, s64


def sumsq_vs_reference(target, tensors, seg_ids, num_ids, coef, *, rtol):
    """``sumsq`` with the target and with the reference in fp64: fp32 of shape (num_ids,), within ``rtol``.
    Returns (got, want)."""
    got = target.kernels.sumsq(tensors, seg_ids, num_ids, coef)
    with target.ref_ctx():
        want = REF.sumsq(to64(tensors), seg_ids, num_ids, coef, dtype=F64)
    assert got.dtype == F32 and got.shape == (num_ids,)
    close([got], [want], rtol=rtol, atol=0)
    return got, want


# ------------------------------------------------------------------------------------------------------------
# kernel-level checks several backends share
# ------------------------------------------------------------------------------------------------------------
def check_lamb_low_precision(target, sizes, pdtype, gdtype, model, *, moments=("exp_avg",), flat=False,
                             changed_above_numel=0):
    """LAMB with bf16/fp16 params and/or grads and model copies vs the fp64 reference: sums within 1e-4, the
    named ``moments``, the params (``assert_params_match``) and the model copies (rounded to nearest even).
    Returns the case."""
    c = Case(sizes, target.device, pdtype=pdtype, gdtype=gdtype, model_dtype=model, flat=flat)
    before = [p.clone() for p in c.params]
    _, s64 = lamb_vs_reference(target, c, dict(weight_decay=0.01, adam_w_mode=True), sums_rtol=1e-4)
    close_states(c, s64, *moments)
    assert_params_match(c, s64, pdtype, before, changed_above_numel)
    if model is not None:
        assert_model_copies(c, model)
    return c


ROUNDING_SPECIALS = [1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 65519.0, 65520.0, 7e4,
                     3e38, 1e-40, 6e-8, -2.5e-8, 0.0, -0.0, 1e-5]


def check_model_copy_rounding(target, starts=(0,)):
    """bf16/fp16 model copies written by LAMB pass 2 (zero moments and step size: the fp32 param stays as it is)
    are bit-identical to torch's round-to-nearest-even casts: ties, subnormals, overflow to inf, values near the
    top of the range; each param and copy starting ``start`` elements into its buffer."""
    dev = target.device
    gen = torch.Generator().manual_seed(5)
    vals = torch.cat([torch.tensor(ROUNDING_SPECIALS * 10, dtype=F32), torch.randn(50000, generator=gen) * 100])
    vals = vals.to(dev)
    one = torch.ones(1, device=dev)
    for model in (torch.bfloat16, torch.float16):
        for start in starts:
            p = vals[start:].clone()
            m, v = torch.zeros_like(p), torch.ones_like(p)
            mp = torch.zeros(p.numel() + start, dtype=model, device=dev)[start:]
            seg = Segments([p], [torch.zeros_like(p)], [[m], [v]], one, [mp])
            target.kernels.lamb_phase2(seg, step_size=torch.zeros(1, device=dev), bc1=one, bc2=one, eps=1e-6,
                                       weight_decay=0.0, adam_w_mode=True, skip=None)
            assert torch.equal(p, vals[start:])
            assert torch.equal(mp.view(torch.int16), vals[start:].to(model).view(torch.int16)), (model, start)


def check_lamb_segments_with_shared_ids(target, sizes, ids, *, zero, flat):
    """Tensors cut into pieces (several segments per norm id; ``flat``: unaligned views of one buffer) give the
    same sums and update as the reference. ``ids`` spread the segments over norm ids 0..3: id 4 has none (zero
    sums); segment ``zero`` is all zeros."""
    c = Case(sizes, target.device, seg_ids=ids, num_ids=5, flat=flat, zero=(zero,))
    step_size = torch.tensor([1e-3, 2e-3, 3e-3, 4e-3, 5e-3])
    got, s64 = lamb_vs_reference(target, c, dict(weight_decay=0.01, adam_w_mode=True), step_size, sums_rtol=2e-5)
    assert float(got[4].abs().sum()) == 0.0
    close_states(c, s64, "params", "exp_avg_sq")


def check_lamb_skip_writes_nothing(target, sizes, flags):
    """With skip set (each of ``flags``), LAMB pass 1 returns zero sums and neither pass writes anything, even
    with a NaN coefficient and NaN step sizes; then skip=False runs (positive param norms where not empty)."""
    k, dev = target.kernels, target.device
    c = Case(sizes, dev, model_dtype=torch.bfloat16)
    before = c.snapshot()
    kw = lamb_kw(c.steps)
    for flag in flags:
        sums = k.lamb_phase1(c.seg(), grad_coef=scalar(float("nan"), dev), weight_decay=0.01, adam_w_mode=True,
                             skip=flag, **kw)
        assert torch.equal(sums.cpu(), torch.zeros(len(sizes), 2))
        k.lamb_phase2(c.seg(), step_size=torch.full((len(sizes),), float("nan"), device=dev), bc1=kw["bc1"],
                      bc2=kw["bc2"], eps=1e-6, weight_decay=0.01, adam_w_mode=True, skip=flag)
    assert_unchanged(c, before)
    sums = k.lamb_phase1(c.seg(), grad_coef=None, weight_decay=0.01, adam_w_mode=True,
                         skip=torch.tensor(False, device=dev), **kw)
    assert ((sums[:, 1] > 0).cpu() == torch.tensor([n > 0 for n in sizes])).all()


def check_lars_low_precision(target, sizes, pdtype, gdtype, model, *, flat=False):
    """LARS (nesterov) with bf16/fp16 params and/or grads and model copies vs the fp64 reference: sums within
    1e-5, momentum buffers, params (``assert_params_match``), model copies."""
    c = Case(sizes, target.device, n_states=1, pdtype=pdtype, gdtype=gdtype, model_dtype=model, flat=flat)
    _, s64 = lars_vs_reference(target, c, LARS_KERNEL_KNOBS["nesterov"], sums_rtol=1e-5)
    close_states(c, s64, "momentum_buffer")
    assert_params_match(c, s64, pdtype)
    if model is not None:
        assert_model_copies(c, model)


def check_lars_segments_and_skip(target, sizes, ids, steps, *, sums_rtol, model_dtype=None, skip_coef=None):
    """LARS on a flat buffer cut into segments over 5 norm ids (id 4 without segments), mixed first steps: with
    skip set, zero sums (even with ``skip_coef`` as the coefficient) and nothing written; then one step
    matches the reference (sums within ``sums_rtol``, params, momentum buffers, model copies)."""
    k, dev = target.kernels, target.device
    c = Case(sizes, dev, n_states=1, seg_ids=ids, num_ids=5, flat=True, steps=steps, model_dtype=model_dtype)
    ratio = torch.tensor([0.5, 1.0, 2.0, 0.25, 9.0], device=dev)
    before = c.snapshot()
    sums = k.lars_phase1(c.seg(), grad_coef=skip_coef, skip=torch.tensor(True, device=dev))
    assert torch.equal(sums.cpu(), torch.zeros(5, 2))
    k.lars_phase2(c.seg(), grad_coef=None, ratio=ratio, lr=0.1, weight_decay=1e-4, momentum=0.9, dampening=0.0,
                  nesterov=False, skip=torch.tensor(True, device=dev))
    assert_unchanged(c, before)
    _, s64 = lars_vs_reference(target, c, LARS_KERNEL_KNOBS["dampening"], ratio=ratio, sums_rtol=sums_rtol)
    close_states(c, s64, "params", "momentum_buffer")
    if model_dtype is not None:
        assert_model_copies(c, model_dtype)


def malformed_segments(device=CPU):
    """(a LAMB segment whose param is a non-contiguous view, a LARS segment whose grad has more elements than
    its param)."""
    def z(*shape):
        return torch.zeros(*shape, device=device)

    def steps():
        return torch.ones(1, device=device)

    return (Segments([z(4, 4).t()], [z(4, 4)], [[z(16)], [z(16)]], steps()),
            Segments([z(4)], [z(5)], [[z(4)]], steps()))


# ------------------------------------------------------------------------------------------------------------
# optimizer level: LAMB/LARS(backend=target.backend) vs backend="reference" in fp64
# ------------------------------------------------------------------------------------------------------------
OPT_CASES = [(LAMB, n, k) for n, k in LAMB_KNOBS.items()] + [(LARS, n, k) for n, k in LARS_KNOBS.items()]
OPT_CASE_IDS = [f"{c.__name__}-{n}" for c, n, _ in OPT_CASES]


def run_optimizer_on(cls, params, grads, backend, dtype, device=CPU, master_weights=False, lr_tensor=False,
                     layout=None, grad_dtype=None, **knobs):
    """``cls`` over an ``optim_cases.problem`` with params and grads on ``device`` (lr as a tensor there when
    asked), optionally with a segment layout. Returns (optimizer, params, fp64 CPU copies of the fp32 weights)."""
    ps = [p.detach().to(dtype).to(device).clone().requires_grad_(True) for p in params]
    lr = knobs.pop("lr", LAMB_LR if cls is LAMB else LARS_LR)
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


def _reference(target, cls, params, grads, **knobs):
    with target.ref_ctx():
        return run_optimizer_on(cls, params, grads, "reference", F64, target.device, **knobs)[2]


def check_optimizer_matches_reference(target, cls, sizes, knobs, msg):
    """20 fp32 steps with the optimizer knobs vs the fp64 reference (``assert_close_list`` tolerances).
    Returns the optimizer."""
    params, grads = problem(sizes=sizes, steps=20)
    want = _reference(target, cls, params, grads, **knobs)
    opt, _, got = run_optimizer_on(cls, params, grads, target.backend, F32, target.device, **knobs)
    assert all(float(s["step"]) == 20 for s in opt.state.values())
    assert_close_list(got, want, msg=msg)
    return opt


def check_optimizer_lr_tensor(target, cls, sizes):
    """lr as a 0-d tensor on the device (with trust clipping / trust-ratio bounds) == the reference with a float."""
    params, grads = problem(sizes=sizes, steps=20, seed=1)
    knobs = dict(trust_clip=True) if cls is LARS else dict(min_trust_ratio=0.1, max_trust_ratio=5.0)
    want = _reference(target, cls, params, grads, **knobs)
    _, _, got = run_optimizer_on(cls, params, grads, target.backend, F32, target.device, lr_tensor=True, **knobs)
    assert_close_list(got, want)


def check_optimizer_master_weights(target, cls, sizes, dtype):
    """bf16/fp16 params with fp32 master weights: masters vs the fp64 reference (rtol 5e-5, atol 5e-6), each
    param exactly its master rounded to ``dtype``."""
    params, grads = problem(sizes=sizes, steps=20, seed=2, round_to=dtype)
    knobs = dict(max_grad_norm=1.0) if cls is LAMB else dict(nesterov=True)
    want = _reference(target, cls, params, grads, **knobs)
    _, ps, got = run_optimizer_on(cls, params, grads, target.backend, dtype, target.device, master_weights=True,
                                  **knobs)
    assert_close_list(got, want, rtol=5e-5, atol=5e-6, msg=f"{cls.__name__} {dtype} masters")
    for p, w in zip(ps, got):
        assert p.dtype == dtype
        assert torch.equal(p.detach().cpu(), w.to(F32).to(dtype))


def check_optimizer_segment_layout(target, cls, sizes):
    """Params cut into fragments (ZeRO-like), fragments of one tensor sharing its norm id: same as uncut."""
    params, grads = problem(sizes=sizes, steps=20, seed=3)
    fragments = []
    for j, n in enumerate(sizes):
        cuts = sorted({0, n} | {(n * i) // 3 + i for i in (1, 2) if (n * i) // 3 + i < n})
        fragments.append([(a, b - a, j) for a, b in zip(cuts[:-1], cuts[1:])])
    layout = SegmentLayout(fragments=fragments, num_ids=len(sizes))
    want = _reference(target, cls, params, grads)
    _, _, got = run_optimizer_on(cls, params, grads, target.backend, F32, target.device, layout=layout)
    assert_close_list(got, want)


def check_optimizer_skip_is_bit_identical(target, cls, sizes):
    """A non-finite global grad norm, then a GradScaler-style ``found_inf`` (read on the device), each skip a
    step: params and state bitwise unchanged, ``skipped_steps`` counts them."""
    dev = target.device
    params, grads = problem(sizes=sizes, steps=3, seed=6)
    ps = [p.detach().float().to(dev).clone().requires_grad_(True) for p in params]
    opt = cls(ps, backend=target.backend, max_grad_norm=1.0)
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
    opt.grad_scale, opt.found_inf = torch.tensor(2.0, device=dev), torch.tensor(1.0, device=dev)
    ps[4].grad[0] = 0.0
    opt.step()
    for p, b in zip(ps, before_p):
        assert torch.equal(p.detach(), b)
    assert int(opt.skipped_steps) == 2
