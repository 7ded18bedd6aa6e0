"""The cached step plan (ds_conadv/optim/_step_plan.py): used when nothing changed, rebuilt when something did,
and the numbers of every step equal to those of a step that builds its lists from scratch."""
import pytest
import torch

from ds_conadv.optim import LAMB, LARS, _step_plan

BACKENDS = ["foreach", "cpp"]


def _backend_or_skip(backend):
    if backend == "cpp":
        try:
            from ds_conadv.kernels.cpu import load

            load()
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"cpp kernels unavailable: {exc}")


@pytest.fixture
def no_plans(monkeypatch):
    """Steps that always take the slow path (the lists built from scratch, as before plans existed)."""

    def collect(opt, index, group):
        return opt._collect(index, group)

    monkeypatch.setattr(_step_plan, "collect", collect)
    import ds_conadv.optim.base as base

    monkeypatch.setattr(base, "_collect_planned", collect)


def _params(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7,), (4, 5), (3,), (2, 3, 4), (6,)]
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in shapes]


def _grads(params, step, seed=1):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return [(torch.randn(p.shape, generator=gen) * 0.01).to(p.dtype) for p in params]


def _make(cls, params, backend, **kw):
    if cls is LAMB:
        return LAMB(params, lr=1e-2, weight_decay=0.01, backend=backend, **kw)
    return LARS(params, lr=0.1, momentum=0.9, weight_decay=1e-3, backend=backend, **kw)


def _scenario(cls, backend, events):
    """Run 8 steps; ``events[step](opt, params, grads)`` may change something before that step."""
    params = _params()
    opt = _make(cls, params, backend)
    extra = []
    for step in range(8):
        grads = _grads(params + extra, step)
        for p, g in zip(params + extra, grads):
            p.grad = g
        if step in events:
            out = events[step](opt, params, extra)
            if out:
                extra = out
        opt.step()
    steps = [float(opt.state[p]["step"]) if "step" in opt.state[p] else 0.0 for p in params + extra]
    return [p.detach().clone() for p in params + extra], steps


def _grad_none_on_one_step(opt, params, extra):
    params[1].grad = None


def _add_group(opt, params, extra):
    new = [torch.nn.Parameter(torch.full((5,), 0.3))]
    new[0].grad = torch.full((5,), 0.01)
    opt.add_param_group({"params": new})
    return new


def _dtype_change(opt, params, extra):
    params[2].data = params[2].data.to(torch.bfloat16)
    params[2].grad = params[2].grad.to(torch.bfloat16)


def _moved_param(opt, params, extra):
    params[0].data = params[0].data.clone()  # same values, new storage


def _reload(opt, params, extra):
    opt.load_state_dict(opt.state_dict())


def _transposed_grad(opt, params, extra):
    g = params[1].grad
    params[1].grad = g.t().contiguous().t()  # same values, column-major: a dense grad in another layout


def _swapped_in_list(opt, params, extra):
    """Another param object put into the group's list in place (same shape): the list is the same object."""
    new = torch.nn.Parameter(params[3].detach().clone() + 0.05)
    new.grad = params[3].grad.clone()
    opt.param_groups[0]["params"][3] = new
    params[3] = new


def _list_replaced(opt, params, extra):
    """A new list object holding the same params (as a wrapper swapping ``param_groups`` does)."""
    opt.param_groups[0]["params"] = list(opt.param_groups[0]["params"])


EVENTS = {
    "swapped_in_list": {3: _swapped_in_list},
    "list_replaced": {2: _list_replaced, 4: _list_replaced},
    "grad_none": {2: _grad_none_on_one_step},
    "grad_none_twice": {2: _grad_none_on_one_step, 5: _grad_none_on_one_step},
    "add_param_group": {3: _add_group},
    "dtype_change": {4: _dtype_change},
    "moved_param": {3: _moved_param},
    "load_state_dict": {2: _reload, 5: _reload},
    "transposed_grad": {3: _transposed_grad},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [LAMB, LARS])
@pytest.mark.parametrize("event", sorted(EVENTS))
def test_plan_equals_lists_built_every_step(backend, cls, event, monkeypatch):
    _backend_or_skip(backend)
    with_plans, steps_plans = _scenario(cls, backend, EVENTS[event])
    monkeypatch.setattr(_step_plan, "collect", lambda opt, i, g: opt._collect(i, g))
    import ds_conadv.optim.base as base

    monkeypatch.setattr(base, "_collect_planned", lambda opt, i, g: opt._collect(i, g))
    without, steps_without = _scenario(cls, backend, EVENTS[event])
    assert steps_plans == steps_without
    for a, b in zip(with_plans, without):
        assert a.dtype == b.dtype and torch.equal(a, b)
    if event.startswith("grad_none"):
        assert steps_plans[1] == 8 - event.count("twice") - 1  # the step without a grad did not count


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_python_check_equals_cpp_check(cls, monkeypatch):
    _backend_or_skip("cpp")
    ref, ref_steps = _scenario(cls, "cpp", EVENTS["grad_none"])
    monkeypatch.setattr(_step_plan, "_checker", False)  # the fallback loop instead of the C++ check
    got, got_steps = _scenario(cls, "cpp", EVENTS["grad_none"])
    assert got_steps == ref_steps and all(torch.equal(a, b) for a, b in zip(got, ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchanged_steps_take_the_fast_path(backend, monkeypatch):
    _backend_or_skip(backend)
    params = _params()
    opt = _make(LAMB, params, backend)
    slow = []
    original = type(opt)._collect
    monkeypatch.setattr(type(opt), "_collect", lambda self, i, g: slow.append(i) or original(self, i, g))
    for step in range(4):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        opt.step()
    assert slow == [0]  # built once
    params[0].grad = None
    opt.step()
    assert slow == [0, 0]  # grad presence changed: rebuilt
    params[0].grad = torch.zeros_like(params[0])
    opt.step()
    assert slow == [0, 0, 0]
    # every step counter is a view of one vector that a step advances with one op
    vector = opt.state[params[1]]["step"]
    assert vector._base is not None and all(opt.state[p]["step"]._base is vector._base for p in params)


def test_sparse_grad_after_plan_raises_the_precise_error():
    params = _params()
    opt = _make(LAMB, params, "foreach")
    for p, g in zip(params, _grads(params, 0)):
        p.grad = g
    opt.step()
    params[0].grad = params[0].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_channels_last_params_plan(monkeypatch):
    """Dense non-contiguous params go to the kernels as flat views, also from the plan."""
    torch.manual_seed(0)
    nets = [torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [LAMB(n.parameters(), lr=1e-2, backend="foreach") for n in nets]
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    for step in range(4):
        for k, (net, opt) in enumerate(zip(nets, opts)):
            if k == 1:
                monkeypatch.setattr(_step_plan, "_MAX_PLANS", 0)  # evicts every plan: the slow path each step
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
            monkeypatch.setattr(_step_plan, "_MAX_PLANS", 8)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [LAMB, LARS])
@pytest.mark.parametrize("same_grad_tensor", [False, True])
def test_layout_cut_once_equals_cut_every_step(cls, same_grad_tensor, monkeypatch):
    """Under a segment layout (ZeRO) the fragment views are cached; grads that are new tensors, or the same
    tensors written in place, give the numbers of a step that cuts everything from scratch."""
    from ds_conadv.optim import SegmentLayout

    def run():
        params = [torch.nn.Parameter(torch.linspace(-1, 1, 30)), torch.nn.Parameter(torch.linspace(0.5, 2, 12))]
        opt = _make(cls, params, "foreach")
        opt.set_segment_layout(0, SegmentLayout([[(0, 10, 0), (10, 20, 1)], [(0, 12, 2)]], 3))
        grads = [torch.zeros_like(p) for p in params]
        for step in range(5):
            for p, g, new in zip(params, grads, _grads(params, step)):
                if same_grad_tensor:
                    g.copy_(new)
                    p.grad = g
                else:
                    p.grad = new
            opt.step()
        return [p.detach().clone() for p in params], opt

    got, opt = run()
    assert opt.__dict__.get("_layout_cuts")  # the cached cut was used
    monkeypatch.setattr(_step_plan, "_MAX_PLANS", 0)  # no plan: new lists (and a new cut) every step
    want, _ = run()
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_deleted_state_is_recreated_as_without_plans():
    params = _params()
    opt = _make(LARS, params, "foreach")
    for step in range(3):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        opt.step()
    del opt.state[params[2]]  # a reset of one param's state: it starts again at step 1
    opt.step()
    assert float(opt.state[params[2]]["step"]) == 1.0 and float(opt.state[params[0]]["step"]) == 4.0


def test_gpu_params_never_build_the_cpu_extension_for_the_check(monkeypatch):
    import ds_conadv.kernels.cpu as cpu

    monkeypatch.setattr(_step_plan, "_checker", None)
    monkeypatch.setattr(cpu, "_module", None)
    monkeypatch.setattr(cpu, "built", lambda: False)
    monkeypatch.setattr(cpu, "load", lambda: pytest.fail("built the extension for a GPU run's check"))
    assert _step_plan._ext(False) is None  # not built: the Python check
    assert _step_plan._checker is None  # and nothing remembered, a later CPU plan may still use it


def test_built_says_whether_load_would_compile(monkeypatch, tmp_path):
    import ds_conadv.kernels.cpu as cpu

    _backend_or_skip("cpp")
    assert cpu.built()  # loaded above
    monkeypatch.setattr(cpu, "_module", None)
    monkeypatch.setattr("ds_conadv.kernels._build._loaded", {})
    monkeypatch.setenv("DS_CONADV_EXT_DIR", str(tmp_path))  # an empty cache: a load would compile
    assert not cpu.built()
    monkeypatch.setenv("DS_CONADV_DISABLE_CPP", "1")
    assert not cpu.built()
