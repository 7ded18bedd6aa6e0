"""ds_conadv.hessian against exact answers: a quadratic with a known spectrum, a tiny MLP whose full Hessian
torch.autograd.functional.hessian builds, and 2 real ranks (gloo, DeepSpeed ZeRO-2) vs one process."""
from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest
import torch
from torch import nn

from ds_conadv.hessian import Hessian, hessian_main, layer_spectra
from ds_conadv.hessian.hvp import _HorovodComm, make_communicator

torch.set_num_threads(1)
F = nn.functional


class Quadratic(nn.Module):
    """loss = 0.5 x^T A x, A = Q diag(lam) Q^T: Hessian A, whatever the input."""

    def __init__(self, lam, seed=0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = len(lam)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        self.register_buffer("A", (q @ torch.diag(torch.tensor(lam, dtype=torch.float64)) @ q.T).to(dtype))
        self.x = nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64).to(dtype))

    def forward(self, inputs):
        return 0.5 * self.x @ self.A @ self.x


QUAD_DATA = (torch.zeros(1, 1), torch.zeros(1))
LAM = [10.0, 7.0, 5.0] + torch.linspace(-1.0, 2.0, 27).tolist()


def quad_hessian(lam=LAM, dtype=torch.float64, **kw):
    return Hessian(Quadratic(lam, dtype=dtype), lambda out, _: out, data=QUAD_DATA, **kw)


def rel(a, b):
    return abs(a - b) / abs(b)


# ----------------------------------------------------------------------------------------------------------
# quadratic model, known spectrum
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_quadratic_top3(method, dtype):
    h = quad_hessian(dtype=dtype)
    tol = 1e-6 if method == "power" else 1e-4
    values, vectors = h.eigenvalues(top_n=3, maxIter=500, tol=tol, method=method)
    assert len(values) == 3 and len(vectors) == 3
    for v, lam in zip(values, LAM[:3]):
        assert rel(v, lam) < 1e-3, (values, method)
    # eigenvectors: unit, in the parameter layout, and A q = lambda q
    A = h.model.A.double()
    for v, q in zip(values, vectors):
        assert len(q) == 1 and q[0].shape == h.model.x.shape
        q = q[0].double()
        assert abs(q.norm().item() - 1) < 1e-4
        assert (A @ q - v * q).norm().item() < 2e-2 * abs(v)


def test_lanczos_which_and_step_limit():
    h = quad_hessian()
    (smallest,), _ = h.eigenvalues(top_n=1, method="lanczos", which="SA", max_iter=30, tol=1e-8)
    assert abs(smallest - min(LAM)) < 1e-6
    with pytest.raises(ValueError):
        h.eigenvalues(top_n=5, max_iter=4, method="lanczos")  # k <= m
    with pytest.raises(TypeError):
        h.eigenvalues(maxIter=10, max_iter=20)


def test_quadratic_trace_within_error_bars():
    h = quad_hessian()
    tr = h.trace(maxIter=200, tol=0.0)  # fixed seed (0), fixed number of samples
    mean, stderr = tr
    assert len(tr.samples) == 200 and float(tr) == mean
    assert 0 < stderr < 3 and abs(mean - sum(LAM)) <= 3 * stderr, (mean, stderr, sum(LAM))
    early = h.trace(maxIter=200, tol=1e-3)  # PyHessian's stopping rule
    assert 2 <= len(early.samples) <= 200


def test_quadratic_density_mass_at_true_eigenvalues(tmp_path):
    lam = [-2.0, 0.5, 3.0, 8.0, 8.0, 12.0, 20.0]
    h = quad_hessian(lam)
    d = h.density(iter=50, n_v=3)  # 7-dimensional: Lanczos breaks down after 6 or 7 steps, nodes exact
    assert len(d.nodes) == 3
    for nodes, weights in zip(d.nodes, d.weights):
        assert abs(sum(weights) - 1) < 1e-9
        for t in nodes:
            assert min(abs(t - l) for l in lam) < 1e-6
    assert abs(d.mass_between(d.grid[0], d.grid[-1]) - 1) < 1e-6
    width = 0.05
    mass = sum(d.mass_between(l - width, l + width) for l in sorted(set(lam)))
    assert mass > 0.99, mass
    assert d.mass_between(13.0, 19.0) < 1e-6  # nothing between the eigenvalues
    path = d.plot(str(tmp_path / "density.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------------
# tiny MLP, full Hessian
# ----------------------------------------------------------------------------------------------------------
def tiny_mlp(bn=True):
    torch.manual_seed(3)
    layers = [nn.Linear(4, 6)] + ([nn.BatchNorm1d(6)] if bn else []) + [nn.Tanh(), nn.Linear(6, 3)]
    model = nn.Sequential(*layers).double()
    x = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    if bn:  # non-trivial running statistics
        with torch.no_grad():
            model.train()
            model(x * 1.5 + 0.3)
    return model, x, y


def full_hessian(model, x, y, names=None):
    """torch.autograd.functional.hessian of the loss as a function of the flat (selected) parameters."""
    named = dict(model.named_parameters())
    names = names or list(named)
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    flat = torch.cat([named[n].detach().reshape(-1) for n in names])

    def f(theta):
        ps = {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        return F.cross_entropy(torch.func.functional_call(model, ps, (x,)), y)

    return torch.autograd.functional.hessian(f, flat)


def test_mlp_top3_vs_eigvalsh():
    model, x, y = tiny_mlp()
    model.eval()
    H = full_hessian(model, x, y)
    exact = torch.linalg.eigvalsh(H)
    top = exact[exact.abs().argsort(descending=True)][:3].tolist()
    model.train()
    h = Hessian(model, F.cross_entropy, data=(x, y))
    power, _ = h.eigenvalues(top_n=3, maxIter=1000, tol=1e-9, method="power")
    lanczos, _ = h.eigenvalues(top_n=3, maxIter=60, tol=1e-6, method="lanczos")
    for got in (power, lanczos):
        for g, e in zip(got, top):
            assert rel(g, e) < 1e-3, (got, top)
    # and the exact trace lies within Hutchinson's error bars
    mean, stderr = h.trace(maxIter=100, tol=0.0)
    assert abs(mean - torch.trace(H).item()) <= 3 * stderr


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside torch.func
@pytest.mark.parametrize("cache", [True, False])
def test_double_backward_equals_forward_over_reverse(cache):
    model, x, y = tiny_mlp()
    loader = [(x[:15], y[:15]), (x[15:], y[15:])]
    v = [torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(i))
         for i, p in enumerate(model.parameters())]
    a = Hessian(model, F.cross_entropy, dataloader=loader, hvp="double", cache=cache).hvp(v)
    b = Hessian(model, F.cross_entropy, dataloader=loader, hvp="func").hvp(v)
    for s, t in zip(a, b):
        torch.testing.assert_close(s, t, rtol=1e-10, atol=1e-12)
    # and both equal the full Hessian times v (the loader's Hessian is the one of the mean over all 40)
    model.eval()
    H = full_hessian(model, x, y)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in a]), H @ torch.cat([t.reshape(-1) for t in v]),
                               rtol=1e-9, atol=1e-12)


def test_bn_eval_by_default_and_modes_restored():
    model, x, y = tiny_mlp()
    model.train()
    stats = [b.clone() for b in model[1].buffers()]
    h = Hessian(model, F.cross_entropy, data=(x, y))
    seen = []
    model[1].register_forward_pre_hook(lambda m, i: seen.append(m.training))
    h.eigenvalues(top_n=1, maxIter=5)
    assert seen and not any(seen)  # BN ran in eval mode
    assert model.training and all(m.training for m in model.modules())  # restored
    model.eval()
    h_eval = Hessian(model, F.cross_entropy, data=(x, y)).op.dense()
    assert not model.training
    torch.testing.assert_close(h.op.dense(), h_eval)
    # bn_eval=False: batch statistics, running statistics untouched, train mode kept
    model.train()
    seen.clear()
    hb = Hessian(model, F.cross_entropy, data=(x, y), bn_eval=False)
    hb.eigenvalues(top_n=1, maxIter=5)
    assert seen and all(seen) and model[1].track_running_stats
    for b, s in zip(model[1].buffers(), stats):
        assert torch.equal(b, s)
    assert not torch.allclose(hb.op.dense(), h_eval)


def test_params_restriction_is_the_sub_block():
    model, x, y = tiny_mlp()
    model.eval()
    names = [n for n, _ in model.named_parameters()]
    H = full_hessian(model, x, y)
    sizes = [p.numel() for p in model.parameters()]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    for sel in (["3"], ["0.weight", "1"], [model[3].weight]):
        h = Hessian(model, F.cross_entropy, data=(x, y), params=sel)
        idx = torch.cat([torch.arange(offsets[names.index(n)], offsets[names.index(n)] + sizes[names.index(n)])
                         for n in h.names])
        torch.testing.assert_close(h.op.dense(), H[idx][:, idx], rtol=1e-9, atol=1e-12)
    spectra = layer_spectra(model, F.cross_entropy, data=(x, y), method="lanczos", max_iter=40, tol=1e-8)
    assert list(spectra) == ["0", "1", "3"]
    for name, value in spectra.items():
        idx = torch.cat([torch.arange(offsets[names.index(n)], offsets[names.index(n)] + sizes[names.index(n)])
                         for n in names if n.startswith(name + ".")])
        ev = torch.linalg.eigvalsh(H[idx][:, idx])
        assert rel(value, ev[ev.abs().argmax()].item()) < 1e-6


def test_horovod_communicator_sums_with_hvd_allreduce(monkeypatch):
    """The Horovod path with a stand-in ``hvd`` (2 'ranks' whose other rank contributes the same vector)."""
    calls = []
    fake = types.SimpleNamespace(Sum="sum", rank=lambda: 0, size=lambda: 2,
                                 allreduce=lambda t, op, name: calls.append((op, name)) or t * 2,
                                 broadcast=lambda t, root_rank, name: t, broadcast_=lambda t, root_rank, name: t)
    comm = _HorovodComm(fake)
    model, x, y = tiny_mlp()
    h = Hessian(model, F.cross_entropy, data=(x, y), distributed=False)
    h.op.comm = comm
    ref = Hessian(model, F.cross_entropy, data=(x, y), distributed=False)
    v = [torch.ones_like(p) for p in model.parameters()]
    for s, t in zip(h.hvp(v), ref.hvp(v)):
        torch.testing.assert_close(s, t)  # (2 * sum) / (2 * count)
    assert h.num_samples == 80 and calls and calls[0][0] == "sum"
    assert isinstance(make_communicator(None), type(make_communicator(False)))  # nothing running: single


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
CLI_CFG = {"train": {"width": 4, "seed": 3, "test_fraction": 0.75}, "conadv": {"enabled": True, "epsilon": 2.0},
           "hessian": {"batch_size": 256, "top_n": 2, "method": "lanczos", "max_iter": 8, "tol": 0.0,
                       "trace_iter": 3, "trace_tol": 0.0, "density_steps": 6, "threads": 1}}


def test_cli_checkpoint_and_outputs(tmp_path, capsys):
    from ds_conadv.conadv.dual_bn import convert_dual_bn
    from ds_conadv.train import DigitsCNN

    cfg = json.loads(json.dumps(CLI_CFG))
    cfg["hessian"]["density_plot"] = str(tmp_path / "d.png")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    torch.manual_seed(5)
    model = convert_dual_bn(DigitsCNN(4, 10))  # what engine.module holds after a ConAdv run with dual BN
    torch.save({"module": model.state_dict()}, tmp_path / "model.pt")
    rc = hessian_main(["--config", str(tmp_path / "cfg.json"), "--checkpoint", str(tmp_path / "model.pt"),
                       "--json", str(tmp_path / "out.json"), "--no-progress", "--layers", "--max-batches", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "top 2 eigenvalues" in out and "trace" in out and "d.png" in out
    res = json.loads((tmp_path / "out.json").read_text())
    main_params = sum(p.numel() for n, p in model.named_parameters() if ".adv." not in n)
    assert res["num_samples"] == 256 and res["dim"] == main_params and len(res["eigenvalues"]) == 2
    assert set(res["layers"]) == {"features.0", "features.1.main", "features.3", "features.4.main", "features.6",
                                  "features.7.main", "classifier"}
    assert (tmp_path / "d.png").stat().st_size > 1000
    # the same weights as a plain state_dict of the unconverted model (DualBatchNorm loads it too)
    plain = DigitsCNN(4, 10)
    plain.load_state_dict({k.replace(".main.", "."): v for k, v in model.state_dict().items() if ".adv." not in k})
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    assert hessian_main(["--config", str(tmp_path / "cfg.json"), "--checkpoint", str(tmp_path / "plain.pt"),
                         "--json", str(tmp_path / "plain.json"), "--no-progress", "--density-steps", "0",
                         "--max-batches", "1"]) == 0
    assert json.loads((tmp_path / "plain.json").read_text())["eigenvalues"] == res["eigenvalues"]
    (tmp_path / "bad.json").write_text(json.dumps({"hessian": {"nope": 1}}))
    with pytest.raises(SystemExit):
        hessian_main(["--config", str(tmp_path / "bad.json")])


# ----------------------------------------------------------------------------------------------------------
# distributed: 2 real ranks
# ----------------------------------------------------------------------------------------------------------
def _ranks(prefix):
    return [json.load(open(f"{prefix}.rank{r}")) for r in range(2)]


def _close(a, b, rtol, atol, what):
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    torch.testing.assert_close(ta, tb, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def test_distributed_gloo_equals_single_process_on_the_union(tmp_path, capsys):
    from dist_harness import spawn

    prefix = str(tmp_path / "gloo")
    cli = json.loads(json.dumps(CLI_CFG))
    cli["hessian"]["density_plot"] = str(tmp_path / "cli.png")
    (tmp_path / "cli.json").write_text(json.dumps(cli))
    spawn("hessian_worker.py", ["--mode", "gloo", "--out", prefix, "--cli-config", str(tmp_path / "cli.json")],
          world_size=2, timeout=240)
    r0, r1 = _ranks(prefix)
    assert r0["comm"] == ["torch.distributed", 2, 1234] and r1["comm"] == r0["comm"]
    assert r0["dist"] == r1["dist"]  # every rank gets the same answer, bit for bit
    assert r0["restored_train_mode"]
    d, s = r0["dist"], r0["single"]
    assert d["num_samples"] == s["num_samples"] == 32
    for key in ("hvp", "power", "lanczos", "trace", "vec0"):
        _close(d[key], s[key], 1e-5, 1e-6, key)
    for key in ("nodes", "weights"):
        _close(d[key], s[key], 1e-5, 1e-6, key)
    # the CLI under the same 2-rank group equals a single-process CLI run
    dist_cli = json.load(open(f"{prefix}.cli.json"))
    single = tmp_path / "single.json"
    assert hessian_main(["--config", str(tmp_path / "cli.json"), "--json", str(single), "--no-progress"]) == 0
    single_cli = json.loads(single.read_text())
    assert dist_cli["world_size"] == 2 and dist_cli["num_samples"] == single_cli["num_samples"] == 449
    _close(dist_cli["eigenvalues"], single_cli["eigenvalues"], 1e-5, 1e-6, "cli eigenvalues")
    _close(dist_cli["trace"]["mean"], single_cli["trace"]["mean"], 1e-5, 1e-6, "cli trace")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_deepspeed_zero2_conadv_engine(tmp_path):
    from dist_harness import spawn

    prefix = str(tmp_path / "ds")
    spawn("hessian_worker.py", ["--mode", "deepspeed", "--out", prefix], world_size=2, timeout=300)
    r0, r1 = _ranks(prefix)
    assert r0["zero_stage"] == 2 and r0["comm"][:2] == ["torch.distributed", 2]
    assert r0["engine"] == "DeepSpeedConAdvEngine"  # unwrapped to its DeepSpeed engine, then engine.module
    assert r0["hessian_params"] == ["0.weight", "0.bias", "1.main.weight", "1.main.bias", "3.weight", "3.bias"]
    assert r0["dist"] == r1["dist"]
    # DeepSpeed leaves each rank its own BN statistics: the products used rank 0's, then each got its own back
    assert r0["running_mean"] != r1["running_mean"] and r0["own_buffers_restored"] and r1["own_buffers_restored"]
    d, s = r0["dist"], r0["single"]
    assert d["num_samples"] == s["num_samples"] == 32
    for key in ("power", "lanczos", "trace"):
        _close(d[key], s[key], 1e-5, 1e-6, key)


@pytest.mark.skipif(importlib.util.find_spec("horovod") is None, reason="Horovod is not installed")
def test_horovod_two_ranks(tmp_path):
    import shutil
    import subprocess

    from dist_harness import ROOT, WORKERS, base_env

    horovodrun = shutil.which("horovodrun") or str(__import__("pathlib").Path(sys.executable).with_name("horovodrun"))
    prefix = str(tmp_path / "hvd")
    proc = subprocess.run([horovodrun, "-np", "2", "-H", "localhost:2", sys.executable,
                           str(WORKERS / "hessian_worker.py"), "--mode", "horovod", "--out", prefix],
                          env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r0, r1 = _ranks(prefix)
    assert r0["comm"][:2] == ["horovod", 2] and r0["dist"] == r1["dist"]
    for key in ("hvp", "power", "lanczos", "trace"):
        _close(r0["dist"][key], r0["single"][key], 1e-5, 1e-6, key)


def test_default_method_is_lanczos_for_top_k_and_power_for_top_1():
    h = quad_hessian(dtype=torch.float64)
    values, _ = h.eigenvalues(top_n=3, tol=1e-6)
    assert h.last_info["method"] == "lanczos"
    for v, lam in zip(values, LAM[:3]):
        assert rel(v, lam) < 1e-3
    (top,), _ = h.eigenvalues(tol=1e-8, maxIter=500)
    assert h.last_info["method"] == "power" and rel(top, LAM[0]) < 1e-3
