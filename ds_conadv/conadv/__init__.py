"""ConAdv: concurrent adversarial learning for large-batch training (Liu et al., ICLR 2022). See docs/conadv.md.

* :mod:`~ds_conadv.conadv.perturb` — FGSM / PGD from input gradients only (``generate``).
* :mod:`~ds_conadv.conadv.dual_bn` — AdvProp's adversarial BatchNorm twin (``convert_dual_bn``).
* :mod:`~ds_conadv.conadv.schedule` — the tau look-ahead, warm-up window and resumable state.
* :mod:`~ds_conadv.conadv.trainer` — the step as overridable hooks (``ConAdvTrainer``), single process.
"""
from ds_conadv.config import ConAdvConfig

from .dual_bn import (DualBatchNorm, convert_dual_bn, dual_bn_layers, frozen_bn_stats, has_plain_batchnorm,
                      use_adversarial_bn)
from .perturb import (adversarial_forward, embedding_perturbation, fgsm, generate, generation_mode, pgd,
                      random_wrong_labels)
from .schedule import ConAdvBatch, ConAdvSchedule, PendingBatch, split_batch
from .trainer import ConAdvTrainer, default_loss, prepare_model

__all__ = ["ConAdvConfig", "DualBatchNorm", "convert_dual_bn", "dual_bn_layers", "frozen_bn_stats",
           "has_plain_batchnorm", "use_adversarial_bn", "adversarial_forward", "embedding_perturbation", "fgsm",
           "generate", "generation_mode", "pgd", "random_wrong_labels", "ConAdvBatch", "ConAdvSchedule",
           "PendingBatch", "split_batch", "ConAdvTrainer", "default_loss", "prepare_model"]
