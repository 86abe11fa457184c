"""Fixtures for the data tests: the fixture files, containers built from them, and tokenizer variants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def qa_records() -> list[dict]:
    return [json.loads(line) | {"category": c} for line, c in
            zip((FIXTURES / "folder" / "part-0.jsonl").read_text().splitlines(), ["easy", "hard"])]


@pytest.fixture(scope="session")
def parquet_file(tmp_path_factory, qa_records) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("parquet") / "qa.parquet"
    pq.write_table(pa.Table.from_pylist(qa_records), path)
    return path


@pytest.fixture(scope="session")
def saved_dataset_dir(tmp_path_factory, qa_records) -> Path:
    """A DatasetDict with train and test splits, written with save_to_disk."""
    import datasets

    path = tmp_path_factory.mktemp("saved") / "qa"
    ds = datasets.Dataset.from_list(qa_records)
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(path))
    return path


@pytest.fixture()
def plain_tokenizer(tokenizer_dir):
    """The shared tokenizer without a chat template (so the plain template is used)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = None
    return tok


@pytest.fixture()
def fresh_tokenizer(tokenizer_dir):
    """A private copy of the shared tokenizer that a test may modify."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)
