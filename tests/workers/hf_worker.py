"""HF Trainer / accelerate on a tiny random BERT, under DeepSpeed on CPU (1 rank directly, 2 under torchrun).

Writes one ``result-<case>-rank<r>.json`` per case and rank: the classes of the optimizer chain that stepped
and the losses.
``--cases`` lists ``<route>:<stage>`` items; routes: ``cls`` (optimizer_cls_and_kwargs, guarded), ``adamw``
(Trainer's default), ``dropped`` (optimizers=(LAMB, None), unguarded: Trainer swaps it), ``guard-dropped`` and
``guard-json`` (the guard must refuse), ``registered`` (a JSON type naming a LAMB registered in
torch.optim), ``conadv`` (ConAdvTrainer, tau=1, embeddings), ``accelerate``
(accelerator.prepare with LAMB; one per process: accelerate allows one DeepSpeed plugin per process).
"""
import argparse
import json
import os
import sys

import torch

from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from ds_conadv.integrations.hf import OptimizerGuard, OptimizerSwapError, find_trust_optimizer
from ds_conadv.optim import LAMB

LR = 1e-2


def tiny_bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=16, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def dataset(n=64):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (n, 8), generator=g)
    labels = (ids[:, 0] < 32).long()
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def ds_config(stage):
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": 0.0, "zero_optimization": {"stage": stage}}


def trainer_args(out, deepspeed=None):
    return TrainingArguments(out, per_device_train_batch_size=4, max_steps=4, learning_rate=LR, weight_decay=0.01,
                             max_grad_norm=0.0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             deepspeed=deepspeed, disable_tqdm=True, seed=0)


CONADV = {"enabled": True, "tau": 1, "perturb": "embeddings", "embedding_module": "bert.embeddings", "epsilon": 0.05,
          "dual_bn": False}


def chain(optimizer):
    names = []
    while optimizer is not None and len(names) < 8:
        names.append(type(optimizer).__name__)
        optimizer = getattr(optimizer, "optimizer", None)
    return names


def run_trainer(route, stage, out):
    model = tiny_bert()
    cfg = ds_config(stage)
    if route == "guard-json":
        cfg["optimizer"] = {"type": "LAMB", "params": {"lr": LR}}
    if route == "registered":  # DeepSpeed looks names it does not know up in torch.optim
        torch.optim.DsConadvLAMB = LAMB
        cfg.update(optimizer={"type": "DsConadvLAMB", "params": {"lr": "auto", "weight_decay": "auto"}},
                   zero_allow_untested_optimizer=True)
    args = trainer_args(out, cfg if stage >= 0 else None)
    kwargs = {}
    if route == "cls":
        kwargs["optimizer_cls_and_kwargs"] = (LAMB, {"lr": LR})
    elif route in ("dropped", "guard-dropped"):
        kwargs["optimizers"] = (LAMB(model.parameters(), lr=LR), None)
    if route in ("cls", "guard-dropped", "guard-json", "registered"):
        kwargs["callbacks"] = [OptimizerGuard()]
    trainer_cls = Trainer
    if route == "conadv":
        from ds_conadv.integrations.hf import ConAdvTrainer

        trainer_cls = ConAdvTrainer
        kwargs.update(optimizer_cls_and_kwargs=(LAMB, {"lr": LR}), callbacks=[OptimizerGuard()],
                      conadv=CONADV)
    try:
        trainer = trainer_cls(model=model, args=args, train_dataset=dataset(), **kwargs)
    except OptimizerSwapError as exc:
        return {"refused": str(exc)}
    trainer.train()
    ours = find_trust_optimizer(trainer.optimizer)
    return {"chain": chain(trainer.optimizer), "attached": bool(getattr(ours, "_ds_attached", False)),
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            "stale_by": [e["conadv/stale_by"] for e in trainer.state.log_history if "conadv/stale_by" in e]}


def run_accelerate(stage):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    from ds_conadv.integrations.hf import check_deepspeed_config, require_trust_optimizer

    cfg = ds_config(stage)
    cfg.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1)
    check_deepspeed_config(cfg)
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg))
    model = tiny_bert()
    optimizer = LAMB(model.parameters(), lr=LR, weight_decay=0.01)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ours = require_trust_optimizer(optimizer)
    losses = []
    for step, batch in enumerate(loader):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step == 3:
            break
    return {"chain": chain(optimizer), "attached": bool(ours._ds_attached), "losses": losses}


def main():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(key, value)
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # inference-only op, long JIT build
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    for case in opts.cases:
        route, stage = case.split(":")
        out = os.path.join(opts.out, case.replace(":", "-"))
        result = run_accelerate(int(stage)) if route == "accelerate" else run_trainer(route, int(stage), out)
        result.update(case=case, rank=int(os.environ["RANK"]))
        # one file per case and rank: the ranks share one stdout, where their lines can interleave
        with open(os.path.join(opts.out, f"result-{case.replace(':', '-')}-rank{result['rank']}.json"), "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    sys.exit(main())
