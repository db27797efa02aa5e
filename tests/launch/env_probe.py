"""A stand-in training module for launcher tests: ``LAUNCH_MODULE=tests.launch.env_probe`` makes
every rank write the environment variables the launchers are meant to pass through to
``$PROBE_OUT/rank<RANK>.json`` and exit 0."""

import json
import os
import sys
from pathlib import Path

KEYS = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_IB_HCA", "CUDA_DEVICE_MAX_CONNECTIONS", "OMP_NUM_THREADS")

if __name__ == "__main__":
    out = Path(os.environ["PROBE_OUT"])
    values = {k: os.environ.get(k) for k in KEYS}
    values["argv"] = sys.argv[1:]
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(values))
