"""ABSA: the policy follows its rules exactly on scripted eigenvalue sequences; the driver applies them (one
process: LR, adversarial share, divisibility, state; 2 real DeepSpeed ranks and 2 Horovod ranks: the batch grows at
the right steps and the run equals its single-process replay)."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from ds_conadv.absa import ABSAConfig, ABSASchedule, accumulation_steps, check_reachable_batches, reachable_batches
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
    ({"eig_samples": 512, "eig_batches": 4}, '"eig_batches" and "eig_samples" are both set: give one'),
    ({"eig_samples": 0}, "absa.eig_samples"),
])
def test_config_errors_name_the_key(section, match):
    with pytest.raises(ConfigError, match=match):
        ABSAConfig.from_section(section)


def test_eig_samples_counts_examples_over_all_ranks():
    cfg = ABSAConfig.from_section({"eig_samples": 512})
    assert [cfg.eig_batches_per_rank(16, w) for w in (1, 2, 3)] == [32, 16, 11]  # at least 512 examples
    assert ABSAConfig.from_section({"eig_batches": 4}).eig_batches_per_rank(16, 2) == 4
    cfg = ABSAConfig.from_section({"eig_batches": 4})
    with pytest.raises(ValueError, match='"eig_batches" and "eig_samples" are both set'):
        cfg.eig_samples = 64                                    # an assignment is checked too


def test_accumulation_steps_must_divide():
    assert accumulation_steps(4096, 64, 2) == 32
    with pytest.raises(ConfigError, match="not a multiple of micro batch 48 x 2 ranks"):
        accumulation_steps(4096, 48, 2)


def test_reachable_batches_and_their_check():
    cfg = ABSAConfig.from_section({"enabled": True, "max_batch": 96, "factor": 2})
    assert reachable_batches(8, cfg) == [8, 16, 32, 64, 96]
    assert check_reachable_batches(8, cfg, micro_batch=4, world_size=2) == [1, 2, 4, 8, 12]
    with pytest.raises(ConfigError, match=r"through \[64, 96\].*global batch 96 is not a multiple of micro batch 4 x "
                                          r"16 ranks = 64"):
        check_reachable_batches(64, cfg, micro_batch=4, world_size=16)
    assert reachable_batches(8, ABSAConfig.from_section({"max_batch": 96})) == [8]  # disabled: never grows


def test_disabled_schedule_is_plain_training():
    s = ABSASchedule(ABSAConfig.from_section({"max_batch": 64}), batch=16, lr=1.0)
    assert s.adv_ratio == 0.0 and not s.wants_eigenvalue(0)
    assert s.end_epoch(0, None).batch == 16


# ----------------------------------------------------------------------------------------------------------
# the driver in one process (ABSATrainer)
# ----------------------------------------------------------------------------------------------------------
from ds_conadv.absa_driver import ABSATrainer, adversarial_count, attack_config  # noqa: E402

IN, CLASSES = 6, 3


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, 8), torch.nn.Tanh(), torch.nn.Linear(8, CLASSES))


def tiny_stream(micro, start=0):
    i = start
    while True:
        g = torch.Generator().manual_seed(i)
        yield torch.randn(micro, IN, generator=g), torch.randint(0, CLASSES, (micro,), generator=g)
        i += 1


def scripted(values):
    return lambda driver, epoch: values[epoch]


def trainer(section=None, micro=4, eigs=(10.0, 4.0, 9.0, 1.0, 1.0, 1.0), lr_scheduler=None, **kw):
    """A 2-group SGD (LRs 0.1 and 0.03) under ABSATrainer with scripted eigenvalues: with the defaults the batch
    grows after epochs 1 and 3 (max_batch = 4 micro-batches)."""
    model = tiny_model()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                                  {"params": model[2].parameters(), "lr": 0.03}], momentum=0.9)
    sched = lr_scheduler(opt) if lr_scheduler else None
    cfg = {"enabled": True, "max_batch": 4 * micro, "epsilon": 0.05, "duration": 100,
           **({} if "eig_samples" in (section or {}) else {"eig_batches": 2}), **(section or {})}
    return ABSATrainer(model, opt, cfg, micro, lr_scheduler=sched, eigenvalue_fn=scripted(eigs), **kw)


def run_epochs(tr, data, epochs, samples=32):
    rows, steps = [], []
    for _ in range(epochs):
        for _ in range(tr.steps_per_epoch(samples)):
            steps.append(tr.train_batch(data))
        rows.append(tr.end_epoch())
    return rows, steps


@pytest.mark.parametrize("scaling,factor", [("linear", 2.0), ("sqrt", math.sqrt(2.0))])
def test_lr_follows_the_batch_in_every_param_group(scaling, factor):
    tr = trainer({"lr_scaling": scaling})
    rows, steps = run_epochs(tr, tiny_stream(4), 4)
    # growth after epoch 1 (4 <= 0.5 x 10) and epoch 3 (1 <= 0.5 x 9)
    assert [r["global_batch"] for r in rows] == [4, 4, 8, 8] and tr.global_batch == 16
    assert [r["grad_accum_steps"] for r in rows] == [1, 1, 2, 2]
    assert [r["steps"] for r in rows] == [8, 8, 4, 4] and rows[-1]["total_steps"] == 24 == tr.schedule.steps
    for r, scale in zip(rows, [1, 1, factor, factor]):
        assert math.isclose(r["lr"], 0.1 * scale) and math.isclose(r["lr_scale"], scale)
    for group, base in zip(tr.optimizer.param_groups, (0.1, 0.03)):  # both groups, their ratio kept
        assert math.isclose(group["lr"], base * factor ** 2)
    assert [s["grad_accum_steps"] for s in steps] == [1] * 16 + [2] * 8


@pytest.mark.parametrize("kind", ["closed_form", "chainable"])
def test_lr_factor_multiplies_the_schedulers_lr(kind):
    """A closed-form scheduler (LambdaLR) would overwrite a plain LR change at its next step; a chainable one
    (ExponentialLR) would compound it. Wrapped, both keep their own values and the optimizer gets them x factor."""
    make = {"closed_form": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)),
            "chainable": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.95)}[kind]
    own = {"closed_form": lambda s: 1.0 / (1 + s), "chainable": lambda s: 0.95 ** s}[kind]
    tr = trainer(lr_scheduler=make)
    _, steps = run_epochs(tr, tiny_stream(4), 3)
    for i, m in enumerate(steps):  # step i ran with the scheduler's LR after i steps, x the factor of its epoch
        scale = 1.0 if i < 16 else 2.0
        assert math.isclose(m["lr"], 0.1 * own(i) * scale, rel_tol=1e-9), i
    assert math.isclose(tr.lr_scheduler.get_last_lr()[0], 0.1 * own(len(steps)), rel_tol=1e-9)  # unscaled


def test_adversarial_share_is_the_first_floor_ratio_times_micro_examples():
    assert [adversarial_count(r, n) for r, n in [(0.5, 4), (0.25, 4), (0.125, 4), (0.29, 100), (0.2, 10), (1.0, 3)]] \
        == [2, 1, 0, 29, 2, 3]
    micro = 8
    tr = trainer({"adv_ratio": 0.5, "epsilon": 0.05}, micro=micro)
    seen = []
    tr.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    data = tiny_stream(micro)
    clean, _ = next(tiny_stream(micro))
    m = tr.train_batch(data)
    attack_input, trained = seen[0], seen[-1]  # the attack's forward on x[:4], then the training forward
    assert attack_input.shape[0] == 4 and m["adv_examples"] == 4
    torch.testing.assert_close(trained[4:], clean[4:], rtol=0, atol=0)
    torch.testing.assert_close((trained[:4] - clean[:4]).abs(), torch.full((4, IN), 0.05), rtol=0, atol=1e-6)
    rows, steps = run_epochs(tr, data, 4)
    # ratio 0.5 -> 0.25 at the growth after epoch 1 -> 0 at max_batch after epoch 3
    assert [r["adv_ratio"] for r in rows] == [0.5, 0.5, 0.25, 0.25] and tr.adv_ratio == 0.0
    # 4 of 8 per micro-batch, 4 steps per epoch (+1 above); then 2 of 8 per micro-batch, 2 steps x 2 micro-batches
    assert [r["adv_examples"] for r in rows] == [4 * 5, 4 * 4, 2 * 2 * 2, 2 * 2 * 2]
    assert tr.train_batch(data)["adv_examples"] == 0


def test_attack_comes_from_the_conadv_section():
    absa = ABSAConfig.from_section({"enabled": True, "max_batch": 64, "epsilon": 0.01})
    cfg = attack_config(absa, {"epsilon": 0.3, "step_size": 0.3, "input_range": [0, 1], "mean": [0.5], "std": [0.2]})
    assert (cfg.attack, cfg.epsilon, cfg.step_size, cfg.input_range, cfg.dual_bn) == ("fgsm", 0.01, None, (0, 1), False)
    assert attack_config(absa, None).epsilon == 0.01
    no_eps = ABSAConfig.from_section({"enabled": True, "max_batch": 64})
    assert attack_config(no_eps, {"epsilon": 0.2}).epsilon == 0.2
    with pytest.raises(ConfigError, match='"absa.epsilon" is required when "absa.adv_ratio" = 0.5'):
        attack_config(no_eps, None)
    assert attack_config(no_eps.model_copy(update={"adv_ratio": 0.0}), None) is None
    with pytest.raises(ConfigError, match='"absa.enabled" and "conadv.enabled" are both true'):
        attack_config(absa, {"enabled": True, "epsilon": 0.1, "dual_bn": False})


def test_batches_that_do_not_divide_fail_before_training_and_name_the_values():
    with pytest.raises(ConfigError, match=r"through \[3, 6, 12, 20\].*global batch 20 is not a multiple of micro "
                                          r"batch 3 x 1 ranks = 3"):
        trainer({"max_batch": 20}, micro=3)
    with pytest.raises(ConfigError, match='starting global batch 8 is larger than "absa.max_batch" = 4'):
        trainer({"max_batch": 4}, micro=4, gradient_accumulation_steps=2)


def test_driver_state_round_trip_continues_identically():
    eigs = (10.0, 9.0, 4.0, 8.0, 3.0, 1.0)
    sched = (lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + 0.1 * s)))
    full = trainer({"max_batch": 16}, eigs=eigs, lr_scheduler=sched)
    rows_full, _ = run_epochs(full, tiny_stream(4), 6)
    first = trainer({"max_batch": 16}, eigs=eigs, lr_scheduler=sched)
    data = tiny_stream(4)
    run_epochs(first, data, 3)
    state = copy.deepcopy(first.state_dict())
    resumed = trainer({"max_batch": 16}, eigs=eigs, lr_scheduler=sched)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.global_batch, resumed.lr_scale) == (3, 8, 2.0)
    run_epochs(resumed, tiny_stream(4, start=resumed.samples // 4), 3)
    assert _strip_times(resumed.log) == _strip_times(rows_full)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"end_epoch\(2\) but the driver is at epoch 6"):
        resumed.end_epoch(2)


@pytest.mark.parametrize("size", [{"eig_batches": 3}, {"eig_samples": 9}])  # 9 examples: 3 micro-batches of 4
def test_real_eigenvalue_log_and_plot(tmp_path, size):
    tr = trainer({**size, "eig_max_iter": 20}, log_dir=str(tmp_path))
    tr.eigenvalue_fn = None  # the real measurement: ds_conadv.hessian on the last 3 micro-batches
    assert tr.eig_batches == 3
    data = tiny_stream(4)
    for _ in range(4):
        tr.train_batch(data)
    assert len(tr._eig_buffer) == 3
    from ds_conadv.hessian import Hessian

    expected, _ = Hessian(tr.model, torch.nn.functional.cross_entropy, dataloader=list(tr._eig_buffer),
                          distributed=False, seed=0).eigenvalues(top_n=1, max_iter=20, tol=1e-2)
    row = tr.end_epoch()
    assert row["eigenvalue"] == pytest.approx(expected[0], rel=1e-6) and tr.last_info["samples"] == 12
    saved = json.loads((tmp_path / "absa_log.json").read_text())
    assert saved["epochs"][0]["eigenvalue"] == row["eigenvalue"]
    assert {k: saved["absa"][k] for k in size} == size
    assert (tmp_path / "absa_log.csv").read_text().splitlines()[0].startswith("epoch,global_batch,micro_batch")
    assert tr.plot(str(tmp_path / "absa.png")) and (tmp_path / "absa.png").stat().st_size > 1000


# ----------------------------------------------------------------------------------------------------------
# ds_conadv.initialize: the section is validated, and enabled ABSA is accepted
# ----------------------------------------------------------------------------------------------------------
BASE = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4}
ON = {"enabled": True, "max_batch": 32, "epsilon": 0.1}


@pytest.mark.parametrize("extra,match", [
    ({"absa": {"intervall": 2}}, 'unknown key "intervall" in "absa"; allowed keys: enabled, interval'),
    ({"absa": {**ON, "factor": 1}}, '"absa.factor" = 1'),
    ({"absa": {**ON, "max_batch": 18}}, r'grows "train_batch_size" 8 through \[8, 16, 18\].*18 is not a multiple of '
                                        r'"train_micro_batch_size_per_gpu" = 4'),
    ({"absa": {**ON, "max_batch": 4}}, '"train_batch_size" = 8 is larger than "absa.max_batch" = 4'),
    ({"absa": {**ON, "epsilon": None}}, '"absa.epsilon" is required'),
    ({"absa": ON, "conadv": {"enabled": True, "epsilon": 0.1}}, "both true"),
    ({"absa": ON, "zero_optimization": {"stage": 3}}, 'needs "zero_optimization.stage" 0, 1 or 2, got 3'),
])
def test_initialize_validation_names_the_key(extra, match):
    pytest.importorskip("deepspeed")
    from ds_conadv.integrations.deepspeed import validate_config

    with pytest.raises(ConfigError, match=match):
        validate_config({**BASE, **extra})


def test_initialize_accepts_enabled_absa_and_refuses_a_fixed_epoch_length():
    pytest.importorskip("deepspeed")
    import ds_conadv
    from ds_conadv.integrations.deepspeed import validate_config

    ds_cfg = validate_config({**BASE, "absa": ON, "conadv": {"enabled": False, "input_range": [-1, 1]}})
    assert "absa" not in ds_cfg and "conadv" not in ds_cfg
    validate_config({**BASE, "absa": {"enabled": False, "max_batch": 20}})  # disabled: nothing to grow
    with pytest.raises(ConfigError, match="no fixed epoch length"):  # what ds-conadv train passes
        ds_conadv.initialize(model=tiny_model(), config={**BASE, "absa": ON}, steps_per_epoch=10)
    with pytest.raises(ConfigError, match='absa_options= given but the config has no "absa" section'):
        ds_conadv.initialize(model=tiny_model(), config=BASE, absa_options={"log_dir": "x"})


# ----------------------------------------------------------------------------------------------------------
# real ranks: DeepSpeed (ZeRO-2, gloo) and Horovod, against a single-process replay
# ----------------------------------------------------------------------------------------------------------
from workers import absa_worker as W  # noqa: E402

#: what the scripted run must do per epoch: (global batch, LR factor, adversarial ratio)
PLAN = [(8, 1.0, 0.5)] * 3 + [(16, 2.0, 0.25)] * 2 + [(32, 4.0, 0.0)]


def reference():
    """The scripted run in one process on the union of both ranks' micro-batches (rank by rank, as the workers
    generate their adversarial examples), with the real eigenvalue at every check. Returns (params, eigenvalues)."""
    from ds_conadv.conadv.perturb import generate
    from ds_conadv.hessian import Hessian
    from ds_conadv.optim import LARS, param_groups

    model = W.make_model()
    opt = LARS(param_groups(model, W.LARS_PARAMS["weight_decay"]), **W.LARS_PARAMS)
    attack = attack_config(ABSAConfig.from_section(W.ABSA), W.ATTACK)
    base = [g["lr"] for g in opt.param_groups]
    index, eigs = 0, []
    ce = torch.nn.functional.cross_entropy
    for epoch, (batch, scale, ratio) in enumerate(PLAN):
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * scale
        gas = batch // (W.MICRO * W.WORLD)
        for _ in range(W.SAMPLES_PER_EPOCH // batch):
            opt.zero_grad()
            for _ in range(gas):
                xs, ys = [], []
                for rank in range(W.WORLD):
                    x, y = W.micro_batch(rank, index)
                    k = adversarial_count(ratio, W.MICRO)
                    if k:
                        x = torch.cat([generate(model, x[:k], y[:k], attack, loss_fn=ce), x[k:]])
                    xs.append(x)
                    ys.append(y)
                index += 1
                (ce(model(torch.cat(xs)), torch.cat(ys)) / gas).backward()
            opt.step()
        if epoch in W.SCRIPT:  # the eigenvalue on each rank's last 2 clean micro-batches
            batches = [W.micro_batch(r, i) for r in range(W.WORLD) for i in (index - 2, index - 1)]
            values, _ = Hessian(model, ce, dataloader=batches, distributed=False, seed=epoch).eigenvalues(
                top_n=1, max_iter=W.ABSA["eig_max_iter"], tol=W.ABSA["eig_tol"])
            eigs.append(values[0])
    return {n: p.detach().double().reshape(-1) for n, p in model.named_parameters()}, eigs


@pytest.fixture(scope="module")
def replay():
    return reference()


def tensors(result):
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in result["params"].items()}


def check_run(ranks, replay, what):
    """Both ranks identical; the run follows PLAN and equals the replay."""
    r0, r1 = ranks
    assert r0["params"] == r1["params"], f"{what}: ranks disagree on the parameters"
    assert r0["real_eig"] == r1["real_eig"], f"{what}: ranks disagree on the measured eigenvalues"
    assert _strip_times(r0["log"]) == _strip_times(r1["log"]), f"{what}: ranks disagree on the ABSA log"
    log = r0["log"]
    assert [(r["global_batch"], r["lr_scale"], r["adv_ratio"]) for r in log] == PLAN
    assert [r["eigenvalue"] for r in log] == [W.SCRIPT.get(e) for e in range(W.EPOCHS)]
    assert [r["grew"] for r in log] == [False, False, True, False, True, False]
    assert [r["steps"] for r in log] == [5, 5, 5, 2, 2, 1]
    steps = r0["steps"]
    assert [s["train_batch_size"] for s in steps] == [8] * 15 + [16] * 4 + [32]
    assert [s["gas"] for s in steps] == [1] * 15 + [2] * 4 + [4]
    lr0 = W.LARS_PARAMS["lr"]
    assert [s["lr"] for s in steps] == [lr0] * 15 + [2 * lr0] * 4 + [4 * lr0]
    assert [s["adv_examples"] for s in steps] == [2] * 15 + [2] * 4 + [0]  # 2 of 4, then 1 of 4 x 2 micro
    params, eigs = replay
    got = tensors(r0)
    for name in params:
        torch.testing.assert_close(got[name], params[name], rtol=2e-5, atol=2e-6,
                                   msg=lambda m: f"{what} vs single-process replay: {name}: {m}")
    real = [e["value"] for e in r0["real_eig"]]
    assert [e["epoch"] for e in r0["real_eig"]] == sorted(W.SCRIPT) and all(e["samples"] == 16 for e in r0["real_eig"])
    assert real == pytest.approx(eigs, rel=1e-4), f"{what}: real eigenvalues vs one process"


def _strip_times(log):
    return [{k: v for k, v in r.items() if k != "eig_seconds"} for r in log]


def ds_run(tmp_path, tag, *args):
    from dist_harness import spawn

    prefix = str(tmp_path / tag)
    spawn("absa_worker.py", ["--out", prefix, *args], world_size=2, timeout=300)
    return [json.load(open(f"{prefix}.rank{r}")) for r in range(2)]


@pytest.fixture(scope="module")
def ds_full(tmp_path_factory):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    return ds_run(tmp_path_factory.mktemp("absa_ds"), "full")


def test_deepspeed_two_ranks_grow_the_batch_at_the_right_steps(ds_full, replay):
    r0 = ds_full[0]
    assert r0["engine"] == "DeepSpeedABSAEngine"
    steps = r0["steps"]
    assert all(s["global_steps"][1] == s["global_steps"][0] + 1 for s in steps)
    assert [s["micro_steps"][1] - s["micro_steps"][0] for s in steps] == [s["gas"] for s in steps]
    # the optimizer stepped after micro-batches 1..15, then every 2nd, then after the 4th: the steps after a growth
    # are whole (DeepSpeed's own (micro_steps + 1) % gas rule would have cut the first at micro-step 16)
    assert r0["stepped_at_micro"] == list(range(15)) + [16, 18, 20, 22, 26]
    check_run(ds_full, replay, "DeepSpeed ZeRO-2")


def test_deepspeed_resume_after_a_growth_equals_uninterrupted(ds_full, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    ds_run(tmp_path, "first", "--stop-after-epoch", "3", "--ckpt", ckpt)
    resumed = ds_run(tmp_path, "resumed", "--resume", ckpt)
    full = ds_full[0]
    assert resumed[0]["params"] == full["params"] and resumed[1]["params"] == full["params"]
    assert _strip_times(resumed[0]["log"]) == _strip_times(full["log"])
    # epochs 4 and 5: batch 16 then 32, same LRs and losses; DeepSpeed restarts micro_steps at 0 after a load
    # (not in its checkpoint), one more reason why the driver sets the accumulation boundary itself
    def without_micro(steps):
        return [{**s, "micro_steps": s["micro_steps"][1] - s["micro_steps"][0]} for s in steps]

    assert without_micro(resumed[0]["steps"]) == without_micro(full["steps"][17:])
    assert resumed[0]["steps"][0]["micro_steps"][0] == 0


def test_horovod_two_ranks_grow_backward_passes_per_step(tmp_path, replay):
    from test_horovod import horovodrun

    from dist_harness import WORKERS

    prefix = str(tmp_path / "hvd")
    horovodrun([str(WORKERS / "absa_worker.py"), "--backend", "horovod", "--out", prefix])
    ranks = [json.load(open(f"{prefix}.rank{r}")) for r in range(2)]
    assert [s["backward_passes_per_step"] for s in ranks[0]["steps"]] == [1] * 15 + [2] * 4 + [4]
    check_run(ranks, replay, "Horovod")


def test_digits_example_runs_on_two_ranks(tmp_path):
    """examples/absa_digits.py (the docs figure's run) at 3 epochs: log, plot, accuracy, a batch that grew."""
    from dist_harness import torchrun

    out = torchrun(str(Path(__file__).resolve().parents[1] / "examples" / "absa_digits.py"),
                   ["--epochs", "3", "--out-dir", str(tmp_path), "--no-progress"], nproc=2, timeout=300)
    summary = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    assert summary["final_global_batch"] > 32 and summary["test_clean_acc"] > 0.8
    assert (tmp_path / "absa_log.csv").exists() and (tmp_path / "absa.png").stat().st_size > 10_000
    rows = json.loads((tmp_path / "absa_log.json").read_text())["epochs"]
    assert len(rows) == 3 and all(r["eigenvalue"] is not None for r in rows)
