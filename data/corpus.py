"""The embedded default corpus and its tokenizer: text that ships with every Python, no download.

Documents are the ``pydoc_data`` help topics (sorted by name) followed by a deterministic subset
of the standard library's ``.py`` sources (tests, ``site-packages`` and ``idlelib`` excluded;
files chosen in the order of a hash of their relative path, so the subset spreads over the whole
library, until ``max_bytes`` of text). The same Python installation always yields the same
documents in the same order.

:func:`train_tokenizer` trains a byte-level BPE on that corpus with Hugging Face ``tokenizers``
and saves a ``transformers.PreTrainedTokenizerFast`` directory with fixed special-token ids
(:data:`SPECIAL_TOKEN_IDS`); the directory is reused when it already holds the same tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterator

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>")
SPECIAL_TOKEN_IDS = {"bos": 0, "eos": 1, "mask": 2}
DEFAULT_MAX_BYTES = 4_000_000
DEFAULT_TOKENIZER_TRAIN_BYTES = 2_000_000
_SKIP_PARTS = {"test", "tests", "site-packages", "idlelib", "__pycache__", "lib2to3", "encodings"}
_MAX_FILE_BYTES = 200_000
_CACHE_MARKER = "difftron_corpus_tokenizer.json"
# A minimal chat template so SFT with chat messages works with the embedded tokenizer too.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _stdlib_files() -> list[Path]:
    """Eligible standard-library sources, ordered by a hash of their path relative to the stdlib."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _SKIP_PARTS.intersection(rel.parts) or not path.is_file():
            continue
        if path.stat().st_size > _MAX_FILE_BYTES:
            continue
        files.append(rel)
    files.sort(key=lambda rel: hashlib.sha256(rel.as_posix().encode()).hexdigest())
    return [root / rel for rel in files]


def iter_documents(max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[str]:
    """Yield the embedded corpus's documents (str), about ``max_bytes`` bytes of UTF-8 in total.

    First the ``pydoc_data.topics.topics`` values (sorted by topic name), then whole
    standard-library source files, deterministic for a given Python installation.
    """
    from pydoc_data.topics import topics

    total = 0
    for name in sorted(topics):
        if total >= max_bytes:
            return
        text = topics[name].strip()
        if text:
            total += len(text.encode("utf-8"))
            yield text
    for path in _stdlib_files():
        if total >= max_bytes:
            return
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            total += len(text.encode("utf-8"))
            yield text


def _bounded(docs: Iterator[str], max_bytes: int) -> Iterator[str]:
    total = 0
    for doc in docs:
        if total >= max_bytes:
            return
        total += len(doc)
        yield doc


def _cache_key(vocab_size: int, max_bytes: int, train_bytes: int) -> dict:
    import sys

    import tokenizers

    return {
        "vocab_size": vocab_size, "max_bytes": max_bytes, "train_bytes": train_bytes,
        "python": sys.version.split()[0], "tokenizers": tokenizers.__version__,
        "special_tokens": list(SPECIAL_TOKENS),
    }


def train_tokenizer(
    out_dir: str | os.PathLike,
    vocab_size: int = 4096,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    train_bytes: int = DEFAULT_TOKENIZER_TRAIN_BYTES,
) -> str:
    """Train (or reuse) a byte-level BPE on the embedded corpus; return its directory as str.

    The directory is loadable with ``AutoTokenizer.from_pretrained``; ids: ``<|startoftext|>`` 0
    (BOS), ``<|endoftext|>`` 1 (EOS and PAD), ``<|mdm_mask|>`` 2 (mask). Training reads at most
    ``train_bytes`` of the corpus (a few seconds on 2 cores). An ``out_dir`` that already holds a
    tokenizer trained with the same settings is reused as is; the directory is written atomically.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    key = _cache_key(vocab_size, max_bytes, train_bytes)
    marker = out / _CACHE_MARKER
    if marker.is_file() and (out / "tokenizer.json").is_file():
        try:
            if json.loads(marker.read_text()) == key:
                return str(out)
        except ValueError:
            pass
    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS) + 256} (256 bytes + special tokens), got {vocab_size}")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
    )
    tok.train_from_iterator(_bounded(iter_documents(max_bytes), train_bytes), trainer=trainer)
    for name, idx in SPECIAL_TOKEN_IDS.items():
        if tok.token_to_id(SPECIAL_TOKENS[idx]) != idx:
            raise RuntimeError(f"tokenizer training put {SPECIAL_TOKENS[idx]} ({name}) at a wrong id")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[1],
        pad_token=SPECIAL_TOKENS[1], mask_token=SPECIAL_TOKENS[2], model_max_length=1 << 30,
    )
    fast.chat_template = CHAT_TEMPLATE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        fast.save_pretrained(tmp)
        (tmp / _CACHE_MARKER).write_text(json.dumps(key, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)
