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
from typing import List, NoReturn, Optional, Sequence

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

    if args.config and not os.path.exists(args.config) and args.config in train.embedded_config_names():
        raw = train.load_embedded(args.config)  # a config shipped in the package, by its name
        name = args.config
    elif args.config:
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


class UsageError(Exception):
    """A bad argument: reported as one line, exit 2."""


def _fail(message: str, code: int = 2) -> "NoReturn":
    first = str(message).strip().splitlines()
    print(f"ds-conadv: error: {first[0] if first else message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error format: one line ``ds-conadv: error: ...``, exit 2 (no usage block)."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        _fail(f"{message} (see {self.prog} --help)")


def _kill_ranks(proc: "subprocess.Popen", run_dir: str, nproc: int, grace: float = 3.0) -> None:
    """SIGTERM the launcher and every rank, SIGKILL what is left after ``grace`` seconds (stopped ranks too)."""
    import signal
    import time

    from ds_conadv.app.reliability import rank_pids

    def signal_all(sig: int) -> None:
        for pid in [proc.pid, *rank_pids(run_dir, nproc).values()]:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    signal_all(signal.SIGKILL)
    for pid in rank_pids(run_dir, nproc).values():  # the stopped ones need SIGCONT to act on nothing else
        try:
            os.kill(pid, signal.SIGCONT)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _relaunch(argv: List[str], nproc: int, out_dir: str, rank_timeout: float, debug: bool) -> int:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m ds_conadv.cli train ...`` with the
    same arguments (less ``--nproc``) and the output folder fixed here, so that all ranks agree on it.

    The launcher runs as a child that dies with this process (parent-death signal) and is supervised here:
    SIGINT/SIGTERM are forwarded to it and to every rank, a rank whose heartbeat stops for ``rank_timeout``
    seconds stops the run, and a failed rank is reported as its one-line error."""
    import signal
    import shutil
    import tempfile
    import time

    from ds_conadv.app import reliability

    child = _strip_option(_strip_option(argv, "--nproc"), "--out-dir")
    cmd = [sys.executable, "-m", "ds_conadv.app.launcher", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ds_conadv.cli", *child, "--out-dir", out_dir]
    run_dir = tempfile.mkdtemp(prefix="ds_conadv-ranks-")
    env = dict(os.environ)
    # one torch/OpenMP thread per rank unless asked otherwise: ranks and gloo's threads share the cores
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env[reliability.RUN_DIR_ENV] = run_dir
    env[reliability.RANK_TIMEOUT_ENV] = str(rank_timeout)
    if debug:
        env["DS_CONADV_DEBUG"] = "1"
    try:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:
        pass
    print(f"ds-conadv train: launching {nproc} ranks: {' '.join(cmd[1:6])} ...", file=sys.stderr, flush=True)
    received: List[int] = []

    def forward(signum, _frame) -> None:
        received.append(signum)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        proc = subprocess.Popen(cmd, env=env, preexec_fn=reliability.set_parent_death_signal)
        problem: Optional[str] = None
        while proc.poll() is None:
            if received:
                problem = f"stopped by {signal.Signals(received[0]).name}"
                break
            stale = reliability.stale_ranks(run_dir, nproc, rank_timeout)
            if stale:
                peer, age = stale[0]
                problem = (f"rank {peer} sent no heartbeat for {age:.0f} s (stopped, hung or dead; "
                           f"--rank-timeout {rank_timeout:g} s): all ranks stopped")
                break
            time.sleep(0.2)
        if problem is not None or proc.returncode != 0:
            _kill_ranks(proc, run_dir, nproc)
        errors = reliability.read_rank_errors(run_dir)
        if problem is None and proc.returncode == 0:
            return 0
        code = 1
        if problem is None and errors:
            _, rank, code, message = errors[0]
            problem = f"rank {rank}: {message}"
        if problem is None:
            problem = f"a rank failed (launcher exit {proc.returncode}); see its output above"
        reliability.write_status(out_dir, complete=False, error=problem)
        if received:
            print(f"ds-conadv: {problem}: the launcher and all ranks were stopped", file=sys.stderr, flush=True)
            return 128 + received[0]
        print(f"ds-conadv: error: {problem}", file=sys.stderr, flush=True)
        return code or 1
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        shutil.rmtree(run_dir, ignore_errors=True)


def _resume_dir(args: argparse.Namespace, out_dir: Optional[str]) -> Optional[str]:
    if args.resume is None:
        return None
    if args.resume:
        return args.resume
    if not out_dir:
        raise UsageError("--resume without a folder continues the run in --out-dir: give --out-dir DIR")
    return os.path.join(out_dir, "checkpoints")


def _cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: List[str]) -> int:
    resolved, name, notes = resolve_train_args(args)
    rank = os.environ.get("RANK", os.environ.get("HOROVOD_RANK", "0"))
    if rank == "0" and not (args.nproc or 0) > 1:  # once: here or on rank 0
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    if args.print_config:
        print(json.dumps(resolved.raw, indent=2))
        return 0
    from ds_conadv.app import reliability
    from ds_conadv.app.common import default_out_dir
    from ds_conadv.app.job_config import check_runnable
    from ds_conadv.app.train import RunOptions, run

    check_runnable(resolved, args.backend)
    if args.rank_timeout is not None and args.rank_timeout <= 0:
        raise UsageError("--rank-timeout must be > 0 seconds")
    if args.save_every is not None and args.save_every < 1:
        raise UsageError("--save-every must be >= 1 step")
    if args.max_skipped is not None and args.max_skipped < 0:
        raise UsageError("--max-skipped must be >= 0 (0: never stop for skipped steps)")
    rank_timeout = args.rank_timeout or float(os.environ.get(reliability.RANK_TIMEOUT_ENV,
                                                             reliability.DEFAULT_RANK_TIMEOUT))
    resume = _resume_dir(args, resolved.train.out_dir)
    if args.backend == "horovod":  # every rank runs this under horovodrun
        if args.nproc is not None:
            raise UsageError("--backend horovod: start the ranks with horovodrun --gloo -np N -H localhost:N, "
                             "not --nproc")
        if resolved.absa_enabled:
            raise UsageError('--backend horovod runs the ConAdv job; the ABSA job ("absa.enabled") runs under the '
                             "DeepSpeed backend")
        from ds_conadv.app.horovod_train import train_horovod
        from ds_conadv.app.run_folder import find_checkpoint
        from ds_conadv.checkpointing import verify_directory

        if resume:
            verify_directory(find_checkpoint(resume))  # refuse a bad checkpoint before Horovod starts
        train_horovod(resolved.raw, progress=not args.no_progress, resume=resume, save_every=args.save_every or 0,
                      max_skipped=10 if args.max_skipped is None else args.max_skipped, overwrite=args.overwrite,
                      config_name=name)
        return 0
    if args.nproc is not None:
        if args.nproc < 1:
            raise UsageError("--nproc must be >= 1")
        if _under_launcher():
            raise UsageError("--nproc starts the ranks itself; it cannot be used under torchrun/deepspeed "
                             "(RANK/WORLD_SIZE are set)")
    if args.save_every and not resolved.train.out_dir and _under_launcher() \
            and not os.environ.get(reliability.RUN_DIR_ENV):
        raise UsageError("--save-every under torchrun/deepspeed needs --out-dir: every rank writes into the same "
                         "checkpoint folder")
    out_dir = resolved.train.out_dir or default_out_dir(name)
    if resume:
        from ds_conadv.app.run_folder import find_checkpoint
        from ds_conadv.checkpointing import verify_directory

        verify_directory(find_checkpoint(resume))  # refuse a bad checkpoint before any rank starts
    if rank == "0" and not os.environ.get(reliability.RUN_DIR_ENV):  # the wrapper prepared it for its ranks
        reliability.prepare_out_dir(out_dir, overwrite=args.overwrite, resume=bool(resume))
    if args.nproc is not None and args.nproc > 1:
        return _relaunch(argv, args.nproc, out_dir, rank_timeout, args.debug)
    resolved.train.out_dir = out_dir
    try:
        run(resolved, config_name=name, progress=not args.no_progress,
            options=RunOptions(save_every=args.save_every or 0, resume=resume, rank_timeout=rank_timeout,
                               max_skipped=10 if args.max_skipped is None else args.max_skipped))
    except BaseException as exc:
        if rank == "0":
            reliability.write_status(out_dir, complete=False, error=f"{type(exc).__name__}: {exc}")
        raise
    if rank == "0":  # every result file is written
        reliability.write_status(out_dir, complete=True)
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
    return int(mod.main(rest, prog="ds-conadv bench") or 0)


# --------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ds-conadv", description=__doc__.split("\n\n")[0])
    from ds_conadv import __version__

    p.add_argument("--version", action="version", version=f"ds-conadv {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

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
    t.add_argument("--save-every", type=int, metavar="N",
                   help="checkpoint every N optimizer steps (the ABSA job: every N epochs) into "
                        "OUT_DIR/checkpoints/step<steps> (sha256 manifest, atomic; the newest is kept)")
    t.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                   help="continue from a checkpoint (verified first): DIR = a checkpoint, a checkpoints folder or "
                        "a run's --out-dir; no DIR: --out-dir's newest")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --out-dir (refused otherwise)")
    t.add_argument("--rank-timeout", type=float, metavar="SECONDS",
                   help="a rank that stalls (no heartbeat, or a collective waiting) this long stops the whole "
                        f"run (default {60:g})")
    t.add_argument("--max-skipped", type=int, metavar="K",
                   help="stop as diverged after K consecutive skipped (non-finite) optimizer steps (default 10; "
                        "0: never)")
    t.add_argument("--debug", action="store_true", help="show the traceback of an error")
    t.set_defaults(func=_cmd_train)

    sub.add_parser("hessian", add_help=False,
                   help="Hessian spectrum of a trained model: top eigenvalues, trace, density plot "
                        "(ds-conadv hessian --help)")
    sub.add_parser("study", add_help=False,
                   help="the reproduction study: which large-batch remedies pay (ds-conadv study --help)")
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
    if argv[:1] == ["study"]:  # its own parser: ds_conadv.study.runner.main
        from ds_conadv.study.runner import main as study_main

        return study_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    sub = parser._subparsers._group_actions[0].choices[args.command]  # for sub-command errors
    if args.command == "train":
        return _train_reporting_errors(args, sub, argv)
    return args.func(args, sub)


def _train_reporting_errors(args: argparse.Namespace, sub: argparse.ArgumentParser, argv: List[str]) -> int:
    """``ds-conadv train`` with its failures as one line ``ds-conadv: error: ...`` (the traceback with --debug):
    bad config or argument, unusable checkpoint, missing file: exit 2; divergence and other failures: exit 1.
    A rank started by ``--nproc`` also leaves the line for the wrapper (which reports the first failing rank)
    and dies with its launcher (parent-death signal); it sends heartbeats the wrapper and its peers watch."""
    from ds_conadv.app import reliability

    run_dir = os.environ.get(reliability.RUN_DIR_ENV) if _under_launcher() else None
    rank = int(os.environ.get("RANK", "0"))
    if run_dir:
        reliability.set_parent_death_signal()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        timeout = args.rank_timeout or float(os.environ.get(reliability.RANK_TIMEOUT_ENV,
                                                            reliability.DEFAULT_RANK_TIMEOUT))
        reliability.start_heartbeat(run_dir, rank, world, timeout)
    try:
        return _train_one_line(args, sub, argv, run_dir, rank)
    finally:
        if run_dir:  # this rank is done (or failed, and says so): its peers stop watching it
            reliability.stop_heartbeat(run_dir, rank)


def _train_one_line(args: argparse.Namespace, sub: argparse.ArgumentParser, argv: List[str], run_dir: Optional[str],
                    rank: int) -> int:
    from ds_conadv.app import reliability
    from ds_conadv.checkpointing import CheckpointError

    debug = args.debug or os.environ.get("DS_CONADV_DEBUG") == "1"
    try:
        return _cmd_train(args, sub, argv)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        reliability.write_rank_error(run_dir, rank, "interrupted", 130)
        print("ds-conadv: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line (a traceback only with --debug)
        code, message = _describe_failure(exc, CheckpointError, reliability.TrainingDiverged)
        reliability.write_rank_error(run_dir, rank, message, code)
        if debug:
            raise
        if run_dir:  # the wrapper reports the first failing rank's line
            raise SystemExit(code) from None
        world = int(os.environ.get("WORLD_SIZE", "1"))
        _fail((f"rank {rank}: " if world > 1 else "") + message, code)


def _describe_failure(exc: BaseException, checkpoint_error: type, diverged: type):
    """(exit code, one line) for an exception of a training run."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (ConfigError, UsageError)):
        return 2, text
    if isinstance(exc, checkpoint_error):
        return 2, text
    if isinstance(exc, FileNotFoundError):
        return 2, f"no such file: {exc.filename or text}"
    if isinstance(exc, diverged):
        return 1, text
    return 1, f"{type(exc).__name__}: {text[:300]} (--debug shows the traceback)"


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
