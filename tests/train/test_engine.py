"""The engine interface (``train.engine.Engine``): both engines have every member, with the same
parameters, and the trainer reads nothing of an engine outside it."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

from model.llada import build_model
from tests.conftest import tiny_model_config
from train.engine import Engine
from train.local_engine import LocalEngine
from train.parallel_engine import ParallelEngine

REPO = Path(__file__).resolve().parents[2]
METHODS = sorted(n for n, v in vars(Engine).items() if inspect.isfunction(v) and not n.startswith("_"))
ATTRIBUTES = sorted(Engine.__annotations__)


def test_the_protocol_lists_what_the_trainer_uses():
    assert set(ATTRIBUTES) == {"device", "dp_rank", "dp_size", "is_logging_rank", "sequence_multiple"}
    assert {"train_step", "eval_loss", "checkpoint_state", "finish_checkpoint_load", "close"} <= set(METHODS)


@pytest.mark.parametrize("cls", [LocalEngine, ParallelEngine], ids=lambda c: c.__name__)
def test_engine_has_every_method_with_the_protocols_parameters(cls):
    for name in METHODS:
        impl = getattr(cls, name, None)
        assert impl is not None and inspect.isfunction(impl), f"{cls.__name__} lacks {name}()"
        want = [(p.name, p.kind, p.default) for p in inspect.signature(getattr(Engine, name)).parameters.values()]
        got = [(p.name, p.kind, p.default) for p in inspect.signature(impl).parameters.values()]
        assert got == want, f"{cls.__name__}.{name}{inspect.signature(impl)} differs from Engine.{name}"


@pytest.mark.parametrize("cls", [LocalEngine, ParallelEngine], ids=lambda c: c.__name__)
def test_engine_sets_every_attribute(cls):
    source = inspect.getsource(cls)
    for name in ATTRIBUTES:
        in_class = name in vars(cls)
        in_init = re.search(rf"\bself\.{name}\s*=", source) is not None
        assert in_class or in_init, f"{cls.__name__} never sets {name}"


def test_a_local_engine_is_an_engine():
    engine = LocalEngine(
        build_model(tiny_model_config(), seed=0), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8,
        grad_clip=1.0, precision="fp32", device=torch.device("cpu"),
    )
    assert isinstance(engine, Engine)
    assert (engine.dp_rank, engine.dp_size, engine.is_logging_rank, engine.sequence_multiple) == (0, 1, True, 1)
    engine.close()


def test_nothing_outside_an_engine_reads_it_by_getattr():
    for path in [REPO / "train" / "trainer.py", REPO / "train" / "checkpoint.py", *sorted((REPO / "tools").rglob("*.py"))]:
        text = path.read_text()
        assert not re.search(r"getattr\(\s*(self\.)?engine\b", text), f"{path} reads the engine by getattr"
