"""Synthetic token-shard directories written directly with numpy (no tokenizer): for the golden
sample-sequence test and the 30,000-shard / 50 M-document scale test.

``write_shard_dir`` writes real ``.idx`` files and a real manifest; ``.bin`` files are either real
(seeded random tokens) or sparse (``sparse=True``: holes of zeros, no disk blocks; shards of one
size are hard links to one sparse file).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np


def write_shard_dir(
    root, doc_lengths: list[np.ndarray], *, vocab_size: int = 1000, seed: int = 0, kind: str = "pretrain",
    eos_id: int = 1, sparse: bool = False, prompt_lengths: list[np.ndarray] | None = None,
) -> Path:
    """A complete shard directory with one shard per entry of ``doc_lengths`` (int arrays, > 0)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")
    rng = np.random.default_rng(seed)
    shards, total_tokens, total_docs = [], 0, 0
    zero_sums: dict[int, str] = {}
    for k, lengths in enumerate(doc_lengths):
        lengths = np.asarray(lengths, dtype=np.int64)
        name = f"shard_{k:05d}"
        offsets = np.zeros(len(lengths) + 1, dtype="<i8")
        np.cumsum(lengths, out=offsets[1:])
        n = int(offsets[-1])
        idx_bytes = offsets.tobytes()
        with open(os.path.join(root, f"{name}.idx"), "wb") as f:
            f.write(idx_bytes)
        sums = {"idx": hashlib.sha256(idx_bytes).hexdigest()}
        if sparse:  # all-zero tokens; shards of one size share one sparse file (hard links: cheap to make)
            if n not in zero_sums:
                with open(root / f"zeros_{n}.sparse", "wb") as f:
                    f.truncate(n * dtype.itemsize)
                zero_sums[n] = hashlib.sha256(bytes(n * dtype.itemsize)).hexdigest()
            os.link(root / f"zeros_{n}.sparse", root / f"{name}.bin")
            sums["bin"] = zero_sums[n]
        else:
            tokens = rng.integers(2, vocab_size, size=n).astype(dtype)
            tokens[offsets[1:] - 1] = eos_id
            data = tokens.tobytes()
            (root / f"{name}.bin").write_bytes(data)
            sums["bin"] = hashlib.sha256(data).hexdigest()
        if kind == "sft":
            plen = np.asarray(prompt_lengths[k], dtype="<i4")
            (root / f"{name}.plen").write_bytes(plen.tobytes())
            sums["plen"] = hashlib.sha256(plen.tobytes()).hexdigest()
        shards.append({"name": name, "tokens": n, "documents": len(lengths), "first_record": total_docs,
                       "end_record": total_docs + len(lengths), "bad_records": 0, "empty_records": 0, "sha256": sums})
        total_tokens += n
        total_docs += len(lengths)
    manifest = {
        "format": "difftron-token-shards", "version": 1, "kind": kind, "dtype": dtype.str, "vocab_size": vocab_size,
        "eos_token_id": eos_id, "bos_token_id": None, "pad_token_id": None, "mask_token_id": None,
        "tokenizer_fingerprint": "synthetic", "tokenizer": "tokenizer", "tokenizer_source": "synthetic",
        "source": {"synthetic": seed}, "shard_tokens": 0, "shards": shards, "records_consumed": total_docs,
        "total_tokens": total_tokens, "total_documents": total_docs, "bad_records": 0, "empty_records": 0,
        "complete": True,
    }
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, root / "manifest.json")
    return root


def random_lengths(num_shards: int, docs_per_shard: int, seed: int, lo: int = 3, hi: int = 60) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(lo, hi, size=docs_per_shard) for _ in range(num_shards)]
