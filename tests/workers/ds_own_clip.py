"""One rank: our optimizer's own ``max_grad_norm`` given to plain ``deepspeed.initialize`` under ZeRO (DeepSpeed's
``"gradient_clipping": 0``). LAMB with two param groups (ZeRO 1/2: one optimizer call per group) must be refused
at its first step with params untouched; LARS with one group steps. Prints one JSON line per case.

Usage: ds_own_clip.py --stage S
"""
import argparse
import json

import torch

import deepspeed

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # inference-only op, long JIT build

import ds_conadv  # noqa: E402
from ds_conadv.config import ConfigError  # noqa: E402
from ds_problem import GLOBAL_BATCH, batch, make_model, optimizer_params  # noqa: E402


def run_case(name: str, stage: int) -> dict:
    model = make_model()
    params = optimizer_params(name)
    groups = (ds_conadv.optim.param_groups(model, params["weight_decay"]) if params.pop("exclude_norm_and_bias", False)
              else model.parameters())
    optimizer = (ds_conadv.optim.LAMB if name == "lamb" else ds_conadv.optim.LARS)(groups, **params)
    world = torch.distributed.get_world_size()
    config = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
              "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0, "steps_per_print": 10**9,
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    before = [p.detach().clone() for p in engine.module.parameters()]
    x, y = batch(0, torch.distributed.get_rank(), world)
    engine.backward(torch.nn.functional.mse_loss(engine(x), y))
    try:
        engine.step()
    except ConfigError as exc:
        unchanged = all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
        return {"case": name, "refused": str(exc), "params_unchanged": unchanged}
    return {"case": name, "refused": None, "groups": len(optimizer.param_groups)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    for name in ("lamb", "lars"):
        print(json.dumps(run_case(name, args.stage)), flush=True)


if __name__ == "__main__":
    main()
