"""ABSA (adaptive batch size with adversarial training, Yao et al. arXiv 1810.01021) on the bundled digits data.

The digits CNN of ``ds-conadv train``, DeepSpeed ZeRO-1, LARS; an ``"absa"`` section makes ``ds_conadv.initialize``
return the ABSA engine, which measures the top Hessian eigenvalue at every epoch end and doubles the global batch
(through gradient accumulation) when it has fallen to half of the reference, scaling the LR by sqrt(2) and halving
the share of FGSM examples in each batch. Run it with 2 CPU ranks::

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/absa_digits.py --epochs 24 --out-dir runs/absa

Rank 0 writes ``absa_log.csv`` / ``absa_log.json`` (one row per epoch: eigenvalue, global batch, accumulation
steps, LR, adversarial ratio, steps, samples) and ``absa.png`` into ``--out-dir``, and prints the clean and FGSM
test accuracy at the end. docs/hessian.md explains the knobs; docs/img/absa_digits.png is this run at 24 epochs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def config(micro: int, world: int, mean: float, std: float, max_batch: int) -> dict:
    return {
        "train_batch_size": micro * world, "train_micro_batch_size_per_gpu": micro, "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 1}, "steps_per_print": 10**9,
        "optimizer": {"type": "LARS", "params": {"lr": 0.5, "momentum": 0.9, "weight_decay": 5e-5,
                                                 "trust_coefficient": 0.01, "exclude_norm_and_bias": True,
                                                 "backend": "foreach"}},
        "absa": {"enabled": True, "interval": 1, "eig_batches": 4, "eig_ratio": 0.5, "duration": 4, "factor": 2,
                 "max_batch": max_batch, "lr_scaling": "sqrt", "adv_ratio": 0.5, "epsilon": 1.0},
        # the conadv section only describes the attack's geometry here (ConAdv itself stays off beside ABSA)
        "conadv": {"enabled": False, "input_range": [0.0, 16.0], "mean": [mean], "std": [std]},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=512)
    ap.add_argument("--out-dir", default="runs/absa_digits")
    ap.add_argument("--plot", default=None, help="PNG path (default: OUT_DIR/absa.png)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = ap.parse_args(argv)

    from ds_conadv.train import DigitsCNN, Normalize, _quiet_deepspeed_import, evaluate, load_digits

    _quiet_deepspeed_import()  # DS_ACCELERATOR=cpu without a GPU; skips an inference-only op's ~95 s JIT build
    import deepspeed
    from tqdm import tqdm

    import ds_conadv
    from ds_conadv.config import ConAdvConfig

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    x, y, x_test, y_test = load_digits()
    mean, std = float(x.mean()), float(x.std())
    normalize = Normalize([mean], [std])
    x = normalize(x)
    micro = args.micro_batch
    torch.manual_seed(0)
    os.makedirs(args.out_dir, exist_ok=True)
    engine, *_ = ds_conadv.initialize(model=DigitsCNN(16, 10),
                                      config=config(micro, world, mean, std, args.max_batch),
                                      absa_options={"log_dir": args.out_dir})
    n = x.shape[0]

    def batches():  # this rank's micro-batches, a fresh permutation every pass over the data
        epoch = 0
        while True:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))[rank::world]
            for i in range(0, perm.numel() - micro + 1, micro):
                idx = perm[i:i + micro]
                yield x[idx].to(engine.device), y[idx].to(engine.device)
            epoch += 1

    data = batches()
    bar = tqdm(range(args.epochs), desc="ABSA epochs", unit="epoch", file=sys.stderr,
               disable=args.no_progress or rank != 0)
    for _ in bar:
        for _ in range(engine.steps_per_epoch(n)):
            metrics = engine.train_batch(data)
        row = engine.end_epoch()
        bar.set_postfix(batch=row["global_batch"], eig=f"{row['eigenvalue'] or float('nan'):.3g}",
                        loss=f"{metrics['loss']:.3f}", refresh=False)
    attack = ConAdvConfig(epsilon=1.0, input_range=(0.0, 16.0), mean=[mean], std=[std])
    clean, adv = evaluate(engine.module, x_test, y_test, normalize, attack, rank, world, 0, engine.device)
    if rank == 0:
        plot = args.plot or os.path.join(args.out_dir, "absa.png")
        engine.plot(plot, title=f"ABSA on digits: DigitsCNN(16), DeepSpeed ZeRO-1, {world} ranks, micro batch "
                                f"{micro}, FGSM eps 1 px, sqrt LR scaling")
        print(json.dumps({"test_clean_acc": clean, "test_fgsm_acc": adv, "epochs": args.epochs,
                          "final_global_batch": engine.global_batch, "optimizer_steps": engine.schedule.steps,
                          "log": os.path.join(args.out_dir, "absa_log.csv"), "plot": plot}), flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
