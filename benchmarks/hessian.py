#!/usr/bin/env python
"""Hessian tools benchmark (CPU by default).

Sections (run one, or ``all``):

``backends``
    time of one Hessian-vector product by each way of computing it, on one batch: double backward with the
    first-order graph cached (what ``data=`` uses), double backward rebuilding the graph every product (what a
    loader needs), forward-over-reverse with ``torch.func`` (``jvp(grad(f))``); and one plain gradient for scale.
    Models: the MLP 64-256-256-10 with BatchNorm and the job's DigitsCNN (width 32), batch 256 of 8x8 digits.
``pyhessian``
    time per power-iteration step (one product plus the vector work) of ``ds_conadv.hessian.Hessian`` vs
    PyHessian's ``hessian`` class on the same model and batch, one batch (``data=``) and a 4-batch loader.
    Uses the installed ``pyhessian`` (``--pyhessian-path DIR`` adds a folder to ``sys.path``, e.g. after
    ``pip install --no-deps --target DIR pyhessian``); without it, a faithful copy of PyHessian's double-backward
    loop (list-of-tensors vector work, ``loss.backward(create_graph=True)``) is timed instead and labelled so.
``ranks``
    time per product over a loader of ``--batches`` batches split over 1 and 2 gloo ranks (real processes,
    one thread each), and the speed-up; as a control, the same two processes each with its half of the batches
    and no collective (``2 independent``): the speed-up this machine's free cores allow at that moment.
``density-example``
    trains a tiny MLP on the digits for a few epochs and writes its SLQ density plot (docs/img).

Every timing interleaves the contenders round by round and reports the median and the minimum, with the load
average of the machine at the start (the CPU may be shared).

    python benchmarks/hessian.py all --json benchmarks/results/hessian-cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from ds_conadv.hessian import Hessian  # noqa: E402

F = nn.functional


def machine() -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "python": platform.python_version()}


# --------------------------------------------------------------------------- models and data
def digits(n: int = 256, seed: int = 0):
    from ds_conadv.train import load_digits

    x, y, _, _ = load_digits(0.2, 0)
    x = (x - 4.8861) / 6.0179
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(x.shape[0], generator=g)[:n]
    return x[idx], y[idx]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(),
                         nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10))


def cnn() -> nn.Module:
    from ds_conadv.train import DigitsCNN

    return DigitsCNN(32, 10)


def cnn64() -> nn.Module:
    from ds_conadv.train import DigitsCNN

    return DigitsCNN(64, 10)


MODELS = {"mlp": mlp, "cnn": cnn, "cnn64": cnn64}


def interleaved(fns: Dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> Dict[str, Dict[str, float]]:
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v), "n": len(v)}
            for k, v in times.items()}


# --------------------------------------------------------------------------- sections
def bench_backends(repeats: int) -> Dict[str, Any]:
    out = {}
    for name, make in MODELS.items():
        torch.manual_seed(0)
        model = make()
        x, y = digits(256)
        hs = {"double, graph cached (data=)": Hessian(model, F.cross_entropy, data=(x, y), hvp="double"),
              "double, graph rebuilt (loader)": Hessian(model, F.cross_entropy, data=(x, y), hvp="double",
                                                        cache=False),
              "func jvp(grad) (forward-over-reverse)": Hessian(model, F.cross_entropy, data=(x, y), hvp="func")}
        v = torch.randn(hs["func jvp(grad) (forward-over-reverse)"].dim, generator=torch.Generator().manual_seed(1))
        params = [p for p in model.parameters()]

        def grad_only():
            loss = F.cross_entropy(model(x), y)
            torch.autograd.grad(loss, params)

        fns = {"gradient only (reference)": grad_only}
        sessions = [h.op.session() for h in hs.values()]
        for s in sessions:
            s.__enter__()
        try:
            model.eval()
            for k, h in hs.items():
                fns[k] = (lambda h=h: h.op.matvec(v))
            ref = hs["double, graph cached (data=)"].op.matvec(v)
            for h in hs.values():
                torch.testing.assert_close(h.op.matvec(v), ref, rtol=1e-4, atol=1e-5)
            res = interleaved(fns, repeats)
        finally:
            for s in reversed(sessions):
                s.__exit__(None, None, None)
        out[name] = {"params": sum(p.numel() for p in params), "batch": int(x.shape[0]), "ms": res}
    return out


def _pyhessian_or_copy(path: str):
    if path:
        sys.path.insert(0, path)
    try:
        from pyhessian import hessian as ph

        import pyhessian

        return ph, f"PyHessian {getattr(pyhessian, '__version__', '0.1')} ({os.path.dirname(pyhessian.__file__)})"
    except ImportError:
        return _PyHessianCopy, "faithful copy of PyHessian's power iteration (pyhessian not installed)"


class _PyHessianCopy:
    """PyHessian 0.1's ``hessian`` (single batch and loader paths of ``eigenvalues``), re-typed here."""

    def __init__(self, model, criterion, data=None, dataloader=None, cuda=False):
        self.model = model.eval()
        self.criterion = criterion
        self.full_dataset = data is None
        self.data = dataloader if self.full_dataset else data
        if not self.full_dataset:
            inputs, targets = data
            loss = criterion(model(inputs), targets)
            loss.backward(create_graph=True)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.gradsH = [0.0 if p.grad is None else p.grad + 0.0 for p in self.params]

    @staticmethod
    def _dot(xs, ys):
        return sum(torch.sum(a * b) for a, b in zip(xs, ys))

    def _normalize(self, v):
        s = torch.sqrt(self._dot(v, v)).item()
        return [vi / (s + 1e-6) for vi in v]

    def _orth(self, w, vs):
        for v in vs:
            w = [wi - self._dot(w, v) * vi for wi, vi in zip(w, v)]
        return self._normalize(w)

    def _loader_hv(self, v):
        acc = [torch.zeros_like(p) for p in self.params]
        n = 0.0
        for inputs, targets in self.data:
            self.model.zero_grad()
            loss = self.criterion(self.model(inputs), targets)
            loss.backward(create_graph=True)
            grads = [0.0 if p.grad is None else p.grad + 0.0 for p in self.params]
            self.model.zero_grad()
            hv = torch.autograd.grad(grads, self.params, grad_outputs=v, only_inputs=True, retain_graph=False)
            acc = [a + h * float(inputs.size(0)) + 0.0 for a, h in zip(acc, hv)]
            n += float(inputs.size(0))
        acc = [a / n for a in acc]
        return self._dot(acc, v).item(), acc

    def eigenvalues(self, maxIter=100, tol=1e-3, top_n=1):
        values, vectors = [], []
        while len(values) < top_n:
            eig = None
            v = self._normalize([torch.randn(p.size()) for p in self.params])
            for _ in range(maxIter):
                v = self._orth(v, vectors)
                self.model.zero_grad()
                if self.full_dataset:
                    tmp, hv = self._loader_hv(v)
                else:
                    hv = torch.autograd.grad(self.gradsH, self.params, grad_outputs=v, only_inputs=True,
                                             retain_graph=True)
                    tmp = self._dot(hv, v).item()
                v = self._normalize(hv)
                if eig is not None and abs(eig - tmp) / (abs(eig) + 1e-6) < tol:
                    break
                eig = tmp
            values.append(eig)
            vectors.append(v)
        return values, vectors


def bench_pyhessian(iters: int, repeats: int, path: str) -> Dict[str, Any]:
    ph, label = _pyhessian_or_copy(path)
    out: Dict[str, Any] = {"baseline": label}
    for name, make in MODELS.items():
        torch.manual_seed(0)
        model = make()
        x, y = digits(256)
        loader = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
        for mode in ("one batch", "loader of 4"):
            kw = {"data": (x, y)} if mode == "one batch" else {"dataloader": loader}

            def ours():
                Hessian(model, F.cross_entropy, progress=False, **kw).eigenvalues(maxIter=iters, tol=0.0)

            def theirs():
                model.zero_grad(set_to_none=True)
                ph(model, F.cross_entropy, cuda=False, **kw).eigenvalues(maxIter=iters, tol=0.0)
                model.zero_grad(set_to_none=True)

            res = interleaved({"ds_conadv": ours, "pyhessian": theirs}, repeats, warmup=1)
            per = {k: {m: v[m] / iters for m in ("median_ms", "min_ms")} for k, v in res.items()}
            per["speedup_median"] = per["pyhessian"]["median_ms"] / per["ds_conadv"]["median_ms"]
            out[f"{name}, {mode}"] = per
        model.train()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(args) -> None:
    """One rank of the ``ranks`` section (started by :func:`bench_ranks`)."""
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    independent = os.environ.get("DS_CONADV_BENCH_INDEPENDENT") == "1"  # the control: no process group
    if world > 1 and not independent:
        torch.distributed.init_process_group("gloo")
    rank = int(os.environ.get("RANK", "0")) if independent else (torch.distributed.get_rank() if world > 1 else 0)
    torch.manual_seed(0)
    model = MODELS[args.model]()
    x, y = digits(64 * args.batches)
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, x.shape[0], 64)][rank::world]
    h = Hessian(model, F.cross_entropy, dataloader=batches, progress=False)
    v = torch.randn(h.dim, generator=torch.Generator().manual_seed(1))
    with h.op.session():
        h.op.matvec(v)
        times = []
        for _ in range(args.products):
            t0 = time.perf_counter()
            h.op.matvec(v)
            times.append(time.perf_counter() - t0)
    if rank == 0:
        print(json.dumps({"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
                          "samples": h.num_samples}))


def bench_ranks(batches: int, products: int, model: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {"model": model, "batches": batches, "batch": 64,
                           "loadavg_at_start": list(os.getloadavg())}
    for world, label in ((1, "1 rank(s)"), (2, "2 rank(s)"), (2, "2 independent")):
        port = _free_port()
        procs = []
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       DS_CONADV_BENCH_INDEPENDENT="1" if label == "2 independent" else "0")
            procs.append(subprocess.Popen([sys.executable, __file__, "_rank", "--model", model, "--batches",
                                           str(batches), "--products", str(products)], env=env,
                                          stdout=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=900)[0] for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError(f"ranks section failed: {outs}")
        out[label] = json.loads(outs[0].strip().splitlines()[-1])
    out["speedup_median"] = out["1 rank(s)"]["median_ms"] / out["2 rank(s)"]["median_ms"]
    out["speedup_min"] = out["1 rank(s)"]["min_ms"] / out["2 rank(s)"]["min_ms"]
    out["control_speedup_median"] = out["1 rank(s)"]["median_ms"] / out["2 independent"]["median_ms"]
    out["loadavg_at_end"] = list(os.getloadavg())
    return out


def density_example(path: str) -> Dict[str, Any]:
    from ds_conadv.train import load_digits

    torch.manual_seed(0)
    x, y, _, _ = load_digits(0.2, 0)
    x = ((x - 4.8861) / 6.0179).flatten(1)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        for i in range(0, x.shape[0], 64):
            opt.zero_grad()
            F.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    h = Hessian(model, F.cross_entropy, data=(x, y), progress=False)
    values, _ = h.eigenvalues(top_n=3, method="lanczos", maxIter=100, tol=1e-4)
    trace = h.trace(maxIter=200, tol=0.0)
    d = h.density(iter=100, n_v=3)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    d.plot(path, title=f"tiny MLP on digits ({h.dim:,} parameters), SLQ 100 steps x 3")
    return {"path": os.path.relpath(os.path.abspath(path), REPO), "bytes": os.path.getsize(path), "dim": h.dim,
            "top3": values,
            "trace": [trace.mean, trace.stderr]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("section", choices=["all", "backends", "pyhessian", "ranks", "density-example", "_rank"])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--iters", type=int, default=10, help="power-iteration steps per timed call (pyhessian)")
    ap.add_argument("--pyhessian-path", default="", help="folder to add to sys.path for pyhessian")
    ap.add_argument("--batches", type=int, default=8, help="ranks: batches of 64 in the loader (all ranks)")
    ap.add_argument("--products", type=int, default=10)
    ap.add_argument("--model", default="cnn", choices=sorted(MODELS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--density-out", default=os.path.join(REPO, "docs", "img", "hessian_density.png"))
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.section == "_rank":
        _rank_main(args)
        return 0
    torch.set_num_threads(args.threads)
    res: Dict[str, Any] = {"machine": machine()}
    if args.section in ("all", "backends"):
        res["backends"] = bench_backends(args.repeats)
        print(json.dumps({"backends": res["backends"]}, indent=1), flush=True)
    if args.section in ("all", "pyhessian"):
        res["pyhessian"] = bench_pyhessian(args.iters, max(3, args.repeats // 3), args.pyhessian_path)
        print(json.dumps({"pyhessian": res["pyhessian"]}, indent=1), flush=True)
    if args.section in ("all", "ranks"):
        res["ranks"] = bench_ranks(args.batches, args.products, args.model)
        print(json.dumps({"ranks": res["ranks"]}, indent=1), flush=True)
    if args.section in ("all", "density-example"):
        res["density_example"] = density_example(args.density_out)
        print(json.dumps({"density_example": res["density_example"]}, indent=1), flush=True)
    res["machine"]["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
