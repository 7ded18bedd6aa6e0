"""What the jobs share (DeepSpeed, Horovod, ABSA, hessian): the bundled data (scikit-learn's digits) and its model,
the rank's batches, the distributed set-up, evaluation (clean and adversarial accuracy), the curves and the output
folder."""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import socket
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ds_conadv.config.sections import ConAdvConfig, ConfigError
from ds_conadv.integrations.deepspeed import compat

__all__ = ["load_digits", "digits_data", "DigitsCNN", "digits_cnn", "Normalize", "rank_batches", "batch_geometry",
           "distributed", "evaluate", "describe_mode", "attack_description", "plot_curves", "default_out_dir",
           "quiet_deepspeed_import", "prepare_data", "gather_ranks", "print_accuracies"]


def quiet_deepspeed_import() -> Any:
    """Import DeepSpeed for a training run (see :func:`ds_conadv.integrations.deepspeed.compat.quiet_import`)."""
    return compat.quiet_import()


_quiet_deepspeed_import = quiet_deepspeed_import


# ----------------------------------------------------------------------------------------------------------
# data and model
# ----------------------------------------------------------------------------------------------------------
def load_digits(test_fraction: float = 0.2, split_seed: int = 0):
    """scikit-learn's digits as pixel images (N, 1, 8, 8) in [0, 16] (float32) and labels: a fixed, stratified
    train/test split. Returns (x_train, y_train, x_test, y_test) as torch tensors."""
    import numpy as np
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    x, y = _load(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x.astype(np.float32), y, test_size=test_fraction,
                                              random_state=split_seed, stratify=y)
    as_images = (lambda a: torch.from_numpy(np.ascontiguousarray(a)).view(-1, 1, 8, 8))
    return as_images(x_tr), torch.from_numpy(y_tr).long(), as_images(x_te), torch.from_numpy(y_te).long()


class DigitsCNN(nn.Module):
    """The job's model for ``model: "cnn"``: 3 conv layers (3x3; the last two with stride 2) with BatchNorm and
    ReLU, global average pooling, a linear classifier. On 8x8 inputs: 8x8 -> 4x4 -> 2x2."""

    def __init__(self, width: int = 32, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


class Normalize:
    """``(pixel - mean) / std`` with one scalar or per-channel values (channels are dimension 1)."""

    def __init__(self, mean: List[float], std: List[float]):

        shape = (1, len(mean), 1, 1) if len(mean) > 1 else (1,)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(shape)
        self.std = torch.tensor(std, dtype=torch.float32).view(shape)

    def __call__(self, x):
        return (x - self.mean) / self.std


def rank_batches(n: int, micro: int, micro_per_epoch: int, rank: int, world: int, seed: int,
                 start_epoch: int = 0) -> Iterator[Tuple[int, Any]]:
    """Endless stream of this rank's micro-batches of index tensors, epoch after epoch.

    Each epoch: a permutation of ``range(n)`` seeded with (seed, epoch) — the same on every rank —, cut to a
    multiple of ``world`` and dealt out like ``DistributedSampler`` (rank r takes positions r, r+world, ...);
    the rank's first ``micro_per_epoch * micro`` indices make its micro-batches (the rest of the shard is left
    out of that epoch, shuffled anew in the next). Yields ``(epoch, indices)``.
    """

    epoch = start_epoch
    while True:
        gen = torch.Generator().manual_seed(1_000_003 * seed + epoch)
        perm = torch.randperm(n, generator=gen)
        shard = perm[: (n // world) * world][rank::world]
        for i in range(micro_per_epoch):
            yield epoch, shard[i * micro:(i + 1) * micro]
        epoch += 1


def digits_data(test_fraction: float = 0.2, split_seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """The Horovod job's old name for :func:`load_digits` (same data, same split)."""
    return load_digits(test_fraction, split_seed)


def digits_cnn(width: int = 32, classes: int = 10) -> nn.Module:
    """The Horovod job's old name for :class:`DigitsCNN` (the same layers, initialised alike)."""
    return DigitsCNN(width, classes)


def batch_geometry(cfg: dict, world: int) -> Tuple[int, int]:
    """``(micro batch, gradient accumulation steps)`` from a config's DeepSpeed batch keys for ``world`` ranks
    (``train = micro * gas * world``; either of train / micro given, gas defaults to what fits)."""
    micro = cfg.get("train_micro_batch_size_per_gpu")
    global_batch = cfg.get("train_batch_size")
    gas = cfg.get("gradient_accumulation_steps")
    if micro is None and global_batch is not None:
        micro = global_batch // (world * (gas or 1))
    if gas is None and global_batch is not None and micro:
        gas = max(1, global_batch // (micro * world))
    if not micro or micro < 1:
        raise ConfigError('give "train_micro_batch_size_per_gpu" or "train_batch_size"')
    return micro, gas or 1


# ----------------------------------------------------------------------------------------------------------
# distributed set-up
# ----------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def distributed(backend: str, timeout: Optional[float] = None) -> Iterator[Tuple[int, int, int, bool]]:
    """torch.distributed for the job: reuses a process group that exists; under a launcher (RANK/WORLD_SIZE set)
    initialises from the environment; alone, initialises a world of 1 on a free local port. Yields
    (rank, world size, local world size, created); a group created here is destroyed and environment
    variables set here are removed at the end (so the job can run inside another process, e.g. a test).
    ``timeout`` (seconds): how long a collective waits for a peer before it fails (torch's default if None)."""
    import torch.distributed as tdist

    import deepspeed

    added: List[str] = []
    created = False
    if not tdist.is_initialized():
        if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
            defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
        else:
            defaults = {"LOCAL_RANK": os.environ.get("RANK", "0"), "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500"}
        for key, value in defaults.items():
            if key not in os.environ:
                os.environ[key] = value
                added.append(key)
        extra = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
        for attempt in range(3):
            try:
                deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, **extra)
                break
            except tdist.DistNetworkError:
                # a port we picked ourselves (one process) was taken between picking and binding: pick again
                if "MASTER_PORT" not in added or attempt == 2:
                    raise
                os.environ["MASTER_PORT"] = str(_free_port())
        created = True
    try:
        world = tdist.get_world_size()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        yield tdist.get_rank(), world, local_world, created
    finally:
        if created and tdist.is_initialized():
            deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups (a next run re-inits)
        for key in added:
            os.environ.pop(key, None)


_distributed = distributed


# ----------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------
def evaluate(module, x_test, y_test, normalize, conadv: ConAdvConfig, rank: int, world: int, seed: int,
             device, batch_size: int = 512) -> Tuple[float, float]:
    """Clean and adversarial accuracy on the test set; each rank takes its shard, the counts are summed.

    The model is in eval mode and uses its main BN; the adversarial examples come from
    ``ds_conadv.conadv.perturb.generate`` with the configured attack (epsilon, steps, target, random start,
    clipping), made against that same eval-mode main-BN model. NaN for the adversarial accuracy when the config
    has no epsilon."""
    attack_cfg = None
    if conadv.epsilon is not None and conadv.perturb == "inputs":
        attack_cfg = conadv.model_copy(update={"dual_bn": False})  # generation through the main BN
    clean, adv = _accuracies(module, x_test, y_test, normalize, [attack_cfg], rank, world, seed, device, batch_size)
    return clean, adv


def evaluate_untargeted_pgd(module, x_test, y_test, normalize, conadv: ConAdvConfig, rank: int, world: int,
                            seed: int, device, steps: int = 10, batch_size: int = 512) -> float:
    """Test accuracy under untargeted PGD-``steps`` in the configured epsilon-ball (random start, step
    2.5 eps / steps; :func:`ds_conadv.conadv.robustness.untargeted_pgd_config`), the standard robustness figure
    next to the configured (often random-target, one-step) attack. NaN without an input epsilon."""
    if conadv.epsilon is None or conadv.perturb != "inputs":
        return float("nan")
    from ds_conadv.conadv.robustness import untargeted_pgd_config

    pgd = untargeted_pgd_config(conadv, steps)
    return _accuracies(module, x_test, y_test, normalize, [pgd], rank, world, seed, device, batch_size)[1]


def _accuracies(module, x_test, y_test, normalize, attacks: List[Optional[ConAdvConfig]], rank: int, world: int,
                seed: int, device, batch_size: int) -> List[float]:
    """[clean accuracy, accuracy under each attack (NaN for None)], summed over the ranks' shards."""
    import torch.distributed as tdist

    from ds_conadv.conadv.perturb import generate

    gen = torch.Generator().manual_seed(7_919 * seed + 104_729 * rank + 1)
    dtype = next(module.parameters()).dtype
    was_training = module.training
    module.eval()
    counts = torch.zeros(2 + len(attacks), dtype=torch.float64, device=device)  # NCCL reduces device tensors
    try:
        idx = torch.arange(rank, x_test.shape[0], world)
        for start in range(0, idx.numel(), batch_size):
            sel = idx[start:start + batch_size]
            x = normalize(x_test[sel]).to(device=device, dtype=dtype)
            y = y_test[sel].to(device)
            with torch.no_grad():
                counts[0] += (module(x).argmax(1) == y).sum().item()
            for k, attack_cfg in enumerate(attacks):
                if attack_cfg is not None:
                    x_adv = generate(module, x, y, attack_cfg, generator=gen)
                    with torch.no_grad():
                        counts[1 + k] += (module(x_adv).argmax(1) == y).sum().item()
            counts[-1] += sel.numel()
    finally:
        module.train(was_training)
    if world > 1:
        tdist.all_reduce(counts)
    counts = counts.cpu()
    total = counts[-1]
    return [float(counts[0] / total)] + [float(counts[1 + k] / total) if a is not None else float("nan")
                                         for k, a in enumerate(attacks)]


def gather_ranks(mine: Dict[str, Any], world: int) -> List[Dict[str, Any]]:
    """Every rank's report (``mine``), in rank order, on every rank."""
    if world == 1:
        return [mine]
    import torch.distributed as tdist

    ranks: List[Any] = [None] * world
    tdist.all_gather_object(ranks, mine)
    return ranks


def print_accuracies(out: Any, clean: float, adv: float, attack: str) -> None:
    """The final clean and adversarial test accuracy lines of a job."""
    print(f"clean test accuracy:       {clean:.4f}", file=out)
    print(f"adversarial test accuracy: {adv:.4f}  ({attack})", file=out)


def describe_mode(resolved: Any) -> str:
    if resolved.mode == "absa":
        return "ABSA (adaptive batch size, FGSM share, top-eigenvalue checks)"
    if resolved.mode == "vanilla":
        return "vanilla (no adversarial examples)"
    return f"{resolved.mode} (tau={resolved.conadv.tau})"


def attack_description(conadv: ConAdvConfig) -> str:
    if conadv.epsilon is None:
        return "none (no epsilon in the config)"
    if conadv.attack == "fgsm":
        name = "FGSM"
    else:
        name = f"PGD-{conadv.steps} (step {conadv.effective_step_size:g}" + (
            f", random start p={conadv.effective_random_start_prob:g})" if conadv.random_start else ")")
    target = "random-target" if conadv.target == "random" else "untargeted"
    unit = " px" if conadv.mean is not None else ""
    return f"{name}, {target}, eps={conadv.epsilon:g}{unit}, eval mode, main BN"


# ----------------------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------------------
def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def plot_curves(rows: List[Dict[str, Any]], evals: List[Dict[str, Any]], path: str, title: str) -> None:
    """curves.png: training loss (total, clean, adversarial), train accuracies per step with the test
    accuracies at the evaluation points, and the learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    col = (lambda k: [r[k] if r[k] is not None else float("nan") for r in rows])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.plot(steps, col("loss"), label="loss (clean + adv)", lw=1.2)
    ax.plot(steps, col("clean_loss"), label="clean loss", lw=1, alpha=0.8)
    if any(not math.isnan(v) for v in col("adv_loss")):
        ax.plot(steps, col("adv_loss"), label="adversarial loss", lw=1, alpha=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[1]
    ax.plot(steps, col("clean_acc"), label="train clean", lw=1, alpha=0.8)
    if any(not math.isnan(v) for v in col("adv_acc")):
        ax.plot(steps, col("adv_acc"), label="train adversarial", lw=1, alpha=0.8)
    if evals:
        es = [e["step"] for e in evals]
        ax.plot(es, [e["test_clean_acc"] for e in evals], "o-", label="test clean", color="k")
        if any(not math.isnan(e["test_adv_acc"]) for e in evals):
            ax.plot(es, [e["test_adv_acc"] for e in evals], "s--", label="test adversarial", color="tab:red")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax = axes[2]
    ax.plot(steps, col("lr"), color="tab:green")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_out_dir(config_name: str) -> str:
    stem = os.path.splitext(os.path.basename(config_name))[0] or "run"
    return os.path.join("runs", f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")


def monitor_outputs(ds_cfg: Dict[str, Any], out_dir: str) -> List[str]:
    """DeepSpeed's file monitors (``"tensorboard"``, ``"csv_monitor"``) enabled in ``ds_cfg`` write into the run's
    folder unless the section names an ``"output_path"`` (DeepSpeed's default is the working directory). Returns
    the folders they write to (``<output_path>/<job_name>``)."""
    folders = []
    for name in ("tensorboard", "csv_monitor"):
        section = ds_cfg.get(name)
        if isinstance(section, dict) and section.get("enabled"):
            if not section.get("output_path"):
                section["output_path"] = out_dir
            folders.append(os.path.join(section["output_path"], section.get("job_name", "DeepSpeedJobName")))
    return folders


def prepare_data(resolved: Any, ds_cfg: Dict[str, Any]):
    """The digits split as the model sees it: (pixel - mean) / std with the conadv section's mean/std (the
    attack's geometry; from the training split when not given, then recorded in ``ds_cfg`` and the resolved
    config). Returns ``(x_train_normalized, y_train, x_test, y_test, normalize, conadv)``."""
    tc, conadv = resolved.train, resolved.conadv
    x_tr, y_tr, x_te, y_te = load_digits(tc.test_fraction, tc.split_seed)
    if conadv.mean is None:
        mean, std = [float(x_tr.mean())], [float(x_tr.std())]
        ds_cfg.setdefault("conadv", {}).update(mean=mean, std=std)
        conadv = conadv.model_copy(update={"mean": mean, "std": std})
        resolved.raw.setdefault("conadv", {}).update(mean=mean, std=std)
    normalize = Normalize(conadv.mean, conadv.std)
    return normalize(x_tr), y_tr, x_te, y_te, normalize, conadv
