"""One rank of the tensor-parallel oracle check: optim_cases' problem with some tensors split along dim 0 over the
ranks (uneven shards, the zero-param and zero-grad tensors among them) and the others replicated; each backend
steps its shards and the gathered result is compared with the fp64 textbook formulas on the unsplit tensors.

Usage: tp_oracle.py --out FILE. Writes, per case, the largest error relative to each tensor's largest value.
"""
import argparse
import json

import torch
import torch.distributed as dist

from ds_conadv.optim import LAMB, LARS, BackendUnavailable, mark_sharded
from optim_cases import problem, textbook_lamb, textbook_lars

SHARDED = (1, 2, 3, 5, 8, 9)  # 7, 40x25, 17x241 (zero param), 129 (zero grad), 3x10x10, 3001 elements
STEPS = 8
CASES = {
    "lamb": (LAMB, textbook_lamb, {}),
    "lamb_max_grad_norm": (LAMB, textbook_lamb, dict(max_grad_norm=1.0)),
    "lamb_trust_clip": (LAMB, textbook_lamb, dict(trust_clip=True, weight_decay=0.1)),
    "lars": (LARS, textbook_lars, {}),
    "lars_max_grad_norm": (LARS, textbook_lars, dict(max_grad_norm=1.0)),
}
BACKENDS = (("reference", torch.float64), ("foreach", torch.float64), ("cpp", torch.float32))


def shard(t: torch.Tensor, index: int, rank: int, world: int) -> torch.Tensor:
    return torch.tensor_split(t, world, dim=0)[rank].clone() if index in SHARDED else t.clone()


def run(cls, knobs, backend, dtype, marked, params, grads, rank, world):
    mine = [shard(p, i, rank, world).to(dtype).requires_grad_(True) for i, p in enumerate(params)]
    if marked:
        for i in SHARDED:
            mark_sharded(mine[i])
    lr = 1e-2 if cls is LAMB else 0.5
    opt = cls(mine, lr=lr, backend=backend, **knobs)
    for step_grads in grads:
        for i, (p, g) in enumerate(zip(mine, step_grads)):
            p.grad = shard(g, i, rank, world).to(dtype)
        opt.step()
    out = []
    for i, p in enumerate(mine):
        if i in SHARDED:
            parts = [None] * world
            dist.all_gather_object(parts, p.detach().double())
            out.append(torch.cat(parts, 0))
        else:
            out.append(p.detach().double())
    return out


def error(actual, expected) -> float:
    return max(float((a - e).abs().max()) / max(float(e.abs().max()), 1e-30) for a, e in zip(actual, expected))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    params, grads = problem(steps=STEPS)
    errors = {}
    for case, (cls, oracle, knobs) in CASES.items():
        lr = 1e-2 if cls is LAMB else 0.5
        expected = oracle(params, grads, lr=lr, **knobs)
        for backend, dtype in BACKENDS:
            try:
                errors[f"{case}/{backend}"] = error(run(cls, knobs, backend, dtype, True, params, grads, rank, world),
                                                    expected)
            except BackendUnavailable:
                errors[f"{case}/{backend}"] = None
        errors[f"{case}/naive"] = error(run(cls, knobs, "foreach", torch.float64, False, params, grads, rank, world),
                                        expected)
    json.dump({"rank": rank, "errors": errors}, open(f"{args.out}.rank{rank}", "w"))


if __name__ == "__main__":
    from rank_exit import leave_rank

    main()
    leave_rank()
