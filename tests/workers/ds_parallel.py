"""One rank of a DeepSpeed run with tensor (AutoTP) or pipeline parallelism, alone or combined with data
parallelism (the ranks beyond the TP size / stages), and our LAMB/LARS; writes the full params of every case
(shards gathered over the TP group, stages collected over the pipeline group).

Usage: ds_parallel.py --mode autotp|pipe|pipe-conadv --out FILE [--case CASE ...] [--steps N]

CASE is ``optimizer:stage[:variant]`` (default ``lamb:0``); one process runs its cases one after the other, each
with a fresh engine. Every data-parallel rank trains on its share of the same global batch.

autotp: tp_problem's model, ``"tensor_parallel": {"autotp_size": 2}`` with a column/row partition config, through
        ds_conadv.initialize (DeepSpeed clips). Variants: ``naive`` drops the shard markers (trust ratios per TP
        shard); ``naive-dp`` (ZeRO 1/2) drops the data-parallel all-reduce of the segment layouts (trust ratios per
        ZeRO partition, still summed over the TP group); ``own-clip`` (LARS, one param group): our optimizer's own
        max_grad_norm, given to plain deepspeed.initialize (gradient_clipping 0) and attach(engine), so the
        global norm is ours (its partial sums all-reduced over the DP and the TP group).
pipe:   ds_problem's model as a 2-stage PipelineModule, 2 micro-batches per step and data-parallel rank. Through
        ds_conadv.initialize (DeepSpeed clips), or (``own-clip``) our optimizer's own max_grad_norm given to plain
        deepspeed.initialize (gradient_clipping 0) and attach(engine); ``naive``: own-clip without attach (the
        norm of this stage only).
pipe-conadv: a PipelineModule with a "conadv" section: writes the error ds_conadv.initialize raises.
"""
import argparse
import dataclasses
import json

import torch
import torch.distributed as dist

import deepspeed

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

import ds_conadv  # noqa: E402
from ds_conadv.integrations import deepspeed as ds_integration  # noqa: E402
from ds_conadv.optim import unmark_sharded  # noqa: E402

TP_SIZE = 2
AUTOTP_PARTITION = {"use_default_specs": False, "layer_specs": [
    {"patterns": [r"^0\.weight$", r"^0\.bias$"], "partition_type": "column"},
    {"patterns": [r"^2\.weight$"], "partition_type": "row"}]}
VARIANTS = ("", "naive", "naive-dp", "own-clip")


def _optimizer_section(name, params):
    return {"type": name.upper(), "params": params}


def _own_optimizer(name, model, params):
    opt_cls = ds_conadv.optim.LAMB if name == "lamb" else ds_conadv.optim.LARS
    params = dict(params)
    groups = (ds_conadv.optim.param_groups(model, params["weight_decay"])
              if params.pop("exclude_norm_and_bias", False) else model.parameters())
    return opt_cls(groups, **params)


def _replace_layouts(trust, **changes):
    """Every segment layout of ``trust`` with some fields changed (the naive variants)."""
    for first, layout in list(trust._layouts.values()):
        trust.set_segment_layout(first, dataclasses.replace(layout, _ids_cache=None, **changes))


def run_autotp(name, stage, variant, steps):
    import tp_problem

    dp_world = dist.get_world_size() // TP_SIZE
    micro = tp_problem.GLOBAL_BATCH // dp_world
    model = tp_problem.make_model()
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
              "tensor_parallel": {"autotp_size": TP_SIZE, "partition_config": AUTOTP_PARTITION}}
    params = tp_problem.optimizer_params(name)
    if variant == "own-clip":
        optimizer = _own_optimizer(name, model, params)
        config.update(gradient_clipping=0.0, zero_allow_untested_optimizer=True)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        ds_integration.attach(engine)
    else:
        config["optimizer"] = _optimizer_section(name, params)
        engine, *_ = ds_conadv.initialize(model=model, config=config)
    trust = ds_integration.find_trust_optimizer(engine.optimizer)
    if variant == "naive":
        for p in engine.module.parameters():
            unmark_sharded(p)
        _replace_layouts(trust, shard_groups=None)
    elif variant == "naive-dp":
        _replace_layouts(trust, norm_hook=None)
    dp_rank = engine.mpu.get_data_parallel_rank()
    assert engine.mpu.get_data_parallel_world_size() == dp_world
    for step in range(steps):
        x, y = tp_problem.batch(step)
        x, y = x[dp_rank * micro:(dp_rank + 1) * micro], y[dp_rank * micro:(dp_rank + 1) * micro]
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
    tp_group = ds_integration.compat.tensor_parallel_group(engine)
    full = {}
    for pname, p in engine.module.named_parameters():
        value = p.detach()
        dim = 0 if pname in tp_problem.COLUMN else 1 if pname in tp_problem.ROW else None
        if dim is not None:
            parts = [torch.empty_like(value) for _ in range(dist.get_world_size(tp_group))]
            dist.all_gather(parts, value.contiguous(), group=tp_group)
            value = torch.cat(parts, dim)
        full[pname] = value.double().reshape(-1).tolist()
    return full, trust, engine


def run_pipe(name, stage, variant, steps):
    import ds_problem
    from deepspeed.pipe import PipelineModule

    model = PipelineModule(layers=list(ds_problem.make_model()), num_stages=2, loss_fn=torch.nn.MSELoss(),
                           partition_method="uniform")
    dp_world = dist.get_world_size() // 2
    micro = ds_problem.GLOBAL_BATCH // (2 * dp_world)
    config = {"train_batch_size": ds_problem.GLOBAL_BATCH, "train_micro_batch_size_per_gpu": micro,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    params = ds_problem.optimizer_params(name)
    if variant in ("own-clip", "naive"):
        optimizer = _own_optimizer(name, model, params)
        config.update(gradient_clipping=0.0, zero_allow_untested_optimizer=True)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        if variant == "own-clip":
            ds_integration.attach(engine)
    else:
        config["optimizer"] = _optimizer_section(name, params)
        engine, *_ = ds_conadv.initialize(model=model, config=config)
    trust = ds_integration.find_trust_optimizer(engine.optimizer)
    dp_rank = engine.grid.get_data_parallel_rank()
    assert engine.grid.get_data_parallel_world_size() == dp_world
    for step in range(steps):
        x, y = ds_problem.batch(step, dp_rank, dp_world)
        engine.train_batch(iter([(x[:micro], y[:micro]), (x[micro:], y[micro:])]))
    # each stage holds its layers under the PipelineModule's names ("<layer index>.<param>"): collect the stages of
    # this data-parallel replica
    mine = {}
    for pname, p in engine.module.named_parameters():
        value = deepspeed.utils.safe_get_full_fp32_param(p) if stage else None
        mine[pname] = (value if value is not None else p.detach()).double().reshape(-1).tolist()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (dp_rank, mine))
    return {k: v for d, s in everyone if d == dp_rank for k, v in s.items()}, trust, engine


def run_pipe_conadv():
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


def parse_case(text):
    name, stage, *rest = text.split(":")
    variant = rest[0] if rest else ""
    if name not in ("lamb", "lars") or variant not in VARIANTS or len(rest) > 1:
        raise SystemExit(f"bad --case {text!r}: optimizer:stage[:variant], variant one of {VARIANTS[1:]}")
    return name, int(stage), variant


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("autotp", "pipe", "pipe-conadv"), required=True)
    ap.add_argument("--case", action="append", default=None)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    if args.mode == "pipe-conadv":
        json.dump({"rank": rank, "error": run_pipe_conadv()}, open(f"{args.out}.rank{rank}", "w"))
        return
    run = run_autotp if args.mode == "autotp" else run_pipe
    results = {}
    for case in args.case or ["lamb:0"]:
        full, trust, engine = run(*parse_case(case), args.steps)
        results[case] = {"params": full, "wrapper": type(engine.optimizer).__name__,
                         "optimizer": type(trust).__name__}
        engine.destroy()
    json.dump({"rank": rank, "results": results}, open(f"{args.out}.rank{rank}", "w"))


if __name__ == "__main__":
    from rank_exit import leave_rank

    main()
    leave_rank()
