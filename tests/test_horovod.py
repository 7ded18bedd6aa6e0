"""Horovod: our optimizers under hvd.DistributedOptimizer and the ConAdv trainer, on real ``horovodrun`` ranks.

Horovod is optional: without it these tests are skipped (install: bash scripts/install_horovod.sh). With
DS_CONADV_REQUIRE_HOROVOD=1 (set by scripts/_setup.sh when it installs Horovod, e.g. in CI) a missing Horovod
is a failure instead, so CI cannot go green without running them.
"""
from __future__ import annotations

import json
import math
import os
import shutil
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


# ----------------------------------------------------------------------------------------------------------
# the main job: ds-conadv train --backend horovod (and the module path): run folder, resume, non-finite steps
# ----------------------------------------------------------------------------------------------------------
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMPARED = ("lr", "loss", "clean_loss", "adv_loss", "clean_acc", "adv_acc", "stale_by", "generated_now", "skipped",
            "skipped_total")


def job_config(tmp_path) -> Path:
    """The main job's config (LARS, ConAdv tau=1, WarmupDecayLR with "auto" steps), narrow CNN, one thread per
    rank, 2 accumulated micro-batches per step: 256 = 64 x 2 x 2 ranks."""
    config = json.loads((ROOT / "configs" / "conadv_digits.json").read_text())
    config["train_micro_batch_size_per_gpu"] = 64
    config["gradient_clipping"] = 1.0
    config["train"].update(width=8, threads=1)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config))
    return path


def hvd_job(*args, np=2, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    """``horovodrun ... python ARGS`` that may fail (the caller checks the exit status)."""
    need_horovod()
    cmd = [str(HOROVODRUN), "--gloo", "-np", str(np), "-H", f"localhost:{np}", sys.executable, *map(str, args)]
    try:
        return subprocess.run(cmd, env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}") from None


def rank_error_lines(proc, rank) -> list:
    return [ln for ln in (proc.stdout + proc.stderr).splitlines()
            if ln.startswith(f"[{rank}]<stderr>:ds-conadv: error:")]


def csv_rows(path):
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def hvd_runs(tmp_path_factory):
    """4 steps at once through the module path; 2 steps with a checkpoint through ``ds-conadv train --backend
    horovod``, then resumed to 4 in the same folder."""
    need_horovod()
    base = tmp_path_factory.mktemp("hvd_job")
    cfg = job_config(base)
    whole, split = base / "whole", base / "split"
    proc = hvd_job("-m", "ds_conadv.integrations.horovod_train", "--config", cfg, "--max-steps", "4", "--out-dir",
                   whole, "--metrics-json", base / "m.json", "--no-progress")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    cli = ["-m", "ds_conadv.cli", "train", "--backend", "horovod", "--config", cfg, "--out-dir", split, "--no-progress"]
    proc = hvd_job(*cli, "--max-steps", "2", "--save-every", "2")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    shutil.copytree(split / "checkpoints" / "step2", base / "step2")  # a pristine copy for the fault tests
    proc = hvd_job(*cli, "--max-steps", "4", "--save-every", "2", "--resume")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "resumed from" in proc.stdout
    return whole, split, base / "step2", cfg


def test_horovod_job_writes_the_run_folder(hvd_runs):
    """The same run folder as under DeepSpeed: metrics.csv (same columns), metrics.json, curves.png, status.json."""
    from ds_conadv.app.run_folder import CSV_FIELDS

    whole = hvd_runs[0]
    rows = csv_rows(whole / "metrics.csv")
    assert tuple(rows[0].keys()) == CSV_FIELDS and [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert all(r["skipped"] == "0" and r["skipped_total"] == "0" for r in rows)
    assert rows[-1]["test_clean_acc"] != "" and [r["stale_by"] for r in rows] == ["0", "1", "1", "1"]
    summary = json.loads((whole / "metrics.json").read_text())
    for key in ("final_test_clean_acc", "final_test_adv_acc", "final_test_pgd_acc", "mean_step_time_s",
                "median_step_time_s"):
        assert math.isfinite(summary[key]), key
    assert summary["backend"] == "horovod" and summary["world_size"] == 2 and summary["steps"] == 4
    assert summary["gradient_accumulation_steps"] == 2 and summary["skipped_steps"] == 0
    assert len(summary["ranks"]) == 2 and summary["ranks_agree"]
    assert (whole / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((whole / "status.json").read_text())["complete"] is True
    assert json.loads((whole.parent / "m.json").read_text())["steps"] == 4  # --metrics-json of the module path


def test_horovod_resume_is_bit_exact(hvd_runs):
    """Resumed at step 2 (the pending adversarial batch, optimizer and scheduler state, RNG, data position, each
    rank's BN statistics): the same losses, accuracies, test accuracies and every rank's parameter checksum."""
    whole, split, _, _ = hvd_runs
    a, b = csv_rows(whole / "metrics.csv"), csv_rows(split / "metrics.csv")
    assert [r["step"] for r in b] == ["1", "2", "3", "4"]
    for key in COMPARED:
        assert [r[key] for r in a] == [r[key] for r in b], key
    sa, sb = json.loads((whole / "metrics.json").read_text()), json.loads((split / "metrics.json").read_text())
    assert [r["param_checksum"] for r in sa["ranks"]] == [r["param_checksum"] for r in sb["ranks"]]
    for key in ("final_test_clean_acc", "final_test_adv_acc", "final_test_pgd_acc"):
        assert sa[key] == sb[key], key
    assert sb["resumed_from"] and json.loads((split / "status.json").read_text())["complete"] is True
    assert sorted(os.listdir(split / "checkpoints")) == ["step4"]  # the newest only
    manifest = json.loads((split / "checkpoints" / "step4" / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["conadv_rank0.pt", "conadv_rank1.pt", "job_rank0.pt", "job_rank1.pt",
                                         "state.pt"]
    assert manifest["meta"] == {"step": 4, "world_size": 2, "backend": "horovod"}


@pytest.mark.parametrize("fault,name,needle", [
    ("flip", "state.pt", "does not match its sha256"),
    ("truncate", "conadv_rank1.pt", "truncated"),
    ("missing", "job_rank1.pt", "is missing"),
])
def test_horovod_bad_checkpoint_is_refused_in_one_line(hvd_runs, tmp_path, capsys, fault, name, needle):
    """Verified before Horovod starts: one line naming the file, exit 2."""
    from ds_conadv import cli

    ckpt = tmp_path / "step2"
    shutil.copytree(hvd_runs[2], ckpt)
    target = ckpt / name
    data = target.read_bytes()
    if fault == "flip":
        target.write_bytes(data[:100] + bytes(b ^ 0xFF for b in data[100:164]) + data[164:])
    elif fault == "truncate":
        target.write_bytes(data[:100])
    else:
        target.unlink()
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--backend", "horovod", "--config", str(hvd_runs[3]), "--resume", str(ckpt), "--out-dir",
                  str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("ds-conadv: error:")]
    assert len(lines) == 1 and needle in lines[0] and name in lines[0] and "Traceback" not in err, err


def test_horovod_checkpoint_is_refused_by_the_deepspeed_backend(hvd_runs, tmp_path, capsys):
    from ds_conadv import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--config", str(hvd_runs[3]), "--resume", str(hvd_runs[2]), "--out-dir",
                  str(tmp_path / "o"), "--no-progress"])
    assert exc.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ds-conadv: error:")]
    assert len(lines) == 1 and "written by the horovod backend" in lines[0], lines


def test_horovod_out_dir_of_another_run_is_refused(hvd_runs):
    """Every rank refuses in one line (rank 0 decides and tells the others), the old results stay."""
    whole, _, _, cfg = hvd_runs
    before = (whole / "metrics.json").read_bytes()
    proc = hvd_job("-m", "ds_conadv.cli", "train", "--backend", "horovod", "--config", cfg, "--max-steps", "1",
                   "--out-dir", whole, "--no-progress")
    assert proc.returncode != 0
    for rank in (0, 1):
        lines = rank_error_lines(proc, rank)
        assert len(lines) == 1 and "--overwrite" in lines[0] and str(whole) in lines[0], proc.stdout + proc.stderr
    assert (whole / "metrics.json").read_bytes() == before
    assert json.loads((whole / "status.json").read_text())["complete"] is True


def test_horovod_job_skips_nonfinite_steps_and_stops(tmp_path):
    """A test-only fault (tests/workers/job_nonfinite.py): from step 2 on every rank's gradient is +inf with a
    finite loss. Each skipped step leaves the parameters and the optimizer state bit-identical on every rank; it
    is counted in metrics.csv; --max-skipped 2 stops the run at step 3 in one line; status.json incomplete."""
    cfg = job_config(tmp_path)
    out = tmp_path / "run"
    # 2 micro-batches per step: backward 3 is step 2's first
    proc = hvd_job(WORKERS / "job_nonfinite.py", "3", tmp_path / "w", "train", "--backend", "horovod", "--config",
                   cfg, "--max-steps", "5", "--max-skipped", "2", "--out-dir", out, "--no-progress")
    assert proc.returncode != 0
    for rank in (0, 1):
        lines = rank_error_lines(proc, rank)
        assert len(lines) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "training diverged at step 3: 2 consecutive optimizer steps skipped (non-finite gradients" in lines[0]
        record = json.load(open(f"{tmp_path / 'w'}.rank{rank}"))
        assert record["rc"] == 1 and [s["step"] for s in record["steps"]] == [1, 2, 3]
        first, *skipped = record["steps"]
        assert all(s["params"] == first["params"] and s["state"] == first["state"] for s in skipped)
    rows = csv_rows(out / "metrics.csv")
    assert [r["skipped"] for r in rows] == ["0", "1", "1"] and [r["skipped_total"] for r in rows] == ["0", "1", "2"]
    assert all(r["loss"] not in ("", "nan") for r in rows)
    status = json.loads((out / "status.json").read_text())
    assert status["complete"] is False and "2 consecutive optimizer steps skipped" in status["error"]
    assert not (out / "metrics.json").exists()


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

