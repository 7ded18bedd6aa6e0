#!/usr/bin/env python
"""ZeRO-Offload optimizer step on the offloaded fp32 partition: our LAMB/LARS (fused C++ CPU kernels) against
DeepSpeed's ``DeepSpeedCPUAdam``, in the same run.

Under ``"offload_optimizer": {"device": "cpu"}`` DeepSpeed's ZeRO 1/2 hands the optimizer one flat fp32 CPU tensor
per param group: this rank's partition, cut through tensors at arbitrary offsets, with its flat fp32 gradient. This
benchmark builds exactly that for rank 0 of ``--world`` data-parallel ranks over a real model's parameter shapes
(``--paramset``, from ``optim_step.py``) and times ``optimizer.step()`` on it:

* ``DeepSpeedCPUAdam`` -- the anchor: DeepSpeed's offload-grade AdamW (its ``cpu_adam`` op, JIT-built on first use;
  one pass, 28 B/param: read p, g, m, v, write p, m, v);
* ``LAMB[cpp]`` / ``LARS[cpp]`` -- ours, with the partition's segment layout (one segment per tensor fragment,
  whole-tensor trust ratios) as ``ds_conadv.initialize`` attaches it, default settings (``skip_nonfinite`` on:
  one extra read of the gradient and, in a real run, one small all-reduce); two passes, LAMB 40 + 4 B/param,
  LARS 28 + 4 B/param;
* the same with ``skip_nonfinite=False`` (DeepSpeed's ZeRO 1/2 checks overflow itself before the step);
* ``AdamW(fused)`` -- torch's fused CPU AdamW on the same flat tensor, for scale.

Steps are interleaved: ``--rounds`` rounds, each running every contender ``--steps-per-round`` steps after two
warm-up steps, so machine load hits all alike; the median and minimum per-step time are reported, with the
ratio to ``DeepSpeedCPUAdam`` (medians) and the bytes each step must move. The load average before and after is
recorded. The single-process benchmark has no all-reduce: the trust-ratio sums are ``[tensors, 2]`` floats.

Example::

    python benchmarks/offload_step.py --paramset resnet50 --threads 1 2 --markdown docs/deepspeed.md
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
from typing import Callable, Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ANCHOR = "DeepSpeedCPUAdam"
MARK = "offload_step"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paramset", default="resnet50", choices=["resnet50", "bert-large"])
    p.add_argument("--scale", type=float, default=1.0, help="shrink every tensor's numel by this factor")
    p.add_argument("--world", type=int, default=2, help="data-parallel ranks (the partition is rank 0's share)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="CPU thread counts (torch's and DeepSpeed's OpenMP pool), each timed in the same run")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--machine-label", default=None, help='e.g. "2-core CPU, shared with other jobs"')
    p.add_argument("--json", dest="json_out", default=os.path.join(HERE, "results", "offload_step.json"))
    p.add_argument("--markdown", default=None, help="replace the benchmark's marked section of this docs page")
    return p.parse_args(argv)


def partition(shapes: List[Tuple[int, ...]], world: int, rank: int = 0):
    """Rank ``rank``'s slice of the flattened params, as ZeRO 1/2 cuts it: ``(numel, [(offset, numel, id)])``."""
    import math

    sizes = [math.prod(s) for s in shapes]
    total = sum(sizes)
    per = -(-total // world)  # ZeRO pads the flat buffer to a multiple of the world size
    lo, hi = rank * per, min(total, (rank + 1) * per)
    fragments, start = [], 0
    for index, n in enumerate(sizes):
        a, b = max(lo, start), min(hi, start + n)
        if a < b:
            fragments.append((a - lo, b - a, index))
        start += n
    return per, fragments, len(sizes)


def contenders(numel: int, fragments, num_ids: int) -> Dict[str, Callable]:
    import torch

    from ds_conadv.optim import LAMB, LARS, SegmentLayout

    def flat_param(seed: int):
        gen = torch.Generator().manual_seed(seed)
        p = torch.nn.Parameter(torch.randn(numel, generator=gen) * 0.05)
        p.grad = torch.randn(numel, generator=gen) * 1e-3
        return p

    def ours(cls, **kw):
        def make():
            p = flat_param(1)
            opt = cls([p], backend="cpp", **kw)
            opt.set_segment_layout(0, SegmentLayout([fragments], num_ids, None))
            opt.mark_attached()
            return opt
        return make

    def ds_adam():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam([flat_param(1)], lr=1e-3, weight_decay=0.01, adamw_mode=True)

    def torch_adamw():
        return torch.optim.AdamW([flat_param(1)], lr=1e-3, weight_decay=0.01, fused=True)

    return {
        ANCHOR: ds_adam,
        "LAMB[cpp]": ours(LAMB, lr=1e-3, weight_decay=0.01),
        "LAMB[cpp], skip_nonfinite=False": ours(LAMB, lr=1e-3, weight_decay=0.01, skip_nonfinite=False),
        "LARS[cpp]": ours(LARS, lr=0.1, momentum=0.9, weight_decay=1e-4),
        "LARS[cpp], skip_nonfinite=False": ours(LARS, lr=0.1, momentum=0.9, weight_decay=1e-4, skip_nonfinite=False),
        "AdamW(fused)": torch_adamw,
    }


#: bytes a step must move per parameter (fp32): reads and writes of param, gradient and state per pass
BYTES_PER_PARAM = {ANCHOR: 28, "LAMB[cpp]": 44, "LAMB[cpp], skip_nonfinite=False": 40, "LARS[cpp]": 32,
                   "LARS[cpp], skip_nonfinite=False": 28, "AdamW(fused)": 28}


#: the C++ kernel calls of one step, timed per call (the per-pass breakdown of the step)
KERNEL_CALLS = ("sumsq", "lamb_phase1", "lamb_phase2", "lars_phase1", "lars_phase2")
PASS_LABELS = {"sumsq": "inf/NaN check (read g)", "lamb_phase1": "LAMB pass 1 (read g, p, m, v; write m, v)",
               "lamb_phase2": "LAMB pass 2 (read p, m, v; write p)",
               "lars_phase1": "LARS pass 1 (read g, p)", "lars_phase2": "LARS pass 2 (read g, p, buf; write p, buf)"}


def time_kernel_calls(kernels) -> Dict[str, List[float]]:
    """Wrap the kernel set's calls so that each call's wall time lands in the returned dict (per call name;
    the caller clears it between contenders). The wrappers are instance attributes: the class is untouched."""
    spent: Dict[str, List[float]] = {}
    for name in KERNEL_CALLS:
        original = getattr(kernels, name)

        def timed(*a, _original=original, _name=name, **kw):
            t = time.perf_counter()
            try:
                return _original(*a, **kw)
            finally:
                spent.setdefault(_name, []).append(time.perf_counter() - t)

        setattr(kernels, name, timed)
    return spent


def machine(threads: int) -> Dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": threads, "cpu_count": os.cpu_count(), "cpu": platform.processor() or "unknown"}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def run(args) -> Dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, REPO)
    sys.path.insert(0, HERE)
    import deepspeed
    import torch
    from optim_step import PARAMSETS, scaled_shapes

    from ds_conadv.optim.backends import get_kernels

    shapes = scaled_shapes(PARAMSETS[args.paramset](), args.scale)
    numel, fragments, num_ids = partition(shapes, args.world)
    t = time.perf_counter()
    from deepspeed.ops.op_builder import CPUAdamBuilder

    CPUAdamBuilder().load()  # JIT build (minutes) or load from the cache, outside the timing
    build_s = time.perf_counter() - t
    kernels = get_kernels("cpp", torch.device("cpu"))
    if kernels.name != "cpp":
        raise RuntimeError("the C++ kernels did not load")
    spent = time_kernel_calls(kernels)
    makers = contenders(numel, fragments, num_ids)
    opts = {name: make() for name, make in makers.items()}
    load_before = os.getloadavg()
    results: Dict[str, Dict] = {}
    for threads in args.threads:
        # torch.set_num_threads sets the OpenMP pool size that DeepSpeed's cpu_adam op (libgomp) uses too
        torch.set_num_threads(threads)
        for opt in opts.values():
            for _ in range(2):
                opt.step()
        times: Dict[str, List[float]] = {name: [] for name in opts}
        calls: Dict[str, Dict[str, List[float]]] = {name: {} for name in opts}
        for _ in range(args.rounds):
            for name, opt in opts.items():
                for _ in range(args.steps_per_round):
                    spent.clear()
                    t = time.perf_counter()
                    opt.step()
                    times[name].append(time.perf_counter() - t)
                    for call, values in spent.items():  # one step's time in each kernel call
                        calls[name].setdefault(call, []).append(sum(values))
        anchor = statistics.median(times[ANCHOR])
        rows = {}
        for name, values in times.items():
            med = statistics.median(values)
            rows[name] = {"median_s": med, "min_s": min(values), "ratio_vs_anchor": med / anchor,
                          "bytes_per_param": BYTES_PER_PARAM[name],
                          "gb_per_s": BYTES_PER_PARAM[name] * numel / med / 1e9,
                          "kernel_calls_median_s": {c: statistics.median(v) for c, v in calls[name].items()}}
        results[str(threads)] = rows
    load_after = os.getloadavg()
    return {
        "benchmark": "offload_step", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(args.threads), "threads": args.threads, "machine_label": args.machine_label,
        "deepspeed": deepspeed.__version__, "paramset": args.paramset, "scale": args.scale, "world": args.world,
        "partition_numel": numel, "fragments": len(fragments), "tensors": num_ids,
        "rounds": args.rounds, "steps_per_round": args.steps_per_round, "cpu_adam_build_or_load_s": build_s,
        "load_avg": {"before": list(load_before), "after": list(load_after)}, "by_threads": results,
    }


def markdown(report: Dict) -> str:
    m = report["machine"]
    where = report.get("machine_label") or f"CPU {m['cpu']}"
    load = report["load_avg"]
    threads = list(report["by_threads"])
    lines = [f"<!-- {MARK}:BEGIN -->",
             f"{where} ({m['cpu']}, {m['cpu_count']} cores); load average {load['before'][0]:.1f} before, "
             f"{load['after'][0]:.1f} after; torch {m['torch']}, DeepSpeed {report['deepspeed']}; rank 0's partition "
             f"of {report['paramset']} over {report['world']} ranks ({report['partition_numel']:,} fp32 elements, "
             f"{report['fragments']} tensor fragments); per thread count {report['rounds']} interleaved rounds of "
             f"{report['steps_per_round']} steps; median ms per step (ratio to {ANCHOR}); {report['date'][:10]} "
             "(`benchmarks/offload_step.py`, `benchmarks/results/offload_step.json`).",
             "",
             "| step on the offloaded partition | B/param | "
             + " | ".join(f"{t} thread{'s' if t != '1' else ''}" for t in threads) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in threads) + " |"]
    for name in report["by_threads"][threads[0]]:
        cells = []
        for t in threads:
            r = report["by_threads"][t][name]
            cells.append(f"{1e3 * r['median_s']:.1f} ({r['ratio_vs_anchor']:.2f})")
        lines.append(f"| {name} | {BYTES_PER_PARAM[name]} | " + " | ".join(cells) + " |")
    lines += ["", "Where a step's time goes (median ms per step in each C++ kernel call of the default LAMB and LARS "
              f"steps, the rest is host work; {ANCHOR}'s whole step for scale):", "",
              "| pass | " + " | ".join(f"{t} thread{'s' if t != '1' else ''}" for t in threads) + " |",
              "| --- | " + " | ".join("---:" for _ in threads) + " |"]
    for name in ("LAMB[cpp]", "LARS[cpp]"):
        for call in KERNEL_CALLS:
            if call not in report["by_threads"][threads[0]][name].get("kernel_calls_median_s", {}):
                continue
            cells = [f"{1e3 * report['by_threads'][t][name]['kernel_calls_median_s'][call]:.1f}" for t in threads]
            lines.append(f"| {name}: {PASS_LABELS[call]} | " + " | ".join(cells) + " |")
    cells = [f"{1e3 * report['by_threads'][t][ANCHOR]['median_s']:.1f}" for t in threads]
    lines.append(f"| {ANCHOR}, whole step (read p, g, m, v; write p, m, v) | " + " | ".join(cells) + " |")
    lines.append(f"<!-- {MARK}:END -->")
    return "\n".join(lines) + "\n"


def update_markdown(path: str, text: str) -> None:
    begin, end = f"<!-- {MARK}:BEGIN -->", f"<!-- {MARK}:END -->"
    old = open(path, encoding="utf-8").read()
    i, j = old.find(begin), old.find(end)
    if i < 0 or j < 0:
        raise SystemExit(f"{path} has no {begin} ... {end} section to replace")
    with open(path, "w", encoding="utf-8") as f:
        f.write(old[:i] + text + old[j + len(end) + 1:])


def main(argv=None) -> None:
    args = parse_args(argv)
    report = run(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    with open(args.json_out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    print(text)
    print(f"# wrote {args.json_out}")
    if args.markdown:
        update_markdown(args.markdown, text)
        print(f"# updated {args.markdown}")


if __name__ == "__main__":
    main()
