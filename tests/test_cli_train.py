"""``ds-conadv train``, the main job: real runs through DeepSpeed (one rank in-process, two ranks with --nproc),
the shipped configs, and config errors that name the key."""
import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_harness import base_env
from ds_conadv import cli, train
from ds_conadv.config import ConfigError, strip_comments

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.json"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _num(text):
    return float(text) if text != "" else math.nan


def _outputs_exist(out: Path):
    for name in ("metrics.csv", "metrics.json", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC


# ----------------------------------------------------------------------------------------------------------
# real runs
# ----------------------------------------------------------------------------------------------------------
def test_main_job_one_rank_in_process(tmp_path, capsys):
    """The embedded default (ConAdv tau=1, LARS, ZeRO 1) as a single process: 15 optimizer steps."""
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    env_before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK")}
    assert cli.main(["train", "--max-steps", "15", "--out-dir", str(out), "--no-progress"]) == 0
    _outputs_exist(out)
    printed = capsys.readouterr().out
    assert "clean test accuracy:" in printed and "adversarial test accuracy:" in printed
    assert str(out / "curves.png") in printed and str(out / "metrics.json") in printed

    rows = _rows(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 16))
    loss = [float(r["loss"]) for r in rows]
    assert sum(loss[-3:]) / 3 < 0.5 * sum(loss[:3]) / 3, loss           # clean + adversarial loss falls
    assert all(not math.isnan(_num(r["adv_acc"])) for r in rows)         # every step is adversarial
    # tau = 1 optimizer step, also with 2 micro-batches per step: the first step's examples come from w_0
    assert rows[0]["stale_by"] == "0" and {r["stale_by"] for r in rows[1:]} == {"1"}
    assert _num(rows[-1]["test_clean_acc"]) > 0.5                          # evaluated at the end

    s = json.loads((out / "metrics.json").read_text())
    assert s["mode"] == "conadv" and s["optimizer"] == "LARS" and s["steps"] == 15
    assert s["world_size"] == 1 and s["global_batch"] == 256 and s["gradient_accumulation_steps"] == 2
    assert s["final_test_clean_acc"] > 0.5, s                              # chance: 0.1
    assert s["final_test_adv_acc"] > 0.3, s
    # the standard robustness figure: untargeted PGD-10 is stronger than the configured random-target PGD-1
    assert 0.0 <= s["final_test_pgd_acc"] < s["final_test_adv_acc"] and "PGD-10" in s["pgd_eval"], s
    assert "PGD test accuracy:" in printed
    assert s["mean_step_time_s"] > 0 and s["ranks_agree"] and len(s["ranks"]) == 1
    assert s["config"]["scheduler"]["params"]["total_num_steps"] == 30 * 5  # "auto" = epochs x steps/epoch
    assert s["config"]["conadv"]["epsilon"] == 2.0 and "_comment" not in s["config"]
    # the job leaves the process as it found it
    assert not torch.distributed.is_initialized()
    assert torch.get_num_threads() == threads
    assert {k: os.environ.get(k) for k in env_before} == env_before


def test_vanilla_with_poly_schedule_in_process(tmp_path):
    """--mode vanilla and our WarmupPolyDecayLR through ds_conadv.initialize: the lr of each step follows it."""
    out = tmp_path / "run"
    sched = {"type": "WarmupPolyDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 2.0,
                                                      "warmup_num_steps": 2, "total_num_steps": 6,
                                                      "warmup_type": "linear", "power": 2.0}}
    tensorboard = importlib.util.find_spec("tensorboard") is not None  # DeepSpeed's monitor needs it
    monitor = ["--set", 'tensorboard={"enabled": true, "job_name": "tb"}'] if tensorboard else []
    assert cli.main(["train", "--mode", "vanilla", "--max-steps", "6", "--zero-stage", "0", "--out-dir", str(out),
                     "--no-progress", "--set", "scheduler=" + json.dumps(sched), *monitor]) == 0
    rows = _rows(out / "metrics.csv")
    assert all(math.isnan(_num(r["adv_acc"])) and r["stale_by"] == "" for r in rows)   # no adversarial examples
    if tensorboard:  # a "tensorboard" section without "output_path" writes into the run's folder
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
        events.Reload()
        loss = events.Scalars("Train/Samples/train_loss")
        assert [e.step for e in loss] == [256 * int(r["step"]) for r in rows]      # samples trained so far
        assert [e.value for e in loss] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-5)  # csv: 6 digits

    def expected(it):  # DeepSpeed's iteration count: the lr of step k (1-based, k >= 2) is f(k - 2)
        if it < 2:
            return 2.0 * it / 2
        return 2.0 * ((6 - it) / (6 - 2)) ** 2.0

    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == 0.0
    assert lrs[1:] == pytest.approx([expected(k - 2) for k in range(2, 7)], rel=1e-5)
    s = json.loads((out / "metrics.json").read_text())
    assert s["mode"] == "vanilla" and math.isnan(s["final_train_adv_acc"])


def test_main_job_two_ranks_nproc(tmp_path):
    """`ds-conadv train --nproc 2`: re-launches itself through torch.distributed.run (gloo, 2 CPU ranks)."""
    out = tmp_path / "run2"
    cmd = [sys.executable, "-m", "ds_conadv.cli", "train", "--nproc", "2", "--max-steps", "6", "--out-dir", str(out),
           "--no-progress"]
    try:
        proc = subprocess.run(cmd, env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"2-rank run timed out after 240 s:\n{exc.stdout}\n{exc.stderr}") from None
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-5000:]}\n--- stderr\n" \
                                 f"{proc.stderr[-5000:]}"
    _outputs_exist(out)
    assert proc.stdout.count("clean test accuracy:") == 1          # rank 0 only
    s = json.loads((out / "metrics.json").read_text())
    assert s["world_size"] == 2 and s["global_batch"] == 256 and s["gradient_accumulation_steps"] == 1
    assert [r["rank"] for r in s["ranks"]] == [0, 1]
    assert all(r["steps"] == 6 for r in s["ranks"])                 # both ranks ran to the end
    assert s["ranks_agree"], s["ranks"]                             # and hold the same weights
    assert len(_rows(out / "metrics.csv")) == 6


def test_local_rank_argument_of_the_deepspeed_launcher_is_accepted():
    # `deepspeed script.py args` runs `python -u script.py --local_rank=N args`
    assert cli._strip_local_rank(["--local_rank=1", "train", "--epochs", "2"]) == ["train", "--epochs", "2"]
    assert cli._strip_local_rank(["train", "--local-rank", "0", "--seed", "3"]) == ["train", "--seed", "3"]


# ----------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    resolved = train.validate_config(json.loads(path.read_text()), check_deepspeed=True)
    assert resolved.optimizer_type in ("LARS", "LAMB")
    assert resolved.conadv.enabled or resolved.absa_enabled


def test_configs_dir_has_the_expected_files():
    assert {p.name for p in CONFIGS} >= {"conadv_digits.json", "conadv_digits_lamb.json",
                                         "resnet50_96k_lars_conadv.json", "absa_digits.json"}


@pytest.mark.parametrize("name", train.embedded_config_names())
def test_embedded_configs_equal_the_files_in_configs(name):
    assert train.load_embedded(name) == json.loads((ROOT / "configs" / name).read_text())


def test_96k_recipe_numbers_equal_the_notes():
    """docs/conadv.md (from the authors' TPU code): 98,304 batch, LARS trust 0.001 with BN/bias skipped,
    momentum 0.92, wd 5e-5, 41 warm-up epochs to LR 43, polynomial decay power 1.6, ~100 epochs = 1,301 steps,
    label smoothing 0.1, bf16; ConAdv tau=1, random-target 1-step PGD, eps = alpha = 9/255 on [-1, 1],
    random start with probability 0.8."""
    cfg = strip_comments(json.loads((ROOT / "configs" / "resnet50_96k_lars_conadv.json").read_text()))
    r = train.validate_config(cfg, check_deepspeed=True)
    assert cfg["train_batch_size"] == 98304
    opt = cfg["optimizer"]
    assert opt["type"] == "LARS"
    assert opt["params"] == {**opt["params"], "trust_coefficient": 0.001, "momentum": 0.92, "weight_decay": 5e-5,
                             "exclude_norm_and_bias": True}
    assert cfg.get("gradient_clipping") == 0.0
    sp = cfg["scheduler"]["params"]
    assert cfg["scheduler"]["type"] == "WarmupPolyDecayLR"
    assert sp["warmup_max_lr"] == 43.0 and sp["power"] == 1.6 and sp["warmup_type"] == "linear"
    assert sp["warmup_num_steps"] == int(41 * 1281167 / 98304) == 534
    assert sp["total_num_steps"] == 1301
    assert cfg["bf16"] == {"enabled": True}
    assert r.train.label_smoothing == 0.1 and r.train.epochs == 100
    c = r.conadv
    assert c.enabled and c.tau == 1 and c.dual_bn and c.loss_mode == "clean+adv" and c.adv_weight == 1.0
    assert c.attack == "pgd" and c.steps == 1 and c.target == "random"
    assert c.epsilon == c.step_size == 9 / 255
    assert c.random_start and c.random_start_prob == 0.8 and c.input_range == (-1.0, 1.0)


def test_96k_recipe_is_refused_by_the_job_with_the_reason(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--config", str(ROOT / "configs" / "resnet50_96k_lars_conadv.json"), "--nproc", "2"])
    assert exc.value.code == 2
    assert "documents a recipe" in capsys.readouterr().err


def test_print_config_applies_the_overrides(capsys):
    assert cli.main(["train", "--print-config", "--mode", "disadv", "--epochs", "3", "--zero-stage", "2",
                     "--seed", "5", "--optimizer", "lamb", "--set", "conadv.epsilon=1.5"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["conadv"]["enabled"] is True and cfg["conadv"]["tau"] == 0 and cfg["conadv"]["epsilon"] == 1.5
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["seed"] == 5
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["optimizer"]["type"] == "LAMB" and cfg["scheduler"]["params"]["warmup_max_lr"] == 0.02
    assert not any(k.startswith("_comment") for k in cfg)


def test_adversarial_start_after_the_last_epoch_is_refused(capsys):
    """A ConAdv job whose start epoch is not below its epochs would train without adversarial examples: refused."""
    argv = ["train", "--print-config", "--epochs", "3", "--set", "conadv.start_epoch=3"]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert '"conadv.start_epoch" = 3 with "train.epochs" = 3: no epoch would have adversarial examples' in err
    assert len(err.strip().splitlines()) == 1
    assert cli.main(argv[:-2] + ["--set", "conadv.start_epoch=2"]) == 0
    assert cli.main(argv + ["--mode", "vanilla"]) == 0


def test_mode_overrides():
    base = train.load_embedded()
    assert train.validate_config(train.apply_overrides(base, mode="vanilla")[0]).mode == "vanilla"
    assert train.validate_config(train.apply_overrides(base, mode="disadv")[0]).conadv.tau == 0
    cfg, _ = train.apply_overrides(train.apply_overrides(base, mode="disadv")[0], mode="conadv")
    assert train.validate_config(cfg).conadv.tau == 1


@pytest.mark.parametrize("patch,needle,allowed", [
    ({"train": {"epoch": 3}}, 'unknown key "epoch" in "train"', "epochs"),
    ({"train": {"_note": "x"}}, 'unknown key "_note" in "train"', "eval_every"),
    ({"conadv": {"eps": 1.0}}, 'unknown key "eps" in "conadv"', "epsilon"),
    ({"optimizer": {"params": {"momentun": 0.9}}}, 'unknown key "momentun" in "optimizer.params"', "momentum"),
    ({"optimizer": {"param": {}}}, 'unknown key "param" in "optimizer"', "params"),
    ({"scheduler": {"type": "WarmupPolyDecayLR", "params": {"total_num_steps": 10, "powr": 2}}},
     'unknown key "powr" in "scheduler.params"', "power"),
])
def test_unknown_keys_are_named_with_the_allowed_ones(tmp_path, capsys, patch, needle, allowed):
    cfg = train.load_embedded()
    for section, value in patch.items():
        if section == "optimizer" and "params" in value:
            cfg["optimizer"]["params"].update(value["params"])
        elif section == "optimizer":
            cfg["optimizer"].update(value)
        elif section in cfg and section != "scheduler":
            cfg[section].update(value)
        else:
            cfg[section] = value
    with pytest.raises(ConfigError) as err:
        train.validate_config(cfg)
    assert needle in str(err.value) and "allowed keys:" in str(err.value) and allowed in str(err.value)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--config", str(path), "--no-progress"])
    assert exc.value.code == 2 and needle in capsys.readouterr().err


def test_bad_values_are_named():
    cfg = train.load_embedded()
    cfg["train"]["epochs"] = 0
    with pytest.raises(ConfigError, match=r'"train.epochs" = 0'):
        train.validate_config(cfg)
    cfg = train.load_embedded()
    cfg["conadv"]["attack"] = "cw"
    with pytest.raises(ConfigError, match=r'"conadv.attack"'):
        train.validate_config(cfg)
    cfg = train.load_embedded()
    cfg["optimizer"]["params"]["lr"] = -1.0
    with pytest.raises(ConfigError, match="optimizer.params"):
        train.validate_config(cfg)
    cfg = train.load_embedded()
    cfg["scheduler"]["params"]["warmup_num_steps"] = "auto"
    with pytest.raises(ConfigError, match="only total_num_steps"):
        train.validate_config(cfg)
    cfg = train.load_embedded()
    cfg["zero_optimization"]["stagee"] = 1
    with pytest.raises(ConfigError, match="stagee"):
        train.validate_config(cfg, check_deepspeed=True)


def test_comment_keys_are_stripped_at_any_depth():
    cfg = {"_comment": "top", "a": {"_comment_x": 1, "b": [{"_comment": 2, "c": 3}]}, "_commentary": 4, "_other": 5}
    assert strip_comments(cfg) == {"a": {"b": [{"c": 3}]}, "_other": 5}


def test_warmup_poly_decay_lr():
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    from ds_conadv.lr_schedules import WarmupPolyDecayLR

    def lrs(cls, **kw):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = cls(opt, total_num_steps=10, warmup_max_lr=4.0, warmup_num_steps=4, warmup_type="linear", **kw)
        out = []
        for _ in range(12):
            sched.step()
            out.append(opt.param_groups[0]["lr"])
        return out

    assert lrs(WarmupPolyDecayLR, power=1.0) == lrs(WarmupDecayLR)
    got = lrs(WarmupPolyDecayLR, power=1.6)
    want = [4.0 * it / 4 if it < 4 else 4.0 * max(0.0, (10 - it) / 6) ** 1.6 for it in range(12)]
    assert got == pytest.approx(want)


def test_absa_config_runs_on_two_ranks(tmp_path):
    """ds-conadv train --config configs/absa_digits.json: the ABSA loop, 2 ranks, 3 epochs; the batch grows."""
    out = tmp_path / "absa"
    proc = subprocess.run([sys.executable, "-m", "ds_conadv.cli", "train", "--config",
                           str(ROOT / "configs" / "absa_digits.json"), "--epochs", "3", "--nproc", "2",
                           "--out-dir", str(out), "--no-progress"],
                          env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["mode"] == "absa" and summary["ranks_agree"] and summary["world_size"] == 2
    assert summary["epochs"] == 3 and summary["final_global_batch"] > summary["global_batches"][0] == 32
    assert summary["final_test_clean_acc"] > 0.8 and not math.isnan(summary["final_test_adv_acc"])
    assert (out / "absa.png").read_bytes()[:8] == PNG_MAGIC and (out / "absa_log.csv").is_file()
    assert "adversarial test accuracy:" in proc.stdout


def test_absa_refuses_auto_total_steps(tmp_path, capsys):
    cfg = json.loads((ROOT / "configs" / "absa_digits.json").read_text())
    cfg["scheduler"] = {"type": "WarmupDecayLR", "params": {"warmup_max_lr": 0.5, "warmup_num_steps": 2,
                                                            "total_num_steps": "auto"}}
    path = tmp_path / "absa_auto.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(SystemExit):  # before any rank starts
        cli.main(["train", "--config", str(path), "--nproc", "2", "--out-dir", str(tmp_path / "o")])
    assert '"scheduler.params.total_num_steps" = "auto" with "absa.enabled"' in capsys.readouterr().err



def test_version(capsys):
    import ds_conadv

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"ds-conadv {ds_conadv.__version__}"


def test_embedded_config_by_name(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file of that name here: the packaged one is taken
    assert cli.main(["train", "--config", "absa_digits.json", "--print-config"]) == 0
    assert '"absa"' in capsys.readouterr().out


@pytest.mark.parametrize("absent, backend, named", [("matplotlib", "deepspeed", "matplotlib"),
                                                     ("sklearn", "horovod", "scikit-learn"),
                                                     ("deepspeed", "deepspeed", "deepspeed")])
def test_missing_train_extra_fails_before_training(monkeypatch, absent, backend, named):
    """Without the train extra the job stops before any rank starts, naming the package and the extra."""
    import importlib.util

    from ds_conadv.app.job_config import check_runnable

    resolved, _, _ = cli.resolve_train_args(cli.build_parser().parse_args(["train"]))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == absent else real(name, *a))
    with pytest.raises(ConfigError, match=rf"needs {named}, not installed here: pip install 'ds_conadv\[train\]'"):
        check_runnable(resolved, backend)
