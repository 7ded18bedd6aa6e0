"""Old import path of the main job under ``horovodrun``: :mod:`ds_conadv.app.horovod_train`
(``python -m ds_conadv.integrations.horovod_train`` still runs it)."""
import sys

from ds_conadv.app.horovod_train import (_build_optimizer, _build_scheduler, _rank_stream, digits_cnn, digits_data,
                                         main, resolve_batch, train_horovod)

__all__ = ["train_horovod", "resolve_batch", "digits_data", "digits_cnn", "main", "_build_optimizer",
           "_build_scheduler", "_rank_stream"]

if __name__ == "__main__":
    sys.exit(main())
