"""One rank of a small ABSA run (DeepSpeed through ds_conadv.initialize, or Horovod); writes what it saw as JSON.

Usage:
    absa_worker.py --backend deepspeed --out FILE [--stage S] [--stop-after-epoch E --ckpt DIR] [--resume DIR]
    horovodrun ... absa_worker.py --backend horovod --out FILE

``scripted`` (default): the decisions follow ``SCRIPT`` (the eigenvalue the schedule gets), while every check also
runs the real measurement (ds_conadv.hessian on the engine's module) and records it. The test replays the same
run in one process (``reference`` in tests/test_absa.py). A run with real eigenvalues driving the decisions:
examples/absa_digits.py.
"""
import argparse
import json
import sys

import torch

IN, HIDDEN, CLASSES, MICRO, WORLD = 13, 37, 5, 4, 2
START_BATCH, MAX_BATCH, SAMPLES_PER_EPOCH, EPOCHS = 8, 32, 40, 6
#: eigenvalue the schedule gets per epoch: growth after epoch 2 (4 <= 0.5 x 10) and after epoch 4 (3 <= 0.5 x 8,
#: the reference restarted at the growth); 32 = max_batch then stops checks and adversarial examples
SCRIPT = {0: 10.0, 1: 9.0, 2: 4.0, 3: 8.0, 4: 3.0}
LARS_PARAMS = {"lr": 0.5, "momentum": 0.9, "weight_decay": 1e-3, "trust_coefficient": 0.02, "backend": "foreach"}
ABSA = {"enabled": True, "interval": 1, "eig_batches": 2, "eig_max_iter": 10, "eig_tol": 1e-2, "eig_ratio": 0.5,
        "duration": 100, "factor": 2, "max_batch": MAX_BATCH, "lr_scaling": "linear", "adv_ratio": 0.5,
        "epsilon": 0.1}
ATTACK = {"enabled": False, "input_range": [-4.0, 4.0]}  # the conadv section: attack geometry only


def make_model():
    torch.manual_seed(4321)
    # LayerNorm, not BatchNorm: the data-parallel run then equals one process on the union of the ranks' batches
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.LayerNorm(HIDDEN), torch.nn.Tanh(),
                               torch.nn.Linear(HIDDEN, CLASSES))


def micro_batch(rank, index):
    gen = torch.Generator().manual_seed(10_000 * rank + index)
    return torch.randn(MICRO, IN, generator=gen) * 1.5, torch.randint(0, CLASSES, (MICRO,), generator=gen)


def stream(rank, start):
    i = start
    while True:
        yield micro_batch(rank, i)
        i += 1


def full_params(module, stage):
    import deepspeed

    out = {}
    for name, p in module.named_parameters():
        value = deepspeed.utils.safe_get_full_fp32_param(p) if stage else None
        out[name] = (value if value is not None else p.detach()).float().reshape(-1).tolist()
    return out


def scripted_eigenvalues(real):
    def fn(driver, epoch):
        value = driver.measure_eigenvalue(epoch)  # the real path, on every check
        real.append({"epoch": epoch, "value": value, **{k: driver.last_info[k] for k in ("products", "samples")}})
        return SCRIPT[epoch]

    return fn


def run_deepspeed(args):
    import deepspeed

    # inference-only op that the CPU accelerator would JIT-build (~95 s) at the first 2-rank start
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    import ds_conadv
    from ds_conadv.integrations import deepspeed as ds_integration

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    config = {
        "train_batch_size": START_BATCH, "train_micro_batch_size_per_gpu": MICRO,
        "zero_optimization": {"stage": args.stage}, "gradient_clipping": 0.0, "steps_per_print": 10**9,
        "optimizer": {"type": "LARS", "params": {**LARS_PARAMS, "exclude_norm_and_bias": True}},
        "absa": ABSA, "conadv": ATTACK,
    }
    real = []
    engine, *_ = ds_conadv.initialize(model=make_model(), config=config,
                                      absa_options={"eigenvalue_fn": scripted_eigenvalues(real),
                                                    "log_dir": args.out + ".log"})
    if args.resume:
        engine.load_checkpoint(args.resume)
    # the micro-step at which each optimizer step happens (DeepSpeed counts micro_steps after step()): the proof
    # that each global step accumulated exactly its gradient_accumulation_steps micro-batches
    stepped_at = []

    def record_step(*_):
        if not stepped_at or stepped_at[-1] != engine.micro_steps:  # ZeRO may step each param group apart
            stepped_at.append(engine.micro_steps)

    ds_integration._find_trust_optimizer(engine.optimizer).register_step_pre_hook(record_step)
    data = stream(rank, engine.samples // (MICRO * world))
    steps = []
    for epoch in range(engine.epoch, EPOCHS):
        for _ in range(engine.steps_per_epoch(SAMPLES_PER_EPOCH)):
            before = (engine.global_steps, engine.micro_steps, engine.train_batch_size(),
                      engine.gradient_accumulation_steps())
            m = engine.train_batch(data)
            steps.append({"epoch": epoch, "global_steps": [before[0], engine.global_steps],
                          "micro_steps": [before[1], engine.micro_steps], "train_batch_size": before[2],
                          "gas": before[3], "lr": m["lr"], "lrs": [float(v) for v in engine.get_lr()],
                          "adv_examples": m["adv_examples"], "loss": m["loss"]})
        engine.end_epoch(epoch)
        if args.stop_after_epoch is not None and epoch == args.stop_after_epoch:
            engine.save_checkpoint(args.ckpt)
            break
    return {"rank": rank, "engine": type(engine).__name__, "steps": steps, "log": engine.log, "real_eig": real,
            "stepped_at_micro": stepped_at, "params": full_params(engine.module, args.stage)}


def run_horovod(args):
    import horovod.torch as hvd

    from ds_conadv.absa_driver import HorovodABSATrainer
    from ds_conadv.optim import LARS, param_groups

    hvd.init()
    rank, world = hvd.rank(), hvd.size()
    model = make_model()
    optimizer = LARS(param_groups(model, LARS_PARAMS["weight_decay"]), **LARS_PARAMS)
    real = []
    trainer = HorovodABSATrainer(model, optimizer, ABSA, MICRO, attack=ATTACK,
                                 gradient_accumulation_steps=START_BATCH // (MICRO * world),
                                 eigenvalue_fn=scripted_eigenvalues(real))
    data = stream(rank, 0)
    steps = []
    for epoch in range(EPOCHS):
        for _ in range(trainer.steps_per_epoch(SAMPLES_PER_EPOCH)):
            passes = trainer.optimizer.backward_passes_per_step
            m = trainer.train_batch(data)
            steps.append({"epoch": epoch, "backward_passes_per_step": passes, "gas": m["grad_accum_steps"],
                          "train_batch_size": m["global_batch"], "lr": m["lr"], "adv_examples": m["adv_examples"]})
        trainer.end_epoch(epoch)
    params = {n: p.detach().float().reshape(-1).tolist() for n, p in model.named_parameters()}
    return {"rank": rank, "steps": steps, "log": trainer.log, "real_eig": real, "params": params}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="deepspeed", choices=["deepspeed", "horovod"])
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--stop-after-epoch", type=int, default=None)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.backend == "horovod":
        result = run_horovod(args)
    else:
        result = run_deepspeed(args)
    with open(f"{args.out}.rank{result['rank']}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    from rank_exit import leave_rank  # run as a script: tests/workers/ is on sys.path

    main()
    if "horovod" not in sys.argv:  # horovodrun ranks exit as usual (Horovod shuts down at exit)
        leave_rank()
