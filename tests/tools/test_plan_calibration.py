"""The planner's memory terms against measurements of the real engine (issue 15).

- Activations: one parallel ``TransformerLayer`` (train.parallelize) at the full LLaDA-8B shape on
  the meta device, bf16, run forward under ``saved_tensors_hooks``; the bytes of the distinct
  storages it keeps for backward (parameters excluded) are compared with
  ``tools.plan.block_activation_bytes`` for every activation-checkpointing mode, at TP1 and at
  TP2 with sequence parallelism (torch's fake process group; attention replaced by a function that
  keeps what FlashAttention keeps: q, k, v, the output and an fp32 log-sum-exp).
- Head and loss: ``HeadLayer`` + ``MaskedDiffusionLoss`` on real CPU tensors (every position
  masked, LLaDA's vocabulary); every byte allocated during their forward is an upper bound of
  their peak and is compared with ``tools.plan.logits_bytes``.
- Model states: the bytes per parameter of each DeepSpeed path, measured on gloo at two model
  sizes by ``tests/train/memory_worker.py``, against ``tools.plan.model_state_bytes``.
Each planner term must be within 10 % of its measurement.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

from model.config import ModelConfig
from tools import plan

TOLERANCE = 0.10
S, B = 4096, 1


@pytest.fixture(scope="module")
def fake_tp_world():
    """A fake world of 2 ranks whose groups serve meta and CPU tensors (collectives are no-ops)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from train import cpu_shim

    cpu_shim.apply()
    dist.init_process_group("meta:fake,cpu:fake", store=FakeStore(), rank=0, world_size=2)
    yield
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    dist.destroy_process_group()


def _tp_groups(tp: int) -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, create_gloo_process_groups=False)


class _FlashLike(torch.autograd.Function):
    """Keeps what FlashAttention keeps for backward: q, k, v, out ([b, s, h, d] in memory) and an
    fp32 log-sum-exp [b, h, s]."""

    @staticmethod
    def forward(ctx, q, k, v):
        b, h, s, d = q.shape
        out = torch.empty(b, s, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
        lse = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - never run
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def saved_bytes(fn, exclude: set[int]) -> int:
    """Bytes of the distinct storages that autograd keeps while ``fn()`` runs (``exclude``:
    storages not to count, e.g. the parameters)."""
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in exclude:
            saved[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(saved.values())


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
@pytest.mark.parametrize("tp", [1, 2])
def test_block_activations_match_the_planner(fake_tp_world, monkeypatch, tp, mode):
    import model.llada as llada
    import train.parallelize as P

    _tp_groups(tp)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: torch.device("meta"))  # megatron's SP buffers
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: contextlib.nullcontext())  # no autocast on meta
    monkeypatch.setattr(llada, "attention", lambda q, k, v, mask, backend="auto": _FlashLike.apply(q, k, v))
    cfg = ModelConfig()  # LLaDA-8B
    opts = P.LayerOptions(model=cfg, tp=tp, sequence_parallel=tp > 1, activation_checkpointing=mode,
                          attention_backend="auto", use_cpu_initialization=True, params_dtype=torch.bfloat16)
    with torch.device("meta"):
        layer = P.TransformerLayer(opts, 0).bfloat16()
    x = torch.empty(S // tp, B, cfg.d_model, device="meta", dtype=torch.bfloat16, requires_grad=True)
    params = {p.untyped_storage()._cdata for p in layer.parameters()}
    measured = saved_bytes(lambda: layer(x), params)
    predicted = plan.block_activation_bytes(cfg, S, B, tp, mode)
    assert predicted == pytest.approx(measured, rel=TOLERANCE), (measured / (S * B * cfg.d_model), mode, tp)


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of every new storage that ops create (an upper bound of the peak they add)."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                self.storages.setdefault(st.data_ptr(), st.nbytes())
        return out


@pytest.mark.parametrize("tp", [1, 2])
def test_head_and_loss_match_the_planner(fake_tp_world, tp):
    import train.parallelize as P

    _tp_groups(tp)
    s, d = 256, 256  # the head's memory is s·b·V/tp logits; d only adds s·b·d terms
    cfg = ModelConfig(d_model=d, n_heads=4, n_kv_heads=4)  # LLaDA's vocabulary (126,464)
    opts = P.LayerOptions(model=cfg, tp=tp, sequence_parallel=tp > 1, activation_checkpointing="none",
                          attention_backend="auto", use_cpu_initialization=True, params_dtype=torch.bfloat16)
    head = P.HeadLayer(opts).bfloat16()
    loss = P.MaskedDiffusionLoss()
    x = torch.randn(s // tp, B, d, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, cfg.vocab_size, (B, s))
    labels = (targets, torch.ones(B, s, dtype=torch.bool), torch.ones(B), torch.ones(B))
    with _Allocations() as mode:
        loss(head(x), labels)
    measured = sum(mode.storages.values())
    predicted = plan.logits_bytes(s, B, cfg.embedding_size, tp)
    assert predicted == pytest.approx(measured, rel=TOLERANCE), (measured / (s * B * cfg.embedding_size / tp), tp)


# ----- model states: DeepSpeed's paths on gloo -----------------------------------------------------
TWO_RANK_PATHS = ["z0_fp32", "z1_fp32", "z3_fp32", "z0_bf16", "z1_bf16", "z2_bf16", "z3_bf16", "z1_bf16_pp2"]
FOUR_RANK_PATHS = ["z1_fp32", "z1_bf16", "z2_bf16", "z3_bf16"]  # the 1/dp share, at dp 4


def _check_paths(result: dict, world: int) -> None:
    import re

    for case, got in result.items():
        assert "error" not in got, f"{case}: {got['error']}"
        zero, precision, pp = re.fullmatch(r"z(\d)_(fp32|bf16)(?:_pp(\d))?", case).groups()
        dp = world // int(pp or 1)
        predicted = sum(plan.model_state_bytes(1.0, int(zero), dp, precision).values())
        assert predicted == pytest.approx(got["bytes_per_param"], rel=TOLERANCE), (case, dp, got)


@pytest.mark.slow
@pytest.mark.parametrize("world, paths", [(2, TWO_RANK_PATHS), (4, FOUR_RANK_PATHS)])
def test_deepspeed_bytes_per_param_match_the_planner(tmp_path, world, paths):
    from tests.train.test_parallel_engine import launch_worker

    _check_paths(launch_worker("memory_worker.py", world, paths, tmp_path), world)
