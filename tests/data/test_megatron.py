"""Megatron-LM indexed datasets (PREFIX.bin/PREFIX.idx) as loader sources, and
``python -m data.prepare --format megatron``."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from data.config import DataConfig, SourceConfig
from data.loader import build_loader
from data.prepare import main as prepare_main
from data.prepare import prepare
from tests.data.conftest import write_jsonl


def make(path, tokenizer, split="train", **kw):
    cfg = DataConfig(sources=[SourceConfig(path=str(path))], tokenizer=str(tokenizer), **kw)
    return build_loader(cfg, seq_len=32, global_batch_size=8, dp_rank=0, dp_size=1, seed=2, split=split)


@pytest.fixture(scope="module")
def both(tmp_path_factory, small_tokenizer, docs):
    """The same documents prepared as shards and, through the CLI, as a Megatron pair."""
    root = tmp_path_factory.mktemp("megatron")
    src = write_jsonl(root / "docs.jsonl", [{"text": d} for d in docs])
    prepare([str(src)], str(root / "shards"), tokenizer=small_tokenizer, shard_tokens=4000, progress=False)
    rc = prepare_main(["--format", "megatron", "--input", str(src), "--tokenizer", small_tokenizer,
                       "--output", str(root / "mg" / "corpus_text_document"), "--workers", "1", "--no-progress"])
    assert rc == 0
    return root / "shards", root / "mg" / "corpus_text_document"


def test_prepare_writes_what_megatron_core_reads(both, small_tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    shards, prefix = both
    ds = IndexedDataset(str(prefix))
    m = json.loads((shards / "manifest.json").read_text())
    assert len(ds) == m["total_documents"] and int(ds.sequence_lengths.sum()) == m["total_tokens"]
    assert ds.index.dtype == np.uint16
    stream = np.concatenate([np.fromfile(shards / f"{s['name']}.bin", dtype=m["dtype"]) for s in m["shards"]])
    assert np.array_equal(np.concatenate([ds[i] for i in range(len(ds))]), stream)  # EOS after each document too


def test_megatron_source_gives_the_same_samples(both, small_tokenizer):
    shards, prefix = both
    for split, frac in (("train", 0.01), ("validation", 0.1)):
        a = make(shards, small_tokenizer, split=split, validation_fraction=frac)
        b = make(prefix, small_tokenizer, split=split, validation_fraction=frac)
        assert a.num_samples() == b.num_samples()
        for step in range(12):
            assert torch.equal(a.batch(step)["input_ids"], b.batch(step)["input_ids"])
    mixed = build_loader(DataConfig(sources=[SourceConfig(path=str(shards)), SourceConfig(path=str(prefix), format="megatron")],
                                    tokenizer=small_tokenizer), seq_len=32, global_batch_size=8, dp_rank=0, dp_size=1, seed=2)
    assert mixed.batch(3)["input_ids"].shape == (8, 32)


def test_pair_from_megatron_core_builder_trains_with_the_same_tokens(tmp_path, shard_dir):
    """Written with megatron-core's IndexedDatasetBuilder directly (several sequences per document,
    as preprocess_data.py --split-sentences does): the same training losses as the shard directory."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from tests.train.test_trainer import small_run

    m = json.loads((shard_dir / "manifest.json").read_text())
    prefix = tmp_path / "built" / "text_document"
    prefix.parent.mkdir()
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for s in m["shards"]:
        tokens = np.fromfile(shard_dir / f"{s['name']}.bin", dtype=m["dtype"])
        offsets = np.fromfile(shard_dir / f"{s['name']}.idx", dtype="<i8")
        for lo, hi in zip(offsets[:-1], offsets[1:]):
            cut = lo + (hi - lo) // 2
            for a, b in ((lo, cut), (cut, hi)):  # two sentences
                if b > a:
                    builder.add_item(torch.from_numpy(tokens[a:b].astype(np.int64)))
            builder.end_document()
    builder.finalize(str(prefix) + ".idx")
    steps = ("train.max_steps=3", "train.checkpoint_every=0")
    ref = small_run(tmp_path / "a", shard_dir, *steps).fit()
    mg = small_run(tmp_path / "b", prefix, *steps, f"data.tokenizer={shard_dir / 'tokenizer'}").fit()
    assert [r["loss"] for r in ref] == [r["loss"] for r in mg]


def test_bad_megatron_pairs(both, small_tokenizer, tmp_path):
    _, prefix = both
    bad = tmp_path / "bad"
    idx, bin_ = (prefix.parent / (prefix.name + ".idx")).read_bytes(), (prefix.parent / (prefix.name + ".bin")).read_bytes()
    (tmp_path / "bad.bin").write_bytes(bin_[:-6])
    (tmp_path / "bad.idx").write_bytes(idx)
    with pytest.raises(ValueError, match=r"bad\.bin: \d+ bytes, but .*bad\.idx \(dtype uint16, \d+ sequences\) says \d+") as e:
        make(bad, small_tokenizer)
    assert "\n" not in str(e.value)
    # the .idx says int32 tokens (dtype code 4) but the .bin holds uint16 ones
    (tmp_path / "bad.bin").write_bytes(bin_)
    (tmp_path / "bad.idx").write_bytes(idx[:17] + struct.pack("<B", 4) + idx[18:])
    with pytest.raises(ValueError, match=r"bad\.bin: \d+ bytes, but .*bad\.idx \(dtype int32"):
        make(bad, small_tokenizer)
    (tmp_path / "bad.idx").write_bytes(b"not an index at all" * 3)
    with pytest.raises(ValueError, match=r"bad\.idx: not a readable Megatron indexed-dataset index"):
        make(bad, small_tokenizer)
    (tmp_path / "bad.idx").unlink()
    with pytest.raises(FileNotFoundError, match=r"bad\.idx: missing"):
        build_loader(
            DataConfig(sources=[SourceConfig(path=str(bad), format="megatron")], tokenizer=small_tokenizer),
            seq_len=32, global_batch_size=8, dp_rank=0, dp_size=1, seed=2)
    with pytest.raises(ValueError, match=r"Megatron dataset, which does not store its tokenizer: set data.tokenizer"):
        build_loader(DataConfig(sources=[SourceConfig(path=str(prefix))]), seq_len=32, global_batch_size=8, dp_rank=0, dp_size=1, seed=2)
