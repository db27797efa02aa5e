"""The mixture loader: contract, packing, epochs, dp-invariance, mixtures, validation, resume, bad shards."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from data.config import DataConfig, SourceConfig
from data.loader import build_loader, mixture_counts, permute, validation_documents
from data.prepare import prepare
from data.sources import ReadOptions
from tests.data.conftest import make_docs, write_jsonl


def loader(*paths, weights=None, seq_len=32, gbs=8, rank=0, dp=1, seed=0, split="train", **cfg):
    weights = weights or [1.0] * len(paths)
    sources = [SourceConfig(path=str(p), weight=w) for p, w in zip(paths, weights)]
    return build_loader(DataConfig(sources=sources, **cfg), seq_len=seq_len, global_batch_size=gbs,
                        dp_rank=rank, dp_size=dp, seed=seed, split=split)


def stream(shard_dir) -> np.ndarray:
    m = json.loads((Path(shard_dir) / "manifest.json").read_text())
    return np.concatenate([np.fromfile(Path(shard_dir) / f"{s['name']}.bin", dtype=m["dtype"]) for s in m["shards"]]).astype(np.int64)


def test_contract(shard_dir):
    ld = loader(shard_dir, seq_len=32, gbs=8, dp=2, rank=1)
    b = ld.batch(3)
    assert set(b) == {"input_ids", "sample_index"}
    assert b["input_ids"].shape == (4, 32) and b["input_ids"].dtype == torch.long
    assert b["sample_index"].tolist() == [28, 29, 30, 31]
    assert ld.vocab_size == 512 and Path(ld.tokenizer_path) == Path(shard_dir) / "tokenizer"
    assert int(b["input_ids"].max()) < 512
    assert AutoTokenizer.from_pretrained(ld.tokenizer_path).mask_token_id == 2


def test_packing_epochs_and_windows(shard_dir):
    ld = loader(shard_dir, seq_len=32, gbs=8, validation_fraction=0.0)
    n = ld.num_samples()[0]
    tokens = stream(shard_dir)
    assert n == len(tokens) // 32
    steps = (2 * n) // 8 + 1
    rows = torch.cat([ld.batch(s)["input_ids"] for s in range(steps)]).numpy()
    windows = tokens[: n * 32].reshape(n, 32)
    index = {w.tobytes(): i for i, w in enumerate(windows)}
    seen = [index[r.tobytes()] for r in rows]  # every row is one of the packed windows
    assert sorted(seen[:n]) == list(range(n))  # epoch 0 covers each window exactly once
    assert sorted(seen[n: 2 * n]) == list(range(n))  # so does epoch 1 ...
    assert seen[:n] != seen[n: 2 * n]  # ... in a fresh order
    assert seen[:n] != list(range(n))  # shuffled


def test_samples_depend_only_on_seed_and_index(shard_dir):
    full = [loader(shard_dir, gbs=8, seed=5).batch(s) for s in (0, 7)]
    for dp in (2, 4):
        for k, s in enumerate((0, 7)):
            parts = [loader(shard_dir, gbs=8, dp=dp, rank=r, seed=5).batch(s) for r in range(dp)]
            assert torch.equal(torch.cat([p["input_ids"] for p in parts]), full[k]["input_ids"])
            assert torch.equal(torch.cat([p["sample_index"] for p in parts]), full[k]["sample_index"])
    assert not torch.equal(loader(shard_dir, gbs=8, seed=6).batch(0)["input_ids"], full[0]["input_ids"])
    # the batch size changes the step grouping, not the samples: index 8..15 = step 1 of G=8 = step 0 rows 8.. of G=16
    assert torch.equal(loader(shard_dir, gbs=16, seed=5).batch(0)["input_ids"][8:], loader(shard_dir, gbs=8, seed=5).batch(1)["input_ids"])


def test_permutation_is_a_bijection():
    for n in (1, 2, 3, 17, 1000, 4099):
        assert sorted(permute(np.arange(n), n, key=123).tolist()) == list(range(n))
    assert not np.array_equal(permute(np.arange(100), 100, 1), permute(np.arange(100), 100, 2))


def test_mixture_proportions(tmp_path, small_tokenizer):
    dirs = []
    for name in ("a", "b", "c"):
        src = write_jsonl(tmp_path / f"{name}.jsonl", [{"text": f"source {name} " + d} for d in make_docs(60, seed=ord(name))])
        prepare([str(src)], str(tmp_path / name), tokenizer=small_tokenizer, progress=False)
        dirs.append(tmp_path / name)
    assert mixture_counts([0.5, 0.3, 0.2], 1000).tolist() == [500, 300, 200]
    assert mixture_counts([1, 1, 1], 100).tolist() == [34, 33, 33]
    ld = loader(*dirs, weights=[0.5, 0.3, 0.2], seq_len=16, gbs=50, mixture_block_size=100, validation_fraction=0.0)
    source, _ = ld.locate(np.arange(1000))
    assert np.bincount(source).tolist() == [500, 300, 200]  # exact per block of 100
    assert np.bincount(source[:100]).tolist() == [50, 30, 20]
    # the rows really come from the chosen sources: count decoded "source x" markers over 20 steps
    tok = AutoTokenizer.from_pretrained(ld.tokenizer_path)
    ids = torch.cat([ld.batch(s)["input_ids"] for s in range(20)])
    src_of_row = ld.locate(np.arange(1000))[0]
    per = {0: tok.decode(ids[src_of_row == 0].flatten()), 1: tok.decode(ids[src_of_row == 1].flatten())}
    assert "source b" not in per[0] and "source a" not in per[1]
    with pytest.raises(ValueError, match="too small for data.mixture_block_size"):
        loader(*dirs, weights=[1.0, 1.0, 0.001], mixture_block_size=100)


def test_validation_split_holds_out_whole_documents(shard_dir):
    tok = AutoTokenizer.from_pretrained(Path(shard_dir) / "tokenizer")
    held = set(np.flatnonzero(validation_documents(400, 0.1)).tolist())
    assert 20 < len(held) < 60

    def doc_ids(split):
        ld = loader(shard_dir, seq_len=32, gbs=8, split=split, validation_fraction=0.1)
        steps = ld.num_samples()[0] // 8 + 1
        text = tok.decode(torch.cat([ld.batch(s)["input_ids"] for s in range(steps)]).flatten())
        return {int(x) for x in re.findall(r"doc (\d+):", text)}

    val, train = doc_ids("validation"), doc_ids("train")
    assert val and val <= held and not (train & held)
    with pytest.raises(ValueError, match="validation_fraction is 0"):
        loader(shard_dir, split="validation", validation_fraction=0.0)


def test_state_dict_resume_and_mismatch(shard_dir, tmp_path):
    a = loader(shard_dir, gbs=8, dp=2, rank=0, seed=3)
    for s in range(4):
        a.batch(s)
    state = json.loads(json.dumps(a.state_dict()))  # survives JSON (checkpoint state.json)
    expected = [a.batch(s)["input_ids"] for s in (4, 5)]
    b = loader(shard_dir, gbs=8, dp=2, rank=0, seed=3)
    b.load_state_dict(state)
    assert torch.equal(b.next_batch()["input_ids"], expected[0]) and torch.equal(b.next_batch()["input_ids"], expected[1])
    with pytest.raises(ValueError, match="seed: saved 3, now 4"):
        loader(shard_dir, gbs=8, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        loader(shard_dir, gbs=16, seed=3).load_state_dict(state)
    other = tmp_path / "copy"
    shutil.copytree(shard_dir, other)
    loader(other, gbs=8, seed=3).load_state_dict(state)  # same content elsewhere is fine
    m = json.loads((other / "manifest.json").read_text())
    m["shards"] = m["shards"][:-1]
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"sources\[0\].*shards differ"):
        loader(other, gbs=8, seed=3).load_state_dict(state)


def test_sft_batches(tmp_path, small_tokenizer):
    rows = [{"prompt": f"Q{i} " + "word " * (i % 7), "response": f"A{i} " + "x " * (i % 5)} for i in range(40)]
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    prepare([str(src)], str(tmp_path / "sft"), tokenizer=small_tokenizer, opts=ReadOptions(sft=True), progress=False)
    ld = loader(tmp_path / "sft", seq_len=48, gbs=4, validation_fraction=0.0)
    tok = AutoTokenizer.from_pretrained(small_tokenizer)
    b = ld.batch(0)
    assert b["prompt_lengths"].shape == (4,)
    for ids, p in zip(b["input_ids"], b["prompt_lengths"]):
        prompt = tok.decode(ids[:p])
        assert prompt.startswith("Q") and "A" not in prompt
        assert tok.decode(ids[p:]).startswith("A") and ids[-1] == 1  # EOS-padded answer


def test_remote_source_through_the_cache(tmp_path, small_tokenizer, docs):
    import fsspec

    fs = fsspec.filesystem("memory")
    with fs.open("/remote/docs.jsonl", "w") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in docs[:100]))
    prepare(["memory://remote/docs.jsonl"], "memory://remote/shards", tokenizer=small_tokenizer, shard_tokens=2000, progress=False)
    prepare(["memory://remote/docs.jsonl"], str(tmp_path / "local"), tokenizer=small_tokenizer, shard_tokens=2000, progress=False)
    r = loader("memory://remote/shards", cache_dir=str(tmp_path / "cache"), prefetch=False)
    local = loader(tmp_path / "local")
    assert torch.equal(r.batch(2)["input_ids"], local.batch(2)["input_ids"])
    assert (Path(r.tokenizer_path) / "tokenizer.json").is_file() and str(tmp_path / "cache") in r.tokenizer_path
    r2 = loader("memory://remote/shards", cache_dir=str(tmp_path / "cache2"), prefetch=True)
    assert torch.equal(r2.batch(5)["input_ids"], local.batch(5)["input_ids"])


# ----- bad shards -------------------------------------------------------------------------------


@pytest.fixture
def broken(tmp_path, shard_dir) -> Path:
    out = tmp_path / "broken"
    shutil.copytree(shard_dir, out, ignore=shutil.ignore_patterns(".difftron_index"))
    return out


def test_truncated_or_missing_shard(broken):
    ld = loader(broken, seq_len=32, gbs=64, verify_checksums=False)  # builds the index (every size is checked)
    path = broken / "shard_00001.bin"
    good = path.read_bytes()
    path.write_bytes(good[:-10])
    with pytest.raises(ValueError, match=r"shard_00001\.bin: truncated or corrupted: \d+ bytes, the manifest says"):
        for s in range(20):  # the index is cached now: the size is checked when the shard is opened
            ld.batch(s)
    with pytest.raises(ValueError, match=r"shard_00001\.bin: truncated or corrupted"):
        for s in range(20):
            loader(broken, seq_len=32, gbs=64).batch(s)
    shutil.rmtree(broken / ".difftron_index")
    with pytest.raises(ValueError, match=r"shard_00001\.bin: truncated or corrupted"):
        loader(broken)  # a fresh index build checks every shard
    (broken / "shard_00002.bin").unlink()
    path.write_bytes(good)
    with pytest.raises(FileNotFoundError, match=r"shard_00002\.bin: missing \(listed in .*manifest.json\)"):
        for s in range(20):
            ld.batch(s)


def test_checksum_mismatch_found_once_in_the_background(broken):
    path = broken / "shard_00000.bin"
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    ld = loader(broken, seq_len=32, gbs=64)
    (verifier,) = ld.verifiers
    assert verifier.thread is not None  # this process verifies, on its own thread
    verifier.join(timeout=120)
    with pytest.raises(ValueError, match=r"shard_00000\.bin: checksum mismatch"):
        ld.batch(0)
    # the failure is recorded: another process (here: loader) that opens the shard stops there too,
    # without hashing anything itself
    other = loader(broken, seq_len=32, gbs=64)
    assert other.verifiers[0].thread is None
    with pytest.raises(ValueError, match=r"shard_00000\.bin: checksum mismatch"):
        for s in range(20):
            other.batch(s)
    idx = broken / "shard_00002.idx"
    idx.write_bytes(idx.read_bytes()[:-8] + (10**6).to_bytes(8, "little"))
    shutil.rmtree(broken / ".difftron_index")
    with pytest.raises(ValueError, match=r"shard_00002\.idx: checksum mismatch"):
        loader(broken)


def test_checksums_are_verified_once_and_recorded(shard_dir, tmp_path):
    ld = loader(shard_dir, seq_len=32, gbs=8, cache_dir=str(tmp_path / "cache"))
    (v,) = ld.verifiers
    if v.thread is not None:
        v.join(timeout=120)
    record = Path(v.dir) / "verified.txt"
    names = json.loads((Path(shard_dir) / "manifest.json").read_text())["shards"]
    assert sorted(record.read_text().split()) == sorted(s["name"] for s in names)
    again = loader(shard_dir, seq_len=32, gbs=8, cache_dir=str(tmp_path / "cache"))
    assert again.verifiers[0].thread is None  # nothing left to verify: no thread, no hashing


def test_missing_or_incomplete_manifest(broken, tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json in"):
        loader(tmp_path)
    with pytest.raises(FileNotFoundError, match="shard directory not found"):
        loader(tmp_path / "nope")
    m = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps(dict(m, complete=False)))
    with pytest.raises(ValueError, match="has not finished"):
        loader(broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
        loader(broken)


def test_tokenizer_differs_from_fingerprint(shard_dir, tmp_path):
    from data.corpus import train_tokenizer

    other = train_tokenizer(tmp_path / "other", vocab_size=300, max_bytes=60_000, train_bytes=60_000)
    with pytest.raises(ValueError, match="differs from the tokenizer the shards were made with"):
        loader(shard_dir, tokenizer=other)
    assert loader(shard_dir, tokenizer=str(Path(shard_dir) / "tokenizer")).tokenizer_path == str(Path(shard_dir) / "tokenizer")


def test_token_ids_beyond_the_vocabulary(broken):
    m = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps(dict(m, vocab_size=40)))
    ld = loader(broken, seq_len=32, gbs=8)
    with pytest.raises(ValueError, match=r"shard_0000\d\.bin: token id \d+ at token offset \d+ >= vocab size 40"):
        ld.batch(0)


def test_bad_configs(shard_dir):
    with pytest.raises(ValueError, match="data.sources is empty"):
        build_loader(DataConfig(), seq_len=8, global_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(ValueError, match="cannot be split over dp_size=3"):
        loader(shard_dir, gbs=8, dp=3)
    with pytest.raises(ValueError, match=r"sources\[0\].weight must be > 0"):
        loader(shard_dir, weights=[0.0])
    with pytest.raises(ValueError, match="less than 100000 tokens"):
        loader(shard_dir, seq_len=100000)
