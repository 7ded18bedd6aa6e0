"""How much of ConAdv's generation pass is hidden behind the gradient reduction (DeepSpeed, 2 ranks).

Four engines on the same model and data, stepped in interleaved rounds so that machine noise hits all alike:

* ``vanilla``  — clean loss only (``"conadv": {"enabled": false}``);
* ``disadv``   — tau = 0: generate x̂_t with w_t, then train on it (sequential);
* ``conadv``   — tau = 1: x̂_{t+1} generated with w_t while ``engine.backward``'s reduction is in flight;
* ``no_gen``   — the ConAdv step with a fixed x̂ and no generation (clean + adversarial forward/backward,
  reduction, optimizer step): what ConAdv would cost if generation were free;
* ``conadv_bwd`` (with ``--compare-start``) — ConAdv with the generation started together with the backward
  instead of when the reduction begins (the engine's ``generation_start="backward"``);
* ``vanilla_oc``, ``conadv_oc``, ``no_gen_oc`` (with ``--overlap-comm``, ZeRO 1/2) — the same engines with
  DeepSpeed's ``"overlap_comm": true`` (its bucketed reduction on a side stream; on CPU there is no side stream).

Also timed alone: ``T_gen``, one generation pass. Then

    exposed adversarial fraction = (T_conadv - T_no_gen) / T_gen      (0: fully hidden, 1: not hidden at all)

from medians over many repetitions; the spread is reported as the 10th-90th percentile of per-round values.

Models (``--model``): the MLP (default), or a ResNet-18/50-shaped CNN with BatchNorm on synthetic images
(``--image-size``, ``--width`` = first-stage channels). Where the time goes: every step's phases as the engine
times them (forward, backward compute and reduction on the worker thread, the generation beside the reduction,
the waits, the optimizer step), and per mode the process's seconds on a core and queued for one (Linux
schedstat, all threads), in the JSON and the docs section.

Run: ``python benchmarks/conadv_overlap.py [--stage 2] [--rounds 30] [--model resnet18 --batch 2]
[--overlap-comm]`` (it starts its own 2 ranks with torchrun); ``--markdown docs/benchmarks.md`` writes a section
there, JSON goes to ``benchmarks/results/`` with the load average before and after.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # benchmarks/_common.py, also when this file is loaded from elsewhere

from _common import (MODES, _pct, batch_pool, batch_stream, interleaved_rounds, markdown,  # noqa: E402,F401
                     modes_of, overlap_model, overlap_model_params, parse_args, report_key, summarize, summary_table,
                     thread_times, update_markdown, write_report)

OVERLAP_COMM_SUFFIX = "_oc"


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
        base = mode[:-len(OVERLAP_COMM_SUFFIX)] if mode.endswith(OVERLAP_COMM_SUFFIX) else mode
        zero = {"stage": args.stage}
        if mode != base:
            zero["overlap_comm"] = True
        if args.reduce_bucket:
            zero["reduce_bucket_size"] = args.reduce_bucket
        cfg = {"train_micro_batch_size_per_gpu": args.batch, "train_batch_size": args.batch * world,
               "zero_optimization": zero, "gradient_clipping": 0.0, "steps_per_print": 10**9,
               "optimizer": {"type": "LARS", "params": {"lr": 0.1, "backend": "foreach"}},
               "conadv": {"enabled": base != "vanilla", "tau": 0 if base == "disadv" else 1, "attack": args.attack,
                          "epsilon": 0.05}}
        if args.attack == "pgd":
            cfg["conadv"].update(steps=args.pgd_steps, step_size=0.02)
        eng, *_ = ds_conadv.initialize(model=overlap_model(args), config=cfg)
        if base == "conadv_bwd":
            eng.generation_start = "backward"
        return eng

    pool = batch_pool(args, rank, device)
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    modes = modes_of(args)
    engines = {m: engine(m) for m in modes}
    streams = {m: batch_stream(pool) for m in modes}
    fixed_x, fixed_y = pool[0]
    fixed_adv = [(x + 0.05).detach() for x, _ in pool]  # no_gen's stand-in adversarial batches
    no_gen_index = iter(batch_stream(list(range(len(pool)))))
    reduction_s = []  # DeepSpeed's backward epilogue (the gradient reduction) in no_gen steps, for the comm share
    # per step, where its time went (see _common.PHASES); wait_* are the training thread's waits for the worker
    phases = {m: [] for m in modes}

    def no_gen_step(mode, eng):
        x, y = next(streams[mode])
        eng.last_timings.pop("reduction", None)
        t0 = time.perf_counter()
        eng.forward_backward(x, y, fixed_adv[next(no_gen_index)])
        t1 = time.perf_counter()
        eng.finish_reduction()  # the whole backward (compute + reduction) on the worker
        t2 = time.perf_counter()
        eng.optimizer_step()
        t3 = time.perf_counter()
        reduction = eng.last_timings.get("reduction", 0.0)
        waited = eng.last_timings.get("wait_reduction", t2 - t1)
        phases[mode].append({"forward": t1 - t0, "backward_compute": max(0.0, waited - reduction),
                             "reduction": reduction, "wait_reduction": min(reduction, waited),
                             "optimizer": t3 - t2, "step": t3 - t0})
        return reduction

    def step(mode):
        eng = engines[mode]
        if mode.startswith("no_gen"):
            reduction = no_gen_step(mode, eng)
            if mode == "no_gen" and reduction:
                reduction_s.append(reduction)
            return
        m = eng.train_batch(streams[mode])
        timings = eng.last_timings
        waited_compute = timings.get("wait_backward_compute", 0.0)
        waited_rest = timings.get("wait_reduction", 0.0)
        phases[mode].append({"generation_sync": m["time_generate_now"], "forward": m["time_forward_backward"],
                             "backward_compute": waited_compute, "reduction": timings.get("reduction", 0.0),
                             "generation_beside_reduction": max(0.0, m["time_generate_ahead"] - waited_compute),
                             "wait_reduction": waited_rest, "optimizer": m["time_step"] - waited_rest,
                             "step": m["time_total"]})

    per_round = interleaved_rounds(step, lambda: engines["conadv"].generate(fixed_x, fixed_y), args,
                                   barrier=torch.distributed.barrier, sync=sync)
    # what a reduction costs alone: a plain all_reduce of a gradient-sized tensor (wall, on a core, queued)
    flat = torch.zeros(sum(p.numel() for p in engines["conadv"].module.parameters()), device=device)
    probe = []
    for _ in range(5):
        torch.distributed.barrier()
        sync()
        before, t = thread_times(), time.perf_counter()
        torch.distributed.all_reduce(flat)
        sync()
        wall, after = time.perf_counter() - t, thread_times()
        probe.append([wall] + ([a - b for a, b in zip(after, before)] if before and after else []))
    gathered = [None] * world
    per_round["allreduce_probe"] = probe
    per_round["reduction_s"] = reduction_s
    per_round["phases"] = {m: v[2:] for m, v in phases.items()}  # without the two warm-up steps
    torch.distributed.all_gather_object(gathered, per_round)
    if rank == 0:
        out = os.environ["DS_CONADV_BENCH_OUT"]
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"per_rank": gathered}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # exiting with gloo's threads alive can abort the process


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        print(summary_table([json.load(open(f, encoding="utf-8")) for f in args.table]), end="")
        return 0
    if args.stage == 0 and (args.overlap_comm or args.reduce_bucket):
        raise SystemExit("--overlap-comm/--reduce-bucket: DeepSpeed's overlap_comm and reduce_bucket_size are ZeRO "
                         "stage 1/2 options (stage 0 reduces in the engine's own allreduce); use --stage 1 or 2")
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
    t, load_before = time.time(), os.getloadavg()
    subprocess.run(cmd, env=env, check=True, timeout=3600)
    load_after = os.getloadavg()
    raw = json.load(open(raw_path))
    os.remove(raw_path)
    report = {
        "benchmark": "conadv_overlap", "device": args.device, "stage": args.stage, "nproc": args.nproc,
        "model": args.model, "width": args.width, "image_size": args.image_size if args.model != "mlp" else None,
        "batch": args.batch, "attack": args.attack + (f"-{args.pgd_steps}" if args.attack == "pgd" else ""),
        "reduce_bucket": args.reduce_bucket, "tag": args.tag, "n_params": overlap_model_params(args),
        "wall_s": time.time() - t, "load_avg": {"before": list(load_before), "after": list(load_after)},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"torch": torch.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "where": (f"CPU ({os.cpu_count()} cores), gloo, 1 torch thread per rank" if args.device == "cpu"
                              else f"GPU {torch.cuda.get_device_name(0)}, gloo staging CUDA tensors")},
        "summary": summarize(raw, args), "raw": raw,
    }
    for rank in raw["per_rank"]:
        rank.pop("phases", None)  # per step; the summary keeps their medians
    out = args.json_out or os.path.join(HERE, "results", f"conadv_overlap-{args.device}-stage{args.stage}"
                                        + (f"-{args.model}" if args.model != "mlp" else "")
                                        + (f"-{args.tag}" if args.tag else "") + ".json")
    write_report(report, out, args.markdown, markdown(report), report_key(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
