#!/usr/bin/env python
"""Where the CPU LAMB/LARS step time goes: each pass of the C++ kernels timed alone against torch's fused CPU
AdamW / SGD-momentum kernels on the same tensors, with the bytes each reads and writes.

    python benchmarks/cpu_passes.py --threads 1 [--paramset bert-large --scale 0.1] [--window N]

Per pass: median ms, then GB/s read (the bytes a pass must read / time) and GB/s moved (read + written). On a
machine whose cores are limited by how fast they can *read* (writes drain in the background), the step-time ratio
follows the read bytes: LAMB reads g, p, m, v then p, m, v (28 B/param fp32) against AdamW's g, p, m, v (16 B);
LARS reads g, p then g, p, buf (20 B) against SGD-momentum's g, p, buf (12 B).

``--window N``: run both LAMB passes per window of about N parameters (whole tensors) instead of over the whole
set at once, to see whether the second pass finds the first pass's data in the cache.
Results go to ``benchmarks/results/cpu_passes-<paramset>-t<threads>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from optim_step import PARAMSETS, scaled_shapes  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paramset", default="resnet50", choices=sorted(PARAMSETS))
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--window", type=int, default=0)
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args(argv)
    from ds_conadv.kernels.cpu import load

    ext = load()
    torch.set_num_threads(args.threads)
    shapes = scaled_shapes(PARAMSETS[args.paramset](), args.scale)
    P = [torch.randn(s).view(-1) * 0.05 for s in shapes]
    G = [torch.randn_like(p) * 1e-3 for p in P]
    M, V = [torch.zeros_like(p) for p in P], [torch.zeros_like(p) for p in P]
    P2, M2, V2 = [p.clone() for p in P], [torch.zeros_like(p) for p in P], [torch.zeros_like(p) for p in P]
    steps = [torch.tensor(5.0) for _ in P]
    n, N = len(P), sum(p.numel() for p in P)
    bc1, bc2, tiny = torch.full((n,), 0.5), torch.full((n,), 0.01), torch.full((n,), 1e-7)
    windows = [list(range(n))]
    if args.window:
        windows, cur, size = [], [], 0
        for i, p in enumerate(P):
            if cur and size + p.numel() > args.window:
                windows.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += p.numel()
        windows.append(cur)

    def lamb_windows():
        for w in windows:
            k = len(w)
            sub = lambda ts: [ts[i] for i in w]  # noqa: E731
            ext.lamb_phase1(sub(P), sub(G), sub(M), sub(V), None, k, None, bc1[:k], bc2[:k], 0.9, 0.999, 0.1, 1e-6,
                            0.01, True, None)
            ext.lamb_phase2(sub(P), sub(M), sub(V), [], None, k, tiny[:k], bc1[:k], bc2[:k], 1e-6, 0.01, True, None)

    passes = {  # name: (fn, bytes read per param, bytes written per param)
        "lamb_pass1": (lambda: ext.lamb_phase1(P, G, M, V, None, n, None, bc1, bc2, 0.9, 0.999, 0.1, 1e-6, 0.01,
                                               True, None), 16, 8),
        "lamb_pass2": (lambda: ext.lamb_phase2(P, M, V, [], None, n, tiny, bc1, bc2, 1e-6, 0.01, True, None), 12, 4),
        "lamb_both_windowed": (lamb_windows, 28, 12),
        "adamw_fused": (lambda: torch._fused_adamw_(P2, G, M2, V2, [], steps, lr=1e-7, beta1=0.9, beta2=0.999,
                                                    weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False),
                        16, 12),
        "lars_pass1": (lambda: ext.lars_phase1(P, G, None, n, None), 8, 0),
        "lars_pass2": (lambda: ext.lars_phase2(P, G, M, [], torch.stack(steps), None, n, None, tiny, 1e-7, 1e-4, 0.9,
                                               0.0, False, None), 12, 8),
        "sgd_fused": (lambda: torch._fused_sgd_(P2, G, V2, weight_decay=1e-4, momentum=0.9, lr=1e-7, dampening=0.0,
                                                nesterov=False, maximize=False, is_first_step=False), 12, 8),
    }
    if not args.window:
        passes.pop("lamb_both_windowed")
    times = {k: [] for k in passes}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for name, (fn, _, _) in passes.items():
            fn()
            for _ in range(args.reps):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    out = {}
    for name, (fn, rd, wr) in passes.items():
        med = statistics.median(times[name])
        out[name] = {"median_ms": med * 1e3, "read_gbps": rd * N / med / 1e9, "moved_gbps": (rd + wr) * N / med / 1e9,
                     "read_bytes_per_param": rd, "written_bytes_per_param": wr}
        print(f"  {name:<20} {med * 1e3:8.2f} ms  read {out[name]['read_gbps']:6.1f} GB/s  moved "
              f"{out[name]['moved_gbps']:6.1f} GB/s", flush=True)
    lamb = out["lamb_pass1"]["median_ms"] + out["lamb_pass2"]["median_ms"]
    lars = out["lars_pass1"]["median_ms"] + out["lars_pass2"]["median_ms"]
    summary = {"lamb_over_adamw": lamb / out["adamw_fused"]["median_ms"],
               "lars_over_sgd": lars / out["sgd_fused"]["median_ms"],
               "read_model_lamb_over_adamw": 28 / 16, "read_model_lars_over_sgd": 20 / 12}
    if args.window:
        summary["lamb_windowed_over_adamw"] = out["lamb_both_windowed"]["median_ms"] / out["adamw_fused"]["median_ms"]
    print("  " + json.dumps({k: round(v, 3) for k, v in summary.items()}))
    report = {"benchmark": "cpu_passes", "paramset": args.paramset, "scale": args.scale, "threads": args.threads,
              "n_params": N, "window": args.window, "machine_label": "2-core CPU (shared)", "torch": torch.__version__,
              "load_avg": {"before": list(load_before), "after": list(os.getloadavg())}, "passes": out,
              "summary": summary}
    path = args.json_out or os.path.join(HERE, "results", f"cpu_passes-{args.paramset}-t{args.threads}"
                                         + (f"-w{args.window}" if args.window else "") + ".json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(report, indent=2) + "\n")
    print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
