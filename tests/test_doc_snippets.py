"""Every ```python and ```bash block of README.md and docs/*.md runs, as written, so the docs cannot drift.

Python blocks run each in a fresh process, in an empty directory, with the checkout root off ``sys.path`` (as for
an installed package); the process stands in for a one-rank launcher (RANK/WORLD_SIZE/MASTER_* set, DeepSpeed on
the CPU accelerator, DeepSpeed's inference-only shm op not JIT-built). Bash blocks run as one script (a trailing
``\\`` continues a line; the first failing command fails the block) from a scratch directory that mirrors the
checkout (``runs/`` and ``benchmarks/results/`` stay out of it), with ``.venv/bin`` on ``PATH``.

A block may be preceded by one directive line, an HTML comment the rendered page does not show::

    <!-- doc-test: given -->                python: names the surrounding text assumes (``model``, ``inputs``,
                                            ``loss_fn``, ``data_iter``, ...; GIVEN below) are defined first
    <!-- doc-test: launcher -->             python: saved as train.py and run under torchrun with 2 ranks
    <!-- doc-test: file=NAME -->            json: written as NAME into the directory of the page's later blocks
    <!-- doc-test: args=ARGS -->            bash: ARGS appended to each command (a shorter run the text allows,
                                            e.g. --max-steps 5 where it says that arguments are passed on)
    <!-- doc-test: needs=MODULE -->         skipped where MODULE cannot be imported (e.g. horovod)
    <!-- doc-test: skip=REASON -->          not run; REASON (the rest of the line) is required, and the number of
                                            such blocks is capped

Every fence needs a language (python, bash, json or text): an untagged block fails the test, so a new command or
snippet cannot slip in unrun.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple

import pytest

from dist_harness import ROOT, _run, base_env, free_port

PAGES = ["README.md"] + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))
LANGUAGES = ("python", "bash", "json", "text")
#: a cap on skipped blocks: raising it should be a decision, not a side effect of adding a page
MAX_SKIPPED = 10

_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
_TRAILING_COMMENT = re.compile(r"[ \t]+#[ \t].*$")
_DIRECTIVE = re.compile(r"<!--\s*doc-test:\s*(.*?)\s*-->\s*$")

PRELUDE = """\
import os
for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=os.environ["SNIPPET_PORT"]).items():
    os.environ.setdefault(key, value)
"""

NO_SHM_OP = """\
try:
    import deepspeed
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
except ImportError:
    pass
"""

#: what "given" blocks may assume: a small classifier with BatchNorm on 8x8 inputs in [0, 1], its data and loop
GIVEN = """\
import torch
import torch.nn.functional as F

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                            torch.nn.Linear(32, 10))
inputs, targets = torch.rand(256, 1, 8, 8), torch.randint(0, 10, (256,))
train_set = torch.utils.data.TensorDataset(inputs, targets)
loader = torch.utils.data.DataLoader(train_set, batch_size=128, drop_last=True)


def _forever():
    while True:
        yield from loader


repeating_loader = data_iter = my_rank_shard = _forever()
loss_fn = F.cross_entropy
sched = None
rank = 0
steps_per_epoch, total_steps, epochs, steps = len(loader), 2, 1, 2
"""


class Block(NamedTuple):
    page: str
    line: int
    lang: str
    code: str
    directive: Dict[str, str]


def _directive(text: str) -> Dict[str, str]:
    """``key=value; key; ...``; ``skip=REASON`` comes last and its reason may hold anything."""
    out = {}
    text, skip, reason = text.partition("skip=")
    if skip:
        out["skip"] = reason.strip()
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, _, value = part.partition("=")
        out[key.strip()] = value.strip()
    return out


def blocks() -> List[Block]:
    found = []
    for page in PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        for match in _FENCE.finditer(text):
            before = text[: match.start()].rstrip("\n").rpartition("\n")[2]
            directive = _DIRECTIVE.search(before)
            line = text.count("\n", 0, match.start()) + 2
            found.append(Block(page, line, match.group(1).strip(), match.group(2),
                               _directive(directive.group(1)) if directive else {}))
    return found


def _params(lang: str):
    return [pytest.param(b, id=f"{Path(b.page).name}:{b.line}") for b in blocks() if b.lang == lang]


def test_every_fence_has_a_language():
    bad = [f"{b.page}:{b.line}" for b in blocks() if b.lang not in LANGUAGES]
    assert bad == [], f"untagged or unknown fences (tag them {', '.join(LANGUAGES)}): {bad}"


def test_skips_are_few_and_give_a_reason():
    skipped = [b for b in blocks() if "skip" in b.directive]
    assert all(b.directive["skip"] for b in skipped), "skip=REASON needs a reason"
    assert len(skipped) <= MAX_SKIPPED, [f"{b.page}:{b.line}" for b in skipped]
    known = {"given", "launcher", "file", "needs", "skip", "args"}
    assert all(set(b.directive) <= known for b in blocks()), [b.directive for b in blocks()]


def _check_runnable(block: Block) -> None:
    if "skip" in block.directive:
        pytest.skip(block.directive["skip"])
    needs = block.directive.get("needs")
    if needs and importlib.util.find_spec(needs) is None:
        pytest.skip(f"needs {needs}")


def _page_files(block: Block, cwd: Path) -> None:
    """The page's json blocks marked file=NAME, written into the block's directory."""
    for other in blocks():
        if other.page == block.page and other.lang == "json" and "file" in other.directive:
            (cwd / other.directive["file"]).write_text(other.code, encoding="utf-8")


def _needs(code: str) -> List[str]:
    return [m for m in ("transformers", "accelerate", "lightning", "deepspeed", "horovod", "tensorboard")
            if re.search(rf"^\s*(from|import) {m}\b", code, re.M)]


@pytest.mark.parametrize("block", _params("python"))
def test_python_block_runs(tmp_path, block):
    _check_runnable(block)
    for module in _needs(block.code):
        pytest.importorskip(module)
    _page_files(block, tmp_path)
    given = GIVEN if "given" in block.directive else ""
    env = base_env()
    env.update(PYTHONPATH="", HF_HUB_OFFLINE="1", SNIPPET_PORT=str(free_port()))
    script = tmp_path / ("train.py" if "launcher" in block.directive else "snippet.py")
    if "launcher" in block.directive:
        script.write_text(NO_SHM_OP + given + f"# {block.page}, line {block.line}\n" + block.code, encoding="utf-8")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(script)]
    else:
        script.write_text(PRELUDE + NO_SHM_OP + given + f"# {block.page}, line {block.line}\n" + block.code,
                          encoding="utf-8")
        cmd = [sys.executable, str(script)]
    _run(cmd, env, timeout=300, cwd=tmp_path)


def _commands(code: str) -> List[str]:
    out, current = [], ""
    for raw in code.splitlines():
        line = raw.rstrip()
        if current:
            current += "\n" + line
        elif line.strip() and not line.lstrip().startswith("#"):
            current = line
        else:
            continue
        if not current.endswith("\\"):
            out.append(current)
            current = ""
    return out


def _mirror(tmp_path: Path) -> Path:
    """A directory that looks like the checkout (every top-level entry linked) without its outputs."""
    work = tmp_path / "checkout"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name in ("runs", ".git", "__pycache__", ".pytest_cache"):
            continue
        if entry.name == "benchmarks":  # its results/ is where benchmark and study commands write
            (work / "benchmarks" / "results").mkdir(parents=True)
            for sub in entry.iterdir():
                if sub.name != "results":
                    (work / "benchmarks" / sub.name).symlink_to(sub)
            continue
        (work / entry.name).symlink_to(entry)
    return work


@pytest.mark.parametrize("block", _params("bash"))
def test_shell_block_runs(tmp_path, block):
    _check_runnable(block)
    work = _mirror(tmp_path)
    env = base_env()
    env["PATH"] = os.pathsep.join([str(ROOT / ".venv" / "bin"), env.get("PATH", "")])
    env.pop("PYTHONPATH", None)
    commands = _commands(block.code)
    if block.directive.get("args"):
        commands = [_TRAILING_COMMENT.sub("", c) + " " + block.directive["args"] for c in commands]
    script = "set -euxo pipefail\n" + "\n".join(commands)  # one shell: `source` and `cd` carry over
    try:
        proc = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True,
                              timeout=300 * len(commands))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{block.page}:{block.line}: timed out:\n{script}") from None
    assert proc.returncode == 0, (f"{block.page}:{block.line}: exit {proc.returncode}\n--- stdout\n"
                                  f"{proc.stdout[-4000:]}\n--- stderr (commands after +)\n{proc.stderr[-4000:]}")


@pytest.mark.parametrize("block", _params("json"))
def test_json_block_parses(block):
    import json

    if "file" in block.directive or block.code.lstrip().startswith("{"):
        json.loads(re.sub(r"^\s*//.*$", "", block.code, flags=re.M))
