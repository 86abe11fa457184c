"""Tokenisation through datasets.map, cached on disk: a hit gives the same examples without tokenising, any change
to data, tokenizer, template or layout misses; bad rows are counted the same either way."""

from __future__ import annotations

import logging

import pytest

from lmdistill.data import cache as cache_module
from lmdistill.data.cache import encode_source
from lmdistill.data.formats import load_source
from lmdistill.data.tokenize import Layout, encode_rows
from lmdistill.errors import DataError

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Tip?"}, {"role": "assistant", "content": "Save cash."}]


def test_cache_miss_then_hit_gives_the_examples_of_encode_rows(fixtures, tokenizer, tmp_path, caplog, monkeypatch):
    rows = load_source(fixtures / "bad_rows.jsonl").rows + [{"messages": CHAT, "row_id": 7},
                                                            {"text": "Risk. " * 40, "row_id": 8},
                                                            {"prompt": "Why?", "response": "Risk. " * 40, "row_id": 9}]
    layout = Layout(max_length=20)
    reference = encode_rows(rows, tokenizer, max_length=20, source_name="s")
    with caplog.at_level(logging.INFO, logger="lmdistill.data.cache"):
        first = encode_source(rows, tokenizer, layout, "s", cache_dir=tmp_path)
        monkeypatch.setattr(cache_module, "_tokenise", lambda *a: pytest.fail("a cache hit must not tokenise"))
        second = encode_source(rows, tokenizer, layout, "s", cache_dir=tmp_path)
    assert "source s: tokenisation cache miss" in caplog.text and "source s: tokenisation cache hit" in caplog.text
    for got in (first, second):
        assert got.examples == reference.examples
        assert (got.skipped, got.windows, got.split_rows) == (reference.skipped, reference.windows,
                                                               reference.split_rows)
    assert reference.skipped == {"too_long": 1} and reference.windows > 1


def test_any_change_to_data_tokenizer_template_or_layout_misses(tokenizer, fresh_tokenizer, tmp_path):
    rows = [{"prompt": "Why?", "response": "Cash.", "row_id": 0}]
    encode_source(rows, tokenizer, Layout(), "s", cache_dir=tmp_path)
    fresh_tokenizer.chat_template = None
    changed = [([{**rows[0], "response": "Bonds."}], tokenizer, Layout(), "s"), (rows, tokenizer, Layout(64), "s"),
               (rows, tokenizer, Layout(train_on="last_assistant"), "s"), (rows, fresh_tokenizer, Layout(), "s"),
               (rows, tokenizer, Layout(), "other")]
    for args in changed:
        encode_source(*args, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 6


def test_num_proc_workers_and_strict(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "_BATCH", 8)  # several batches over 2 workers without a large source
    rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}.", "row_id": i} for i in range(40)]
    enc = encode_source(rows, tokenizer, Layout(max_length=32), "big", cache_dir=tmp_path, num_proc=2)
    assert [e["row_id"] for e in enc.examples] == list(range(40))
    assert enc.examples == encode_rows(rows, tokenizer, max_length=32, source_name="big").examples
    seq2seq = encode_rows(rows[:3], tokenizer, max_length=32, task_type="seq2seq", source_name="s2s").examples
    for _ in range(2):  # miss, then hit: targets are stored whole (causal labels as spans of trained tokens)
        assert encode_source(rows[:3], tokenizer, Layout(32, "seq2seq"), "s2s", cache_dir=tmp_path).examples == seq2seq
    with pytest.raises(DataError, match=r"source 'tiny', row 0: .* exceed max_length 8"):
        encode_source(rows[:1] * 1, tokenizer, Layout(max_length=8), "tiny", strict=True, use_cache=False)


def test_tokenizer_hash_ignores_call_state_and_sees_the_template(tokenizer_dir):
    from transformers import AutoTokenizer

    from lmdistill.data.cache import tokenizer_hash

    tok, again = AutoTokenizer.from_pretrained(tokenizer_dir), AutoTokenizer.from_pretrained(tokenizer_dir)
    base = tokenizer_hash(tok)
    tok.backend_tokenizer.enable_padding(length=12)
    tok.backend_tokenizer.enable_truncation(30)
    assert tokenizer_hash(tok) == base == tokenizer_hash(again)
    again.chat_template = None
    assert tokenizer_hash(again) != base
