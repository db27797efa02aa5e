"""Same seed, same data, same samples: the loader's sample sequence on fixed corpora equals the one
recorded (``golden_sequence.json``) with the loader as it was before the cached memory-mapped index
(commit 65b9dff). Recorded with ``python -m tests.data.test_sample_sequence --record``.

Each case hashes every batch (``input_ids``, ``sample_index``, ``prompt_lengths``) of several steps,
over mixtures, epochs, both splits, several dp layouts, SFT data and the tokenized test corpus.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from data.config import DataConfig, SourceConfig
from data.loader import build_loader
from tests.data.synthetic import random_lengths, write_shard_dir

GOLDEN = Path(__file__).with_name("golden_sequence.json")


def synthetic_corpora(root: Path) -> dict[str, Path]:
    root = Path(root)
    out = {
        "a": write_shard_dir(root / "a", random_lengths(5, 40, seed=1), seed=11),
        "b": write_shard_dir(root / "b", random_lengths(3, 25, seed=2, lo=1, hi=200), seed=12),
        "c": write_shard_dir(root / "c", random_lengths(2, 80, seed=3), seed=13, vocab_size=70000),
    }
    lengths = random_lengths(2, 30, seed=4, lo=4, hi=40)
    plens = [np.maximum(1, n // 3) for n in lengths]
    out["sft"] = write_shard_dir(root / "sft", lengths, seed=14, kind="sft", prompt_lengths=plens)
    return out


CASES = {
    # name: (sources, weights, data kwargs, loader kwargs, steps)
    "mix3_train": (["a", "b", "c"], [0.5, 0.3, 0.2], {"mixture_block_size": 100, "validation_fraction": 0.05},
                   {"seq_len": 16, "global_batch_size": 12, "seed": 7}, 60),
    "mix3_validation": (["a", "b", "c"], [0.5, 0.3, 0.2], {"mixture_block_size": 100, "validation_fraction": 0.05},
                        {"seq_len": 16, "global_batch_size": 12, "seed": 7, "split": "validation"}, 10),
    "one_source_no_holdout": (["b"], [1.0], {"validation_fraction": 0.0}, {"seq_len": 64, "global_batch_size": 4, "seed": 3}, 40),
    "one_source_default": (["a"], [1.0], {}, {"seq_len": 24, "global_batch_size": 8, "seed": 0}, 50),
    "sft_train": (["sft"], [1.0], {"validation_fraction": 0.1}, {"seq_len": 32, "global_batch_size": 4, "seed": 5}, 30),
    "sft_validation": (["sft"], [1.0], {"validation_fraction": 0.1}, {"seq_len": 32, "global_batch_size": 2, "seed": 5, "split": "validation"}, 5),
    "mix2_sft_heavy_block": (["a", "c"], [1.0, 3.0], {"mixture_block_size": 7, "validation_fraction": 0.02},
                             {"seq_len": 8, "global_batch_size": 6, "seed": 9}, 40),
}


def sequence_digest(paths: list, weights: list, data_kw: dict, loader_kw: dict, steps: int, dp: int = 1) -> dict:
    cfg = DataConfig(sources=[SourceConfig(path=str(p), weight=w) for p, w in zip(paths, weights)], verify_checksums=True, **data_kw)
    loaders = [build_loader(cfg, dp_rank=r, dp_size=dp, **loader_kw) for r in range(dp)]
    h = hashlib.sha256()
    for step in range(steps):
        parts = [ld.batch(step) for ld in loaders]
        for key in ("input_ids", "sample_index", "prompt_lengths"):
            if key in parts[0]:
                h.update(key.encode())
                h.update(np.concatenate([b[key].numpy() for b in parts]).astype("<i8").tobytes())
    return {"samples": loaders[0].num_samples(), "sha256": h.hexdigest()}


def compute_all(tmp: Path, shard_dir: Path | None) -> dict:
    corpora = synthetic_corpora(tmp)
    out = {}
    for name, (srcs, weights, data_kw, loader_kw, steps) in CASES.items():
        out[name] = sequence_digest([corpora[s] for s in srcs], weights, data_kw, loader_kw, steps)
    if shard_dir is not None:
        out["test_corpus_train"] = sequence_digest([shard_dir], [1.0], {}, {"seq_len": 32, "global_batch_size": 8, "seed": 0}, 40)
        out["test_corpus_validation"] = sequence_digest([shard_dir], [1.0], {"validation_fraction": 0.1},
                                                        {"seq_len": 32, "global_batch_size": 8, "seed": 0, "split": "validation"}, 5)
    return out


def test_sample_sequence_equals_the_recorded_one(tmp_path, shard_dir):
    golden = json.loads(GOLDEN.read_text())
    got = compute_all(tmp_path, shard_dir)
    assert set(got) == set(golden["cases"])
    for name in golden["cases"]:
        assert got[name] == golden["cases"][name], name


@pytest.mark.parametrize("dp", [4])  # dp=2 took the same path (every rank a slice of the global batch)
def test_sample_sequence_is_the_same_for_every_dp(tmp_path, dp):
    golden = json.loads(GOLDEN.read_text())["cases"]["mix3_train"]
    corpora = synthetic_corpora(tmp_path)
    srcs, weights, data_kw, loader_kw, steps = CASES["mix3_train"]
    # dp ranks' slices concatenated per step are the global batch: the same digest as dp=1
    assert sequence_digest([corpora[s] for s in srcs], weights, data_kw, loader_kw, steps, dp=dp) == golden


if __name__ == "__main__":  # record (only on the reference loader)
    import tempfile

    from data.corpus import train_tokenizer
    from data.prepare import prepare
    from tests.data.conftest import make_docs, write_jsonl

    assert "--record" in sys.argv, "pass --record to overwrite golden_sequence.json"
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        tok = train_tokenizer(d / "tok" / "tokenizer", vocab_size=512, max_bytes=300_000, train_bytes=300_000)
        src = write_jsonl(d / "docs.jsonl", [{"text": t} for t in make_docs(400)])
        prepare([str(src)], str(d / "out"), tokenizer=tok, shard_tokens=4000, progress=False)
        cases = compute_all(d / "synthetic", d / "out")
    GOLDEN.write_text(json.dumps({"recorded_with": "loader of commit 65b9dff", "cases": cases}, indent=1) + "\n")
    print(json.dumps(cases, indent=1))
