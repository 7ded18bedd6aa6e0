"""The package's import graph (every import statement in ds_conadv/**, module level or inside a function, read
from the source with ``ast``): no cycle between modules, no library module importing the application layer
(``ds_conadv.app``) or the CLI, and the optimizer core importing no integration."""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Set

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_conadv")
PKG = "ds_conadv"
KERNELS = "ds_conadv.kernels"
#: the application layer and the modules that only forward old import paths to it
APP = ("ds_conadv.app", "ds_conadv.cli", "ds_conadv.train", "ds_conadv.absa_train")
#: old import paths that only re-export (they may import anything they forward)
SHIMS = (
    "ds_conadv.train",
    "ds_conadv.absa_train",
    "ds_conadv.horovod",
    "ds_conadv.lr_schedules",
    "ds_conadv.absa_driver",
    "ds_conadv.integrations.deepspeed_engine",
    "ds_conadv.integrations.horovod_train",
)


#: library -> application edges that only keep an old import path working (resolved lazily, on first use)
ALLOWED_APP_EDGES = {("ds_conadv.hessian", "ds_conadv.app.hessian_cli"): "ds_conadv.hessian.hessian_main & co."}


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> Dict[str, str]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__pycache__"))]
        for f in filenames:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                found[_module_name(path)] = path
    return found


def _resolve(name: str, modules: Dict[str, str]) -> str:
    """The longest prefix of ``name`` that is a module of the package (``a.b.C`` -> ``a.b``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def import_graph() -> Dict[str, Set[str]]:
    modules = _modules()
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.endswith("__init__.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                targets = [node.args[0].value]  # importlib.import_module("ds_conadv....")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod if is_pkg else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    prefix = f"{base}.{node.module}" if node.module else base
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" for a in node.names]
            for t in targets:
                if t == KERNELS or t.startswith(KERNELS + "."):
                    graph[mod].add(KERNELS)  # kernels/ (installed as ds_conadv.kernels) imports nothing of ours
                elif t == PKG or t.startswith(PKG + "."):
                    dep = _resolve(t, modules)
                    if dep and dep != mod:
                        graph[mod].add(dep)
    graph.setdefault(KERNELS, set())
    return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _is(mod: str, prefixes) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def test_no_import_cycles():
    graph = import_graph()
    for m, d in ALLOWED_APP_EDGES:  # resolved at attribute access, after both modules are loaded
        graph[m].discard(d)
    assert _cycles(graph) == []


def test_library_never_imports_the_application():
    bad = sorted(
        f"{m} -> {d}"
        for m, deps in import_graph().items()
        for d in deps
        if not _is(m, APP) and m not in SHIMS and m != PKG and _is(d, APP) and (m, d) not in ALLOWED_APP_EDGES
    )
    assert bad == []


def test_optimizer_core_imports_no_integration():
    bad = sorted(
        f"{m} -> {d}"
        for m, deps in import_graph().items()
        if _is(m, ("ds_conadv.optim",))
        for d in deps
        if not _is(d, ("ds_conadv.optim", "ds_conadv.kernels", "ds_conadv._registry", "ds_conadv.torch_compat"))
    )
    assert bad == []


def test_the_graph_sees_function_level_imports():
    # the check must not be fooled by a lazy import inside a function
    graph = import_graph()
    assert "ds_conadv.integrations.deepspeed.initialize" in graph
    assert any(_is(d, ("ds_conadv.integrations.deepspeed",)) for d in graph[PKG])


@pytest.mark.parametrize("cycle", [{"a": {"b"}, "b": {"a"}}, {"a": {"b"}, "b": {"c"}, "c": {"a"}}])
def test_cycle_detection(cycle):
    assert _cycles({k: set(v) for k, v in cycle.items()})


OLD_NAMES = {
    "ds_conadv": ["initialize"],
    "ds_conadv.train": [
        "run",
        "validate_config",
        "load_embedded",
        "DigitsCNN",
        "Normalize",
        "load_digits",
        "evaluate",
        "prepare_data",
        "check_runnable",
        "default_out_dir",
        "attack_description",
        "_quiet_deepspeed_import",
    ],
    "ds_conadv.absa_train": ["run_absa"],
    "ds_conadv.config": [
        "ConAdvConfig",
        "ConfigError",
        "TrainConfig",
        "optimizer_class",
        "strip_comments",
        "validate_optimizer_params",
        "GROUPING_KEYS",
    ],
    "ds_conadv.lr_schedules": ["WarmupPolyDecayLR", "scheduler_class", "scheduler_factory", "SCHEDULERS"],
    "ds_conadv.absa": [
        "ABSAConfig",
        "ABSASchedule",
        "accumulation_steps",
        "reachable_batches",
        "check_reachable_batches",
        "plot_log",
    ],
    "ds_conadv.absa_driver": [
        "ABSADriver",
        "ABSATrainer",
        "DeepSpeedABSAEngine",
        "HorovodABSATrainer",
        "attack_config",
        "adversarial_count",
        "ScaledLRScheduler",
    ],
    "ds_conadv.integrations.deepspeed": [
        "initialize",
        "attach",
        "auto_attach",
        "load_config",
        "validate_config",
        "_find_trust_optimizer",
        "DeepSpeedConAdvEngine",
    ],
    "ds_conadv.integrations.deepspeed_engine": ["DeepSpeedConAdvEngine"],
    "ds_conadv.integrations.horovod": [
        "available",
        "require_horovod",
        "group_settings",
        "check_settings_survived",
        "distributed_optimizer",
        "broadcast_state",
        "HorovodConAdvTrainer",
        "ElasticConAdvState",
        "INSTALL_HINT",
        "_is_distributed_optimizer",
        "_repoint_scheduler",
    ],
    "ds_conadv.integrations.horovod_train": ["train_horovod", "resolve_batch", "digits_data", "digits_cnn", "main"],
    "ds_conadv.horovod": ["train_horovod", "HorovodConAdvTrainer", "distributed_optimizer"],
    "ds_conadv.hessian": ["Hessian", "hessian_main", "HESSIAN_CLI_DEFAULTS", "load_hessian_config", "load_checkpoint"],
    "ds_conadv.optim": [
        "LAMB",
        "LARS",
        "FusedLAMB",
        "LARC",
        "param_groups",
        "SegmentLayout",
        "TrustRatioOptimizer",
        "get_kernels",
        "KernelSet",
    ],
}


@pytest.mark.parametrize("module", sorted(OLD_NAMES))
def test_old_import_paths_keep_their_names(module):
    import importlib

    mod = importlib.import_module(module)
    missing = [n for n in OLD_NAMES[module] if not hasattr(mod, n)]
    assert missing == []
