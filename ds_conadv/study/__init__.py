"""The reproduction study: tasks with a large-batch generalisation gap, the regimes that try to close it (LARS,
LAMB, DisAdv, ConAdv, ABSA), and a resumable runner (``python -m ds_conadv.study``). See docs/reproduction.md."""
from .tasks import TASKS, Task, make_task

__all__ = ["TASKS", "Task", "make_task", "main"]


def main(argv=None) -> int:
    from .runner import main as _main
    return _main(argv)
