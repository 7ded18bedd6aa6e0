"""One rank of a DeepSpeed run with tensor (AutoTP) or pipeline parallelism and our LAMB/LARS; writes the full
params (shards gathered, stages collected).

Usage: ds_parallel.py --mode autotp|pipe|pipe-conadv --optimizer lamb|lars --stage S --out FILE [--steps N]
       [--own-clip] [--naive]

autotp: tp_problem's model, ``"tensor_parallel": {"autotp_size": 2}`` with a column/row partition config, through
        ds_conadv.initialize (DeepSpeed clips); --naive drops the shard markers (trust ratios per shard).
pipe:   ds_problem's model as a 2-stage PipelineModule, 2 micro-batches per step. Through ds_conadv.initialize
        (DeepSpeed clips), or with --own-clip our optimizer's own max_grad_norm given to plain deepspeed.initialize
        (gradient_clipping 0) and attach(engine); --naive: without attach (the norm of this stage only).
pipe-conadv: a PipelineModule with a "conadv" section: writes the error ds_conadv.initialize raises.
"""
import argparse
import json

import torch
import torch.distributed as dist

import deepspeed

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

import ds_conadv  # noqa: E402
from ds_conadv.integrations import deepspeed as ds_integration  # noqa: E402
from ds_conadv.optim import unmark_sharded  # noqa: E402

AUTOTP_PARTITION = {"use_default_specs": False, "layer_specs": [
    {"patterns": [r"^0\.weight$", r"^0\.bias$"], "partition_type": "column"},
    {"patterns": [r"^2\.weight$"], "partition_type": "row"}]}


def _optimizer_section(name, params):
    return {"type": name.upper(), "params": params}


def run_autotp(args, rank):
    import tp_problem

    model = tp_problem.make_model()
    config = {"train_micro_batch_size_per_gpu": tp_problem.GLOBAL_BATCH, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": args.stage}, "steps_per_print": 10**9,
              "tensor_parallel": {"autotp_size": 2, "partition_config": AUTOTP_PARTITION},
              "optimizer": _optimizer_section(args.optimizer, tp_problem.optimizer_params(args.optimizer))}
    engine, *_ = ds_conadv.initialize(model=model, config=config)
    trust = ds_integration.find_trust_optimizer(engine.optimizer)
    if args.naive:
        for p in engine.module.parameters():
            unmark_sharded(p)
    for step in range(args.steps):
        x, y = tp_problem.batch(step)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
    tp_group = ds_integration.compat.tensor_parallel_group(engine)
    full = {}
    for name, p in engine.module.named_parameters():
        value = p.detach()
        dim = 0 if name in tp_problem.COLUMN else 1 if name in tp_problem.ROW else None
        if dim is not None:
            parts = [torch.empty_like(value) for _ in range(dist.get_world_size(tp_group))]
            dist.all_gather(parts, value.contiguous(), group=tp_group)
            value = torch.cat(parts, dim)
        full[name] = value.double().reshape(-1).tolist()
    return full, trust, engine


def run_pipe(args, rank):
    import ds_problem
    from deepspeed.pipe import PipelineModule

    model = PipelineModule(layers=list(ds_problem.make_model()), num_stages=2, loss_fn=torch.nn.MSELoss(),
                           partition_method="uniform")
    micro = ds_problem.GLOBAL_BATCH // 2
    config = {"train_batch_size": ds_problem.GLOBAL_BATCH, "train_micro_batch_size_per_gpu": micro,
              "zero_optimization": {"stage": args.stage}, "steps_per_print": 10**9}
    params = ds_problem.optimizer_params(args.optimizer)
    if args.own_clip:
        opt_cls = ds_conadv.optim.LAMB if args.optimizer == "lamb" else ds_conadv.optim.LARS
        groups = (ds_conadv.optim.param_groups(model, params["weight_decay"])
                  if params.pop("exclude_norm_and_bias", False) else model.parameters())
        optimizer = opt_cls(groups, **params)
        config.update(gradient_clipping=0.0, zero_allow_untested_optimizer=True)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        if not args.naive:
            ds_integration.attach(engine)
    else:
        config["optimizer"] = _optimizer_section(args.optimizer, params)
        engine, *_ = ds_conadv.initialize(model=model, config=config)
    trust = ds_integration.find_trust_optimizer(engine.optimizer)
    for step in range(args.steps):
        x, y = ds_problem.batch(step)
        engine.train_batch(iter([(x[:micro], y[:micro]), (x[micro:], y[micro:])]))
    # each stage holds its layers under the PipelineModule's names ("<layer index>.<param>"): collect all stages
    mine = {}
    for name, p in engine.module.named_parameters():
        value = deepspeed.utils.safe_get_full_fp32_param(p) if args.stage else None
        mine[name] = (value if value is not None else p.detach()).double().reshape(-1).tolist()
    stages = [None] * dist.get_world_size()
    dist.all_gather_object(stages, mine)
    return {k: v for s in stages for k, v in s.items()}, trust, engine


def run_pipe_conadv(args, rank):
    import ds_problem
    from deepspeed.pipe import PipelineModule

    from ds_conadv.config import ConfigError

    model = PipelineModule(layers=list(ds_problem.make_model()), num_stages=dist.get_world_size(),
                           loss_fn=torch.nn.MSELoss())
    config = {"train_batch_size": ds_problem.GLOBAL_BATCH, "conadv": {"enabled": True, "epsilon": 0.1},
              "optimizer": _optimizer_section("lars", ds_problem.optimizer_params("lars"))}
    try:
        ds_conadv.initialize(model=model, config=config)
    except ConfigError as e:
        return str(e)
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("autotp", "pipe", "pipe-conadv"), required=True)
    ap.add_argument("--optimizer", default="lamb")
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--own-clip", action="store_true")
    ap.add_argument("--naive", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    if args.mode == "pipe-conadv":
        json.dump({"rank": rank, "error": run_pipe_conadv(args, rank)}, open(f"{args.out}.rank{rank}", "w"))
        return
    full, trust, engine = (run_autotp if args.mode == "autotp" else run_pipe)(args, rank)
    json.dump({"rank": rank, "params": full, "wrapper": type(engine.optimizer).__name__,
               "optimizer": type(trust).__name__}, open(f"{args.out}.rank{rank}", "w"))


if __name__ == "__main__":
    from rank_exit import leave_rank

    main()
    leave_rank()
