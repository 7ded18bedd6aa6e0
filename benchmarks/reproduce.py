"""The reproduction study (docs/reproduction.md): ``python benchmarks/reproduce.py [--quick] [--jobs 2] ...``.

A thin entry to :func:`ds_conadv.study.runner.main` (also ``python -m ds_conadv.study``). Resumable: finished runs
are JSON files under benchmarks/results/study/records/ and are skipped on a rerun; the summary is
benchmarks/results/reproduce.json and the plots docs/img/reproduce_*.png.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ds_conadv.study.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
