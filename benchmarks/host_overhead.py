#!/usr/bin/env python
"""Host (Python) time of one ``optimizer.step()`` with no-op kernels.

The kernel set is replaced by one whose passes do no element-wise work (they return zero sums of the right
shape), so what is timed is everything else a step does per call: collecting params, grads and state,
building the segment lists, the per-group scalar formulas (bias corrections, trust ratios) and the calls
into the kernel set. This is the part of a step that a GPU cannot hide when the kernels are short (ResNet-50
on an H200), measured here on the CPU.

Parameter sets as in ``optim_step.py`` (tensor count kept, every tensor 1-D and scaled by ``--scale``, which
does not matter with no-op kernels). ``--steps`` timed steps after ``--warmup``; median and percentiles
reported; the JSON goes to ``benchmarks/results/host_overhead-<paramset>.json`` and, with ``--markdown``, a
marked section of that file is written or replaced.

    python benchmarks/host_overhead.py --paramset resnet50
    python benchmarks/host_overhead.py --paramset bert-large --markdown docs/benchmarks.md

``--before DIR --rounds N``: N rounds, each one process of the code in DIR (e.g. an earlier commit from
``git archive``, with ``ds_conadv/kernels`` linked to its ``kernels/``) and one of this checkout, alternating, so
that the machine's load hits both alike; the JSON (``host_overhead-<paramset>-<dtype>[-zero]-before-after.json``)
holds every round and the median over rounds of each side's median.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")


def _optim_step_module():
    spec = importlib.util.spec_from_file_location("_ds_conadv_bench_optim_step", os.path.join(HERE, "optim_step.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


class NoopKernels:
    """A kernel set that does no element-wise work: sums are zeros of the right shape and dtype."""

    name = "noop"

    def sumsq(self, tensors, seg_ids, num_ids, coef=None, dtype=torch.float32):
        return torch.zeros(num_ids, dtype=dtype)

    def lamb_phase1(self, seg, **kw):
        return torch.zeros(seg.num_ids, 2, dtype=torch.float32)

    def lamb_phase2(self, seg, **kw):
        return None

    def lars_phase1(self, seg, **kw):
        return torch.zeros(seg.num_ids, 2, dtype=torch.float32)

    def lars_phase2(self, seg, **kw):
        return None


def install_noop_kernels(backend: str = "cpp") -> None:
    """Make ``backend`` on CPU resolve to :class:`NoopKernels` in this process."""
    from ds_conadv.optim import backends

    backends._cache[(backend, "cpu")] = NoopKernels()


def time_steps(opt, steps: int, warmup: int) -> List[float]:
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        times.append((time.perf_counter() - t0) * 1e6)
    return times


def run(args) -> Dict:
    bench = _optim_step_module()
    torch.set_num_threads(args.threads)
    install_noop_kernels("cpp")
    from ds_conadv.optim import LAMB, LARS

    shapes = bench.scaled_shapes(bench.PARAMSETS[args.paramset](), args.scale)
    dtype = {"fp32": torch.float32, "bf16-master": torch.bfloat16}[args.dtype]
    results = []
    load_before = os.getloadavg()
    for name in args.optimizers.split(","):
        if args.zero_layout:  # one flat partition cut into a segment per original tensor, as under ZeRO
            sizes = [int(torch.Size(s).numel()) for s in shapes]
            params = [torch.zeros(sum(sizes), dtype=dtype, requires_grad=True)]
        else:
            params = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in shapes]
        for p in params:
            p.grad = torch.zeros_like(p)
        kw = {"backend": "cpp", "master_weights": dtype != torch.float32}
        opt = LAMB(params, lr=1e-3, weight_decay=0.01, **kw) if name == "LAMB" else \
            LARS(params, lr=0.1, momentum=0.9, weight_decay=1e-4, **kw)
        if args.zero_layout:
            from ds_conadv.optim import SegmentLayout

            offsets = [sum(sizes[:i]) for i in range(len(sizes))]
            opt.set_segment_layout(0, SegmentLayout([[(o, n, i) for i, (o, n) in enumerate(zip(offsets, sizes))]],
                                                    len(sizes)))
        times = time_steps(opt, args.steps, args.warmup)
        q = statistics.quantiles(times, n=10)
        r = {"name": name, "median_us": statistics.median(times), "p10_us": q[0], "p90_us": q[-1],
             "min_us": min(times), "steps": args.steps}
        results.append(r)
        print(f"  {name:<5} {len(shapes)} tensors: median {r['median_us']:8.1f} us  p10 {r['p10_us']:8.1f}  "
              f"p90 {r['p90_us']:8.1f}", flush=True)
    report = {
        "benchmark": "host_overhead", "paramset": args.paramset, "zero_layout": args.zero_layout,
        "n_tensors": len(shapes), "dtype": args.dtype,
        "threads": args.threads, "machine_label": args.machine_label, "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_avg": {"before": list(load_before), "after": list(os.getloadavg())}, "results": results,
    }
    if not args.no_json:
        tag = f"{args.paramset}-{args.dtype}{'-zero' if args.zero_layout else ''}"
        out = args.json_out or os.path.join(RESULTS_DIR, f"host_overhead-{tag}.json")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            f.write(json.dumps(report, indent=2) + "\n")
        print(f"# wrote {out}")
    return report


def compare(args) -> Dict:
    """Alternate processes of the code in ``args.before`` and of this checkout (see the module docstring)."""
    import subprocess
    import tempfile

    rounds: Dict[str, List[Dict]] = {"before": [], "after": []}
    load_before = os.getloadavg()
    argv = ["--paramset", args.paramset, "--dtype", args.dtype, "--scale", str(args.scale), "--optimizers",
            args.optimizers, "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if args.zero_layout:
        argv.append("--zero-layout")
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for side in ("before", "after"):
                env = dict(os.environ)
                script = os.path.abspath(__file__)
                if side == "before":
                    env["PYTHONPATH"] = os.path.abspath(args.before)
                    script = os.path.join(os.path.abspath(args.before), "benchmarks", "host_overhead.py")
                out = os.path.join(tmp, f"{side}.json")
                subprocess.run([sys.executable, script, "--json", out] + argv, env=env, cwd=tmp, check=True,
                               capture_output=True, timeout=900)
                with open(out, encoding="utf-8") as f:
                    rounds[side].append(json.load(f))
    summary = {}
    for side, reports in rounds.items():
        for name in args.optimizers.split(","):
            medians = [r["median_us"] for rep in reports for r in rep["results"] if r["name"] == name]
            p10s = [r["p10_us"] for rep in reports for r in rep["results"] if r["name"] == name]
            summary[f"{side}/{name}"] = {"median_of_medians_us": statistics.median(medians),
                                         "min_of_medians_us": min(medians), "median_p10_us": statistics.median(p10s)}
            print(f"  {side:<6} {name:<5} median of medians {statistics.median(medians):8.1f} us  "
                  f"min {min(medians):8.1f}  median p10 {statistics.median(p10s):8.1f}", flush=True)
    report = {"benchmark": "host_overhead-before-after", "paramset": args.paramset, "dtype": args.dtype,
              "zero_layout": args.zero_layout, "rounds": args.rounds, "steps": args.steps, "before": args.before,
              "machine_label": args.machine_label, "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "load_avg": {"before": list(load_before), "after": list(os.getloadavg())}, "summary": summary,
              "per_round": rounds}
    tag = f"{args.paramset}-{args.dtype}{'-zero' if args.zero_layout else ''}-before-after"
    out = args.json_out or os.path.join(RESULTS_DIR, f"host_overhead-{tag}.json")
    if not args.no_json:
        with open(out, "w", encoding="utf-8") as f:
            f.write(json.dumps(report, indent=2) + "\n")
        print(f"# wrote {out}")
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paramset", default="resnet50", choices=["resnet50", "bert-large"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16-master"])
    p.add_argument("--scale", type=float, default=1e-3)
    p.add_argument("--optimizers", default="LAMB,LARS")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--zero-layout", action="store_true",
                   help="one flat param cut into one segment per tensor (the ZeRO layout)")
    p.add_argument("--machine-label", default="2-core CPU (shared)")
    p.add_argument("--before", default=None, help="a folder holding the code to compare with (see above)")
    p.add_argument("--rounds", type=int, default=5, help="with --before: alternating rounds")
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--no-json", action="store_true")
    a = p.parse_args(argv)
    if a.steps < 2 or a.warmup < 0:
        p.error("--steps must be >= 2 and --warmup >= 0")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.before:
        compare(args)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
