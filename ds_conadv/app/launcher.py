"""``python -m ds_conadv.app.launcher``: ``torch.distributed.run`` for ``ds-conadv train --nproc N``, quiet.

The same launcher, with its own failure report (a ``ChildFailedError`` traceback and the elastic agent's log
lines) left out unless ``DS_CONADV_DEBUG=1``: the wrapper reports the failing rank's one-line error instead.
"""
from __future__ import annotations

import logging
import os
import sys


def main() -> int:
    from ds_conadv.app.reliability import set_parent_death_signal

    set_parent_death_signal()  # again (the wrapper's preexec set it too): the launcher never outlives it
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    debug = os.environ.get("DS_CONADV_DEBUG") == "1"
    if not debug:
        os.environ.setdefault("LOGLEVEL", "ERROR")
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun.main(sys.argv[1:])
    except ChildFailedError:
        if debug:
            raise
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
