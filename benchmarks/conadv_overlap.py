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
                     update_markdown, write_report)


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
