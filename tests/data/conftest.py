"""Fixtures for the data tests: a small tokenizer and small synthetic corpora."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from data.corpus import train_tokenizer

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega def return class import from self None True").split()


def make_docs(n: int, seed: int = 0, min_words: int = 5, max_words: int = 80) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> str:
    """A byte-level BPE (vocab 512) trained on a slice of the embedded corpus, with a chat template."""
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer(out, vocab_size=512, max_bytes=300_000, train_bytes=300_000)


@pytest.fixture(scope="session")
def docs() -> list[str]:
    return make_docs(400)


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, small_tokenizer, docs) -> Path:
    """400 synthetic documents prepared into several small shards."""
    from data.prepare import prepare

    root = tmp_path_factory.mktemp("shards")
    src = write_jsonl(root / "docs.jsonl", [{"text": d} for d in docs])
    out = root / "out"
    prepare([str(src)], str(out), tokenizer=small_tokenizer, shard_tokens=4000, progress=False)
    return out
