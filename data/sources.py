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
    """A local mirror of a remote shard directory (any fsspec URL), filled lazily.

    The manifest, ``.idx``/``.plen`` files and the tokenizer are copied at construction; a
    shard's ``.bin`` when :meth:`fetch` first asks for it, or earlier when ``prefetch`` runs a
    background thread that copies every shard in order. Files are written atomically, so an
    interrupted copy is simply redone.
    """

    def __init__(self, url: str, cache_dir: Optional[str], *, prefetch: bool = True) -> None:
        self.url = url.rstrip("/")
        self.fs, self.remote = fsspec.core.url_to_fs(self.url)
        key = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self.local = os.path.join(cache_dir or default_cache_dir(), key)
        os.makedirs(self.local, exist_ok=True)
        manifest = S.read_manifest(self.fs, self.remote)
        self._locks = {s["name"]: threading.Lock() for s in manifest["shards"]}
        local_manifest = os.path.join(self.local, S.MANIFEST)
        if os.path.exists(local_manifest):
            with open(local_manifest) as f:
                old = json.load(f)
            if old.get("shards") != manifest["shards"]:  # the remote changed: start the mirror afresh
                for name in os.listdir(self.local):
                    if name.startswith("shard_"):
                        os.remove(os.path.join(self.local, name))
        for s in manifest["shards"]:
            for ext in ("idx", "plen"):
                if ext in s["sha256"]:
                    self._get(f"{s['name']}.{ext}")
        tok_remote = posixpath_join(self.remote, S.TOKENIZER_DIR)
        if self.fs.isdir(tok_remote):
            for path in self.fs.find(tok_remote):
                rel = path[len(tok_remote):].lstrip("/")
                self._get(f"{S.TOKENIZER_DIR}/{rel}", force=True)
        S.write_atomic(fsspec.filesystem("file"), local_manifest, json.dumps(manifest, indent=1).encode())
        self._thread = None
        self._error: Optional[BaseException] = None
        if prefetch:
            names = [s["name"] for s in manifest["shards"]]
            self._thread = threading.Thread(target=self._prefetch, args=(names,), daemon=True)
            self._thread.start()

    def _get(self, rel: str, force: bool = False) -> None:
        dst = os.path.join(self.local, rel)
        if os.path.exists(dst) and not force:
            return
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = f"{dst}.tmp{os.getpid()}-{threading.get_ident()}"
        self.fs.get_file(posixpath_join(self.remote, rel), tmp)
        os.replace(tmp, dst)

    def fetch(self, name: str) -> None:
        """Make ``name.bin`` present in the local mirror (blocking)."""
        with self._locks[name]:
            self._get(f"{name}.bin")

    def _prefetch(self, names: list[str]) -> None:
        try:
            for name in names:
                self.fetch(name)
        except BaseException as e:  # reported by the first synchronous fetch that fails
            self._error = e


def posixpath_join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def open_shard_dir(path: str, *, cache_dir: Optional[str], prefetch: bool, verify_checksums: bool) -> S.ShardSet:
    """A :class:`~data.shards.ShardSet` for a local directory, ``file://`` URL or remote URL."""
    local = _strip_protocol_file(path)
    if "://" not in local:
        if not os.path.isdir(local):
            raise FileNotFoundError(f"shard directory not found: {path}")
        return S.ShardSet(local, verify_checksums=verify_checksums)
    cache = ShardCache(path, cache_dir, prefetch=prefetch)
    return S.ShardSet(cache.local, verify_checksums=verify_checksums, fetch=cache.fetch)
