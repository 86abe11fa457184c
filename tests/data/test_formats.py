"""B1: every format and container is detected and normalised; unusable input fails with a clear message."""

from __future__ import annotations

import pytest

from lmdistill.data.formats import FORMATS, detect_format, load_source
from lmdistill.errors import DataError


@pytest.mark.parametrize("name, fmt, first", [
    ("text.jsonl", "text", {"text": "The bank reports higher yields today."}),
    ("alpaca.json", "alpaca", {"prompt": "Summarise the report.\n\nThe bank reports a small loss.",
                               "response": "A small loss."}),
    ("dolly.jsonl", "dolly", {"prompt": "What does the fund expect?\n\nOur fund expects strong growth.",
                              "response": "Strong growth.", "bucket": "closed_qa"}),
    ("prompt_completion.csv", "prompt_completion", {"prompt": "What does the bank report?",
                                                    "response": "The bank reports risk today."}),
    ("prompt_response.jsonl", "prompt_response", {"prompt": "What does the market expect?",
                                                  "response": "The market expects cash flow."}),
    ("question_answer.json", "question_answer", {"prompt": "What does the company report?",
                                                 "response": "The annual report.", "bucket": "finance"}),
    ("ask_answer.jsonl", "ask_answer", {"prompt": "What does the teacher review?",
                                        "response": "The teacher reviews dividends."}),
    ("chat.jsonl", "chat", {"messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "What does the bank report?"},
                                         {"role": "assistant", "content": "Higher yields."}]}),
    ("sharegpt.json", "sharegpt", {"messages": [{"role": "user", "content": "What does our fund buy?"},
                                                {"role": "assistant", "content": "Our fund buys new bonds."}]}),
    ("seq2seq.csv", "seq2seq", {"source": "The bank reports higher yields today after the meeting.",
                                "target": "Higher yields."}),
    ("columns.json", "text", {"text": "Cash flow is strong.", "bucket": "a"}),
    ("prompt.jsonl", "prompt", {"prompt": "The bank reports"}),
])
def test_each_format_is_detected_and_normalised(fixtures, name, fmt, first):
    src = load_source(fixtures / name)
    assert src.format == fmt
    assert src.rows[0] == first | {"row_id": 0}
    assert not src.skipped and src.num_read == len(src.rows)


def test_alpaca_without_input_and_second_row_ids(fixtures):
    rows = load_source(fixtures / "alpaca.json").rows
    assert rows[1] == {"prompt": "Name a bond type.", "response": "Government bonds.", "row_id": 1}


def test_prompts_alone_and_generations_files(tmp_path):
    # prompts for `generate`: an empty completion is a prompt alone, not a bad row
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "Q", "completion": " A"}\n{"prompt": "Q2", "completion": ""}\n')
    assert [r.get("response") for r in load_source(mixed).rows] == [" A", None]
    # a file `lmdistill generate` wrote says whether each generation finished
    generated = tmp_path / "gen.jsonl"
    generated.write_text('{"prompt": "Q", "completion": " A", "text": "Q A", "finished": false}\n')
    assert load_source(generated).rows == [{"prompt": "Q", "response": " A", "finished": False, "row_id": 0}]


def test_every_format_has_a_fixture(fixtures):
    detected = {load_source(p).format for p in fixtures.glob("*") if p.is_file() and p.stem in FORMATS}
    assert detected == set(FORMATS)


def test_folder_of_files_concatenates_in_name_order(fixtures):
    src = load_source(fixtures / "folder")
    assert src.format == "prompt_completion"
    assert [r["response"] for r in src.rows] == ["Risk.", "Bonds.", "Growth."]
    assert [r["row_id"] for r in src.rows] == [0, 1, 2]


def test_parquet(parquet_file):
    src = load_source(parquet_file)
    assert (src.format, len(src.rows), src.rows[1]["bucket"]) == ("prompt_completion", 2, "hard")


def test_saved_dataset_splits(saved_dataset_dir):
    assert len(load_source(saved_dataset_dir).rows) == 2
    assert len(load_source(saved_dataset_dir, split="test").rows) == 1
    with pytest.raises(DataError, match="no split 'validation'; it has train, test"):
        load_source(saved_dataset_dir, split="validation")


def test_saved_single_dataset(tmp_path, qa_records):
    import datasets

    datasets.Dataset.from_list(qa_records).save_to_disk(str(tmp_path / "one"))
    assert load_source(tmp_path / "one", max_rows=1).rows == [{"prompt": "What does the bank report?",
                                                                "response": "Risk.", "row_id": 0, "bucket": "easy"}]


def test_max_rows_and_forced_format(fixtures):
    assert len(load_source(fixtures / "folder", max_rows=2).rows) == 2
    src = load_source(fixtures / "alpaca.json", format="text")  # the alpaca file also has a text column
    assert src.format == "text" and len(src.rows) == 1 and src.skipped == {"empty": 1}
    with pytest.raises(DataError, match="format 'chat' needs column\\(s\\) messages"):
        load_source(fixtures / "alpaca.json", format="chat")


def test_pair_family(fixtures):
    assert load_source(fixtures / "ask_answer.jsonl", format="pair").format == "ask_answer"
    with pytest.raises(DataError, match=r"columns \[text\] match no known format.* Accepted formats: "
                                        r"prompt_completion \(prompt, completion\); prompt_response"):
        load_source(fixtures / "text.jsonl", format="pair")
    with pytest.raises(DataError, match="unknown data format 'tsv'. Use 'auto', pair, or one of: chat"):
        load_source(fixtures / "text.jsonl", format="tsv")


def test_hub_name_offline_names_the_dataset(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="dataset 'made-up-org/no-such-dataset-4242' is not a local file or folder"):
        load_source("made-up-org/no-such-dataset-4242")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"data file not found: .*nope\.jsonl .*Check the path"):
        load_source(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("name", ["empty.jsonl"])
def test_empty_file(fixtures, name):
    with pytest.raises(DataError, match=r"empty\.jsonl is empty: there are no rows"):
        load_source(fixtures / name)


def test_empty_json_list(tmp_path):
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(DataError, match="none.json is empty"):
        load_source(tmp_path / "none.json")


def test_json_that_does_not_parse_gives_line_and_char(fixtures):
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON at line 3, char 28: Expecting"):
        load_source(fixtures / "broken.json")


def test_json_file_holding_json_lines_is_read(tmp_path):
    (tmp_path / "lines.json").write_text('{"text": "a b"}\n{"text": "c d"}\n')
    assert len(load_source(tmp_path / "lines.json").rows) == 2


def test_unknown_columns_list_columns_and_formats(fixtures):
    with pytest.raises(DataError) as err:
        load_source(fixtures / "unknown_columns.csv")
    message = str(err.value)
    assert "columns [title, body] match no known format" in message
    assert all(f.describe() in message for f in FORMATS.values())


def test_csv_with_a_missing_column_names_it(fixtures):
    with pytest.raises(DataError, match=r"columns \[instruction, notes\] match no known format\. Closest: "
                                        r"alpaca, which also needs column 'output'"):
        load_source(fixtures / "missing_column.csv")


def test_detection_prefers_the_most_specific_format():
    assert detect_format(["instruction", "input", "output", "text"], "x").name == "alpaca"
    assert detect_format(["instruction", "context", "response", "category"], "x").name == "dolly"


def test_folder_with_mixed_formats_is_an_error(tmp_path, fixtures):
    for name in ("text.jsonl", "chat.jsonl"):
        (tmp_path / name).write_bytes((fixtures / name).read_bytes())
    with pytest.raises(DataError, match="text.jsonl is in format 'text' but .*chat.jsonl is in 'chat'"):
        load_source(tmp_path)
