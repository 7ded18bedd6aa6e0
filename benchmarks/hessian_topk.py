#!/usr/bin/env python
"""Time to the top-k Hessian eigenvalues at a given accuracy: ds_conadv (Lanczos, power) vs PyHessian.

One model and one batch (an MLP on synthetic data, eval mode, no BatchNorm, so that every contender sees the same
function). The reference is a tight fp64 Lanczos run of ours (all the ``--ref-steps`` steps, full
reorthogonalisation). Each contender runs at several tolerances (``--tols``); for each run the wall time, the
number of Hessian-vector products and the largest relative error of the top-k eigenvalues against the reference
are recorded (median time over ``--repeats`` repeats, the contenders interleaved). *Time to accuracy* is the
fastest setting whose error is at most ``--target`` (default 1e-3).

PyHessian is not a dependency: point ``--pyhessian-path`` at a folder holding its ``pyhessian`` package (e.g.
``git archive`` of github.com/amirgholami/PyHessian extracted to a temp dir); without it only ours are timed.

    python benchmarks/hessian_topk.py --pyhessian-path /tmp/ph --json benchmarks/results/hessian_topk-cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Dict, List

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from ds_conadv.hessian import Hessian  # noqa: E402


def make_problem(width: int, batch: int, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 64, generator=gen)
    w = torch.randn(64, 10, generator=gen)
    y = (x @ w).argmax(1)  # learnable labels: a non-trivial spectrum
    # a few steps of training so that the batch is not at a random point
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model = model.to(dtype).eval()
    return model, x.to(dtype), y


def reference(width, batch, k, steps) -> List[float]:
    model, x, y = make_problem(width, batch, dtype=torch.float64)
    h = Hessian(model, nn.CrossEntropyLoss(), data=(x, y), progress=False)
    values, _ = h.eigenvalues(max_iter=steps, tol=0.0, top_n=k, method="lanczos")
    return values


def max_rel_error(values: List[float], ref: List[float]) -> float:
    got = sorted(values, key=abs, reverse=True)
    return max(abs(a - b) / abs(b) for a, b in zip(got, ref))


def contenders(args, pyhessian):
    loss = nn.CrossEntropyLoss()
    out = {}
    for tol in args.tols:
        def ours_lanczos(model, x, y, tol=tol):
            h = Hessian(model, loss, data=(x, y), progress=False)
            values, _ = h.eigenvalues(max_iter=args.max_iter, tol=tol, top_n=args.k, method="lanczos")
            return values, h.last_info["products"]

        def ours_power(model, x, y, tol=tol):
            h = Hessian(model, loss, data=(x, y), progress=False)
            values, _ = h.eigenvalues(max_iter=args.max_iter, tol=tol, top_n=args.k, method="power")
            return values, h.last_info["products"]

        out[f"ds_conadv lanczos tol={tol:g}"] = ours_lanczos
        out[f"ds_conadv power tol={tol:g}"] = ours_power
        if pyhessian is not None:
            def theirs(model, x, y, tol=tol):
                torch.manual_seed(0)  # PyHessian draws its start vectors from the global generator
                h = pyhessian.hessian(model, loss, data=(x, y), cuda=False)
                values, _ = h.eigenvalues(maxIter=args.max_iter, tol=tol, top_n=args.k)
                return values, None

            out[f"PyHessian power tol={tol:g}"] = theirs
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--tols", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    ap.add_argument("--max-iter", type=int, default=200)
    ap.add_argument("--ref-steps", type=int, default=120)
    ap.add_argument("--target", type=float, default=1e-3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pyhessian-path", default="")
    ap.add_argument("--machine-label", default="2-core CPU (shared)")
    ap.add_argument("--json", dest="json_out", default=os.path.join(HERE, "results", "hessian_topk-cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pyhessian = None
    if args.pyhessian_path:
        sys.path.insert(0, args.pyhessian_path)
    try:
        import pyhessian  # noqa: F811
    except ImportError:
        print("# PyHessian not found (--pyhessian-path): timing ours only", flush=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    ref = reference(args.width, args.batch, args.k, args.ref_steps)
    ref_s = time.perf_counter() - t0
    print(f"# reference (fp64 Lanczos, {args.ref_steps} steps, {ref_s:.1f} s): {ref}", flush=True)
    runs = contenders(args, pyhessian)
    rows: Dict[str, Dict] = {name: {"times_s": []} for name in runs}
    for rep in range(args.repeats):
        for name, fn in runs.items():
            model, x, y = make_problem(args.width, args.batch)  # (not timed)
            t = time.perf_counter()
            values, products = fn(model, x, y)
            rows[name]["times_s"].append(time.perf_counter() - t)
            rows[name].update(values=values, products=products, max_rel_error=max_rel_error(values, ref))
            if rep == 0:
                print(f"  {name:<32} {rows[name]['times_s'][-1]:7.2f} s  products {products}  "
                      f"max rel err {rows[name]['max_rel_error']:.2e}", flush=True)
    for r in rows.values():
        r["median_s"] = statistics.median(r["times_s"])
    best = {}
    for family in ("ds_conadv lanczos", "ds_conadv power", "PyHessian power"):
        ok = [(r["median_s"], name) for name, r in rows.items()
              if name.startswith(family) and r["max_rel_error"] <= args.target]
        best[family] = {"median_s": min(ok)[0], "setting": min(ok)[1]} if ok else None
    speedup = None
    if best.get("PyHessian power") and best.get("ds_conadv lanczos"):
        speedup = best["PyHessian power"]["median_s"] / best["ds_conadv lanczos"]["median_s"]
    n_params = sum(p.numel() for p in make_problem(args.width, args.batch)[0].parameters())
    report = {
        "benchmark": "hessian_topk", "machine_label": args.machine_label, "threads": args.threads,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "platform": platform.platform(),
        "load_avg": {"before": list(load_before), "after": list(os.getloadavg())},
        "model": f"MLP 64-{args.width}-{args.width}-10 (tanh), eval mode", "n_params": n_params,
        "batch": args.batch, "k": args.k, "target_rel_error": args.target, "reference": ref,
        "reference_steps": args.ref_steps, "max_iter": args.max_iter, "repeats": args.repeats,
        "pyhessian": getattr(pyhessian, "__file__", None) if pyhessian else None,
        "rows": rows, "time_to_target": best, "pyhessian_over_lanczos": speedup,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    with open(args.json_out, "w", encoding="utf-8") as f:
        f.write(json.dumps(report, indent=2) + "\n")
    print(f"# time to max rel error <= {args.target:g}: {json.dumps(best)}; PyHessian / Lanczos = {speedup}")
    print(f"# wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
