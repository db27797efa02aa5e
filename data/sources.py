"""Where data comes from: raw-text readers for ``data.prepare`` and a local cache for remote shards.

Readers yield one item per input record, in a fixed order: a ``str`` (pretraining text), a
``dict`` (SFT: ``{"prompt", "response"}`` or ``{"messages"}``), or a :class:`BadRecord` for a
record that cannot be used (undecodable bytes, invalid JSON, missing field). Bad records keep
their place in the order so that an interrupted prepare resumes at the same record.

Inputs: ``embedded`` (:mod:`data.corpus`), local files/directories/globs and fsspec URLs
(``*.jsonl``/``*.json`` JSON lines, ``*.parquet``, anything else plain text; ``.gz``/``.bz2``/
``.zst``... decompressed by fsspec), and Hugging Face datasets read with ``datasets`` streaming.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import fsspec
import fsspec.implementations.local

from data import shards as S

_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip")
_GLOB_CHARS = "*?["


@dataclass
class BadRecord:
    """A record that could not be read; ``where`` names the file and line/offset."""

    where: str
    why: str

    def __str__(self) -> str:
        return f"{self.where}: {self.why}"


@dataclass
class ReadOptions:
    """How records become documents (see ``python -m data.prepare --help``)."""

    text_field: str = "text"
    sft: bool = False
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    text_unit: str = "file"  # plain text: one document per "file", "line" or "paragraph"
    embedded_bytes: int = 4_000_000
    hf_config: Optional[str] = None
    hf_split: str = "train"
    hf_data_files: Optional[list] = None
    # A longer record is a bad record (tokenizing it whole needs ~150 bytes of memory per
    # character: a 100 MB line took ~15 GB). 4M characters is ~1M tokens, far above any seq_len.
    max_record_chars: int = 4_000_000


def check_text(text: str, where: str, opts: ReadOptions):
    """``text``, or a BadRecord when it is too long to tokenize in bounded memory or is binary
    data (NUL characters, e.g. a file of zeros or a binary read as text)."""
    if len(text) > opts.max_record_chars:
        return BadRecord(where, f"{len(text):,} characters, above the limit of {opts.max_record_chars:,} (--max-record-chars); split the document or raise the limit")
    nul = text.count("\0")
    if nul and nul * 100 > len(text):
        return BadRecord(where, f"binary data, not text ({nul:,} NUL characters of {len(text):,})")
    return text


def _strip_protocol_file(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def expand_input(spec: str) -> list[str]:
    """Files named by a path, directory, glob or fsspec URL, sorted; FileNotFoundError if none."""
    fs, path = fsspec.core.url_to_fs(spec)
    if any(c in path for c in _GLOB_CHARS):
        found = sorted(p for p in fs.glob(path) if fs.isfile(p))
    elif fs.isdir(path):
        found = sorted(p for p in fs.find(path) if not Path(p).name.startswith("."))
    elif fs.exists(path):
        found = [path]
    else:
        raise FileNotFoundError(f"input not found: {spec}")
    if not found:
        raise FileNotFoundError(f"no files match the input {spec}")
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return found
    return [fs.unstrip_protocol(p) for p in found]


def _kind(path: str) -> str:
    name = path.lower()
    for ext in _COMPRESSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def from_example(example: Any, where: str, opts: ReadOptions):
    """One dataset row -> a str (pretraining), a dict (SFT) or a BadRecord."""
    if not isinstance(example, dict):
        return BadRecord(where, f"expected a JSON object, got {type(example).__name__}")
    if not opts.sft:
        text = example.get(opts.text_field)
        if not isinstance(text, str):
            return BadRecord(where, f"no string field {opts.text_field!r}")
        return check_text(text, where, opts)
    messages = example.get(opts.messages_field)
    if messages is not None:
        if not (isinstance(messages, list) and len(messages) >= 2 and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
            return BadRecord(where, f"field {opts.messages_field!r} must be a list of >= 2 {{role, content}} messages")
        return {"messages": messages}
    prompt, response = example.get(opts.prompt_field), example.get(opts.response_field)
    if not isinstance(prompt, str) or not isinstance(response, str):
        return BadRecord(where, f"no string fields {opts.prompt_field!r}/{opts.response_field!r} (nor {opts.messages_field!r})")
    checked = check_text(prompt + response, where, opts)
    if isinstance(checked, BadRecord):
        return checked
    return {"prompt": prompt, "response": response}


def _read_jsonl(path: str, opts: ReadOptions) -> Iterator:
    with fsspec.open(path, "rb", compression="infer") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadRecord(where, f"undecodable bytes (not UTF-8) at byte {e.start} of the line")
                continue
            try:
                example = json.loads(line)
            except ValueError as e:
                yield BadRecord(where, f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            yield from_example(example, where, opts)


def _read_text(path: str, opts: ReadOptions) -> Iterator:
    with fsspec.open(path, "rb", compression="infer") as f:
        data = f.read()
    if opts.text_unit == "file":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            yield BadRecord(f"{path}:byte {e.start}", "undecodable bytes (not UTF-8)")
            return
        yield check_text(text, path, opts)
        return
    sep = b"\n" if opts.text_unit == "line" else b"\n\n"
    offset = 0
    for lineno, part in enumerate(data.split(sep), 1):
        where = f"{path}:{lineno}" if opts.text_unit == "line" else f"{path}:byte {offset}"
        offset += len(part) + len(sep)
        if not part.strip():
            continue
        try:
            text = part.decode("utf-8").strip("\n")
        except UnicodeDecodeError as e:
            yield BadRecord(where, f"undecodable bytes (not UTF-8) at byte {e.start} of the {opts.text_unit}")
            continue
        yield check_text(text, where, opts)


def _read_parquet(path: str, opts: ReadOptions) -> Iterator:
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises ArrowInvalid and friends
            raise ValueError(f"{path}: not a readable parquet file ({e})") from None
        names = set(pf.schema_arrow.names)
        wanted = [opts.text_field] if not opts.sft else [opts.prompt_field, opts.response_field, opts.messages_field]
        columns = [c for c in wanted if c in names]
        if not columns:
            raise ValueError(f"{path}: none of the columns {wanted} exist (columns: {sorted(names)})")
        row = 0
        for batch in pf.iter_batches(columns=columns, batch_size=4096):
            for example in batch.to_pylist():
                yield from_example(example, f"{path}:row {row}", opts)
                row += 1


def _read_hf(name: str, opts: ReadOptions) -> Iterator:
    import datasets

    kwargs = {"split": opts.hf_split, "streaming": True}
    if opts.hf_data_files:
        kwargs["data_files"] = list(opts.hf_data_files)
    ds = datasets.load_dataset(name, opts.hf_config, **kwargs)
    for i, example in enumerate(ds):
        yield from_example(example, f"{name}[{opts.hf_split}][{i}]", opts)


def iter_records(inputs: list[str], opts: ReadOptions, hf_dataset: Optional[str] = None) -> Iterator:
    """Every record of every input, in order (inputs as given, files of a glob sorted)."""
    if hf_dataset:
        yield from _read_hf(hf_dataset, opts)
    for spec in inputs:
        if spec == "embedded":
            if opts.sft:
                raise ValueError("--input embedded is pretraining text; it cannot be used with --sft")
            from data.corpus import iter_documents

            yield from iter_documents(opts.embedded_bytes)
            continue
        for path in expand_input(spec):
            kind = _kind(path)
            if kind == "jsonl":
                yield from _read_jsonl(path, opts)
            elif kind == "parquet":
                yield from _read_parquet(path, opts)
            elif opts.sft:
                raise ValueError(f"{path}: SFT data must be JSON lines or parquet (plain text has no prompt/response)")
            else:
                yield from _read_text(path, opts)


# ----- remote shard directories for the loader --------------------------------------------------


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "difftron", "shards")


class ShardCache:
    """A local mirror of a remote shard directory (any fsspec URL), shared by the processes of a node.

    Every file is downloaded once per cache directory: a download holds the file's lock
    (``locks/NAME.lock``, :mod:`filelock`), so the other ranks of the node wait for it and then use
    the same copy. The manifest and tokenizer are copied at construction; ``.idx``/``.plen`` when
    the sample index is built (once); a ``.bin`` when a reader needs it, or earlier when
    :meth:`prefetch` queues it for the background thread (the loader queues the shards of its
    next steps). A ``.bin`` is checked against the manifest's sha256 as it is downloaded (so its
    checksum is verified once per node) and renamed into place only then. With ``max_bytes`` the
    ``.bin`` files are bounded: after a download the least recently used ones are deleted (a
    rank that still has one memory-mapped keeps reading it; a later open downloads it again).
    """

    def __init__(self, url: str, cache_dir: Optional[str], *, prefetch: bool = True, max_bytes: Optional[int] = None) -> None:
        from filelock import FileLock

        self.url = url.rstrip("/")
        self.fs, self.remote = fsspec.core.url_to_fs(self.url)
        key = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self.local = os.path.join(cache_dir or default_cache_dir(), key)
        self.max_bytes = max_bytes
        self._FileLock = FileLock
        try:
            os.makedirs(os.path.join(self.local, "locks"), exist_ok=True)
        except OSError as e:
            raise OSError(f"{self.local}: cannot create the shard cache ({e.strerror or e})") from None
        manifest = S.read_manifest(self.fs, self.remote)
        self._sha = {s["name"]: s["sha256"] for s in manifest["shards"]}
        self.downloads = 0  # files this process downloaded (the rest were there or fetched by another rank)
        local_manifest = os.path.join(self.local, S.MANIFEST)
        with self._lock("manifest"):
            mirrored = False  # this manifest and its tokenizer are already here (another rank, an earlier run)
            if os.path.exists(local_manifest):
                with open(local_manifest) as f:
                    old = json.load(f)
                mirrored = old == manifest and os.path.isdir(os.path.join(self.local, S.TOKENIZER_DIR))
                if old.get("shards") != manifest["shards"]:  # the remote changed: start the mirror afresh
                    for name in os.listdir(self.local):
                        if name.startswith("shard_"):
                            os.remove(os.path.join(self.local, name))
            tok_remote = posixpath_join(self.remote, S.TOKENIZER_DIR)
            if not mirrored and self.fs.isdir(tok_remote):  # the manifest is written after its tokenizer
                for path in self.fs.find(tok_remote):
                    rel = path[len(tok_remote):].lstrip("/")
                    self._download(f"{S.TOKENIZER_DIR}/{rel}", os.path.join(self.local, S.TOKENIZER_DIR, rel))
            self._write(local_manifest, json.dumps(manifest, indent=1).encode())
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self._queued: set[str] = set()
        self._thread = None
        self._error: Optional[BaseException] = None
        if prefetch:
            self._thread = threading.Thread(target=self._prefetch_loop, name="difftron-shard-prefetch", daemon=True)
            self._thread.start()

    def _lock(self, name: str):
        return self._FileLock(os.path.join(self.local, "locks", f"{name}.lock"), thread_local=False)

    def _write(self, dst: str, data: bytes) -> None:
        tmp = f"{dst}.tmp{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, dst)
        except OSError as e:
            _remove(tmp)
            raise OSError(f"{dst}: cannot write to the shard cache ({e.strerror or e}); free space, set data.cache_max_gb or another data.cache_dir") from None

    def _download(self, rel: str, dst: str, sha256: Optional[str] = None) -> None:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = f"{dst}.tmp{os.getpid()}-{threading.get_ident()}"
        try:
            self.fs.get_file(posixpath_join(self.remote, rel), tmp)
            if sha256 is not None and S.sha256_file(fsspec.filesystem("file"), tmp) != sha256:
                raise ValueError(f"{posixpath_join(self.url, rel)}: checksum mismatch (sha256 differs from {S.MANIFEST}; corrupted shard)")
            os.replace(tmp, dst)
        except OSError as e:
            _remove(tmp)
            if isinstance(e, FileNotFoundError) and not os.path.exists(os.path.dirname(dst)):
                raise
            if isinstance(e, FileNotFoundError):
                raise FileNotFoundError(f"{posixpath_join(self.url, rel)}: missing (listed in {S.MANIFEST})") from None
            raise OSError(f"{dst}: cannot write to the shard cache ({e.strerror or e}); free space, set data.cache_max_gb or another data.cache_dir") from None
        except BaseException:
            _remove(tmp)
            raise
        self.downloads += 1

    def fetch(self, name: str, ext: str = "bin") -> None:
        """Make ``name.ext`` present in the local mirror (blocking); downloads it at most once per node."""
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        self._fetch_one(name, ext)

    def _fetch_one(self, name: str, ext: str = "bin") -> None:
        dst = os.path.join(self.local, f"{name}.{ext}")
        if os.path.exists(dst):
            if ext == "bin" and self.max_bytes is not None:
                _touch(dst)
            return
        with self._lock(f"{name}.{ext}"):
            if os.path.exists(dst):  # another rank of this node downloaded it meanwhile
                return
            self._download(f"{name}.{ext}", dst, self._sha[name][ext] if ext == "bin" else None)
        if ext == "bin" and self.max_bytes is not None:
            self._evict(keep=dst)

    def _evict(self, keep: str) -> None:
        with self._lock("evict"):
            files = []
            for entry in os.scandir(self.local):
                if entry.name.endswith(".bin") and entry.name.startswith("shard_"):
                    st = entry.stat()
                    files.append((st.st_mtime_ns, st.st_size, entry.path))
            total = sum(f[1] for f in files)
            for _, size, path in sorted(files):
                if total <= self.max_bytes:
                    break
                if path == keep:
                    continue
                _remove(path)
                total -= size

    def prefetch(self, names: list[str]) -> None:
        """Queue shards' ``.bin`` for the background thread (no-op without prefetch)."""
        if self._thread is None:
            return
        for name in names:
            path = os.path.join(self.local, f"{name}.bin")
            if os.path.exists(path):
                if self.max_bytes is not None:
                    _touch(path)  # needed soon: the most recently used, last to be evicted
            elif name not in self._queued:
                self._queued.add(name)
                self._queue.put(name)

    def _prefetch_loop(self) -> None:
        while True:
            name = self._queue.get()
            if name is None:
                self._queue.task_done()
                return
            try:
                self._fetch_one(name)
            except BaseException as e:  # reported by the next synchronous fetch
                self._error = e
            finally:
                self._queued.discard(name)
                self._queue.task_done()

    def wait(self) -> None:
        """Block until every queued prefetch is done (for tests and benchmarks)."""
        if self._thread is not None:
            self._queue.join()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _touch(path: str) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def posixpath_join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def open_shard_dir(path: str, *, cache_dir: Optional[str], prefetch: bool, verify_checksums: bool, max_open: int = 64,
                   cache_max_gb: Optional[float] = None) -> S.ShardSet:
    """A :class:`~data.shards.ShardSet` for a local directory, ``file://`` URL or remote URL."""
    local = _strip_protocol_file(path)
    if "://" not in local:
        if not os.path.isdir(local):
            raise FileNotFoundError(f"shard directory not found: {path}")
        return S.ShardSet(local, verify_checksums=verify_checksums, max_open=max_open)
    max_bytes = None if cache_max_gb is None else int(cache_max_gb * 1e9)
    cache = ShardCache(path, cache_dir, prefetch=prefetch, max_bytes=max_bytes)
    # remote shards are verified as they are downloaded (once per node), not again
    ss = S.ShardSet(cache.local, verify_checksums=False, fetch=cache.fetch, max_open=max_open)
    ss.cache = cache
    return ss


def open_source(src, cfg, *, index: int, megatron_tokenizer=None) -> S.ShardSet:
    """The reader of ``data.sources[index]``: a shard directory (local or remote) or a Megatron prefix."""
    from data.megatron import MegatronSource, is_megatron_prefix

    fmt = src.format
    if fmt not in ("auto", "shards", "megatron"):
        raise ValueError(f"data.sources[{index}].format must be auto, shards or megatron, got {fmt!r}")
    path = _strip_protocol_file(src.path)
    if fmt == "megatron" or (fmt == "auto" and is_megatron_prefix(path)):
        if "://" in path:
            raise ValueError(f"data.sources[{index}]: Megatron datasets are read from local paths only, got {src.path}")
        vocab, fingerprint, eos = megatron_tokenizer
        return MegatronSource(path, vocab_size=vocab, tokenizer_fingerprint=fingerprint, eos_token_id=eos, max_open=cfg.max_open_shards)
    return open_shard_dir(src.path, cache_dir=cfg.cache_dir, prefetch=cfg.prefetch, verify_checksums=cfg.verify_checksums,
                          max_open=cfg.max_open_shards, cache_max_gb=cfg.cache_max_gb)
