"""What the benchmark scripts share (all but optim_step.py, which keeps its own until its rework lands): the ConAdv
overlap benchmarks' model, batches, interleaved timing rounds, statistics, markdown table and report writer (the
DeepSpeed run ``conadv_overlap.py`` and the Horovod run ``conadv_overlap_horovod.py`` import them from here), and
:func:`update_markdown`, which replaces a marked section of a docs page."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

MODES = ("vanilla", "disadv", "conadv", "no_gen")
# the same engines with DeepSpeed's "overlap_comm": true (--overlap-comm, ZeRO 1/2)
OVERLAP_COMM_MODES = ("vanilla_oc", "conadv_oc", "no_gen_oc")
ALL_MODES = MODES + ("conadv_bwd",) + OVERLAP_COMM_MODES
MODELS = ("mlp", "resnet18", "resnet50")
# blocks per stage and the block type of the two ResNet shapes (He et al. 2016)
RESNET_SHAPES = {"resnet18": ((2, 2, 2, 2), "basic"), "resnet50": ((3, 4, 6, 3), "bottleneck")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--stage", type=int, default=2, choices=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=30, help="interleaved rounds (each: a few steps per mode)")
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--model", default="mlp", choices=MODELS,
                   help="mlp (vectors of 256), or a ResNet-18/50-shaped CNN on synthetic 3-channel images")
    p.add_argument("--width", type=int, default=None,
                   help="MLP hidden width (default 2048), or the ResNet's first-stage channels (default 64, the "
                        "standard ResNet); sets the gradient size")
    p.add_argument("--image-size", type=int, default=32, help="image side in pixels (ResNet models)")
    p.add_argument("--batch", type=int, default=16, help="micro batch per rank (sets the generation cost)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--attack", default="fgsm", choices=["fgsm", "pgd"])
    p.add_argument("--pgd-steps", type=int, default=3, help="PGD steps (with --attack pgd)")
    p.add_argument("--compare-start", action="store_true",
                   help="also time ConAdv with the generation started with the backward (mode conadv_bwd)")
    p.add_argument("--overlap-comm", action="store_true",
                   help='also time vanilla, ConAdv and no_gen with DeepSpeed\'s "overlap_comm": true (ZeRO 1/2; '
                        "modes vanilla_oc, conadv_oc, no_gen_oc)")
    p.add_argument("--reduce-bucket", type=int, default=None,
                   help="ZeRO 1/2 reduce_bucket_size in elements, for every engine of the run (default: "
                        "DeepSpeed's, which holds a ResNet-50's gradient in one bucket)")
    p.add_argument("--tag", default=None, help="names this variant in the JSON file name and docs section")
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--table", nargs="+", default=None, metavar="JSON",
                   help="print one markdown table summarising these result files, and exit")
    args = p.parse_args(argv)
    if args.width is None:
        args.width = default_width(args.model)
    return args


def _pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def modes_of(args):
    return (MODES + (("conadv_bwd",) if getattr(args, "compare_start", False) else ())
            + (OVERLAP_COMM_MODES if getattr(args, "overlap_comm", False) else ()))


def thread_times():
    """(seconds on a core, seconds runnable but waiting for a core), summed over this process's threads (the
    training thread, the backward worker, gloo's threads), from Linux's ``/proc/self/task/*/schedstat``; None
    elsewhere. The difference of two readings says how busy the process kept the cores and how long its work
    queued for one."""
    on_cpu = queued = 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat", encoding="ascii") as f:
                run, wait = f.read().split()[:2]
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
        on_cpu += int(run)
        queued += int(wait)
    return on_cpu * 1e-9, queued * 1e-9


def default_width(model):
    """The MLP's hidden width, or the ResNet's first-stage channels (64: the standard ResNet)."""
    return 2048 if model == "mlp" else 64


def _resnet(model, width, image_size, num_classes=10):
    """A torchvision-free ResNet-18/50 shape for synthetic ``3 x image_size x image_size`` images: stage widths
    ``width * (1, 2, 4, 8)`` (x4 at the output of a bottleneck), BatchNorm after every conv, projection shortcuts
    where the shape changes. Stem: 3x3 conv, stride 1 (CIFAR style) up to 64-pixel images, above that ImageNet's
    7x7/2 conv and 3x3/2 max-pool."""
    from torch import nn

    blocks, kind = RESNET_SHAPES[model]
    expansion = 4 if kind == "bottleneck" else 1

    def conv_bn(cin, cout, k, stride):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]

    class Block(nn.Module):
        def __init__(self, cin, mid, stride):
            super().__init__()
            cout = mid * expansion
            if kind == "basic":
                layers = conv_bn(cin, mid, 3, stride) + [nn.ReLU(inplace=True)] + conv_bn(mid, cout, 3, 1)
            else:
                layers = (conv_bn(cin, mid, 1, 1) + [nn.ReLU(inplace=True)] + conv_bn(mid, mid, 3, stride)
                          + [nn.ReLU(inplace=True)] + conv_bn(mid, cout, 1, 1))
            self.body = nn.Sequential(*layers)
            self.shortcut = (nn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout
                             else nn.Identity())
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.relu(self.body(x) + self.shortcut(x))

    if image_size <= 64:
        layers = conv_bn(3, width, 3, 1) + [nn.ReLU(inplace=True)]
    else:
        layers = conv_bn(3, width, 7, 2) + [nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    cin = width
    for i, n in enumerate(blocks):
        for j in range(n):
            layers.append(Block(cin, width * 2 ** i, 2 if i > 0 and j == 0 else 1))
            cin = width * 2 ** i * expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def overlap_model(args):
    """The benchmark's model (both backends), seeded: ``args.model`` ``mlp`` (256-width-width-10 with BatchNorm)
    or ``resnet18``/``resnet50`` (:func:`_resnet` at ``args.width`` and ``args.image_size``)."""
    import torch

    torch.manual_seed(0)
    if args.model != "mlp":
        return _resnet(args.model, args.width, args.image_size)
    width = args.width
    return torch.nn.Sequential(torch.nn.Linear(256, width), torch.nn.BatchNorm1d(width), torch.nn.ReLU(),
                               torch.nn.Linear(width, width), torch.nn.BatchNorm1d(width), torch.nn.ReLU(),
                               torch.nn.Linear(width, 10))


def overlap_model_params(args):
    """Its parameter count with dual BN (every BatchNorm has an adversarial twin), as the engines train it."""
    from ds_conadv.conadv import convert_dual_bn

    return sum(p.numel() for p in convert_dual_bn(overlap_model(args)).parameters())


def model_text(report):
    """The model in words, for the docs sections."""
    model, w = report.get("model", "mlp"), report["width"]
    if model == "mlp":
        return f"MLP 256-{w}-{w}-10 with BatchNorm"
    blocks, kind = RESNET_SHAPES[model]
    size = report["image_size"]
    return (f"ResNet-{model[6:]}-shaped CNN ({kind} blocks "
            f"{'-'.join(map(str, blocks))}, stage widths {w}-{2 * w}-{4 * w}-{8 * w}, BatchNorm), synthetic "
            f"3x{size}x{size} images, 10 classes")


def batch_stream(pool):
    """An endless iterator over pre-made batches: pulling a batch costs nothing in any mode (making random
    batches on the fly would be charged to the modes that pull one — all but no_gen — and bias the baseline)."""
    while True:
        yield from pool


def batch_pool(args, rank, device, n=8):
    import torch

    gen = torch.Generator().manual_seed(rank)
    shape = (256,) if args.model == "mlp" else (3, args.image_size, args.image_size)
    return [(torch.randn(args.batch, *shape, generator=gen).to(device),
             torch.randint(0, 10, (args.batch,), generator=gen).to(device)) for _ in range(n)]


def interleaved_rounds(step, generate, args, barrier, sync=lambda: None):
    """Per-round mean step time of every mode (and of one generation pass alone), the modes interleaved in each
    round so that machine noise hits all alike; two warm-up steps per mode first. Also per round and mode: this
    process's core seconds and run-queue seconds per step (:func:`thread_times`, under ``"sched"``). Shared with
    the Horovod run."""
    modes = modes_of(args)
    for mode in modes:
        for _ in range(2):
            step(mode)
    per_round = {m: [] for m in modes + ("gen",)}
    sched = {m: [] for m in modes + ("gen",)}

    def timed(name, fn):
        sync()
        before, t = thread_times(), time.perf_counter()
        for _ in range(args.steps_per_round):
            fn()
        sync()
        per_round[name].append((time.perf_counter() - t) / args.steps_per_round)
        after = thread_times()
        if before is not None and after is not None:
            sched[name].append([(a - b) / args.steps_per_round for a, b in zip(after, before)])

    for _ in range(args.rounds):
        for mode in modes:
            barrier()
            timed(mode, lambda: step(mode))
        timed("gen", generate)
    if any(sched.values()):
        per_round["sched"] = sched
    return per_round


# the per-step phases a DeepSpeed rank records (conadv_overlap.py), in the order of the breakdown table
PHASES = ("generation_sync", "forward", "backward_compute", "reduction", "generation_beside_reduction",
          "wait_reduction", "optimizer", "step")


def summarize(raw, args):
    ranks = raw["per_rank"]
    # a step is synchronous across ranks: use the slowest rank per round
    rounds = len(ranks[0]["vanilla"])
    modes = tuple(m for m in ALL_MODES if m in ranks[0])
    per_round = {m: [max(r[m][i] for r in ranks) for i in range(rounds)] for m in modes + ("gen",)}
    med = {m: statistics.median(v) for m, v in per_round.items()}
    exposed_rounds = [(c - n) / g for c, n, g in zip(per_round["conadv"], per_round["no_gen"], per_round["gen"])]
    ratios = {"conadv/vanilla": med["conadv"] / med["vanilla"], "disadv/vanilla": med["disadv"] / med["vanilla"],
              "no_gen/vanilla": med["no_gen"] / med["vanilla"]}
    summary = {
        "median_s": med,
        "p10_s": {m: _pct(v, 0.1) for m, v in per_round.items()},
        "p90_s": {m: _pct(v, 0.9) for m, v in per_round.items()},
        "exposed_fraction": (med["conadv"] - med["no_gen"]) / med["gen"],
        "exposed_fraction_p10_p90": [_pct(exposed_rounds, 0.1), _pct(exposed_rounds, 0.9)],
        **({"exposed_fraction_generation_with_backward": (med["conadv_bwd"] - med["no_gen"]) / med["gen"]}
           if "conadv_bwd" in med else {}),
        # the reduction (median over ranks' steps) must be at least the generation for full hiding to be possible
        "reduction_s": (statistics.median([v for r in ranks for v in r.get("reduction_s", [])])
                        if any(r.get("reduction_s") for r in ranks) else None),
        "ratios": ratios,
        "rounds": rounds, "steps_per_round": args.steps_per_round,
    }
    if "conadv_oc" in med:
        summary["exposed_fraction_overlap_comm"] = (med["conadv_oc"] - med["no_gen_oc"]) / med["gen"]
        ratios.update({"conadv_oc/vanilla_oc": med["conadv_oc"] / med["vanilla_oc"],
                       "vanilla_oc/vanilla": med["vanilla_oc"] / med["vanilla"],
                       "conadv_oc/vanilla": med["conadv_oc"] / med["vanilla"]})
    if all("sched" in r for r in ranks):
        # per rank and step: seconds on a core and seconds queued for one (medians over rounds and ranks);
        # cores_busy: both ranks' core seconds per step over the step's wall time (the slowest rank's)
        sched = {}
        for m in modes + ("gen",):
            cpu = statistics.median([v[0] for r in ranks for v in r["sched"][m]])
            queued = statistics.median([v[1] for r in ranks for v in r["sched"][m]])
            sched[m] = {"cpu_s": cpu, "runqueue_s": queued, "cores_busy": len(ranks) * cpu / med[m]}
        summary["sched"] = sched
    if all("allreduce_probe" in r for r in ranks):
        reps = [v for r in ranks for v in r["allreduce_probe"]]
        summary["allreduce_alone"] = {"wall_s": statistics.median(v[0] for v in reps),
                                      **({"cpu_s": statistics.median(v[1] for v in reps),
                                          "runqueue_s": statistics.median(v[2] for v in reps)}
                                         if all(len(v) == 3 for v in reps) else {})}
    if all("phases" in r for r in ranks):
        summary["phases_s"] = {m: {k: statistics.median([step.get(k, 0.0) for r in ranks for step in r["phases"][m]])
                                   for k in PHASES}
                               for m in modes if m in ranks[0]["phases"]}
    return summary


PHASE_LABELS = {
    "generation_sync": "generation before the forward (DisAdv; a first step)",
    "forward": "forward, clean + adversarial (training thread)",
    "backward_compute": "backward compute (worker thread; the training thread waits)",
    "reduction": "gradient reduction: DeepSpeed's backward epilogue (worker)",
    "generation_beside_reduction": "generation beside the reduction (training thread)",
    "wait_reduction": "training thread waits for the rest of the reduction",
    "optimizer": "optimizer step (DeepSpeed's engine.step)",
    "step": "whole step",
}


def markdown(report):
    s, m = report["summary"], report["machine"]
    key = report_key(report)
    ms = lambda v: f"{1e3 * v:.1f}"  # noqa: E731
    load = report.get("load_avg")
    sched = s.get("sched")
    lines = [f"<!-- conadv_overlap:BEGIN {key} -->",
             f"### ConAdv overlap, DeepSpeed ZeRO-{report['stage']}, {report['nproc']} ranks on {report['device']}"
             + (f", {report['model']}" if report.get("model", "mlp") != "mlp" else ""),
             "",
             f"{m['where']}; torch {m['torch']}; {model_text(report)} "
             f"({report['n_params']:,} params with dual BN, gradient {4 * report['n_params'] / 1e6:.0f} MB), micro "
             f"batch {report['batch']} per rank, {report.get('attack', 'fgsm')} attack"
             + (f", reduce_bucket_size {report['reduce_bucket']:,}" if report.get("reduce_bucket") else "")
             + f"; {s['rounds']} interleaved rounds of {s['steps_per_round']} steps; "
             f"per round the slowest rank counts; {report['date']}"
             + (f"; load average {load['before'][0]:.2f} before, {load['after'][0]:.2f} after" if load else "")
             + ".",
             ""]
    if sched:
        lines += ["| mode | median ms/step | p10 | p90 | ratio vs vanilla | on a core, ms per rank | "
                  "queued for a core, ms per rank | cores kept busy |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    else:
        lines += ["| mode | median ms/step | p10 | p90 | ratio vs vanilla |", "| --- | ---: | ---: | ---: | ---: |"]

    def cells(mode):
        if not sched:
            return ""
        c = sched[mode]
        return f" {ms(c['cpu_s'])} | {ms(c['runqueue_s'])} | {c['cores_busy']:.2f} |"

    for mode in [m for m in s["median_s"] if m != "gen"]:
        ratio = s["median_s"][mode] / s["median_s"]["vanilla"]
        lines.append(f"| {mode} | {ms(s['median_s'][mode])} | {ms(s['p10_s'][mode])} | {ms(s['p90_s'][mode])} | "
                     f"{ratio:.2f} |" + cells(mode))
    lines.append(f"| generation pass alone | {ms(s['median_s']['gen'])} | {ms(s['p10_s']['gen'])} | "
                 f"{ms(s['p90_s']['gen'])} | |" + cells("gen"))
    if s.get("reduction_s") is not None:
        lines.append(f"| reduction (DeepSpeed's backward epilogue, in no_gen) | {ms(s['reduction_s'])} | | | |"
                     + (" | | |" if sched else ""))
    probe = s.get("allreduce_alone")
    if probe:
        tail = ""
        if sched:
            tail = (f" {ms(probe['cpu_s'])} | {ms(probe['runqueue_s'])} | "
                    f"{report['nproc'] * probe['cpu_s'] / probe['wall_s']:.2f} |" if "cpu_s" in probe else " | | |")
        lines.append(f"| all_reduce of a gradient-sized tensor alone (gloo) | {ms(probe['wall_s'])} | | | |" + tail)
    lo, hi = s["exposed_fraction_p10_p90"]
    lines += ["", f"**Exposed adversarial fraction** (T_conadv − T_no_gen) / T_gen = **{s['exposed_fraction']:.2f}** "
              f"(per-round p10–p90: {lo:.2f} to {hi:.2f})."]
    if "exposed_fraction_generation_with_backward" in s:
        lines.append(f"With the generation started together with the backward (`conadv_bwd`): "
                     f"{s['exposed_fraction_generation_with_backward']:.2f}.")
    if "exposed_fraction_overlap_comm" in s:
        r = s["ratios"]
        lines.append(f"With DeepSpeed's `overlap_comm: true` (`*_oc`): exposed "
                     f"{s['exposed_fraction_overlap_comm']:.2f}, ConAdv {r['conadv_oc/vanilla_oc']:.2f}x its vanilla, "
                     f"whose step is {r['vanilla_oc/vanilla']:.2f}x the plain vanilla's.")
    phases = s.get("phases_s")
    if phases:
        cols = [c for c in phases if c != "conadv_bwd"]  # its generation runs beside the backward compute
        lines += ["", "Where a step's time goes (medians over both ranks' steps, ms; the worker thread's rows run "
                  "beside the training thread's):", "",
                  "| phase | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
        for k in PHASES:
            lines.append(f"| {PHASE_LABELS[k]} | " + " | ".join(ms(phases[c][k]) for c in cols) + " |")
    lines.append(f"<!-- conadv_overlap:END {key} -->")
    return "\n".join(lines) + "\n"


def summary_table(reports):
    """One row per result file: the configuration, median ms/step per mode, the exposed fractions and the
    step-time ratios against vanilla (with ``--overlap-comm``: ConAdv's exposed fraction and ratio against the
    vanilla engine that also has DeepSpeed's ``overlap_comm``)."""
    ms = lambda v: "" if v is None else f"{1e3 * v:.1f}"  # noqa: E731
    lines = ["| run | ZeRO | batch/rank | attack | vanilla | disadv | conadv | no_gen | conadv_bwd | T_gen | "
             "reduction | exposed (p10–p90) | exposed, gen. with backward | ConAdv/vanilla | DisAdv/vanilla | "
             "with overlap_comm: exposed, ConAdv/vanilla |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | "
             "---: |"]
    for r in reports:
        s, med = r["summary"], r["summary"]["median_s"]
        lo, hi = s["exposed_fraction_p10_p90"]
        bwd = s.get("exposed_fraction_generation_with_backward")
        oc = s.get("exposed_fraction_overlap_comm")
        oc_cell = "" if oc is None else f"{oc:.2f}, {s['ratios']['conadv_oc/vanilla_oc']:.2f}"
        run = r.get("tag") or (r["model"] if r.get("model", "mlp") != "mlp" else r["device"])
        lines.append(f"| {run} | {r['stage']} | {r['batch']} | {r.get('attack', 'fgsm')} | "
                     f"{ms(med['vanilla'])} | {ms(med['disadv'])} | {ms(med['conadv'])} | {ms(med['no_gen'])} | "
                     f"{ms(med.get('conadv_bwd'))} | {ms(med['gen'])} | {ms(s.get('reduction_s'))} | "
                     f"**{s['exposed_fraction']:.2f}** ({lo:.2f} to {hi:.2f}) | "
                     f"{'' if bwd is None else f'{bwd:.2f}'} | {med['conadv'] / med['vanilla']:.2f} | "
                     f"{med['disadv'] / med['vanilla']:.2f} | {oc_cell} |")
    return "\n".join(lines) + "\n"


def report_key(report):
    tag, model = report.get("tag"), report.get("model", "mlp")
    return (f"conadv_overlap/{report['device']}/stage{report['stage']}" + (f"/{model}" if model != "mlp" else "")
            + (f"/{tag}" if tag else ""))


def write_report(report, out, markdown_path, text, key):
    """The JSON file, the headline numbers on stdout, and (with ``markdown_path``) the report's docs section.
    Shared with the Horovod run."""
    with open(out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    s = report["summary"]
    print(json.dumps({k: s[k] for k in ("median_s", "exposed_fraction", "exposed_fraction_p10_p90", "ratios")},
                     indent=1))
    print(f"# wrote {out}")
    if markdown_path:
        update_markdown(markdown_path, text, key)
        print(f"# updated {markdown_path}")


def update_markdown(path, text, key):
    begin, end = f"<!-- conadv_overlap:BEGIN {key} -->", f"<!-- conadv_overlap:END {key} -->"
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    i, j = old.find(begin), old.find(end)
    new = old[:i] + text + old[j + len(end) + 1:] if i >= 0 and j >= 0 else old.rstrip("\n") + "\n\n" + text
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
