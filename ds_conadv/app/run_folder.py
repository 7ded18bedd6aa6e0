"""The run folder of a training job, the same under every backend (DeepSpeed, Horovod): ``metrics.csv`` (one row
per optimizer step, written as it happens), the progress bar, the skipped-step count and the divergence stop,
``metrics.json`` (the summary) and ``curves.png``. Only rank 0 writes; every rank keeps the rows (a checkpoint
holds them, so a resumed ``metrics.csv`` starts at step 1).

A job calls, per optimizer step: :meth:`RunRecorder.make_row` (the rank-averaged metrics), an evaluation when
:meth:`RunRecorder.due_eval` says so (:meth:`RunRecorder.add_eval`), :meth:`RunRecorder.commit` (writes the row;
raises :class:`~ds_conadv.app.reliability.TrainingDiverged` after a NaN loss or ``max_skipped`` consecutive skipped
steps), its checkpoint, then :meth:`RunRecorder.show`; at the end :meth:`RunRecorder.summary` and
:meth:`RunRecorder.write_results`.
"""
from __future__ import annotations

import csv
import json
import math
import os
import statistics
import sys
from typing import Any, Dict, List, Optional, Sequence

from ds_conadv.checkpointing import CheckpointError, commit_directory, read_manifest

from .common import _fmt, plot_curves, print_accuracies
from .reliability import TrainingDiverged

__all__ = ["CSV_FIELDS", "RunRecorder", "param_checksum", "find_checkpoint", "commit_checkpoint", "load_job_state",
           "job_state", "recorder_state"]

#: the metrics of every step, in the order of metrics.csv's columns
CSV_FIELDS = ("step", "epoch", "lr", "loss", "clean_loss", "adv_loss", "clean_acc", "adv_acc", "step_time",
              "stale_by", "generated_now", "skipped", "skipped_total", "test_clean_acc", "test_adv_acc")

#: the per-step values a job averages over its ranks, in this order, before :meth:`RunRecorder.make_row`
REDUCED = ("loss", "clean_loss", "adv_loss", "clean_acc", "adv_acc", "skipped")


def param_checksum(params: Sequence[Any]) -> float:
    """One float per model that ranks holding the same weights agree on exactly (sum + 1e-3 sum of squares, fp64)."""
    return sum(float(p.detach().double().sum()) + 1e-3 * float(p.detach().double().square().sum())
               for p in params)


class RunRecorder:
    """Rows, evaluations and step times of one run, and (rank 0) its output files and progress bar.

    Args:
        out_dir: the run folder.
        rank: this process's rank (only rank 0 writes and shows the bar).
        run_steps: the optimizer step the run ends at (the bar's total).
        rows, evals, step_times: what a checkpoint restored (a resumed run), else empty.
        max_skipped: consecutive skipped optimizer steps that stop the run (0: never).
        progress: show the progress bar (rank 0).
        desc: the bar's label.
        print_every: a log line every this many steps (0: none).
        eval_every: evaluate at the end of every this many epochs (and at the last step).
        steps_per_epoch: optimizer steps per epoch.
    """

    def __init__(self, out_dir: str, rank: int, run_steps: int, *, rows: Optional[List[Dict[str, Any]]] = None,
                 evals: Optional[List[Dict[str, Any]]] = None, step_times: Optional[List[float]] = None,
                 max_skipped: int = 10, progress: bool = True, desc: str = "", print_every: int = 0,
                 eval_every: int = 1, steps_per_epoch: int = 1):
        from tqdm import tqdm

        self.out_dir, self.rank, self.run_steps = out_dir, rank, run_steps
        self.rows: List[Dict[str, Any]] = list(rows or [])
        self.evals: List[Dict[str, Any]] = list(evals or [])
        self.step_times: List[float] = list(step_times or [])
        self.max_skipped, self.print_every = int(max_skipped), int(print_every or 0)
        self.eval_every, self.steps_per_epoch = max(1, int(eval_every)), max(1, int(steps_per_epoch))
        self.paths = {"out_dir": out_dir, "metrics_csv": os.path.join(out_dir, "metrics.csv"),
                      "metrics_json": os.path.join(out_dir, "metrics.json"),
                      "plot": os.path.join(out_dir, "curves.png")}
        self.consecutive_skips = 0
        for row in reversed(self.rows):
            if not row.get("skipped"):
                break
            self.consecutive_skips += 1
        self.diverged: Optional[str] = None
        self._csv = self._writer = None
        if rank == 0:
            os.makedirs(out_dir, exist_ok=True)
            self._csv = open(self.paths["metrics_csv"], "w", newline="", encoding="utf-8")
            self._writer = csv.DictWriter(self._csv, fieldnames=CSV_FIELDS)
            self._writer.writeheader()
            for row in self.rows:  # a resumed run: the steps before the checkpoint
                self._writer.writerow({k: _fmt(row.get(k)) for k in CSV_FIELDS})
            self._csv.flush()
        self.bar = tqdm(total=run_steps, initial=self.step, desc=desc, unit="step",
                        disable=not (progress and rank == 0), file=sys.stderr, dynamic_ncols=True)

    @property
    def step(self) -> int:
        return self.rows[-1]["step"] if self.rows else 0

    @property
    def skipped_total(self) -> int:
        return self.rows[-1]["skipped_total"] if self.rows else 0

    # ---- per step ----------------------------------------------------------------------------------------------
    def make_row(self, step: int, epoch: int, lr: float, reduced: Sequence[float], step_time: float,
                 metrics: Dict[str, Any]) -> Dict[str, Any]:
        """The row of optimizer step ``step`` from the rank-averaged values ``reduced`` (see :data:`REDUCED`;
        ``skipped`` > 0: some rank's optimizer skipped the update, and then all did, since they see the same
        reduced gradients). Decides whether the run has diverged (:attr:`diverged`)."""
        vals = dict(zip(REDUCED, (float(v) for v in reduced)))
        skipped = int(vals["skipped"] > 0)
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        self.step_times.append(step_time)
        row = dict(step=step, epoch=epoch, lr=lr, loss=vals["loss"], clean_loss=vals["clean_loss"],
                   adv_loss=vals["adv_loss"], clean_acc=vals["clean_acc"], adv_acc=vals["adv_acc"],
                   step_time=step_time, stale_by=metrics.get("stale_by"), generated_now=metrics.get("generated_now"),
                   skipped=skipped, skipped_total=self.skipped_total + skipped, test_clean_acc=None,
                   test_adv_acc=None)
        self.diverged = None
        if not math.isfinite(row["loss"]):
            what = ", ".join(f"{k} {row[k]}" for k in ("clean_loss", "adv_loss")
                             if not math.isfinite(row[k])) or f"loss {row['loss']}"
            self.diverged = (f"training diverged at step {step}: non-finite loss ({what}); "
                             f"{row['skipped_total']} optimizer step(s) skipped so far")
        elif self.max_skipped and self.consecutive_skips >= self.max_skipped:
            self.diverged = (f"training diverged at step {step}: {self.consecutive_skips} consecutive optimizer "
                             f"steps skipped (non-finite gradients; --max-skipped {self.max_skipped})")
        return row

    def due_eval(self, row: Dict[str, Any]) -> bool:
        """Evaluate after this step: the last step, or the end of every ``eval_every``-th epoch (not after a
        divergence)."""
        if self.diverged is not None:
            return False
        step = row["step"]
        last_of_epoch = step % self.steps_per_epoch == 0
        return step == self.run_steps or (last_of_epoch and (row["epoch"] + 1) % self.eval_every == 0)

    def add_eval(self, row: Dict[str, Any], clean: float, adv: float) -> None:
        row.update(test_clean_acc=clean, test_adv_acc=adv)
        self.evals.append({"step": row["step"], "epoch": row["epoch"], "test_clean_acc": clean,
                           "test_adv_acc": adv})

    def commit(self, row: Dict[str, Any]) -> None:
        """Keep and write the row; then stop the run if it diverged (the row stays in metrics.csv)."""
        self.rows.append(row)
        if self._writer is not None:
            self._writer.writerow({k: _fmt(row[k]) for k in CSV_FIELDS})
            self._csv.flush()
        if self.diverged:
            raise TrainingDiverged(self.diverged)

    def show(self, row: Dict[str, Any]) -> None:
        """The progress bar (and a log line every ``print_every`` steps), rank 0."""
        if self.rank != 0:
            return
        post = {"loss": f"{row['loss']:.3f}", "acc": f"{row['clean_acc']:.3f}"}
        if row["skipped_total"]:
            post["skipped"] = str(row["skipped_total"])
        if not math.isnan(row["adv_acc"]):
            post["adv"] = f"{row['adv_acc']:.3f}"
        if self.evals:
            post["test"] = f"{self.evals[-1]['test_clean_acc']:.3f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)
        step = row["step"]
        if self.print_every and step % self.print_every == 0:
            self.bar.write(f"step {step}/{self.run_steps} epoch {row['epoch']} lr {row['lr']:.4g} loss "
                           f"{row['loss']:.4f} clean acc {row['clean_acc']:.4f} adv acc {row['adv_acc']:.4f} "
                           f"step {row['step_time'] * 1e3:.0f} ms", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        if self._csv is not None:
            self._csv.close()
            self._csv = self._writer = None

    # ---- the end -----------------------------------------------------------------------------------------------
    def summary(self, ranks: List[Dict[str, Any]], wall: float, **fields: Any) -> Dict[str, Any]:
        """metrics.json's common part (final accuracies, step times, every rank's checksum) plus ``fields``."""
        nan = float("nan")
        final = self.evals[-1] if self.evals else {"test_clean_acc": nan, "test_adv_acc": nan}
        timed = self.step_times[1:] or self.step_times  # the first step includes one-off start-up work
        last = self.rows[-1] if self.rows else {}
        return {
            "final_test_clean_acc": final["test_clean_acc"], "final_test_adv_acc": final["test_adv_acc"],
            "final_train_loss": last.get("loss", nan), "final_train_clean_acc": last.get("clean_acc", nan),
            "final_train_adv_acc": last.get("adv_acc", nan), **fields,
            "steps": self.step,
            "mean_step_time_s": statistics.fmean(timed) if timed else nan,
            "median_step_time_s": statistics.median(timed) if timed else nan,
            "wall_time_s": wall, "ranks": ranks, "ranks_agree": len({r["param_checksum"] for r in ranks}) == 1,
            "evals": self.evals, "paths": self.paths, "skipped_steps": self.skipped_total,
        }

    def write_results(self, summary: Dict[str, Any], title: str, out: Any) -> None:
        """metrics.json, curves.png and the closing lines (rank 0)."""
        if self.rank != 0:
            return
        with open(self.paths["metrics_json"], "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, default=str)
        plot_curves(self.rows, self.evals, self.paths["plot"], title)
        world = len(summary["ranks"])
        print(f"finished {summary['steps']} steps in {summary['wall_time_s']:.1f} s (mean step "
              f"{summary['mean_step_time_s'] * 1e3:.0f} ms, {world} rank(s)"
              f"{'' if summary['ranks_agree'] else ', RANKS DISAGREE'})", file=out)
        print_accuracies(out, summary["final_test_clean_acc"], summary["final_test_adv_acc"],
                         summary["adversarial_eval"])
        if "final_test_pgd_acc" in summary:
            print(f"PGD test accuracy:         {summary['final_test_pgd_acc']:.4f}  ({summary['pgd_eval']})",
                  file=out)
        print(f"metrics: {self.paths['metrics_csv']}  {self.paths['metrics_json']}", file=out)
        print(f"plot:    {self.paths['plot']}", file=out, flush=True)


# ---- checkpoints: OUT_DIR/checkpoints/step<N>, committed with a manifest, the newest kept ------------------------
def _step_of(name: str) -> Optional[int]:
    return int(name[4:]) if name.startswith("step") and name[4:].isdigit() else None


def find_checkpoint(path: str) -> str:
    """The committed checkpoint folder ``path`` names: itself (it holds a manifest), else the newest ``step<N>``
    in it or in its ``checkpoints/``. Raises :class:`CheckpointError` naming ``path`` when there is none."""
    from ds_conadv.checkpointing import MANIFEST

    if os.path.isfile(os.path.join(path, MANIFEST)):
        return path
    if any(os.path.exists(os.path.join(path, name)) for name in ("latest", "state", "state.pt")):
        read_manifest(path)  # a checkpoint without its manifest: raises, saying so
    for root in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(root):
            steps = [(s, n) for n in os.listdir(root) if (s := _step_of(n)) is not None]
            if steps:
                return os.path.join(root, max(steps)[1])
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path}: no such directory")
    raise CheckpointError(f"checkpoint {path}: no committed checkpoint (step<N>/ with a manifest.json) in it")


def commit_checkpoint(staging: str, ckpt_root: str, step: int, meta: Dict[str, Any]) -> str:
    """Rank 0, after every rank has written into ``staging``: hash it into its manifest, rename it to
    ``ckpt_root/step<step>`` and remove the older checkpoints. Returns the committed folder."""
    import shutil

    final = os.path.join(ckpt_root, f"step{step}")
    commit_directory(staging, final, meta=meta)
    for name in os.listdir(ckpt_root):  # keep the newest checkpoint only
        s = _step_of(name)
        if s is not None and s < step:
            shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)
    return final


def job_state(module: Any, **fields: Any) -> Dict[str, Any]:
    """What a rank's checkpoint holds besides the engine's: ``fields`` (the rows so far, the data position, ...),
    torch's RNG and this rank's module buffers (BatchNorm's running statistics are per rank; an engine's model
    file holds one rank's)."""
    import torch

    return {**fields, "torch_rng": torch.get_rng_state(),
            "buffers": {name: buf.detach().cpu().clone() for name, buf in module.named_buffers()}}


def recorder_state(rec: RunRecorder) -> Dict[str, Any]:
    """The rows, evaluations and step times so far (a resumed metrics.csv starts at step 1)."""
    return {"step": rec.step, "rows": rec.rows, "evals": rec.evals, "step_times": rec.step_times}


def load_job_state(path: str, module: Any) -> Dict[str, Any]:
    """Restore what :func:`job_state` saved into ``path`` (RNG, the module's buffers); returns it (the rows)."""
    import torch

    job = torch.load(path, weights_only=False)
    torch.set_rng_state(job["torch_rng"])
    with torch.no_grad():
        for name, buf in module.named_buffers():
            buf.copy_(job["buffers"][name])
    return job
