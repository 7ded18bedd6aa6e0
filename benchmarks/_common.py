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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--stage", type=int, default=2, choices=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=30, help="interleaved rounds (each: a few steps per mode)")
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--width", type=int, default=2048, help="hidden width (sets the gradient size)")
    p.add_argument("--batch", type=int, default=16, help="micro batch per rank (sets the generation cost)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--attack", default="fgsm", choices=["fgsm", "pgd"])
    p.add_argument("--pgd-steps", type=int, default=3, help="PGD steps (with --attack pgd)")
    p.add_argument("--compare-start", action="store_true",
                   help="also time ConAdv with the generation started with the backward (mode conadv_bwd)")
    p.add_argument("--tag", default=None, help="names this variant in the JSON file name and docs section")
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--table", nargs="+", default=None, metavar="JSON",
                   help="print one markdown table summarising these result files, and exit")
    return p.parse_args(argv)


def _pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def modes_of(args):
    return MODES + (("conadv_bwd",) if getattr(args, "compare_start", False) else ())


def overlap_model(width):
    """The benchmark's model (both backends): MLP 256-width-width-10 with BatchNorm, seeded."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, width), torch.nn.BatchNorm1d(width), torch.nn.ReLU(),
                               torch.nn.Linear(width, width), torch.nn.BatchNorm1d(width), torch.nn.ReLU(),
                               torch.nn.Linear(width, 10))


def overlap_model_params(width):
    """Its parameter count with dual BN (linear layers + main and adversarial BN), without building it."""
    return 256 * width + width + width * width + width + width * 10 + 10 + 4 * width * 2


def batch_stream(pool):
    """An endless iterator over pre-made batches: pulling a batch costs nothing in any mode (making random
    batches on the fly would be charged to the modes that pull one — all but no_gen — and bias the baseline)."""
    while True:
        yield from pool


def batch_pool(args, rank, device, n=8):
    import torch

    gen = torch.Generator().manual_seed(rank)
    return [(torch.randn(args.batch, 256, generator=gen).to(device),
             torch.randint(0, 10, (args.batch,), generator=gen).to(device)) for _ in range(n)]


def interleaved_rounds(step, generate, args, barrier, sync=lambda: None):
    """Per-round mean step time of every mode (and of one generation pass alone), the modes interleaved in each
    round so that machine noise hits all alike; two warm-up steps per mode first. Shared with the Horovod run."""
    modes = modes_of(args)
    for mode in modes:
        for _ in range(2):
            step(mode)
    per_round = {m: [] for m in modes + ("gen",)}
    for _ in range(args.rounds):
        for mode in modes:
            barrier()
            sync()
            t = time.perf_counter()
            for _ in range(args.steps_per_round):
                step(mode)
            sync()
            per_round[mode].append((time.perf_counter() - t) / args.steps_per_round)
        sync()
        t = time.perf_counter()
        for _ in range(args.steps_per_round):
            generate()
        sync()
        per_round["gen"].append((time.perf_counter() - t) / args.steps_per_round)
    return per_round


def summarize(raw, args):
    ranks = raw["per_rank"]
    # a step is synchronous across ranks: use the slowest rank per round
    rounds = len(ranks[0]["vanilla"])
    modes = tuple(m for m in ranks[0] if m not in ("gen", "reduction_s"))
    per_round = {m: [max(r[m][i] for r in ranks) for i in range(rounds)] for m in modes + ("gen",)}
    med = {m: statistics.median(v) for m, v in per_round.items()}
    exposed_rounds = [(c - n) / g for c, n, g in zip(per_round["conadv"], per_round["no_gen"], per_round["gen"])]
    return {
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
        "ratios": {"conadv/vanilla": med["conadv"] / med["vanilla"], "disadv/vanilla": med["disadv"] / med["vanilla"],
                   "no_gen/vanilla": med["no_gen"] / med["vanilla"]},
        "rounds": rounds, "steps_per_round": args.steps_per_round,
    }


def markdown(report):
    s, m = report["summary"], report["machine"]
    key = report_key(report)
    ms = lambda v: f"{1e3 * v:.1f}"  # noqa: E731
    lines = [f"<!-- conadv_overlap:BEGIN {key} -->",
             f"### ConAdv overlap, DeepSpeed ZeRO-{report['stage']}, {report['nproc']} ranks on {report['device']}",
             "",
             f"{m['where']}; torch {m['torch']}; MLP 256-{report['width']}-{report['width']}-10 with BatchNorm "
             f"({report['n_params']:,} params, gradient {4 * report['n_params'] / 1e6:.0f} MB), micro batch "
             f"{report['batch']} per rank, {report.get('attack', 'fgsm')} attack; "
             f"{s['rounds']} interleaved rounds of {s['steps_per_round']} steps; "
             f"per round the slowest rank counts; {report['date']}.",
             "",
             "| mode | median ms/step | p10 | p90 | ratio vs vanilla |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for mode in [m for m in s["median_s"] if m != "gen"]:
        ratio = s["median_s"][mode] / s["median_s"]["vanilla"]
        lines.append(f"| {mode} | {ms(s['median_s'][mode])} | {ms(s['p10_s'][mode])} | {ms(s['p90_s'][mode])} | "
                     f"{ratio:.2f} |")
    lines.append(f"| generation pass alone | {ms(s['median_s']['gen'])} | {ms(s['p10_s']['gen'])} | "
                 f"{ms(s['p90_s']['gen'])} | |")
    if s.get("reduction_s") is not None:
        lines.append(f"| reduction (DeepSpeed's backward epilogue, in no_gen) | {ms(s['reduction_s'])} | | | |")
    lo, hi = s["exposed_fraction_p10_p90"]
    lines += ["", f"**Exposed adversarial fraction** (T_conadv − T_no_gen) / T_gen = **{s['exposed_fraction']:.2f}** "
              f"(per-round p10–p90: {lo:.2f} to {hi:.2f})."]
    if "exposed_fraction_generation_with_backward" in s:
        lines.append(f"With the generation started together with the backward (`conadv_bwd`): "
                     f"{s['exposed_fraction_generation_with_backward']:.2f}.")
    lines.append(f"<!-- conadv_overlap:END {key} -->")
    return "\n".join(lines) + "\n"


def summary_table(reports):
    """One row per result file: the configuration, median ms/step per mode, and the exposed fractions."""
    ms = lambda v: "" if v is None else f"{1e3 * v:.1f}"  # noqa: E731
    lines = ["| run | ZeRO | batch/rank | attack | vanilla | disadv | conadv | no_gen | conadv_bwd | T_gen | "
             "reduction | exposed (p10–p90) | exposed, gen. with backward |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in reports:
        s, med = r["summary"], r["summary"]["median_s"]
        lo, hi = s["exposed_fraction_p10_p90"]
        bwd = s.get("exposed_fraction_generation_with_backward")
        lines.append(f"| {r.get('tag') or r['device']} | {r['stage']} | {r['batch']} | {r.get('attack', 'fgsm')} | "
                     f"{ms(med['vanilla'])} | {ms(med['disadv'])} | {ms(med['conadv'])} | {ms(med['no_gen'])} | "
                     f"{ms(med.get('conadv_bwd'))} | {ms(med['gen'])} | {ms(s.get('reduction_s'))} | "
                     f"**{s['exposed_fraction']:.2f}** ({lo:.2f} to {hi:.2f}) | "
                     f"{'' if bwd is None else f'{bwd:.2f}'} |")
    return "\n".join(lines) + "\n"


def report_key(report):
    tag = report.get("tag")
    return f"conadv_overlap/{report['device']}/stage{report['stage']}" + (f"/{tag}" if tag else "")


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
