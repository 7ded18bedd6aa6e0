"""One rank under ``horovodrun``: checks of ds_conadv.integrations.horovod, results as JSON in ``OUT.rank{r}``.

Usage (see tests/test_horovod.py):
    horovodrun --gloo -np 2 -H localhost:2 python tests/workers/hvd_train.py basics --out FILE
    horovodrun --gloo -np 2 -H localhost:2 python tests/workers/hvd_train.py conadv --steps N --out FILE
        [--save-at K --ckpt DIR] [--resume DIR]

``basics``: settings survive the rebuild, broadcast, LAMB/LARS (+ gradient accumulation) under Horovod vs the
single-process optimizer at the same global batch (rank 0 computes the reference), and the ConAdv trainer in
its three modes vs the single-process ConAdvTrainer. ``conadv``: dual-BN ConAdv run with the tau=1 staleness
check on every rank, checkpoint/resume.
"""
import argparse
import copy
import json
import math

import torch
import torch.nn.functional as F
from torch import nn

import horovod.torch as hvd

from ds_conadv.config import ConAdvConfig
from ds_conadv.conadv import ConAdvTrainer, generate, prepare_model
from ds_conadv.integrations.horovod import (HorovodConAdvTrainer, broadcast_state, distributed_optimizer,
                                            group_settings)
from ds_conadv.optim import LAMB, LARS, param_groups

IN, HIDDEN, CLASSES, GLOBAL = 13, 37, 5, 16


def jsonable(v):
    if torch.is_tensor(v):
        return v.tolist()
    if isinstance(v, (tuple, list)):
        return [jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def flat(model):
    return {n: p.detach().reshape(-1).tolist() for n, p in model.named_parameters()}


def mlp(seed=4321, bn=False):
    torch.manual_seed(seed)
    mid = [nn.BatchNorm1d(HIDDEN)] if bn else []
    return nn.Sequential(nn.Linear(IN, HIDDEN), *mid, nn.Tanh(), nn.Linear(HIDDEN, CLASSES))


def global_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL, IN, generator=g) * 2, torch.randint(0, CLASSES, (GLOBAL,), generator=g)


def chunk(x, y, index, parts):
    n = x.shape[0] // parts
    return x[index * n:(index + 1) * n], y[index * n:(index + 1) * n]


def make_opt(name, model, **kw):
    if name == "lamb":
        return LAMB(param_groups(model, 0.01), lr=0.05, max_grad_norm=0.05, backend="foreach", **kw)
    return LARS(param_groups(model, 1e-3), lr=0.5, trust_coefficient=0.02, max_grad_norm=0.05, backend="foreach",
                **kw)


# ----------------------------------------------------------------------------------------------------------
def check_settings(out):
    rank = hvd.rank()
    model = mlp()
    results = {}
    lamb = LAMB([{"params": [model[0].weight], "lr": 0.01},
                 {"params": [model[0].bias, model[2].weight, model[2].bias], "lr": 0.02, "weight_decay": 0.0}],
                betas=(0.8, 0.99), eps=1e-7, weight_decay=0.05, bias_correction=False, grad_averaging=False,
                adam_w_mode=False, always_adapt=True, trust_clip=True, min_trust_ratio=0.01, max_trust_ratio=10.0,
                max_grad_norm=0.5, master_weights=True, backend="foreach")
    lars = LARS(model.parameters(), lr=0.3, momentum=0.8, weight_decay=5e-4, nesterov=True, trust_coefficient=0.01,
                eps=1e-7, trust_clip=True, always_adapt=True, max_grad_norm=2.0, master_weights=True,
                backend="reference")
    for name, opt in (("lamb", lamb), ("lars", lars)):
        before = group_settings(opt)
        wrapped = distributed_optimizer(opt, named_parameters=[(f"{name}.{n}", p) for n, p in model.named_parameters()])
        results[name] = {"before": jsonable(before), "after": jsonable(group_settings(wrapped)),
                         "isinstance": isinstance(wrapped, type(opt)), "wrapped": hasattr(wrapped, "synchronize")}

    class Lossy(torch.optim.SGD):  # a setting recomputed from a constructor argument: lost by the rebuild
        def __init__(self, params, lr=0.1, scale=1.0):
            super().__init__(params, lr=lr)
            for g in self.param_groups:
                g["scale"] = scale

    try:
        distributed_optimizer(Lossy(model.parameters(), scale=3.0),
                              named_parameters=[(f"lossy.{n}", p) for n, p in model.named_parameters()])
        results["lossy_error"] = None
    except RuntimeError as exc:
        results["lossy_error"] = str(exc)

    class DefaultsReader(torch.optim.SGD):  # like timm's Lamb: reads self.defaults at step time
        def __init__(self, params, lr=0.1, max_grad_norm=1.0):
            super().__init__(params, lr=lr)
            self.defaults["max_grad_norm"] = max_grad_norm

    reader = distributed_optimizer(DefaultsReader(model.parameters(), max_grad_norm=None),
                                   named_parameters=[(f"reader.{n}", p) for n, p in model.named_parameters()])
    results["defaults_max_grad_norm"] = reader.defaults["max_grad_norm"]

    # state carried over (e.g. after loading a checkpoint before wrapping)
    m2 = mlp()
    opt = make_opt("lamb", m2)
    F.cross_entropy(m2(torch.randn(4, IN)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    sd = opt.state_dict()
    wrapped = distributed_optimizer(opt, named_parameters=[(f"state.{n}", p) for n, p in m2.named_parameters()])
    sd2 = wrapped.state_dict()
    results["state_carried"] = all(torch.equal(sd["state"][i][k], sd2["state"][i][k])
                                   for i in sd["state"] for k in sd["state"][i])

    # broadcast: every rank starts from rank 0's params and buffers; no step is taken to make the state
    m3 = mlp(seed=100 + rank, bn=True)
    m3[1].running_mean.fill_(float(rank + 1))
    plain = make_opt("lamb", m3)
    if rank == 0:  # root has state (as after a resume), taken locally before wrapping; the others get it
        F.cross_entropy(m3(torch.randn(4, IN)), torch.tensor([0, 1, 2, 3])).backward()
        plain.step()
        plain.zero_grad()
    initial = flat(m3)
    opt = distributed_optimizer(plain, named_parameters=[(f"bc.{n}", p) for n, p in m3.named_parameters()])
    broadcast_state(m3, opt, root_rank=0)
    results["broadcast"] = {"initial": initial, "after": flat(m3), "running_mean": m3[1].running_mean.tolist(),
                            "state_steps": [float(s["step"]) for s in opt.state.values()],
                            "skipped_steps": int(opt.skipped_steps)}
    return results


# ----------------------------------------------------------------------------------------------------------
def check_equivalence(out, steps=4):
    rank, world = hvd.rank(), hvd.size()
    results = {}
    for name in ("lamb", "lars"):
        for k in (1, 2):
            model = mlp()
            opt = distributed_optimizer(make_opt(name, model), named_parameters=model.named_parameters(),
                                        backward_passes_per_step=k)
            broadcast_state(model, opt)
            for s in range(steps):
                x, y = global_batch(s)
                for i in range(k):
                    xc, yc = chunk(x, y, i * world + rank, k * world)
                    (F.cross_entropy(model(xc), yc) / k).backward()
                opt.step()  # synchronize() inside: the trust ratios and the clipping norm see averaged grads
                opt.zero_grad()
            entry = {"hvd": flat(model)}
            if rank == 0:  # the single-process optimizer at the same global batch
                ref = mlp()
                ref_opt = make_opt(name, ref)
                norms = []
                for s in range(steps):
                    x, y = global_batch(s)
                    F.cross_entropy(ref(x), y).backward()
                    norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])))
                    ref_opt.step()
                    ref_opt.zero_grad()
                entry["ref"] = flat(ref)
                entry["grad_norms"] = norms
            results[f"{name}_k{k}"] = entry

    # the ConAdv trainer, three modes, vs the single-process ConAdvTrainer at the same global batch (no BN, FGSM
    # without random start: each example's x̂ depends only on the weights and the example)
    modes = {"conadv": dict(tau=1), "disadv": dict(tau=0), "vanilla": dict(enabled=False)}
    for mode, kw in modes.items():
        cfg = ConAdvConfig(**{**dict(enabled=True, epsilon=0.2, attack="fgsm", dual_bn=False,
                                     input_range=(-6.0, 6.0)), **kw})
        model = prepare_model(mlp(), cfg)
        opt = make_opt("lamb", model)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        trainer = HorovodConAdvTrainer(model, opt, cfg=cfg, lr_scheduler=sched)

        def shard(r):
            s = 0
            while True:
                yield chunk(*global_batch(s), r, world)
                s += 1

        metrics = [trainer.train_batch(it) for it in [shard(rank)] for _ in range(steps)]
        entry = {"hvd": flat(model), "metrics": [{k2: jsonable(m[k2]) for k2 in (
            "stale_by", "generated_now", "generated_ahead", "adversarial", "global_step")} for m in metrics],
            "lr": trainer.optimizer.param_groups[0]["lr"]}
        if rank == 0:
            ref = prepare_model(mlp(), cfg)
            ref_opt = make_opt("lamb", ref)
            ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: 1.0 / (1 + s))
            ref_trainer = ConAdvTrainer(ref, ref_opt, cfg=cfg, lr_scheduler=ref_sched)
            it = (global_batch(s) for s in range(10**6))
            ref_metrics = [ref_trainer.train_batch(it) for _ in range(steps)]
            entry["ref"] = flat(ref)
            entry["ref_metrics"] = [{k2: jsonable(m[k2]) for k2 in ("stale_by", "generated_now", "generated_ahead",
                                                                    "adversarial")} for m in ref_metrics]
        results[mode] = entry
    return results


# ----------------------------------------------------------------------------------------------------------
def run_conadv(args):
    rank = hvd.rank()
    cfg = ConAdvConfig(enabled=True, tau=1, epsilon=0.3, attack="pgd", steps=2, step_size=0.2, random_start=True,
                       random_start_prob=0.5, target="random", input_range=(-6.0, 6.0), dual_bn=True)
    model = prepare_model(mlp(bn=True), cfg)
    opt = LARS(param_groups(model, 1e-3), lr=0.5, trust_coefficient=0.02, max_grad_norm=1.0, backend="foreach")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9 ** s)
    trainer = HorovodConAdvTrainer(model, opt, cfg=cfg, lr_scheduler=sched, seed=7)
    start = 0
    if args.resume:
        trainer.load_checkpoint(args.resume)
        start = trainer.global_step

    def stream(first):
        i = first
        while True:  # rank's own micro-batches (different data on each rank)
            g = torch.Generator().manual_seed(10_000 * rank + i)
            yield torch.randn(8, IN, generator=g) * 2, torch.randint(0, CLASSES, (8,), generator=g)
            i += 1

    data = stream(trainer.schedule.batches_consumed)
    metrics, checks = [], []
    prev = None  # (copy of w_{t-1}, generator state at the start of step t-1)
    for t in range(start, args.steps):
        w_t, gen_t = copy.deepcopy(model), trainer.schedule.generator.get_state()
        m = trainer.train_batch(data)
        batch = trainer.last_batch
        metrics.append({k: jsonable(m[k]) for k in ("loss", "clean_loss", "adv_loss", "stale_by", "generated_now",
                                                     "generated_ahead", "global_step")})
        if prev is not None:
            w_prev, gen_prev = prev
            g = torch.Generator()
            g.set_state(gen_prev)
            again = generate(w_prev, batch.x, batch.y, cfg, generator=g)
            g.set_state(gen_prev)
            from_current = generate(w_t, batch.x, batch.y, cfg, generator=g)
            checks.append({"step": t, "equal_prev": bool(torch.equal(batch.x_adv, again)),
                           "equal_current": bool(torch.equal(batch.x_adv, from_current)),
                           "gen_step": batch.gen_step})
        prev = (w_t, gen_t) if t >= 1 or args.resume else None
        if args.save_at is not None and t + 1 == args.save_at:
            trainer.save_checkpoint(args.ckpt)
    return {"params": flat(model), "metrics": metrics, "checks": checks, "start": start,
            "lr": trainer.optimizer.param_groups[0]["lr"], "global_step": trainer.global_step}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("task", choices=["basics", "conadv"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--save-at", type=int, default=None)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--resume", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    hvd.init()
    if args.task == "basics":
        result = {"settings": check_settings(args.out), "equivalence": check_equivalence(args.out)}
    else:
        result = run_conadv(args)
    result.update(rank=hvd.rank(), size=hvd.size())
    with open(f"{args.out}.rank{hvd.rank()}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
