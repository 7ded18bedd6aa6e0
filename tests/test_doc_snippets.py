"""Every ```python block of the docs pages listed in PAGES runs, as written, each in a fresh process.

The process stands in for a one-rank launcher (RANK/WORLD_SIZE/MASTER_* set, DeepSpeed on the CPU accelerator,
DeepSpeed's inference-only shm op not JIT-built), runs in an empty directory, and keeps the checkout root off
``sys.path`` (as for an installed package). Add a page to PAGES to put its snippets under test.
"""
import re
import sys
from pathlib import Path

import pytest

from dist_harness import ROOT, _run, base_env, free_port

PAGES = ["docs/integrations.md", "docs/migrating.md"]

_BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)

PRELUDE = """\
import os
for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=os.environ["SNIPPET_PORT"]).items():
    os.environ.setdefault(key, value)
try:
    import deepspeed
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
except ImportError:
    pass
"""


def snippets():
    found = []
    for page in PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        for index, match in enumerate(_BLOCK.finditer(text)):
            line = text.count("\n", 0, match.start()) + 2
            found.append(pytest.param(page, line, match.group(1), id=f"{Path(page).name}:{line}"))
    return found


def _needs(code):
    return [m for m in ("transformers", "accelerate", "lightning", "deepspeed", "tensorboard")
            if re.search(rf"^\s*(from|import) {m}\b", code, re.M)]


def test_every_page_has_snippets():
    pages = {p.values[0] for p in snippets()}
    assert pages == set(PAGES)


@pytest.mark.parametrize("page, line, code", snippets())
def test_snippet_runs(tmp_path, page, line, code):
    for module in _needs(code):
        pytest.importorskip(module)
    script = tmp_path / "snippet.py"
    script.write_text(PRELUDE + f"# {page}, line {line}\n" + code, encoding="utf-8")
    env = base_env()
    env.update(PYTHONPATH="", HF_HUB_OFFLINE="1", SNIPPET_PORT=str(free_port()))
    _run([sys.executable, str(script)], env, timeout=300, cwd=tmp_path)
