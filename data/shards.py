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
import mmap
import os
import posixpath
from collections import OrderedDict
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


class OpenMaps:
    """An LRU of open memory maps (one file descriptor each): at most ``max_open``; the least
    recently used is closed (dropped: nothing else keeps a reference) when another opens."""

    def __init__(self, max_open: int) -> None:
        if max_open < 1:
            raise ValueError(f"data.max_open_shards must be >= 1, got {max_open}")
        self.max_open = max_open
        self._maps: OrderedDict = OrderedDict()

    def get(self, key, opener) -> np.ndarray:
        arr = self._maps.get(key)
        if arr is not None:
            self._maps.move_to_end(key)
            return arr
        while len(self._maps) >= self.max_open:
            _, old = self._maps.popitem(last=False)
            _close_map(old)
        arr = opener()
        self._maps[key] = arr
        return arr

    def __len__(self) -> int:
        return len(self._maps)

    def clear(self) -> None:
        while self._maps:
            _close_map(self._maps.popitem(last=False)[1])


def _close_map(arr: np.ndarray) -> None:
    """Drop the LRU's reference: the map (and its descriptor) is freed with the last view of it."""
    del arr


def map_file(path: str, dtype: np.dtype, count: int) -> np.ndarray:
    """A read-only memory map of ``count`` items of ``dtype`` (one descriptor, held by the map)."""
    if count == 0:
        return np.zeros(0, dtype=dtype)
    fd = os.open(path, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, count * dtype.itemsize, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    return np.frombuffer(mm, dtype=dtype, count=count)


class ShardSet:
    """The shards of one directory as one token stream: memory-mapped on use, bounded, checked.

    ``root`` must be a local directory (remote sources are cached locally first, see
    :mod:`data.sources`). Construction reads only the manifest: per-shard token counts (small,
    the number of shards) and the ``.bin`` checksums. Document offsets are read from the ``.idx``
    files only when the sample index is built (:mod:`data.index`, once per data configuration,
    checksummed). A ``.bin`` is memory-mapped when first read, after its size is checked against
    the manifest (a missing or truncated shard fails there, naming the file), and closed when
    more than ``max_open`` shards are open (LRU). Checksums of ``.bin`` files are verified in the
    background (:class:`ChecksumVerifier`), never on the reading thread.
    """

    def __init__(self, root: str, *, verify_checksums: bool = True, fetch=None, max_open: int = 64) -> None:
        self.root = root
        self.index_root = root  # where the cached sample index goes by default (data.index)
        self.fs = fsspec.filesystem("file")
        manifest = read_manifest(self.fs, root)
        m = manifest
        if not m["complete"]:
            raise ValueError(f"{join(root, MANIFEST)}: the prepare run that writes this directory has not finished (complete: false)")
        if not m["shards"]:
            raise ValueError(f"{join(root, MANIFEST)}: no shards")
        self.dtype = np.dtype(m["dtype"])
        self.vocab_size = int(m["vocab_size"])
        self.kind = m["kind"]
        self.verify_checksums = verify_checksums
        self.digest = manifest_digest(m)
        self.names = [s["name"] for s in m["shards"]]
        self.bin_sha256 = [s["sha256"]["bin"] for s in m["shards"]]
        tokens = np.array([s["tokens"] for s in m["shards"]], dtype=np.int64)
        self.num_documents = int(sum(s["documents"] for s in m["shards"]))
        # the manifest without its per-shard list (that can be long): what the loader compares
        self.manifest = {k: v for k, v in m.items() if k != "shards"}
        self._fetch = fetch  # callable(name) -> None that makes a remote .bin available locally
        self._maps = OpenMaps(max_open)
        self.total_tokens = int(tokens.sum())
        self.shard_starts = np.concatenate([[0], np.cumsum(tokens)]).astype(np.int64)
        self.bad_marker = None  # callable(name) -> str | None: a recorded checksum failure (ChecksumVerifier)
        self.cache = None  # the remote mirror (data.sources.ShardCache) when the shards are remote
        self._listed_in, self._sized_by = f"listed in {join(root, MANIFEST)}", "the manifest"

    def _path(self, k: int, ext: str) -> str:
        return os.path.join(self.root, f"{self.names[k]}.{ext}")

    def bin_path(self, k: int) -> str:
        return self._path(k, "bin")

    @property
    def num_shards(self) -> int:
        return len(self.names)

    @property
    def open_shards(self) -> int:
        return len(self._maps)

    def _read_small(self, s: dict, ext: str, dtype: np.dtype) -> np.ndarray:
        path = os.path.join(self.root, f"{s['name']}.{ext}")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing (listed in {join(self.root, MANIFEST)})") from None
        if len(data) % dtype.itemsize:
            raise ValueError(f"{path}: truncated ({len(data)} bytes, not a multiple of {dtype.itemsize})")
        if sha256_bytes(data) != s["sha256"][ext]:
            raise ValueError(f"{path}: checksum mismatch (sha256 differs from {MANIFEST}; corrupted shard)")
        return np.frombuffer(data, dtype=dtype)

    def document_chunks(self):
        """(document starts int64 [n + 1] as stream offsets, prompt lengths int64 [n] or None) per
        shard, in order, read from the checksummed ``.idx``/``.plen`` files (for the index build;
        every ``.bin`` size is checked here too)."""
        m = read_manifest(self.fs, self.root)
        if manifest_digest(m) != self.digest:
            raise ValueError(f"{join(self.root, MANIFEST)}: changed while the loader started")
        for k, s in enumerate(m["shards"]):
            if self._fetch is not None:  # a remote mirror: the .idx/.plen are copied once, for this build
                for ext in ("idx", "plen") if self.kind == "sft" else ("idx",):
                    self._fetch(s["name"], ext)
            offsets = self._read_small(s, "idx", IDX_DTYPE)
            if len(offsets) != s["documents"] + 1 or offsets[0] != 0 or offsets[-1] != s["tokens"] or np.any(np.diff(offsets) <= 0):
                raise ValueError(f"{self._path(k, 'idx')}: document offsets are inconsistent with the manifest (corrupted shard)")
            plen = None
            if self.kind == "sft":
                plen = self._read_small(s, "plen", PLEN_DTYPE)
                if len(plen) != s["documents"]:
                    raise ValueError(f"{self._path(k, 'plen')}: {len(plen)} prompt lengths for {s['documents']} examples")
                plen = plen.astype(np.int64)
            if self._fetch is None:
                self._check_bin_size(k)
            yield offsets + self.shard_starts[k], plen

    def _check_bin_size(self, k: int) -> None:
        path = self._path(k, "bin")
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing ({self._listed_in})") from None
        expect = int(self.shard_starts[k + 1] - self.shard_starts[k]) * self.dtype.itemsize
        if size != expect:
            raise ValueError(f"{path}: truncated or corrupted: {size} bytes, {self._sized_by} says {expect} ({expect // self.dtype.itemsize} tokens of {self.dtype.name})")

    def _open(self, k: int) -> np.ndarray:
        if self._fetch is not None:
            self._fetch(self.names[k])
        self._check_bin_size(k)
        if self.bad_marker is not None:
            why = self.bad_marker(self.names[k])
            if why:
                raise ValueError(why)
        return map_file(self._path(k, "bin"), self.dtype, int(self.shard_starts[k + 1] - self.shard_starts[k]))

    def shard_tokens(self, k: int) -> np.ndarray:
        """The memory-mapped tokens of shard ``k`` (size-checked when opened; LRU-bounded)."""
        return self._maps.get(k, lambda: self._open(k))

    def close(self) -> None:
        self._maps.clear()

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
        raise ValueError(
            f"{self._path(k, 'bin')}: token id {token} at token offset {offset} "
            f">= vocab size {self.vocab_size} (corrupted shard or wrong manifest)"
        )

    def shard_of(self, pos: int) -> str:
        k = int(np.searchsorted(self.shard_starts, pos, side="right")) - 1
        return self._path(k, "bin")
