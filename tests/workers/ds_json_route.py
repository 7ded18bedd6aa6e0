"""One rank of plain ``deepspeed.initialize`` runs whose config names our optimizer by its registered name
(``"optimizer": {"type": "ds_conadv.LAMB"}``): DeepSpeed builds it itself. One run per ZeRO stage in this process;
writes each run's final params, the class DeepSpeed built and whether it attached to ZeRO.

Usage: ds_json_route.py --optimizer lamb|lars --stages 0,1,2,3 --steps N --out FILE
"""
import argparse
import json

import torch

import deepspeed

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # inference-only op, not built in tests

import ds_conadv  # noqa: E402,F401  (registers ds_conadv.LAMB / ds_conadv.LARS in torch.optim)
from ds_conadv.integrations.deepspeed.zero_layout import find_trust_optimizer  # noqa: E402
from ds_conadv.optim import param_groups  # noqa: E402
from ds_problem import GLOBAL_BATCH, batch, make_model, optimizer_params  # noqa: E402


def run(stage, name, steps, rank, world):
    model = make_model()
    params = optimizer_params(name)
    clip = params.pop("max_grad_norm")
    # the norm/bias split needs the model, which DeepSpeed does not give the optimizer: the groups are passed in
    groups = param_groups(model, params["weight_decay"]) if params.pop("exclude_norm_and_bias", False) else None
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "zero_optimization": {"stage": stage},
        "gradient_clipping": clip,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "optimizer": {"type": f"ds_conadv.{name.upper()}", "params": params},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups or model.parameters(), config=config)
    for step in range(steps):
        x, y = batch(step, rank, world)
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()
    full = {}
    for pname, p in engine.module.named_parameters():
        value = deepspeed.utils.safe_get_full_fp32_param(p) if stage else None
        full[pname] = (value if value is not None else p.detach()).float().reshape(-1).tolist()
    basic = engine.basic_optimizer
    trust = find_trust_optimizer(engine.optimizer)
    return {"params": full, "basic": f"{type(basic).__module__}.{type(basic).__qualname__}",
            "trust_is_basic": trust is basic, "attached": bool(trust is not None and trust._ds_attached),
            "wrapper": type(engine.optimizer).__name__}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--optimizer", default="lamb")
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    results = {s: run(int(s), args.optimizer, args.steps, rank, world) for s in args.stages.split(",")}
    json.dump({"rank": rank, "runs": results}, open(f"{args.out}.rank{rank}", "w"))


if __name__ == "__main__":
    from rank_exit import leave_rank  # run as a script: tests/workers/ is on sys.path

    main()
    leave_rank()
