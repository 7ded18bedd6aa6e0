"""Checkpoint files that are either whole and verified or refused: atomic writes and a sha256 manifest.

A checkpoint directory is *committed* by :func:`commit_directory`: its files are hashed into ``manifest.json``
and the directory is renamed into place in one step, so a reader sees either the previous checkpoint or the
complete new one, never a half-written one. :func:`verify_directory` re-hashes every file before anything is
loaded: a flipped byte, a truncated or a missing file raises :class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Dict, Optional

MANIFEST = "manifest.json"
_FORMAT = 1
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted; the message names the directory or file and what is wrong."""


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def build_manifest(directory: str, meta: Optional[dict] = None) -> dict:
    files: Dict[str, dict] = {}
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, directory).replace(os.sep, "/")
            if rel == MANIFEST or name.startswith("."):
                continue
            files[rel] = {"sha256": sha256_file(full), "bytes": os.path.getsize(full)}
    return {"format": _FORMAT, "files": files, "meta": meta or {}}


def write_manifest(directory: str, meta: Optional[dict] = None) -> dict:
    manifest = build_manifest(directory, meta)
    atomic_write_text(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def commit_directory(staging: str, final: str, meta: Optional[dict] = None) -> dict:
    """Hash ``staging`` into its manifest and move it to ``final`` (replacing an older ``final`` whole)."""
    manifest = write_manifest(staging, meta)
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(final):
        old = os.path.join(parent, f".{os.path.basename(final)}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    _fsync_dir(parent)
    return manifest


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint {directory}: no such directory")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {directory}: no {MANIFEST} (not written by ds_conadv, or its save "
                              "did not finish)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("format") != _FORMAT or not isinstance(files, dict):
            raise ValueError("unknown format")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable manifest ({exc})") from None
    return manifest


def verify_directory(directory: str) -> dict:
    """Check every file listed in the manifest (size, then sha256). Returns the manifest's ``meta``."""
    manifest = read_manifest(directory)
    for rel, entry in sorted(manifest["files"].items()):
        full = os.path.join(directory, rel)
        if not os.path.isfile(full):
            raise CheckpointError(f"checkpoint {directory}: file {rel} is missing")
        size = os.path.getsize(full)
        if size != entry["bytes"]:
            raise CheckpointError(f"checkpoint {directory}: file {rel} has {size} bytes, the manifest says "
                                  f"{entry['bytes']} (truncated or overwritten)")
        if sha256_file(full) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {directory}: file {rel} does not match its sha256 (corrupted)")
    return manifest.get("meta", {})
