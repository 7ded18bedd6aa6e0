"""Micro-benchmark of the Triton LAMB/LARS passes alone (GPU only).

Times LAMB (pass 1 + reductions + pass 2) and LARS (norm pass + reductions + pass 2) on fp32 tensors and
reports the effective bandwidth against the modelled traffic (LAMB 40 B/param, LARS 28 B/param) and against a
device-to-device copy measured in the same run. Three numbers per case: ``gpu`` (one step replayed from a CUDA
graph: kernel time only), ``stream`` (20 steps issued back to back between two events: what a training loop
sees when the host keeps ahead) and ``host`` (Python time to issue one step). Variants: work-item size
(block x chunks) and warps, 16-byte aligned tensors (separate allocations) vs. views of one flat buffer at odd
offsets (ZeRO-style), and the foreach backend on the same tensors.

    python benchmarks/triton_kernels.py --numel 100000000 --tensors 300
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def _sizes(total: int, n: int, gen) -> list:
    w = torch.rand(n, generator=gen, dtype=torch.float64) + 0.05
    sizes = (w / w.sum() * total).long().clamp_min(1)
    sizes[0] += total - int(sizes.sum())
    return sizes.tolist()


def _tensors(sizes, aligned: bool, device, gen_scale=1.0):
    if aligned:
        return [torch.randn(n, device=device) * gen_scale for n in sizes]
    flat = torch.randn(sum(sizes) + len(sizes), device=device) * gen_scale
    out, off = [], 1  # odd element offsets: 4-byte but not 16-byte aligned views
    for n in sizes:
        out.append(flat[off:off + n])
        off += n + 1
    return out


def _time(fn, iters: int) -> float:
    """Median GPU time of one call, each timed alone (host overhead included)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return statistics.median(times)


def _stream_and_host(fn, iters: int):
    """(GPU time per call with calls issued back to back, host time per call)."""
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - t0) / iters
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e-3 / iters, host


def _graph_time(fn, iters: int):
    """GPU time of one call replayed from a CUDA graph (no host work), or None if capture fails."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # noqa: BLE001 - report and go on
        print(f"  (graph capture failed: {exc!r})")
        return None
    return _time(graph.replay, iters)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=100_000_000)
    ap.add_argument("--tensors", type=int, default=300)
    ap.add_argument("--variants", default="1024x1w4,2048x1w4,2048x1w8,1024x4w4,2048x2w8,2048x4w8,4096x1w8",
                    help="block x chunks w warps, comma separated")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 1

    from ds_conadv.kernels.triton import TritonKernels
    from ds_conadv.optim._foreach import ForeachKernels
    from ds_conadv.optim.functional import Segments, bias_corrections

    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    sizes = _sizes(args.numel, args.tensors, gen)
    n = args.numel
    results = {"device": torch.cuda.get_device_name(), "numel": n, "tensors": args.tensors, "runs": []}

    big = torch.empty(n * 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(big)
    copy_s = _time(lambda: dst.copy_(big), args.iters)  # noqa: F821 (run before the del below)
    copy_bw = 2 * big.numel() * 4 / copy_s
    results["copy_GBps"] = copy_bw / 1e9
    print(f"{results['device']}: {n:.3g} params in {args.tensors} tensors; D2D copy {copy_bw / 1e9:.0f} GB/s")
    del big, dst

    steps = torch.full((len(sizes),), 2.0, device=dev)
    bc1, bc2 = bias_corrections(steps, 0.9, 0.999, True)
    step_size = torch.full((len(sizes),), 1e-3, device=dev)
    ratio = torch.full((len(sizes),), 1e-3, device=dev)
    coef = torch.tensor(0.5, device=dev)
    skip = torch.tensor(False, device=dev)

    def lamb_step(k, seg):
        k.lamb_phase1(seg, grad_coef=coef, bc1=bc1, bc2=bc2, beta1=0.9, beta2=0.999, beta3=0.1, eps=1e-6,
                      weight_decay=0.01, adam_w_mode=True, skip=skip)
        k.lamb_phase2(seg, step_size=step_size, bc1=bc1, bc2=bc2, eps=1e-6, weight_decay=0.01, adam_w_mode=True,
                      skip=skip)

    def lars_step(k, seg):
        k.lars_phase1(seg, grad_coef=coef, skip=skip)
        k.lars_phase2(seg, grad_coef=coef, ratio=ratio, lr=0.1, weight_decay=1e-4, momentum=0.9, dampening=0.0,
                      nesterov=False, skip=skip)

    for aligned in (True, False):
        p = _tensors(sizes, aligned, dev)
        g = _tensors(sizes, aligned, dev, 1e-2)
        m = _tensors(sizes, aligned, dev, 1e-3)
        v = [x.square() for x in _tensors(sizes, aligned, dev, 1e-3)] if aligned else _tensors(sizes, aligned, dev)
        if not aligned:
            for x in v:
                x.square_()
        lamb_seg = Segments(p, g, [m, v], steps)
        lars_seg = Segments(p, g, [m], steps)
        variants = []
        for spec in args.variants.split(","):
            bc, w = spec.split("w")
            b, c = bc.split("x")
            variants.append((f"triton {spec}", TritonKernels(dev, block=int(b), chunks=int(c), num_warps=int(w))))
        variants.append(("foreach", ForeachKernels()))
        for name, k in variants:
            for opt, fn, bpp in (("LAMB", lamb_step, 40), ("LARS", lars_step, 28)):
                seg = lamb_seg if opt == "LAMB" else lars_seg
                step = (lambda fn=fn, k=k, seg=seg: fn(k, seg))
                stream, host = _stream_and_host(step, args.iters)
                gpu = _graph_time(step, args.iters) if name != "foreach" else None
                best = gpu if gpu is not None else stream
                row = dict(opt=opt, kernels=name, aligned=aligned, gpu_ms=None if gpu is None else gpu * 1e3,
                           stream_ms=stream * 1e3, host_ms=host * 1e3, GBps=bpp * n / best / 1e9,
                           of_copy=bpp * n / best / copy_bw)
                results["runs"].append(row)
                gpu_txt = "   n/a  " if gpu is None else f"{gpu * 1e3:8.3f}"
                print(f"{opt:4s} {'aligned' if aligned else 'odd-offset':10s} {name:18s} gpu {gpu_txt} ms "
                      f"stream {stream * 1e3:8.3f} ms host {host * 1e3:6.3f} ms | {row['GBps']:6.0f} GB/s "
                      f"(model {bpp} B/param) = {100 * row['of_copy']:5.1f}% of copy", flush=True)
        del p, g, m, v, lamb_seg, lars_seg
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
