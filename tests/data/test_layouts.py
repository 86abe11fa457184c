"""Data as users bring it: column mapping, unused columns named, content parts, system columns, and their
bad inputs."""

from __future__ import annotations

import json
import logging

import pytest

from lmdistill.data.columns import parse_mapping
from lmdistill.data.formats import load_source
from lmdistill.data.summary import summarize_data
from lmdistill.data.tokenize import IGNORE_INDEX, encode_rows
from lmdistill.errors import DataError


def test_column_mapping_loads_context_target(fixtures):
    src = load_source(fixtures / "context_target.jsonl", columns={"prompt": "context", "response": "target"})
    assert src.format == "prompt_response" and src.ignored_columns == []
    assert src.rows[0] == {"prompt": "Revenue rose 8% while costs were flat. What happened to the margin?",
                           "response": "The margin widened.", "row_id": 0}
    seq = load_source(fixtures / "context_target.jsonl", columns={"source": "context"})
    assert seq.format == "seq2seq" and seq.rows[1]["source"].startswith("The bond yield")


def test_column_mapping_to_text_and_system(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "Cash flow is strong.", "sys": "Be brief.", "q": "Why?", "a": "Cash."}) + "\n")
    assert load_source(path, columns={"text": "body"}).rows[0]["text"] == "Cash flow is strong."
    (row,) = load_source(path, columns={"prompt": "q", "response": "a", "system": "sys"}).rows
    assert row == {"prompt": "Why?", "response": "Cash.", "system": "Be brief.", "row_id": 0}


def test_mapping_a_missing_column_lists_the_columns(fixtures):
    with pytest.raises(DataError, match=r"names column\(s\) question, which the data does not have; its columns "
                                        r"are \[context, target, id\]\. Fix the mapping"):
        load_source(fixtures / "context_target.jsonl", columns={"prompt": "question", "response": "target"})


def test_mapping_syntax_and_unknown_roles():
    assert parse_mapping("prompt=context, response=target") == {"prompt": "context", "response": "target"}
    with pytest.raises(DataError, match="--columns item 'prompt:context' is not ROLE=COLUMN"):
        parse_mapping("prompt:context")
    with pytest.raises(DataError, match="unknown role\\(s\\) answer_text: map the roles prompt, response"):
        parse_mapping("answer_text=target")


def test_ignored_columns_are_named_in_summary_and_log(fixtures, caplog):
    with caplog.at_level(logging.WARNING):
        summary = summarize_data(fixtures / "text_with_instruction.jsonl")
    assert summary["format"] == "text" and summary["ignored_columns"] == ["instruction"]
    assert ("column(s) instruction are not used (format text reads text); to train on them, map them to roles "
            "with data.sources.NAME.columns or --columns, e.g. --columns prompt=instruction") in caplog.text
    mapped = summarize_data(fixtures / "text_with_instruction.jsonl", columns={"prompt": "instruction",
                                                                               "response": "text"})
    assert mapped["format"] == "prompt_response" and mapped["ignored_columns"] == []  # ids are not prose


def test_content_parts_are_joined_and_non_text_parts_are_bad_rows(fixtures):
    src = load_source(fixtures / "content_parts.jsonl")
    assert src.rows[0]["messages"] == [{"role": "user", "content": "What does the bank report?\nBe brief."},
                                       {"role": "assistant", "content": "Higher yields."}]
    assert src.skipped == {"non_text": 1, "wrong_type": 1}
    assert ("line 2: turn 0 has a content part of type 'image_url': this toolkit trains on text only; drop such "
            "parts (or rows) from the data [non_text]") in src.first_skipped[0]
    assert "line 3: turn 0 has a content part of unknown type 'hologram'" in src.first_skipped[1]


def test_system_column_beside_a_chat(tokenizer, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"system": "Be brief.", "messages": [{"role": "user", "content": "Hi"},
                                                                    {"role": "assistant", "content": "Hello."}]}))
    (row,) = load_source(path).rows
    assert row["messages"][0] == {"role": "system", "content": "Be brief."}
    (ex,) = encode_rows([row], tokenizer).examples
    prompt = tokenizer("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                       "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert ex["labels"][:len(prompt)] == [IGNORE_INDEX] * len(prompt) and ex["input_ids"][:len(prompt)] == prompt


def test_cli_data_columns_and_json_layouts(fixtures, tokenizer_dir):
    from typer.testing import CliRunner

    from lmdistill.cli import app

    result = CliRunner().invoke(app, ["data", str(fixtures / "context_target.jsonl"), "--tokenizer",
                                      str(tokenizer_dir), "--columns", "prompt=context,response=target", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["format"] == "prompt_response" and summary["kept"] == 2
    assert summary["columns"] == {"prompt": "context", "response": "target"} and summary["layouts"] == {"pair": 2}
    assert summary["example"].endswith("[[The margin widened.<|im_end|><|endoftext|>]]")
