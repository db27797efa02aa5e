"""data.prepare: every input kind, workers, SFT, resume after an interruption, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import pytest
from transformers import AutoTokenizer

import data.shards as S
from data.prepare import main, prepare
from data.sources import ReadOptions
from tests.data.conftest import make_docs, write_jsonl


def read_docs(out) -> tuple[dict, list[np.ndarray]]:
    """(manifest, token arrays of every document) of a local or fsspec shard directory."""
    fs, root = fsspec.core.url_to_fs(str(out))
    m = S.read_manifest(fs, root)
    docs = []
    for s in m["shards"]:
        toks = np.frombuffer(fs.cat_file(S.join(root, s["name"] + ".bin")), dtype=np.dtype(m["dtype"]))
        offs = np.frombuffer(fs.cat_file(S.join(root, s["name"] + ".idx")), dtype=np.int64)
        docs += [toks[a:b] for a, b in zip(offs[:-1], offs[1:])]
    return m, docs


def decoded(tok_dir, docs) -> list[str]:
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert all(int(d[-1]) == tok.eos_token_id for d in docs)
    return [tok.decode(d[:-1]) for d in docs]


def test_local_jsonl_text_and_parquet(tmp_path, small_tokenizer):
    docs = make_docs(30, seed=1)
    write_jsonl(tmp_path / "a.jsonl", [{"content": d} for d in docs[:20]])
    write_jsonl(tmp_path / "b.jsonl", [{"content": d} for d in docs[20:]])
    m, got = read_docs(_prep([str(tmp_path / "*.jsonl")], tmp_path / "j", small_tokenizer, text_field="content"))
    assert decoded(small_tokenizer, got) == docs
    assert m["complete"] and m["total_documents"] == 30 and m["dtype"] == "<u2" and m["vocab_size"] == 512
    assert m["total_tokens"] == sum(len(d) for d in got) == sum(s["tokens"] for s in m["shards"])
    assert (tmp_path / "j" / "tokenizer" / "tokenizer.json").is_file()
    assert AutoTokenizer.from_pretrained(tmp_path / "j" / "tokenizer") is not None

    (tmp_path / "t.txt").write_text("\n".join(docs) + "\n")
    _, got_t = read_docs(_prep([str(tmp_path / "t.txt")], tmp_path / "t", small_tokenizer, text_unit="line"))
    assert decoded(small_tokenizer, got_t) == docs

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs, "other": list(range(30))}), tmp_path / "p.parquet")
    _, got_p = read_docs(_prep([str(tmp_path / "p.parquet")], tmp_path / "p", small_tokenizer))
    assert [d.tolist() for d in got_p] == [d.tolist() for d in got]


def _prep(inputs, out, tok, *, hf=None, **opts):
    prepare(inputs, str(out), tokenizer=tok, hf_dataset=hf, opts=ReadOptions(**opts), shard_tokens=500, progress=False)
    return out


def test_hf_datasets_streaming_on_local_files(tmp_path, small_tokenizer):
    docs = make_docs(25, seed=2)
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    rc = main(["--hf-dataset", "json", "--hf-data-files", str(src), "--tokenizer", small_tokenizer,
               "--output", str(tmp_path / "hf"), "--no-progress", "--workers", "1"])
    assert rc == 0
    m, got = read_docs(tmp_path / "hf")
    assert decoded(small_tokenizer, got) == docs and m["source"]["hf_dataset"] == "json"
    (tmp_path / "d.txt").write_text("\n".join(docs))
    _prep([], tmp_path / "hft", small_tokenizer, hf="text", hf_data_files=[str(tmp_path / "d.txt")])
    assert decoded(small_tokenizer, read_docs(tmp_path / "hft")[1]) == docs


def test_fsspec_urls_memory_and_file(tmp_path, small_tokenizer):
    docs = make_docs(40, seed=3)
    with fsspec.open("memory://in/docs.jsonl", "w") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in docs))
    _prep(["memory://in/docs.jsonl"], "memory://out/shards", small_tokenizer)
    m, got = read_docs("memory://out/shards")
    assert decoded(small_tokenizer, got) == docs and len(m["shards"]) > 1
    assert fsspec.filesystem("memory").exists("/out/shards/tokenizer/tokenizer.json")
    write_jsonl(tmp_path / "f.jsonl", [{"text": d} for d in docs])
    _prep([f"file://{tmp_path}/f.jsonl"], tmp_path / "o", small_tokenizer)
    assert [d.tolist() for d in read_docs(tmp_path / "o")[1]] == [d.tolist() for d in got]


def test_workers_and_batching_do_not_change_the_output(tmp_path, small_tokenizer, docs):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    sums = []
    for workers, batch in ((1, 512), (2, 7)):
        m = prepare([str(src)], str(tmp_path / f"w{workers}"), tokenizer=small_tokenizer, workers=workers,
                    batch_docs=batch, shard_tokens=3000, progress=False)
        sums.append([s["sha256"] for s in m["shards"]])
    assert sums[0] == sums[1] and len(sums[0]) > 2


def test_shards_close_at_document_boundaries(shard_dir):
    m, docs = read_docs(shard_dir)
    assert all(s["tokens"] >= 4000 for s in m["shards"][:-1])
    assert all(s["tokens"] - 4000 < 200 for s in m["shards"][:-1])  # at most one document over
    assert sum(s["documents"] for s in m["shards"]) == len(docs) == 400
    assert [s["first_record"] for s in m["shards"][1:]] == [s["end_record"] for s in m["shards"][:-1]]


def test_resume_after_interruption(tmp_path, small_tokenizer, docs, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    full = prepare([str(src)], str(tmp_path / "full"), tokenizer=small_tokenizer, shard_tokens=3000, progress=False)

    real = S.write_shard
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            (tmp_path / "part" / "shard_00002.bin.tmp").write_bytes(b"half-written")
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(S, "write_shard", crashing)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(src)], str(tmp_path / "part"), tokenizer=small_tokenizer, shard_tokens=3000, progress=False)
    monkeypatch.setattr(S, "write_shard", real)
    partial = json.loads((tmp_path / "part" / "manifest.json").read_text())
    assert not partial["complete"] and len(partial["shards"]) == 2
    resumed = prepare([str(src)], str(tmp_path / "part"), tokenizer=small_tokenizer, shard_tokens=3000, progress=False)
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in full["shards"]]
    assert resumed["total_documents"] == full["total_documents"] == 400
    assert resumed["total_tokens"] == full["total_tokens"]
    # a finished directory is left alone; other inputs need --overwrite
    assert prepare([str(src)], str(tmp_path / "part"), tokenizer=small_tokenizer, shard_tokens=3000, progress=False) == resumed
    other = write_jsonl(tmp_path / "e.jsonl", [{"text": "x"}])
    with pytest.raises(ValueError, match="already holds shards of other data"):
        prepare([str(other)], str(tmp_path / "part"), tokenizer=small_tokenizer, shard_tokens=3000, progress=False)
    m = prepare([str(other)], str(tmp_path / "part"), tokenizer=small_tokenizer, overwrite=True, progress=False)
    assert m["total_documents"] == 1 and not (tmp_path / "part" / "shard_00001.bin").exists()


def test_sft_pairs_and_chat_messages(tmp_path, small_tokenizer):
    rows = [{"prompt": f"Question {i}?", "response": f"Answer number {i}."} for i in range(6)]
    rows += [{"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": f"{i}!"}]} for i in range(4)]
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    m = prepare([str(src)], str(tmp_path / "sft"), tokenizer=small_tokenizer, opts=ReadOptions(sft=True), progress=False)
    assert m["kind"] == "sft" and m["total_documents"] == 10
    _, docs = read_docs(tmp_path / "sft")
    plen = np.frombuffer((tmp_path / "sft" / "shard_00000.plen").read_bytes(), dtype=np.int32)
    tok = AutoTokenizer.from_pretrained(small_tokenizer)
    assert tok.decode(docs[0][: plen[0]]) == "Question 0?"
    assert tok.decode(docs[0][plen[0]:-1]) == "Answer number 0." and docs[0][-1] == 1
    assert tok.decode(docs[6][: plen[6]]).endswith("<|assistant|>\n") and tok.decode(docs[6][plen[6]:]).startswith("0!")


# ----- bad input ----------------------------------------------------------------------------------


def test_undecodable_and_invalid_lines(tmp_path, small_tokenizer):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n{"text": 3}\nnot json\n{"text": "also fine"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: undecodable bytes.*--skip-bad-records"):
        prepare([str(src)], str(tmp_path / "o"), tokenizer=small_tokenizer, progress=False)
    m = prepare([str(src)], str(tmp_path / "o2"), tokenizer=small_tokenizer, skip_bad_records=True, progress=False)
    assert m["total_documents"] == 2 and m["bad_records"] == 3 and m["records_consumed"] == 5
    for name, line, why in (("field", b'{"text": 3}', "no string field 'text'"), ("json", b"not json", "invalid JSON")):
        (tmp_path / f"{name}.jsonl").write_bytes(b'{"text": "fine"}\n' + line + b"\n")
        with pytest.raises(ValueError, match=rf"{name}\.jsonl:2: {why}"):
            prepare([str(tmp_path / f"{name}.jsonl")], str(tmp_path / f"o_{name}"), tokenizer=small_tokenizer, progress=False)
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"ok line\n\xff\xfe broken\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: undecodable"):
        prepare([str(txt)], str(tmp_path / "o4"), tokenizer=small_tokenizer, opts=ReadOptions(text_unit="line"), progress=False)
    with pytest.raises(ValueError, match=r"bad\.txt:byte 8: undecodable"):
        prepare([str(txt)], str(tmp_path / "o5"), tokenizer=small_tokenizer, progress=False)


def test_empty_and_missing_inputs(tmp_path, small_tokenizer, capsys):
    (tmp_path / "empty.jsonl").write_text('{"text": "   "}\n\n')
    with pytest.raises(ValueError, match=r"empty input: no documents in .*empty\.jsonl"):
        prepare([str(tmp_path / "empty.jsonl")], str(tmp_path / "o"), tokenizer=small_tokenizer, progress=False)
    with pytest.raises(FileNotFoundError, match="no files match"):
        prepare([str(tmp_path / "nothing*.jsonl")], str(tmp_path / "o"), tokenizer=small_tokenizer, progress=False)
    assert main(["--input", str(tmp_path / "missing.jsonl"), "--tokenizer", small_tokenizer, "--output", str(tmp_path / "o")]) == 1
    assert "error: input not found:" in capsys.readouterr().err
    assert main(["--input", str(tmp_path / "empty.jsonl"), "--tokenizer", str(tmp_path / "notok"), "--output", str(tmp_path / "o")]) == 1
    assert "notok" in capsys.readouterr().err
    assert main(["--input", str(tmp_path / "empty.jsonl"), "--output", str(tmp_path / "o")]) == 1
    assert "--tokenizer is required" in capsys.readouterr().err


def test_embedded_input_trains_its_tokenizer(tmp_path):
    from data.corpus import iter_documents

    opts = ReadOptions(embedded_bytes=120_000)
    m = prepare(["embedded"], str(tmp_path / "emb"), opts=opts, vocab_size=300, progress=False)
    docs = list(iter_documents(120_000))
    assert m["total_documents"] == len(docs) and m["vocab_size"] == 300 and m["mask_token_id"] == 2
    tok = AutoTokenizer.from_pretrained(tmp_path / "emb" / "tokenizer")
    assert decoded(tmp_path / "emb" / "tokenizer", read_docs(tmp_path / "emb")[1])[:3] == docs[:3]
    before = (tmp_path / "emb" / "tokenizer" / "tokenizer.json").read_bytes()
    # other settings on the same output: refused, and the existing tokenizer copy is untouched
    with pytest.raises(ValueError, match="already holds shards of other data"):
        prepare(["embedded"], str(tmp_path / "emb"), opts=opts, vocab_size=320, progress=False)
    assert (tmp_path / "emb" / "tokenizer" / "tokenizer.json").read_bytes() == before
    assert tok.mask_token == "<|mdm_mask|>"
    # an fsspec output gets the tokenizer too
    prepare(["embedded"], "memory://emb/out", opts=opts, vocab_size=300, progress=False)
    assert read_docs("memory://emb/out")[0]["total_tokens"] == m["total_tokens"]
    assert fsspec.filesystem("memory").exists("/emb/out/tokenizer/tokenizer.json")


@pytest.mark.slow
def test_resume_after_a_killed_process(tmp_path, small_tokenizer):
    """SIGKILL the CLI after its first shard; rerunning the command completes identically."""
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[2]
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in make_docs(6000, seed=9, min_words=40, max_words=120)])
    args = ["--input", str(src), "--tokenizer", small_tokenizer, "--shard-tokens", "4000", "--workers", "1",
            "--batch-docs", "8", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    ref = subprocess.run([sys.executable, "-m", "data.prepare", *args, "--output", str(tmp_path / "ref")],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "data.prepare", *args, "--output", str(out)], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_partial = False
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        try:
            m = json.loads((out / "manifest.json").read_text())
        except (FileNotFoundError, ValueError):
            m = None
        if m and m["shards"] and not m["complete"]:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_partial = True
            break
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
    assert killed_partial, "the run finished before it could be interrupted"
    again = subprocess.run([sys.executable, "-m", "data.prepare", *args, "--output", str(out)],
                           cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "resuming after" in again.stdout
    a, b = read_docs(tmp_path / "ref"), read_docs(out)
    assert [s["sha256"] for s in a[0]["shards"]] == [s["sha256"] for s in b[0]["shards"]]
    assert a[0]["total_documents"] == b[0]["total_documents"] == 6000


def _stop_at_call(n: int, real):
    calls = []

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return stopping


def test_resume_refuses_when_an_input_was_added_after_the_interruption(tmp_path, small_tokenizer, docs, monkeypatch):
    """Issue 21, item 4: a file added to an input folder between an interruption and the rerun
    would shift the record numbers resuming relies on (one document repeated, one lost)."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": d} for d in docs[:200]])
    write_jsonl(folder / "c.jsonl", [{"text": d} for d in docs[200:]])
    with monkeypatch.context() as patch:  # Ctrl-C while the second shard is written
        patch.setattr(S, "write_shard", _stop_at_call(2, S.write_shard))
        with pytest.raises(KeyboardInterrupt):
            prepare([str(folder)], str(tmp_path / "part"), tokenizer=small_tokenizer, shard_tokens=3000, progress=False)
    write_jsonl(folder / "b.jsonl", [{"text": "an added document"}])  # sorts between a and c
    with pytest.raises(ValueError, match=r"changed since: input files added: \S+/in/b\.jsonl\); resuming would"):
        prepare([str(folder)], str(tmp_path / "part"), tokenizer=small_tokenizer, shard_tokens=3000, progress=False)
    (folder / "b.jsonl").unlink()
    (folder / "c.jsonl").write_text((folder / "c.jsonl").read_text() + json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(ValueError, match=r"input files changed: \S+/in/c\.jsonl"):
        prepare([str(folder)], str(tmp_path / "part"), tokenizer=small_tokenizer, shard_tokens=3000, progress=False)
    with pytest.raises(ValueError, match=r"option text_field: 'text' -> 'body'"):
        prepare([str(folder)], str(tmp_path / "part"), tokenizer=small_tokenizer, shard_tokens=3000, progress=False,
                opts=ReadOptions(text_field="body"))
    # --overwrite over the new inputs equals a fresh run over them
    again = prepare([str(folder)], str(tmp_path / "part"), tokenizer=small_tokenizer, shard_tokens=3000, progress=False, overwrite=True)
    fresh = prepare([str(folder)], str(tmp_path / "fresh"), tokenizer=small_tokenizer, shard_tokens=3000, progress=False)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in fresh["shards"]]
    assert again["total_documents"] == 401


@pytest.mark.slow
def test_a_100_mb_single_line_document_is_refused_in_bounded_memory(tmp_path, small_tokenizer):
    """Issue 21, item 6: tokenizing a 100 MB line whole took ~15 GB; the record-size guard names
    it (and --skip-bad-records skips it) with the process's peak memory near the line's size."""
    import subprocess
    import sys

    from tests.conftest import REPO

    src = tmp_path / "big.txt"
    with open(src, "w") as f:
        f.write("a short first document\n")
        f.write("word " * 20_000_000 + "\n")  # 100 MB, one line
        f.write("a short last document\n")
    script = (
        "import resource, sys; from data.prepare import main; rc = main(sys.argv[1:]); "
        "print('peak_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
    )
    base = ["--input", str(src), "--text-unit", "line", "--tokenizer", small_tokenizer, "--workers", "1", "--no-progress"]
    env = dict(__import__("os").environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    refused = subprocess.run([sys.executable, "-c", script, *base, "--output", str(tmp_path / "a")], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 1
    assert f"error: {src}:2: 100,000,000 characters, above the limit of 4,000,000 (--max-record-chars)" in refused.stderr
    skipped = subprocess.run([sys.executable, "-c", script, *base, "--skip-bad-records", "--output", str(tmp_path / "b")],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["total_documents"] == 2 and m["bad_records"] == 1
    peak_gb = int(skipped.stdout.split("peak_kb")[1].split()[0]) / 1e6
    assert peak_gb < 1.5, peak_gb  # the file twice over plus the interpreter, not ~15 GB


def test_a_document_of_nul_bytes_is_a_bad_record(tmp_path, small_tokenizer):
    src = tmp_path / "zeros.txt"
    src.write_bytes(b"\0" * 1_000_000)
    with pytest.raises(ValueError, match=r"zeros\.txt: binary data, not text \(1,000,000 NUL characters of 1,000,000\)"):
        prepare([str(src)], str(tmp_path / "out"), tokenizer=small_tokenizer, progress=False)
    ok = tmp_path / "ok.txt"
    ok.write_text("a real document")
    m = prepare([str(src), str(ok)], str(tmp_path / "out2"), tokenizer=small_tokenizer, progress=False, skip_bad_records=True)
    assert m["total_documents"] == 1 and m["bad_records"] == 1
