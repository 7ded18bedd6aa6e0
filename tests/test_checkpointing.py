"""Checkpoint manifests and atomic commits: corrupted, truncated or missing files are refused by name."""
from __future__ import annotations

import json
import os

import pytest
import torch

from ds_conadv.checkpointing import (CheckpointError, atomic_write_text, commit_directory, verify_directory,
                                     write_manifest)


def _make(tmp_path, name="staging"):
    d = tmp_path / name
    (d / "global_step3").mkdir(parents=True)
    torch.save({"w": torch.arange(1000.0)}, d / "global_step3" / "mp_rank_00_model_states.pt")
    (d / "trainer.json").write_text(json.dumps({"step": 3}))
    return d


def test_commit_then_verify_round_trip(tmp_path):
    staging = _make(tmp_path)
    final = tmp_path / "ckpt" / "step3"
    commit_directory(str(staging), str(final), meta={"step": 3})
    assert not staging.exists()
    assert verify_directory(str(final)) == {"step": 3}
    # a second commit replaces the first whole
    staging2 = _make(tmp_path, "staging2")
    (staging2 / "trainer.json").write_text(json.dumps({"step": 4}))
    commit_directory(str(staging2), str(final), meta={"step": 4})
    assert verify_directory(str(final)) == {"step": 4}
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step3"]


@pytest.mark.parametrize("fault", ["flip64", "truncate", "missing", "no_manifest", "bad_manifest"])
def test_damaged_checkpoint_is_refused_naming_the_file(tmp_path, fault):
    d = _make(tmp_path)
    write_manifest(str(d))
    target = d / "global_step3" / "mp_rank_00_model_states.pt"
    if fault == "flip64":  # 64 bytes flipped inside the tensor data: torch.load would read it silently
        data = bytearray(target.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
        target.write_bytes(bytes(data))
        torch.load(target)  # the damage is invisible to the loader itself
    elif fault == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif fault == "missing":
        target.unlink()
    elif fault == "no_manifest":
        (d / "manifest.json").unlink()
    else:
        (d / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError) as info:
        verify_directory(str(d))
    msg = str(info.value)
    assert "\n" not in msg
    if fault in ("flip64", "truncate", "missing"):
        assert "global_step3/mp_rank_00_model_states.pt" in msg
    else:
        assert "manifest" in msg


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_text(str(path), "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(str(path), "new")
    assert path.read_text() == "old"
