"""One rank of a small ConAdv run through ds_conadv.initialize; writes final params and per-step metrics.

Usage: conadv_train.py --stage S --mode conadv|disadv|vanilla|plain --steps N --out FILE
       [--dtype fp32|bf16] [--gas G] [--save-at K --ckpt DIR] [--resume DIR]
       [--generation-start reduction|backward --slow-backward SECONDS]  (records when generation/epilogue start)
"""
import argparse
import json
import time

import torch

import deepspeed

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # inference-only op, ~95 s JIT build

import ds_conadv  # noqa: E402

IN, HIDDEN, CLASSES, MICRO = 13, 37, 5, 8


def make_model(norm="bn"):
    torch.manual_seed(4321)
    # DeepSpeed's bf16 mode keeps BatchNorm buffers in fp32, which CPU batch_norm rejects: bf16 runs use LayerNorm
    layer = torch.nn.BatchNorm1d(HIDDEN) if norm == "bn" else torch.nn.LayerNorm(HIDDEN)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), layer, torch.nn.Tanh(), torch.nn.Linear(HIDDEN, CLASSES))


def batches(start, rank):
    """Rank ``rank``'s endless stream of micro-batches, from micro-batch number ``start`` on."""
    i = start
    while True:
        gen = torch.Generator().manual_seed(10_000 * rank + i)
        yield torch.randn(MICRO, IN, generator=gen), torch.randint(0, CLASSES, (MICRO,), generator=gen)
        i += 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--mode", default="conadv")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--gas", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", required=True)
    ap.add_argument("--save-at", type=int, default=None)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--norm", default="bn", choices=["bn", "ln"])
    ap.add_argument("--generation-start", default=None, choices=["reduction", "backward"])
    ap.add_argument("--slow-backward", type=float, default=0.0, help="sleep in the backward of the first layer")
    ap.add_argument("--local_rank", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    config = {
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": args.gas,
        "train_batch_size": MICRO * args.gas * world, "zero_optimization": {"stage": args.stage},
        "gradient_clipping": 0.0, "steps_per_print": 10**9,
        "optimizer": {"type": "LARS", "params": {"lr": 0.5, "weight_decay": 1e-3, "trust_coefficient": 0.02,
                                                 "backend": "foreach", "exclude_norm_and_bias": True}},
    }
    if args.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    if args.mode != "plain":
        config["conadv"] = {"enabled": args.mode != "vanilla", "tau": 0 if args.mode == "disadv" else 1,
                            "attack": "fgsm", "epsilon": 0.1, "input_range": [-4.0, 4.0], "dual_bn": args.norm == "bn"}
    model = make_model(args.norm)
    events = []  # (what, perf_counter): backward_slow_done, epilogue_start, generate_start
    if args.slow_backward:
        def slow(module, grad_input, grad_output):
            time.sleep(args.slow_backward)
            events.append(("backward_slow_done", time.perf_counter()))
        model[0].register_full_backward_hook(slow)
    engine, *_ = ds_conadv.initialize(model=model, config=config)
    if args.generation_start is not None:
        engine.generation_start = args.generation_start
        epilogue, generate = engine.ds._backward_epilogue, engine.generate

        def recorded_epilogue(*a, **k):
            events.append(("epilogue_start", time.perf_counter()))
            return epilogue(*a, **k)

        def recorded_generate(*a, **k):
            events.append(("generate_start", time.perf_counter()))
            return generate(*a, **k)

        engine.ds._backward_epilogue = recorded_epilogue
        engine.generate = recorded_generate
    metrics = []
    start = 0
    if args.resume:
        engine.load_checkpoint(args.resume)
        start = engine.global_steps
    data = batches(engine.schedule.batches_consumed if args.mode != "plain" else start * args.gas, rank)
    for step in range(start, args.steps):
        if args.mode == "plain":  # plain DeepSpeed loop, the reference for vanilla mode
            for _ in range(args.gas):
                x, y = next(data)
                loss = torch.nn.functional.cross_entropy(engine(x), y)
                engine.backward(loss)
                engine.step()
            metrics.append({"loss": float(loss)})
        else:
            m = engine.train_batch(data)
            metrics.append({k: m[k] for k in ("loss", "clean_loss", "adv_loss", "stale_by", "generated_now",
                                              "generated_ahead")})
        if args.save_at is not None and step + 1 == args.save_at:
            engine.save_checkpoint(args.ckpt)
            break
    full = {}
    module = engine.module
    for name, p in module.named_parameters():
        value = deepspeed.utils.safe_get_full_fp32_param(p) if args.stage else None
        full[name] = (value if value is not None else p.detach()).float().reshape(-1).tolist()
    for name, b in module.named_buffers():
        full["buffer:" + name] = b.float().reshape(-1).tolist()
    overlap = getattr(engine, "overlap", None)
    json.dump({"rank": rank, "params": full, "metrics": metrics, "overlap": overlap, "events": events,
               "engine": type(engine).__name__}, open(f"{args.out}.rank{rank}", "w"))


if __name__ == "__main__":
    from rank_exit import leave_rank  # run as a script: tests/workers/ is on sys.path

    main()
    leave_rank()
