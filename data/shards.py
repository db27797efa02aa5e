"""The token shard format: binary shards, document offsets, ``manifest.json``, checksums, reading.

A shard directory (written by ``python -m data.prepare``) holds::

    manifest.json              format, dtype, vocab size, tokenizer fingerprint, source, shards
    tokenizer/                 a copy of the tokenizer the shards were made with
    shard_00000.bin            the tokens of whole documents, back to back, each ending with EOS
    shard_00000.idx            int64 [documents + 1]: token offset of each document start, then the total
    shard_00000.plen           (SFT only) int32 [documents]: prompt length of each example

``.bin`` is raw little-endian ``uint16`` when the vocabulary fits in 16 bits, else ``uint32``.
A shard is closed at the first document boundary at or after ``shard_tokens`` tokens, so shards
are of (nearly) fixed size and never split a document. Every file's sha256 is in the manifest.
The manifest is rewritten (atomically) after each shard, with ``complete: false`` until the end,
which is what lets an interrupted ``prepare`` resume exactly.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

FORMAT = "difftron-token-shards"
VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
IDX_DTYPE = np.dtype("<i8")
PLEN_DTYPE = np.dtype("<i4")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32 (little endian)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(fs: fsspec.AbstractFileSystem, path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_tokenizer_dir(path: str, what: str = "tokenizer"):
    """A Hugging Face fast tokenizer from a local folder; one-line errors naming the folder or file
    (a missing folder, a folder with no ``tokenizer.json``, a truncated or garbled file)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: no such folder: {path}")
    known = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
    if not any((folder / name).is_file() for name in known):
        raise ValueError(f"{what}: {path} is not a tokenizer folder (none of {', '.join(known)} in it)")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        spec = folder / name
        if spec.is_file():
            try:
                json.loads(spec.read_bytes())
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"{spec}: not valid JSON ({e}); the file is damaged or truncated") from None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises OSError/ValueError/... with several lines
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{what}: cannot load a tokenizer from {path}: {first}") from None


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of a fast tokenizer's full serialization (model, normalizer, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    canon = json.dumps(json.loads(backend.to_str()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def join(root: str, *parts: str) -> str:
    """Join path parts for a local path or an fsspec URL."""
    return posixpath.join(root.rstrip("/"), *parts) if "://" in root else str(Path(root, *parts))


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name and a rename (atomic on local disks)."""
    tmp = f"{path}.tmp"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


@dataclass
class WrittenShard:
    """One shard's manifest entry."""

    name: str
    tokens: int
    documents: int
    first_record: int
    end_record: int
    bad_records: int
    empty_records: int
    sha256: dict

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def write_shard(
    fs: fsspec.AbstractFileSystem, out: str, index: int, tokens: np.ndarray, doc_lengths: np.ndarray,
    prompt_lengths: np.ndarray | None, dtype: np.dtype, *, first_record: int, end_record: int,
    bad_records: int, empty_records: int,
) -> WrittenShard:
    """Write one shard's files atomically; ``tokens`` [T] holds ``doc_lengths`` [D] documents."""
    name = shard_name(index)
    offsets = np.zeros(len(doc_lengths) + 1, dtype=IDX_DTYPE)
    np.cumsum(doc_lengths, out=offsets[1:])
    if int(offsets[-1]) != len(tokens):
        raise AssertionError(f"{name}: document lengths sum to {offsets[-1]} but there are {len(tokens)} tokens")
    files = {"bin": tokens.astype(dtype, copy=False).tobytes(), "idx": offsets.tobytes()}
    if prompt_lengths is not None:
        files["plen"] = np.asarray(prompt_lengths, dtype=PLEN_DTYPE).tobytes()
    sums = {}
    for ext, data in files.items():
        write_atomic(fs, join(out, f"{name}.{ext}"), data)
        sums[ext] = sha256_bytes(data)
    return WrittenShard(name, len(tokens), len(doc_lengths), first_record, end_record, bad_records, empty_records, sums)


def read_manifest(fs: fsspec.AbstractFileSystem, root: str) -> dict:
    """Read and check ``root/manifest.json``; raises FileNotFoundError / ValueError naming it."""
    path = join(root, MANIFEST)
    if not fs.exists(path):
        raise FileNotFoundError(f"no {MANIFEST} in {root} (not a shard directory written by data.prepare?)")
    try:
        with fs.open(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a difftron token-shard manifest (format != {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path}: manifest version {manifest.get('version')} is not supported (expected {VERSION})")
    for key in ("dtype", "vocab_size", "shards", "tokenizer_fingerprint", "kind", "complete"):
        if key not in manifest:
            raise ValueError(f"{path}: manifest lacks the key {key!r}")
    shards = manifest["shards"]
    entry = ("name", "tokens", "documents", "sha256")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and all(k in s for k in entry) for s in shards):
        raise ValueError(f"{path}: 'shards' must be a list of shard entries ({', '.join(entry)}), got {type(shards).__name__}")
    return manifest


def manifest_digest(manifest: dict) -> str:
    """A short digest of what the shards contain (shard checksums, tokenizer, kind), path-free."""
    body = {k: manifest[k] for k in ("dtype", "vocab_size", "tokenizer_fingerprint", "kind")}
    body["shards"] = [(s["name"], s["tokens"], s["documents"], s["sha256"]) for s in manifest["shards"]]
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


class ShardSet:
    """The shards of one directory as one token stream: memory-mapped, checked, verified lazily.

    ``root`` must be a local directory (remote sources are cached locally first, see
    :mod:`data.sources`). Construction reads the manifest and every ``.idx`` (small), checks
    file sizes against the manifest (a truncated shard fails here), and keeps document offsets
    as global token offsets. ``.bin`` files are memory-mapped on first use; with
    ``verify_checksums`` a shard's sha256 is checked the first time it is read.
    """

    def __init__(self, root: str, *, verify_checksums: bool = True, fetch=None) -> None:
        self.root = root
        self.fs = fsspec.filesystem("file")
        self.manifest = read_manifest(self.fs, root)
        m = self.manifest
        if not m["complete"]:
            raise ValueError(f"{join(root, MANIFEST)}: the prepare run that writes this directory has not finished (complete: false)")
        if not m["shards"]:
            raise ValueError(f"{join(root, MANIFEST)}: no shards")
        self.dtype = np.dtype(m["dtype"])
        self.vocab_size = int(m["vocab_size"])
        self.kind = m["kind"]
        self.verify_checksums = verify_checksums
        self._fetch = fetch  # callable(name) -> None that makes a remote .bin available locally
        self._maps: dict[int, np.ndarray] = {}
        shard_tokens, doc_starts, plens = [], [], []
        base = 0
        for s in m["shards"]:
            offsets = self._read_small(s, "idx", IDX_DTYPE)
            if len(offsets) != s["documents"] + 1 or offsets[0] != 0 or offsets[-1] != s["tokens"] or np.any(np.diff(offsets) <= 0):
                raise ValueError(f"{self._path(s, 'idx')}: document offsets are inconsistent with the manifest (corrupted shard)")
            if self.kind == "sft":
                plen = self._read_small(s, "plen", PLEN_DTYPE)
                if len(plen) != s["documents"]:
                    raise ValueError(f"{self._path(s, 'plen')}: {len(plen)} prompt lengths for {s['documents']} examples")
                plens.append(plen.astype(np.int64))
            if fetch is None:
                self._check_bin_size(s)
            doc_starts.append(offsets[:-1] + base)
            shard_tokens.append(s["tokens"])
            base += s["tokens"]
        self.total_tokens = base
        self.shard_starts = np.concatenate([[0], np.cumsum(shard_tokens)]).astype(np.int64)
        self.doc_starts = np.concatenate(doc_starts + [np.array([base], dtype=np.int64)])
        self.prompt_lengths = np.concatenate(plens) if plens else None
        self.num_documents = len(self.doc_starts) - 1
        self._verified: set[int] = set()

    def _path(self, s: dict, ext: str) -> str:
        return join(self.root, f"{s['name']}.{ext}")

    def _read_small(self, s: dict, ext: str, dtype: np.dtype) -> np.ndarray:
        path = self._path(s, ext)
        if not self.fs.exists(path):
            raise FileNotFoundError(f"{path}: missing (listed in {join(self.root, MANIFEST)})")
        data = self.fs.cat_file(path)
        if len(data) % dtype.itemsize:
            raise ValueError(f"{path}: truncated ({len(data)} bytes, not a multiple of {dtype.itemsize})")
        if sha256_bytes(data) != s["sha256"][ext]:
            raise ValueError(f"{path}: checksum mismatch (sha256 differs from {MANIFEST}; corrupted shard)")
        return np.frombuffer(data, dtype=dtype)

    def _check_bin_size(self, s: dict) -> None:
        path = self._path(s, "bin")
        if not self.fs.exists(path):
            raise FileNotFoundError(f"{path}: missing (listed in {join(self.root, MANIFEST)})")
        size, expect = self.fs.size(path), s["tokens"] * self.dtype.itemsize
        if size != expect:
            raise ValueError(f"{path}: truncated or corrupted: {size} bytes, the manifest says {expect} ({s['tokens']} tokens of {self.dtype.name})")

    def shard_tokens(self, k: int) -> np.ndarray:
        """The memory-mapped tokens of shard ``k`` (checked on first use)."""
        arr = self._maps.get(k)
        if arr is None:
            s = self.manifest["shards"][k]
            if self._fetch is not None:
                self._fetch(s["name"])
                self._check_bin_size(s)
            path = self._path(s, "bin")
            if self.verify_checksums and k not in self._verified:
                if sha256_file(self.fs, path) != s["sha256"]["bin"]:
                    raise ValueError(f"{path}: checksum mismatch (sha256 differs from {MANIFEST}; corrupted shard)")
                self._verified.add(k)
            arr = np.memmap(path, dtype=self.dtype, mode="r", shape=(s["tokens"],))
            self._maps[k] = arr
        return arr

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream (may cross shard boundaries) as int64 [length]."""
        out = np.empty(length, dtype=np.int64)
        pos, done = start, 0
        while done < length:
            k = int(np.searchsorted(self.shard_starts, pos, side="right")) - 1
            lo = pos - int(self.shard_starts[k])
            n = min(length - done, int(self.shard_starts[k + 1]) - pos)
            out[done:done + n] = self.shard_tokens(k)[lo:lo + n]
            done += n
            pos += n
        if out.size and int(out.max()) >= self.vocab_size:
            at = start + int(np.argmax(out >= self.vocab_size))
            k = int(np.searchsorted(self.shard_starts, at, side="right")) - 1
            self._bad_id(k, int(out[at - start]), at - int(self.shard_starts[k]))
        return out

    def check_ids(self, tokens: np.ndarray, k: int) -> None:
        """ValueError naming shard ``k`` if any id in ``tokens`` (read from it) is >= the vocabulary."""
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            bad = int(tokens.flat[int(np.argmax(tokens.reshape(-1) >= self.vocab_size))])
            where = np.flatnonzero(self.shard_tokens(k) == bad)
            self._bad_id(k, bad, int(where[0]) if len(where) else -1)

    def _bad_id(self, k: int, token: int, offset: int) -> None:
        s = self.manifest["shards"][k]
        raise ValueError(
            f"{self._path(s, 'bin')}: token id {token} at token offset {offset} "
            f">= vocab size {self.vocab_size} (corrupted shard or wrong manifest)"
        )

    def shard_of(self, pos: int) -> str:
        k = int(np.searchsorted(self.shard_starts, pos, side="right")) - 1
        return self._path(self.manifest["shards"][k], "bin")
