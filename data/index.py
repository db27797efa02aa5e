"""The cached sample index: built once per data configuration, memory-mapped by every rank.

For one source (a shard directory or a Megatron prefix) and one ``validation_fraction``, the
index holds, for both splits, what maps a sample to tokens of the source's stream:

- pretraining: ``{split}_seg_start`` int64 [R] (stream offset of each maximal run of consecutive
  documents of the split) and ``{split}_seg_cum`` int64 [R + 1] (tokens before each run, then
  the split's total); a window ``i`` is tokens ``[i·L, (i+1)·L)`` of the split's runs back to back;
- SFT: ``doc_starts`` int64 [D + 1], ``prompt_lengths`` int64 [D] and ``{split}_examples`` int64
  (the documents of the split).

The files are ``.npy`` under ``BASE/<key>/`` (``BASE`` is ``data.cache_dir/index`` or
``.difftron_index`` next to the data, ``~/.cache/difftron/index`` when that is not writable), where
``key`` is a digest of everything the arrays depend on: the index format, the source's content
digest (shard checksums, token and document counts) and the validation fraction. ``meta.json``,
written last, repeats those fields; a directory whose ``meta.json`` does not match them (built for
other data) is rebuilt, never used. The first process to need an index builds it under a file
lock (``BASE/<key>.lock``) into a temporary directory and renames it into place; the others wait on
the lock and then memory-map the result. Building streams over the documents shard by shard, so
its memory is bounded by the largest shard, not the corpus; the readers hold only pages they touch.

Also here: :class:`ChecksumVerifier`, the once-per-node background sha256 check of ``.bin`` files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from filelock import FileLock

INDEX_FORMAT = "difftron-sample-index"
INDEX_VERSION = 1
LOCK_TIMEOUT_S = 6 * 3600  # waiting for another rank's build (a 2T-token corpus takes minutes)
_CHUNK = 1 << 20


def derive_key(*parts) -> int:
    """A 64-bit key from any tuple of ints/strings (stable across processes and platforms)."""
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "little")


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer over a uint64 array (wraps mod 2**64; call under ``np.errstate(over="ignore")``)."""
    z = z.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _validation_u(lo: int, hi: int) -> np.ndarray:
    """float64 [hi - lo] in [0, 1): the fixed hash of documents lo..hi-1 (seed-independent)."""
    with np.errstate(over="ignore"):
        h = mix64(np.arange(lo, hi, dtype=np.uint64) ^ np.uint64(derive_key("validation")))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def forced_validation_document(num_documents: int, fraction: float) -> Optional[int]:
    """The one document held out when the hash holds out none (a tiny corpus), else None."""
    if fraction <= 0 or num_documents < 2:
        return None
    best, best_u = None, 2.0
    for lo in range(0, num_documents, _CHUNK):
        u = _validation_u(lo, min(num_documents, lo + _CHUNK))
        if (u < fraction).any():
            return None
        i = int(np.argmin(u))
        if u[i] < best_u:
            best, best_u = lo + i, float(u[i])
    return best


def held_out(lo: int, hi: int, fraction: float, forced: Optional[int]) -> np.ndarray:
    """bool [hi - lo]: which of documents lo..hi-1 are in the validation split."""
    if fraction <= 0:
        return np.zeros(hi - lo, dtype=bool)
    held = _validation_u(lo, hi) < fraction
    if forced is not None and lo <= forced < hi:
        held[forced - lo] = True
    return held


def validation_documents(num_documents: int, fraction: float) -> np.ndarray:
    """bool [num_documents]: the held-out documents (hash of the index < fraction; >= 1 when > 0)."""
    return held_out(0, num_documents, fraction, forced_validation_document(num_documents, fraction))


# ----- where the index lives --------------------------------------------------------------------


def _writable_dir(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe", delete=True)
        probe.close()
        return True
    except OSError:
        return False


def index_base(data_root: str, cache_dir: Optional[str]) -> str:
    """The directory that holds cached indexes for data at ``data_root`` (see the module docstring)."""
    if cache_dir:
        base = os.path.join(cache_dir, "index")
        if not _writable_dir(base):
            raise OSError(f"{base}: cannot write the sample index cache there (data.cache_dir)")
        return base
    base = os.path.join(data_root, ".difftron_index")
    if _writable_dir(base):
        return base
    base = os.path.join(os.path.expanduser("~"), ".cache", "difftron", "index")
    if not _writable_dir(base):
        raise OSError(f"{base}: cannot write the sample index cache (set data.cache_dir)")
    return base


def index_fields(source_digest: str, kind: str, num_documents: int, validation_fraction: float) -> dict:
    return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "source": source_digest, "kind": kind,
            "documents": int(num_documents), "validation_fraction": float(validation_fraction).hex()}


def index_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


# ----- building -----------------------------------------------------------------------------------


class _Appender:
    """An int64 array written in pieces to a raw file, then turned into ``NAME.npy``."""

    def __init__(self, directory: str, name: str) -> None:
        self.path = os.path.join(directory, name)
        self.raw = open(self.path + ".raw", "wb")
        self.count = 0

    def add(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype="<i8")
        self.raw.write(values.tobytes())
        self.count += len(values)

    def finish(self, cumulative: bool = False) -> None:
        """Write ``NAME.npy`` (with a leading 0 and running sums when ``cumulative``)."""
        self.raw.close()
        n = self.count + (1 if cumulative else 0)
        src = np.memmap(self.path + ".raw", dtype="<i8", mode="r", shape=(self.count,)) if self.count else np.zeros(0, "<i8")
        with open(self.path + ".npy", "wb") as out:
            np.lib.format.write_array_header_1_0(out, {"descr": "<i8", "fortran_order": False, "shape": (n,)})
            total = 0
            if cumulative:
                out.write(np.zeros(1, "<i8").tobytes())
            for lo in range(0, self.count, _CHUNK):
                piece = np.asarray(src[lo:lo + _CHUNK])
                if cumulative:
                    piece = np.cumsum(piece) + total
                    total = int(piece[-1])
                out.write(piece.astype("<i8").tobytes())
        del src
        os.remove(self.path + ".raw")


class _Runs:
    """Maximal runs of consecutive selected documents, streamed chunk by chunk."""

    def __init__(self, directory: str, split: str) -> None:
        self.starts = _Appender(directory, f"{split}_seg_start")
        self.lengths = _Appender(directory, f"{split}_seg_cum")
        self.open_at: Optional[int] = None  # stream offset where the current run began

    def add(self, selected: np.ndarray, starts: np.ndarray) -> None:
        """``selected`` bool [n] for documents with stream starts ``starts`` [n + 1]."""
        prev = np.int8(self.open_at is not None)
        edges = np.diff(np.concatenate([[prev], selected.astype(np.int8)]))
        begin, end = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        begin_tok = starts[begin]
        end_tok = starts[end]
        if self.open_at is not None:
            begin_tok = np.concatenate([[self.open_at], begin_tok])
        if selected[-1]:
            self.open_at = int(begin_tok[-1])
            begin_tok = begin_tok[:-1]
        else:
            self.open_at = None
        self.starts.add(begin_tok)
        self.lengths.add(end_tok - begin_tok)

    def finish(self, end: int) -> None:
        if self.open_at is not None:
            self.starts.add(np.array([self.open_at]))
            self.lengths.add(np.array([end - self.open_at]))
        self.starts.finish()
        self.lengths.finish(cumulative=True)


def build_index(directory: str, chunks: Iterator, *, kind: str, num_documents: int, validation_fraction: float) -> dict:
    """Write the index arrays into ``directory`` from ``chunks`` of (starts [n+1], prompt lengths or None)."""
    forced = forced_validation_document(num_documents, validation_fraction)
    sft = kind == "sft"
    if sft:
        doc_starts = _Appender(directory, "doc_starts")
        plens = _Appender(directory, "prompt_lengths")
        examples = {s: _Appender(directory, f"{s}_examples") for s in ("train", "validation")}
    else:
        runs = {s: _Runs(directory, s) for s in ("train", "validation")}
    done, end = 0, 0
    for starts, plen in chunks:
        n = len(starts) - 1
        if n <= 0:
            continue
        held = held_out(done, done + n, validation_fraction, forced)
        if sft:
            doc_starts.add(starts[:-1])
            plens.add(plen)
            examples["validation"].add(done + np.flatnonzero(held))
            examples["train"].add(done + np.flatnonzero(~held))
        else:
            runs["validation"].add(held, starts)
            runs["train"].add(~held, starts)
        done += n
        end = int(starts[-1])
    if done != num_documents:
        raise ValueError(f"the index files list {done} documents, the manifest {num_documents}")
    if sft:
        doc_starts.add(np.array([end]))
        for a in (doc_starts, plens, *examples.values()):
            a.finish()
    else:
        for r in runs.values():
            r.finish(end)
    return {"documents": done, "tokens": end}


class SampleIndex:
    """The memory-mapped arrays of one built index (see the module docstring)."""

    def __init__(self, directory: str, meta: dict) -> None:
        self.directory, self.meta = directory, meta
        self.arrays: dict[str, np.ndarray] = {}
        for name in meta["arrays"]:
            arr = np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r")
            if arr.shape != (meta["arrays"][name],) or arr.dtype != np.dtype("<i8"):
                raise ValueError(f"{directory}/{name}.npy: shape {arr.shape} or dtype {arr.dtype} differs from meta.json")
            self.arrays[name] = arr

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]


def _try_load(directory: str, fields: dict) -> Optional[SampleIndex]:
    try:
        with open(os.path.join(directory, "meta.json")) as f:
            meta = json.load(f)
        if meta.get("fields") != fields:
            return None  # built for other data or settings: never used
        return SampleIndex(directory, meta)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_or_build_index(source, *, validation_fraction: float, cache_dir: Optional[str]) -> SampleIndex:
    """The source's index for ``validation_fraction``: memory-mapped from the cache, built if needed.

    ``source`` provides ``root`` (where its data lives), ``digest``, ``kind``, ``num_documents`` and
    ``document_chunks()``; see :class:`data.shards.ShardSet`.
    """
    fields = index_fields(source.digest, source.kind, source.num_documents, validation_fraction)
    base = index_base(source.index_root, cache_dir)
    key = index_key(fields)
    final = os.path.join(base, key)
    found = _try_load(final, fields)
    if found is not None:
        return found
    with FileLock(os.path.join(base, f"{key}.lock"), timeout=LOCK_TIMEOUT_S):
        found = _try_load(final, fields)  # another rank built it while we waited
        if found is not None:
            return found
        if os.path.exists(final):
            shutil.rmtree(final)  # stale or foreign: rebuilt, never used
        tmp = tempfile.mkdtemp(prefix=f"{key}.tmp", dir=base)
        try:
            try:
                stats = build_index(tmp, source.document_chunks(), kind=source.kind,
                                    num_documents=source.num_documents, validation_fraction=validation_fraction)
                arrays = {p.stem: int(np.load(p, mmap_mode="r").shape[0]) for p in sorted(Path(tmp).glob("*.npy"))}
                meta = {"fields": fields, "arrays": arrays, "source_root": str(source.root), **stats}
                with open(os.path.join(tmp, "meta.json"), "w") as f:
                    json.dump(meta, f, indent=1)
            except OSError as e:
                where = e.filename or tmp
                raise OSError(f"{where}: cannot write the sample index ({e.strerror or e}); free space or set data.cache_dir") from None
            try:
                os.replace(tmp, final)
            except OSError:  # a builder the lock did not exclude (a filesystem without working locks) won
                found = _try_load(final, fields)
                if found is None:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                return found
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return SampleIndex(final, meta)


# ----- once-per-node checksums ------------------------------------------------------------------


class ChecksumVerifier:
    """sha256 of every ``.bin`` of a shard directory, checked once per cache directory (per node
    when the cache is node-local) in a background thread of the one process that holds
    ``checksums-<digest>-<path digest>/verify.lock``; verified shards are appended to ``verified.txt`` so no
    later run repeats them, and a mismatch is recorded as ``bad-<shard>`` which every process
    checks when it opens that shard (and the verifying process reports at its next batch)."""

    def __init__(self, shards, base: str) -> None:
        self.shards = shards
        where = hashlib.sha256(os.path.realpath(shards.root).encode()).hexdigest()[:8]
        self.dir = os.path.join(base, f"checksums-{shards.digest}-{where}")  # these files, at this place
        os.makedirs(self.dir, exist_ok=True)
        self.error: Optional[str] = None
        self._lock = FileLock(os.path.join(self.dir, "verify.lock"), thread_local=False)
        self._stop = threading.Event()
        self.thread: Optional[threading.Thread] = None
        shards.bad_marker = self.recorded_failure
        if len(self._done()) >= shards.num_shards:
            return  # all done on an earlier run
        try:
            self._lock.acquire(timeout=0)
        except Exception:  # filelock.Timeout: another process on this node verifies
            return
        self.thread = threading.Thread(target=self._run, name="difftron-checksums", daemon=True)
        self.thread.start()

    def _done(self) -> set[str]:
        """Shards verified (``verified.txt``) or found bad (``bad-NAME``) by any earlier check."""
        bad = {n[len("bad-"):] for n in os.listdir(self.dir) if n.startswith("bad-")}
        try:
            with open(os.path.join(self.dir, "verified.txt")) as f:
                return bad | {line.strip() for line in f if line.strip()}
        except FileNotFoundError:
            return bad

    def recorded_failure(self, name: str) -> Optional[str]:
        path = os.path.join(self.dir, f"bad-{name}")
        if os.path.exists(path):
            with open(path) as f:
                return f.read().strip()
        return None

    def _run(self) -> None:
        from data.shards import MANIFEST, sha256_file

        try:
            done = self._done()
            with open(os.path.join(self.dir, "verified.txt"), "a") as record:
                for k, name in enumerate(self.shards.names):
                    if self._stop.is_set():
                        return
                    if name in done:
                        continue
                    path = self.shards.bin_path(k)
                    try:
                        self.shards._check_bin_size(k)
                        digest = sha256_file(self.shards.fs, path)
                    except (OSError, ValueError):
                        continue  # missing, truncated, unreadable: reported by the size check when opened
                    if digest != self.shards.bin_sha256[k]:
                        msg = f"{path}: checksum mismatch (sha256 differs from {MANIFEST}; corrupted shard; recorded by {socket.gethostname()})"
                        with open(os.path.join(self.dir, f"bad-{name}"), "w") as f:
                            f.write(msg)
                        self.error = self.error or msg
                        continue
                    record.write(name + "\n")
                    record.flush()
        except OSError:
            pass  # the cache went away or is full: verified another time
        finally:
            self._lock.release()

    def join(self, timeout: Optional[float] = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def stop(self) -> None:
        self._stop.set()
