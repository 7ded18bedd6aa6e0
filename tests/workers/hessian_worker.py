"""One rank of the distributed Hessian tests: results on this rank's share vs single-process on the union.

Usage: hessian_worker.py --mode gloo|deepspeed|horovod --out PREFIX [--cli-config CFG]
Writes PREFIX.rank<r> (JSON): the distributed results ("dist"), this rank's single-process results on the union
of every rank's data ("single"), and the communicator that was picked.
"""
import argparse
import json
import time

import torch
from torch import nn

from ds_conadv.hessian import Hessian, hessian_main

IN, HIDDEN, CLASSES = 6, 7, 3
# uneven shares: rank 0 has 3 batches (8, 8, 5 samples), rank 1 has 2 (8, 3): weights by sample count matter
SHARES = {0: [(0, 8), (8, 16), (16, 21)], 1: [(21, 29), (29, 32)]}


def make_model():
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))


def union_data():
    g = torch.Generator().manual_seed(11)
    return torch.randn(32, IN, generator=g), torch.randint(0, CLASSES, (32,), generator=g)


def batches(ranks):
    x, y = union_data()
    return [(x[a:b], y[a:b]) for r in ranks for a, b in SHARES[r]]


def spectrum(h):
    """Fixed work (tol=0): the distributed and single-process runs do exactly the same products."""
    probe = [torch.linspace(-1, 1, p.numel()).reshape(p.shape) for p in h.params]
    hv = h.hvp(probe)
    pv, _ = h.eigenvalues(top_n=2, max_iter=25, tol=0.0)
    lv, vecs = h.eigenvalues(top_n=3, max_iter=20, tol=0.0, method="lanczos")
    tr = h.trace(max_iter=15, tol=0.0)
    d = h.density(iter=12, n_v=2, num_bins=200)
    return {"hvp": torch.cat([t.reshape(-1) for t in hv]).tolist(), "power": pv, "lanczos": lv,
            "vec0": torch.cat([t.reshape(-1) for t in vecs[0]]).tolist(), "trace": [tr.mean, tr.stderr],
            "nodes": d.nodes, "weights": d.weights, "density": d.density.tolist(), "num_samples": h.num_samples}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="gloo", choices=["gloo", "deepspeed", "horovod"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cli-config", default=None)
    ap.add_argument("--local_rank", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    crit = nn.functional.cross_entropy
    out = {}
    if args.mode == "gloo":
        torch.distributed.init_process_group("gloo")
        rank = torch.distributed.get_rank()
        t0 = time.perf_counter()
        model = make_model()
        model.train()
        h = Hessian(model, crit, dataloader=batches([rank]), seed=1234 + rank)  # rank 0's seed wins
        out["comm"] = [h.op.comm.kind, h.world_size, h.seed]
        out["dist"] = spectrum(h)
        out["restored_train_mode"] = model.training and model[1].training
        out["single"] = spectrum(Hessian(model, crit, dataloader=batches([0, 1]), seed=1234, distributed=False))
        out["seconds_spectra"] = time.perf_counter() - t0
        if args.cli_config:  # the CLI under the same process group: each rank takes its share of the data
            t1 = time.perf_counter()
            hessian_main(["--config", args.cli_config, "--json", f"{args.out}.cli.json", "--no-progress"])
            out["seconds_cli"] = time.perf_counter() - t1
    elif args.mode == "deepspeed":
        import deepspeed

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # inference-only op, ~95 s JIT build
        import ds_conadv

        deepspeed.init_distributed(dist_backend="gloo")
        rank = torch.distributed.get_rank()
        # the project's engine: ds_conadv.initialize with a "conadv" section (dual BN) around DeepSpeed ZeRO-2
        config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "train_batch_size": 16,
                  "zero_optimization": {"stage": 2}, "gradient_clipping": 0.0, "steps_per_print": 10**9,
                  "optimizer": {"type": "LARS", "params": {"lr": 0.1, "trust_coefficient": 0.02,
                                                           "backend": "foreach"}},
                  "conadv": {"enabled": True, "tau": 1, "attack": "fgsm", "epsilon": 0.1,
                             "input_range": [-4.0, 4.0], "dual_bn": True}}
        engine, *_ = ds_conadv.initialize(model=make_model(), config=config)
        stream = iter(batches([rank]) * 4)
        for _ in range(2):  # two steps, so the weights (and each rank's BN statistics) move
            engine.train_batch(stream)
        out["engine"] = type(engine).__name__
        out["zero_stage"] = engine.zero_optimization_stage()
        own_stats = [b.clone() for b in engine.module.buffers()]  # BN statistics: each rank's own batches
        h = Hessian(engine, crit, dataloader=batches([rank]))
        out["comm"] = [h.op.comm.kind, h.world_size, h.seed]
        pv, _ = h.eigenvalues(top_n=2, max_iter=25, tol=0.0)
        lv, _ = h.eigenvalues(top_n=2, max_iter=20, tol=0.0, method="lanczos")
        out["dist"] = {"power": pv, "lanczos": lv, "trace": list(h.trace(max_iter=10, tol=0.0)),
                       "num_samples": h.num_samples}
        out["own_buffers_restored"] = all(torch.equal(a, b) for a, b in zip(own_stats, engine.module.buffers()))
        out["running_mean"] = engine.module[1].main.running_mean.tolist()
        out["hessian_params"] = h.names
        ref = Hessian(engine.module, crit, dataloader=batches([0, 1]), distributed=False)
        pv, _ = ref.eigenvalues(top_n=2, max_iter=25, tol=0.0)
        lv, _ = ref.eigenvalues(top_n=2, max_iter=20, tol=0.0, method="lanczos")
        out["single"] = {"power": pv, "lanczos": lv, "trace": list(ref.trace(max_iter=10, tol=0.0)),
                         "num_samples": ref.num_samples}
    else:
        import horovod.torch as hvd

        hvd.init()
        rank = hvd.rank()
        model = make_model()
        h = Hessian(model, crit, dataloader=batches([rank]))
        out["comm"] = [h.op.comm.kind, h.world_size, h.seed]
        out["dist"] = spectrum(h)
        out["single"] = spectrum(Hessian(model, crit, dataloader=batches([0, 1]), distributed=False))
    out["rank"] = rank
    json.dump(out, open(f"{args.out}.rank{rank}", "w"))


if __name__ == "__main__":
    from rank_exit import leave_rank  # run as a script: tests/workers/ is on sys.path

    main()
    leave_rank(hard=False)
