"""Micro-benchmark of the Triton LAMB/LARS passes alone (GPU only).

Times LAMB (pass 1 + reductions + pass 2) and LARS (norm pass + reductions + pass 2) on fp32 tensors with
CUDA events, and reports the effective bandwidth against the modelled traffic (LAMB 40 B/param, LARS
28 B/param) and against a device-to-device copy measured in the same run. Variants: work-item size and warps,
16-byte aligned tensors (separate allocations) vs. views of one flat buffer at odd offsets (ZeRO-style), and
the foreach backend on the same tensors for comparison.

    python benchmarks/triton_kernels.py --numel 100000000 --tensors 300
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=100_000_000)
    ap.add_argument("--tensors", type=int, default=300)
    ap.add_argument("--blocks", default="1024,2048,4096")
    ap.add_argument("--warps", default="4,8")
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
    copy_s = _time(lambda: dst.copy_(big), args.iters)
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
        variants = [(f"triton b{b} w{w}", TritonKernels(dev, block=b, num_warps=w))
                    for b in map(int, args.blocks.split(",")) for w in map(int, args.warps.split(","))]
        variants.append(("foreach", ForeachKernels()))
        for name, k in variants:
            for opt, fn, bpp in (("LAMB", lamb_step, 40), ("LARS", lars_step, 28)):
                seg = lamb_seg if opt == "LAMB" else lars_seg
                s = _time(lambda: fn(k, seg), args.iters)
                bw = bpp * n / s
                row = dict(opt=opt, kernels=name, aligned=aligned, ms=s * 1e3, GBps=bw / 1e9,
                           of_copy=bw / copy_bw)
                results["runs"].append(row)
                print(f"{opt:4s} {'aligned' if aligned else 'odd-offset':10s} {name:16s} {s * 1e3:8.3f} ms "
                      f"{bw / 1e9:7.0f} GB/s (model {bpp} B/param) = {100 * bw / copy_bw:5.1f}% of copy")
        del p, g, m, v, lamb_seg, lars_seg
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
