"""The multi-process harness itself: a failed rank ends the launch at once, a full pipe never blocks a rank, a
rendezvous port taken by another job is retried."""
import time

import pytest

from dist_harness import RankFailed, spawn


def test_a_failed_rank_stops_the_others_at_once():
    t = time.monotonic()
    with pytest.raises(RankFailed, match=r"rank 1 of harness_probe.py .* exited 3:\n(?s:.*)failing on purpose"):
        spawn("harness_probe.py", ["--fail-rank", "1", "--sleep", "120"], world_size=3, timeout=200)
    assert time.monotonic() - t < 60  # not the other ranks' 120 s


def test_output_larger_than_a_pipe_is_drained():
    outputs = spawn("harness_probe.py", ["--spam", "300000"], world_size=2, timeout=60)
    assert [len(out) > 300000 and out.rstrip().endswith("done") for out in outputs] == [True, True]


def test_a_taken_rendezvous_port_is_retried(tmp_path):
    outputs = spawn("harness_probe.py", ["--port-taken-once", str(tmp_path / "marker")], world_size=2, timeout=120)
    assert all(out.rstrip().endswith("done") for out in outputs)
