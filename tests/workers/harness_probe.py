"""A rank that misbehaves on purpose, for the harness's own tests (no torch.distributed).

Usage: harness_probe.py --fail-rank R [--sleep S] [--spam BYTES] [--port-taken-once MARKER]
"""
import argparse
import os
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--fail-rank", type=int, default=-1)
ap.add_argument("--sleep", type=float, default=0.0)
ap.add_argument("--spam", type=int, default=0, help="write this many bytes of output first (more than a pipe holds)")
ap.add_argument("--port-taken-once", default=None, help="fail as a taken rendezvous port would, once per marker")
args = ap.parse_args()
rank = int(os.environ["RANK"])
sys.stdout.write("x" * args.spam + "\n")
if args.port_taken_once and not os.path.exists(args.port_taken_once):
    if rank == 0:
        open(args.port_taken_once, "w").close()
        print("DistNetworkError: port: 1234, code: -98, name: EADDRINUSE, message: address already in use")
        sys.exit(1)
    time.sleep(60)  # the other rank waits for a rendezvous that never comes
if rank == args.fail_rank:
    print(f"rank {rank} failing on purpose", flush=True)
    sys.exit(3)
time.sleep(args.sleep)
print(f"rank {rank} done", flush=True)
