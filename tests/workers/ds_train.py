"""One rank of a small DeepSpeed training run with ds_conadv's LAMB/LARS; writes the final params.

Usage: ds_train.py --stage S --optimizer lamb|lars --dtype fp32|bf16 --steps N --out FILE
       [--plain] [--save-at K --ckpt DIR] [--resume DIR] [--detach] [--nan-at K [--no-clip]]
       [--offload [--sub-group-size N] [--backend NAME]] [--check-gathers]
"""
import argparse
import json

import torch

import deepspeed

# The CPU accelerator JIT-builds a shared-memory all-reduce op (~95 s) that only inference uses; the tests do
# not need it, so keep it out of the test run.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

import ds_conadv  # noqa: E402
from ds_conadv.integrations import deepspeed as ds_integration  # noqa: E402
from ds_problem import GLOBAL_BATCH, batch, make_model, optimizer_params  # noqa: E402


def watch_coalesced_gathers() -> dict:
    """Wrap ZeRO-3's blocking gather of several params (outermost: after ds_conadv.initialize) to count the calls
    that return while one of their async all-gathers is still running (the next forward would read it
    half-written)."""
    from deepspeed import comm
    from deepspeed.runtime.zero.partition_parameters import Init

    counts = {"calls": 0, "returned_early": 0}
    gather = Init._allgather_params_coalesced

    def watched(self, param_list, *args, **kwargs):
        handles = []
        launchers = {name: getattr(comm, name) for name in ("all_gather_into_tensor", "all_gather")}

        def recording(launch):
            def call(*a, **k):
                handle = launch(*a, **k)
                handles.append(handle)
                return handle
            return call

        for name, launch in launchers.items():
            setattr(comm, name, recording(launch))
        try:
            return gather(self, param_list, *args, **kwargs)
        finally:
            for name, launch in launchers.items():
                setattr(comm, name, launch)
            if handles:
                counts["calls"] += 1
                counts["returned_early"] += any(h is not None and not h.is_completed() for h in handles)

    Init._allgather_params_coalesced = watched
    return counts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--optimizer", default="lamb")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plain", action="store_true", help="build LAMB ourselves, plain deepspeed.initialize")
    ap.add_argument("--detach", action="store_true", help="drop the segment layouts (naive per-slice ratios)")
    ap.add_argument("--save-at", type=int, default=None)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--nan-at", type=int, default=None,
                    help="at this step, rank 0 puts one NaN into one element of the last layer's weight gradient "
                         "before the reduction (under ZeRO 1-3 it then sits in one rank's partition only)")
    ap.add_argument("--no-clip", action="store_true", help="no gradient clipping")
    ap.add_argument("--offload", action="store_true", help='"offload_optimizer": {"device": "cpu"} (ZeRO-Offload)')
    ap.add_argument("--sub-group-size", type=int, default=None, help="ZeRO-3 sub-group size (elements)")
    ap.add_argument("--backend", default=None, help="the optimizer's backend instead of the problem's")
    ap.add_argument("--check-gathers", action="store_true",
                    help="ZeRO 3: count param gathers that return before all of their all-gathers have finished")
    ap.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = ap.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = make_model()
    params = optimizer_params(args.optimizer)
    if args.no_clip:
        params["max_grad_norm"] = None
    if args.backend:
        params["backend"] = args.backend
    ran = set()  # (kernel set, device) of every step: which kernels stepped the (offloaded) partition
    kernels_of = ds_conadv.optim.TrustRatioOptimizer._kernels

    def _recording_kernels(group, tensors):
        kernels = kernels_of(group, tensors)
        if kernels is not None:
            ran.add((kernels.name, tensors[0].device.type))
        return kernels

    ds_conadv.optim.TrustRatioOptimizer._kernels = staticmethod(_recording_kernels)
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "zero_optimization": {"stage": args.stage},
        "steps_per_print": 10**9,
    }
    if args.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    if args.offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if args.sub_group_size:
        config["zero_optimization"]["sub_group_size"] = args.sub_group_size
    if args.plain:
        opt_cls = ds_conadv.optim.LAMB if args.optimizer == "lamb" else ds_conadv.optim.LARS
        mgn = params.pop("max_grad_norm")
        groups = (ds_conadv.optim.param_groups(model, params["weight_decay"])
                  if params.pop("exclude_norm_and_bias", False)
                  else model.parameters())
        optimizer = opt_cls(groups, **params)
        config.update(gradient_clipping=mgn, zero_allow_untested_optimizer=True)
        if args.offload:  # the documented plain-DeepSpeed route: the user sets DeepSpeed's flag
            config["zero_force_ds_cpu_optimizer"] = False
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    else:
        config["optimizer"] = {"type": args.optimizer.upper(), "params": params}
        engine, *_ = ds_conadv.initialize(model=model, config=config)
    trust = ds_integration._find_trust_optimizer(engine.optimizer)
    gathers = watch_coalesced_gathers() if args.check_gathers else None
    if args.detach:
        trust._layouts.clear()
        trust._ds_attached = True
    start = 0
    if args.resume:
        engine.load_checkpoint(args.resume)
        start = engine.global_steps
    poison = {"armed": False}

    def _poison(grad):
        if not poison["armed"] or rank != 0:
            return grad
        grad = grad.clone()
        grad.view(-1)[grad.numel() // 2] = float("nan")
        return grad

    if args.nan_at is not None:  # a tensor hook changes when DeepSpeed sees the gradient: only when asked
        list(engine.module.parameters())[-2].register_hook(_poison)  # the last Linear's weight
    for step in range(start, args.steps):
        poison["armed"] = step == args.nan_at
        x, y = batch(step, rank, world)
        x = x.to(next(engine.module.parameters()).dtype)
        loss = torch.nn.functional.mse_loss(engine(x).float(), y)
        engine.backward(loss)
        engine.step()
        if args.save_at is not None and step + 1 == args.save_at:
            engine.save_checkpoint(args.ckpt)
            if args.steps == args.save_at:
                break
    full = {}
    for name, p in engine.module.named_parameters():
        value = deepspeed.utils.safe_get_full_fp32_param(p) if args.stage else None
        full[name] = (value if value is not None else p.detach()).float().reshape(-1).tolist()
    json.dump({"rank": rank, "params": full, "attached": trust._ds_attached,
               "skipped_steps": int(trust.skipped_steps), "engine_skipped_steps": int(engine.skipped_steps),
               "wrapper": type(engine.optimizer).__name__, "kernels": sorted(map(list, ran)),
               "force_ds_cpu_optimizer": engine.zero_force_ds_cpu_optimizer(), "gathers": gathers},
              open(f"{args.out}.rank{rank}", "w"))


if __name__ == "__main__":
    from rank_exit import leave_rank  # run as a script: tests/workers/ is on sys.path

    main()
    leave_rank()
