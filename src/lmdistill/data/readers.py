"""Containers: turn a path or a hub name into raw records, without looking at what the columns mean.

Accepted: JSON (a list of records, or a records object: one key holding that list, or column lists),
JSONL, CSV, Parquet, a folder of such files (read in name order), a `datasets.save_to_disk` folder, and a
hub dataset name `NAME` or `NAME:CONFIG` loaded through `datasets.load_dataset` (needs the network or the
local `datasets` cache). Text is decoded as UTF-8 with bad bytes kept as lone surrogates, so one broken
row is reported and skipped by the format layer instead of failing the whole file.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmdistill.errors import DataError

FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")


@dataclass(frozen=True)
class Unreadable:
    """Stands in for a record that could not be decoded (e.g. a JSONL line that does not parse)."""

    detail: str


@dataclass
class RawTable:
    """Records of one file or dataset. `records` holds (where, record) pairs; where is e.g. 'line 7'."""

    origin: str
    columns: list[str]
    records: list[tuple[str, Any]] = field(default_factory=list)


def read_tables(path_or_name: str | Path, split: str = "train", max_rows: int | None = None) -> list[RawTable]:
    """Read a local path or a hub dataset name into raw tables (one per file; a folder gives several)."""
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            return [_from_saved_dataset(path, split, max_rows)]
        return _read_folder(path, max_rows)
    if path.is_file():
        return [_read_file(path, max_rows)]
    name = str(path_or_name)
    if path.suffix.lower() in FILE_SUFFIXES or not _HUB_NAME.match(name) or name.startswith("."):
        raise DataError(f"data file not found: {name} (looked in {path.resolve()}). Check the path, "
                        f"or pass a hub dataset name such as 'tatsu-lab/alpaca'.")
    return [_from_hub(name, split, max_rows)]


def _read_file(path: Path, max_rows: int | None) -> RawTable:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path, max_rows)
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path} is empty: there are no rows to load. Point to a file with data.")
    # surrogateescape keeps undecodable bytes as lone surrogates, which the format layer reports per row.
    text = raw.decode("utf-8-sig", errors="surrogateescape")
    if suffix == ".csv":
        return _read_csv(path, text, max_rows)
    if suffix == ".jsonl":
        return _read_jsonl(path, text, max_rows)
    if suffix == ".json":
        return _read_json(path, text, max_rows)
    raise DataError(f"{path}: unsupported file type '{suffix}'. Use one of {', '.join(FILE_SUFFIXES)}, "
                    f"a folder of such files, or a datasets save_to_disk folder.")


def _table(origin: str, records: list[tuple[str, Any]]) -> RawTable:
    columns: dict[str, None] = {}
    for _, record in records:
        if isinstance(record, dict):
            columns.update(dict.fromkeys(record))
    return RawTable(origin, list(columns), records)


def _read_jsonl(path: Path, text: str, max_rows: int | None) -> RawTable:
    records: list[tuple[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if max_rows is not None and len(records) >= max_rows:
            break
        if not line.strip():
            continue
        try:
            records.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            records.append((f"line {lineno}", Unreadable(f"not valid JSON at char {e.colno}: {e.msg}")))
    return _table(str(path), records)


def _read_json(path: Path, text: str, max_rows: int | None) -> RawTable:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl(path, text, max_rows)  # a .json file holding JSON lines, common on the hub
        raise DataError(f"{path}: not valid JSON at line {e.lineno}, char {e.colno}: {e.msg}. Fix the file; it "
                        f"must hold a list of records, a records object, or one JSON object per line.") from None
    records = _json_records(path, data)
    if max_rows is not None:
        records = records[:max_rows]
    return _table(str(path), [(f"record {i}", r) for i, r in enumerate(records)])


def _json_records(path: Path, data: Any) -> list[Any]:
    """A list of records; or an object with one key holding that list; or an object of equal-length columns."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        wrapped = [k for k, v in lists.items() if v and all(isinstance(r, dict) for r in v)]
        if len(wrapped) == 1:
            return lists[wrapped[0]]
        lengths = {len(v) for v in lists.values()}
        if lists and len(lists) == len(data) and len(lengths) == 1:
            names = list(lists)
            return [dict(zip(names, values)) for values in zip(*lists.values())]
    raise DataError(f"{path}: the JSON top level is a {type(data).__name__} that holds no records. Use a list of "
                    f"objects, an object with one key holding that list (e.g. {{\"data\": [...]}}), or column lists.")


def _read_csv(path: Path, text: str, max_rows: int | None) -> RawTable:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records: list[tuple[str, Any]] = []
    try:
        for row in reader:
            if max_rows is not None and len(records) >= max_rows:
                break
            row.pop(None, None)  # values beyond the header have no column name
            records.append((f"line {reader.line_num}", row))
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: CSV does not parse ({e}). Fix the quoting on that line.") from None
    return RawTable(str(path), list(reader.fieldnames or []), records)


def _read_parquet(path: Path, max_rows: int | None) -> RawTable:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read this Parquet file ({e}). Check that it is complete.") from None
    if table.num_rows == 0:
        raise DataError(f"{path} is empty: there are no rows to load. Point to a file with data.")
    if max_rows is not None:
        table = table.slice(0, max_rows)
    return RawTable(str(path), table.column_names, [(f"row {i}", r) for i, r in enumerate(table.to_pylist())])


def _read_folder(path: Path, max_rows: int | None) -> list[RawTable]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
    if not files:
        raise DataError(f"{path} is a folder with no data files. Put {', '.join(FILE_SUFFIXES)} files in it, "
                        f"or point to a datasets save_to_disk folder.")
    tables = []
    for file in files:
        left = None if max_rows is None else max_rows - sum(len(t.records) for t in tables)
        if left is not None and left <= 0:
            break
        tables.append(_read_file(file, left))
    return tables


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _from_saved_dataset(path: Path, split: str, max_rows: int | None) -> RawTable:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: the saved dataset has no split '{split}'; it has {', '.join(loaded)}. "
                            f"Pass one of those as the split.")
        loaded = loaded[split]
    return _dataset_table(str(path), loaded, max_rows)


def _from_hub(name: str, split: str, max_rows: int | None) -> RawTable:
    import datasets

    repo, _, config = name.partition(":")
    wanted = split if max_rows is None else f"{split}[:{max_rows}]"
    try:
        loaded = datasets.load_dataset(repo, config or None, split=wanted)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"dataset '{name}' is not a local file or folder and could not be loaded from the "
                        f"Hugging Face Hub: {first_line}. Check the name and the network (offline mode: "
                        f"HF_DATASETS_OFFLINE), or pass a local path.") from None
    return _dataset_table(name, loaded, None)


def _dataset_table(origin: str, dataset: Any, max_rows: int | None) -> RawTable:
    if max_rows is not None:
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    if len(dataset) == 0:
        raise DataError(f"{origin} is empty: there are no rows to load. Point to a dataset with data.")
    return RawTable(origin, list(dataset.column_names), [(f"row {i}", r) for i, r in enumerate(dataset.to_list())])
