"""HF Trainer and accelerate: ds_conadv's LAMB really steps (with and without DeepSpeed ZeRO 1-3, 1 and 2 CPU
ranks), the guard refuses every setup that would swap it out, and ConAdvTrainer's staleness and resume."""
import copy
import json
import os
import sys

from pathlib import Path

import pytest
import torch

from dist_harness import ROOT, WORKERS, _run, base_env, free_port

# The checkout's kernels/ directory (installed as ds_conadv.kernels) shadows the `kernels` distribution that
# transformers imports when the checkout root is on sys.path (python -m pytest): import the real one first.
_saved_path = list(sys.path)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != str(ROOT)]
try:
    import kernels  # noqa: F401
except ImportError:
    pass
finally:
    sys.path[:] = _saved_path

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import TrainerCallback, TrainingArguments  # noqa: E402

from ds_conadv.conadv.perturb import generate  # noqa: E402
from ds_conadv.config import ConAdvConfig  # noqa: E402
from ds_conadv.integrations.hf import (ConAdvTrainer, OptimizerGuard, OptimizerSwapError,  # noqa: E402
                                       find_trust_optimizer, token_cross_entropy)
from ds_conadv.optim import LAMB  # noqa: E402

sys.path.insert(0, str(WORKERS))
import hf_worker  # noqa: E402

LR = hf_worker.LR


def _env():
    env = base_env()
    # the workers import transformers: keep the checkout root (and its kernels/) off their path
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(WORKERS)])
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _results(directory):
    out = {}
    for path in sorted(Path(directory).glob("result-*-rank*.json")):
        r = json.loads(path.read_text())
        out[(r["case"], r["rank"])] = r
    return out


def _worker(tmp_path, cases, nproc=1, timeout=300):
    args = [str(WORKERS / "hf_worker.py"), "--out", str(tmp_path), "--cases", *cases]
    env = _env()
    if nproc == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", *args]
    _run(cmd, env, timeout, cwd=tmp_path)
    return _results(tmp_path)


def _assert_ours_not_adamw(result, adamw, wrapper):
    assert result["chain"][-2:] == [wrapper, "LAMB"], result["chain"]
    assert result["attached"]  # exact per-tensor trust ratios over ZeRO's flat partitions
    assert result["losses"][0] == pytest.approx(adamw["losses"][0])  # same model, data and first forward
    assert result["losses"][1:] != pytest.approx(adamw["losses"][1:], rel=1e-3)  # then another trajectory


def test_trainer_deepspeed_one_rank(tmp_path):
    r = _worker(tmp_path, ["cls:1", "cls:2", "cls:3", "adamw:2", "dropped:2", "guard-dropped:2", "guard-json:2",
                           "conadv:2", "conadv:3", "registered:2"])
    adamw = r[("adamw:2", 0)]
    assert adamw["chain"][-1] == "AdamW"
    _assert_ours_not_adamw(r[("cls:1", 0)], adamw, "DeepSpeedZeroOptimizer")
    _assert_ours_not_adamw(r[("cls:2", 0)], adamw, "DeepSpeedZeroOptimizer")
    _assert_ours_not_adamw(r[("cls:3", 0)], adamw, "DeepSpeedZeroOptimizer_Stage3")
    assert r[("cls:1", 0)]["losses"] == r[("cls:2", 0)]["losses"]
    # what the guard exists for: without it Trainer drops optimizers=(LAMB(...), None) for AdamW, silently
    dropped = r[("dropped:2", 0)]
    assert dropped["chain"][-1] == "AdamW" and dropped["losses"] == adamw["losses"]
    assert "drops optimizers=(LAMB" in r[("guard-dropped:2", 0)]["refused"]
    assert "FusedLamb" in r[("guard-json:2", 0)]["refused"]
    # a JSON type DeepSpeed resolves through torch.optim to our class passes the guard and steps ours
    registered = r[("registered:2", 0)]
    assert registered["chain"][-2:] == ["DeepSpeedZeroOptimizer", "LAMB"] and registered["attached"]
    # ConAdvTrainer under ZeRO-2 trains as without DeepSpeed (up to summation order: measured 1.6e-5); under ZeRO-3
    # only close: LAMB's ZeRO-3 trust ratios are not exact yet (docs/integrations.md)
    plain = ConAdvTrainer(model=hf_worker.tiny_bert(), args=hf_worker.trainer_args(str(tmp_path / "plain")),
                          train_dataset=hf_worker.dataset(), optimizer_cls_and_kwargs=(LAMB, {"lr": LR}),
                          conadv=hf_worker.CONADV)
    plain.train()
    for case in ("conadv:2", "conadv:3"):
        assert r[(case, 0)]["chain"][-1] == "LAMB" and r[(case, 0)]["stale_by"] == [0.0, 1.0, 1.0, 1.0]
    assert r[("conadv:2", 0)]["losses"] == pytest.approx(_losses(plain), rel=1e-4)
    assert r[("conadv:3", 0)]["losses"] == pytest.approx(_losses(plain), rel=1e-2)


def test_trainer_deepspeed_zero3_is_exact(tmp_path):
    """Our optimizer attaches itself to ZeRO-3 at its first step (Trainer passes it to deepspeed.initialize):
    ZeRO-3's optimizer wrapper, which also has .module and .optimizer, must not be taken for an engine."""
    r = _worker(tmp_path, ["cls:2", "cls:3"])
    assert r[("cls:3", 0)]["losses"] == pytest.approx(r[("cls:2", 0)]["losses"], rel=1e-5)


def test_trainer_deepspeed_two_ranks(tmp_path):
    r = _worker(tmp_path, ["cls:2", "cls:3", "adamw:2", "conadv:2"], nproc=2)
    for case, wrapper in (("cls:2", "DeepSpeedZeroOptimizer"), ("cls:3", "DeepSpeedZeroOptimizer_Stage3")):
        assert r[(case, 0)]["losses"] == r[(case, 1)]["losses"]
        _assert_ours_not_adamw(r[(case, 0)], r[("adamw:2", 0)], wrapper)
    conadv = r[("conadv:2", 0)]
    assert conadv["chain"][-1] == "LAMB" and conadv["stale_by"] == [0.0, 1.0, 1.0, 1.0]
    assert conadv["losses"] == r[("conadv:2", 1)]["losses"]


@pytest.mark.parametrize("stage, nproc", [(3, 1), (2, 2)])  # ZeRO-2 on 1 rank: docs/integrations.md
def test_accelerate_deepspeed(tmp_path, stage, nproc):
    r = _worker(tmp_path, [f"accelerate:{stage}"], nproc=nproc)
    for rank in range(nproc):
        result = r[(f"accelerate:{stage}", rank)]
        wrapper = "DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer"
        assert result["chain"][-2:] == [wrapper, "LAMB"] and result["attached"] and len(result["losses"]) == 4


# ---- without DeepSpeed (in process) -------------------------------------------------------------------------
def _args(tmp_path, **kw):
    base = dict(per_device_train_batch_size=4, max_steps=3, learning_rate=LR, weight_decay=0.01, max_grad_norm=0.0,
                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    base.update(kw)
    return TrainingArguments(str(tmp_path / "out"), **base)


def _losses(trainer):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def test_trainer_routes_without_deepspeed(tmp_path):
    model = hf_worker.tiny_bert()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=hf_worker.dataset(),
                                   optimizers=(LAMB(model.parameters(), lr=LR), None), callbacks=[OptimizerGuard()])
    trainer.train()
    assert type(find_trust_optimizer(trainer.optimizer)) is LAMB
    by_cls = transformers.Trainer(model=hf_worker.tiny_bert(), args=_args(tmp_path), train_dataset=hf_worker.dataset(),
                                  optimizer_cls_and_kwargs=(LAMB, {"lr": LR}), callbacks=[OptimizerGuard()])
    by_cls.train()
    assert type(find_trust_optimizer(by_cls.optimizer)) is LAMB
    adamw = transformers.Trainer(model=hf_worker.tiny_bert(), args=_args(tmp_path), train_dataset=hf_worker.dataset())
    adamw.train()
    assert _losses(by_cls)[1:] != pytest.approx(_losses(adamw)[1:], rel=1e-3)


def test_guard_refuses_adamw_and_a_lamb_without_trust_ratio(tmp_path):
    data = hf_worker.dataset()
    with pytest.raises(OptimizerSwapError, match="AdamW"):
        transformers.Trainer(model=hf_worker.tiny_bert(), args=_args(tmp_path), train_dataset=data,
                             callbacks=[OptimizerGuard()]).train()
    # Trainer puts TrainingArguments.weight_decay (default 0.0) in every group: LAMB would step as Adam
    with pytest.raises(OptimizerSwapError, match="weight_decay 0 in every param group"):
        transformers.Trainer(model=hf_worker.tiny_bert(), args=_args(tmp_path, weight_decay=0.0), train_dataset=data,
                             optimizer_cls_and_kwargs=(LAMB, {"lr": LR, "weight_decay": 0.01}),
                             callbacks=[OptimizerGuard()]).train()


# ---- ConAdvTrainer -------------------------------------------------------------------------------------------
CONADV = hf_worker.CONADV


class _WeightsAtStepBegin(TrainerCallback):
    def __init__(self):
        self.weights = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.weights.append(copy.deepcopy(model.state_dict()))


def _conadv_trainer(tmp_path, conadv, **kw):
    args = _args(tmp_path, **kw)
    return ConAdvTrainer(model=hf_worker.tiny_bert(), args=args, train_dataset=hf_worker.dataset(),
                         optimizer_cls_and_kwargs=(LAMB, {"lr": LR}), conadv=conadv)


def _record_used(trainer):
    used = []
    step_fn = trainer.conadv_step.forward_backward

    def forward_backward(x, y, x_adv):
        batch = trainer.conadv_step.last_batch
        used.append((batch.step, batch.gen_step, x, y, x_adv))
        return step_fn(x, y, x_adv)

    trainer.conadv_step.forward_backward = forward_backward
    return used


def _regenerate(weights, x, y, conadv):
    model = hf_worker.tiny_bert()
    model.load_state_dict(weights)
    model.train()
    return generate(model, x, y, ConAdvConfig.from_section(conadv), loss_fn=token_cross_entropy)


@pytest.mark.parametrize("tau", [1, 0])
def test_conadv_trainer_staleness(tmp_path, tau):
    conadv = dict(CONADV, tau=tau)
    trainer = _conadv_trainer(tmp_path, conadv, max_steps=4)
    weights = _WeightsAtStepBegin()
    trainer.add_callback(weights)
    used = _record_used(trainer)
    trainer.train()
    assert [u[0] for u in used] == [0, 1, 2, 3]
    for step, gen_step, x, y, x_adv in used:
        # tau=1: step 0 has no earlier weights (generated now), then exactly one step stale; tau=0: DisAdv
        assert gen_step == (step if tau == 0 or step == 0 else step - 1)
        torch.testing.assert_close(_regenerate(weights.weights[gen_step], x, y, conadv), x_adv, rtol=0, atol=0)
        if gen_step != step:  # the check can fail: the current weights give another perturbation
            assert not torch.equal(_regenerate(weights.weights[step], x, y, conadv), x_adv)
    logged = [e for e in trainer.state.log_history if "conadv/stale_by" in e]
    assert [e["conadv/stale_by"] for e in logged] == [0.0, float(tau), float(tau), float(tau)]
    assert all(e["conadv/adversarial"] == 1.0 for e in logged)


def test_conadv_trainer_resume_keeps_the_pending_batch(tmp_path):
    full = _conadv_trainer(tmp_path / "full", CONADV, max_steps=6)
    full.train()
    first = _conadv_trainer(tmp_path / "part", CONADV, max_steps=6, save_strategy="steps", save_steps=3)
    stop_at_3 = type("Stop", (TrainerCallback,), {"on_step_end": lambda self, a, s, c, **k: setattr(
        c, "should_training_stop", s.global_step == 3) or c})
    first.add_callback(stop_at_3())
    first.train()
    ckpt = tmp_path / "part" / "out" / "checkpoint-3"
    assert (ckpt / "conadv_state_0.pt").exists()
    pending = torch.load(ckpt / "conadv_state_0.pt", weights_only=False)["pending"]
    assert len(pending) == 1 and pending[0]["gen_step"] == 2  # batch 3's example, made with the weights of step 2
    resumed = _conadv_trainer(tmp_path / "part", CONADV, max_steps=6, save_strategy="steps", save_steps=3)
    used = _record_used(resumed)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert used[0][:2] == (3, 2) and not used[0][1] == 3  # the saved example is used, not regenerated
    assert _losses(resumed)[-3:] == pytest.approx(_losses(full)[-3:], rel=1e-6)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


class _TinyConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, pixel_values):
        return self.head(torch.relu(self.bn(self.conv(pixel_values))).mean(dim=(2, 3)))


def test_conadv_trainer_dual_bn_vision(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.rand(1, 6, 6, generator=g), "labels": torch.randint(0, 3, (), generator=g)}
            for _ in range(16)]
    conadv = {"enabled": True, "tau": 1, "epsilon": 0.03, "input_range": [0.0, 1.0], "dual_bn": True}
    trainer = ConAdvTrainer(model=_TinyConvNet(), args=_args(tmp_path, max_steps=3, remove_unused_columns=False),
                            train_dataset=data,
                            optimizer_cls_and_kwargs=(LAMB, {"lr": LR}), conadv=conadv)
    adv_bn = trainer.model.bn.adv
    before = adv_bn.running_mean.clone()
    trainer.train()
    held = {id(p) for group in find_trust_optimizer(trainer.optimizer).param_groups for p in group["params"]}
    assert all(id(p) in held for p in adv_bn.parameters())  # converted before Trainer built the optimizer
    assert not torch.equal(adv_bn.running_mean, before)  # the adversarial branch trained through its own BN


def test_guard_accepts_our_registered_type_and_refuses_deepspeeds_lamb():
    """A DeepSpeed config's "ds_conadv.LAMB" is built by DeepSpeed as ours (tests/test_deepspeed.py runs it at ZeRO
    0-3); "LAMB" is DeepSpeed's FusedLamb."""
    from ds_conadv.integrations.hf import check_deepspeed_config

    check_deepspeed_config({"optimizer": {"type": "ds_conadv.LAMB", "params": {"lr": 0.01}}})
    check_deepspeed_config({"optimizer": {"type": "ds_conadv.LARS"}})
    with pytest.raises(OptimizerSwapError, match="FusedLamb"):
        check_deepspeed_config({"optimizer": {"type": "LAMB"}})
