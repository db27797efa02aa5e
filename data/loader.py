"""The deterministic mixture loader: global sample ``i = step·G + j`` -> one token window.

Every sample is a pure function of ``(seed, i)`` (``G`` the global batch), computed in three steps,
none of which depends on the number of data-parallel ranks:

1. **mixture**: global samples come in blocks of ``mixture_block_size``; each block holds source
   ``k`` exactly ``c_k`` times (``c_k`` = largest-remainder rounding of ``weight_k · block``), in a
   seeded order, so the realized proportions match the weights to within one block. The rank of
   ``i`` among its block's samples of source ``k`` gives ``n``, the ``n``-th sample drawn from ``k``.
2. **epochs**: ``n = epoch · N_k + p`` where ``N_k`` is the number of samples of source ``k`` in
   this split; position ``p`` maps to a sample through a seeded bijection of ``[0, N_k)`` (a Feistel
   cipher with cycle walking: O(1) memory, a fresh permutation per epoch).
3. **packing**: a pretraining source's documents of this split are concatenated (each already
   ends with EOS) and cut into windows of ``seq_len`` tokens; an SFT source's samples are its
   examples, truncated or padded with EOS to ``seq_len``, with their prompt lengths. An SFT batch
   also gives ``pad_length``, the length of the longest example of the whole GLOBAL batch (at most
   ``seq_len``): the trainer cuts every row to it, so each example is EOS-padded to the global
   batch's longest (LLaDA's rule, per global batch: independent of the data-parallel split).

The validation split holds out whole documents, chosen by a hash of the document index (fixed,
independent of the seed). Each rank reads only its own samples from memory-mapped shards.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from data.config import DataConfig
from data.index import (  # noqa: F401
    ChecksumVerifier,
    SampleIndex,
    derive_key,
    index_base,
    load_or_build_index,
    mix64,
    validation_documents,
)
from data.shards import (
    MANIFEST,
    TOKENIZER_DIR,
    ShardSet,
    join,
    load_tokenizer_dir,
    tokenizer_fingerprint,
)
from data.sources import open_source

STATE_FORMAT = "difftron-loader"
STATE_VERSION = 1
_FEISTEL_ROUNDS = 4
_TABLE_LIMIT = 1 << 22  # sources with at most this many samples keep a permutation table per epoch (<= 16 MB)


def permute(x: np.ndarray, n: int, key: int) -> np.ndarray:
    """A seeded bijection of ``[0, n)`` applied to ``x`` (int array of values in ``[0, n)``)."""
    x = np.asarray(x, dtype=np.uint64)
    if n <= 1:
        return x.astype(np.int64)
    bits = max(2, (n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    round_keys = [np.uint64(derive_key(key, r)) for r in range(_FEISTEL_ROUNDS)]

    def encrypt(y: np.ndarray) -> np.ndarray:
        left, right = y >> half, y & mask
        for k in round_keys:
            left, right = right, left ^ (mix64(right ^ k) & mask)
        return (left << half) | right

    with np.errstate(over="ignore"):
        y = encrypt(x)
        todo = np.flatnonzero(y >= np.uint64(n))
        while len(todo):  # cycle walking: the domain is < 4n, so a few rounds on average
            y[todo] = encrypt(y[todo])
            todo = todo[y[todo] >= np.uint64(n)]
    return y.astype(np.int64)


def mixture_counts(weights: list[float], block: int) -> np.ndarray:
    """int [K]: samples of each source per block of ``block`` (largest-remainder rounding)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * block
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: block - int(counts.sum())]] += 1
    return counts


class SourceSplit:
    """One source restricted to one split: its samples as packed windows or SFT examples.

    The arrays come from the source's cached, memory-mapped :class:`~data.index.SampleIndex`
    (shared by both splits and every rank), so nothing here grows with the number of documents.
    """

    def __init__(self, shards: ShardSet, index: SampleIndex, *, split: str, seq_len: int, eos_id: int) -> None:
        self.shards, self.seq_len, self.eos_id = shards, seq_len, eos_id
        self.sft = shards.kind == "sft"
        if self.sft:
            self.examples = index[f"{split}_examples"]
            self.doc_starts = index["doc_starts"]
            self.prompt_lengths = index["prompt_lengths"]
            self.num_samples = len(self.examples)
        else:
            # maximal runs of consecutive documents of this split = contiguous token segments
            self.seg_start = index[f"{split}_seg_start"]
            self.seg_cum = index[f"{split}_seg_cum"]
            self.num_samples = int(self.seg_cum[-1]) // seq_len

    def read_many(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int64 [N, seq_len], prompt lengths int64 [N]) of samples ``idx`` [N].

        Windows that lie inside one segment and one shard (nearly all) are gathered with one
        fancy-indexing read per shard; the rest go through :meth:`read`.
        """
        L, N = self.seq_len, len(idx)
        out = np.empty((N, L), dtype=np.int64)
        plens = np.zeros(N, dtype=np.int64)
        if self.sft:
            for r, i in enumerate(idx):
                out[r], plens[r] = self.read(int(i))
            return out, plens
        v = idx.astype(np.int64) * L
        s = np.searchsorted(self.seg_cum, v, side="right") - 1
        start = self.seg_start[s] + v - self.seg_cum[s]
        starts = self.shards.shard_starts
        k = np.searchsorted(starts, start, side="right") - 1
        fast = (v + L <= self.seg_cum[s + 1]) & (start + L <= starts[k + 1])
        cols = np.arange(L, dtype=np.int64)
        for shard in np.unique(k[fast]):
            rows = np.flatnonzero(fast & (k == shard))
            tokens = self.shards.shard_tokens(int(shard))
            out[rows] = tokens[(start[rows] - starts[shard])[:, None] + cols]
            self.shards.check_ids(out[rows], int(shard))
        for r in np.flatnonzero(~fast):
            out[r] = self.read(int(idx[r]))[0]
        return out, plens

    def example_lengths(self, idx: np.ndarray) -> np.ndarray:
        """Token lengths (at most ``seq_len``) of SFT samples ``idx``, from the index alone."""
        docs = self.examples[np.asarray(idx, dtype=np.int64)]
        starts = self.doc_starts
        return np.minimum(starts[docs + 1] - starts[docs], self.seq_len).astype(np.int64)

    def shards_of(self, idx: np.ndarray) -> np.ndarray:
        """The shards (sorted, unique) where samples ``idx`` start and end: what to download ahead."""
        if self.sft:
            lo = self.doc_starts[self.examples[idx]]
            hi = lo
        else:
            v = idx.astype(np.int64) * self.seq_len
            s = np.searchsorted(self.seg_cum, v, side="right") - 1
            lo = self.seg_start[s] + v - self.seg_cum[s]
            hi = np.minimum(lo + self.seq_len - 1, self.shards.total_tokens - 1)
        starts = self.shards.shard_starts
        return np.unique(np.concatenate([np.searchsorted(starts, lo, side="right"), np.searchsorted(starts, hi, side="right")]) - 1)

    def read(self, idx: int) -> tuple[np.ndarray, int]:
        """(tokens int64 [seq_len], prompt length) of sample ``idx``."""
        L = self.seq_len
        if self.sft:
            doc = int(self.examples[idx])
            lo, hi = int(self.doc_starts[doc]), int(self.doc_starts[doc + 1])
            n = min(hi - lo, L)
            out = np.full(L, self.eos_id, dtype=np.int64)
            out[:n] = self.shards.read(lo, n)
            return out, min(int(self.prompt_lengths[doc]), L)
        v, done = idx * L, 0
        s = int(np.searchsorted(self.seg_cum, v, side="right")) - 1
        if v + L <= self.seg_cum[s + 1]:  # the common case: one contiguous piece
            return self.shards.read(int(self.seg_start[s]) + v - int(self.seg_cum[s]), L), 0
        out = np.empty(L, dtype=np.int64)
        while done < L:
            n = min(L - done, int(self.seg_cum[s + 1]) - v)
            out[done:done + n] = self.shards.read(int(self.seg_start[s]) + v - int(self.seg_cum[s]), n)
            done, v, s = done + n, v + n, s + 1
        return out, 0


def _megatron_tokenizer(cfg: DataConfig):
    """(vocab size, fingerprint, eos id) of data.tokenizer when a source is a Megatron dataset, else None."""
    from data.megatron import is_megatron_prefix

    megatron = [i for i, s in enumerate(cfg.sources) if s.format == "megatron" or (s.format == "auto" and is_megatron_prefix(s.path))]
    if not megatron:
        return None
    if cfg.tokenizer is None:
        raise ValueError(f"data.sources[{megatron[0]}] is a Megatron dataset, which does not store its tokenizer: set data.tokenizer")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    except Exception as e:
        raise ValueError(f"data.tokenizer: cannot load a tokenizer from {cfg.tokenizer}: {e}") from None
    return len(tok), tokenizer_fingerprint(tok), tok.eos_token_id


class Loader:
    """This data-parallel rank's slice of every global batch; see the module docstring."""

    def __init__(
        self, cfg: DataConfig, *, seq_len: int, global_batch_size: int, dp_rank: int, dp_size: int,
        seed: int, split: str = "train",
    ) -> None:
        if split not in ("train", "validation"):
            raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
        if not cfg.sources:
            raise ValueError("data.sources is empty: name at least one shard directory written by data.prepare")
        if seq_len < 1 or global_batch_size < 1:
            raise ValueError("seq_len and global_batch_size must be >= 1")
        if dp_size < 1 or not 0 <= dp_rank < dp_size or global_batch_size % dp_size:
            raise ValueError(f"global batch {global_batch_size} cannot be split over dp_size={dp_size} (dp_rank={dp_rank})")
        if not 0 <= cfg.validation_fraction < 1:
            raise ValueError(f"data.validation_fraction must be in [0, 1), got {cfg.validation_fraction}")
        if split == "validation" and cfg.validation_fraction == 0:
            raise ValueError("data.validation_fraction is 0, so there is no validation split")
        self.cfg, self.seq_len, self.global_batch_size = cfg, seq_len, global_batch_size
        self.dp_rank, self.dp_size, self.seed, self.split = dp_rank, dp_size, seed, split
        self.local_batch_size = global_batch_size // dp_size
        self.shard_sets: list[ShardSet] = []
        megatron_tok = _megatron_tokenizer(cfg)
        for i, src in enumerate(cfg.sources):
            if not src.weight > 0:
                raise ValueError(f"data.sources[{i}].weight must be > 0, got {src.weight}")
            self.shard_sets.append(open_source(src, cfg, index=i, megatron_tokenizer=megatron_tok))
        first = self.shard_sets[0].manifest
        for i, ss in enumerate(self.shard_sets[1:], 1):
            m = ss.manifest
            if m["tokenizer_fingerprint"] != first["tokenizer_fingerprint"]:
                raise ValueError(f"data.sources[{i}] ({cfg.sources[i].path}) was tokenized with another tokenizer than data.sources[0]")
            if m["kind"] != first["kind"]:
                raise ValueError(f"data.sources[{i}] is {m['kind']} data but data.sources[0] is {first['kind']}; do not mix them")
        self.vocab_size = int(first["vocab_size"])
        self.sft = first["kind"] == "sft"
        self.tokenizer_path = self._tokenizer_path()
        eos = first.get("eos_token_id")
        # the sample index of each source: built once per data configuration, memory-mapped here
        self.indexes = [load_or_build_index(ss, validation_fraction=cfg.validation_fraction, cache_dir=cfg.cache_dir) for ss in self.shard_sets]
        self.verifiers = [
            ChecksumVerifier(ss, index_base(ss.index_root, cfg.cache_dir))
            for ss in self.shard_sets if cfg.verify_checksums and ss.verify_checksums
        ]
        self.sources = [
            SourceSplit(ss, ix, split=split, seq_len=seq_len, eos_id=int(eos if eos is not None else 0))
            for ss, ix in zip(self.shard_sets, self.indexes)
        ]
        for i, s in enumerate(self.sources):
            if s.num_samples == 0:
                what = f"{seq_len} tokens" if not s.sft else "one example"
                raise ValueError(f"data.sources[{i}] ({cfg.sources[i].path}) has less than {what} in its {split} split")
        self.counts = mixture_counts([s.weight for s in cfg.sources], cfg.mixture_block_size)
        for i, c in enumerate(self.counts):
            if c == 0:
                raise ValueError(f"data.sources[{i}].weight is too small for data.mixture_block_size={cfg.mixture_block_size}; raise the block size")
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._tables: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._next_step = 0

    def _tokenizer_path(self) -> str:
        """data.tokenizer, else the shards' own copy; either is checked against the fingerprint
        in the manifest (a changed tokenizer would train on ids that mean other tokens)."""
        stored = join(self.shard_sets[0].root, TOKENIZER_DIR)
        path = stored if self.cfg.tokenizer is None else self.cfg.tokenizer
        what = "the shards' tokenizer" if self.cfg.tokenizer is None else "data.tokenizer"
        tok = load_tokenizer_dir(path, what)
        if tokenizer_fingerprint(tok) != self.shard_sets[0].manifest["tokenizer_fingerprint"]:
            raise ValueError(
                f"{what} {path} differs from the tokenizer the shards were made with "
                f"(fingerprint in {join(self.shard_sets[0].root, MANIFEST)})"
            )
        return path

    def open_files(self) -> int:
        """Shard files this loader holds open (memory maps; at most data.max_open_shards per source)."""
        return sum(ss.open_shards for ss in self.shard_sets)

    def close(self) -> None:
        """Stop background work and close every open shard (the loader may be used again after)."""
        for v in self.verifiers:
            v.stop()
        for ss in self.shard_sets:
            ss.close()
            if ss.cache is not None:
                ss.cache.close()

    # ----- index arithmetic -----------------------------------------------------------------
    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source [M], rank within its source [M]) of the samples of mixture block ``b``."""
        hit = self._blocks.get(b)
        if hit is not None:
            self._blocks.move_to_end(b)
            return hit
        labels = np.repeat(np.arange(len(self.counts)), self.counts)
        rng = np.random.default_rng([derive_key(self.seed, self.split, "mixture") >> 1, b])
        labels = labels[rng.permutation(len(labels))]
        rank = np.empty(len(labels), dtype=np.int64)
        for k in range(len(self.counts)):
            where = labels == k
            rank[where] = np.arange(int(where.sum()))
        self._blocks[b] = (labels, rank)
        if len(self._blocks) > 8:
            self._blocks.popitem(last=False)
        return labels, rank

    def locate(self, global_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source int [N], sample int [N]) of global sample indices ``[N]``: pure in (seed, index)."""
        global_index = np.asarray(global_index, dtype=np.int64)
        source = np.zeros(len(global_index), dtype=np.int64)
        n = global_index.copy()
        if len(self.counts) > 1:
            M = int(self.counts.sum())
            blocks, pos = global_index // M, global_index % M
            for b in np.unique(blocks):
                sel = blocks == b
                labels, rank = self._block(int(b))
                source[sel] = labels[pos[sel]]
                n[sel] = int(b) * self.counts[labels[pos[sel]]] + rank[pos[sel]]
        sample = np.empty_like(n)
        for k, src in enumerate(self.sources):
            sel = source == k
            if not sel.any():
                continue
            epoch, p = n[sel] // src.num_samples, n[sel] % src.num_samples
            out = np.empty_like(p)
            for e in np.unique(epoch):
                es = epoch == e
                out[es] = self._permutation(k, int(e), p[es])
            sample[sel] = out
        return source, sample

    def _permutation(self, k: int, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Epoch ``epoch``'s order of source ``k`` at ``positions``; small sources use a cached table."""
        n = self.sources[k].num_samples
        key = derive_key(self.seed, self.split, k, epoch)
        if n > _TABLE_LIMIT:
            return permute(positions, n, key)
        table = self._tables.get((k, epoch))
        if table is None:
            table = np.empty(n, dtype=np.int32)  # n <= _TABLE_LIMIT; built in pieces: no n-sized temporaries
            for lo in range(0, n, 1 << 20):
                table[lo:lo + (1 << 20)] = permute(np.arange(lo, min(n, lo + (1 << 20))), n, key)
            self._tables[(k, epoch)] = table
            if len(self._tables) > 2 * len(self.sources):
                self._tables.popitem(last=False)
        return table[positions].astype(np.int64)

    # ----- public API -----------------------------------------------------------------------
    def batch(self, step: int) -> dict:
        """This rank's slice of global step ``step``.

        Returns ``input_ids`` LongTensor [B, seq_len] (B = global_batch_size // dp_size),
        ``sample_index`` LongTensor [B] (= step·G + j for j in this rank's contiguous slice) and, for
        SFT data, ``prompt_lengths`` LongTensor [B] and ``pad_length`` (a 0-dim LongTensor: the
        global batch's longest example, see :meth:`pad_length`).
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        for v in self.verifiers:
            if v.error:
                raise ValueError(v.error)
        B = self.local_batch_size
        index = step * self.global_batch_size + self.dp_rank * B + np.arange(B, dtype=np.int64)
        source, sample = self.locate(index)
        ids = np.empty((B, self.seq_len), dtype=np.int64)
        plens = np.zeros(B, dtype=np.int64)
        for k, src in enumerate(self.sources):
            rows = np.flatnonzero(source == k)
            if len(rows):
                ids[rows], plens[rows] = src.read_many(sample[rows])
        out = {"input_ids": torch.from_numpy(ids), "sample_index": torch.from_numpy(index)}
        if self.sft:
            out["prompt_lengths"] = torch.from_numpy(plens)
            out["pad_length"] = torch.tensor(self.pad_length(step))
        self._next_step = step + 1
        self._prefetch_after(step)
        return out

    def pad_length(self, step: int) -> int:
        """SFT: the length of the longest example of global step ``step`` (every rank computes the
        same value from the index: no tokens are read, no communication)."""
        index = step * self.global_batch_size + np.arange(self.global_batch_size, dtype=np.int64)
        source, sample = self.locate(index)
        longest = 1
        for k, src in enumerate(self.sources):
            rows = np.flatnonzero(source == k)
            if len(rows):
                longest = max(longest, int(src.example_lengths(sample[rows]).max()))
        return longest

    def _prefetch_after(self, step: int) -> None:
        """Queue the remote shards of this rank's next steps for download (background thread)."""
        if not self.cfg.prefetch or not any(ss.cache is not None for ss in self.shard_sets):
            return
        B, G = self.local_batch_size, self.global_batch_size
        ahead = np.concatenate([(step + a) * G + self.dp_rank * B + np.arange(B, dtype=np.int64) for a in (1, 2)])
        source, sample = self.locate(ahead)
        for k, (src, ss) in enumerate(zip(self.sources, self.shard_sets)):
            rows = source == k
            if ss.cache is not None and rows.any():
                shards = src.shards_of(sample[rows])[: self.cfg.prefetch_shards]
                ss.cache.prefetch([ss.names[int(i)] for i in shards])

    def next_batch(self) -> dict:
        """The batch of the step after the last one returned (or restored)."""
        return self.batch(self._next_step)

    def num_samples(self) -> list[int]:
        """Samples (windows or examples) per source in this split: one epoch of each."""
        return [s.num_samples for s in self.sources]

    def state_dict(self) -> dict:
        """What identifies the sample sequence, plus the next step (JSON-serializable)."""
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION, "split": self.split, "seed": self.seed,
            "seq_len": self.seq_len, "global_batch_size": self.global_batch_size,
            "validation_fraction": self.cfg.validation_fraction, "mixture_block_size": self.cfg.mixture_block_size,
            "sources": [
                {"path": src.path, "weight": float(src.weight), "digest": ss.digest, "samples": s.num_samples}
                for src, ss, s in zip(self.cfg.sources, self.shard_sets, self.sources)
            ],
            "next_step": self._next_step,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; ValueError listing what differs if the data or its settings changed."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError("not a difftron loader state (format key missing)")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not supported (expected {STATE_VERSION})")
        mine = self.state_dict()
        diffs = [
            f"{k}: saved {state.get(k)!r}, now {mine[k]!r}"
            for k in ("split", "seed", "seq_len", "global_batch_size", "validation_fraction", "mixture_block_size")
            if state.get(k) != mine[k]
        ]
        saved_sources = state.get("sources", [])
        if len(saved_sources) != len(mine["sources"]):
            diffs.append(f"number of data.sources: saved {len(saved_sources)}, now {len(mine['sources'])}")
        else:
            for i, (a, b) in enumerate(zip(saved_sources, mine["sources"])):
                if a.get("weight") != b["weight"]:
                    diffs.append(f"data.sources[{i}].weight: saved {a.get('weight')}, now {b['weight']}")
                if a.get("digest") != b["digest"]:
                    diffs.append(f"data.sources[{i}] ({b['path']}): the shards differ from the saved run's ({a.get('path')})")
        if diffs:
            raise ValueError("cannot resume the data loader, the data changed: " + "; ".join(diffs))
        self._next_step = int(state["next_step"])


def build_loader(
    cfg: DataConfig, *, seq_len: int, global_batch_size: int, dp_rank: int, dp_size: int, seed: int,
    split: str = "train",
) -> Loader:
    """The loader of ``cfg.sources`` for one data-parallel rank (see :class:`Loader`)."""
    return Loader(cfg, seq_len=seq_len, global_batch_size=global_batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=seed, split=split)
