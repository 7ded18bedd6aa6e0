#!/usr/bin/env python
"""Learning-rate sweep: AdamW vs ds_conadv LAMB on a tiny randomly initialised BERT (CPU, minutes).

The task: sequence classification of 12 random tokens, label = whether tokens below half the vocabulary are
the majority (needs the embeddings and a pooled representation). Each optimizer runs at each learning rate
for ``--steps`` steps (batch 32, linear warm-up over the first 10 %, weight decay 0.01 on weights, none on
biases/LayerNorm — the groups HF Trainer and timm build), over ``--seeds`` seeds; the figure is the loss and
accuracy on a held-out validation split (never used for training), median over seeds.

    python benchmarks/lr_guidance.py --json benchmarks/results/lr_guidance-cpu.json

Results and the table: docs/migrating.md ("Learning rate").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

VOCAB, SEQ = 64, 12


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    labels = ((ids < VOCAB // 2).sum(dim=1) > SEQ // 2).long()
    return ids, labels


def model(seed):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=SEQ, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def groups(net, weight_decay):
    decay = [p for n, p in net.named_parameters() if p.ndim > 1]
    rest = [p for n, p in net.named_parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def run(name, lr, seed, steps, batch=32):
    from ds_conadv.optim import LAMB

    net = model(seed)
    params = groups(net, 0.01)
    opt = torch.optim.AdamW(params, lr=lr) if name == "adamw" else LAMB(params, lr=lr)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    x, y = data(steps * batch, 1000 + seed)
    vx, vy = data(1024, 7)  # validation split: the same for every run, disjoint seed from training
    for step in range(steps):
        out = net(input_ids=x[step * batch:(step + 1) * batch], labels=y[step * batch:(step + 1) * batch])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    with torch.no_grad():
        out = net(input_ids=vx, labels=vy)
    return float(out.loss), float((out.logits.argmax(-1) == vy).float().mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--adamw-lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    parser.add_argument("--lamb-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    jobs = [("adamw", lr) for lr in args.adamw_lrs] + [("lamb", lr) for lr in args.lamb_lrs]
    runs = [(n, lr, s) for n, lr in jobs for s in range(args.seeds)]
    bar = tqdm(runs, desc="lr sweep") if tqdm else runs
    results = {}
    start = time.time()
    for name, lr, seed in bar:
        results.setdefault((name, lr), []).append(run(name, lr, seed, args.steps))
    rows = []
    for (name, lr), values in results.items():
        rows.append({"optimizer": name, "lr": lr, "val_loss_median": statistics.median(v[0] for v in values),
                     "val_acc_median": statistics.median(v[1] for v in values),
                     "val_acc_per_seed": [v[1] for v in values]})
    print(f"{'optimizer':<8} {'lr':>8} {'val loss':>9} {'val acc':>8}  per seed")
    for r in rows:
        print(f"{r['optimizer']:<8} {r['lr']:>8g} {r['val_loss_median']:>9.4f} {r['val_acc_median']:>8.3f}  "
              + " ".join(f"{a:.3f}" for a in r["val_acc_per_seed"]))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"benchmark": "lr_guidance", "steps": args.steps, "seeds": args.seeds, "batch": 32,
                       "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                       "seconds": round(time.time() - start, 1), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
