"""The ``ds-conadv`` command.

Subcommands:

``ds-conadv train``
    The main job: ConAdv training through DeepSpeed (:mod:`ds_conadv.train`). With no arguments it runs the
    embedded default (``ds_conadv/configs/conadv_digits.json`` = ``configs/conadv_digits.json``): a small CNN
    on scikit-learn's digits with LARS, ZeRO 1, ConAdv tau=1. ``--config PATH`` reads one JSON file holding
    DeepSpeed's config plus our ``"optimizer"``, ``"conadv"`` and ``"train"`` sections; flags override it.
    Runs as one process, under ``torchrun`` or the ``deepspeed`` launcher, or with ``--nproc N`` (re-launches
    itself through ``python -m torch.distributed.run --standalone``).

``ds-conadv bench``
    Optimizer step-time benchmark: forwards its arguments to
    ``benchmarks/optim_step.py`` (run from a source checkout).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import List, Optional, Sequence

from ds_conadv.config import ConfigError

__all__ = ["main", "build_parser", "resolve_train_args", "ConfigError"]

MODES = ("conadv", "disadv", "vanilla")


def _strip_local_rank(argv: List[str]) -> List[str]:
    """Drop ``--local_rank N`` / ``--local_rank=N`` (and ``--local-rank``) wherever they are: the deepspeed
    launcher puts it before the subcommand; the rank comes from the environment (LOCAL_RANK) anyway."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a in ("--local_rank", "--local-rank"):
            skip = i + 1 < len(argv)
            continue
        if a.startswith(("--local_rank=", "--local-rank=")):
            continue
        out.append(a)
    return out


def _strip_option(argv: List[str], name: str) -> List[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == name:
            skip = True
            continue
        if a.startswith(name + "="):
            continue
        out.append(a)
    return out


def resolve_train_args(args: argparse.Namespace):
    """(resolved config, config name, notes) for the ``train`` arguments; raises ConfigError."""
    from ds_conadv.app import job_config as train

    if args.config:
        raw = train.load_config_file(args.config)
        name = os.path.basename(args.config)
    else:
        raw = train.load_embedded(train.DEFAULT_CONFIG_NAME)
        name = train.DEFAULT_CONFIG_NAME
    cfg, notes = train.apply_overrides(raw, mode=args.mode, epochs=args.epochs, optimizer=args.optimizer,
                                       zero_stage=args.zero_stage, out_dir=args.out_dir, seed=args.seed,
                                       max_steps=args.max_steps, sets=args.set)
    world = os.environ.get("WORLD_SIZE") or getattr(args, "nproc", None)
    return train.validate_config(cfg, world_size=int(world) if world else None), name, notes


def _under_launcher() -> bool:
    return "WORLD_SIZE" in os.environ or "RANK" in os.environ


def _relaunch(argv: List[str], nproc: int, out_dir: str) -> int:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m ds_conadv.cli train ...`` with the
    same arguments (less ``--nproc``) and the output folder fixed here, so that all ranks agree on it."""
    child = _strip_option(_strip_option(argv, "--nproc"), "--out-dir")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ds_conadv.cli", *child, "--out-dir", out_dir]
    env = dict(os.environ)
    # one torch/OpenMP thread per rank unless asked otherwise: ranks and gloo's threads share the cores
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:
        pass
    print(f"ds-conadv train: launching {nproc} ranks: {' '.join(cmd[1:7])} ...", file=sys.stderr, flush=True)
    return subprocess.call(cmd, env=env)


def _cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: List[str]) -> int:
    try:
        resolved, name, notes = resolve_train_args(args)
    except ConfigError as e:
        parser.error(str(e))  # exits with status 2
    rank = os.environ.get("RANK", os.environ.get("HOROVOD_RANK", "0"))
    if rank == "0" and not (args.nproc or 0) > 1:  # once: here or on rank 0
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    if args.print_config:
        print(json.dumps(resolved.raw, indent=2))
        return 0
    from ds_conadv.app.common import default_out_dir
    from ds_conadv.app.job_config import check_runnable
    from ds_conadv.app.train import run

    try:
        check_runnable(resolved)
    except ConfigError as e:
        parser.error(str(e))
    if args.backend == "horovod":  # every rank runs this under horovodrun
        if args.nproc is not None:
            parser.error("--backend horovod: start the ranks with horovodrun --gloo -np N -H localhost:N, not --nproc")
        from ds_conadv.app.horovod_train import train_horovod

        try:
            train_horovod(resolved.raw, progress=not args.no_progress)
        except ConfigError as e:
            parser.error(str(e))
        return 0
    if args.nproc is not None:
        if args.nproc < 1:
            parser.error("--nproc must be >= 1")
        if _under_launcher():
            parser.error("--nproc starts the ranks itself; it cannot be used under torchrun/deepspeed "
                         "(RANK/WORLD_SIZE are set)")
        if args.nproc > 1:
            return _relaunch(argv, args.nproc, resolved.train.out_dir or default_out_dir(name))
    try:
        run(resolved, config_name=name, progress=not args.no_progress)
    except ConfigError as e:
        parser.error(str(e))
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

    t = sub.add_parser(
        "train", help="the main job: ConAdv training through DeepSpeed (default: CNN on sklearn digits, LARS)",
        description="ConAdv training through DeepSpeed. One JSON config: DeepSpeed's keys plus our "
                    '"optimizer", "conadv" and "train" sections (default: the embedded conadv_digits.json). '
                    "Runs as one process, under torchrun / the deepspeed launcher, or with --nproc N.")
    t.add_argument("--config", metavar="PATH", help="JSON config (default: the embedded conadv_digits.json)")
    t.add_argument("--nproc", type=int, metavar="N",
                   help="start N ranks (gloo on CPU) through python -m torch.distributed.run --standalone")
    t.add_argument("--backend", choices=("deepspeed", "horovod"), default="deepspeed",
                   help="deepspeed (default; one process, torchrun, the deepspeed launcher or --nproc) or horovod "
                        "(under horovodrun --gloo -np N -H localhost:N ds-conadv train --backend horovod)")
    t.add_argument("--mode", choices=MODES,
                   help="conadv: enabled, tau>=1 (the config's, else 1); disadv: tau=0; vanilla: no adversarial")
    t.add_argument("--epochs", type=int)
    t.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (train.max_steps)")
    t.add_argument("--optimizer", choices=("lars", "lamb"),
                   help="switch the optimizer type (its params and LR schedule from the embedded config of it)")
    t.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3))
    t.add_argument("--out-dir", metavar="DIR", help="output folder (default: runs/<config>-<timestamp>)")
    t.add_argument("--seed", type=int)
    t.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                   help="set any config key, VALUE as JSON (e.g. --set conadv.epsilon=2 --set train.width=16)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)

    sub.add_parser("hessian", add_help=False,
                   help="Hessian spectrum of a trained model: top eigenvalues, trace, density plot "
                        "(ds-conadv hessian --help)")
    b = sub.add_parser("bench", help="optimizer step-time benchmark (benchmarks/optim_step.py)",
                       add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER,
                   help="arguments for benchmarks/optim_step.py (try: ds-conadv bench --help)")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    if argv[:1] == ["bench"]:  # forward everything after "bench" untouched
        return _cmd_bench(argparse.Namespace(bench_args=argv[1:]), parser)
    if argv[:1] == ["hessian"]:  # its own parser: ds_conadv.app.hessian_cli.hessian_main
        from ds_conadv.app.hessian_cli import hessian_main

        return hessian_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    sub = parser._subparsers._group_actions[0].choices[args.command]  # for sub-command errors
    if args.command == "train":
        return args.func(args, sub, argv)
    return args.func(args, sub)


def console_main() -> None:
    """The ``ds-conadv`` console script (and ``python -m ds_conadv.cli``): :func:`main`, then exit. A rank of a
    multi-process DeepSpeed job that finished cleanly leaves with ``os._exit``: DeepSpeed 0.19 on CPU aborts now
    and then in a C++ destructor at interpreter exit (a joinable ``std::thread``: "terminate called without an
    active exception", seen in CI after all results were written), which would turn a good run into a failed
    one. Its results, logs and process group are closed by then; stdout/stderr and logging are flushed first."""
    rc = main()
    if rc == 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "deepspeed" in sys.modules:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.exit(rc)


if __name__ == "__main__":
    console_main()
