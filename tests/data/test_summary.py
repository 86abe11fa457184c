"""`lmdistill data` backend: format, rows, kept, skipped per reason, and the example with trained tokens marked."""

from __future__ import annotations

import json

import pytest

from lmdistill.data.summary import summarize_data
from lmdistill.errors import DataError


def test_summary_of_a_prompt_completion_file(qa_jsonl, tokenizer):
    summary = summarize_data(qa_jsonl, tokenizer, max_length=64)
    assert (summary["format"], summary["rows"], summary["kept"], summary["skipped"]) == \
        ("prompt_completion", 200, 200, {})
    first = json.loads(qa_jsonl.read_text().splitlines()[0])
    assert summary["example"] == (f"<|im_start|>user\n{first['prompt']}<|im_end|>\n<|im_start|>assistant\n"
                                  f"[[{first['completion']}<|im_end|><|endoftext|>]]")
    json.dumps(summary)  # what --json prints


def test_summary_counts_load_and_tokenise_skips(fixtures, tokenizer_dir):
    summary = summarize_data(fixtures / "bad_rows.jsonl", tokenizer_dir, max_length=20)
    assert summary["rows"] == 7 and summary["kept"] == 2
    assert summary["skipped"] == {"empty": 2, "wrong_type": 1, "undecodable": 2}
    assert len(summary["first_skipped"]) == 5


def test_summary_of_text_and_seq2seq(text_jsonl, fixtures, tokenizer):
    text = summarize_data(text_jsonl, tokenizer)
    assert text["format"] == "text" and text["example"].startswith("[[") and text["example"].endswith("]]")
    s2s = summarize_data(fixtures / "seq2seq.csv", tokenizer, task_type="seq2seq")
    assert s2s["example"] == ("The bank reports higher yields today after the meeting.<|endoftext|>\n"
                              "[[Higher yields.<|endoftext|>]]")


def test_summary_without_tokenizer_marks_the_response(fixtures):
    summary = summarize_data(fixtures / "chat.jsonl")
    assert summary["kept"] == 2
    assert summary["example"] == ("### System:\nBe brief.\n\n### User:\nWhat does the bank report?\n\n"
                                  "### Assistant:\n[[Higher yields.]]")


def test_summary_of_prompts_alone(fixtures, tokenizer):
    # prompts for `generate`: nothing is trained on; with a chat template they end where the answer would start
    summary = summarize_data(fixtures / "prompt.jsonl", tokenizer)
    assert (summary["format"], summary["layouts"]) == ("prompt", {"prompt": 2})
    assert summary["example"] == "<|im_start|>user\nThe bank reports<|im_end|>\n<|im_start|>assistant\n"
    assert summarize_data(fixtures / "prompt.jsonl")["example"] == "### User:\nThe bank reports\n\n### Assistant:\n"


def test_summary_errors(fixtures, tmp_path, tokenizer):
    with pytest.raises(DataError, match="line 2: 'prompt' is empty"):
        summarize_data(fixtures / "bad_rows.jsonl", tokenizer, strict=True)
    with pytest.raises(DataError, match="cannot load a tokenizer from"):
        summarize_data(fixtures / "text.jsonl", tmp_path / "no_tokenizer")
