"""torchrun worker: a rank that stops taking part in collectives makes the others fail with the
trainer's message after ``train.collective_timeout_s`` instead of hanging
(launched by tests/train/test_guards_multirank.py).

    python -m torch.distributed.run --standalone --nproc_per_node=2 timeout_worker.py OUT.json SHARDS RUN_DIR

Rank 1 sleeps through step 2; rank 0 writes ``{"message": ..., "seconds": ...}`` to OUT.json as
soon as its collective fails, then both ranks leave at once.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)

TIMEOUT_S = 5
SLEEP_S = 20


def main() -> int:
    out_path, shards, run_dir = sys.argv[1:4]
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*(CUDA_DEVICE_MAX_CONNECTIONS|Transformer Engine|Apex).*")
    from guard_worker import DEMO, OVERRIDES
    from train.config import load_config
    from train.trainer import Trainer

    overrides = OVERRIDES + [
        f"train.out_dir={run_dir}", f"data.sources=[{{path: {shards}}}]", "train.max_steps=4",
        "train.checkpoint_every=0", f"train.collective_timeout_s={TIMEOUT_S}",
    ]
    trainer = Trainer(load_config(DEMO, overrides))
    rank = int(os.environ["RANK"])
    original = trainer.train_step

    def train_step():
        if rank == 1 and trainer.step == 1:
            time.sleep(SLEEP_S)  # alive, but not in the collective: a hung rank
        return original()

    trainer.train_step = train_step
    start = time.monotonic()
    try:
        trainer.fit()
    except RuntimeError as e:
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({"message": str(e), "seconds": time.monotonic() - start}, f)
        os._exit(0)
    os._exit(3)  # fit must not end normally


if __name__ == "__main__":
    sys.exit(main())
