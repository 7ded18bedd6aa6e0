"""JIT builds of the C++/CUDA kernels with ``torch.utils.cpp_extension`` + ninja, cached on disk.

The build directory is ``$DS_CONADV_EXT_DIR`` or ``~/.cache/ds_conadv/extensions/<torch version>``; a build
happens once per source/flag change (cpp_extension hashes both) and later imports just load the library. A build
says so in one line on stderr (the first step would otherwise seem to hang for a minute).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
from typing import Iterator, List, Optional, Sequence

_lock = threading.Lock()
_loaded: dict = {}
HERE = os.path.dirname(os.path.abspath(__file__))


def _root() -> str:
    import torch

    return os.environ.get("DS_CONADV_EXT_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "ds_conadv", "extensions", torch.__version__.replace("+", "_"))


def build_dir(name: str) -> str:
    path = os.path.join(_root(), name)
    os.makedirs(path, exist_ok=True)
    return path


def is_built(name: str, sources: List[str], extra_cflags: Optional[List[str]] = None,
             extra_cuda_cflags: Optional[List[str]] = None) -> bool:
    """Whether :func:`load_extension` with these arguments would find a library from an earlier build (and so
    only import it, without compiling)."""
    paths = [s if os.path.isabs(s) else os.path.join(HERE, s) for s in sources]
    flags = list(extra_cflags or []) + list(extra_cuda_cflags or [])
    full = f"{name}_{_digest(paths, flags)}"
    return full in _loaded or os.path.isfile(os.path.join(_root(), full, full + ".so"))


def _digest(paths: Sequence[str], flags: Sequence[str]) -> str:
    h = hashlib.sha1()
    for p in paths:
        # the path too: two installs (venvs, checkouts) with the same sources would share a build folder whose
        # ninja file names the other's sources, and each would rebuild the library the other has loaded
        h.update(os.path.abspath(p).encode())
        with open(p, "rb") as f:
            h.update(f.read())
    h.update(" ".join(flags).encode())
    return h.hexdigest()[:10]


def load_extension(name: str, sources: List[str], extra_cflags: Optional[List[str]] = None,
                   extra_cuda_cflags: Optional[List[str]] = None, verbose: bool = False,
                   label: str = "the kernels"):
    """Build (once) and import an extension from sources relative to ``kernels/``; ``label`` names it in the
    one-line notice printed before a build."""
    from torch.utils.cpp_extension import load

    paths = [s if os.path.isabs(s) else os.path.join(HERE, s) for s in sources]
    flags = list(extra_cflags or []) + list(extra_cuda_cflags or [])
    # the module name carries a digest of sources+flags so two versions never collide in one cache
    full = f"{name}_{_digest(paths, flags)}"
    with _lock:
        if full not in _loaded:
            folder = build_dir(full)
            if not os.path.isfile(os.path.join(folder, full + ".so")):
                print(f"ds_conadv: building {label} (first use, about a minute; cached in {folder})",
                      file=sys.stderr, flush=True)
            with _build_lock(folder):
                _loaded[full] = load(name=full, sources=paths, extra_cflags=extra_cflags or [],
                                     extra_cuda_cflags=extra_cuda_cflags or [], build_directory=folder,
                                     verbose=verbose or bool(os.environ.get("DS_CONADV_VERBOSE_BUILD")))
    return _loaded[full]


@contextlib.contextmanager
def _build_lock(folder: str) -> Iterator[None]:
    """One build per folder across processes, and no wait on a dead one.

    torch's ``cpp_extension`` serialises builds with a ``lock`` file that a killed build leaves behind; every later
    import then waits for it forever. Here an OS file lock (``flock``: released by the kernel when its holder dies)
    is taken first; whoever holds it is the only process of ours in that folder, so a ``lock`` file found then is
    a dead build's and is removed (with a line on stderr)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: torch's own lock file only
        yield
        return
    with open(os.path.join(folder, ".ds_conadv_build.flock"), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = os.path.join(folder, "lock")
            if os.path.exists(stale):
                os.remove(stale)
                print(f"ds_conadv: removed the lock file of an interrupted build in {folder}", file=sys.stderr,
                      flush=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
