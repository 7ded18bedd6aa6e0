"""``ds-conadv train`` under faults: one-line errors, rank supervision (signals to the wrapper, a stopped rank,
a dead wrapper), bit-exact resume from verified checkpoints, non-finite steps, output-folder safety.

Every multi-process test starts real processes with hard timeouts and checks by pid that none is left behind."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_harness import base_env
from ds_conadv import cli

ROOT = Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith("linux")
# a small, fast run: narrow CNN; evaluation only at the end
FAST = ["--no-progress", "--set", "train.width=8"]


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ds-conadv: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err, err
    return errors[0]


# ----------------------------------------------------------------------------------------------------------
# processes
# ----------------------------------------------------------------------------------------------------------
def _children():
    """{pid: parent pid} of every process (from /proc)."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", encoding="utf-8") as f:
                    stat = f.read()
                out[int(name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    return out


def _descendants(pid):
    parents = _children()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _rank_pids(wrapper_pid):
    """The rank processes of a wrapper: descendants running ds_conadv.cli with RANK in their environment."""
    ranks = {}
    for pid in _descendants(wrapper_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = pid
    return ranks


def _start_two_ranks(tmp_path, *extra):
    out = tmp_path / "run"
    log = open(tmp_path / "wrapper.log", "w+")
    cmd = [sys.executable, "-m", "ds_conadv.cli", "train", "--nproc", "2", "--epochs", "200", "--out-dir", str(out),
           *FAST, *extra]
    proc = subprocess.Popen(cmd, env=base_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 150
    ranks = {}
    while time.monotonic() < deadline:  # training has begun: both ranks exist and rank 0 wrote a step
        ranks = _rank_pids(proc.pid)
        if len(ranks) == 2 and (out / "metrics.csv").is_file() and len(_rows(out / "metrics.csv")) >= 1:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    else:
        proc.kill()
    log.seek(0)
    assert proc.poll() is None and len(ranks) == 2, f"the 2-rank run did not start:\n{log.read()[-3000:]}"
    return proc, ranks, log, _descendants(proc.pid)


def _wait_gone(pids, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.2)
    left = [p for p in pids if _alive(p)]
    for p in left:  # never leave them to the next test
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


@pytest.mark.skipif(not LINUX, reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_wrapper_stops_every_rank(tmp_path, sig):
    proc, ranks, log, family = _start_two_ranks(tmp_path)
    proc.send_signal(sig)
    try:
        rc = proc.wait(timeout=20)
    finally:
        left = _wait_gone(family, 10)
    log.seek(0)
    text = log.read()
    assert not left, f"processes left behind after {sig.name}: {left}\n{text[-2000:]}"
    assert rc == 128 + sig, text[-2000:]
    assert f"stopped by {sig.name}" in text
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["complete"] is False


@pytest.mark.skipif(not LINUX, reason="prctl(PR_SET_PDEATHSIG), /proc")
def test_killed_wrapper_takes_its_ranks_along(tmp_path):
    proc, ranks, log, family = _start_two_ranks(tmp_path)
    proc.kill()  # SIGKILL: no handler runs; the parent-death signal does the work
    proc.wait(timeout=10)
    left = _wait_gone(family, 15)
    assert not left, f"orphans after SIGKILL of the wrapper: {left}"


@pytest.mark.skipif(not LINUX, reason="reads /proc")
def test_stopped_rank_stops_every_process_within_the_rank_timeout(tmp_path):
    timeout = 15
    proc, ranks, log, family = _start_two_ranks(tmp_path, "--rank-timeout", str(timeout))
    t0 = time.monotonic()
    os.kill(ranks[1], signal.SIGSTOP)
    try:
        rc = proc.wait(timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        rc = None
    elapsed = time.monotonic() - t0
    left = _wait_gone(family, 10)
    log.seek(0)
    text = log.read()
    assert rc is not None and rc != 0, text[-3000:]
    assert not left, f"left behind: {left}\n{text[-2000:]}"
    assert elapsed < timeout + 20, elapsed
    line = _one_error_line(text)
    assert "rank 1" in line and "heartbeat" in line and "--rank-timeout 15" in line, line


def test_a_rank_failure_is_reported_in_one_line(tmp_path):
    """A config only the ranks can refuse (a shard smaller than one global step on 2 ranks): the wrapper says
    it in one line, no launcher traceback."""
    cmd = [sys.executable, "-m", "ds_conadv.cli", "train", "--nproc", "2", "--max-steps", "2", "--out-dir",
           str(tmp_path / "run"), "--set", "train_batch_size=2048", "--set", "train_micro_batch_size_per_gpu=1024",
           *FAST]
    proc = subprocess.run(cmd, env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr)
    assert line.startswith("ds-conadv: error: rank ") and "smaller than one global step" in line, line
    assert "ChildFailedError" not in proc.stderr and "torch.distributed" not in proc.stderr.split("launching")[-1]


@pytest.mark.parametrize("precision", ["bf16"])
def test_low_precision_main_job_runs(tmp_path, precision):
    """DeepSpeed casts the parameters to bf16, not BatchNorm's running statistics: the first forward used to fail
    ("expected scalar type BFloat16 but found Float"); the statistics now follow the parameters."""
    cmd = [sys.executable, "-m", "ds_conadv.cli", "train", "--nproc", "1", "--max-steps", "2", "--out-dir",
           str(tmp_path / "run"), "--set", f"{precision}.enabled=true", *FAST]
    proc = subprocess.run(cmd, env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path / "run" / "metrics.csv")
    assert len(rows) == 2 and all(r["loss"] not in ("", "nan") for r in rows)


# ----------------------------------------------------------------------------------------------------------
# one-line errors
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["--zero-stage", "7"], "--zero-stage"),
    (["--config", "/no/such/config.json"], "/no/such/config.json"),
    (["--nproc", "0"], "--nproc"),
    (["--rank-timeout", "-1"], "--rank-timeout"),
    (["--resume", "/no/such/ckpt", "--out-dir", "x"], "/no/such/ckpt"),
    (["--backend", "horovod", "--resume", "/no/such/ckpt"], "/no/such/ckpt"),  # before Horovod starts
    (["--backend", "horovod", "--nproc", "2"], "--nproc"),
    (["--backend", "horovod", "--config", str(ROOT / "configs" / "absa_digits.json")], "ABSA job"),
])
def test_bad_arguments_give_one_line_and_exit_2(capsys, args, needle):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", *args])
    assert exc.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert needle in line, line


def test_empty_config_file_says_so(tmp_path, capsys):
    path = tmp_path / "empty.json"
    path.write_text("\n")
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--config", str(path)])
    assert exc.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(path) in line and "empty" in line


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("")
    cmd = [sys.executable, "-m", "ds_conadv.cli", "train", "--config", str(path)]
    quiet = subprocess.run(cmd, env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    loud = subprocess.run(cmd + ["--debug"], env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "ConfigError" in loud.stderr


# ----------------------------------------------------------------------------------------------------------
# resume
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory):
    """8 steps at once; 4 steps with a checkpoint, then resumed to 8 in the same folder."""
    base = tmp_path_factory.mktemp("resume")
    whole, split = base / "whole", base / "split"
    assert cli.main(["train", "--max-steps", "8", "--out-dir", str(whole), *FAST]) == 0
    assert cli.main(["train", "--max-steps", "4", "--save-every", "2", "--out-dir", str(split), *FAST]) == 0
    checkpoint = base / "step4"
    shutil.copytree(split / "checkpoints" / "step4", checkpoint)  # a pristine copy for the fault tests
    assert cli.main(["train", "--max-steps", "8", "--save-every", "2", "--resume", "--out-dir", str(split),
                     *FAST]) == 0
    return whole, split, checkpoint


def test_resume_continues_bit_exactly(resumed_runs):
    whole, split, _ = resumed_runs
    a, b = _rows(whole / "metrics.csv"), _rows(split / "metrics.csv")
    assert [r["step"] for r in b] == [str(s) for s in range(1, 9)]
    for key in ("lr", "loss", "clean_loss", "adv_loss", "clean_acc", "adv_acc", "skipped"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    sa, sb = json.loads((whole / "metrics.json").read_text()), json.loads((split / "metrics.json").read_text())
    assert sa["ranks"][0]["param_checksum"] == sb["ranks"][0]["param_checksum"]
    assert sa["final_test_clean_acc"] == sb["final_test_clean_acc"]
    assert sa["final_test_adv_acc"] == sb["final_test_adv_acc"]
    assert sb["resumed_from"] and json.loads((split / "status.json").read_text())["complete"] is True
    assert sorted(os.listdir(split / "checkpoints")) == ["step8"]  # the newest only


def test_two_rank_resume_through_the_wrapper_is_bit_exact(tmp_path):
    """--nproc 2, ZeRO 1: 6 steps at once vs 3 steps with a checkpoint, resumed to 6 in the same folder."""
    def run(out, *extra):
        cmd = [sys.executable, "-m", "ds_conadv.cli", "train", "--nproc", "2", "--out-dir", str(out), *FAST, *extra]
        proc = subprocess.run(cmd, env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(tmp_path / "whole", "--max-steps", "6")
    run(tmp_path / "split", "--max-steps", "3", "--save-every", "3")
    run(tmp_path / "split", "--max-steps", "6", "--resume")
    a, b = _rows(tmp_path / "whole" / "metrics.csv"), _rows(tmp_path / "split" / "metrics.csv")
    for key in ("lr", "loss", "clean_acc", "adv_acc"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    sa = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    sb = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert [r["param_checksum"] for r in sa["ranks"]] == [r["param_checksum"] for r in sb["ranks"]]
    assert sb["ranks_agree"] and sb["final_test_clean_acc"] == sa["final_test_clean_acc"]


def _flip(path: Path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fault,needle", [
    ("flip", "does not match its sha256"),
    ("truncate", "truncated"),
    ("missing", "is missing"),
    ("manifest", "no manifest.json"),
])
def test_bad_checkpoint_is_refused_in_one_line(resumed_runs, tmp_path, capsys, fault, needle):
    ckpt = tmp_path / "step4"
    shutil.copytree(resumed_runs[2], ckpt)
    target = ckpt / "state" / "mp_rank_00_model_states.pt"
    if fault == "flip":
        _flip(target)
    elif fault == "truncate":
        target.write_bytes(target.read_bytes()[:1000])
    elif fault == "missing":
        target.unlink()
    else:
        (ckpt / "manifest.json").unlink()
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--max-steps", "8", "--resume", str(ckpt), "--out-dir", str(tmp_path / "o"), *FAST])
    assert exc.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert needle in line, line
    if fault != "manifest":
        assert "mp_rank_00_model_states.pt" in line, line


def test_load_state_dict_keeps_the_zero_segment_layouts():
    """The optimizer's state loaded into the same instance (what DeepSpeed's ZeRO load does) must keep the
    segment layouts: without them, the trust ratios after a resume are those of the whole flat partition."""
    from ds_conadv.optim import LARS
    from ds_conadv.optim.base import SegmentLayout

    def run(reload: bool):
        torch.manual_seed(0)
        flat = torch.nn.Parameter(torch.randn(10))
        opt = LARS([flat], lr=1.0, momentum=0.9, trust_coefficient=0.01)
        opt.set_segment_layout(0, SegmentLayout(fragments=[[(0, 4, 0), (4, 6, 1)]], num_ids=2))
        for step in range(3):
            flat.grad = torch.randn(10, generator=torch.Generator().manual_seed(step))
            opt.step()
            if reload and step == 0:
                opt.load_state_dict(opt.state_dict())
        return flat.detach().clone()

    assert torch.equal(run(False), run(True))


# ----------------------------------------------------------------------------------------------------------
# non-finite steps
# ----------------------------------------------------------------------------------------------------------
def test_divergence_stops_in_one_line_with_metrics_kept(tmp_path):
    """A learning rate of 1e30 (a real mistake, no special code path): the weights blow up, the step with
    non-finite gradients is skipped and counted, the NaN loss stops the run."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "ds_conadv.cli", "train", "--max-steps", "12", "--out-dir", str(out),
                           "--set", "scheduler.params.warmup_max_lr=1e30", "--set",
                           "scheduler.params.warmup_num_steps=1", *FAST],
                          env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr)
    assert "training diverged at step" in line and "non-finite loss" in line and "skipped" in line, line
    rows = _rows(out / "metrics.csv")
    assert rows and rows[-1]["loss"] == "" and int(rows[-1]["skipped_total"]) >= 1
    assert f"at step {rows[-1]['step']}" in line
    status = json.loads((out / "status.json").read_text())
    assert status["complete"] is False and "diverged" in status["error"]
    assert not (out / "metrics.json").exists()


# ----------------------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------------------
def test_out_dir_of_another_run_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("metrics.csv", "metrics.json", "curves.png"):
        (out / name).write_text("previous run")
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--max-steps", "1", "--out-dir", str(out), *FAST])
    assert exc.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(out) in line and "--overwrite" in line
    assert (out / "metrics.json").read_text() == "previous run"  # untouched
    # --overwrite: the old results go first, so a failing run never sits beside them
    with pytest.raises(SystemExit):
        cli.main(["train", "--max-steps", "8", "--out-dir", str(out), "--overwrite", "--set",
                  "scheduler.params.warmup_max_lr=1e30", "--set", "scheduler.params.warmup_num_steps=1", *FAST])
    assert not (out / "metrics.json").exists() and not (out / "curves.png").exists()
    assert json.loads((out / "status.json").read_text())["complete"] is False


def test_consecutive_skipped_steps_stop_the_run(tmp_path):
    """Non-finite gradients with a finite loss (a test-only fault, tests/workers/job_nonfinite.py: from step 3 on a
    tensor hook makes the classifier weight's gradient +inf): the steps are skipped and counted, and
    --max-skipped 3 stops the run at the 3rd skipped step in a row, in one line naming the step and what was
    non-finite."""
    out = tmp_path / "run"
    # one rank, 2 accumulated micro-batches per step: backward 5 is step 3's first
    worker = ROOT / "tests" / "workers" / "job_nonfinite.py"
    proc = subprocess.run([sys.executable, str(worker), "5", str(tmp_path / "w"), "train", "--max-steps", "8",
                           "--max-skipped", "3", "--out-dir", str(out), *FAST],
                          env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr)
    assert "training diverged at step 5: 3 consecutive optimizer steps skipped (non-finite gradients" in line, line
    rows = _rows(out / "metrics.csv")
    assert [r["skipped"] for r in rows] == ["0", "0", "1", "1", "1"]
    assert [r["skipped_total"] for r in rows] == ["0", "0", "1", "2", "3"]
    assert all(r["loss"] not in ("", "nan") for r in rows)  # the loss stayed finite
    status = json.loads((out / "status.json").read_text())
    assert status["complete"] is False and "3 consecutive optimizer steps skipped" in status["error"]
    assert not (out / "metrics.json").exists()


def test_absa_resume_continues_bit_exactly(tmp_path):
    """The ABSA job (configs/absa_digits.json; small: a tenth of the data as the training set, the batch grows
    every epoch): 3 epochs at once vs 2 epochs with a checkpoint (taken after the batch grew twice) resumed to 3:
    the same per-epoch log (global batch, LR factor, adversarial share, eigenvalues), test accuracies and
    parameter checksum."""
    absa = ["--config", str(ROOT / "configs" / "absa_digits.json"), "--no-progress", "--set", "train.width=8",
            "--set", "train.test_fraction=0.9", "--set", "absa.duration=1", "--set", "absa.eig_max_iter=5",
            "--set", "absa.eig_batches=2"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert cli.main(["train", *absa, "--epochs", "3", "--out-dir", str(whole)]) == 0
    assert cli.main(["train", *absa, "--epochs", "2", "--save-every", "2", "--out-dir", str(split)]) == 0
    assert sorted(os.listdir(split / "checkpoints")) == ["step7"]
    assert cli.main(["train", *absa, "--epochs", "3", "--resume", "--out-dir", str(split)]) == 0
    a, b = _rows(whole / "absa_log.csv"), _rows(split / "absa_log.csv")
    assert [r["global_batch"] for r in a] == ["32", "64", "128"]
    for key in ("global_batch", "grad_accum_steps", "lr", "lr_scale", "adv_ratio", "adv_examples", "steps",
                "samples", "eigenvalue", "next_global_batch"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    sa, sb = json.loads((whole / "metrics.json").read_text()), json.loads((split / "metrics.json").read_text())
    assert sa["ranks"][0]["param_checksum"] == sb["ranks"][0]["param_checksum"]
    assert (sa["final_test_clean_acc"], sa["final_test_adv_acc"]) == (sb["final_test_clean_acc"],
                                                                     sb["final_test_adv_acc"])
    assert json.loads((split / "status.json").read_text())["complete"] is True
