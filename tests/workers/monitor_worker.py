"""One rank of three short runs through ds_conadv.initialize with DeepSpeed's "tensorboard" and "csv_monitor"
sections enabled: the ConAdv engine, the ABSA engine and a plain engine (LAMB, gradient accumulation). Rank 0
writes what the engines returned as JSON; the test reads the event files back.

Usage: monitor_worker.py --out DIR [--steps N]
"""
import argparse
import json
import os

import torch

IN, HIDDEN, CLASSES, MICRO = 12, 16, 4, 8


def monitor_sections(out, job):
    return {"tensorboard": {"enabled": True, "output_path": os.path.join(out, "tb"), "job_name": job},
            "csv_monitor": {"enabled": True, "output_path": os.path.join(out, "csv"), "job_name": job}}


def stream(rank, seed):
    gen = torch.Generator().manual_seed(1000 * rank + seed)
    while True:
        x = torch.randn(MICRO, IN, generator=gen)
        yield x, (x[:, :CLASSES].argmax(1) + torch.randint(0, 2, (MICRO,), generator=gen)) % CLASSES


def bn_model():
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.BatchNorm1d(HIDDEN), torch.nn.ReLU(),
                               torch.nn.Linear(HIDDEN, CLASSES))


def ln_model():
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.LayerNorm(HIDDEN), torch.nn.Tanh(),
                               torch.nn.Linear(HIDDEN, CLASSES))


def run_conadv(out, world, rank, steps):
    import ds_conadv

    config = {"train_batch_size": MICRO * world, "train_micro_batch_size_per_gpu": MICRO,
              "zero_optimization": {"stage": 1}, "steps_per_print": 10**9,
              "optimizer": {"type": "LARS", "params": {"lr": 0.5, "weight_decay": 1e-3, "exclude_norm_and_bias": True,
                                                       "backend": "foreach"}},
              "conadv": {"enabled": True, "tau": 1, "epsilon": 0.1, "start_epoch": 1},
              **monitor_sections(out, "conadv")}
    engine, *_ = ds_conadv.initialize(model=bn_model(), config=config, steps_per_epoch=1)
    data = stream(rank, 1)
    metrics = []
    for _ in range(steps):
        m = engine.train_batch(data)
        metrics.append({**m, "global_samples": engine.global_samples})
    return metrics


def run_absa(out, world, rank, steps):
    import ds_conadv

    absa = {"enabled": True, "interval": 1, "eig_batches": 1, "eig_max_iter": 5, "eig_tol": 1e-2, "eig_ratio": 0.5,
            "duration": 100, "factor": 2, "max_batch": 4 * MICRO * world, "adv_ratio": 0.5, "epsilon": 0.1}
    config = {"train_batch_size": MICRO * world, "train_micro_batch_size_per_gpu": MICRO,
              "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
              "optimizer": {"type": "LAMB", "params": {"lr": 0.01, "weight_decay": 0.01, "backend": "foreach"}},
              "absa": absa, **monitor_sections(out, "absa")}
    script = {0: 10.0, 1: 1.0, 2: 1.0}  # the second check grows the batch (1 <= 0.5 x 10)
    engine, *_ = ds_conadv.initialize(model=ln_model(), config=config,
                                      absa_options={"eigenvalue_fn": lambda driver, epoch: script[epoch]})
    data = stream(rank, 2)
    metrics, epochs = [], []
    for epoch in range(3):
        for _ in range(steps):
            m = engine.train_batch(data)
            metrics.append({**m, "global_samples": engine.global_samples, "adv_ratio": engine.adv_ratio})
        row = engine.end_epoch()
        epochs.append({**row, "global_samples": engine.global_samples})
    return metrics, epochs


def run_plain(out, world, rank, steps):
    import ds_conadv

    config = {"train_batch_size": 2 * MICRO * world, "train_micro_batch_size_per_gpu": MICRO,
              "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
              "optimizer": {"type": "LAMB", "params": {"lr": 0.01, "weight_decay": 0.01, "backend": "foreach",
                                                       "exclude_norm_and_bias": True}},
              **monitor_sections(out, "plain")}
    engine, *_ = ds_conadv.initialize(model=ln_model(), config=config)
    data = stream(rank, 3)
    trust = ds_conadv.integrations.deepspeed.find_trust_optimizer(engine.optimizer)
    ratios = []

    def record_ratios(opt, *_):
        # ZeRO steps one param group at a time: the ratios of each call, for the groups that adapt (decay)
        for group, ratio in zip(opt.param_groups, opt.trust_ratios):
            if group["weight_decay"] != 0 and ratio is not None:
                ratios.extend(ratio.reshape(-1).tolist())

    trust.register_step_post_hook(record_ratios)
    steps_out = []
    for step in range(steps):
        losses = []
        ratios.clear()
        for micro in range(engine.gradient_accumulation_steps()):
            x, y = next(data)
            if step == 1 and micro == 1:
                x[0, 0] = float("nan")  # a non-finite gradient: this optimizer step is skipped
            loss = torch.nn.functional.cross_entropy(engine(x), y)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        steps_out.append({"loss": sum(losses) / len(losses), "ratios": list(ratios),
                          "global_samples": engine.global_samples, "skipped": int(trust.skipped_steps)})
    return steps_out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # an inference-only op's JIT build
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    result = {"world": world, "conadv": run_conadv(args.out, world, rank, args.steps)}
    result["absa"], result["absa_epochs"] = run_absa(args.out, world, rank, args.steps)
    result["plain"] = run_plain(args.out, world, rank, args.steps)
    result["dirs"] = sorted(os.listdir(args.out)) if os.path.isdir(args.out) else []
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f, default=lambda v: None)


if __name__ == "__main__":
    main()
