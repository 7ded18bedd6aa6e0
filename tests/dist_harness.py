"""Start real rank processes (plain spawn, torchrun, or the deepspeed launcher) with a hard timeout."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: set by in-process runs of this test session (a leaked rendezvous port would be taken already): a child process
#: gets them only from the harness that starts it
_RENDEZVOUS_KEYS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                    "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS_KEYS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)  # the rank processes run the CPU backends
    return env


def _run(cmd: List[str], env: dict, timeout: float, cwd: Optional[Path] = None) -> str:
    try:
        proc = subprocess.run(cmd, env=env, cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(cmd)}\n--- stdout\n{proc.stdout[-6000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc.stdout


#: a rank's rendezvous store could not listen on the chosen port: another job took it between free_port() and
#: the bind (concurrent test runs on one machine); the launch is retried on a new port
PORT_TAKEN = "EADDRINUSE"


def _wait_all(procs: List[subprocess.Popen], timeout: float, what: str, label: str,
              kill: Callable[[subprocess.Popen], None]) -> List[str]:
    """Wait for every process under one hard deadline. The first one to exit non-zero ends the wait: the others
    are killed at once (a rank waiting in a collective for a dead peer would otherwise sit out the whole timeout)
    and the failure names it with its output. Each output pipe is drained by a thread as it is written (a full
    pipe would block its writer)."""
    chunks: List[List[str]] = [[] for _ in procs]
    readers = [threading.Thread(target=lambda out, proc: out.extend(iter(proc.stdout.readline, "")),
                                args=(chunks[i], proc), daemon=True) for i, proc in enumerate(procs)]
    for reader in readers:
        reader.start()

    def output(index: int) -> str:
        readers[index].join(timeout=30)
        return "".join(chunks[index])

    def stop(indices) -> None:
        for index in indices:
            try:
                kill(procs[index])
            except (ProcessLookupError, PermissionError):
                pass  # already gone
        for index in indices:
            procs[index].wait(timeout=30)

    deadline = time.monotonic() + timeout
    pending = set(range(len(procs)))
    while pending:
        for index in sorted(pending):
            if procs[index].poll() is None:
                continue
            pending.discard(index)
            if procs[index].returncode != 0:
                stop(pending)
                out = output(index)
                raise RankFailed(f"{label} {index} of {what} exited {procs[index].returncode}:\n{out[-8000:]}", out)
        if pending and time.monotonic() > deadline:
            stop(pending)
            raise AssertionError(f"{what} timed out after {timeout}s")
        if pending:
            time.sleep(0.05)
    return [output(index) for index in range(len(procs))]


class RankFailed(AssertionError):
    def __init__(self, message: str, output: str):
        super().__init__(message)
        self.output = output


def spawn(script: str, args: List[str], world_size: int = 2, timeout: float = 300) -> List[str]:
    """Start ``world_size`` processes of ``tests/workers/<script>`` with torch.distributed env vars."""
    for attempt in range(3):
        port = free_port()
        procs = []
        for rank in range(world_size):
            env = base_env()
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                       LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            procs.append(subprocess.Popen([sys.executable, str(WORKERS / script), *args], env=env, cwd=ROOT,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        try:
            return _wait_all(procs, timeout, f"{script} {' '.join(args)}", "rank", lambda proc: proc.kill())
        except RankFailed as exc:
            if PORT_TAKEN not in exc.output or attempt == 2:
                raise
    raise AssertionError("unreachable")


def torchrun(script: str, args: List[str], nproc: int = 2, timeout: float = 300) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(WORKERS / script), *args]
    return _run(cmd, base_env(), timeout)


def deepspeed_launcher(script: str, args: List[str], nproc: int = 2, timeout: float = 300) -> str:
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), f"--num_gpus={nproc}", f"--master_port={free_port()}", str(WORKERS / script), *args]
    return _run(cmd, base_env(), timeout)


def _run_nodes(cmds: List[List[str]], env: dict, timeout: float, what: str) -> List[str]:
    """Start one launcher process per simulated node, all at once; a hard timeout kills every one of them."""
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for cmd in cmds]
    return _wait_all(procs, timeout, what, "node", lambda proc: os.killpg(proc.pid, 9))  # launcher + its ranks


def torchrun_nodes(script: str, args: List[str], nnodes: int = 2, nproc: int = 1, timeout: float = 300) -> List[str]:
    """A multi-node torchrun launch simulated on this machine: one ``torchrun --nnodes N --node_rank i`` per node,
    all meeting at 127.0.0.1 (static rendezvous, as on a cluster with MASTER_ADDR set)."""
    port = free_port()
    cmds = [[sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node_rank={node}",
             f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={port}",
             str(WORKERS / script), *args] for node in range(nnodes)]
    return _run_nodes(cmds, base_env(), timeout, f"torchrun --nnodes {nnodes} {script}")


def deepspeed_launcher_nodes(script: str, args: List[str], hostfile: Path, nnodes: int = 2,
                             timeout: float = 300) -> List[str]:
    """A multi-node launch with DeepSpeed's launcher and a hostfile, simulated on this machine: without ssh
    (``--no_ssh``), the launcher runs once per node with its ``--node_rank`` (what a cluster scheduler does)."""
    launcher = Path(sys.executable).with_name("deepspeed")
    port = free_port()
    cmds = [[str(launcher), f"--hostfile={hostfile}", "--no_ssh", f"--node_rank={node}", "--master_addr=127.0.0.1",
             f"--master_port={port}", str(WORKERS / script), *args] for node in range(nnodes)]
    return _run_nodes(cmds, base_env(), timeout, f"deepspeed --hostfile --no_ssh {script}")
