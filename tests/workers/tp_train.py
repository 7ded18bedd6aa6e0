"""One rank of a Megatron-style tensor-parallel run (2 ranks, TP = 2, plain torch.distributed): the column- and
row-parallel shards of tp_problem's model, trained with our LAMB/LARS and their own clipping; writes the gathered
full params of every case.

Usage: tp_train.py --out FILE [--steps N]
Cases: {lamb, lars} x {marked: shards marked with mark_sharded (exact), naive: unmarked (norms per shard)}.
"""
import argparse
import json

import torch
import torch.distributed as dist
from torch.nn import functional as F

from ds_conadv.optim import mark_sharded
from tp_problem import HIDDEN, batch, build_optimizer, make_model, optimizer_params


class _SumOverGroup(torch.autograd.Function):
    """Row-parallel output: forward sums the partial products over the group; backward passes the (replicated)
    gradient through unchanged."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class TensorParallelBlock(torch.nn.Module):
    def __init__(self, full: torch.nn.Sequential, rank: int, world: int, group):
        super().__init__()
        self.group = group
        part = HIDDEN // world
        cols = slice(rank * part, (rank + 1) * part)
        self.w0 = torch.nn.Parameter(full[0].weight.detach()[cols].clone())  # column-parallel
        self.b0 = torch.nn.Parameter(full[0].bias.detach()[cols].clone())
        self.w2 = torch.nn.Parameter(full[2].weight.detach()[:, cols].clone())  # row-parallel
        self.b2 = torch.nn.Parameter(full[2].bias.detach().clone())  # replicated
        self.norm = full[3]
        self.head = full[4]

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.w0, self.b0))
        z = _SumOverGroup.apply(F.linear(h, self.w2), self.group) + self.b2
        return self.head(self.norm(z))

    def sharded(self):
        return (self.w0, self.b0, self.w2)

    def full_params(self) -> dict:
        def gather(t, dim):
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size(self.group))]
            dist.all_gather(parts, t.detach().contiguous(), group=self.group)
            return torch.cat(parts, dim)

        out = {"0.weight": gather(self.w0, 0), "0.bias": gather(self.b0, 0), "2.weight": gather(self.w2, 1),
               "2.bias": self.b2.detach(), "3.weight": self.norm.weight.detach(), "3.bias": self.norm.bias.detach(),
               "4.weight": self.head.weight.detach(), "4.bias": self.head.bias.detach()}
        return {k: v.double().reshape(-1).tolist() for k, v in out.items()}


def train(name: str, marked: bool, steps: int, rank: int, world: int, group) -> dict:
    block = TensorParallelBlock(make_model(), rank, world, group)
    if marked:
        for p in block.sharded():
            mark_sharded(p, group)
    opt = build_optimizer(name, block, optimizer_params(name))
    for step in range(steps):
        x, y = batch(step)  # every tensor-parallel rank sees the same batch
        opt.zero_grad()
        F.mse_loss(block(x), y).backward()
        opt.step()
    return block.full_params()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))  # a group of its own, not the default one
    results = {f"{name}_{'marked' if marked else 'naive'}": train(name, marked, args.steps, rank, world, group)
               for name in ("lamb", "lars") for marked in (True, False)}
    json.dump({"rank": rank, "results": results}, open(f"{args.out}.rank{rank}", "w"))


if __name__ == "__main__":
    from rank_exit import leave_rank

    main()
    leave_rank()
