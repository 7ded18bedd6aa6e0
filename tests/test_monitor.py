"""Training metrics through DeepSpeed's monitor (TensorBoard, CSV): the optimizer's opt-in trust-ratio statistics,
the compat gate, nothing recorded when no section is enabled, and real 2-rank runs of the ConAdv, ABSA and plain
engines whose TensorBoard event files are read back."""
from __future__ import annotations

import csv
import json
import math
import os
import warnings
from types import SimpleNamespace

import pytest
import torch

from ds_conadv.optim import LAMB, LARS, param_groups

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")

from dist_harness import spawn  # noqa: E402
from ds_conadv.integrations.deepspeed import compat  # noqa: E402
from ds_conadv.integrations.deepspeed.monitor import MetricsWriter, attach_step_metrics  # noqa: E402


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _step(model, opt, poison=False):
    x = torch.randn(5, 6)
    if poison:
        x[0, 0] = float("inf")
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0, 1])).backward()
    opt.step()
    opt.zero_grad()


# ----------------------------------------------------------------------------------------------------------
# the optimizer's statistics
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_trust_ratio_stats_are_opt_in_and_cover_the_adapting_groups(cls):
    model = _model()
    opt = cls(param_groups(model, weight_decay=0.01), lr=0.01, backend="foreach")
    _step(model, opt)
    assert opt.take_trust_ratio_stats() is None  # not asked: nothing recorded
    opt.collect_trust_ratio_stats = True
    _step(model, opt)
    stats = opt.take_trust_ratio_stats()
    adapting = torch.cat([r for g, r in zip(opt.param_groups, opt.trust_ratios) if g["weight_decay"] != 0])
    assert adapting.numel() == 2 and not torch.all(adapting == 1)  # the two weight matrices
    torch.testing.assert_close(stats, torch.stack([adapting.min(), adapting.mean(), adapting.max()]))
    assert opt.take_trust_ratio_stats() is None  # taken: forgotten

    # a step that is called group by group (as ZeRO does) contributes every group of the step
    groups = opt.param_groups
    _step_calls = []
    for group in groups:
        opt.param_groups = [group]
        for p in group["params"]:
            p.grad = torch.full_like(p, 0.1)
        opt.step()
        _step_calls.append(opt.trust_ratios[0])
    opt.param_groups = groups
    by_call = torch.cat([r for g, r in zip(groups, _step_calls) if g["weight_decay"] != 0])
    torch.testing.assert_close(opt.take_trust_ratio_stats(),
                               torch.stack([by_call.min(), by_call.mean(), by_call.max()]))


def test_trust_ratio_stats_are_nan_for_a_skipped_step():
    model = _model()
    opt = LAMB(param_groups(model, weight_decay=0.01), lr=0.01, backend="foreach")
    opt.collect_trust_ratio_stats = True
    _step(model, opt, poison=True)
    assert int(opt.skipped_steps) == 1
    assert torch.isnan(opt.take_trust_ratio_stats()).all()


# ----------------------------------------------------------------------------------------------------------
# compat gate, and nothing at all when no section is enabled
# ----------------------------------------------------------------------------------------------------------
class _Monitor:
    def __init__(self, enabled):
        self.enabled = enabled
        self.events = []

    def write_events(self, events):
        self.events.append(list(events))


def _engine(monitor, rank=0, config=None, opt=None):
    return SimpleNamespace(monitor=monitor, global_rank=rank, global_samples=12, config=config or {},
                           optimizer=opt, skipped_steps=0, global_steps=0,
                           backward=lambda loss: None, step=lambda: None)


def test_engine_monitor_is_rank_0_with_an_enabled_section_and_warns_without_the_hook():
    on = _Monitor(True)
    assert compat.engine_monitor(_engine(on)) is on
    assert compat.engine_monitor(_engine(on, rank=1)) is None
    assert compat.engine_monitor(_engine(_Monitor(False))) is None
    requested = {"tensorboard": {"enabled": True}}
    assert compat.monitor_requested(requested) and not compat.monitor_requested({"wandb": {"enabled": False}})
    with pytest.warns(compat.DeepSpeedCompatWarning, match="not written"):
        assert compat.engine_monitor(_engine(None, config=requested)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.engine_monitor(_engine(None)) is None  # nothing asked: nothing to warn about


def test_nothing_is_hooked_or_recorded_without_an_enabled_monitor():
    model = _model()
    opt = LAMB(param_groups(model, weight_decay=0.01), lr=0.01)
    for engine in (_engine(_Monitor(False), opt=opt), _engine(_Monitor(True), rank=1, opt=opt)):
        backward, step = engine.backward, engine.step
        assert attach_step_metrics(engine) is None
        assert engine.backward is backward and engine.step is step
        assert not MetricsWriter(engine).active and opt.collect_trust_ratio_stats is False


@pytest.mark.parametrize("version,filtered", [("0.16.9", True), ("0.18.0", True), ("0.19.0", False)])
def test_the_engines_own_train_loss_is_left_out_where_it_writes_one(monkeypatch, version, filtered):
    """Before 0.19 DeepSpeed's engine writes Train/Samples/train_loss itself (in backward, at the samples before
    the step): once a writer takes train_loss over, the engine's events under that tag are dropped, its others
    and ours pass; from 0.19 nothing is filtered."""
    monkeypatch.setattr(compat, "_installed_version", lambda: version)
    monitor = _Monitor(True)
    engine = _engine(monitor)
    attach_step_metrics(engine)
    attach_step_metrics(engine)  # idempotent filter
    monitor.write_events([("Train/Samples/train_loss", 1.0, 8), ("Train/Samples/lr", 0.1, 8)])  # the engine's
    MetricsWriter(engine).write({"train_loss": 0.5})
    engine_loss = [("Train/Samples/train_loss", 1.0, 8)] if not filtered else []
    assert monitor.events == [engine_loss + [("Train/Samples/lr", 0.1, 8)], [("Train/Samples/train_loss", 0.5, 12)]]


def test_writer_sends_one_list_of_events_at_the_samples_so_far():
    model = _model()
    opt = LAMB(param_groups(model, weight_decay=0.01), lr=0.01)
    monitor = _Monitor(True)
    engine = _engine(monitor, opt=opt)
    writer = MetricsWriter(engine)
    assert writer.active and opt.collect_trust_ratio_stats is True
    writer.begin_step()
    _step(model, opt)
    writer.write_step({"train_loss": torch.tensor(0.5), "left_out": None})
    (events,) = monitor.events
    tags = {tag: value for tag, value, samples in events}
    assert {samples for _, _, samples in events} == {12}
    assert tags["Train/Samples/train_loss"] == 0.5 and "Train/Samples/left_out" not in tags
    assert tags["Train/Samples/skipped_step"] == 0.0 and tags["Train/Samples/skipped_steps_total"] == 0.0
    assert tags["Train/Samples/trust_ratio_min"] <= tags["Train/Samples/trust_ratio_mean"] \
        <= tags["Train/Samples/trust_ratio_max"]


# ----------------------------------------------------------------------------------------------------------
# real engines, 2 ranks: the event files read back
# ----------------------------------------------------------------------------------------------------------
def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = [f for f in os.listdir(folder) if f.startswith("events.out.tfevents")]
    assert len(files) == 1, files  # one writer: rank 0
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _close(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-9)


def _series(scalars, name):
    return scalars["Train/Samples/" + name]


def _assert_series(scalars, name, expected):
    got = _series(scalars, name)
    assert [s for s, _ in got] == [s for s, _ in expected], name
    assert all(_close(v, e) for (_, v), (_, e) in zip(got, expected)), (name, got, expected)


def test_metrics_in_tensorboard_and_csv(tmp_path):
    pytest.importorskip("tensorboard", reason="DeepSpeed's TensorBoard monitor needs the tensorboard package")
    out = tmp_path / "run"
    out.mkdir()
    spawn("monitor_worker.py", ["--out", str(out), "--steps", "3"], world_size=2, timeout=300)
    r = json.loads((out / "rank0.json").read_text())
    assert r["world"] == 2

    # ConAdv engine: step 0 is vanilla (start_epoch 1, one step per epoch) and generates step 1's examples
    conadv = _scalars(out / "tb" / "conadv")
    m = r["conadv"]
    at = [x["global_samples"] for x in m]
    assert at == [16, 32, 48]
    _assert_series(conadv, "train_loss", [(s, x["loss"]) for s, x in zip(at, m)])
    _assert_series(conadv, "train_clean_loss", [(s, x["clean_loss"]) for s, x in zip(at, m)])
    _assert_series(conadv, "train_clean_acc", [(s, x["clean_acc"]) for s, x in zip(at, m)])
    _assert_series(conadv, "train_adv_loss", [(s, x["adv_loss"]) for s, x in zip(at[1:], m[1:])])
    _assert_series(conadv, "train_adv_acc", [(s, x["adv_acc"]) for s, x in zip(at[1:], m[1:])])
    _assert_series(conadv, "conadv_stale_by", [(s, 1) for s in at[1:]])
    _assert_series(conadv, "conadv_generation_time_ms", [(s, x["time_generation"] * 1e3) for s, x in zip(at, m)])
    _assert_series(conadv, "conadv_exposed_fraction", [(s, x["exposed_fraction"]) for s, x in zip(at, m)])
    assert all(0 <= x["exposed_fraction"] <= 1 for x in m)
    _assert_series(conadv, "skipped_step", [(s, 0) for s in at])
    assert [s for s, _ in _series(conadv, "lr")] == at  # DeepSpeed's own event, same cadence and axis
    lo, mean, hi = (_series(conadv, f"trust_ratio_{k}") for k in ("min", "mean", "max"))
    assert len(lo) == len(mean) == len(hi) == 3
    assert all(0 < a[1] <= b[1] <= c[1] for a, b, c in zip(lo, mean, hi))
    # the CSV monitor got the same events (MonitorMaster fans them out)
    with open(out / "csv" / "conadv" / "Train_Samples_train_loss.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "train_loss"]
    assert [(int(s), float(v)) for s, v in rows[1:]] == [(s, x["loss"]) for s, x in zip(at, m)]  # exact

    # ABSA engine: three epochs of 3 steps; the eigenvalue at each epoch end; the batch doubles after epoch 1
    absa = _scalars(out / "tb" / "absa")
    m, epochs = r["absa"], r["absa_epochs"]
    at = [x["global_samples"] for x in m]
    assert at == [16, 32, 48, 64, 80, 96, 128, 160, 192]
    _assert_series(absa, "train_loss", [(s, x["loss"]) for s, x in zip(at, m)])
    _assert_series(absa, "absa_global_batch", [(s, x["global_batch"]) for s, x in zip(at, m)])
    assert [x["global_batch"] for x in m][-1] == 32
    _assert_series(absa, "absa_lr", [(s, x["lr"]) for s, x in zip(at, m)])
    _assert_series(absa, "absa_adv_ratio", [(s, x["adv_ratio"]) for s, x in zip(at, m)])
    _assert_series(absa, "absa_eigenvalue", [(e["global_samples"], e["eigenvalue"]) for e in epochs])
    assert [e["eigenvalue"] for e in epochs] == [10.0, 1.0, 1.0]
    assert len(_series(absa, "trust_ratio_mean")) == len(at)

    # plain engine (LAMB, ZeRO 2, 2 micro-batches per step); step 2 has a NaN input: skipped, no trust ratio
    plain = _scalars(out / "tb" / "plain")
    m = r["plain"]
    at = [x["global_samples"] for x in m]
    assert at == [32, 64, 96]
    _assert_series(plain, "train_loss", [(s, x["loss"]) for s, x in zip(at, m)])
    assert math.isnan(m[1]["loss"])
    _assert_series(plain, "skipped_step", [(at[0], 0), (at[1], 1), (at[2], 0)])
    _assert_series(plain, "skipped_steps_total", [(at[0], 0), (at[1], 1), (at[2], 1)])
    applied = [(s, x["ratios"]) for s, x in zip(at, m) if x["ratios"]]
    assert [s for s, _ in applied] == [at[0], at[2]]
    _assert_series(plain, "trust_ratio_min", [(s, min(v)) for s, v in applied])
    _assert_series(plain, "trust_ratio_max", [(s, max(v)) for s, v in applied])
    _assert_series(plain, "trust_ratio_mean", [(s, sum(v) / len(v)) for s, v in applied])


def test_exposed_generation_is_what_the_reduction_did_not_cover():
    from ds_conadv.integrations.deepspeed.engine import DeepSpeedConAdvEngine

    engine = object.__new__(DeepSpeedConAdvEngine)  # the timing rule only: no DeepSpeed engine needed
    engine.overlap = True
    ahead = {"generated_ahead": 4, "time_generate_ahead": 0.005}
    # the look-ahead pass waited 1 ms for the backward compute, generated for 4 ms, the reduction lasted 3 ms
    engine.last_timings, engine._sync_generation_s = {"wait_backward_compute": 0.001, "reduction": 0.003}, 0.0
    assert engine._generation_timing(ahead) == pytest.approx((0.004, 0.003))
    # a synchronous generation (start-up, DisAdv) is exposed; a reduction longer than the pass hides all of it
    engine.last_timings, engine._sync_generation_s = {"reduction": 0.010}, 0.002
    assert engine._generation_timing(ahead) == pytest.approx((0.007, 0.005))
    engine.last_timings, engine._sync_generation_s = {}, 0.002
    assert engine._generation_timing({"generated_ahead": 0, "time_generate_ahead": 0.0}) == (0.002, 0.0)
    engine.overlap = False  # ZeRO 3: the generation runs after engine.backward, nothing hidden
    engine.last_timings, engine._sync_generation_s = {"reduction": 0.010}, 0.0
    assert engine._generation_timing(ahead) == pytest.approx((0.005, 0.0))
