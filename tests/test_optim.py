"""LAMB / LARS against the fp64 textbook, every knob, every CPU backend; and the optimizer contract."""
from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

from ds_conadv.optim import LAMB, LARC, LARS, FusedLAMB, SegmentLayout, param_groups
from ds_conadv.optim.backends import get_kernels

from optim_cases import (LAMB_KNOBS, LAMB_LR, LARS_KNOBS, LARS_LR, assert_close_list, problem, run_optimizer,
                         textbook_lamb,
                         textbook_lars)

CPU_BACKENDS = ["reference", "foreach", "cpp"]
TEXTBOOK = {LAMB: textbook_lamb, LARS: textbook_lars}
CASES = [(LAMB, name, knobs) for name, knobs in LAMB_KNOBS.items()] + \
        [(LARS, name, knobs) for name, knobs in LARS_KNOBS.items()]


def _backend_or_skip(backend):
    if backend == "cpp" and importlib.util.find_spec("ds_conadv.kernels.cpu") is None:
        pytest.skip("the cpp backend is not in this checkout")
    get_kernels(backend, torch.device("cpu"))  # a build failure fails the test: it must build here


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls,name,knobs", CASES, ids=[f"{c.__name__}-{n}" for c, n, _ in CASES])
def test_fp32_matches_fp64_textbook(backend, cls, name, knobs):
    _backend_or_skip(backend)
    params, grads = problem(steps=20)
    expected = TEXTBOOK[cls](params, grads, **knobs)
    _, _, weights = run_optimizer(cls, params, grads, backend, **knobs)
    assert_close_list(weights, expected, msg=f"{cls.__name__}[{backend}] {name}")


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_fp64_reference_is_exact(cls):
    """In fp64 the reference must agree with the textbook to rounding (it is the oracle of the fast paths)."""
    params, grads = problem(steps=20)
    for name, knobs in (LAMB_KNOBS if cls is LAMB else LARS_KNOBS).items():
        expected = TEXTBOOK[cls](params, grads, **knobs)
        _, _, weights = run_optimizer(cls, params, grads, "reference", dtype=torch.float64, **knobs)
        assert_close_list(weights, expected, rtol=1e-11, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_lr_as_tensor_and_scheduler(backend, cls):
    _backend_or_skip(backend)
    params, grads = problem(steps=8)
    base_lr = 1e-2 if cls is LAMB else 0.5
    lrs = [base_lr * 0.5 ** (t // 3) for t in range(8)]
    expected = TEXTBOOK[cls](params, grads, lrs=lrs)
    ps = [p.float().clone().requires_grad_() for p in params]
    opt = cls(ps, lr=torch.tensor(base_lr), backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = g.float()
        opt.step()
        sched.step()
    assert_close_list([p.detach().double() for p in ps], expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_low_precision_params_with_master_weights(backend, low, cls):
    _backend_or_skip(backend)
    params, grads = problem(steps=20, round_to=low)
    knobs = dict(max_grad_norm=1.0)
    expected = TEXTBOOK[cls](params, grads, **knobs)
    opt, ps, masters = run_optimizer(cls, params, grads, backend, dtype=low, master_weights=True, **knobs)
    assert all(opt.state[p]["master"].dtype == torch.float32 for p in ps)
    assert all(opt.state[p]["step"].dtype == torch.float32 for p in ps)
    assert_close_list(masters, expected, msg=f"{backend} {low} master")
    for p, m in zip(ps, masters):  # the model copy is the master rounded to nearest (1 ulp allowed)
        assert p.dtype == low
        torch.testing.assert_close(p.detach(), m.to(low), rtol=2 ** -7 if low == torch.bfloat16 else 2 ** -10,
                                   atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_segment_layout_equals_whole_tensors(backend, cls):
    """A flat buffer cut at arbitrary edges (as ZeRO does) gives the same step as the original tensors."""
    _backend_or_skip(backend)
    params, grads = problem(steps=6)
    expected = TEXTBOOK[cls](params, grads)
    flat = torch.cat([p.reshape(-1) for p in params]).float().requires_grad_()
    # fragments: every tensor cut in up to three pieces at odd offsets; ids = original tensor index
    fragments, offset = [], 0
    for i, p in enumerate(params):
        n = p.numel()
        cuts = sorted({0, n, n // 3, (2 * n) // 3 + 1} & set(range(n + 1)))
        fragments += [(offset + a, b - a, i) for a, b in zip(cuts, cuts[1:]) if b > a]
        offset += n
    sums_seen = []
    opt = cls([flat], lr=LAMB_LR if cls is LAMB else LARS_LR, backend=backend)
    opt.set_segment_layout(0, SegmentLayout([fragments], num_ids=len(params), norm_hook=sums_seen.append))
    for step_grads in grads:
        flat.grad = torch.cat([g.reshape(-1) for g in step_grads]).float()
        opt.step()
    # per step: the all-ranks inf/NaN check of the gradients (1 x 1), then the per-id sums (ids x 2)
    assert [tuple(s.shape) for s in sums_seen] == [(1, 1), (len(params), 2)] * len(grads)
    got, offset = [], 0
    for p in params:
        got.append(flat.detach()[offset:offset + p.numel()].reshape(p.shape).double())
        offset += p.numel()
    assert_close_list(got, expected, msg=f"{cls.__name__}[{backend}] segments")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_grad_scaler_skips_and_unscales(backend, cls):
    _backend_or_skip(backend)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    twin = copy.deepcopy(model)
    opt = cls(model.parameters(), lr=0.01, backend=backend, max_grad_norm=10.0)
    twin_opt = cls(twin.parameters(), lr=0.01, backend=backend, max_grad_norm=10.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    for _ in range(3):
        for m, o, use_scaler in ((model, opt, True), (twin, twin_opt, False)):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            if use_scaler:
                scaler.scale(loss).backward()
                scaler.step(o)
                scaler.update()
            else:
                loss.backward()
                o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # an inf gradient: the step is skipped, params and state bit-identical, the skip counted
    before_p = [p.detach().clone() for p in model.parameters()]
    before_s = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scale_before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale_before
    assert int(opt.skipped_steps) == 1
    for a, b in zip(model.parameters(), before_p):
        assert torch.equal(a, b)
    after_s = opt.state_dict()["state"]
    for k in before_s:
        for name, value in before_s[k].items():
            assert torch.equal(after_s[k][name], value), name


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_nonfinite_grad_with_clipping_skips_without_scaler(cls):
    p = torch.randn(10, requires_grad=True)
    opt = cls([p], max_grad_norm=1.0, backend="foreach")
    p.grad = torch.randn(10)
    opt.step()
    saved = p.detach().clone(), copy.deepcopy(opt.state[p])
    p.grad = torch.full((10,), float("nan"))
    opt.step()
    assert torch.equal(p.detach(), saved[0]) and int(opt.skipped_steps) == 1
    for k, v in saved[1].items():
        assert torch.equal(opt.state[p][k], v)


def _two_group_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_nonfinite_grad_skips_by_default_without_clipping(cls, bad, backend):
    """One inf/NaN element in one tensor of one group: the whole step is skipped (every group), bit-identical
    params and state, counted; the next finite step goes on as if the bad one never happened."""
    _backend_or_skip(backend)
    model, twin = _two_group_model(), _two_group_model()
    opts = [cls(param_groups(m, 1e-4), lr=0.01, backend=backend) for m in (model, twin)]
    x = torch.randn(16, 6)
    for opt, m in zip(opts, (model, twin)):
        m(x).square().mean().backward()
        opt.step()
    before_p = [q.detach().clone() for q in model.parameters()]
    before_s = copy.deepcopy(opts[0].state_dict()["state"])
    model(x).square().mean().backward()
    model[2].weight.grad[1, 2] = float(bad)
    opts[0].step()
    assert int(opts[0].skipped_steps) == 1
    for a, b in zip(model.parameters(), before_p):
        assert torch.equal(a, b)
    after_s = opts[0].state_dict()["state"]
    for k in before_s:
        for name, value in before_s[k].items():
            assert torch.equal(after_s[k][name], value), name
    # the next finite step equals the twin's second step: the skipped one left no trace
    for opt, m in zip(opts, (model, twin)):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_nonfinite_in_one_ranks_partition_skips_on_every_rank(cls):
    """Two "ranks" (threads) each own half of a flat parameter through a segment layout whose norm hook sums
    with the other rank (an all-reduce). A NaN in rank 1's half only: both skip, both bit-identical."""
    import threading

    n = 40
    flat0 = torch.randn(n, generator=torch.Generator().manual_seed(0))
    barrier, box = threading.Barrier(2, timeout=30), [None, None]

    def make_hook(rank):
        def all_reduce(t):
            box[rank] = t.clone()
            barrier.wait()
            t.copy_(box[0] + box[1])
            barrier.wait()
        return all_reduce

    results = [None, None]

    def rank_main(rank):
        part = flat0[rank * n // 2:(rank + 1) * n // 2].clone().requires_grad_(True)
        opt = cls([part], lr=0.1, backend="reference")  # foreach keeps phase-1 results on a shared object
        # two layers of 20 elements, cut at the rank boundary
        opt.set_segment_layout(0, SegmentLayout([[(0, n // 2, rank)]], num_ids=2, norm_hook=make_hook(rank)))
        part.grad = torch.ones(n // 2)
        opt.step()
        before = part.detach().clone()
        part.grad = torch.ones(n // 2)
        if rank == 1:
            part.grad[3] = float("nan")
        opt.step()
        results[rank] = (torch.equal(part.detach(), before), int(opt.skipped_steps))

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [(True, 1), (True, 1)]


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_skip_nonfinite_off_lets_nan_through(cls):
    p = torch.ones(4, requires_grad=True)
    opt = cls([p], lr=0.1, backend="foreach", skip_nonfinite=False)
    p.grad = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    opt.step()
    assert torch.isnan(p).any() and int(opt.skipped_steps) == 0


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_skip_nonfinite_is_global_and_checked(cls):
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    with pytest.raises(TypeError, match="skip_nonfinite"):
        cls([a], skip_nonfinite="yes")
    opt = cls([{"params": [a]}, {"params": [b], "skip_nonfinite": False}], lr=0.1)
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    with pytest.raises(ValueError, match="skip_nonfinite is global"):
        opt.step()


def test_load_state_dict_keeps_segment_layouts():
    """torch's load_state_dict goes through __setstate__: the layouts a ZeRO wrapper set (and the attachment)
    belong to this object and must survive it (a copy or a pickle starts without them)."""
    flat = torch.randn(10, requires_grad=True)
    opt = LAMB([flat], lr=0.01)
    opt.set_segment_layout(0, SegmentLayout([[(0, 4, 0), (4, 6, 1)]], num_ids=2))
    flat.grad = torch.randn(10)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert opt._layouts and int(opt.skipped_steps) == 0
    flat.grad = torch.randn(10)
    opt.step()
    assert opt.trust_ratios[0].shape == (2,)
    assert not copy.deepcopy(opt)._layouts


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("cls", [LAMB, LARS, FusedLAMB])
def test_copy_and_pickle_round_trip(cls, how):
    """A copied/unpickled optimizer steps, saves and loads like the original (torch.optim's contract)."""
    import io
    import pickle

    model = _two_group_model()
    opt = cls(param_groups(model, 1e-4), lr=0.01, backend="foreach")
    x = torch.randn(16, 6)
    model(x).square().mean().backward()
    opt.step()
    bundle = (model, opt)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy(bundle)
    else:
        buf = io.BytesIO()
        pickle.dump(bundle, buf)
        buf.seek(0)
        model2, opt2 = pickle.load(buf)
    assert all(p2 is not p for p2, p in zip(model2.parameters(), model.parameters()))
    for o, m in ((opt, model), (opt2, model2)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert int(opt2.skipped_steps) == int(opt.skipped_steps)
    opt3 = cls(param_groups(model2, 1e-4), lr=0.01, backend="foreach")
    opt3.load_state_dict(opt2.state_dict())


def test_loads_state_saved_before_skip_nonfinite_existed():
    model = _two_group_model()
    opt = LAMB(param_groups(model, 1e-4), lr=0.01)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["skip_nonfinite"]
    opt2 = LAMB(param_groups(model, 1e-4), lr=0.01)
    opt2.load_state_dict(sd)
    assert all(g["skip_nonfinite"] is True for g in opt2.param_groups)


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_state_dict_resume_equals_uninterrupted(cls, tmp_path):
    params, grads = problem(steps=10, round_to=torch.bfloat16)

    def make():
        ps = [p.to(torch.bfloat16).requires_grad_() for p in params]
        return ps, cls(ps, backend="foreach", master_weights=True, max_grad_norm=5.0)

    def run(ps, opt, steps):
        for step_grads in steps:
            for p, g in zip(ps, step_grads):
                p.grad = g.to(torch.bfloat16)
            opt.step()

    ps_full, opt_full = make()
    run(ps_full, opt_full, grads)
    ps_a, opt_a = make()
    run(ps_a, opt_a, grads[:4])
    torch.save({"params": [p.detach() for p in ps_a], "optim": opt_a.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt")
    ps_b, opt_b = make()
    with torch.no_grad():
        for p, saved in zip(ps_b, ckpt["params"]):
            p.copy_(saved)
    opt_b.load_state_dict(ckpt["optim"])
    assert opt_b.state[ps_b[0]]["master"].dtype == torch.float32  # torch would have cast it to bf16
    run(ps_b, opt_b, grads[4:])
    for a, b in zip(ps_full, ps_b):
        assert torch.equal(a, b)
    for a, b in zip(ps_full, ps_b):
        for k, v in opt_full.state[a].items():
            assert torch.equal(v, opt_b.state[b][k]), k


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_closure_and_zero_grad(cls):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = cls(model.parameters(), backend="foreach")
    x = torch.randn(8, 4)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    first = opt.step(closure)
    assert isinstance(first, torch.Tensor)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_settings_survive_reinit_with_param_groups(cls):
    """hvd.DistributedOptimizer re-runs __init__ with only param_groups: nothing may revert to a default."""
    model = torch.nn.Linear(4, 2)
    opt = cls(param_groups(model, 0.05), lr=0.3, max_grad_norm=2.0, master_weights=True, backend="reference",
              trust_clip=True)
    again = type(opt)(opt.param_groups)
    for g, h in zip(opt.param_groups, again.param_groups):
        assert {k: v for k, v in g.items() if k != "params"} == {k: v for k, v in h.items() if k != "params"}
    assert again.param_groups[0]["backend"] == "reference" and again._max_grad_norm() == 2.0


def test_param_groups_recipe():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LayerNorm(4 * 6 * 6), torch.nn.Linear(144, 10))
    model.pos_embed = torch.nn.Parameter(torch.zeros(1, 5, 4))
    groups = param_groups(model, 0.01, skip=["pos_embed"], lr=0.2)
    decay, no_decay = groups
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[4].weight)}
    assert decay["weight_decay"] == 0.01 and decay["lr"] == 0.2
    assert no_decay["weight_decay"] == 0.0 and no_decay["always_adapt"] is False
    assert len(no_decay["params"]) == 7  # conv bias, bn w/b, ln w/b, fc bias, pos_embed
    LAMB(groups)  # a valid input
    # the excluded group gets neither decay nor a trust ratio
    opt = LARS(groups, backend="reference")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert torch.equal(opt.trust_ratios[1], torch.ones_like(opt.trust_ratios[1]))


@pytest.mark.parametrize("bad,match", [
    (dict(backend="fast"), "backend='fast' is not supported; allowed"),
    (dict(lr=-1.0), "lr=-1.0 must be >= 0"),
    (dict(betas=(0.9, 1.0)), r"betas\[1\]=1.0 must be < 1"),
    (dict(min_trust_ratio=2.0, max_trust_ratio=1.0), "min_trust_ratio=2.0 is larger"),
    (dict(max_grad_norm=0.0), "max_grad_norm=0.0 must be > 0"),
    (dict(trust_clip="yes"), "trust_clip='yes' must be True or False"),
    (dict(lr=float("nan")), "lr=nan must be a finite number"),
    (dict(lr=float("inf")), "lr=inf must be a finite number"),
    (dict(weight_decay=float("inf")), "weight_decay=inf must be a finite number"),
    (dict(eps=float("nan")), "eps=nan must be a finite number"),
    (dict(max_grad_norm=float("inf")), "max_grad_norm=inf must be a finite number"),
])
def test_lamb_rejects_bad_arguments(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LAMB([torch.zeros(2, requires_grad=True)], **bad)


@pytest.mark.parametrize("bad,match", [
    (dict(nesterov=True, momentum=0.0), "nesterov=True requires momentum > 0"),
    (dict(trust_coefficient=0.0), "trust_coefficient=0.0 must be > 0"),
    (dict(momentum=float("nan")), "momentum=nan must be a finite number"),
    (dict(momentum=5.0), "momentum=5.0 must be < 1"),
    (dict(lr=float("-inf")), "lr=-inf must be a finite number"),
])
def test_lars_rejects_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        LARS([torch.zeros(2, requires_grad=True)], **bad)


def test_rejects_bad_inputs():
    with pytest.raises(TypeError, match="complex"):
        LAMB([torch.zeros(2, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(ValueError, match="mixes devices"):
        LAMB([torch.zeros(2, requires_grad=True), torch.zeros(2, device="meta", requires_grad=True)])
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = LAMB(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    with pytest.raises(ValueError, match="max_grad_norm is global"):
        LAMB([{"params": [torch.zeros(2, requires_grad=True)], "max_grad_norm": 1.0},
              {"params": [torch.zeros(2, requires_grad=True)]}]).step()


def test_fused_lamb_is_apex_compatible():
    params, grads = problem(steps=5)
    expected = textbook_lamb(params, grads, weight_decay=0.0, always_adapt=True, max_grad_norm=1.0)
    ps = [p.float().requires_grad_() for p in params]
    opt = FusedLAMB(ps, lr=1e-2, weight_decay=0.0, use_nvlamb=True, backend="foreach")  # apex default max_grad_norm=1
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = g.float()
        opt.step()
    assert_close_list([p.detach().double() for p in ps], expected)
    opt.zero_grad()
    assert ps[0].grad is None
    with pytest.raises(RuntimeError, match="AMSGrad"):
        FusedLAMB(ps, amsgrad=True)


@pytest.mark.parametrize("clip", [True, False])
def test_larc_around_sgd_equals_lars(clip):
    params, grads = problem(steps=10)
    expected = textbook_lars(params, grads, lr=0.5, weight_decay=1e-4, trust_coefficient=0.02, trust_clip=clip)
    ps = [p.float().requires_grad_() for p in params]
    opt = LARC(torch.optim.SGD(ps, lr=0.5, momentum=0.9, weight_decay=1e-4), trust_coefficient=0.02, clip=clip,
               backend="foreach")
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = g.float()
        opt.step()
    assert opt.param_groups[0]["weight_decay"] == 1e-4  # restored after the step
    assert_close_list([p.detach().double() for p in ps], expected)


def test_auto_falls_back_once_with_the_reason(monkeypatch):
    from ds_conadv.optim import backends

    real_load = backends._load

    def failing(name, device):
        if name == "cpp":
            raise RuntimeError("nvcc/g++ exploded")
        return real_load(name, device)

    monkeypatch.setattr(backends, "_load", failing)
    monkeypatch.setattr(backends, "_cache", {})
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match=r"uses 'foreach'; skipped cpp: .*nvcc/g\+\+ exploded"):
        assert get_kernels("auto", torch.device("cpu")).name == "foreach"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_kernels("auto", torch.device("cpu")).name == "foreach"  # cached: no second warning
    with pytest.raises(backends.BackendUnavailable, match="nvcc/g"):
        get_kernels("cpp", torch.device("cpu"))


def test_fp64_params_take_fp64_math_under_auto():
    p = torch.randn(5, dtype=torch.float64, requires_grad=True)
    opt = LAMB([p])
    p.grad = torch.randn(5, dtype=torch.float64)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float64


def _conv_net(channels_last: bool, dtype=torch.float32):
    torch.manual_seed(0)
    # no bias before BN: its gradient is rounding noise, which LAMB's m/sqrt(v) would amplify
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 5, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(5, 4)).to(dtype)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def _train_conv(net, opt, steps=6, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 3, 9, 9, generator=gen).to(device=device, dtype=dtype)
        if net[0].weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        torch.nn.functional.cross_entropy(net(x).float(), (torch.arange(4) % 4).to(device)).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
@pytest.mark.parametrize("cls", [LAMB, LARS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_params_equal_contiguous(backend, cls, dtype):
    """channels_last convolution weights (apex's multi-tensor kernels take them too): the same steps as the
    contiguous model, and the weights, state and master keep the channels_last layout. Triton here runs under
    TRITON_INTERPRET=1 (scripts/test.sh sets it); on GPU see test_channels_last_on_gpu."""
    if backend == "triton" and (importlib.util.find_spec("triton") is None
                                or os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("needs triton under TRITON_INTERPRET=1 (scripts/test.sh sets it)")
    _backend_or_skip(backend)
    nets = {cl: _conv_net(cl, dtype) for cl in (False, True)}
    opts = {cl: cls(nets[cl].parameters(), lr=0.05, weight_decay=0.01, backend=backend,
                    master_weights=dtype != torch.float32) for cl in nets}
    for cl in nets:
        _train_conv(nets[cl], opts[cl], dtype=dtype)
    w = nets[True][0].weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    state = opts[True].state[w]
    assert all(state[k].stride() == w.stride() for k in state if torch.is_tensor(state[k]) and state[k].dim() == 4)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-5)
    for (name, a), b in zip(nets[False].named_parameters(), nets[True].parameters()):
        torch.testing.assert_close(b.detach(), a.detach(), **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_contiguous_state_loads_into_channels_last_model(cls):
    """A checkpoint of a contiguous run resumes on the channels_last model (the state is re-laid once)."""
    nets = {cl: _conv_net(cl) for cl in (False, True)}
    opt_a = cls(nets[False].parameters(), lr=0.05, weight_decay=0.01)
    _train_conv(nets[False], opt_a, steps=3)
    nets[True].load_state_dict(nets[False].state_dict())
    opt_b = cls(nets[True].parameters(), lr=0.05, weight_decay=0.01)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    _train_conv(nets[False], opt_a, steps=3)
    _train_conv(nets[True], opt_b, steps=3)
    for a, b in zip(nets[False].parameters(), nets[True].parameters()):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_channels_last_state_loads_into_contiguous_model(cls):
    """The other way round: the state takes the contiguous param's layout at load time (fused kernels need it)."""
    nets = {cl: _conv_net(cl) for cl in (False, True)}
    opt_cl = cls(nets[True].parameters(), lr=0.05, weight_decay=0.01)
    _train_conv(nets[True], opt_cl, steps=2)
    nets[False].load_state_dict(nets[True].state_dict())
    opt = cls(nets[False].parameters(), lr=0.05, weight_decay=0.01)
    opt.load_state_dict(copy.deepcopy(opt_cl.state_dict()))
    assert all(t.is_contiguous() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def test_overlapping_params_are_refused():
    base = torch.zeros(4, requires_grad=True)
    p = base.detach().as_strided((3, 2), (1, 1)).requires_grad_()  # overlapping: element 1 appears twice
    p.grad = torch.ones(3, 2)
    with pytest.raises(ValueError, match="dense params"):
        LAMB([p]).step()


def _step_with_shared_grads(nets, opts, steps=6, dtype=torch.float32, device="cpu"):
    """Both nets get the gradients of the contiguous one (in their own layout) and step: this isolates the
    optimizer (cuDNN picks other algorithms, and TF32, for channels_last convolutions on a GPU)."""
    gen = torch.Generator().manual_seed(1)
    ref = nets[False]
    for _ in range(steps):
        x = torch.randn(4, 3, 9, 9, generator=gen).to(device=device, dtype=dtype)
        torch.nn.functional.cross_entropy(ref(x).float(), (torch.arange(4) % 4).to(device)).backward()
        for p_ref, p_cl in zip(ref.parameters(), nets[True].parameters()):
            p_cl.grad = torch.empty_like(p_cl).copy_(p_ref.grad)
        for cl in (False, True):
            opts[cl].step()
            opts[cl].zero_grad()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda", "foreach"])
@pytest.mark.parametrize("cls", [LAMB, LARS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_on_gpu(backend, cls, dtype):
    nets = {cl: _conv_net(cl, dtype).cuda() for cl in (False, True)}
    opts = {cl: cls(nets[cl].parameters(), lr=0.05, weight_decay=0.01, backend=backend,
                    master_weights=dtype != torch.float32) for cl in nets}
    _step_with_shared_grads(nets, opts, dtype=dtype, device="cuda")
    assert nets[True][0].weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(nets[False].parameters(), nets[True].parameters()):
        # the same update up to the order of the norms' sums: at most one rounding step of the param dtype
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6 if dtype == torch.float32 else 2 ** -7,
                                   atol=1e-7 if dtype == torch.float32 else 1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lars_inf_nan_check_reads_pass_one(backend, monkeypatch):
    """LARS's skip_nonfinite verdict comes from pass 1's gradient sums: no sum-of-squares pass of its own, and a
    non-finite gradient still skips the step, bit-identically."""
    _backend_or_skip(backend)
    from ds_conadv.optim import functional as F

    calls = []
    real = F.grad_sumsq
    monkeypatch.setattr(F, "grad_sumsq", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(10, 4))
    opt = LARS([p], lr=0.1, momentum=0.9, weight_decay=1e-4, backend=backend)
    p.grad = torch.randn_like(p)
    opt.step()
    assert calls == []
    before = p.detach().clone()
    buf = opt.state[p]["momentum_buffer"].clone()
    p.grad = torch.randn_like(p)
    p.grad[2, 1] = float("inf")
    opt.step()
    assert torch.equal(p, before) and torch.equal(opt.state[p]["momentum_buffer"], buf)
    assert int(opt.skipped_steps) == 1 and float(opt.state[p]["step"]) == 1.0
