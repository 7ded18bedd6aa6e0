"""``ds-conadv train`` (either backend) with non-finite gradients injected — a test-only fault, the product has no
such switch — recording what every Horovod optimizer step left behind as JSON in ``PREFIX.rank{r}``.

    python tests/workers/job_nonfinite.py BAD_FROM PREFIX train ...
    horovodrun --gloo -np 2 -H localhost:2 python tests/workers/job_nonfinite.py BAD_FROM PREFIX train \
        --backend horovod ...

From the BAD_FROM-th backward of the process on (one backward per micro-batch), the classifier weight's gradient
is +inf (a tensor hook, before any reduction, so every rank sees inf); the loss stays finite. Under Horovod, after
each optimizer step the worker records a sha256 of the parameters and of the optimizer state.
"""
import hashlib
import json
import os
import sys

import torch

from ds_conadv import cli
from ds_conadv.app import horovod_train, train


def digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main():
    bad_from, prefix, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    backwards = [0]

    def poisoned(build):
        def build_with_fault(*args, **kwargs):
            model = build(*args, **kwargs)

            def poison(grad):
                backwards[0] += 1
                return torch.full_like(grad, float("inf")) if backwards[0] >= bad_from else grad

            model.classifier.weight.register_hook(poison)
            return model

        return build_with_fault

    train.DigitsCNN = poisoned(train.DigitsCNN)
    horovod_train.digits_cnn = poisoned(horovod_train.digits_cnn)
    steps = []
    if "horovod" in argv:
        from ds_conadv.integrations.horovod import HorovodConAdvTrainer

        plain_step = HorovodConAdvTrainer.optimizer_step

        def recorded_step(self):
            before = self.global_step
            plain_step(self)
            if self.global_step != before:
                state = self.optimizer.state_dict()["state"]
                steps.append({"step": self.global_step, "params": digest(self.model.parameters()),
                              "state": digest(v for k in sorted(state) for _, v in sorted(state[k].items())
                                              if torch.is_tensor(v))})

        HorovodConAdvTrainer.optimizer_step = recorded_step
    try:
        rc = cli.main(argv)
    except SystemExit as exc:
        rc = exc.code
    with open(f"{prefix}.rank{os.environ.get('HOROVOD_RANK', '0')}", "w", encoding="utf-8") as f:
        json.dump({"steps": steps, "rc": rc}, f)
    sys.exit(rc)


if __name__ == "__main__":
    main()
