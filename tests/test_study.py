"""The reproduction study's machinery (``--quick``): runs, resumes, writes JSON and plots. Not its accuracy."""
import json
import os

import pytest
import torch

from ds_conadv.study.core import StudyTrainer, adv_config, run_spec
from ds_conadv.study.runner import growths_brought_forward, main
from ds_conadv.study.tasks import make_task


def test_tasks_are_deterministic_and_split():
    a, b = make_task("shapes", 0, (64, 16, 16)), make_task("shapes", 0, (64, 16, 16))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.x_train.shape == (64, 1, 16, 16) and 0 <= float(a.x_train.min()) and float(a.x_train.max()) <= 1
    assert not torch.equal(make_task("shapes", 1, (64, 16, 16)).x_train, a.x_train)
    m = make_task("phrases", 0, (256, 8, 8))
    assert m.kind == "tokens" and m.x_train.dtype == torch.int64 and int(m.x_train.max()) < m.vocab
    assert torch.equal(m.x_train, make_task("phrases", 0, (256, 8, 8)).x_train)
    d = make_task("digits", 0, (32, 8, 8))
    assert d.x_train.shape == (32, 1, 16, 16)
    with pytest.raises(ValueError, match="unknown task"):
        make_task("cifar", 0)


def _spec(**kw):
    spec = {"task": "shapes", "optimizer": "lars", "batch": 16, "lr": 1.0, "epochs": 1, "warmup_epochs": 0,
            "weight_decay": 5e-4, "seed": 0}
    spec.update(kw)
    return spec


def test_staleness_guard_regenerates_and_frozen_bn_keeps_clean_statistics():
    task = make_task("shapes", 0, (64, 16, 16))
    guard = run_spec(_spec(adv={"epsilon": 0.03, "tau": 1, "bn": "shared", "guard_drift": 0.0}), task)
    assert guard["guard_counts"]["checked"] > 0
    assert guard["guard_counts"]["regenerated"] == guard["guard_counts"]["checked"]
    never = run_spec(_spec(adv={"epsilon": 0.03, "tau": 1, "bn": "shared", "guard_drift": 1e9}), task)
    assert never["guard_counts"]["regenerated"] == 0

    # shared_frozen: running stats only from clean forwards, so identical to a trainer fed the same clean batches
    from ds_conadv.study.models import SmallCNN
    cfg = adv_config(task, {"epsilon": 0.5, "tau": 0, "bn": "shared_frozen"})
    torch.manual_seed(0)
    model = SmallCNN(10, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)            # weights fixed: only BN statistics move
    tr = StudyTrainer(model, opt, cfg=cfg, bn_mode="shared_frozen")
    x, y = task.x_train[:16], task.y_train[:16]
    tr.train_batch(iter([(x, y)]))
    torch.manual_seed(0)
    ref = SmallCNN(10, 4)
    ref.train()
    ref(x)
    for (k, v), (_, r) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.allclose(v.float(), r.float()), k


def test_absa_clock_measures_no_eigenvalue_and_early_growths_are_counted():
    task = make_task("shapes", 0, (64, 16, 16))
    absa = {"max_batch": 64, "duration": 1, "adv_ratio": 0.2, "lr_scaling": "sqrt", "stop_epoch": 3,
            "epsilon": 0.02, "eig_samples": 0}
    res = run_spec(_spec(optimizer="sgd", lr=0.05, epochs=3, absa=absa), task)
    assert res["eig_time_s"] == 0 and all(row["eigenvalue"] is None for row in res["absa_log"])
    assert (res["growths_eigenvalue"], res["growths_duration"], res["final_batch"]) == (0, 2, 64)
    # duration 5: an eigenvalue growth at the epoch the clock fires too is not early; one 2 epochs after a growth is
    log = [{"epoch": 4, "grew": True, "reason": "eigenvalue 1 <= 0.5 x 3"}, {"epoch": 5, "grew": False, "reason": ""},
           {"epoch": 6, "grew": True, "reason": "eigenvalue 1 <= 0.5 x 4"},
           {"epoch": 11, "grew": True, "reason": "5 epochs without growth"}]
    assert growths_brought_forward({"spec": {"absa": {"duration": 5}}, "result": {"absa_log": log}}) == 1


def test_quick_study_runs_resumes_and_writes_results(tmp_path):
    out, summary = tmp_path / "runs", tmp_path / "reproduce_quick.json"
    argv = ["--quick", "--tasks", "shapes,phrases", "--phases", "tune,final",
            "--regimes", "sgd_small,lars,lars+disadv,lars+conadv_t1,absa_eig",
            "--out", str(out), "--summary", str(summary), "--plots", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    s = json.loads(summary.read_text())
    assert s["runs_executed"] > 0 and s["runs_loaded"] == 0
    for task in ("shapes", "phrases"):
        fin = s["tasks"][task]["final"]
        assert set(fin) == {"sgd_small", "lars", "lars+disadv", "lars+conadv_t1", "absa_eig"}
        for row in fin.values():
            assert row["test_acc"]["n"] == 1 and 0 <= row["test_acc"]["mean"] <= 100
            assert row["wall_time_s"]["mean"] > 0
        assert "gap_recovered_vs_lars" in fin["lars+conadv_t1"] or fin["lars"]["test_acc"]["mean"] >= \
            fin["sgd_small"]["test_acc"]["mean"]
        assert fin["absa_eig"]["growths_eigenvalue"][0] + fin["absa_eig"]["growths_duration"][0] >= 1
    assert "pgd10_acc" in s["tasks"]["shapes"]["final"]["lars+conadv_t1"]
    assert os.path.exists(s["plots"]["final"]) and os.path.exists(s["plots"]["absa"])
    # resumable: a second call loads every run and executes none
    assert main(argv) == 0
    s2 = json.loads(summary.read_text())
    assert s2["runs_executed"] == 0 and s2["runs_loaded"] == s["runs_executed"]
    assert s2["tasks"]["shapes"]["final"] == s["tasks"]["shapes"]["final"]


def test_phrases_label_is_its_only_ordered_phrase():
    """Each sequence holds exactly one adjacent, in-order phrase of its class and none of another class."""
    from ds_conadv.study.tasks import _phrase_table
    task = make_task("phrases", 0, (512, 8, 8))
    _, table = _phrase_table(0)
    owner = {(int(a), int(b)): c for c in range(len(table)) for a, b in table[c]}
    for x, y in zip(task.x_train.tolist(), task.y_train.tolist()):
        found = {owner[p] for p in zip(x, x[1:]) if p in owner}
        assert found == {y}
    # the tokens alone do not give the class: some sequences hold a content token of another class's phrase
    content = {t for p in owner for t in p}
    assert max(sum(t in content for t in x) for x in task.x_train.tolist()) >= 3


def test_default_suite_tunes_epsilon_per_optimizer(tmp_path):
    from ds_conadv.study.runner import DEFAULT_REGIMES, Runner, suite_settings, tune, tuned_regime
    s = suite_settings(quick=True)
    s["grids"]["epsilon"]["image"] = [0.01, 0.03]
    runner = Runner(str(tmp_path), progress=False, load_only=True)      # nothing runs: all choices fall back
    chosen = tune(runner, s, "shapes", {tuned_regime(r) for r in DEFAULT_REGIMES if "adv" in r})["chosen"]
    assert {tuned_regime(r) for r in DEFAULT_REGIMES if "adv" in r} == {"lars+conadv_t1_mean", "lamb+conadv_t1"}
    for r in DEFAULT_REGIMES:
        spec = chosen[r]
        if "adv" in r:
            base = chosen[tuned_regime(r)]
            assert spec["optimizer"] == base["optimizer"] and spec["adv"]["epsilon"] == base["adv"]["epsilon"]
            assert spec["adv"]["tau"] == (0 if "disadv" in r else int(r.split("_t")[1][0]))
            assert bool(spec["adv"].get("normalize_loss")) == r.endswith("_mean")
    for name in ("lamb+disadv", "lamb+conadv_t1"):
        assert chosen[name + "_late"]["adv"] == dict(chosen[name]["adv"], start_epoch=s["warmup_epochs"])
    # the variants around LAMB + ConAdv change one thing each
    from ds_conadv.study.runner import variant_specs
    lamb_variants = {k: v for k, v in variant_specs(s, "shapes", chosen).items() if k.startswith("lamb:")}
    base = chosen["lamb+conadv_t1"]
    assert lamb_variants["lamb: conadv_t1 (chosen)"] == base
    assert lamb_variants["lamb: bn mixed (one forward)"]["adv"] == dict(base["adv"], bn="mixed")
    assert lamb_variants["lamb: adv_weight 2"]["adv"] == dict(base["adv"], adv_weight=2.0)
    assert all(v["optimizer"] == "lamb" and v["lr"] == base["lr"] for v in lamb_variants.values())


def test_bad_arguments_are_one_line(capsys):
    assert main(["--quick", "--tasks", "cifar"]) == 2
    assert "unknown task 'cifar'" in capsys.readouterr().err
    assert main(["--quick", "--sizes", "256,64"]) == 2
    assert "--sizes: '256,64' is not three positive integers" in capsys.readouterr().err
    assert main(["--quick", "--sizes", "256,64,64", "--large-batch", "512"]) == 2
    assert "--large-batch: 512 must be above the small batch (64) and at most the training examples" in \
        capsys.readouterr().err


def test_cli_forwards_to_the_study(capsys):
    from ds_conadv.cli import main as cli_main

    assert cli_main(["study", "--quick", "--tasks", "cifar"]) == 2
    assert "unknown task 'cifar'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["study", "--help"])
    assert "ds-conadv study" in capsys.readouterr().out
