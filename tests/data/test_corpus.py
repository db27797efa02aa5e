"""The embedded corpus and its tokenizer: determinism, fixed special ids, round trip, caching."""

from __future__ import annotations

import json
import os

from transformers import AutoTokenizer

from data.corpus import SPECIAL_TOKEN_IDS, SPECIAL_TOKENS, iter_documents, train_tokenizer


def test_documents_are_deterministic_and_bounded():
    a = list(iter_documents(max_bytes=600_000))
    b = list(iter_documents(max_bytes=600_000))
    assert a == b and len(a) > 10
    size = sum(len(d.encode()) for d in a)
    assert 600_000 <= size < 600_000 + 200_000 + 1  # stops at the first document past the budget
    assert any("def " in d for d in a)  # stdlib sources after the pydoc topics
    small = list(iter_documents(max_bytes=50_000))
    assert small == a[: len(small)]  # a smaller budget is a prefix


def test_special_ids_round_trip_and_chat(small_tokenizer):
    tok = AutoTokenizer.from_pretrained(small_tokenizer)
    assert SPECIAL_TOKEN_IDS == {"bos": 0, "eos": 1, "mask": 2}
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.mask_token_id) == (0, 1, 1, 2)
    assert [tok.convert_ids_to_tokens(i) for i in range(3)] == list(SPECIAL_TOKENS)
    assert len(tok) == 512
    text = "def f(x):\n    return x + 1  # ünïcode ✓\n\tTabs and  spaces"
    ids = tok(text, add_special_tokens=False).input_ids
    assert min(ids) > 2 and tok.decode(ids) == text
    assert tok.convert_tokens_to_ids("<|mdm_mask|>") == 2
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=False)
    assert chat.startswith("<|startoftext|>") and "yo" in chat


def test_tokenizer_is_cached(small_tokenizer):
    marker = os.path.join(small_tokenizer, "tokenizer.json")
    before = os.stat(marker).st_mtime_ns
    again = train_tokenizer(small_tokenizer, vocab_size=512, max_bytes=300_000, train_bytes=300_000)
    assert again == small_tokenizer and os.stat(marker).st_mtime_ns == before


def test_cache_is_invalidated_by_other_settings(tmp_path):
    out = tmp_path / "tok"
    train_tokenizer(out, vocab_size=300, max_bytes=60_000, train_bytes=60_000)
    key = json.loads((out / "difftron_corpus_tokenizer.json").read_text())
    assert key["vocab_size"] == 300
    train_tokenizer(out, vocab_size=320, max_bytes=60_000, train_bytes=60_000)
    assert len(AutoTokenizer.from_pretrained(out)) == 320
