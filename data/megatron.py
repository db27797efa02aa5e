"""Megatron-LM's indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``) as a loader source.

Such a pair is what Megatron's ``tools/preprocess_data.py`` writes (and ``python -m data.prepare
--format megatron``): ``.bin`` holds the tokens of every sequence back to back, ``.idx`` their
dtype, lengths, byte offsets and which sequences make each document. The index is read with
megatron-core's own :class:`~megatron.core.datasets.indexed_dataset.IndexedDataset`; the tokens
are memory-mapped like one shard of a shard directory, and each Megatron *document* is a
document for packing and the validation hold-out. The tokenizer is not stored in the pair, so
``data.tokenizer`` names it (or a shard directory in the same mixture supplies it).
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Optional

import numpy as np

from data.shards import OpenMaps, ShardSet

_SAMPLE_BLOCKS, _SAMPLE_BYTES = 64, 1 << 16


def is_megatron_prefix(path: str) -> bool:
    return os.path.isfile(path + ".idx") and os.path.isfile(path + ".bin")


def _open_index(prefix: str):
    """megatron-core's IndexedDataset for ``prefix``; ValueError naming the .idx if it is not one."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    logging.getLogger("megatron.core.datasets.indexed_dataset").setLevel(logging.WARNING)
    for ext in ("idx", "bin"):
        if not os.path.isfile(f"{prefix}.{ext}"):
            raise FileNotFoundError(f"{prefix}.{ext}: missing (Megatron indexed dataset {prefix})")
    try:
        return IndexedDataset(prefix, multimodal=False, mmap=True)
    except (AssertionError, ValueError, KeyError, IndexError, OSError, TypeError) as e:
        raise ValueError(f"{prefix}.idx: not a readable Megatron indexed-dataset index ({e or type(e).__name__})") from None


def _sampled_digest(path: str) -> str:
    """sha256 of the size and 64 evenly spaced 64 KiB blocks of a file (cheap for a 50 GB .idx)."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(_SAMPLE_BLOCKS):
            f.seek(max(0, size - _SAMPLE_BYTES) * i // max(1, _SAMPLE_BLOCKS - 1))
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


class MegatronSource(ShardSet):
    """One Megatron ``PREFIX.bin``/``PREFIX.idx`` pair with the reading interface of a :class:`ShardSet`."""

    def __init__(self, prefix: str, *, vocab_size: int, tokenizer_fingerprint: str, eos_token_id: Optional[int],
                 max_open: int = 64) -> None:
        self.root = prefix
        self.index_root = os.path.dirname(os.path.abspath(prefix))
        ds = _open_index(prefix)
        index = ds.index
        self.dtype = np.dtype(index.dtype).newbyteorder("<")
        self.vocab_size = int(vocab_size)
        self.kind = "pretrain"
        self.verify_checksums = False
        self.names = [os.path.basename(prefix)]
        self.bin_sha256 = [None]
        n_seq = int(index.sequence_count)
        last_ptr = int(index.sequence_pointers[-1]) if n_seq else 0
        last_len = int(index.sequence_lengths[-1]) if n_seq else 0
        expect = last_ptr + last_len * self.dtype.itemsize
        size = os.path.getsize(prefix + ".bin")
        if size != expect:
            raise ValueError(
                f"{prefix}.bin: {size} bytes, but {prefix}.idx (dtype {self.dtype.name}, {n_seq} sequences) says {expect}: "
                f"the .idx does not belong to this .bin (dtype or size disagree)"
            )
        total = expect // self.dtype.itemsize
        self.num_documents = int(index.document_count) - 1
        self.total_tokens = total
        self.shard_starts = np.array([0, total], dtype=np.int64)
        self.digest = hashlib.sha256(f"megatron:{self.dtype.str}:{size}:{_sampled_digest(prefix + '.idx')}".encode()).hexdigest()[:16]
        self.manifest = {"kind": "pretrain", "vocab_size": int(vocab_size), "tokenizer_fingerprint": tokenizer_fingerprint,
                         "eos_token_id": eos_token_id, "dtype": self.dtype.str, "format": "megatron-indexed-dataset"}
        self._fetch = None
        self._maps = OpenMaps(max_open)
        self.bad_marker = None
        self.cache = None
        self._listed_in, self._sized_by = f"Megatron indexed dataset {prefix}", "its .idx"
        del ds

    def _path(self, k: int, ext: str) -> str:
        return f"{self.root}.{ext}"

    def document_chunks(self):
        """(document starts [n + 1] as token offsets, None) in chunks of documents, from the .idx."""
        ds = _open_index(self.root)
        index = ds.index
        lengths, pointers, docs = index.sequence_lengths, index.sequence_pointers, index.document_indices
        item = self.dtype.itemsize
        step = 1 << 20
        n_seq = len(lengths)
        expect_ptr = 0
        for lo in range(0, n_seq, step):  # sequences must lie back to back (as Megatron's builder writes them)
            ptr = np.asarray(pointers[lo:lo + step], dtype=np.int64)
            ln = np.asarray(lengths[lo:lo + step], dtype=np.int64)
            cum = np.concatenate([[expect_ptr], expect_ptr + np.cumsum(ln * item)[:-1]])
            if not np.array_equal(ptr, cum):
                raise ValueError(f"{self.root}.idx: sequence offsets are not contiguous in the .bin (unsupported or corrupted index)")
            expect_ptr = int(cum[-1] + ln[-1] * item)
        for lo in range(0, self.num_documents, step):
            d = np.asarray(docs[lo:min(len(docs), lo + step + 1)], dtype=np.int64)
            starts = np.empty(len(d), dtype=np.int64)
            inside = d < n_seq
            starts[inside] = np.asarray(pointers[d[inside]], dtype=np.int64) // item
            starts[~inside] = self.total_tokens
            if np.any(np.diff(starts) < 0):
                raise ValueError(f"{self.root}.idx: document indices are not increasing (corrupted index)")
            yield starts, None
        del ds
