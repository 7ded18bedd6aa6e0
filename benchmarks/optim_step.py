#!/usr/bin/env python
"""Optimizer step-time benchmark (CPU or GPU).

Times ``optimizer.step()`` alone on the parameter shapes of a real model:

* ``resnet50``   - the 161 parameter tensors of torchvision's ResNet-50 (25,557,032 parameters)
* ``bert-large`` - the 391 parameter tensors of BERT-large (embeddings, 24 layers, pooler;
  335,141,888 parameters)

``--scale S`` shrinks every tensor's element count by S (the tensor count stays), for CPU runs.

Columns ("contenders") are pluggable: ``CONTENDERS`` is a registry of named factories
``(params) -> optimizer``. Each is built on fresh optimizer state, given random gradients once,
warmed up, then timed for ``--steps`` steps (min and median reported). The timed steps are
interleaved: ``--rounds`` rounds, each running every contender for its share of the steps, so that a
change in machine load hits anchor and contender alike. Contenders that cannot run here (a backend that
is not built, a package that is not installed, CUDA-only code on a CPU) are skipped with the reason printed.

The ratio column compares each contender with its *anchor*, the strongest torch optimizer of the same
shape of work: ``AdamW(fused)`` for LAMB-like contenders, ``SGD(momentum,fused)`` for LARS-like ones.
Anchors are always timed in the same run (added to an ``--only`` selection when missing).

``--compete N`` starts N busy-loop processes (``while True: pass``), each pinned to one of the last N
CPUs, for the timed part: a busy core then costs each contender what it costs it, and the ratio says
whether ours degrades more than torch's fused kernels. The load average before and after is recorded.

GB/s counts the bytes a step must move at least: every parameter read and written, every
gradient read, every optimizer-state tensor read and written (state sizes measured on the
optimizer after warm-up), unless the contender names its own bytes per parameter.

Examples::

    python benchmarks/optim_step.py --paramset resnet50 --scale 0.01 --steps 2
    python benchmarks/optim_step.py --paramset bert-large --device cuda --markdown docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import types
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")
ADAMW_ANCHOR = "AdamW(fused)"
SGD_ANCHOR = "SGD(momentum,fused)"
BASELINE = ADAMW_ANCHOR  # the anchor of LAMB-like contenders (kept as the report's "baseline" field)

# --------------------------------------------------------------------------- parameter sets


def resnet50_shapes() -> List[Tuple[int, ...]]:
    """The parameter shapes of torchvision's ResNet-50, in ``named_parameters()`` order."""
    shapes: List[Tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out = planes * 4
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),   # conv1, bn1
                       (planes, planes, 3, 3), (planes,), (planes,),     # conv2, bn2
                       (out, planes, 1, 1), (out,), (out,)]              # conv3, bn3
            if b == 0:  # downsample: 1x1 conv + bn
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]
            inplanes = out
    shapes += [(1000, 2048), (1000,)]  # fc
    return shapes


def bert_large_shapes(vocab: int = 30522, hidden: int = 1024, layers: int = 24,
                      intermediate: int = 4096, max_pos: int = 512, type_vocab: int = 2) -> List[Tuple[int, ...]]:
    """The parameter shapes of BERT-large (HF ``BertModel`` with pooler), in order."""
    h = hidden
    shapes: List[Tuple[int, ...]] = [(vocab, h), (max_pos, h), (type_vocab, h), (h,), (h,)]
    for _ in range(layers):
        shapes += [(h, h), (h,), (h, h), (h,), (h, h), (h,),       # query, key, value
                   (h, h), (h,), (h,), (h,),                       # attention output dense + LayerNorm
                   (intermediate, h), (intermediate,),             # intermediate
                   (h, intermediate), (h,), (h,), (h,)]            # output dense + LayerNorm
    shapes += [(h, h), (h,)]  # pooler
    return shapes


PARAMSETS: Dict[str, Callable[[], List[Tuple[int, ...]]]] = {
    "resnet50": resnet50_shapes,
    "bert-large": bert_large_shapes,
}


def scaled_shapes(shapes: Sequence[Tuple[int, ...]], scale: float) -> List[Tuple[int, ...]]:
    """Shrink every tensor's numel by ``scale`` (at least 1 element); scaled tensors are 1-D."""
    if scale == 1.0:
        return [tuple(s) for s in shapes]
    return [(max(1, int(round(math.prod(s) * scale))),) for s in shapes]


DTYPES = {
    # name: (parameter/gradient dtype, description)
    "fp32": (torch.float32, "fp32 parameters and gradients"),
    "bf16-master": (torch.bfloat16, "bf16 parameters and gradients; ours with master_weights=True (fp32 "
                                    "master copy and state); torch/timm optimizers keep their state in bf16"),
}


def make_params(shapes, device, dtype, seed: int = 0) -> List[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.empty(s, dtype=dtype, device=device)
        fill_(p, g, 0.05)
        params.append(p.requires_grad_(True))
    return params


def fill_(t: torch.Tensor, gen: torch.Generator, std: float) -> None:
    """Seeded normal fill that is cheap for large tensors (generated on CPU in fp32 chunks)."""
    flat = t.detach().view(-1)
    chunk = 1 << 24
    with torch.no_grad():
        for i in range(0, flat.numel(), chunk):
            n = min(chunk, flat.numel() - i)
            flat[i:i + n].copy_(torch.randn(n, generator=gen) * std)


# --------------------------------------------------------------------------- contenders


class Skip(Exception):
    """A contender cannot run here; the message says why."""


@dataclass
class Contender:
    name: str
    factory: Callable[[List[torch.Tensor]], torch.optim.Optimizer]
    # bytes a step must move per parameter, given the parameter element size; None = measure
    # (param r+w, grad r, state r+w).
    bytes_per_param: Optional[Callable[[int], float]] = None
    note: str = ""
    anchor: Optional[str] = None  # the contender its ratio is taken against (None: no ratio)


def _ours(kind: str, backend: str, skip_nonfinite: bool = True) -> Callable:
    def factory(params):
        try:
            optim = importlib.import_module("ds_conadv.optim")
        except Exception as e:  # noqa: BLE001 - anything that stops the import is a skip
            raise Skip(f"ds_conadv.optim not importable: {type(e).__name__}: {e}") from e
        kw = {"backend": backend, "skip_nonfinite": skip_nonfinite}
        if params[0].dtype in (torch.bfloat16, torch.float16):
            kw["master_weights"] = True  # fp32 master copy (bf16-master)
        if kind == "LAMB":
            return optim.LAMB(params, lr=1e-3, weight_decay=0.01, max_grad_norm=None, **kw)
        return optim.LARS(params, lr=0.1, momentum=0.9, weight_decay=1e-4, **kw)
    return factory


def _torch_adamw(mode: str) -> Callable:
    def factory(params):
        kw = {"foreach": True} if mode == "foreach" else {"fused": True}
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, **kw)
    return factory


def _torch_sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True)


_TIMM_PKG = "_ds_conadv_timm_optim"


def load_timm_optim(module: str) -> types.ModuleType:
    """Load ``timm/optim/<module>.py`` by file path, without importing the ``timm`` package.

    Importing ``timm`` imports torchvision (broken beside this torch build); timm's optimizer files
    only need ``torch`` and their siblings (``._helpers``, ``._types``), which a stand-in parent
    package whose ``__path__`` is ``timm/optim`` resolves. Install timm with ``pip install --no-deps timm``.
    """
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise Skip("timm not installed (pip install --no-deps timm)")
    optim_dir = os.path.join(list(spec.submodule_search_locations)[0], "optim")
    if _TIMM_PKG not in sys.modules:
        pkg = types.ModuleType(_TIMM_PKG)
        pkg.__path__ = [optim_dir]
        pkg.__package__ = _TIMM_PKG
        sys.modules[_TIMM_PKG] = pkg
    full = f"{_TIMM_PKG}.{module}"
    if full in sys.modules:
        return sys.modules[full]
    path = os.path.join(optim_dir, module + ".py")
    if not os.path.isfile(path):
        raise Skip(f"timm has no optim/{module}.py")
    mspec = importlib.util.spec_from_file_location(full, path)
    mod = importlib.util.module_from_spec(mspec)
    sys.modules[full] = mod
    try:
        mspec.loader.exec_module(mod)
    except Exception as e:  # noqa: BLE001
        del sys.modules[full]
        raise Skip(f"cannot load timm/optim/{module}.py: {type(e).__name__}: {e}") from e
    return mod


def _timm_lamb(params):
    return load_timm_optim("lamb").Lamb(params, lr=1e-3, weight_decay=0.01, max_grad_norm=None)


def _timm_lars(params):
    return load_timm_optim("lars").Lars(params, lr=0.1, momentum=0.9, weight_decay=1e-4)


def _need_cuda(params):
    if params[0].device.type != "cuda":
        raise Skip("CUDA only")


def _torch_sgd_fused(params):
    try:
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)
    except (RuntimeError, TypeError, ValueError) as e:
        raise Skip(f"fused SGD unsupported here: {e}") from e


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> Optional[float]:
    """Device-to-device copy bandwidth (bytes read + written per second), the roofline yardstick."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (statistics.median(times) * 1e-3) / 1e9


def _deepspeed_lamb(params):
    _need_cuda(params)
    try:
        from deepspeed.ops.lamb import FusedLamb
    except Exception as e:  # noqa: BLE001
        raise Skip(f"deepspeed FusedLamb not importable: {type(e).__name__}: {e}") from e
    return FusedLamb(params, lr=1e-3, weight_decay=0.01, max_grad_norm=0.0)


def _apex_lamb(params):
    _need_cuda(params)
    try:
        from apex.optimizers import FusedLAMB
    except Exception as e:  # noqa: BLE001
        raise Skip(f"apex FusedLAMB not importable: {type(e).__name__}: {e}") from e
    return FusedLAMB(params, lr=1e-3, weight_decay=0.01, max_grad_norm=0.0)


def default_backends(device: str) -> List[str]:
    """Our backends worth timing on ``device``: every named one but ``auto``; on CPU not ``triton``
    (the interpreter is orders of magnitude slower) and not ``cuda``; on CUDA not ``cpp``."""
    try:
        names = [b for b in importlib.import_module("ds_conadv.optim").BACKENDS if b != "auto"]
    except Exception:  # noqa: BLE001 - not importable yet: the contenders will say why
        names = ["reference", "foreach", "cpp", "triton", "cuda"]
    drop = {"cpp"} if device.startswith("cuda") else {"triton", "cuda"}
    return [b for b in names if b not in drop]


def build_contenders(backends: Sequence[str]) -> List[Contender]:
    """The registry: ours for each backend, then the baselines. Add entries here for new columns."""
    a, s = ADAMW_ANCHOR, SGD_ANCHOR
    out = []
    for b in backends:
        out.append(Contender(f"LAMB[{b}]", _ours("LAMB", b), anchor=a))
        out.append(Contender(f"LARS[{b}]", _ours("LARS", b), anchor=s))
        # without the inf/NaN check (torch's optimizers make none): LAMB's check is a read of the grads
        out.append(Contender(f"LAMB[{b},unchecked]", _ours("LAMB", b, skip_nonfinite=False), anchor=a))
        out.append(Contender(f"LARS[{b},unchecked]", _ours("LARS", b, skip_nonfinite=False), anchor=s))
    out += [
        Contender("AdamW(foreach)", _torch_adamw("foreach"), anchor=a),
        Contender(ADAMW_ANCHOR, _torch_adamw("fused"), anchor=a),
        Contender("SGD(momentum,foreach)", _torch_sgd, anchor=s),
        Contender(SGD_ANCHOR, _torch_sgd_fused, anchor=s),
        Contender("timm.Lamb", _timm_lamb, anchor=a),
        Contender("timm.Lars", _timm_lars, anchor=s),
        Contender("deepspeed.FusedLamb", _deepspeed_lamb, anchor=a),
        Contender("apex.FusedLAMB", _apex_lamb, anchor=a),
    ]
    return out


def select_contenders(contenders: Sequence[Contender], only: Optional[str]) -> List[Contender]:
    """The contenders ``--only`` names, plus the anchor of each (in registry order)."""
    chosen = {c.name for c in contenders if _selected(c.name, only)}
    chosen |= {c.anchor for c in contenders if c.name in chosen and c.anchor}
    return [c for c in contenders if c.name in chosen]


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_bytes_per_step(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> int:
    """param r+w + grad r + every state tensor r+w (scalar step counters count too, negligibly)."""
    total = 0
    for p in params:
        total += 2 * p.numel() * p.element_size()
        if p.grad is not None:
            total += p.grad.numel() * p.grad.element_size()
        for v in opt.state.get(p, {}).values():
            if torch.is_tensor(v):
                total += 2 * v.numel() * v.element_size()
    return total


class Running:
    """One contender's optimizer over the shared params, with its step times."""

    def __init__(self, c: Contender, params, device: torch.device, warmup: int, seed: int):
        self.c, self.params, self.device = c, params, device
        self.times: List[float] = []
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for p in params:  # same starting point for every contender
            fill_(p, gen, 0.05)
        self.opt = c.factory(params)
        if self.opt is None:
            raise Skip("factory returned no optimizer")
        for _ in range(warmup):
            self.opt.step()
        _sync(device)

    def run(self, steps: int) -> None:
        opt, device = self.opt, self.device
        if device.type == "cuda":
            for _ in range(steps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                opt.step()
                end.record()
                end.synchronize()
                self.times.append(start.elapsed_time(end))
        else:
            for _ in range(steps):
                t0 = time.perf_counter()
                opt.step()
                self.times.append((time.perf_counter() - t0) * 1e3)

    def finish(self) -> Dict:
        params, times = self.params, self.times
        n = sum(p.numel() for p in params)
        if self.c.bytes_per_param is not None:
            nbytes = self.c.bytes_per_param(params[0].element_size()) * n
        else:
            nbytes = measured_bytes_per_step(self.opt, params)
        finite = all(bool(torch.isfinite(p.detach()).all()) for p in params[:: max(1, len(params) // 16)])
        self.close()
        med = statistics.median(times)
        return {
            "name": self.c.name, "anchor": self.c.anchor, "min_ms": min(times), "median_ms": med,
            "times_ms": times, "bytes_per_step": int(nbytes), "bytes_per_param": nbytes / n,
            "gbps": nbytes / (med * 1e-3) / 1e9 if med > 0 else float("inf"), "finite": finite,
        }

    def close(self) -> None:
        self.opt = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def time_contender(c: Contender, params, device: torch.device, steps: int, warmup: int, seed: int) -> Dict:
    """One contender alone: warm-up, then ``steps`` timed steps."""
    r = Running(c, params, device, warmup, seed)
    try:
        r.run(steps)
    except BaseException:
        r.close()
        raise
    return r.finish()


def _round_shares(steps: int, rounds: int) -> List[int]:
    rounds = max(1, min(rounds, steps))
    return [steps // rounds + (1 if i < steps % rounds else 0) for i in range(rounds)]


class Competitors:
    """``n`` busy-loop processes, each pinned to one of the last ``n`` CPUs, while the context is open."""

    def __init__(self, n: int):
        self.n, self.procs, self.cpus = n, [], []

    def __enter__(self):
        import subprocess

        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        self.cpus = cpus[-self.n:] if self.n else []
        for cpu in self.cpus:
            code = f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
            self.procs.append(subprocess.Popen([sys.executable, "-c", code]))
        if self.procs:
            time.sleep(0.5)  # let them start spinning
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        return False


# --------------------------------------------------------------------------- machine / output


def machine_info(device: torch.device, threads: int) -> Dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": threads, "cpu": platform.processor() or "unknown",
            "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def section_key(device: str, paramset_label: str, dtype: str) -> str:
    return f"{device}/{paramset_label}/{dtype}"


def markdown_section(report: Dict) -> str:
    key = report["key"]
    m = report["machine"]
    where = (f"GPU {m['gpu']} (CUDA {m.get('cuda')})" if "gpu" in m
             else f"{report.get('machine_label') or 'CPU ' + m['cpu']} ({m['cpu']}), {m['threads']} torch "
                  f"threads of {m['cpu_count']} cores")
    load = report.get("load_avg")
    extra = ""
    if load:
        extra += f" Load average (1 min) {load['before'][0]:.2f} before, {load['after'][0]:.2f} after."
    if report.get("compete"):
        extra += (f" {report['compete']} competing busy-loop process(es) pinned to CPU "
                  f"{', '.join(map(str, report.get('compete_cpus', [])))} while timing.")
    lines = [
        f"<!-- optim_step:BEGIN {key} -->",
        f"### {report['paramset_label']} on {report['device']}, {report['dtype']}, {report['threads']} thread"
        f"{'s' if report['threads'] != 1 else ''}" + (f" ({report['tag']})" if report.get("tag") else ""),
        "",
        f"{report['n_tensors']} tensors, {report['n_params']:,} parameters; {where}; torch {m['torch']}; "
        f"{m['platform']}; {report['steps']} timed steps after {report['warmup']} warm-up, interleaved over "
        f"{report.get('rounds', 1)} rounds; {report['date']}.{extra}",
        "",
        "Ratio: median over the median of the contender's anchor in this run. GB/s counts the minimum bytes of a "
        "one-pass step (params read+written, grads read, state read+written)"
        + (f"; % of copy is that over the measured device-to-device copy, {report['copy_gbps']:.0f} GB/s."
           if report.get("copy_gbps") else "."),
        "",
        "| contender | anchor | min ms | median ms | ratio vs anchor | GB/s | % of copy |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        ratio = "" if r.get("ratio_vs_anchor") is None else f"{r['ratio_vs_anchor']:.2f}"
        pct = "" if r.get("pct_of_copy") is None else f"{r['pct_of_copy']:.0f}"
        lines.append(f"| {r['name']} | {r.get('anchor') or ''} | {r['min_ms']:.2f} | {r['median_ms']:.2f} | {ratio} "
                     f"| {r['gbps']:.1f} | {pct} |")
    if report["skipped"]:
        lines.append("")
        lines.append("Skipped: " + "; ".join(f"{s['name']} ({s['reason']})" for s in report["skipped"]) + ".")
    lines.append(f"<!-- optim_step:END {key} -->")
    return "\n".join(lines) + "\n"


def update_markdown(path: str, report: Dict) -> None:
    """Write or replace this run's marked section in ``path`` (appended when new)."""
    key = report["key"]
    begin, end = f"<!-- optim_step:BEGIN {key} -->", f"<!-- optim_step:END {key} -->"
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    section = markdown_section(report)
    i = text.find(begin)
    j = text.find(end, i + 1) if i >= 0 else -1
    if i >= 0 and j >= 0:
        j += len(end)
        if text[j:j + 1] == "\n":
            j += 1
        text = text[:i] + section + text[j:]
    else:
        if text and not text.endswith("\n"):
            text += "\n"
        text += ("\n" if text else "") + section
    _atomic_write(path, text)


def _atomic_write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- main


def parse_args(argv=None, prog=None) -> argparse.Namespace:
    summary, _, details = __doc__.partition("\n\n")  # the summary once, as the description; the rest below
    p = argparse.ArgumentParser(prog=prog, description=summary, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=details)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--paramset", choices=sorted(PARAMSETS), default="resnet50")
    p.add_argument("--scale", type=float, default=1.0, help="shrink every tensor's numel by this factor")
    p.add_argument("--steps", type=int, default=7, help="timed steps (min and median reported)")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleave the timed steps of all contenders over this many rounds")
    p.add_argument("--compete", type=int, default=0,
                   help="busy-loop processes pinned to the last N CPUs while timing (a loaded machine)")
    p.add_argument("--tag", default=None, help="suffix of the result key and JSON name (e.g. t1, compete)")
    p.add_argument("--machine-label", default=None, help="how the docs name the machine, e.g. '2-core CPU (shared)'")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends of ours (default: reference,foreach [+triton,cuda on CUDA])")
    p.add_argument("--only", default=None,
                   help="comma-separated contender names or patterns (* and ? are wildcards), "
                        "e.g. 'LAMB[*],AdamW(foreach)'")
    p.add_argument("--list", action="store_true", help="list the contenders and exit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", default=None,
                   help="results JSON (default: benchmarks/results/optim_step-<device>-<paramset>-<dtype>.json)")
    p.add_argument("--no-json", action="store_true", help="write no JSON")
    p.add_argument("--markdown", default=None, help="update this run's marked section in this file")
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 0 or not a.scale > 0 or a.rounds < 1 or a.compete < 0:
        p.error("--steps must be >= 1, --warmup >= 0, --scale > 0, --rounds >= 1, --compete >= 0")
    return a


def _pattern(pat: str) -> "re.Pattern":
    """``*`` and ``?`` are wildcards; everything else (brackets included) is literal."""
    return re.compile(re.escape(pat).replace(r"\*", ".*").replace(r"\?", ".") + r"\Z")


def split_names(only: str) -> List[str]:
    """Comma-separated names/patterns; commas inside parentheses or brackets belong to a name
    (``SGD(momentum,fused)``)."""
    out, depth, cur = [], 0, []
    for ch in only:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return [x for x in out if x]


def _selected(name: str, only: Optional[str]) -> bool:
    if not only:
        return True
    return any(_pattern(pat).match(name) for pat in split_names(only))


def run(args: argparse.Namespace) -> Dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    backends = ([b.strip() for b in args.backends.split(",") if b.strip()] if args.backends
                else default_backends(device.type))
    contenders = select_contenders(build_contenders(backends), args.only)
    if args.list:
        for c in contenders:
            print(c.name)
        return {}
    dtype, dtype_desc = DTYPES[args.dtype]
    shapes = scaled_shapes(PARAMSETS[args.paramset](), args.scale)
    label = args.paramset if args.scale == 1.0 else f"{args.paramset}@{args.scale:g}"
    params = make_params(shapes, device, dtype, args.seed)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    for p in params:  # gradients filled once
        p.grad = torch.empty_like(p)
        fill_(p.grad, gen, 1e-3)
    n_params = sum(p.numel() for p in params)
    print(f"# optim_step: {label}, {len(params)} tensors, {n_params:,} params, {args.dtype}, "
          f"device {device}, {args.threads} threads, {args.steps} steps", flush=True)

    results, skipped = [], []

    def skip(name, e):
        reason = str(e) if isinstance(e, Skip) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        skipped.append({"name": name, "reason": reason[:300]})
        print(f"  skip {name}: {reason[:300]}", flush=True)

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    with Competitors(args.compete) as competitors:
        running: List[Running] = []
        for c in contenders:  # build + warm up each (a contender that fails here is reported, not fatal)
            try:
                running.append(Running(c, params, device, args.warmup, args.seed))
            except Exception as e:  # noqa: BLE001
                skip(c.name, e)
        for share in _round_shares(args.steps, args.rounds):
            for r in list(running):
                try:
                    r.run(share)
                except Exception as e:  # noqa: BLE001
                    skip(r.c.name, e)
                    r.close()
                    running.remove(r)
        for r in running:
            res = r.finish()
            results.append(res)
            print(f"  {res['name']:<24} min {res['min_ms']:9.3f} ms  median {res['median_ms']:9.3f} ms  "
                  f"{res['gbps']:7.2f} GB/s{'' if res['finite'] else '  (NON-FINITE params!)'}", flush=True)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    by_name = {r["name"]: r for r in results}
    copy_gbps = copy_bandwidth_gbps(device)
    for r in results:
        anchor = by_name.get(r.get("anchor"))
        r["ratio_vs_anchor"] = (r["median_ms"] / anchor["median_ms"]) if anchor and anchor["median_ms"] > 0 else None
        r["ratio_vs_baseline"] = r["ratio_vs_anchor"]  # older readers
        r["pct_of_copy"] = 100 * r["gbps"] / copy_gbps if copy_gbps else None
    for r in results:
        if r.get("ratio_vs_anchor") is not None and r["name"] != r["anchor"]:
            print(f"  {r['name']:<24} / {r['anchor']:<20} {r['ratio_vs_anchor']:.3f}", flush=True)
    key = section_key(device.type, label, args.dtype) + (f"/{args.tag}" if args.tag else "")

    report = {
        "benchmark": "optim_step", "key": key, "tag": args.tag, "machine_label": args.machine_label,
        "rounds": args.rounds, "compete": args.compete, "compete_cpus": competitors.cpus,
        "load_avg": {"before": list(load_before), "after": list(load_after)} if load_before else None,
        "anchors": {"LAMB": ADAMW_ANCHOR, "LARS": SGD_ANCHOR},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device.type, "paramset": args.paramset, "paramset_label": label, "scale": args.scale,
        "dtype": args.dtype, "dtype_description": dtype_desc, "n_tensors": len(params), "n_params": n_params,
        "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "backends": backends,
        "baseline": BASELINE, "machine": machine_info(device, args.threads), "copy_gbps": copy_gbps,
        "results": results, "skipped": skipped,
    }
    if not args.no_json:
        out = args.json_out or os.path.join(
            RESULTS_DIR, f"optim_step-{device.type}-{label}-{args.dtype}{'-' + args.tag if args.tag else ''}.json"
            .replace("@", "_s"))
        _atomic_write(out, json.dumps(report, indent=2) + "\n")
        report["json_path"] = out
        print(f"# wrote {out}")
    if args.markdown:
        update_markdown(args.markdown, report)
        print(f"# updated {args.markdown} [{report['key']}]")
    return report


def main(argv=None, prog=None) -> int:
    args = parse_args(argv, prog)
    threads_before = torch.get_num_threads()
    try:
        report = run(args)
    finally:
        torch.set_num_threads(threads_before)
    if args.list:
        return 0
    return 0 if report["results"] else 1


if __name__ == "__main__":
    sys.exit(main())
