"""How much of ConAdv's generation pass Horovod's asynchronous allreduce hides (2 ranks, horovodrun --gloo).

The Horovod counterpart of ``benchmarks/conadv_overlap.py`` (same model, data, modes, rounds and statistics,
from ``benchmarks/_common.py``):

* ``vanilla`` — clean loss only; ``disadv`` — tau = 0 (generate, then train); ``conadv`` — tau = 1, x̂_{t+1}
  generated between ``loss.backward()`` (Horovod's hooks launch the allreduces) and ``optimizer.synchronize()``;
  ``no_gen`` — the ConAdv step with a fixed x̂ and no generation. ``T_gen``: one generation pass alone.

    exposed adversarial fraction = (T_conadv - T_no_gen) / T_gen      (0: fully hidden, 1: not hidden)

Run: ``python benchmarks/conadv_overlap_horovod.py [--rounds 30] [--markdown docs/benchmarks.md]
[--with-deepspeed]`` (starts its own ranks with ``horovodrun --gloo -np 2 -H localhost:2``; ``--with-deepspeed``
then runs ``conadv_overlap.py`` with the same sizes, so both backends are measured in one run). Needs Horovod
(``bash scripts/install_horovod.sh``).
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


sys.path.insert(0, HERE)  # benchmarks/_common.py

import _common as base  # noqa: E402

MODES = base.MODES


def rank_main(args):
    import torch

    import horovod.torch as hvd

    from ds_conadv.config import ConAdvConfig
    from ds_conadv.conadv import prepare_model
    from ds_conadv.integrations.horovod import HorovodConAdvTrainer, distributed_optimizer
    from ds_conadv.optim import LARS

    torch.set_num_threads(1)
    hvd.init()
    rank = hvd.rank()

    def trainer(mode):
        cfg = ConAdvConfig(enabled=mode != "vanilla", tau=0 if mode == "disadv" else 1, attack="fgsm", epsilon=0.05)
        m = prepare_model(base.overlap_model(args), cfg)
        opt = LARS(m.parameters(), lr=0.1, backend="foreach")
        named = [(f"{mode}.{n}", p) for n, p in m.named_parameters()]  # unique allreduce names per trainer
        return HorovodConAdvTrainer(m, distributed_optimizer(opt, named_parameters=named), cfg=cfg)

    pool = base.batch_pool(args, rank, torch.device("cpu"))
    trainers = {m: trainer(m) for m in MODES}
    streams = {m: base.batch_stream(pool) for m in MODES}
    fixed_x, fixed_y = pool[0]
    fixed_adv = [(x + 0.05).detach() for x, _ in pool]  # no_gen's stand-in adversarial batches
    no_gen_index = iter(base.batch_stream(list(range(len(pool)))))

    def step(mode):
        tr = trainers[mode]
        if mode == "no_gen":
            x, y = next(streams["no_gen"])
            tr.forward_backward(x, y, fixed_adv[next(no_gen_index)])
            tr.finish_reduction()
            tr.optimizer_step()
        else:
            tr.train_batch(streams[mode])

    per_round = base.interleaved_rounds(step, lambda: trainers["conadv"].generate(fixed_x, fixed_y), args,
                                        barrier=hvd.barrier)
    gathered = hvd.allgather_object(per_round)
    if rank == 0:
        with open(os.environ["DS_CONADV_BENCH_OUT"], "w", encoding="utf-8") as f:
            json.dump({"per_rank": gathered}, f)


def markdown(report):
    as_stage = dict(report, stage="horovod")
    return (base.markdown(as_stage).replace("DeepSpeed ZeRO-horovod", "Horovod (async allreduce)")
            .replace(base.report_key(as_stage), _key(report)))


def _key(report):
    model = report.get("model", "mlp")
    return f"conadv_overlap/{report['device']}/horovod" + (f"/{model}" if model != "mlp" else "")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    with_ds = "--with-deepspeed" in argv
    argv = [a for a in argv if a != "--with-deepspeed"]
    args = base.parse_args(argv)
    args.compare_start = False  # a DeepSpeed-engine option (its generation_start); passed on to --with-deepspeed
    if args.overlap_comm or args.reduce_bucket:
        raise SystemExit("--overlap-comm/--reduce-bucket are DeepSpeed ZeRO options: use benchmarks/conadv_overlap.py")
    if args.device != "cpu":
        raise SystemExit("this Horovod build is CPU/gloo only: --device cpu")
    if "HOROVOD_RANK" in os.environ:
        rank_main(args)
        return 0
    import torch

    raw_path = os.path.join(HERE, "results", f".conadv_overlap_hvd_raw_{os.getpid()}.json")
    os.makedirs(os.path.dirname(raw_path), exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_CONADV_BENCH_OUT=raw_path,
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    cmd = [horovodrun, "--gloo", "-np", str(args.nproc), "-H", f"localhost:{args.nproc}", sys.executable,
           os.path.abspath(__file__)] + argv
    t, load_before = time.time(), os.getloadavg()
    subprocess.run(cmd, env=env, check=True, timeout=3600)
    load_after = os.getloadavg()
    raw = json.load(open(raw_path))
    os.remove(raw_path)
    import horovod

    report = {
        "benchmark": "conadv_overlap", "backend": "horovod", "horovod": horovod.__version__, "device": args.device,
        "stage": None, "nproc": args.nproc, "model": args.model, "width": args.width,
        "image_size": args.image_size if args.model != "mlp" else None, "batch": args.batch,
        "n_params": base.overlap_model_params(args), "wall_s": time.time() - t,
        "load_avg": {"before": list(load_before), "after": list(load_after)},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"torch": torch.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "where": f"CPU ({os.cpu_count()} cores), Horovod {horovod.__version__} gloo, 1 torch thread "
                             "per rank"},
        "summary": base.summarize(raw, args), "raw": raw,
    }
    out = args.json_out or os.path.join(HERE, "results", f"conadv_overlap-{args.device}-horovod"
                                        + (f"-{args.model}" if args.model != "mlp" else "") + ".json")
    base.write_report(report, out, args.markdown, markdown(report), _key(report))
    if with_ds:
        ds_out = out[:-len(".json")] + f"-deepspeed-stage{args.stage}.json"
        print(f"# now the DeepSpeed backend, same sizes (benchmarks/conadv_overlap.py) -> {ds_out}")
        ds_argv = [a for i, a in enumerate(argv) if a != "--json" and (i == 0 or argv[i - 1] != "--json")]
        import conadv_overlap

        return conadv_overlap.main(ds_argv + ["--json", ds_out])
    return 0


if __name__ == "__main__":
    sys.exit(main())
