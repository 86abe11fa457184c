"""B5: bad rows are counted, skipped and logged, or fatal with strict, naming the row."""

from __future__ import annotations

import logging

import pytest

from lmdistill.data.formats import load_source
from lmdistill.data.tokenize import encode_rows
from lmdistill.errors import DataError


def test_bad_rows_are_counted_and_first_ones_logged(fixtures, caplog):
    with caplog.at_level(logging.WARNING):
        src = load_source(fixtures / "bad_rows.jsonl")
    assert [r["row_id"] for r in src.rows] == [0, 5]
    assert src.skipped == {"empty": 2, "wrong_type": 1, "undecodable": 2}
    assert src.num_read == 7
    assert src.first_skipped[0].endswith("line 2: 'prompt' is empty or missing [empty]")
    assert "line 3: 'completion' is a int, not a string [wrong_type]" in src.first_skipped[1]
    assert "line 4: 'prompt' holds bytes that are not valid UTF-8 [undecodable]" in src.first_skipped[2]
    assert "line 5: not valid JSON at char 36" in src.first_skipped[3]
    assert "skipping bad row" in caplog.text and "kept 2 rows, skipped 5" in caplog.text


@pytest.mark.parametrize("name, message", [
    ("bad_rows.jsonl", r"bad_rows\.jsonl, line 2: 'prompt' is empty or missing \[empty\]\. Fix or remove"),
    ("chat_last_user.jsonl", r"line 2: the last turn is the user's, not the assistant's"),
])
def test_strict_fails_on_the_first_bad_row(fixtures, name, message):
    with pytest.raises(DataError, match=message):
        load_source(fixtures / name, strict=True)


def test_chat_whose_last_turn_is_not_the_assistants(fixtures):
    src = load_source(fixtures / "chat_last_user.jsonl")
    assert len(src.rows) == 1 and src.skipped == {"bad_chat": 1}
    assert "line 2: the last turn is the user's, not the assistant's: there is no response" in src.first_skipped[0]


def test_csv_non_utf8_and_short_rows(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_bytes(b"prompt,completion\nGood?,Yes.\nBad \xff byte,No.\nshort row only\n")
    src = load_source(path)
    assert src.skipped == {"undecodable": 1}
    assert src.rows[1] == {"prompt": "short row only", "row_id": 2}  # no completion: a prompt for `generate`
    assert "line 3: 'prompt' holds bytes that are not valid UTF-8" in src.first_skipped[0]


def test_chat_roles_and_types(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'
                    '{"messages": "not a list"}\n[1, 2]\n'
                    '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    src = load_source(path)
    assert src.skipped == {"bad_chat": 1, "wrong_type": 2}
    assert "turn 0 has role 'robot'; use one of system, user, assistant" in src.first_skipped[0]
    assert "line 3: the record is a list, not an object" in src.first_skipped[2]


def test_all_rows_bad_is_an_error(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": ""}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"no usable rows \(skipped empty: 1, wrong_type: 1\)\. First: .*line 1"):
        load_source(tmp_path / "t.jsonl")


def test_too_long_rows_skipped_or_fatal(tokenizer):
    long_answer = " ".join(["the bank reports higher yields"] * 20)
    rows = [{"prompt": "What?", "response": long_answer, "row_id": 0},
            {"prompt": "What does the bank report?", "response": "Risk.", "row_id": 1}]
    enc = encode_rows(rows, tokenizer, max_length=32)
    assert [e["row_id"] for e in enc.examples] == [1] and enc.skipped == {"too_long": 1}
    assert "source 'general', row 0: prompt" in enc.first_skipped[0]
    with pytest.raises(DataError, match=r"row 0: prompt \d+ \+ response \d+ tokens exceed max_length 32 .* raise max_length"):
        encode_rows(rows, tokenizer, max_length=32, strict=True)
