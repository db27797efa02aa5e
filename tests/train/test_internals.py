"""train/internals.py is the one list of private DeepSpeed/megatron/torch touch points."""

from __future__ import annotations

import re
from pathlib import Path

from train import internals

REPO = Path(__file__).resolve().parents[2]
# private names that only train/internals.py may use (train/parallelize.py's are moved there by its
# own change; its file is left out here until then)
PRIVATE = re.compile(
    r"\._hp_mapping\b|\bds_tensor\b|_lazy_init_hp_params_optimizer_state|_hp_optimizer_states_linked|"
    r"fp32_partitioned_groups_flat|\.global_steps\s*=|\b_set_cuda_rng_state\b|\bbuild_shm_op\b|"
    r"\b_create_(read|write)_items\b|\bdefault_pg(_nccl)?_timeout\b|\.update_lp_params\(|getattr\([^)]*_global_grad_norm"
)
CHECKED = ["train/parallel_engine.py", "train/engine_state.py", "train/checkpoint.py", "train/trainer.py",
           "train/distributed.py", "train/cpu_shim.py", "train/local_engine.py", "train/guards.py"]


def test_no_private_touch_point_outside_internals():
    for rel in CHECKED:
        code = "\n".join(line for line in (REPO / rel).read_text().splitlines() if not line.lstrip().startswith("#"))
        code = re.sub(r'"""(.|\n)*?"""', "", code)  # docstrings may name them
        found = PRIVATE.search(code)
        assert found is None, f"{rel} touches {found.group(0)!r}; move it into train/internals.py"


def test_every_touch_point_says_why_and_which_version():
    for name in dir(internals):
        fn = getattr(internals, name)
        if callable(fn) and getattr(fn, "__module__", None) == internals.__name__:
            doc = fn.__doc__ or ""
            assert re.search(r"\b(why|because|reason)\b", doc, re.I), f"{name}: no reason"
            assert re.search(r"\b\d+\.\d+(\.\d+)?\b", doc), f"{name}: no version checked"
    for where, what, why, checked in internals.STAYS_IN_PLACE:
        assert (REPO / where).is_file(), where
        assert what and why and re.search(r"\d+\.\d+", checked)
