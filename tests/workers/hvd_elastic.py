"""An elastic ConAdv run under ``horovodrun --host-discovery-script``: rank 0 takes a worker away and brings it
back by rewriting the hosts file the discovery script prints; every rank logs its steps and writes its final
parameters.

Phases (decided by rank 0 only, committed with the state): 0 train at 2 ranks, then ask for 1 slot; 1 wait for
the reset to 1 rank; 2 train at 1 rank, then ask for 2 slots; 3 wait for the new worker; 4 train at 2 ranks,
then stop. Usage: hvd_elastic.py --hosts-file F --out PREFIX
"""
import argparse
import json
import time

import torch

import horovod.torch as hvd

from ds_conadv.conadv import prepare_model
from ds_conadv.config import ConAdvConfig
from ds_conadv.integrations.horovod import ElasticConAdvState, HorovodConAdvTrainer
from ds_conadv.optim import LARS

IN, HIDDEN, CLASSES, MICRO = 9, 17, 4, 8
STEPS_PER_PHASE, MAX_STEPS = 4, 1500  # MAX_STEPS: a safety stop (~90 s), far beyond a normal run


def stream(rank, size, start_step):
    """Rank ``rank`` of ``size``'s micro-batches from global step ``start_step`` on (a re-shardable stream)."""
    step = start_step
    while True:
        gen = torch.Generator().manual_seed(100_003 * step + rank)
        yield torch.randn(MICRO, IN, generator=gen), torch.randint(0, CLASSES, (MICRO,), generator=gen)
        step += 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts-file", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    hvd.init()
    torch.manual_seed(7)
    cfg = ConAdvConfig(enabled=True, tau=1, epsilon=0.2, attack="fgsm", dual_bn=True)
    model = prepare_model(torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.BatchNorm1d(HIDDEN),
                                              torch.nn.Tanh(), torch.nn.Linear(HIDDEN, CLASSES)), cfg)
    # broadcast=False: under hvd.elastic the state's sync() broadcasts (a worker that joins later must not run
    # an extra broadcast in its constructor that the running ranks would never match)
    trainer = HorovodConAdvTrainer(model, LARS(model.parameters(), lr=0.2, weight_decay=1e-3), cfg=cfg, seed=3,
                                   broadcast=False)
    state = ElasticConAdvState(trainer, phase=0, phase_step=0)
    log = []

    def ask_for(slots):
        with open(args.hosts_file, "w") as f:
            f.write(f"localhost:{slots}\n")

    @hvd.elastic.run
    def train(state):
        tr = state.trainer
        data = stream(hvd.rank(), hvd.size(), tr.global_step)
        while True:
            m = tr.train_batch(data)
            log.append({"global_step": tr.global_step, "size": hvd.size(), "rank": hvd.rank(),
                        "stale_by": m["stale_by"], "generated_now": m["generated_now"], "loss": m["loss"]})
            done = False
            if hvd.rank() == 0:
                gs, size = tr.global_step, hvd.size()
                if state.phase == 0 and gs >= STEPS_PER_PHASE:
                    ask_for(1)
                    state.phase = 1
                elif state.phase == 1 and size == 1:
                    state.phase, state.phase_step = 2, gs
                elif state.phase == 2 and gs - state.phase_step >= STEPS_PER_PHASE:
                    ask_for(2)
                    state.phase = 3
                elif state.phase == 3 and size == 2:
                    state.phase, state.phase_step = 4, gs
                elif state.phase == 4 and gs - state.phase_step >= STEPS_PER_PHASE:
                    done = True
                done = done or gs >= MAX_STEPS
            print(f"rank {hvd.rank()}/{hvd.size()} step {tr.global_step} phase {state.phase}", flush=True)
            done = hvd.broadcast_object(done, root_rank=0, name="done")
            state.commit()
            if done:
                return
            time.sleep(0.05)  # leave the discovery thread (1 s period) time to notice a change

    train(state)
    params = {n: p.detach().reshape(-1).tolist() for n, p in model.named_parameters()}
    json.dump({"rank": hvd.rank(), "size": hvd.size(), "phase": state.phase, "log": log, "params": params},
              open(f"{args.out}.rank{hvd.rank()}", "w"))


if __name__ == "__main__":
    main()
