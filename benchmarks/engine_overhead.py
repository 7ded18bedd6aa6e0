#!/usr/bin/env python
"""What ds_conadv's engine costs per step in vanilla mode, against plain ``deepspeed.initialize`` (2 ranks).

Three engines on the same seeded model, data and optimizer (our LAMB), stepped in interleaved rounds so that
machine noise hits all alike:

* ``deepspeed``  -- ``deepspeed.initialize(model, optimizer=LAMB(...))``, then ``ds_conadv.integrations.deepspeed
  .attach(engine)`` (exact trust ratios under ZeRO), stepped with ``loss = f(engine(x)); engine.backward(loss);
  engine.step()``;
* ``ds_conadv``  -- ``ds_conadv.initialize`` with the optimizer in the config and ``"conadv": {"enabled": false}``
  (the :class:`DeepSpeedConAdvEngine` in vanilla mode), stepped with ``engine.train_batch(data_iter)``;
* ``ds_conadv_raw`` -- ``ds_conadv.initialize`` without a ``conadv`` section (the DeepSpeed engine it returns,
  optimizer from the config), stepped like ``deepspeed``: the cost of the config path alone.

Per round and mode the mean step time of the slowest rank; medians over rounds, 10th-90th percentiles of
the per-round ratios. ``overhead = median(ds_conadv) / median(deepspeed) - 1``.

    python benchmarks/engine_overhead.py --stage 0 [--rounds 30] [--markdown docs/benchmarks.md]

It starts its own ranks with ``torch.distributed.run``; JSON goes to ``benchmarks/results/``.
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
MODES = ("deepspeed", "ds_conadv", "ds_conadv_raw")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--stage", type=int, default=0, choices=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64, help="micro batch per rank")
    p.add_argument("--backend", default="auto", help="the LAMB backend (same for every engine)")
    p.add_argument("--machine-label", default="2-core CPU (shared)")
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--markdown", default=None)
    return p.parse_args(argv)


def model(width):
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                               torch.nn.ReLU(), torch.nn.Linear(width, 10))


def rank_main(args):
    import torch

    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # inference-only op, long JIT build
    import ds_conadv
    from ds_conadv.integrations.deepspeed import attach
    from ds_conadv.optim import LAMB

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    lamb = {"lr": 1e-3, "weight_decay": 0.01, "backend": args.backend}
    base = {"train_micro_batch_size_per_gpu": args.batch, "train_batch_size": args.batch * world,
            "zero_optimization": {"stage": args.stage}, "gradient_clipping": 0.0, "steps_per_print": 10**9}
    loss_fn = torch.nn.CrossEntropyLoss()

    def build(mode):
        if mode == "deepspeed":
            m = model(args.width)
            cfg = dict(base, zero_allow_untested_optimizer=True)
            eng, *_ = deepspeed.initialize(model=m, optimizer=LAMB(m.parameters(), **lamb), config=cfg)
            attach(eng)
            return eng
        cfg = dict(base, optimizer={"type": "LAMB", "params": dict(lamb)})
        if mode == "ds_conadv":
            cfg["conadv"] = {"enabled": False}
        eng, *_ = ds_conadv.initialize(model=model(args.width), config=cfg)
        return eng

    gen = torch.Generator().manual_seed(rank)
    pool = [(torch.randn(args.batch, 256, generator=gen), torch.randint(0, 10, (args.batch,), generator=gen))
            for _ in range(8)]

    def stream():
        while True:
            yield from pool

    engines = {m: build(m) for m in MODES}
    streams = {m: stream() for m in MODES}

    def step(mode):
        eng = engines[mode]
        if mode == "ds_conadv":
            eng.train_batch(streams[mode])
            return
        x, y = next(streams[mode])
        loss = loss_fn(eng(x), y)
        eng.backward(loss)
        eng.step()

    for mode in MODES:
        for _ in range(3):
            step(mode)
    per_round = {m: [] for m in MODES}
    cpu_per_round = {m: [] for m in MODES}  # this process's CPU time (all its threads): what load cannot inflate
    for r in range(args.rounds):
        order = MODES if r % 2 == 0 else MODES[::-1]
        for mode in order:
            torch.distributed.barrier()
            t, c = time.perf_counter(), time.process_time()
            for _ in range(args.steps_per_round):
                step(mode)
            cpu_per_round[mode].append((time.process_time() - c) / args.steps_per_round)
            per_round[mode].append((time.perf_counter() - t) / args.steps_per_round)
    # the engines trained the same model on the same data: their params must agree (same numbers, same engine)
    flat = {m: torch.cat([p.detach().reshape(-1).float() for p in engines[m].module.parameters()]) for m in MODES}
    agree = {m: bool(torch.allclose(flat[m], flat["deepspeed"], rtol=1e-4, atol=1e-6)) for m in MODES}
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, {"per_round": per_round, "cpu_per_round": cpu_per_round,
                                                   "params_agree": agree})
    if rank == 0:
        with open(os.environ["DS_CONADV_BENCH_OUT"], "w", encoding="utf-8") as f:
            json.dump({"per_rank": gathered}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def summarize(raw):
    ranks = [r["per_round"] for r in raw["per_rank"]]
    rounds = len(ranks[0][MODES[0]])
    slowest = {m: [max(r[m][i] for r in ranks) for i in range(rounds)] for m in MODES}
    med = {m: statistics.median(v) for m, v in slowest.items()}
    out = {"median_ms": {m: 1e3 * v for m, v in med.items()}, "rounds": rounds,
           "min_ms": {m: 1e3 * min(v) for m, v in slowest.items()}}
    for m in ("ds_conadv", "ds_conadv_raw"):
        ratios = [a / b for a, b in zip(slowest[m], slowest["deepspeed"])]
        out[f"{m}_overhead"] = med[m] / med["deepspeed"] - 1
        out[f"{m}_ratio_p10_p90"] = [_pct(ratios, 0.1), _pct(ratios, 0.9)]
        out[f"{m}_ratio_median_of_rounds"] = statistics.median(ratios)
    out["params_agree"] = all(all(r["params_agree"].values()) for r in raw["per_rank"])
    # CPU time per step (process time, mean over ranks per round): busy time only, so another job's load does not
    # stretch it the way it stretches wall time; gloo waits block without spinning
    if all("cpu_per_round" in r for r in raw["per_rank"]):
        cpu = {m: [statistics.fmean(r["cpu_per_round"][m][i] for r in raw["per_rank"]) for i in range(rounds)]
               for m in MODES}
        cpu_med = {m: statistics.median(v) for m, v in cpu.items()}
        out["cpu_median_ms"] = {m: 1e3 * v for m, v in cpu_med.items()}
        for m in ("ds_conadv", "ds_conadv_raw"):
            out[f"{m}_cpu_overhead"] = cpu_med[m] / cpu_med["deepspeed"] - 1
    return out


def markdown(report):
    s, key = report["summary"], report_key(report)
    m = s["median_ms"]
    lines = [
        f"<!-- engine_overhead:BEGIN {key} -->",
        f"### Engine overhead, ZeRO-{report['stage']}, {report['nproc']} ranks, {report['machine_label']}",
        "",
        f"MLP 256-{report['width']}-{report['width']}-10, micro batch {report['batch']} per rank, LAMB "
        f"(backend {report['backend']}), gloo, 1 torch thread per rank; {s['rounds']} interleaved rounds of "
        f"{report['steps_per_round']} steps; load average {report['load_avg']['before'][0]:.2f} before, "
        f"{report['load_avg']['after'][0]:.2f} after; {report['date']}. Params of all engines agree after the "
        f"run: {s['params_agree']}.",
        "",
        "| engine | median step ms | min ms | median / plain DeepSpeed | median of per-round ratios (p10-p90) "
        "| CPU ms per step | CPU / plain DeepSpeed |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
        f"| `deepspeed.initialize` + LAMB | {m['deepspeed']:.2f} | {s['min_ms']['deepspeed']:.2f} | 1.000 | | "
        f"{_cpu_cell(s, 'deepspeed')} | 1.000 |",
    ]
    for mode, label in (("ds_conadv", "`ds_conadv.initialize`, ConAdv engine, vanilla mode"),
                        ("ds_conadv_raw", "`ds_conadv.initialize`, no `conadv` section")):
        lo, hi = s[f"{mode}_ratio_p10_p90"]
        cpu_ratio = f"{1 + s[f'{mode}_cpu_overhead']:.3f}" if f"{mode}_cpu_overhead" in s else "-"
        lines.append(f"| {label} | {m[mode]:.2f} | {s['min_ms'][mode]:.2f} | {1 + s[f'{mode}_overhead']:.3f} | "
                     f"{s[f'{mode}_ratio_median_of_rounds']:.3f} ({lo:.3f}-{hi:.3f}) | {_cpu_cell(s, mode)} | "
                     f"{cpu_ratio} |")
    lines.append(f"<!-- engine_overhead:END {key} -->")
    return "\n".join(lines) + "\n"


def _cpu_cell(summary, mode):
    cpu = summary.get("cpu_median_ms")
    return f"{cpu[mode]:.2f}" if cpu else "-"


def report_key(report):
    return f"{report['device']}/stage{report['stage']}"


def update_markdown(path, key, section):
    begin, end = f"<!-- engine_overhead:BEGIN {key} -->", f"<!-- engine_overhead:END {key} -->"
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    i = text.find(begin)
    j = text.find(end, i + 1) if i >= 0 else -1
    if i >= 0 and j >= 0:
        j += len(end) + (1 if text[j + len(end):j + len(end) + 1] == "\n" else 0)
        text = text[:i] + section + text[j:]
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + ("\n" if text else "") + section
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv=None):
    args = parse_args(argv)
    if "RANK" in os.environ:
        rank_main(args)
        return 0
    import torch

    raw_path = os.path.join(HERE, "results", f".engine_overhead_raw_{os.getpid()}.json")
    os.makedirs(os.path.dirname(raw_path), exist_ok=True)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", DS_CONADV_BENCH_OUT=raw_path,
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           os.path.abspath(__file__)] + (argv if argv is not None else sys.argv[1:])
    load_before = os.getloadavg()
    t = time.time()
    subprocess.run(cmd, env=env, check=True, timeout=3600)
    raw = json.load(open(raw_path, encoding="utf-8"))
    os.remove(raw_path)
    report = {
        "benchmark": "engine_overhead", "device": "cpu", "stage": args.stage, "nproc": args.nproc,
        "width": args.width, "batch": args.batch, "backend": args.backend, "steps_per_round": args.steps_per_round,
        "machine_label": args.machine_label, "wall_s": time.time() - t,
        "load_avg": {"before": list(load_before), "after": list(os.getloadavg())},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"torch": torch.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count()},
        "summary": summarize(raw), "raw": raw,
    }
    out = args.json_out or os.path.join(HERE, "results", f"engine_overhead-cpu-stage{args.stage}.json")
    with open(out, "w", encoding="utf-8") as f:
        f.write(json.dumps(report, indent=2) + "\n")
    s = report["summary"]
    print(f"# ZeRO-{args.stage}: deepspeed {s['median_ms']['deepspeed']:.2f} ms, ds_conadv vanilla "
          f"{s['median_ms']['ds_conadv']:.2f} ms ({100 * s['ds_conadv_overhead']:+.1f} %), ds_conadv raw "
          f"{s['median_ms']['ds_conadv_raw']:.2f} ms ({100 * s['ds_conadv_raw_overhead']:+.1f} %); "
          f"params agree: {s['params_agree']}; CPU time per step: deepspeed {s['cpu_median_ms']['deepspeed']:.2f} "
          f"ms, ds_conadv vanilla {100 * s['ds_conadv_cpu_overhead']:+.1f} %, "
          f"raw {100 * s['ds_conadv_raw_cpu_overhead']:+.1f} %; wrote {out}")
    if args.markdown:
        update_markdown(args.markdown, report_key(report), markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
