"""Formats: detect what a source's columns mean and normalise every record to one of four row kinds.

Normalised rows (plus "row_id": position in the original source, "bucket" when the source has a `bucket`
or `category` column, "system" when it has a `system` column and the row is not plain text, and "finished"
when it has a boolean `finished` column, as `generate` writes):
  {"text": str}                                  plain text, trained on every token
  {"prompt": str, "response": str}               instruction data; only the response is trained on
  {"prompt": str}                                a prompt alone (no or an empty completion), for `generate`
  {"messages": [...], "tools"?: [...]}           chat (see chat.py); the assistant turns are trained on
  {"source": str, "target": str}                 seq2seq pairs

A column mapping (see columns.py) renames the source's columns before detection.

Detection picks the format whose columns match most (ties go to the earlier entry of FORMATS), so an
alpaca file that also carries a `text` column is read as alpaca. A caller may force one format, or the
family `pair` (any of the prompt/response-pair layouts).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lmdistill.data.badrows import BadRow, BadRows, string_field
from lmdistill.data.chat import CHAT_ROLES, SHAREGPT_ROLES, chat_row
from lmdistill.data.columns import apply_mapping, check_mapping, unused_text_columns
from lmdistill.data.readers import RawTable, Unreadable, read_tables
from lmdistill.errors import DataError

logger = logging.getLogger(__name__)

BUCKET_COLUMNS = ("bucket", "category")


def _joined(record: dict, main: str, extra: str) -> str:
    """Instruction plus an optional second field (alpaca input, Dolly context) separated by a blank line."""
    head, tail = string_field(record, main), string_field(record, extra, required=False)
    return f"{head}\n\n{tail}" if tail else head


@dataclass(frozen=True)
class Format:
    """A layout: the columns it needs, the ones it may use, and how to turn a record into a normalised row."""

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    normalise: Callable[[dict], dict]

    def describe(self) -> str:
        extra = "".join(f", [{c}]" for c in self.optional)
        return f"{self.name} ({', '.join(self.required)}{extra})"


def _pair(prompt: str, response: str, kind: tuple[str, str] = ("prompt", "response")) -> Callable[[dict], dict]:
    return lambda r: {kind[0]: string_field(r, prompt), kind[1]: string_field(r, response)}


def _prompt(record: dict) -> dict:
    """A prompt with its completion, or alone (no or an empty completion): a prompt for the teacher to answer.
    A generation that finished at once (`finished: true`, as `generate` writes) keeps its empty completion: the
    student learns to stop there."""
    row = {"prompt": string_field(record, "prompt")}
    completion = string_field(record, "completion", required=False)
    if not completion and record.get("finished") is True:
        completion = record.get("completion") or ""
        return row | {"response": completion}
    return row | ({"response": completion} if completion else {})


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("chat", ("messages",), (), lambda r: chat_row(r, "messages", "role", "content", CHAT_ROLES)),
    Format("sharegpt", ("conversations",), (), lambda r: chat_row(r, "conversations", "from", "value", SHAREGPT_ROLES)),
    Format("alpaca", ("instruction", "output"), ("input",),
           lambda r: {"prompt": _joined(r, "instruction", "input"), "response": string_field(r, "output")}),
    Format("dolly", ("instruction", "response"), ("context",),
           lambda r: {"prompt": _joined(r, "instruction", "context"), "response": string_field(r, "response")}),
    Format("prompt_completion", ("prompt", "completion"), (), _prompt),
    Format("prompt_response", ("prompt", "response"), (), _pair("prompt", "response")),
    Format("question_answer", ("question", "answer"), (), _pair("question", "answer")),
    Format("ask_answer", ("ask", "answer"), (), _pair("ask", "answer")),
    Format("seq2seq", ("source", "target"), (), _pair("source", "target", ("source", "target"))),
    Format("text", ("text",), (), lambda r: {"text": string_field(r, "text")}),
    Format("prompt", ("prompt",), (), _prompt),
]}


FAMILIES: dict[str, tuple[str, ...]] = {
    "pair": ("prompt_completion", "prompt_response", "question_answer", "ask_answer"),
}


@dataclass
class LoadedSource:
    """Normalised rows of one source, with what was skipped on the way."""

    format: str
    rows: list[dict]
    columns: list[str]
    origin: str
    skipped: Counter = field(default_factory=Counter)
    first_skipped: list[str] = field(default_factory=list)
    ignored_columns: list[str] = field(default_factory=list)

    @property
    def num_read(self) -> int:
        """Records read from the source, good and bad."""
        return len(self.rows) + sum(self.skipped.values())


def detect_format(columns: list[str], origin: str, among: tuple[str, ...] = tuple(FORMATS)) -> Format:
    """The best-matching format (of `among`) for these columns, or a DataError listing the columns and the
    formats accepted."""
    present, candidates = set(columns), [FORMATS[name] for name in among]
    scored = [(len(f.required) + len(present & set(f.optional)), -i, f)
              for i, f in enumerate(candidates) if set(f.required) <= present]
    if scored:
        return max(scored, key=lambda s: s[:2])[2]
    accepted = "; ".join(f.describe() for f in candidates)
    near = max(candidates, key=lambda f: len(present & set(f.required)) / len(f.required))
    missing = [c for c in near.required if c not in present]
    hint = (f" Closest: {near.name}, which also needs column {', '.join(repr(c) for c in missing)}."
            if len(missing) < len(near.required) else "")
    raise DataError(f"{origin}: columns [{', '.join(columns) or 'none'}] match no known format.{hint} "
                    f"Accepted formats: {accepted}. Rename the columns to one of these layouts.")


def _resolve(format: str, table: RawTable) -> Format:
    if format == "auto":
        return detect_format(table.columns, table.origin)
    if format in FAMILIES:
        return detect_format(table.columns, table.origin, FAMILIES[format])
    if format not in FORMATS:
        raise DataError(f"unknown data format '{format}'. Use 'auto', {', '.join(FAMILIES)}, "
                        f"or one of: {', '.join(FORMATS)}.")
    chosen = FORMATS[format]
    missing = [c for c in chosen.required if c not in table.columns]
    if missing:
        raise DataError(f"{table.origin}: format '{format}' needs column(s) {', '.join(missing)}, but the columns "
                        f"are [{', '.join(table.columns)}]. Use format 'auto' or rename the columns.")
    return chosen


def _bucket(record: dict) -> str | None:
    for column in BUCKET_COLUMNS:
        value = record.get(column)
        if value is not None and str(value).strip():
            return str(value).strip()
    return None


def _with_system(row: dict, record: dict) -> dict:
    """A `system` column becomes the row's system prompt (a chat gets it as its first turn unless it has one)."""
    system = string_field(record, "system", required=False)
    if not system or "text" in row:
        return row
    if "messages" not in row:
        return row | {"system": system}
    if row["messages"][0]["role"] != "system":
        row["messages"].insert(0, {"role": "system", "content": system})
    return row


def _ignored_hint(ignored: list[str], fmt: Format, origin: str) -> str:
    reads = ", ".join(fmt.required + fmt.optional)
    return (f"{origin}: column(s) {', '.join(ignored)} are not used (format {fmt.name} reads {reads}); to train on "
            f"them, map them to roles with data.sources.NAME.columns or --columns, e.g. "
            f"--columns prompt={ignored[0]},response=...")


def load_source(path_or_name: str | Path, format: str = "auto", split: str = "train",
                max_rows: int | None = None, strict: bool = False,
                columns: dict[str, str] | None = None) -> LoadedSource:
    """Load a file, folder or hub dataset and normalise its records (see the module docstring).

    `columns` maps roles to the source's column names (see columns.py). Bad records are counted per reason
    and skipped (the first few logged), or raise a DataError naming the row when `strict`. Raises DataError
    when nothing usable is left.
    """
    mapping = check_mapping(dict(columns or {}))
    tables = [apply_mapping(t, mapping) for t in read_tables(path_or_name, split=split, max_rows=max_rows)]
    origin = str(path_or_name)
    bad = BadRows(origin, strict)
    chosen: Format | None = None
    rows: list[dict] = []
    ignored: dict[str, None] = {}
    row_id = 0
    for table in tables:
        if not table.records:
            raise DataError(f"{table.origin} is empty: there are no rows to load. Point to a file with data.")
        fmt = _resolve(format, table)
        if chosen is not None and fmt.name != chosen.name:
            raise DataError(f"{table.origin} is in format '{fmt.name}' but {tables[0].origin} is in "
                            f"'{chosen.name}': keep one format per folder, or load them as separate sources.")
        chosen = fmt
        ignored.update(dict.fromkeys(unused_text_columns(table, fmt.required + fmt.optional)))
        where_prefix = f"{Path(table.origin).name} " if len(tables) > 1 else ""
        for where, record in table.records:
            try:
                if isinstance(record, Unreadable):
                    raise BadRow("undecodable", record.detail)
                if not isinstance(record, dict):
                    raise BadRow("wrong_type", f"the record is a {type(record).__name__}, not an object")
                row = _with_system(fmt.normalise(record), record)
                row["row_id"] = row_id
                bucket = _bucket(record)
                if bucket is not None:
                    row["bucket"] = bucket
                if isinstance(record.get("finished"), bool):  # `lmdistill generate` output: did the teacher stop?
                    row["finished"] = record["finished"]
                rows.append(row)
            except BadRow as e:
                bad.add(e.reason, where_prefix + where, str(e))
            row_id += 1
    bad.log_summary(len(rows))
    bad.fail_if_nothing_kept(len(rows))
    assert chosen is not None  # read_tables never returns an empty list
    if ignored:
        logger.warning("%s", _ignored_hint(list(ignored), chosen, origin))
    columns_seen = list(dict.fromkeys(c for t in tables for c in t.columns))
    return LoadedSource(chosen.name, rows, columns_seen, origin, bad.skipped, bad.first, list(ignored))
