"""ABSA's adaptive batch-size policy follows its rules exactly on scripted eigenvalue sequences."""
from __future__ import annotations

import math

import pytest

from ds_conadv.absa import ABSAConfig, ABSASchedule, accumulation_steps
from ds_conadv.config import ConfigError


def schedule(**kw):
    cfg = ABSAConfig.from_section({"enabled": True, "max_batch": 4096, "duration": 100, **kw})
    return ABSASchedule(cfg, batch=512, lr=0.1)


def run(s, eigenvalues):
    rows = []
    for epoch, eig in enumerate(eigenvalues):
        s.count_step(10)
        rows.append(s.end_epoch(epoch, eig if s.wants_eigenvalue(epoch) else None))
    return rows


def test_grows_when_the_eigenvalue_halves_then_measures_against_the_new_landscape():
    s = schedule()
    rows = run(s, [10.0, 12.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.9, 1.4])
    assert [r.batch for r in rows] == [512, 512, 512, 1024, 1024, 1024, 1024, 1024, 2048]
    assert [r.grew for r in rows] == [False, False, False, True, False, False, False, False, True]
    assert rows[3].reason.startswith("eigenvalue 6 <= 0.5 x 12")
    # after the growth at epoch 3 the reference restarts: 5 (epoch 4) is the new largest, 2.9 > 2.5, 1.4 <= 2.5
    assert math.isclose(rows[-1].lr, 0.4) and math.isclose(rows[-1].adv_ratio, 0.5 / 4)
    assert [r.steps for r in rows] == [10 * (i + 1) for i in range(9)]


def test_sqrt_lr_scaling_and_the_cap_stop_checks_and_adversarial_training():
    s = schedule(lr_scaling="sqrt", factor=4, max_batch=4096)
    rows = run(s, [8.0, 4.0, 3.0, 1.0, 0.1, 0.01])
    assert [r.batch for r in rows] == [512, 2048, 2048, 4096, 4096, 4096]
    assert math.isclose(rows[1].lr, 0.2) and math.isclose(rows[3].lr, 0.2 * math.sqrt(2))  # cap: f = 2 there
    assert rows[3].adv_ratio == 0.0 and not s.checking
    assert [r.eigenvalue for r in rows[4:]] == [None, None]  # no more eigenvalue checks


def test_duration_without_growth_grows_anyway_and_interval_skips_checks():
    s = schedule(duration=3, interval=2)
    rows = run(s, [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0])
    assert [r.eigenvalue for r in rows] == [5.0, None, 5.0, None, 5.0, None, 5.0]
    assert [r.grew for r in rows] == [False, False, True, False, False, True, False]
    assert rows[2].reason == "3 epochs without growth"


def test_stop_epoch_ends_adversarial_training():
    s = schedule(stop_epoch=2)
    rows = run(s, [5.0, 4.0, 1.0, 0.5])
    assert [r.adv_ratio for r in rows] == [0.5, 0.0, 0.0, 0.0] and rows[1].reason == "stop_epoch"
    assert [r.batch for r in rows] == [512] * 4


def test_state_dict_round_trip_continues_identically(tmp_path):
    eigs = [10.0, 4.0, 3.0, 1.0, 0.9, 0.4]
    full = schedule()
    run(full, eigs)
    first = schedule()
    run(first, eigs[:3])
    resumed = schedule()
    resumed.load_state_dict(first.state_dict())
    for epoch, eig in enumerate(eigs[3:], start=3):
        resumed.count_step(10)
        resumed.end_epoch(epoch, eig if resumed.wants_eigenvalue(epoch) else None)
    assert resumed.state_dict() == full.state_dict()
    assert (tmp_path / "absa.png").exists() is False
    full.plot(str(tmp_path / "absa.png"))
    assert (tmp_path / "absa.png").stat().st_size > 1000


@pytest.mark.parametrize("section,match", [
    ({"enabled": True}, '"max_batch" is required'),
    ({"eig_ratio": 1.5}, "absa.eig_ratio"),
    ({"lr_scaling": "cubic"}, "absa.lr_scaling"),
    ({"factr": 2}, 'unknown key "factr" in "absa"; allowed keys: enabled, interval'),
])
def test_config_errors_name_the_key(section, match):
    with pytest.raises(ConfigError, match=match):
        ABSAConfig.from_section(section)


def test_accumulation_steps_must_divide():
    assert accumulation_steps(4096, 64, 2) == 32
    with pytest.raises(ConfigError, match="not a multiple of micro batch 48 x 2 ranks"):
        accumulation_steps(4096, 48, 2)


def test_initialize_validates_and_refuses_enabled_absa():
    pytest.importorskip("deepspeed")
    from ds_conadv.integrations.deepspeed import validate_config

    base = {"train_batch_size": 16}
    validate_config({**base, "absa": {"enabled": False, "max_batch": 64}})
    with pytest.raises(ConfigError, match='unknown key "intervall" in "absa"'):
        validate_config({**base, "absa": {"intervall": 2}})
    with pytest.raises(ConfigError, match="not supported by ds_conadv.initialize yet"):
        validate_config({**base, "absa": {"enabled": True, "max_batch": 64}})
