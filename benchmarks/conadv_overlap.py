"""How much of ConAdv's generation pass is hidden behind the gradient reduction (DeepSpeed, 2 ranks).

Four engines on the same model and data, stepped in interleaved rounds so that machine noise hits all alike:

* ``vanilla``  — clean loss only (``"conadv": {"enabled": false}``);
* ``disadv``   — tau = 0: generate x̂_t with w_t, then train on it (sequential);
* ``conadv``   — tau = 1: x̂_{t+1} generated with w_t while ``engine.backward``'s reduction is in flight;
* ``no_gen``   — the ConAdv step with a fixed x̂ and no generation (clean + adversarial forward/backward,
  reduction, optimizer step): what ConAdv would cost if generation were free;
* ``conadv_bwd`` (with ``--compare-start``) — ConAdv with the generation started together with the backward
  instead of when the reduction begins (the engine's ``generation_start="backward"``).

Also timed alone: ``T_gen``, one generation pass. Then

    exposed adversarial fraction = (T_conadv - T_no_gen) / T_gen      (0: fully hidden, 1: not hidden at all)

from medians over many repetitions; the spread is reported as the 10th-90th percentile of per-round values.
Run: ``python benchmarks/conadv_overlap.py [--stage 2] [--rounds 30]`` (it starts its own 2 ranks with
torchrun); ``--markdown docs/benchmarks.md`` writes a section there, JSON goes to ``benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
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


def rank_main(args):
    import torch

    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # inference-only op, ~95 s JIT build
    import ds_conadv

    torch.set_num_threads(1)
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        # ranks share one GPU (NCCL refuses that; gloo stages CUDA tensors through host memory): DeepSpeed
        # picks the device from LOCAL_RANK
        os.environ["LOCAL_RANK"] = "0"
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cpu" if args.device == "cpu" else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    def engine(mode):
        cfg = {"train_micro_batch_size_per_gpu": args.batch, "train_batch_size": args.batch * world,
               "zero_optimization": {"stage": args.stage}, "gradient_clipping": 0.0, "steps_per_print": 10**9,
               "optimizer": {"type": "LARS", "params": {"lr": 0.1, "backend": "foreach"}},
               "conadv": {"enabled": mode != "vanilla", "tau": 0 if mode == "disadv" else 1, "attack": args.attack,
                          "epsilon": 0.05}}
        if args.attack == "pgd":
            cfg["conadv"].update(steps=args.pgd_steps, step_size=0.02)
        eng, *_ = ds_conadv.initialize(model=overlap_model(args.width), config=cfg)
        if mode == "conadv_bwd":
            eng.generation_start = "backward"
        return eng

    pool = batch_pool(args, rank, device)
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    engines = {m: engine(m) for m in modes_of(args)}
    streams = {m: batch_stream(pool) for m in modes_of(args)}
    fixed_x, fixed_y = pool[0]
    fixed_adv = [(x + 0.05).detach() for x, _ in pool]  # no_gen's stand-in adversarial batches

    def no_gen_step(eng):
        x, y = next(streams["no_gen"])
        eng.forward_backward(x, y, fixed_adv[next(no_gen_index)])
        eng.finish_reduction()
        eng.optimizer_step()

    no_gen_index = iter(batch_stream(list(range(len(pool)))))
    reduction_s = []  # DeepSpeed's backward epilogue (the gradient reduction) in no_gen steps, for the comm share

    def step(mode):
        eng = engines[mode]
        if mode == "no_gen":
            no_gen_step(eng)
            if "reduction" in eng.last_timings:
                reduction_s.append(eng.last_timings["reduction"])
        else:
            eng.train_batch(streams[mode])

    per_round = interleaved_rounds(step, lambda: engines["conadv"].generate(fixed_x, fixed_y), args,
                                   barrier=torch.distributed.barrier, sync=sync)
    gathered = [None] * world
    per_round["reduction_s"] = reduction_s
    torch.distributed.all_gather_object(gathered, per_round)
    if rank == 0:
        out = os.environ["DS_CONADV_BENCH_OUT"]
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"per_rank": gathered}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # exiting with gloo's threads alive can abort the process


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
             f"{report['batch']} per rank, {report.get('attack', 'fgsm')} attack; {s['rounds']} interleaved rounds of {s['steps_per_round']} steps; "
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


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        print(summary_table([json.load(open(f, encoding="utf-8")) for f in args.table]), end="")
        return 0
    if "RANK" in os.environ:
        rank_main(args)
        return 0
    import torch

    raw_path = os.path.join(HERE, "results", f".conadv_overlap_raw_{os.getpid()}.json")
    os.makedirs(os.path.dirname(raw_path), exist_ok=True)
    env = dict(os.environ, DS_ACCELERATOR=args.device if args.device == "cpu" else "cuda", OMP_NUM_THREADS="1",
               DS_CONADV_BENCH_OUT=raw_path, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           os.path.abspath(__file__)] + (argv if argv is not None else sys.argv[1:])
    t = time.time()
    subprocess.run(cmd, env=env, check=True, timeout=3600)
    raw = json.load(open(raw_path))
    os.remove(raw_path)
    w = args.width
    n_params = overlap_model_params(w)
    report = {
        "benchmark": "conadv_overlap", "device": args.device, "stage": args.stage, "nproc": args.nproc,
        "width": w, "batch": args.batch, "attack": args.attack + (f"-{args.pgd_steps}" if args.attack == "pgd" else ""),
        "tag": args.tag, "n_params": n_params, "wall_s": time.time() - t,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"torch": torch.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "where": (f"CPU ({os.cpu_count()} cores), gloo, 1 torch thread per rank" if args.device == "cpu"
                              else f"GPU {torch.cuda.get_device_name(0)}, gloo staging CUDA tensors")},
        "summary": summarize(raw, args), "raw": raw,
    }
    out = args.json_out or os.path.join(HERE, "results", f"conadv_overlap-{args.device}-stage{args.stage}"
                                        + (f"-{args.tag}" if args.tag else "") + ".json")
    write_report(report, out, args.markdown, markdown(report), report_key(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
