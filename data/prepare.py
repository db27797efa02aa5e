"""``python -m data.prepare``: raw text -> tokenized binary shards + ``manifest.json``.

Examples::

    python -m data.prepare --input embedded --output runs/demo/data
    python -m data.prepare --input 'corpus/*.jsonl.gz' --text-field content --tokenizer TOK --output shards/
    python -m data.prepare --hf-dataset json --hf-data-files a.jsonl --tokenizer TOK --output s3://bucket/shards
    python -m data.prepare --sft --input chats.jsonl --tokenizer TOK --output sft_shards/

Records are read in a fixed order by the main process, tokenized in batches by ``--workers``
processes (one core each; results are put back in input order, so the output does not depend on
the number of workers), given an EOS each, and written as shards of about ``--shard-tokens``
tokens (see :mod:`data.shards`). After each shard the manifest records how many input records
are done, so rerunning the same command after an interruption continues where it stopped.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator, Optional

import fsspec
import fsspec.implementations.local
import numpy as np

from data import shards as S
from data.sources import BadRecord, ReadOptions, iter_records

DEFAULT_SHARD_TOKENS = 64 * 1024 * 1024
DEFAULT_BATCH_DOCS = 512
DEFAULT_BATCH_CHARS = 256 * 1024
EMBEDDED_TOKENIZER_CACHE = ".embedded_tokenizer"

# Per-worker-process state set by the pool initializer (the usual multiprocessing pattern).
_WORKER: dict = {}


# ----- tokenization (runs in the workers) -------------------------------------------------------


def load_tokenizer(path: str):
    """A Hugging Face *fast* tokenizer from a directory; ValueError naming the path otherwise."""
    tok = S.load_tokenizer_dir(path, "--tokenizer")
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{path}: not a fast (Rust) tokenizer; data.prepare needs one")
    if tok.eos_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no EOS token (eos_token)")
    return tok


def _init_worker(tokenizer_path: str, sft: bool, add_bos: bool) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker
    _WORKER.update(tok=load_tokenizer(tokenizer_path), sft=sft, add_bos=add_bos)


def _encode_texts(backend, texts: list[str]) -> list[list[int]]:
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def _render_chat(tok, messages: list[dict]) -> tuple[str, str]:
    """(prompt text, response text) of a chat: the prompt ends where the last assistant turn starts."""
    if messages[-1].get("role") != "assistant":
        raise ValueError("the last message must have role 'assistant'")
    if not tok.chat_template:
        raise ValueError("the tokenizer has no chat template (use prompt/response fields instead)")
    prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the conversation as prompt + response")
    return prompt, full[len(prompt):]


def encode_batch(records: list, tok=None, *, sft: bool = False, add_bos: bool = False) -> dict:
    """Tokenize a batch of records (str, SFT dict or BadRecord) in order.

    Returns ``tokens`` uint32 [T] (documents back to back, EOS after each), ``lengths`` int64 [D],
    ``positions`` int64 [D] (index of each document's record in ``records``), ``prompt_lengths``
    int64 [D] (SFT) or None, ``bad`` [(position, message)] and ``empty`` [position].
    """
    if tok is None:
        tok, sft, add_bos = _WORKER["tok"], _WORKER["sft"], _WORKER["add_bos"]
    backend = tok.backend_tokenizer
    eos, bos = tok.eos_token_id, tok.bos_token_id
    if add_bos and bos is None:
        raise ValueError("--add-bos: the tokenizer has no BOS token")
    bad: list = []
    empty: list = []
    pos_ok: list[int] = []
    if not sft:
        texts = []
        for i, r in enumerate(records):
            if isinstance(r, BadRecord):
                bad.append((i, str(r)))
            elif not r.strip():
                empty.append(i)
            else:
                texts.append(r)
                pos_ok.append(i)
        prompts = None
        bodies = _encode_texts(backend, texts)
    else:
        prompt_texts, response_texts = [], []
        for i, r in enumerate(records):
            if isinstance(r, BadRecord):
                bad.append((i, str(r)))
                continue
            try:
                p, a = _render_chat(tok, r["messages"]) if "messages" in r else (r["prompt"], r["response"])
            except Exception as e:  # a template error is a bad record, not a crash
                bad.append((i, f"record {i} of its batch: {e}"))
                continue
            if not a.strip():
                empty.append(i)
                continue
            prompt_texts.append(p)
            response_texts.append(a)
            pos_ok.append(i)
        prompts = _encode_texts(backend, prompt_texts)
        bodies = _encode_texts(backend, response_texts)
    extra = 1 + (1 if add_bos else 0)
    plens = [len(p) for p in prompts] if prompts is not None else [0] * len(bodies)
    lengths = np.fromiter((pl + len(b) + extra for pl, b in zip(plens, bodies)), dtype=np.int64, count=len(bodies))
    tokens = np.empty(int(lengths.sum()), dtype=np.uint32)
    o = 0
    for k, body in enumerate(bodies):
        if add_bos:
            tokens[o] = bos
            o += 1
        if prompts is not None:
            n = len(prompts[k])
            tokens[o:o + n] = prompts[k]
            o += n
        n = len(body)
        tokens[o:o + n] = body
        o += n
        tokens[o] = eos
        o += 1
    prompt_lengths = None if prompts is None else np.asarray(plens, dtype=np.int64) + (1 if add_bos else 0)
    return {"tokens": tokens, "lengths": lengths, "positions": np.asarray(pos_ok, dtype=np.int64),
            "prompt_lengths": prompt_lengths, "bad": bad, "empty": empty}


def _encode_in_worker(records: list) -> dict:
    return encode_batch(records)


# ----- the prepare run (main process) -----------------------------------------------------------


class _ShardWriter:
    """Buffers tokenized documents and writes a shard whenever ``shard_tokens`` are buffered."""

    def __init__(self, fs, root: str, manifest: dict, shard_tokens: int, dtype: np.dtype, sft: bool) -> None:
        self.fs, self.root, self.manifest = fs, root, manifest
        self.shard_tokens, self.dtype, self.sft = shard_tokens, dtype, sft
        self.pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]] = []
        self.buffered = 0
        self.pending_bad: list[int] = []  # ordinals of bad records not yet counted in a shard
        self.pending_empty: list[int] = []

    def add(self, result: dict, first_ordinal: int) -> None:
        if len(result["lengths"]):
            self.pieces.append((result["tokens"], result["lengths"], result["positions"] + first_ordinal, result["prompt_lengths"]))
            self.buffered += int(result["lengths"].sum())
        self.pending_bad += [first_ordinal + i for i, _ in result["bad"]]
        self.pending_empty += [first_ordinal + i for i in result["empty"]]
        while self.buffered >= self.shard_tokens:
            self._flush_some()

    def _flush_some(self) -> None:
        tokens = np.concatenate([p[0] for p in self.pieces])
        lengths = np.concatenate([p[1] for p in self.pieces])
        ordinals = np.concatenate([p[2] for p in self.pieces])
        plens = np.concatenate([p[3] for p in self.pieces]) if self.sft else None
        cum = np.cumsum(lengths)
        n_docs = int(np.searchsorted(cum, self.shard_tokens, side="left")) + 1
        n_tok = int(cum[n_docs - 1])
        end_record = int(ordinals[n_docs - 1]) + 1
        self._write(tokens[:n_tok], lengths[:n_docs], None if plens is None else plens[:n_docs], end_record)
        rest = (tokens[n_tok:], lengths[n_docs:], ordinals[n_docs:], None if plens is None else plens[n_docs:])
        self.pieces = [rest] if len(rest[1]) else []
        self.buffered = int(rest[1].sum())

    def finish(self, records_read: int) -> None:
        if self.pieces:
            tokens = np.concatenate([p[0] for p in self.pieces])
            lengths = np.concatenate([p[1] for p in self.pieces])
            plens = np.concatenate([p[3] for p in self.pieces]) if self.sft else None
            self._write(tokens, lengths, plens, records_read)
            self.pieces, self.buffered = [], 0
        else:
            self._account_tail(records_read)

    def _account_tail(self, records_read: int) -> None:
        m = self.manifest
        m["bad_records"] += sum(1 for o in self.pending_bad if o < records_read)
        m["empty_records"] += sum(1 for o in self.pending_empty if o < records_read)
        self.pending_bad, self.pending_empty = [], []
        m["records_consumed"] = records_read

    def _write(self, tokens, lengths, plens, end_record: int) -> None:
        m = self.manifest
        n_bad = sum(1 for o in self.pending_bad if o < end_record)
        n_empty = sum(1 for o in self.pending_empty if o < end_record)
        self.pending_bad = [o for o in self.pending_bad if o >= end_record]
        self.pending_empty = [o for o in self.pending_empty if o >= end_record]
        shard = S.write_shard(
            self.fs, self.root, len(m["shards"]), tokens, lengths, plens, self.dtype,
            first_record=m["records_consumed"], end_record=end_record, bad_records=n_bad, empty_records=n_empty,
        )
        m["shards"].append(shard.to_dict())
        m["records_consumed"] = end_record
        m["total_tokens"] += shard.tokens
        m["total_documents"] += shard.documents
        m["bad_records"] += n_bad
        m["empty_records"] += n_empty
        save_manifest(self.fs, self.root, m)


def save_manifest(fs, root: str, manifest: dict) -> None:
    S.write_atomic(fs, S.join(root, S.MANIFEST), json.dumps(manifest, indent=1).encode("utf-8"))


def _record_size(r) -> int:
    if isinstance(r, str):
        return len(r)
    if isinstance(r, dict):
        return sum(len(str(v)) for v in r.values())
    return 0


def _batches(records: Iterable, max_docs: int, start: int, max_chars: int = DEFAULT_BATCH_CHARS) -> Iterator[tuple[int, list]]:
    """(ordinal of the first record, records) batches of at most ``max_docs`` records / ~``max_chars`` characters."""
    ordinal, batch, size = start, [], 0
    for r in records:
        batch.append(r)
        size += _record_size(r)
        if len(batch) >= max_docs or size >= max_chars:
            yield ordinal, batch
            ordinal, batch, size = ordinal + len(batch), [], 0
    if batch:
        yield ordinal, batch


def _ordered_results(batches: Iterator[tuple[int, list]], workers: int, tokenizer_path: str, sft: bool, add_bos: bool, tok):
    """(first ordinal, encoded batch) in input order, from a bounded pool of worker processes."""
    if workers <= 1:
        old = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            for ordinal, batch in batches:
                yield ordinal, len(batch), encode_batch(batch, tok, sft=sft, add_bos=add_bos)
        finally:
            if old is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = old
        return
    import multiprocessing as mp

    # forkserver, not fork: a process that already runs threads (a data loader's downloader or
    # checksum thread, pyarrow's allocator, a test runner) can leave a lock held in a forked child,
    # which then waits forever; forkserver children start from a clean single-threaded server
    ctx = mp.get_context("forkserver" if sys.platform.startswith("linux") else "spawn")
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path, sft, add_bos))
    try:
        pending: collections.deque = collections.deque()
        for ordinal, batch in batches:
            pending.append((ordinal, len(batch), pool.apply_async(_encode_in_worker, (batch,))))
            while len(pending) >= 2 * workers:
                o, n, res = pending.popleft()
                yield o, n, res.get()
        while pending:
            o, n, res = pending.popleft()
            yield o, n, res.get()
        pool.close()
    except BaseException:  # an error, an interrupt, or the consumer closing the generator
        pool.terminate()
        raise
    finally:
        pool.join()


def _copy_tokenizer(fs, root: str, tokenizer_dir: str) -> None:
    dst = S.join(root, S.TOKENIZER_DIR)
    local_fs = fsspec.filesystem("file")
    if isinstance(fs, type(local_fs)) and os.path.abspath(dst) == os.path.abspath(tokenizer_dir):
        return
    tmp = dst + ".tmp"
    if fs.exists(tmp):
        fs.rm(tmp, recursive=True)
    fs.makedirs(tmp, exist_ok=True)
    for path in sorted(Path(tokenizer_dir).iterdir()):
        if path.is_file():
            fs.put_file(str(path), S.join(tmp, path.name))
    if fs.exists(dst):
        fs.rm(dst, recursive=True)
    fs.mv(tmp, dst, recursive=True)


def _source_description(inputs: list[str], hf_dataset: Optional[str], opts: ReadOptions, add_bos: bool) -> dict:
    def norm(spec: str) -> str:
        return spec if spec == "embedded" or "://" in spec else os.path.abspath(spec)

    return {"inputs": [norm(i) for i in inputs], "hf_dataset": hf_dataset, "add_bos": add_bos, "options": asdict(opts)}


INPUTS_FILE = "inputs.json"  # the input files (size, modification stamp) the shards are made from


def _input_files(inputs: list[str]) -> list[list]:
    """[path, size, stamp] of every input file, in reading order (``embedded`` has none). A resume
    checks them: a file added, removed or changed after an interruption would shift the record
    numbering that resuming relies on (documents duplicated or lost)."""
    from data.sources import expand_input

    out = []
    for spec in inputs:
        if spec == "embedded":
            continue
        fs, _ = fsspec.core.url_to_fs(spec)
        for path in expand_input(spec):
            info = fs.info(path)
            stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("etag") or ""
            out.append([path, int(info.get("size") or 0), str(stamp)])
    return out


def _describe_changes(old: dict, new: dict, old_files: Optional[list], new_files: list) -> str:
    """What differs between a shard directory's recorded source and this command, for the user."""
    changes = []
    if old_files is not None:
        before, after = {f[0]: f[1:] for f in old_files}, {f[0]: f[1:] for f in new_files}
        for label, names in (
            ("added", [n for n in after if n not in before]),
            ("removed", [n for n in before if n not in after]),
            ("changed", [n for n in after if n in before and after[n] != before[n]]),
        ):
            if names:
                shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                changes.append(f"input files {label}: {shown}")
    old_source, new_source = old.get("source", {}), new.get("source", {})
    for key in ("inputs", "hf_dataset", "add_bos"):
        if old_source.get(key) != new_source.get(key):
            changes.append(f"{key}: {old_source.get(key)} -> {new_source.get(key)}")
    old_opts, new_opts = old_source.get("options", {}), new_source.get("options", {})
    for key in sorted(set(old_opts) | set(new_opts)):
        if old_opts.get(key) != new_opts.get(key):
            changes.append(f"option {key}: {old_opts.get(key)!r} -> {new_opts.get(key)!r}")
    if old.get("tokenizer_fingerprint") != new.get("tokenizer_fingerprint"):
        changes.append("another tokenizer")
    if old.get("shard_tokens") != new.get("shard_tokens"):
        changes.append(f"shard_tokens: {old.get('shard_tokens')} -> {new.get('shard_tokens')}")
    return "; ".join(changes)


def prepare(
    inputs: list[str], output: str, *, tokenizer: Optional[str] = None, hf_dataset: Optional[str] = None,
    opts: Optional[ReadOptions] = None, workers: int = 1, batch_docs: int = DEFAULT_BATCH_DOCS,
    shard_tokens: int = DEFAULT_SHARD_TOKENS, skip_bad_records: bool = False, overwrite: bool = False,
    add_bos: bool = False, vocab_size: int = 4096, progress: bool = True,
) -> dict:
    """Tokenize ``inputs`` (and/or ``hf_dataset``) into shards under ``output``; returns the manifest.

    ``progress`` shows a tqdm bar (tokens/s); one summary line is printed either way.

    Resumes an unfinished run of the same command; a finished one is left as is (returned).
    Raises ValueError/FileNotFoundError naming the file (and line/offset) of the first bad record
    unless ``skip_bad_records`` (then they are counted in the manifest).
    """
    with tempfile.TemporaryDirectory(prefix="difftron_prepare") as scratch:
        return _prepare(
            inputs, output, tokenizer=tokenizer, hf_dataset=hf_dataset, opts=opts, workers=workers, batch_docs=batch_docs,
            shard_tokens=shard_tokens, skip_bad_records=skip_bad_records, overwrite=overwrite, add_bos=add_bos,
            vocab_size=vocab_size, progress=progress, scratch=scratch,
        )


def _prepare(
    inputs: list[str], output: str, *, tokenizer: Optional[str] = None, hf_dataset: Optional[str] = None,
    opts: Optional[ReadOptions] = None, workers: int = 1, batch_docs: int = DEFAULT_BATCH_DOCS,
    shard_tokens: int = DEFAULT_SHARD_TOKENS, skip_bad_records: bool = False, overwrite: bool = False,
    add_bos: bool = False, vocab_size: int = 4096, progress: bool = True, scratch: str = "",
) -> dict:
    opts = opts or ReadOptions()
    if not inputs and not hf_dataset:
        raise ValueError("no input: give --input (files, globs, URLs or 'embedded') or --hf-dataset")
    if shard_tokens < 1 or batch_docs < 1:
        raise ValueError("--shard-tokens and --batch-docs must be >= 1")
    fs, root = fsspec.core.url_to_fs(output)
    local_output = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
    fs.makedirs(root, exist_ok=True)
    if tokenizer is None:
        if inputs != ["embedded"]:
            raise ValueError("--tokenizer is required (only --input embedded trains its own)")
        from data.corpus import train_tokenizer

        if local_output:
            # trained beside the shards (cached across runs), copied into OUTPUT/tokenizer below
            tokenizer = train_tokenizer(S.join(root, EMBEDDED_TOKENIZER_CACHE), vocab_size, max_bytes=opts.embedded_bytes)
        else:
            tokenizer = train_tokenizer(os.path.join(scratch, "tokenizer"), vocab_size, max_bytes=opts.embedded_bytes)
    tokenizer = str(tokenizer)
    if not os.path.isdir(tokenizer):
        raise FileNotFoundError(f"--tokenizer: not a directory: {tokenizer}")
    tok = load_tokenizer(tokenizer)
    fingerprint = S.tokenizer_fingerprint(tok)
    vocab = len(tok)
    dtype = S.token_dtype(vocab)
    source = _source_description(inputs, hf_dataset, opts, add_bos)
    kind = "sft" if opts.sft else "pretrain"
    mpath = S.join(root, S.MANIFEST)

    files = _input_files(inputs)
    inputs_digest = S.sha256_bytes(json.dumps(files).encode("utf-8"))
    manifest = None
    if fs.exists(mpath) and not overwrite:
        old = S.read_manifest(fs, root)
        if not old["complete"] and not old["shards"]:
            overwrite = True  # an earlier run stopped before its first shard: nothing to keep
    if fs.exists(mpath) and not overwrite:
        same = old["source"] == source and old["tokenizer_fingerprint"] == fingerprint and old.get("shard_tokens") == shard_tokens
        same_files = old.get("inputs_digest", inputs_digest) == inputs_digest  # older manifests have none
        if not (same and same_files):
            old_files = None
            if not same_files and fs.exists(S.join(root, INPUTS_FILE)):
                with fs.open(S.join(root, INPUTS_FILE), "rb") as f:
                    old_files = json.loads(f.read().decode("utf-8"))
            change = _describe_changes(
                old, {"source": source, "tokenizer_fingerprint": fingerprint, "shard_tokens": shard_tokens}, old_files, files,
            ) or "the input files changed"
            state = "complete" if old["complete"] else f"interrupted after {old['records_consumed']:,} records"
            raise ValueError(
                f"{output} already holds shards of other data or another tokenizer ({state}; changed since: {change}); "
                f"resuming would repeat or lose documents: restore the inputs, use another --output or pass --overwrite"
            )
        if old["complete"]:
            print(f"{output}: already complete ({old['total_tokens']:,} tokens in {len(old['shards'])} shards); nothing to do")
            return old
        manifest = old
        print(f"{output}: resuming after {len(old['shards'])} shards ({old['records_consumed']:,} records done)")
    elif fs.exists(mpath):
        for path in fs.ls(root, detail=False):
            if Path(path).name.startswith("shard_") or Path(path).name == S.MANIFEST:
                fs.rm(path)
    if manifest is None:
        manifest = {
            "format": S.FORMAT, "version": S.VERSION, "kind": kind, "dtype": dtype.str, "vocab_size": vocab,
            "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id,
            "mask_token_id": tok.mask_token_id, "tokenizer_fingerprint": fingerprint, "tokenizer": S.TOKENIZER_DIR,
            "tokenizer_source": "embedded" if inputs == ["embedded"] and not local_output else os.path.abspath(tokenizer), "source": source,
            "shard_tokens": shard_tokens, "shards": [], "records_consumed": 0, "total_tokens": 0,
            "total_documents": 0, "bad_records": 0, "empty_records": 0, "complete": False,
            "inputs_digest": inputs_digest,
        }
        S.write_atomic(fs, S.join(root, INPUTS_FILE), json.dumps(files).encode("utf-8"))
    _copy_tokenizer(fs, root, tokenizer)
    save_manifest(fs, root, manifest)

    writer = _ShardWriter(fs, root, manifest, shard_tokens, dtype, opts.sft)
    start = manifest["records_consumed"]
    records = itertools.islice(iter_records(inputs, opts, hf_dataset), start, None)
    from tqdm import tqdm

    bar = tqdm(unit="tok", unit_scale=True, desc="tokenizing", disable=not progress, mininterval=0.5)
    read, docs_done = start, manifest["total_documents"]
    t0 = time.perf_counter()
    results = _ordered_results(_batches(records, batch_docs, start), workers, tokenizer, opts.sft, add_bos, tok)
    try:
        for ordinal, n, result in results:
            if result["bad"] and not skip_bad_records:
                raise ValueError(f"{result['bad'][0][1]} (pass --skip-bad-records to skip and count such records)")
            writer.add(result, ordinal)
            read = ordinal + n
            bar.update(int(result["lengths"].sum()))
            docs_done += len(result["lengths"])
            bar.set_postfix(docs=docs_done, shards=len(manifest["shards"]), refresh=False)
        if manifest["total_documents"] == 0 and not writer.pieces:
            what = ", ".join(inputs) or hf_dataset
            raise ValueError(f"empty input: no documents in {what} ({read} records read, {len(writer.pending_bad)} bad, {len(writer.pending_empty)} empty)")
        writer.finish(read)
    finally:
        results.close()
        bar.close()
    manifest["complete"] = True
    save_manifest(fs, root, manifest)
    print(
        f"wrote {manifest['total_tokens']:,} tokens, {manifest['total_documents']:,} documents in "
        f"{len(manifest['shards'])} shards ({dtype.name}) to {output} in {time.perf_counter() - t0:.1f}s; "
        f"{manifest['bad_records']} bad and {manifest['empty_records']} empty records skipped"
    )
    return manifest


def prepare_megatron(
    inputs: list[str], output: str, *, tokenizer: str, hf_dataset: Optional[str] = None, opts: Optional[ReadOptions] = None,
    workers: int = 1, batch_docs: int = DEFAULT_BATCH_DOCS, skip_bad_records: bool = False, add_bos: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize like :func:`prepare` (an EOS after each document) into Megatron-LM's indexed dataset
    ``OUTPUT.bin``/``OUTPUT.idx``, written by megatron-core's own ``IndexedDatasetBuilder`` (one
    sequence per document, the dtype Megatron picks for the vocabulary). Local output only; written
    under temporary names and renamed at the end (not resumable: rerun to redo). Returns a summary."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    opts = opts or ReadOptions()
    if opts.sft:
        raise ValueError("--format megatron writes pretraining data; it cannot be used with --sft")
    if not inputs and not hf_dataset:
        raise ValueError("no input: give --input (files, globs, URLs or 'embedded') or --hf-dataset")
    if tokenizer is None:
        raise ValueError("--format megatron needs --tokenizer (the Megatron files do not store one)")
    if "://" in output and not output.startswith("file://"):
        raise ValueError(f"--format megatron writes local files; got {output}")
    prefix = os.path.abspath(output[len("file://"):] if output.startswith("file://") else output)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    tok = load_tokenizer(tokenizer)
    dtype = DType.optimal_dtype(len(tok))
    tmp = f"{prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
    docs = tokens = bad = 0
    t0 = time.perf_counter()
    results = _ordered_results(_batches(iter_records(inputs, opts, hf_dataset), batch_docs, 0), workers, tokenizer, False, add_bos, tok)
    try:
        for _, _, result in results:
            if result["bad"] and not skip_bad_records:
                raise ValueError(f"{result['bad'][0][1]} (pass --skip-bad-records to skip and count such records)")
            bad += len(result["bad"])
            ends = np.cumsum(result["lengths"])
            for lo, hi in zip(ends - result["lengths"], ends):
                builder.add_document(result["tokens"][lo:hi], [int(hi - lo)])
            docs += len(result["lengths"])
            tokens += int(ends[-1]) if len(ends) else 0
        if docs == 0:
            raise ValueError(f"empty input: no documents in {', '.join(inputs) or hf_dataset}")
        builder.finalize(f"{tmp}.idx")
        os.replace(f"{tmp}.bin", f"{prefix}.bin")
        os.replace(f"{tmp}.idx", f"{prefix}.idx")
    except BaseException:
        builder.data_file.close()
        for ext in ("bin", "idx"):
            if os.path.exists(f"{tmp}.{ext}"):
                os.remove(f"{tmp}.{ext}")
        raise
    finally:
        results.close()
    print(f"wrote {tokens:,} tokens, {docs:,} documents ({np.dtype(dtype).name}) to {prefix}.bin/.idx (Megatron indexed dataset) "
          f"in {time.perf_counter() - t0:.1f}s; {bad} bad records skipped; train with data.tokenizer={tokenizer}")
    return {"prefix": prefix, "tokens": tokens, "documents": docs, "dtype": np.dtype(dtype).name, "bad_records": bad}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.splitlines()[0])
    p.add_argument("--input", action="append", default=[], help="file, directory, glob, fsspec URL or 'embedded' (repeatable)")
    p.add_argument("--output", required=True, help="shard directory (local path or fsspec URL)")
    p.add_argument("--tokenizer", help="HF fast tokenizer directory (default for --input embedded: train one into OUTPUT/tokenizer)")
    p.add_argument("--hf-dataset", help="a Hugging Face dataset name (or builder: json, text, parquet) read with streaming")
    p.add_argument("--hf-config", help="the dataset's config name")
    p.add_argument("--split", default="train", help="the dataset split (default: train)")
    p.add_argument("--hf-data-files", action="append", help="data_files for --hf-dataset (repeatable)")
    p.add_argument("--text-field", default="text", help="JSON/parquet field holding the text (default: text)")
    p.add_argument("--text-unit", choices=("file", "line", "paragraph"), default="file", help="plain text: one document per file, line or blank-line paragraph")
    p.add_argument("--sft", action="store_true", help="prompt/response data (stores the prompt length of each example)")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--response-field", default="response")
    p.add_argument("--messages-field", default="messages", help="chat messages rendered with the tokenizer's chat template")
    p.add_argument("--add-bos", action="store_true", help="prepend BOS to every document")
    p.add_argument("--max-record-chars", type=int, default=ReadOptions.max_record_chars,
                   help="a longer record is a bad record (bounds tokenizer memory; default: %(default)s)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (default: all cores)")
    p.add_argument("--batch-docs", type=int, default=DEFAULT_BATCH_DOCS, help="documents per tokenization batch")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard (closed at the next document end)")
    p.add_argument("--skip-bad-records", action="store_true", help="skip and count unreadable records instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="discard what OUTPUT already holds")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the tokenizer trained for --input embedded")
    p.add_argument("--embedded-bytes", type=int, default=4_000_000, help="size of the embedded corpus in bytes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the summary line is still printed)")
    p.add_argument("--format", choices=("shards", "megatron"), default="shards",
                   help="shards: a difftron shard directory; megatron: OUTPUT.bin/OUTPUT.idx (Megatron-LM indexed dataset)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = ReadOptions(
        text_field=args.text_field, sft=args.sft, prompt_field=args.prompt_field, response_field=args.response_field,
        messages_field=args.messages_field, text_unit=args.text_unit, embedded_bytes=args.embedded_bytes,
        hf_config=args.hf_config, hf_split=args.split, hf_data_files=args.hf_data_files,
        max_record_chars=args.max_record_chars,
    )
    try:
        if args.format == "megatron":
            prepare_megatron(
                args.input, args.output, tokenizer=args.tokenizer, hf_dataset=args.hf_dataset, opts=opts, workers=args.workers,
                batch_docs=args.batch_docs, skip_bad_records=args.skip_bad_records, add_bos=args.add_bos, progress=not args.no_progress,
            )
            return 0
        prepare(
            args.input, args.output, tokenizer=args.tokenizer, hf_dataset=args.hf_dataset, opts=opts,
            workers=args.workers, batch_docs=args.batch_docs, shard_tokens=args.shard_tokens,
            skip_bad_records=args.skip_bad_records, overwrite=args.overwrite, add_bos=args.add_bos,
            vocab_size=args.vocab_size, progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
