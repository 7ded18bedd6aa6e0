"""The ``ds-conadv`` command.

Subcommands:

``ds-conadv train``
    The main job. With no arguments it runs the embedded default: a short
    large-batch run of an MLP on scikit-learn's digits data set (it ships with
    scikit-learn: no download) with ``ds_conadv.optim.LAMB``, and prints the
    final train and test accuracy. ``--config PATH`` reads a JSON file with the
    same keys as the embedded default (see ``configs/digits_*.json``);
    command-line flags override the file, and the file overrides the default.

``ds-conadv bench``
    Optimizer step-time benchmark: forwards its arguments to
    ``benchmarks/optim_step.py`` (run from a source checkout).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, Optional, Sequence

__all__ = ["main", "DEFAULT_TRAIN_CONFIG", "OPTIMIZER_DEFAULTS", "load_config",
           "resolve_train_config", "train_digits", "ConfigError"]


class ConfigError(ValueError):
    """A training config is invalid (unknown key, bad type or value)."""


# The embedded default of ``ds-conadv train``. ``None`` means "the optimizer's
# default" (see OPTIMIZER_DEFAULTS).
DEFAULT_TRAIN_CONFIG: Dict[str, Any] = {
    "dataset": "digits",
    "optimizer": "lamb",
    "epochs": 40,
    "batch_size": 1024,
    "lr": None,
    "weight_decay": None,
    "momentum": 0.9,            # LARS only
    "trust_coefficient": 0.001,  # LARS only
    "warmup_epochs": 4,
    "schedule": "cosine",       # or "poly" (power 2)
    "hidden": 256,
    "test_fraction": 0.2,
    "seed": 0,
    "backend": "auto",
    "threads": 1,               # torch threads for the run (restored after); null = torch's default.
                                # One is fastest for this small model and immune to oversubscription.
}

# Per-optimizer values used where the config leaves lr / weight_decay as None.
OPTIMIZER_DEFAULTS: Dict[str, Dict[str, float]] = {
    "lamb": {"lr": 0.02, "weight_decay": 0.01},
    "lars": {"lr": 4.0, "weight_decay": 1e-4},
}

_CHOICES = {
    "dataset": ("digits",),
    "optimizer": tuple(OPTIMIZER_DEFAULTS),
    "schedule": ("cosine", "poly"),
}
_TYPES = {
    "dataset": (str,), "optimizer": (str,), "schedule": (str,), "backend": (str,),
    "epochs": (int,), "batch_size": (int,), "hidden": (int,), "seed": (int,),
    "warmup_epochs": (int, float), "threads": (int, type(None)),
    "lr": (int, float, type(None)), "weight_decay": (int, float, type(None)),
    "momentum": (int, float), "trust_coefficient": (int, float), "test_fraction": (int, float),
}


def _validate(cfg: Dict[str, Any], source: str) -> Dict[str, Any]:
    allowed = sorted(DEFAULT_TRAIN_CONFIG)
    out = {}
    for key, value in cfg.items():
        norm = key.replace("-", "_")
        if norm not in DEFAULT_TRAIN_CONFIG:
            raise ConfigError(f"{source}: unknown key {key!r}; allowed keys: {', '.join(allowed)}")
        types = _TYPES[norm]
        if isinstance(value, bool) or not isinstance(value, types):
            names = "/".join("null" if t is type(None) else t.__name__ for t in types)
            raise ConfigError(f"{source}: key {key!r} must be {names}, got {value!r}")
        if norm in _CHOICES and value not in _CHOICES[norm]:
            raise ConfigError(f"{source}: key {key!r} must be one of {list(_CHOICES[norm])}, got {value!r}")
        out[norm] = value
    return out


def load_config(path: str) -> Dict[str, Any]:
    """Read a training config JSON (a flat object with DEFAULT_TRAIN_CONFIG's keys)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return _validate(data, path)


def resolve_train_config(file_cfg: Optional[Dict[str, Any]] = None,
                         overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Embedded default <- config file <- command-line overrides; fills optimizer defaults."""
    cfg = dict(DEFAULT_TRAIN_CONFIG)
    cfg.update(file_cfg or {})
    cfg.update(_validate({k: v for k, v in (overrides or {}).items() if v is not None}, "command line"))
    for key, value in OPTIMIZER_DEFAULTS[cfg["optimizer"]].items():
        if cfg[key] is None:
            cfg[key] = value
    if cfg["epochs"] < 1 or cfg["batch_size"] < 1 or cfg["hidden"] < 1:
        raise ConfigError("epochs, batch_size and hidden must be >= 1")
    if not 0.0 < cfg["test_fraction"] < 1.0:
        raise ConfigError("test_fraction must be in (0, 1)")
    if cfg["threads"] is not None and cfg["threads"] < 1:
        raise ConfigError("threads must be >= 1 or null")
    if cfg["lr"] <= 0 or cfg["weight_decay"] < 0 or cfg["warmup_epochs"] < 0:
        raise ConfigError("lr must be > 0, weight_decay and warmup_epochs >= 0")
    return cfg


# --------------------------------------------------------------------------- train

def _digits(test_fraction: float, seed: int):
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x.astype(np.float32), y, test_size=test_fraction, random_state=seed, stratify=y)
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0) + 1e-3  # some border pixels are constant
    return (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te


def _mlp(n_in: int, hidden: int, n_out: int):
    import torch.nn as nn

    return nn.Sequential(
        nn.Linear(n_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, n_out),
    )


def _build_optimizer(model, cfg: Dict[str, Any]):
    from ds_conadv.optim import LAMB, LARS, param_groups

    groups = param_groups(model, cfg["weight_decay"])
    if cfg["optimizer"] == "lamb":
        return LAMB(groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"], backend=cfg["backend"])
    return LARS(groups, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
                trust_coefficient=cfg["trust_coefficient"], backend=cfg["backend"])


def _lr_lambda(total_steps: int, warmup_steps: int, schedule: str):
    def f(step: int) -> float:  # step = number of optimizer steps already taken
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "poly":
            return (1.0 - progress) ** 2
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def train_digits(cfg: Dict[str, Any], progress: bool = True) -> Dict[str, Any]:
    """Run the digits job described by a resolved config; returns the metrics."""
    import torch

    threads_before = torch.get_num_threads()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    try:
        return _train_digits(cfg, progress)
    finally:
        torch.set_num_threads(threads_before)


def _train_digits(cfg: Dict[str, Any], progress: bool) -> Dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    torch.manual_seed(cfg["seed"])
    x_tr, y_tr, x_te, y_te = _digits(cfg["test_fraction"], cfg["seed"])
    x_tr, x_te = torch.from_numpy(x_tr), torch.from_numpy(x_te)
    y_tr, y_te = torch.from_numpy(y_tr).long(), torch.from_numpy(y_te).long()
    n = x_tr.shape[0]
    bs = min(cfg["batch_size"], n)
    steps_per_epoch = math.ceil(n / bs)
    total = cfg["epochs"] * steps_per_epoch

    model = _mlp(x_tr.shape[1], cfg["hidden"], 10)
    opt = _build_optimizer(model, cfg)
    warmup = int(round(cfg["warmup_epochs"] * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, warmup, cfg["schedule"]))
    gen = torch.Generator().manual_seed(cfg["seed"])

    t0 = time.perf_counter()
    bar = tqdm(range(cfg["epochs"]), desc=f"train {cfg['optimizer']}", unit="epoch",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    loss_v = float("nan")
    for _ in bar:
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            if idx.numel() < 2:  # BatchNorm needs more than one example
                continue
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_v = loss.item()
        if not math.isfinite(loss_v):
            raise FloatingPointError(f"training diverged (loss {loss_v}); lower the lr")
        bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{sched.get_last_lr()[0]:.3g}", refresh=False)
    bar.close()
    seconds = time.perf_counter() - t0

    model.eval()
    with torch.no_grad():
        train_acc = (model(x_tr).argmax(1) == y_tr).float().mean().item()
        test_acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    return {
        "optimizer": cfg["optimizer"], "backend": cfg["backend"], "epochs": cfg["epochs"],
        "batch_size": bs, "steps": total, "lr": cfg["lr"], "weight_decay": cfg["weight_decay"],
        "final_loss": loss_v, "train_accuracy": train_acc, "test_accuracy": test_acc,
        "train_examples": int(n), "test_examples": int(x_te.shape[0]), "seconds": seconds,
        "threads": torch.get_num_threads(),
    }


def _cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        file_cfg = load_config(args.config) if args.config else None
        cfg = resolve_train_config(file_cfg, {
            "optimizer": args.optimizer, "epochs": args.epochs, "batch_size": args.batch_size,
            "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed,
            "backend": args.backend, "threads": args.threads,
        })
    except ConfigError as e:
        parser.error(str(e))  # exits with status 2
    if args.print_config:
        print(json.dumps(cfg, indent=2))
        return 0
    metrics = train_digits(cfg, progress=not args.no_progress)
    print(f"optimizer={metrics['optimizer']} backend={metrics['backend']} "
          f"batch={metrics['batch_size']} steps={metrics['steps']} "
          f"final_loss={metrics['final_loss']:.4f} time={metrics['seconds']:.1f}s")
    print(f"train accuracy: {metrics['train_accuracy']:.4f}")
    print(f"test accuracy:  {metrics['test_accuracy']:.4f}")
    if args.metrics_json:
        d = os.path.dirname(os.path.abspath(args.metrics_json))
        os.makedirs(d, exist_ok=True)
        with open(args.metrics_json, "w", encoding="utf-8") as f:
            json.dump({"config": cfg, "metrics": metrics}, f, indent=2)
    return 0


# --------------------------------------------------------------------------- bench

def _find_benchmark() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (os.path.dirname(here), os.getcwd()):
        path = os.path.join(root, "benchmarks", "optim_step.py")
        if os.path.isfile(path):
            return path
    return None


def _cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    path = _find_benchmark()
    if path is None:
        print("benchmarks/optim_step.py not found: run `ds-conadv bench` from a source checkout, or\n"
              "  python benchmarks/optim_step.py --help", file=sys.stderr)
        return 1
    import importlib.util

    spec = importlib.util.spec_from_file_location("ds_conadv_bench_optim_step", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    rest = list(args.bench_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    return int(mod.main(rest) or 0)


# --------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ds-conadv", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="large-batch training run (default: MLP on sklearn digits with LAMB)",
                       description="Large-batch training; defaults: " + json.dumps(DEFAULT_TRAIN_CONFIG))
    t.add_argument("--config", metavar="PATH", help="JSON config (keys as the embedded default)")
    t.add_argument("--optimizer", choices=sorted(OPTIMIZER_DEFAULTS))
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--backend", help="optimizer backend (auto, reference, foreach, triton, cuda)")
    t.add_argument("--threads", type=int, help="torch.set_num_threads")
    t.add_argument("--metrics-json", metavar="PATH", help="write config and final metrics here")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)

    b = sub.add_parser("bench", help="optimizer step-time benchmark (benchmarks/optim_step.py)",
                       add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER,
                   help="arguments for benchmarks/optim_step.py (try: ds-conadv bench --help)")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # forward everything after "bench" untouched
        return _cmd_bench(argparse.Namespace(bench_args=argv[1:]), parser)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    sub = parser._subparsers._group_actions[0].choices[args.command]  # for sub-command errors
    return args.func(args, sub)


if __name__ == "__main__":
    sys.exit(main())
