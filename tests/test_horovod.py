"""Horovod: our optimizers under hvd.DistributedOptimizer and the ConAdv trainer, on real ``horovodrun`` ranks.

Horovod is optional: without it these tests are skipped (install: bash scripts/install_horovod.sh). With
DS_CONADV_REQUIRE_HOROVOD=1 (set by scripts/_setup.sh when it installs Horovod, e.g. in CI) a missing Horovod
is a failure instead, so CI cannot go green without running them.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from dist_harness import ROOT, WORKERS, base_env
from ds_conadv.integrations.horovod import check_settings_survived, group_settings

HOROVODRUN = Path(sys.executable).with_name("horovodrun")
TIMEOUT = 240


@lru_cache(maxsize=1)
def horovod_missing() -> str:
    """Why Horovod cannot run here ('' when it can). Checked in a subprocess: a build against another torch
    fails at import with an undefined symbol, which must not take the test process down."""
    if not HOROVODRUN.exists():
        return f"horovodrun not found next to {sys.executable}"
    proc = subprocess.run([sys.executable, "-c", "import horovod.torch"], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        return "horovod.torch does not import: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    return ""


def need_horovod():
    why = horovod_missing()
    if why:
        if os.environ.get("DS_CONADV_REQUIRE_HOROVOD") == "1":
            pytest.fail(f"DS_CONADV_REQUIRE_HOROVOD=1 but {why}")
        pytest.skip(f"Horovod not installed ({why}); install with `bash scripts/install_horovod.sh`")


def horovodrun(args, np=2, timeout=TIMEOUT) -> str:
    need_horovod()
    cmd = [str(HOROVODRUN), "--gloo", "-np", str(np), "-H", f"localhost:{np}", sys.executable, *args]
    try:
        proc = subprocess.run(cmd, env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(cmd)}\n--- stdout\n{proc.stdout[-6000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc.stdout


def worker(tmp_path, tag, *args):
    prefix = str(tmp_path / tag)
    horovodrun([str(WORKERS / "hvd_train.py"), *args, "--out", prefix])
    return [json.load(open(f"{prefix}.rank{r}")) for r in range(2)]


def tensors(params):
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in params.items()}


def assert_close(a, b, what, rtol=1e-5, atol=1e-6):
    a, b = tensors(a), tensors(b)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{what}: {k}: {m}")


# ----------------------------------------------------------------------------------------------------------
# without Horovod: the rebuild check itself
# ----------------------------------------------------------------------------------------------------------
def test_check_settings_survived_names_the_key():
    from ds_conadv.optim import LAMB

    p = torch.nn.Parameter(torch.ones(3))
    opt = LAMB([p], lr=0.1, max_grad_norm=1.0, backend="foreach")
    before = group_settings(opt)
    check_settings_survived(before, opt)  # unchanged: fine
    rebuilt = LAMB(opt.param_groups)  # what hvd.DistributedOptimizer does: every setting lives in the groups
    check_settings_survived(before, rebuilt)
    opt.param_groups[0]["max_grad_norm"] = None
    with pytest.raises(RuntimeError, match="'max_grad_norm' changed from 1.0 to None"):
        check_settings_survived(before, opt)
    opt.param_groups[0]["max_grad_norm"] = 1.0
    del opt.param_groups[0]["backend"]
    with pytest.raises(RuntimeError, match="lost setting 'backend'"):
        check_settings_survived(before, opt)
    opt.param_groups[0]["backend"] = "foreach"
    opt.param_groups[0]["master_weights"] = 0  # a bool turned int is a change
    with pytest.raises(RuntimeError, match="master_weights"):
        check_settings_survived(before, opt)


def test_missing_horovod_message():
    from ds_conadv.integrations import horovod as glue

    if glue.available():
        pytest.skip("Horovod is installed")
    with pytest.raises(ImportError, match="install_horovod.sh"):
        glue.require_horovod()


# ----------------------------------------------------------------------------------------------------------
# under horovodrun
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def basics(tmp_path_factory):
    need_horovod()
    return worker(tmp_path_factory.mktemp("hvd_basics"), "basics", "basics")


def test_settings_survive_the_rebuild(basics):
    for r in basics:
        s = r["settings"]
        for name in ("lamb", "lars"):
            assert s[name]["wrapped"] and s[name]["isinstance"]
            assert s[name]["after"] == s[name]["before"], name
        lamb = s["lamb"]["after"]
        assert [g["lr"] for g in lamb] == [0.01, 0.02] and [g["weight_decay"] for g in lamb] == [0.05, 0.0]
        assert all(g["backend"] == "foreach" and g["max_grad_norm"] == 0.5 and g["master_weights"] is True
                   and g["betas"] == [0.8, 0.99] and g["bias_correction"] is False and g["adam_w_mode"] is False
                   and g["trust_clip"] is True and g["min_trust_ratio"] == 0.01 for g in lamb)
        lars = s["lars"]["after"][0]
        assert lars["backend"] == "reference" and lars["max_grad_norm"] == 2.0 and lars["master_weights"] is True
        assert lars["nesterov"] is True and lars["momentum"] == 0.8 and lars["trust_coefficient"] == 0.01
        assert "'scale' changed from 3.0 to 1.0" in s["lossy_error"]
        assert s["defaults_max_grad_norm"] is None  # the original defaults are put back (timm's Lamb reads them)
        assert s["state_carried"]


def test_broadcast_state_starts_all_ranks_from_root(basics):
    b0, b1 = (r["settings"]["broadcast"] for r in basics)
    assert b0["initial"] != b1["initial"]  # different seeds per rank before
    assert b0["after"] == b0["initial"] == b1["after"]  # root's params, and the root was not stepped
    assert b0["running_mean"] == b1["running_mean"]  # buffers too
    assert b0["state_steps"] == b1["state_steps"] and set(b1["state_steps"]) == {1.0}  # optimizer state
    assert b0["skipped_steps"] == b1["skipped_steps"] == 0


@pytest.mark.parametrize("name", ["lamb", "lars"])
@pytest.mark.parametrize("k", [1, 2])
def test_optimizer_under_horovod_equals_single_process(basics, name, k):
    """Same global batch: rank shards (and k accumulated micro-batches) averaged by Horovod == one process.
    Global clipping is active (grad norm > max_grad_norm = 0.05), so it must see the averaged gradient."""
    entry0, entry1 = (r["equivalence"][f"{name}_k{k}"] for r in basics)
    assert entry0["hvd"] == entry1["hvd"], "ranks disagree on parameters"
    assert min(entry0["grad_norms"]) > 0.05 * 2
    assert_close(entry0["hvd"], entry0["ref"], f"{name} k={k} under Horovod vs one process")


@pytest.mark.parametrize("mode", ["conadv", "disadv", "vanilla"])
def test_conadv_trainer_equals_single_process(basics, mode):
    e0, e1 = (r["equivalence"][mode] for r in basics)
    assert e0["hvd"] == e1["hvd"], "ranks disagree on parameters"
    assert_close(e0["hvd"], e0["ref"], f"{mode}: HorovodConAdvTrainer vs ConAdvTrainer")
    ours = [{k: m[k] for k in ("stale_by", "generated_now", "generated_ahead", "adversarial")} for m in e0["metrics"]]
    assert ours == e0["ref_metrics"]
    assert [m["global_step"] for m in e0["metrics"]] == [1, 2, 3, 4]
    if mode == "conadv":
        assert [m["stale_by"] for m in ours] == [0, 1, 1, 1] and [m["generated_now"] for m in ours] == [1, 0, 0, 0]
    elif mode == "disadv":
        assert all(m["stale_by"] == 0 and m["generated_now"] == 1 and m["generated_ahead"] == 0 for m in ours)
    else:
        assert all(m["stale_by"] is None and not m["adversarial"] for m in ours)
    assert e0["lr"] == pytest.approx(0.05 / 5)  # LambdaLR stepped once per optimizer step


def test_tau1_staleness_and_resume(tmp_path):
    """Dual BN, PGD with random start, LARS + clipping + LR schedule: on every rank x̂_t is exactly what w_{t-1}
    (a saved copy) generates, not w_t; ranks agree; a resumed run equals the uninterrupted one."""
    ckpt = tmp_path / "ckpt"
    full = worker(tmp_path, "full", "conadv", "--steps", "6", "--save-at", "3", "--ckpt", str(ckpt))
    for r in full:
        m = r["metrics"]
        assert [x["stale_by"] for x in m] == [0, 1, 1, 1, 1, 1]
        assert [x["generated_now"] for x in m] == [1, 0, 0, 0, 0, 0] and all(x["generated_ahead"] == 1 for x in m)
        assert all(math.isfinite(x["adv_loss"]) and x["adv_loss"] > 0 for x in m)
        checks = r["checks"]
        assert [c["step"] for c in checks] == [2, 3, 4, 5]
        assert all(c["equal_prev"] and not c["equal_current"] and c["gen_step"] == c["step"] - 1 for c in checks)
    assert full[0]["params"] == full[1]["params"], "ranks disagree on parameters"
    assert full[0]["metrics"][0]["loss"] != full[1]["metrics"][0]["loss"]  # really different data per rank
    assert sorted(os.listdir(ckpt)) == ["conadv_rank0.pt", "conadv_rank1.pt", "state.pt"]

    resumed = worker(tmp_path, "resumed", "conadv", "--steps", "6", "--resume", str(ckpt))
    for r_full, r_res in zip(full, resumed):
        assert r_res["start"] == 3 and r_res["global_step"] == 6
        assert r_res["metrics"] == r_full["metrics"][3:]
        assert r_res["params"] == r_full["params"]
        assert r_res["lr"] == r_full["lr"]
        assert all(c["equal_prev"] and not c["equal_current"] for c in r_res["checks"])  # w_{t-1} restored exactly


def test_main_job_under_horovodrun(tmp_path):
    """train_horovod on the main job's DeepSpeed-style JSON (LARS, ConAdv, DeepSpeed's WarmupDecayLR with
    "auto" steps; here with 2 accumulation steps and a narrow CNN), then a resume from its checkpoint."""
    src = ROOT / "configs" / "conadv_digits.json"
    config = json.loads(src.read_text()) if src.exists() else {
        "train_batch_size": 256, "gradient_clipping": 0.0, "zero_optimization": {"stage": 1},
        "optimizer": {"type": "LARS", "params": {"lr": 4.0, "weight_decay": 5e-5, "trust_coefficient": 0.01,
                                                 "exclude_norm_and_bias": True, "backend": "foreach"}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_max_lr": 4.0, "warmup_num_steps": 20,
                                                          "warmup_type": "linear", "total_num_steps": "auto"}},
        "conadv": {"enabled": True, "tau": 1, "attack": "fgsm", "epsilon": 2.0, "input_range": [0.0, 16.0]},
        "train": {"data": "digits", "model": "cnn", "epochs": 30, "seed": 0}}
    config["train_micro_batch_size_per_gpu"] = 64  # 256 = 64 x 2 accumulation steps x 2 ranks
    config["gradient_clipping"] = 1.0
    config["train"].update(width=8, threads=1, eval_every=1)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "m.json"
    args = ["-m", "ds_conadv.integrations.horovod_train", "--config", str(path), "--metrics-json", str(out)]
    log = horovodrun(args + ["--save-dir", str(tmp_path / "ck"), "--max-steps", "3"])
    m = json.loads(out.read_text())
    assert m["ranks"] == 2 and m["steps"] == 3 and m["gradient_accumulation_steps"] == 2
    assert m["train_batch_size"] == 256 and m["conadv"] == "conadv(tau=1)" and math.isfinite(m["final_loss"])
    assert "test accuracy" in log
    horovodrun(args + ["--resume", str(tmp_path / "ck"), "--max-steps", "5", "--no-progress"])
    m2 = json.loads(out.read_text())
    assert m2["steps"] == 5 and math.isfinite(m2["final_loss"])


def test_elastic_worker_removed_and_readded(tmp_path):
    """hvd.elastic: a worker taken away and brought back (through the host discovery script) — training goes on
    from the last commit at every membership change, the first step after a reset generates its adversarial
    example synchronously (the look-ahead belonged to the old shard), and the ranks end with equal weights."""
    need_horovod()
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost:2\n")
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discover.chmod(0o755)
    prefix = str(tmp_path / "elastic")
    # --network-interface lo: without it the elastic driver's interface discovery hangs on this machine
    cmd = [str(HOROVODRUN), "--gloo", "--network-interface", "lo", "-np", "2", "--min-np", "1", "--max-np", "2",
           "--host-discovery-script", str(discover), sys.executable, str(WORKERS / "hvd_elastic.py"),
           "--hosts-file", str(hosts), "--out", prefix]
    try:
        proc = subprocess.run(cmd, env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise AssertionError(f"timed out after {TIMEOUT}s\n{out[-4000:]}") from None
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    ranks = [json.load(open(f"{prefix}.rank{r}")) for r in range(2)]
    assert ranks[0]["phase"] == 4 and ranks[0]["size"] == 2, "the run did not go through remove and re-add"
    log0 = ranks[0]["log"]
    steps = [e["global_step"] for e in log0]
    assert steps == list(range(1, len(steps) + 1)), "rank 0 lost or repeated committed steps"
    sizes = [e["size"] for e in log0]
    changes = [i for i in range(1, len(sizes)) if sizes[i] != sizes[i - 1]]
    assert [sizes[0]] + [sizes[i] for i in changes] == [2, 1, 2]
    for i, e in enumerate(log0):
        if i == 0 or i in changes:
            assert e["generated_now"] == 1 and e["stale_by"] == 0, f"step {e['global_step']}: {e}"
        else:
            assert e["generated_now"] == 0 and e["stale_by"] == 1, f"step {e['global_step']}: {e}"
    joined = ranks[1]["log"]  # the worker started after the re-add (the first rank 1 was removed)
    assert joined[0]["global_step"] == log0[changes[1]]["global_step"], "the new worker did not start from the commit"
    assert all(e["size"] == 2 for e in joined)
    for name, value in ranks[0]["params"].items():
        assert value == ranks[1]["params"][name], f"ranks disagree on {name}"
        assert all(math.isfinite(v) for v in value)

