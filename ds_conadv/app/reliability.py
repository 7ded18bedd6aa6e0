"""What keeps a ``ds-conadv train`` run safe to stop, restart and leave alone: rank supervision (parent-death
signal, heartbeats, the launcher wrapper's signal forwarding), the output folder's status marker, and the
job's one-line failures.

Heartbeats: under ``ds-conadv train --nproc N`` the wrapper hands every rank a run folder
(``DS_CONADV_RUN_DIR``); each rank writes ``rank<r>`` there (its pid) and touches it every second from a daemon
thread. A rank that is stopped (SIGSTOP), killed or frozen stops touching it; the wrapper and the other ranks
notice within ``--rank-timeout`` seconds and everything exits with one line naming the rank. A rank that is alive
but hangs inside a collective is caught by the process-group timeout (the same ``--rank-timeout``).
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from ds_conadv.checkpointing import atomic_write_text

__all__ = ["TrainingDiverged", "set_parent_death_signal", "RUN_DIR_ENV", "RANK_TIMEOUT_ENV", "DEFAULT_RANK_TIMEOUT",
           "start_heartbeat", "stop_heartbeat", "stale_ranks", "rank_pids", "write_rank_error", "read_rank_errors",
           "prepare_out_dir", "write_status", "RESULT_FILES"]

RUN_DIR_ENV = "DS_CONADV_RUN_DIR"
RANK_TIMEOUT_ENV = "DS_CONADV_RANK_TIMEOUT"
DEFAULT_RANK_TIMEOUT = 60.0
_PR_SET_PDEATHSIG = 1


class TrainingDiverged(FloatingPointError):
    """A NaN/inf loss or too many consecutive skipped (non-finite) optimizer steps; the message says which."""


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``).
    False (nothing done) elsewhere. Safe in a ``preexec_fn``: no allocation beyond ctypes' call."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------------------- heartbeats
def _rank_file(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, f"rank{rank}")


def start_heartbeat(run_dir: str, rank: int, world: int, timeout: float) -> threading.Thread:
    """Write this rank's heartbeat file and touch it every second; the same thread watches the other ranks'
    files and, when one has not moved for ``timeout`` seconds, reports it (one line) and ends this process."""
    path = _rank_file(run_dir, rank)
    atomic_write_text(path, str(os.getpid()))
    started = time.time()

    def beat() -> None:
        while True:
            now = time.time()
            try:
                os.utime(path, (now, now))
            except OSError:
                pass  # the wrapper removed the run folder: it is shutting everything down
            stale = stale_ranks(run_dir, world, timeout, now=now, exclude=rank)
            if stale and now - started > timeout:
                peer, age = stale[0]
                msg = (f"rank {peer} sent no heartbeat for {age:.0f} s (stopped, hung or dead; "
                       f"--rank-timeout {timeout:g} s): rank {rank} stops")
                write_rank_error(run_dir, rank, msg, 1)  # the wrapper reports it
                os._exit(1)
            time.sleep(1.0)

    thread = threading.Thread(target=beat, name="ds_conadv-heartbeat", daemon=True)
    thread.start()
    return thread


def stop_heartbeat(run_dir: str, rank: int) -> None:
    """This rank has finished (or failed and said so): remove its file, so nobody waits for its beats."""
    try:
        os.remove(_rank_file(run_dir, rank))
    except OSError:
        pass


def stale_ranks(run_dir: str, world: int, timeout: float, now: Optional[float] = None,
                exclude: Optional[int] = None) -> List[Any]:
    """``[(rank, seconds since its last heartbeat)]`` of the ranks whose file exists and is older than
    ``timeout`` (a rank that has not written its file yet is still starting)."""
    now = time.time() if now is None else now
    out = []
    for r in range(world):
        if r == exclude:
            continue
        try:
            age = now - os.path.getmtime(_rank_file(run_dir, r))
        except OSError:
            continue
        if age > timeout:
            out.append((r, age))
    return out


def rank_pids(run_dir: str, world: int) -> Dict[int, int]:
    pids = {}
    for r in range(world):
        try:
            with open(_rank_file(run_dir, r), encoding="utf-8") as f:
                pids[r] = int(f.read().strip())
        except (OSError, ValueError):
            continue
    return pids


def write_rank_error(run_dir: Optional[str], rank: int, message: str, code: int) -> None:
    """Leave this rank's one-line failure (and its exit code) for the wrapper."""
    if not run_dir:
        return
    line = message.splitlines()[0] if message else ""
    try:
        atomic_write_text(os.path.join(run_dir, f"error{rank}"), f"{code}\t{line}")
    except OSError:
        pass


def read_rank_errors(run_dir: str) -> List[Any]:
    """``[(time written, rank, exit code, message)]``, oldest first: the first is the cause, later ones its
    echoes."""
    out = []
    try:
        names = os.listdir(run_dir)
    except OSError:
        return out
    for name in names:
        if name.startswith("error") and name[5:].isdigit():
            path = os.path.join(run_dir, name)
            try:
                with open(path, encoding="utf-8") as f:
                    code, _, message = f.read().strip().partition("\t")
                out.append((os.path.getmtime(path), int(name[5:]), int(code), message))
            except (OSError, ValueError):
                continue
    return sorted(out)


# ---------------------------------------------------------------------------------------------------- outputs
#: what a run writes into its output folder; any of them there means the folder belongs to a run
RESULT_FILES = ("status.json", "metrics.csv", "metrics.json", "curves.png", "absa_log.csv", "absa_log.json",
                "absa.png", "metrics_horovod.json", "checkpoints")


def prepare_out_dir(out_dir: str, *, overwrite: bool, resume: bool) -> None:
    """Refuse a folder that holds another run's results (``ConfigError``, one line) unless ``overwrite`` (its
    results are removed) or ``resume`` (the same run continues: its final results are removed, the checkpoints
    kept). Then write ``status.json`` with ``"complete": false``."""
    import shutil

    from ds_conadv.config.sections import ConfigError

    found = [n for n in RESULT_FILES if os.path.exists(os.path.join(out_dir, n))]
    if found and not (overwrite or resume):
        raise ConfigError(f"--out-dir {out_dir} already holds a run ({', '.join(found)}): pass --overwrite to "
                          "replace it, --resume to continue it, or another --out-dir")
    for name in found:
        if resume and name == "checkpoints":
            continue
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    os.makedirs(out_dir, exist_ok=True)
    write_status(out_dir, complete=False)


def write_status(out_dir: str, *, complete: bool, **fields: Any) -> None:
    """``status.json`` (atomic): ``complete`` is true only once every result file is written."""
    status = {"complete": complete, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(), **fields}
    try:
        atomic_write_text(os.path.join(out_dir, "status.json"), json.dumps(status, indent=1, default=str))
    except OSError:
        pass
