"""Shared fixtures: the tiny model (tests/tiny.py), the embedded shards, a session-wide tiny training run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.config import ModelConfig
from tests.tiny import tiny_model as build_tiny_model
from tests.tiny import tiny_model_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_config() -> ModelConfig:
    """The shared tiny ModelConfig (tests/tiny.py)."""
    return tiny_model_config()


@pytest.fixture
def tiny_model():
    """A fresh tiny model built with seed 0 (tests/tiny.py); each test gets its own copy."""
    return build_tiny_model(seed=0)


def run_module(args: list[str], *, cwd: Path = REPO, timeout: int = 600, env: dict | None = None, check: bool = True):
    """Run ``python -m ...`` in a subprocess with the repo on the path; returns CompletedProcess."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def embedded_shards(tmp_path_factory) -> Path:
    """The embedded corpus prepared into token shards once per test session."""
    out = tmp_path_factory.mktemp("embedded") / "data"
    run_module(["-m", "data.prepare", "--input", "embedded", "--output", str(out)])
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, embedded_shards) -> Path:
    """A run directory of the tiny model trained for a few steps on the embedded corpus."""
    out = tmp_path_factory.mktemp("tiny_run")
    run_module([
        "-m", "train", str(REPO / "configs" / "demo.yaml"), "model=configs/model/tiny.yaml",
        f"train.out_dir={out}", "train.max_steps=20", "train.checkpoint_every=0",
        f"data.sources=[{{path: {embedded_shards}}}]", "logging.wandb=disabled",
        "logging.progress_bar=false", "eval.every=0",
    ])
    return out
