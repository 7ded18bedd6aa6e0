"""The main job, ``ds-conadv train``: ConAdv training through DeepSpeed (``ds_conadv.initialize``).

One JSON file holds everything: DeepSpeed's config (batch sizes, ZeRO, precision, ``"scheduler"``), our
``"optimizer": {"type": "LARS" | "LAMB"}``, the ``"conadv"`` section and the job's own ``"train"`` section
(:class:`~ds_conadv.config.TrainConfig`). Keys that start with ``"_comment"`` are comments, at any depth. The
embedded default ships inside the package (``ds_conadv/configs/conadv_digits.json``, the same file as
``configs/conadv_digits.json``): a small CNN with BatchNorm on scikit-learn's bundled digits (no download).

Launch modes: a single process (it initialises torch.distributed itself, world size 1), ``torchrun``,
the ``deepspeed`` launcher, or ``--nproc N`` (the CLI re-launches itself through torch.distributed.run).
Every rank trains on its shard of the training set; every rank evaluates its shard of the test set; rank 0
shows the progress bar and writes ``metrics.csv``, ``metrics.json`` and ``curves.png`` to the output folder.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
import os
import socket
import statistics
import sys
import time
import warnings
from importlib import resources
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ds_conadv.config import (ConAdvConfig, ConfigError, TrainConfig, optimizer_class, strip_comments,
                              validate_optimizer_params)

__all__ = ["DEFAULT_CONFIG_NAME", "check_runnable", "embedded_config_names", "load_embedded", "load_config_file",
           "apply_overrides", "validate_config", "ResolvedConfig", "run", "DigitsCNN", "Normalize", "load_digits",
           "rank_batches", "evaluate", "plot_curves"]

#: the embedded default of ``ds-conadv train`` (inside the package, and as configs/conadv_digits.json)
DEFAULT_CONFIG_NAME = "conadv_digits.json"
#: the embedded config per optimizer type, used when ``--optimizer`` switches the type of a config
OPTIMIZER_CONFIGS = {"lars": "conadv_digits.json", "lamb": "conadv_digits_lamb.json"}
#: the metrics of every step, in the order of metrics.csv's columns
CSV_FIELDS = ("step", "epoch", "lr", "loss", "clean_loss", "adv_loss", "clean_acc", "adv_acc", "step_time",
              "stale_by", "generated_now", "test_clean_acc", "test_adv_acc")
_AUTO = "auto"


# ----------------------------------------------------------------------------------------------------------
# config: load, override, validate
# ----------------------------------------------------------------------------------------------------------
def embedded_config_names() -> List[str]:
    return sorted(p.name for p in resources.files("ds_conadv").joinpath("configs").iterdir()
                  if p.name.endswith(".json"))


def load_embedded(name: str = DEFAULT_CONFIG_NAME) -> Dict[str, Any]:
    """A config shipped inside the package (``ds_conadv/configs/<name>``), as parsed JSON."""
    path = resources.files("ds_conadv").joinpath("configs", name)
    if not path.is_file():
        raise ConfigError(f"no embedded config {name!r}; embedded: {', '.join(embedded_config_names())}")
    return json.loads(path.read_text(encoding="utf-8"))


def load_config_file(path: str) -> Dict[str, Any]:
    """Parse a config file (JSON; hjson as DeepSpeed accepts it)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        try:
            import hjson

            data = hjson.loads(text)
        except Exception:
            raise ConfigError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string


def apply_overrides(cfg: Dict[str, Any], *, mode: Optional[str] = None, epochs: Optional[int] = None,
                    optimizer: Optional[str] = None, zero_stage: Optional[int] = None, out_dir: Optional[str] = None,
                    seed: Optional[int] = None, max_steps: Optional[int] = None,
                    sets: Optional[List[str]] = None) -> Tuple[Dict[str, Any], List[str]]:
    """The command-line overrides on a copy of ``cfg``; returns (config, notes for the user)."""
    cfg = copy.deepcopy(cfg)
    notes: List[str] = []
    train = cfg.setdefault("train", {})
    if not isinstance(train, dict):
        raise ConfigError(f'"train" must be a JSON object, got {type(train).__name__}')
    if optimizer is not None:
        current = str((cfg.get("optimizer") or {}).get("type", "")).lower()
        if current != optimizer.lower():
            # the params (and the peak LR in the scheduler) belong to the type: take both from the embedded
            # config of that optimizer
            other = load_embedded(OPTIMIZER_CONFIGS[optimizer.lower()])
            cfg["optimizer"] = other["optimizer"]
            if "scheduler" in other:
                cfg["scheduler"] = other["scheduler"]
            for key in ("gradient_clipping",):
                if key in other:
                    cfg[key] = other[key]
            notes.append(f"--optimizer {optimizer}: optimizer, scheduler and gradient_clipping taken from the "
                         f"embedded {OPTIMIZER_CONFIGS[optimizer.lower()]}")
    if mode is not None:
        conadv = cfg.setdefault("conadv", {})
        if mode == "vanilla":
            conadv["enabled"] = False
        else:
            conadv["enabled"] = True
            tau = conadv.get("tau", 1)
            conadv["tau"] = 0 if mode == "disadv" else (tau if isinstance(tau, int) and tau >= 1 else 1)
    if zero_stage is not None:
        zero = cfg.setdefault("zero_optimization", {})
        if not isinstance(zero, dict):
            raise ConfigError('"zero_optimization" must be a JSON object')
        zero["stage"] = int(zero_stage)
    for key, value in (("epochs", epochs), ("out_dir", out_dir), ("seed", seed), ("max_steps", max_steps)):
        if value is not None:
            train[key] = value
    for item in sets or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE (VALUE as JSON, e.g. train.epochs=3)")
        path, value = item.split("=", 1)
        keys = [k for k in path.split(".") if k]
        if not keys:
            raise ConfigError(f"--set {item!r}: empty key")
        node = cfg
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {k!r} is not a JSON object in the config")
        node[keys[-1]] = _parse_value(value)
    return cfg, notes


class ResolvedConfig:
    """A validated config: ``raw`` (comments stripped, overrides applied), ``train``, ``conadv``, and
    ``deepspeed`` (what goes to ``ds_conadv.initialize``: everything but ``"train"``)."""

    def __init__(self, raw: Dict[str, Any], train: TrainConfig, conadv: ConAdvConfig):
        self.raw = raw
        self.train = train
        self.conadv = conadv

    @property
    def deepspeed(self) -> Dict[str, Any]:
        cfg = copy.deepcopy(self.raw)
        cfg.pop("train", None)
        return cfg

    @property
    def optimizer_type(self) -> str:
        return str((self.raw.get("optimizer") or {}).get("type", "?"))

    @property
    def absa_enabled(self) -> bool:
        section = self.raw.get("absa")
        return isinstance(section, dict) and bool(section.get("enabled", False))

    @property
    def mode(self) -> str:
        if self.absa_enabled:
            return "absa"
        if not self.conadv.enabled:
            return "vanilla"
        return "disadv" if self.conadv.tau == 0 else "conadv"


def _validate_scheduler(section: Any) -> None:
    if section is None:
        return
    if not isinstance(section, dict):
        raise ConfigError(f'"scheduler" must be a JSON object, got {type(section).__name__}')
    _quiet_deepspeed_import()
    from ds_conadv.lr_schedules import scheduler_class, scheduler_factory

    params = section.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError('"scheduler.params" must be a JSON object')
    for key, value in params.items():
        if value == _AUTO and key != "total_num_steps":
            raise ConfigError(f'"scheduler.params.{key}" = "auto": only total_num_steps may be "auto"')
    if scheduler_class(section.get("type")) is not None:
        probe = dict(section, params={k: (1 if v == _AUTO else v) for k, v in params.items()})
        scheduler_factory(probe)  # checks keys and values


def validate_config(cfg: Dict[str, Any], check_deepspeed: bool = False) -> ResolvedConfig:
    """Validate a whole job config: comments stripped, then our sections (``train``, ``conadv``, our optimizer
    types' params, our scheduler types) with their models. Errors name the key and the allowed keys.
    ``check_deepspeed`` also builds DeepSpeed's own ``DeepSpeedConfig`` from it (its pydantic sections reject
    unknown keys; batch sizes are checked for the current world size, 1 without torch.distributed)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"a config is a JSON object, got {type(cfg).__name__}")
    raw = strip_comments(cfg)
    train = TrainConfig.from_section(raw.get("train"))
    conadv = ConAdvConfig.from_section(raw.get("conadv"))
    if raw.get("absa") is not None:
        from ds_conadv.absa import ABSAConfig

        if ABSAConfig.from_section(raw.get("absa")).enabled:  # the rest (batch sizes, conadv) at initialize
            params = (raw.get("scheduler") or {}).get("params") if isinstance(raw.get("scheduler"), dict) else None
            if isinstance(params, dict) and params.get("total_num_steps") == _AUTO:
                raise ConfigError('"scheduler.params.total_num_steps" = "auto" with "absa.enabled": an ABSA run has '
                                  "no step count known in advance (its epochs shrink as the batch grows): give a "
                                  "number")
    section = raw.get("optimizer")
    if section is None:
        raise ConfigError('an "optimizer" section is required, e.g. {"type": "LARS", "params": {...}}')
    if not isinstance(section, dict):
        raise ConfigError(f'"optimizer" must be a JSON object, got {type(section).__name__}')
    cls = optimizer_class(section.get("type", ""))
    if cls is not None:
        unknown = sorted(set(section) - {"type", "params"})
        if unknown:
            raise ConfigError(f'unknown key "{unknown[0]}" in "optimizer"; allowed keys: type, params')
        params, _ = validate_optimizer_params(cls, section.get("params"))
        try:  # types and ranges: the optimizer's own checks, on a dummy parameter

            kwargs = {k: v for k, v in params.items() if k != "backend"}
            cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f'"optimizer.params" for type {cls.__name__}: {e}') from None
    _validate_scheduler(raw.get("scheduler"))
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f'"{key}" = {value!r}: must be a positive integer')
    if check_deepspeed:
        _check_with_deepspeed(raw)
    return ResolvedConfig(raw, train, conadv)


def _check_with_deepspeed(raw: Dict[str, Any]) -> None:
    _quiet_deepspeed_import()
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = copy.deepcopy(raw)
    for key in ("train", "conadv", "optimizer"):
        ds.pop(key, None)  # ours (DeepSpeed would look the optimizer type up by name)
    try:
        DeepSpeedConfig(ds)
    except Exception as e:  # pydantic ValidationError, AssertionError of the batch checks, ...
        raise ConfigError(f"DeepSpeed rejects the config: {e}") from None


def _quiet_deepspeed_import() -> None:
    """Import DeepSpeed for a training run: CPU accelerator without a GPU, no JIT build of its shm op."""
    if "DS_ACCELERATOR" not in os.environ:

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"  # else DeepSpeed prints its detection warning (on stdout)
    import deepspeed

    # an inference-only op that DeepSpeed would JIT-build (~95 s on 2 cores) at the first 2-rank start on CPU;
    # training never uses it
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


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


# ----------------------------------------------------------------------------------------------------------
# distributed set-up
# ----------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _distributed(backend: str) -> Iterator[Tuple[int, int, int, bool]]:
    """torch.distributed for the job: reuses a process group that exists; under a launcher (RANK/WORLD_SIZE set)
    initialises from the environment; alone, initialises a world of 1 on a free local port. Yields
    (rank, world size, local world size, created); a group created here is destroyed and environment
    variables set here are removed at the end (so the job can run inside another process, e.g. a test)."""
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
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
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
    import torch.distributed as tdist

    from ds_conadv.conadv.perturb import generate

    attack_cfg = None
    if conadv.epsilon is not None and conadv.perturb == "inputs":
        attack_cfg = conadv.model_copy(update={"dual_bn": False})  # generation through the main BN
    gen = torch.Generator().manual_seed(7_919 * seed + 104_729 * rank + 1)
    dtype = next(module.parameters()).dtype
    was_training = module.training
    module.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # NCCL reduces device tensors
    try:
        idx = torch.arange(rank, x_test.shape[0], world)
        for start in range(0, idx.numel(), batch_size):
            sel = idx[start:start + batch_size]
            x = normalize(x_test[sel]).to(device=device, dtype=dtype)
            y = y_test[sel].to(device)
            with torch.no_grad():
                counts[0] += (module(x).argmax(1) == y).sum().item()
            if attack_cfg is not None:
                x_adv = generate(module, x, y, attack_cfg, generator=gen)
                with torch.no_grad():
                    counts[1] += (module(x_adv).argmax(1) == y).sum().item()
            counts[2] += sel.numel()
    finally:
        module.train(was_training)
    if world > 1:
        tdist.all_reduce(counts)
    counts = counts.cpu()
    clean = float(counts[0] / counts[2])
    adv = float(counts[1] / counts[2]) if attack_cfg is not None else float("nan")
    return clean, adv


def describe_mode(resolved: ResolvedConfig) -> str:
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


# ----------------------------------------------------------------------------------------------------------
# the job
# ----------------------------------------------------------------------------------------------------------
def check_runnable(resolved: ResolvedConfig) -> None:
    """Valid configs that the job cannot run here (the 96K recipe) fail early, with the reason."""
    if resolved.train.data != "digits" or resolved.train.model != "cnn":
        raise ConfigError(f'"train.data" = "{resolved.train.data}" with "train.model" = "{resolved.train.model}": '
                          "a valid config, but it documents a recipe: ds-conadv train only runs the bundled "
                          'data set ("data": "digits" with "model": "cnn")')


def run(resolved: ResolvedConfig, *, config_name: str = DEFAULT_CONFIG_NAME, progress: bool = True,
        out=None) -> Optional[Dict[str, Any]]:
    """Run the job on this rank. Returns the summary (what metrics.json holds) on rank 0, None elsewhere."""

    check_runnable(resolved)
    _quiet_deepspeed_import()
    import logging

    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    threads_before = torch.get_num_threads()
    ds_level = deepspeed.utils.logger.level
    deepspeed.utils.logger.setLevel(logging.WARNING)  # DeepSpeed's INFO lines would break up the progress bar
    try:
        with _distributed(backend) as (rank, world, local_world, _), warnings.catch_warnings():
            # ZeRO 1/2 on gloo call a collective that torch has deprecated: not ours to fix, nor the user's
            warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated",
                                    category=FutureWarning)
            threads = resolved.train.threads or max(1, (os.cpu_count() or 1) // max(1, local_world))
            torch.set_num_threads(threads)
            return _run(resolved, config_name, progress, out or sys.stdout, rank, world, threads)
    finally:
        torch.set_num_threads(threads_before)
        deepspeed.utils.logger.setLevel(ds_level)


def prepare_data(resolved: ResolvedConfig, ds_cfg: Dict[str, Any]):
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


def _run(resolved: ResolvedConfig, config_name: str, progress: bool, out, rank: int, world: int,
         threads: int) -> Optional[Dict[str, Any]]:
    import logging

    import torch.distributed as tdist
    import torch.nn.functional as F
    from tqdm import tqdm

    import deepspeed

    import ds_conadv

    if resolved.absa_enabled:
        from ds_conadv.absa_train import run_absa

        return run_absa(resolved, config_name, progress, out, rank, world, threads)
    tc = resolved.train
    ds_cfg = resolved.deepspeed
    x_tr_n, y_tr, x_te, y_te, normalize, conadv = prepare_data(resolved, ds_cfg)
    n = x_tr_n.shape[0]

    # ---- batch geometry: DeepSpeed's rule (train = micro * gas * world) --------------------------------------
    micro = ds_cfg.get("train_micro_batch_size_per_gpu")
    global_batch = ds_cfg.get("train_batch_size")
    gas = ds_cfg.get("gradient_accumulation_steps")
    if micro is None and global_batch is not None:
        micro = global_batch // (world * (gas or 1))
    if gas is None and global_batch is not None and micro:
        gas = max(1, global_batch // (micro * world))
    if not micro or micro < 1:
        raise ConfigError('give "train_micro_batch_size_per_gpu" or "train_batch_size"')
    gas = gas or 1
    micro_per_epoch = ((n // world) // (micro * gas)) * gas
    if micro_per_epoch == 0:
        raise ConfigError(f"a rank's shard ({n // world} examples) is smaller than one global step "
                          f"({micro} x {gas} accumulation steps): lower the batch size")
    steps_per_epoch = micro_per_epoch // gas
    total_steps = tc.epochs * steps_per_epoch
    run_steps = min(total_steps, tc.max_steps) if tc.max_steps else total_steps
    sched = ds_cfg.get("scheduler")
    if isinstance(sched, dict) and isinstance(sched.get("params"), dict) \
            and sched["params"].get("total_num_steps") == _AUTO:
        sched["params"]["total_num_steps"] = total_steps
        resolved.raw["scheduler"]["params"]["total_num_steps"] = total_steps
    ds_cfg.setdefault("steps_per_print", 10 ** 9)  # DeepSpeed's own periodic log lines: off unless asked for

    # ---- model and engine ----------------------------------------------------------------------------------------
    torch.manual_seed(tc.seed)
    model = DigitsCNN(tc.width, 10)
    smoothing = tc.label_smoothing

    def loss_fn(output, y):
        return F.cross_entropy(output, y, label_smoothing=smoothing)

    ds_logger = deepspeed.utils.logger
    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)  # "untested optimizer" (ours, attached to ZeRO), "lr before start", ...
    try:
        engine, _, _, _ = ds_conadv.initialize(model=model, config=ds_cfg, loss_fn=loss_fn, conadv_seed=tc.seed,
                                               steps_per_epoch=micro_per_epoch)
    finally:
        ds_logger.setLevel(level)
    device = engine.device
    stream = ((x_tr_n[idx], y_tr[idx]) for _, idx in rank_batches(n, micro, micro_per_epoch, rank, world, tc.seed))

    # ---- outputs (rank 0) ----------------------------------------------------------------------------------------
    out_dir = tc.out_dir or default_out_dir(config_name)
    paths = {"out_dir": out_dir, "metrics_csv": os.path.join(out_dir, "metrics.csv"),
             "metrics_json": os.path.join(out_dir, "metrics.json"), "plot": os.path.join(out_dir, "curves.png")}
    csv_file = writer = None
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        csv_file = open(paths["metrics_csv"], "w", newline="", encoding="utf-8")
        writer = csv.DictWriter(csv_file, fieldnames=CSV_FIELDS)
        writer.writeheader()
        print(f"ds-conadv train: {describe_mode(resolved)} with {resolved.optimizer_type}, "
              f"ZeRO {ds_cfg.get('zero_optimization', {}).get('stage', 0)}, {world} rank(s) x {threads} thread(s), "
              f"global batch {micro * gas * world} ({micro} x {gas} x {world}), {steps_per_epoch} steps/epoch, "
              f"{run_steps} steps; outputs in {out_dir}", file=out, flush=True)
    desc = f"{resolved.mode} {resolved.optimizer_type} x{world}"
    bar = tqdm(total=run_steps, desc=desc, unit="step", disable=not (progress and rank == 0), file=sys.stderr,
               dynamic_ncols=True)

    rows: List[Dict[str, Any]] = []
    evals: List[Dict[str, Any]] = []
    step_times: List[float] = []
    t_start = time.perf_counter()
    step = 0
    try:
        for epoch in range(tc.epochs):
            if step >= run_steps:
                break
            if engine.schedule.steps_per_epoch is None:
                engine.set_epoch(epoch)
            elif engine.epoch != epoch:  # the schedule's epoch follows from steps_per_epoch
                raise RuntimeError(f"ConAdv schedule is at epoch {engine.epoch}, the data at {epoch}")
            for _ in range(steps_per_epoch):
                if step >= run_steps:
                    break
                lr = float(engine.get_lr()[0])  # the lr of this step (the scheduler moves on in the step)
                t0 = time.perf_counter()
                m = engine.train_batch(stream)
                dt = time.perf_counter() - t0
                vals = torch.tensor([m["loss"], m["clean_loss"], m["adv_loss"], m["clean_acc"], m["adv_acc"]],
                                    dtype=torch.float64, device=device)  # NCCL reduces device tensors
                if world > 1:
                    tdist.all_reduce(vals)
                    vals /= world
                step += 1
                step_times.append(dt)
                vals = vals.tolist()
                row = dict(step=step, epoch=epoch, lr=lr, loss=vals[0], clean_loss=vals[1],
                           adv_loss=vals[2], clean_acc=vals[3], adv_acc=vals[4],
                           step_time=dt, stale_by=m.get("stale_by"), generated_now=m.get("generated_now"),
                           test_clean_acc=None, test_adv_acc=None)
                if not math.isfinite(row["loss"]):
                    raise FloatingPointError(f"training diverged at step {step} (loss {row['loss']}): lower the lr")
                last_of_epoch = (step % steps_per_epoch == 0)
                if step == run_steps or (last_of_epoch and (epoch + 1) % tc.eval_every == 0):
                    clean, adv = evaluate(engine.module, x_te, y_te, normalize, conadv, rank, world, tc.seed, device)
                    row.update(test_clean_acc=clean, test_adv_acc=adv)
                    evals.append({"step": step, "epoch": epoch, "test_clean_acc": clean, "test_adv_acc": adv})
                rows.append(row)
                if rank == 0:
                    writer.writerow({k: _fmt(row[k]) for k in CSV_FIELDS})
                    csv_file.flush()
                    post = {"loss": f"{row['loss']:.3f}", "acc": f"{row['clean_acc']:.3f}"}
                    if not math.isnan(row["adv_acc"]):
                        post["adv"] = f"{row['adv_acc']:.3f}"
                    if evals:
                        post["test"] = f"{evals[-1]['test_clean_acc']:.3f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                    if tc.print_every and step % tc.print_every == 0:
                        bar.write(f"step {step}/{run_steps} epoch {epoch} lr {lr:.4g} loss {row['loss']:.4f} "
                                  f"clean acc {row['clean_acc']:.4f} adv acc {row['adv_acc']:.4f} "
                                  f"step {dt * 1e3:.0f} ms", file=sys.stderr)
    finally:
        bar.close()
        if csv_file is not None:
            csv_file.close()
    wall = time.perf_counter() - t_start

    # ---- every rank reports; all must hold the same weights ------------------------------------------------------
    params = list(engine.module.parameters())
    gather = (deepspeed.zero.GatheredParameters(params) if engine.zero_optimization_stage() == 3
              else contextlib.nullcontext())  # ZeRO 3 holds only a partition of each parameter
    with torch.no_grad(), gather:
        checksum = sum(float(p.detach().double().sum()) + 1e-3 * float(p.detach().double().square().sum())
                       for p in params)
    mine = {"rank": rank, "steps": step, "batches_consumed": engine.schedule.batches_consumed,
            "param_checksum": checksum}
    ranks = [None] * world
    if world > 1:
        tdist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    if rank != 0:
        return None

    final = evals[-1] if evals else {"test_clean_acc": float("nan"), "test_adv_acc": float("nan")}
    timed = step_times[1:] or step_times  # the first step includes one-off start-up work
    summary = {
        "final_test_clean_acc": final["test_clean_acc"],
        "final_test_adv_acc": final["test_adv_acc"],
        "final_train_loss": rows[-1]["loss"] if rows else float("nan"),
        "final_train_clean_acc": rows[-1]["clean_acc"] if rows else float("nan"),
        "final_train_adv_acc": rows[-1]["adv_acc"] if rows else float("nan"),
        "adversarial_eval": attack_description(conadv),
        "mode": resolved.mode, "optimizer": resolved.optimizer_type,
        "steps": step, "epochs": math.ceil(step / steps_per_epoch), "steps_per_epoch": steps_per_epoch,
        "world_size": world, "threads_per_rank": threads, "global_batch": micro * gas * world,
        "micro_batch": micro, "gradient_accumulation_steps": gas,
        "mean_step_time_s": statistics.fmean(timed) if timed else float("nan"),
        "median_step_time_s": statistics.median(timed) if timed else float("nan"),
        "wall_time_s": wall,
        "ranks": ranks, "ranks_agree": len({r["param_checksum"] for r in ranks}) == 1,
        "evals": evals, "paths": paths, "config_name": config_name, "config": resolved.raw,
        "device": str(device), "backend": tdist.get_backend() if tdist.is_initialized() else None,
    }
    with open(paths["metrics_json"], "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, default=str)
    plot_curves(rows, evals, paths["plot"],
                f"ds-conadv train: {describe_mode(resolved)}, {resolved.optimizer_type}, "
                f"global batch {micro * gas * world}, {world} rank(s), {config_name}")
    adv = summary["final_test_adv_acc"]
    print(f"finished {step} steps in {wall:.1f} s (mean step {summary['mean_step_time_s'] * 1e3:.0f} ms, "
          f"{world} rank(s){'' if summary['ranks_agree'] else ', RANKS DISAGREE'})", file=out)
    print(f"clean test accuracy:       {summary['final_test_clean_acc']:.4f}", file=out)
    print(f"adversarial test accuracy: {adv:.4f}  ({summary['adversarial_eval']})", file=out)
    print(f"metrics: {paths['metrics_csv']}  {paths['metrics_json']}", file=out)
    print(f"plot:    {paths['plot']}", file=out, flush=True)
    return summary
