"""``ds-conadv hessian``: the Hessian spectrum of a trained model (a checkpoint of ``ds-conadv train`` or any
model/data factory), from a config's ``"hessian"`` section. See docs/hessian.md."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Any, Dict, Optional, Sequence

from ds_conadv.hessian import Hessian, layer_spectra
from ds_conadv.hessian.hvp import BACKENDS

__all__ = ["hessian_main", "HESSIAN_CLI_DEFAULTS", "load_hessian_config", "load_checkpoint"]


# ----------------------------------------------------------------------------------------------------------
# ds-conadv hessian
# ----------------------------------------------------------------------------------------------------------
#: the ``"hessian"`` section of a config (all optional)
HESSIAN_CLI_DEFAULTS: Dict[str, Any] = {
    "model": "train",        # "train": the `ds-conadv train` job's model from the "train" section (DigitsCNN of
                             # train.width, with dual BN when conadv.enabled and conadv.dual_bn), or
                             # "package.module:factory", called as factory(**model_kwargs) -> nn.Module
    "model_kwargs": {},
    "data": "train",         # "train": the job's digits training split, normalised as the job does, or
                             # "package.module:fn", called as fn(**data_kwargs) -> (inputs, targets) tensors
                             # (batched and split over ranks here) or an iterable of batches (used as is)
    "data_kwargs": {},
    "criterion": "cross_entropy",  # (with train.label_smoothing), "mse", or "package.module:callable"
    "batch_size": 256,       # per batch, for (inputs, targets) data
    "max_batches": None,     # per rank; null = all
    "params": None,          # parameter names / module prefixes; null = all trainable (the "train" model: all
                             # but the adversarial BN branch, which the clean loss does not touch)
    "top_n": 3,
    "method": "power",       # or "lanczos"
    "max_iter": 100,
    "tol": 1e-3,
    "trace_iter": 100,       # Hutchinson samples at most; 0 = no trace
    "trace_tol": 1e-3,
    "density_steps": 100,    # SLQ Lanczos steps; 0 = no density
    "density_n_v": 1,
    "density_plot": "hessian_density.png",  # null = no plot
    "hvp": "auto",
    "bn_eval": True,
    "device": "auto",        # "cpu", "cuda" (cuda:LOCAL_RANK), "auto"
    "seed": 0,
    "threads": None,         # torch threads per rank; null = train.threads, else cores / local ranks
}


def load_hessian_config(path: Optional[str]) -> Dict[str, Any]:
    """The whole config: a ``ds-conadv train`` config (its ``"train"`` and ``"conadv"`` sections describe the
    model and data; DeepSpeed's keys are ignored here) with an optional ``"hessian"`` section (keys:
    :data:`HESSIAN_CLI_DEFAULTS`; unknown keys are an error). No path: the embedded default train config.
    Returns the parsed config with ``"hessian"`` filled with the defaults."""
    from ds_conadv.config import strip_comments
    from .job_config import load_config_file, load_embedded

    raw = strip_comments(load_config_file(path) if path else load_embedded())
    section = raw.get("hessian") or {}
    if not isinstance(section, dict):
        raise ValueError('"hessian" must be a JSON object')
    unknown = sorted(set(section) - set(HESSIAN_CLI_DEFAULTS))
    if unknown:
        raise ValueError(f'unknown key "{unknown[0]}" in "hessian"; allowed keys: {", ".join(HESSIAN_CLI_DEFAULTS)}')
    hs = dict(HESSIAN_CLI_DEFAULTS)
    hs.update(section)
    if hs["method"] not in ("power", "lanczos"):
        raise ValueError('"hessian.method" must be "power" or "lanczos"')
    raw["hessian"] = hs
    return raw


def _resolve(spec: str) -> Any:
    if ":" not in spec:
        raise ValueError(f"expected 'package.module:name', got {spec!r}")
    mod, _, attr = spec.partition(":")
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def load_checkpoint(model, path: str) -> None:
    """Load a checkpoint into ``model`` (strict).

    ``path`` is a plain ``state_dict`` file (``torch.save(model.state_dict(), path)``), or a dict holding one
    under ``"module"`` (DeepSpeed's ``mp_rank_00_model_states.pt``), ``"state_dict"`` or ``"model"``, or a
    DeepSpeed checkpoint folder (its ``latest`` tag, else the only tag, then ``mp_rank_00_model_states.pt``).
    A ``"module."`` prefix on every key (DDP) is stripped."""
    import torch

    if os.path.isdir(path):
        tag = None
        if os.path.isfile(os.path.join(path, "latest")):
            tag = open(os.path.join(path, "latest"), encoding="utf-8").read().strip()
        else:
            tags = [d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))]
            tag = tags[0] if len(tags) == 1 else None
        if tag is None:
            raise ValueError(f"{path}: a DeepSpeed checkpoint folder needs a 'latest' file or a single tag")
        path = os.path.join(path, tag, "mp_rank_00_model_states.pt")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # DeepSpeed's model-states file pickles more than tensors (trusted: your own checkpoint)
        sd = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("module", "state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: not a state_dict")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)


def _build(raw: Dict[str, Any], rank: int, world: int):
    """(model, criterion, this rank's batches, default params) from a config of :func:`load_hessian_config`."""
    import torch
    import torch.nn.functional as F

    from ds_conadv.config import ConAdvConfig, TrainConfig

    hs = raw["hessian"]
    tc = TrainConfig.from_section(raw.get("train"))
    params = hs["params"]
    if hs["model"] == "train":
        from ds_conadv.conadv.dual_bn import convert_dual_bn
        from .common import DigitsCNN

        if tc.model != "cnn":
            raise ValueError(f'hessian.model "train" builds the job\'s digits CNN, not train.model "{tc.model}": '
                             'give "hessian.model" as "package.module:factory"')
        conadv = ConAdvConfig.from_section(raw.get("conadv"))
        torch.manual_seed(tc.seed)
        model = DigitsCNN(tc.width, 10, **hs["model_kwargs"])
        if conadv.enabled and conadv.dual_bn:
            convert_dual_bn(model)  # as the engine does: its checkpoints then load (the adv branch stays out)
    else:
        torch.manual_seed(tc.seed)
        model = _resolve(hs["model"])(**hs["model_kwargs"])
    smoothing = tc.label_smoothing
    if hs["criterion"] == "cross_entropy":
        def criterion(out, y):
            return F.cross_entropy(out, y, label_smoothing=smoothing)
    elif hs["criterion"] == "mse":
        criterion = F.mse_loss
    else:
        criterion = _resolve(hs["criterion"])
    if hs["data"] == "train":
        from .common import Normalize, load_digits

        if tc.data != "digits":
            raise ValueError(f'hessian.data "train" loads the bundled digits, not train.data "{tc.data}"')
        conadv = ConAdvConfig.from_section(raw.get("conadv"))
        x, y, _, _ = load_digits(tc.test_fraction, tc.split_seed)
        mean, std = (conadv.mean, conadv.std) if conadv.mean is not None else ([float(x.mean())], [float(x.std())])
        data: Any = (Normalize(mean, std)(x), y)
    else:
        data = _resolve(hs["data"])(**hs["data_kwargs"])
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        x, y = x[rank::world], y[rank::world]  # this rank's share
        bs = int(hs["batch_size"])
        batches = [(x[i:i + bs], y[i:i + bs]) for i in range(0, x.shape[0], bs)]
    else:
        batches = list(data)
    if hs["max_batches"] is not None:
        batches = batches[:int(hs["max_batches"])]
    return model, criterion, batches, params


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ds-conadv hessian",
                                description="Hessian spectrum of a model over its training data: top eigenvalues, "
                                            "trace, density plot. Under torchrun each rank takes its share of the "
                                            "data. Options override the config's \"hessian\" section.")
    p.add_argument("--config", metavar="PATH",
                   help='a ds-conadv train config, with an optional "hessian" section (default: the embedded one)')
    p.add_argument("--checkpoint", metavar="PATH",
                   help="model weights: a state_dict file (torch.save(model.state_dict(), PATH)), DeepSpeed's "
                        "mp_rank_00_model_states.pt, or a DeepSpeed checkpoint folder; default: fresh init")
    p.add_argument("--top-n", type=int)
    p.add_argument("--method", choices=["power", "lanczos"])
    p.add_argument("--max-iter", type=int)
    p.add_argument("--tol", type=float)
    p.add_argument("--trace-iter", type=int, help="Hutchinson samples at most (0: no trace)")
    p.add_argument("--density-steps", type=int, help="SLQ Lanczos steps (0: no density)")
    p.add_argument("--n-v", type=int, dest="density_n_v", help="SLQ runs")
    p.add_argument("--plot", dest="density_plot", metavar="PNG", help="density plot path")
    p.add_argument("--params", help="comma-separated parameter names / module prefixes")
    p.add_argument("--max-batches", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--hvp", choices=["auto", *BACKENDS])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--layers", action="store_true", help="also the top eigenvalue of each layer's own block")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON (rank 0)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--print-config", action="store_true", help='print the resolved "hessian" section and exit')
    return p


def hessian_main(argv: Optional[Sequence[str]] = None) -> int:
    """``ds-conadv hessian [options]``; ``argv`` is what follows ``hessian`` on the command line. Returns the exit
    status (argument and config errors exit with status 2 through argparse)."""
    parser = _parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        raw = load_hessian_config(args.config)
    except Exception as e:  # ConfigError, ValueError, OSError
        parser.error(str(e))
    hs = raw["hessian"]
    for key in ("top_n", "method", "max_iter", "tol", "trace_iter", "density_steps", "density_n_v",
                "density_plot", "max_batches", "batch_size", "hvp", "device", "seed", "threads"):
        if getattr(args, key) is not None:
            hs[key] = getattr(args, key)
    if args.params:
        hs["params"] = [s for s in args.params.split(",") if s]
    if args.print_config:
        print(json.dumps(hs, indent=2))
        return 0

    import torch
    import torch.distributed as dist

    threads = hs["threads"] or (raw.get("train") or {}).get("threads")
    if not threads:  # as ds-conadv train: the cores shared by the local ranks
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        threads = max(1, (os.cpu_count() or 1) // max(1, local))
    torch.set_num_threads(int(threads))
    dev = hs["device"]
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if dev == "cuda":
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"

    try:
        model, criterion, batches, params = _build(raw, rank, world)
        if args.checkpoint:
            load_checkpoint(model, args.checkpoint)
    except Exception as e:
        parser.error(str(e))
    if not args.checkpoint and rank == 0:
        print("note: no --checkpoint: the model has its initial weights", file=sys.stderr)
    model.to(dev)
    progress = False if args.no_progress else None
    common = dict(hvp=hs["hvp"], bn_eval=hs["bn_eval"], seed=hs["seed"], progress=progress)
    h = Hessian(model, criterion, dataloader=batches, params=params, **common)
    say = print if rank == 0 else (lambda *a, **k: None)
    results: Dict[str, Any] = {"hessian": hs, "world_size": world, "dim": h.dim}
    say(f"ds-conadv hessian: {type(model).__name__}, {h.dim:,} parameters in the Hessian, {len(batches)} batches "
        f"on each of {world} rank(s), hvp {h.op.backend}, device {dev}", flush=True)

    t0 = time.perf_counter()
    values, _ = h.eigenvalues(top_n=hs["top_n"], max_iter=hs["max_iter"], tol=hs["tol"], method=hs["method"])
    results.update(eigenvalues=values, eigen_products=h.last_info["products"], num_samples=h.num_samples)
    say(f"samples: {h.num_samples} (all ranks)")
    say(f"top {len(values)} eigenvalues ({hs['method']}, {h.last_info['products']} products, "
        f"{time.perf_counter() - t0:.1f}s): " + "  ".join(f"{v:.6g}" for v in values), flush=True)
    if hs["trace_iter"]:
        t0 = time.perf_counter()
        tr = h.trace(max_iter=hs["trace_iter"], tol=hs["trace_tol"])
        results["trace"] = {"mean": tr.mean, "stderr": tr.stderr, "samples": len(tr.samples)}
        say(f"trace (Hutchinson, {len(tr.samples)} samples, {time.perf_counter() - t0:.1f}s): "
            f"{tr.mean:.6g} ± {tr.stderr:.3g}", flush=True)
    if hs["density_steps"]:
        t0 = time.perf_counter()
        d = h.density(iter=hs["density_steps"], n_v=hs["density_n_v"])
        results["density"] = {"nodes": d.nodes, "weights": d.weights}
        lo, hi = min(min(r) for r in d.nodes), max(max(r) for r in d.nodes)
        msg = (f"density (SLQ, n_v={hs['density_n_v']}, {max(map(len, d.nodes))} steps, "
               f"{time.perf_counter() - t0:.1f}s): Ritz values in [{lo:.4g}, {hi:.4g}]")
        if hs["density_plot"] and rank == 0:
            folder = os.path.dirname(os.path.abspath(hs["density_plot"]))
            os.makedirs(folder, exist_ok=True)
            d.plot(hs["density_plot"])
            results["density_plot"] = hs["density_plot"]
            msg += f"; plot: {hs['density_plot']}"
        say(msg, flush=True)
    if args.layers:
        names = set(h.names)
        modules = None if params is None else [
            m for m, mod in model.named_modules()
            if any((f"{m}.{n}" if m else n) in names for n, _ in mod.named_parameters(recurse=False))]
        spectra = layer_spectra(model, criterion, dataloader=batches, max_iter=hs["max_iter"], tol=hs["tol"],
                                method=hs["method"], modules=modules, **common)
        results["layers"] = spectra
        say("top eigenvalue per layer (its own parameters):")
        for name, v in spectra.items():
            say(f"  {name or '<root>'}: {v:.6g}")
    if args.json and rank == 0:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, default=str)
    return 0
