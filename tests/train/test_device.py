"""train/device.py: device resolution, per-block ``torch.compile``, micro-batch transfers (on CPU)."""

from __future__ import annotations

import pytest
import torch

from model.llada import build_model
from tests.conftest import tiny_model_config
from train.device import compile_blocks, resolve_device, to_device
from train.engine import MicroBatch


def test_resolve_device_names_the_setting():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device=cuda but no CUDA device"):
            resolve_device("cuda", "--device")


@pytest.mark.slow
def test_compile_blocks_keeps_names_and_outputs():
    cfg = tiny_model_config()
    eager = build_model(cfg, seed=0)
    compiled = compile_blocks(build_model(cfg, seed=0))
    assert list(compiled.state_dict()) == list(eager.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    a, b = eager(ids), compiled(ids)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    a.float().square().mean().backward()
    b.float().square().mean().backward()
    for (name, pa), (_, pb) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-4, rtol=1e-3), name


def test_compile_blocks_rejects_other_modules():
    with pytest.raises(ValueError, match="transformer.blocks"):
        compile_blocks(torch.nn.Linear(2, 2))


def test_to_device_is_a_no_op_on_cpu():
    mb = MicroBatch(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long),
                    torch.zeros(2, 4, dtype=torch.bool), torch.ones(2), torch.ones(2))
    assert to_device(mb, "cpu") is mb
    batch = {"x": torch.ones(3)}
    assert to_device(batch, torch.device("cpu")) is batch
