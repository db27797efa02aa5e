"""The GPU path on a CPU machine (issue 15).

- Collectives under a cuda-only backend map: ``init_distributed(use_cuda=True)`` runs against
  torch's fake process group with the device map it asks for (every backend replaced by "fake",
  the device types kept), so a collective on a CPU tensor raises "No backend type associated
  with device type cpu" exactly where NCCL would. The trainer's and the engine's collectives and
  megatron's groups must work there.
- Random-length steps under TP2 + sequence parallelism (``train.random_length_prob=1``).
- Meta-device construction: the stage is allocated once, in the training dtype, with the values
  of the layout-independent init.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from tests.conftest import REPO, tiny_model_config


@pytest.fixture
def fake_world(monkeypatch):
    """``dist.init_process_group`` replaced by torch's fake group (world 4, rank 0) with the same
    device -> backend map as the backend string it is called with."""
    from torch.distributed.distributed_c10d import Backend, BackendConfig
    from torch.testing._internal.distributed.fake_pg import FakeStore

    real_init = dist.init_process_group
    seen = []

    def init(backend=None, **kwargs):
        devices = BackendConfig(Backend(backend)).get_device_backend_map()
        seen.append(backend)
        fake = ",".join(f"{d}:fake" for d in devices)
        real_init(fake, store=FakeStore(), rank=0, world_size=4, timeout=kwargs.get("timeout") or None)

    monkeypatch.setattr(dist, "init_process_group", init)
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="4", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(key, value)
    yield seen
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _trainer_stub(device: torch.device):
    from train.config import load_config
    from train.trainer import Trainer, objective_of

    trainer = Trainer.__new__(Trainer)
    trainer.cfg = load_config(REPO / "configs" / "demo.yaml", ["train.seq_len=16", "train.global_batch_size=4",
                                                             "train.micro_batch_size=2"], check_paths=False)
    trainer.device = device
    trainer.stop_signal = None
    t = trainer.cfg.train
    trainer.objective = objective_of(t, trainer.cfg.model.mask_token_id, 1)
    batch = {"input_ids": torch.randint(0, 100, (2, t.seq_len)), "sample_index": torch.arange(2)}
    trainer.val_loader = SimpleNamespace(batch=lambda k: batch)
    trainer.engine = SimpleNamespace(eval_loss=lambda mbs: torch.ones(sum(mb.input_ids.shape[0] for mb in mbs)))
    trainer.cfg.eval.batches = 2
    return trainer


def test_collectives_work_under_a_cuda_only_backend_map(fake_world):
    from train.guards import GuardConfig, StepGuard
    from train.layout import ParallelConfig, ParallelLayout
    from train.distributed import init_distributed
    from train.parallel_engine import ParallelEngine, _GateContext
    from train.parallelize import global_grad_norm

    init_distributed(use_cuda=True)
    assert fake_world, "init_distributed did not create the process group"
    layout = ParallelLayout.from_config(ParallelConfig(tp=2, pp=2), 4, tiny_model_config(), 1, 4)
    layout.initialize_process_groups(60.0)  # megatron's groups inherit the default group's map

    cpu = torch.device("cpu")
    trainer = _trainer_stub(cpu)
    buckets = trainer._bucket_losses(torch.rand(2), torch.rand(2), 16)
    assert len(buckets) == trainer.cfg.logging.t_buckets
    assert trainer.evaluate() == pytest.approx(1 / 16)
    assert trainer._stop_requested() is False

    engine = ParallelEngine.__new__(ParallelEngine)
    engine.pm = SimpleNamespace(loss=SimpleNamespace(losses=[torch.tensor(1.0, dtype=torch.float64)], rows=[torch.ones(2)]))
    engine.layout, engine.dp_size, engine.device = layout, 1, cpu
    engine.engine = SimpleNamespace(optimizer=SimpleNamespace(_global_grad_norm=1.0))
    total, rows = engine._gather_results(2, reduce_dp=True)
    assert total == 1.0 and rows.tolist() == [1.0, 1.0]
    gate = StepGuard(GuardConfig()).gate(torch.rand(2), judge_spikes=True)
    ctx = _GateContext(gate, 2, torch.full((2,), 0.5))
    engine.dp_size = 2
    engine._decide(ctx)
    assert ctx.decided and ctx.reason is None

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    assert float(global_grad_norm([p])) == pytest.approx(3**0.5)


def test_the_gpu_backend_serves_cpu_and_cuda_tensors():
    from torch.distributed.distributed_c10d import Backend, BackendConfig

    from train.distributed import process_group_backend

    assert BackendConfig(Backend(process_group_backend(True))).get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}
    assert process_group_backend(False) == "gloo"


# ----- random-length steps under sequence parallelism ---------------------------------------------
def test_random_length_rounds_to_a_multiple():
    from model.objective import random_length

    lengths = [random_length(0, s, 64, 1.0, multiple_of=4) for s in range(500)]
    assert all(n % 4 == 0 and 4 <= n <= 64 for n in lengths)
    assert len(set(lengths)) > 8
    # the draw is the same, only rounded down
    assert lengths == [max(4, n - n % 4) for n in (random_length(0, s, 64, 1.0) for s in range(500))]
    assert random_length(0, 3, 64, 0.0, multiple_of=4) == 64
    with pytest.raises(ValueError):
        random_length(0, 3, 64, 1.0, multiple_of=0)


@pytest.mark.slow
def test_tp2_sequence_parallel_trains_random_length_steps(tmp_path, embedded_shards):
    from tests.train.test_main import OVERRIDES

    out = tmp_path / "tp2sp"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "train", str(REPO / "configs" / "demo.yaml"), *OVERRIDES, "train.max_steps=3",
        f"train.out_dir={out}", f"data.sources=[{{path: {embedded_shards}}}]",
        "parallel.tp=2", "parallel.sequence_parallel=true", "train.random_length_prob=1",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lengths = [r["seq_len"] for r in records]
    assert len(lengths) == 3 and all(n % 2 == 0 and n < 32 for n in lengths), lengths
    assert all(r["loss"] == r["loss"] for r in records)  # finite, not NaN


# ----- meta-device construction -------------------------------------------------------------------
@pytest.fixture
def world_of_one(monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    from train.distributed import init_distributed

    init_distributed(use_cuda=False)
    yield
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    dist.destroy_process_group()


def test_stage_is_allocated_once_in_the_training_dtype(world_of_one):
    """Every byte the construction allocates is one of the stage's parameters (in bf16) or one
    full fp32 tensor being drawn; the values equal the single-device init, cast to bf16."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from model.llada import build_model
    from train.layout import ParallelConfig, ParallelLayout
    from train.parallelize import build_stage

    config = tiny_model_config(n_layers=2)
    layout = ParallelLayout.from_config(ParallelConfig(), 1, config, 1, 1)
    layout.initialize_process_groups()

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided):
                if out.device.type == "cpu":
                    self.sizes.append((out.dtype, out.numel()))
            return out

    with Allocations() as mode:
        module, layers = build_stage(config, layout, seed=3, dtype=torch.bfloat16, device=torch.device("cpu"))
    params = list(module.parameters())
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in params)
    allocated = [(dt, n) for dt, n in mode.sizes]
    # the stage itself: exactly its parameters, in bf16, allocated once
    assert sorted(n for dt, n in allocated if dt == torch.bfloat16) == sorted(p.numel() for p in params)
    largest = max(p.numel() for p in params)
    assert all(n <= largest for dt, n in allocated)  # no full-model buffer, only one tensor at a time
    reference = build_model(config, seed=3).state_dict()
    got = {name: p for layer in layers for name, p in layer.full_named_parameters()}
    assert set(got) == set(reference)
    for name, p in got.items():
        assert torch.equal(p, reference[name].to(torch.bfloat16)), name
