"""Formats: detect what a source's columns mean and normalise every record to one of four row kinds.

Normalised rows (plus "row_id": position in the original source, and "bucket" when the source has a
`bucket` or `category` column):
  {"text": str}                                  plain text, trained on every token
  {"prompt": str, "response": str}               instruction data; only the response is trained on
  {"messages": [{"role", "content"}, ...]}       chat; the last turn must be the assistant's
  {"source": str, "target": str}                 seq2seq pairs

Detection picks the format whose columns match most (ties go to the earlier entry of FORMATS), so an
alpaca file that also carries a `text` column is read as alpaca. A caller may force one format, or the
family `pair` (any of the prompt/response-pair layouts).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lmdistill.data.badrows import BadRows
from lmdistill.data.readers import RawTable, Unreadable, read_tables
from lmdistill.errors import DataError

CHAT_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
BUCKET_COLUMNS = ("bucket", "category")


class BadRow(Exception):
    """Raised inside a normaliser: the record is unusable for `reason` (see badrows.py)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _string(record: dict, column: str, required: bool = True) -> str:
    value = record.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise BadRow("empty", f"'{column}' is empty or missing")
        return ""
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"'{column}' is a {type(value).__name__}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRow("undecodable", f"'{column}' holds bytes that are not valid UTF-8") from None
    return value


def _joined(record: dict, main: str, extra: str) -> str:
    """Instruction plus an optional second field (alpaca input, Dolly context) separated by a blank line."""
    head, tail = _string(record, main), _string(record, extra, required=False)
    return f"{head}\n\n{tail}" if tail else head


def _turns(record: dict, column: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict[str, str]]:
    turns = record.get(column)
    if isinstance(turns, str):  # chat stored as a JSON string, e.g. in a CSV cell
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            raise BadRow("wrong_type", f"'{column}' is a string that is not a JSON list of turns") from None
    if not turns:
        raise BadRow("empty", f"'{column}' is empty or missing")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise BadRow("wrong_type", f"'{column}' must be a list of {{'{role_key}', '{text_key}'}} objects")
    messages = []
    for i, turn in enumerate(turns):
        role = roles.get(str(turn.get(role_key)))
        if role is None:
            raise BadRow("bad_chat", f"turn {i} has {role_key} '{turn.get(role_key)}'; use one of {', '.join(roles)}")
        messages.append({"role": role, "content": _string(turn, text_key)})
    if messages[-1]["role"] != "assistant":
        raise BadRow("bad_chat", f"the last turn is the {messages[-1]['role']}'s, not the assistant's: there is "
                                 f"no response to train on (end each conversation with an assistant turn)")
    return messages


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
    return lambda r: {kind[0]: _string(r, prompt), kind[1]: _string(r, response)}


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("chat", ("messages",), (),
           lambda r: {"messages": _turns(r, "messages", "role", "content", {k: k for k in CHAT_ROLES})}),
    Format("sharegpt", ("conversations",), (),
           lambda r: {"messages": _turns(r, "conversations", "from", "value", SHAREGPT_ROLES)}),
    Format("alpaca", ("instruction", "output"), ("input",),
           lambda r: {"prompt": _joined(r, "instruction", "input"), "response": _string(r, "output")}),
    Format("dolly", ("instruction", "response"), ("context",),
           lambda r: {"prompt": _joined(r, "instruction", "context"), "response": _string(r, "response")}),
    Format("prompt_completion", ("prompt", "completion"), (), _pair("prompt", "completion")),
    Format("prompt_response", ("prompt", "response"), (), _pair("prompt", "response")),
    Format("question_answer", ("question", "answer"), (), _pair("question", "answer")),
    Format("ask_answer", ("ask", "answer"), (), _pair("ask", "answer")),
    Format("seq2seq", ("source", "target"), (), _pair("source", "target", ("source", "target"))),
    Format("text", ("text",), (), lambda r: {"text": _string(r, "text")}),
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


def load_source(path_or_name: str | Path, format: str = "auto", split: str = "train",
                max_rows: int | None = None, strict: bool = False) -> LoadedSource:
    """Load a file, folder or hub dataset and normalise its records (see the module docstring).

    Bad records are counted per reason and skipped (the first few logged), or raise a DataError naming the
    row when `strict`. Raises DataError when nothing usable is left.
    """
    tables = read_tables(path_or_name, split=split, max_rows=max_rows)
    origin = str(path_or_name)
    bad = BadRows(origin, strict)
    chosen: Format | None = None
    rows: list[dict] = []
    row_id = 0
    for table in tables:
        if not table.records:
            raise DataError(f"{table.origin} is empty: there are no rows to load. Point to a file with data.")
        fmt = _resolve(format, table)
        if chosen is not None and fmt.name != chosen.name:
            raise DataError(f"{table.origin} is in format '{fmt.name}' but {tables[0].origin} is in "
                            f"'{chosen.name}': keep one format per folder, or load them as separate sources.")
        chosen = fmt
        where_prefix = f"{Path(table.origin).name} " if len(tables) > 1 else ""
        for where, record in table.records:
            try:
                if isinstance(record, Unreadable):
                    raise BadRow("undecodable", record.detail)
                if not isinstance(record, dict):
                    raise BadRow("wrong_type", f"the record is a {type(record).__name__}, not an object")
                row = fmt.normalise(record)
                row["row_id"] = row_id
                bucket = _bucket(record)
                if bucket is not None:
                    row["bucket"] = bucket
                rows.append(row)
            except BadRow as e:
                bad.add(e.reason, where_prefix + where, str(e))
            row_id += 1
    bad.log_summary(len(rows))
    bad.fail_if_nothing_kept(len(rows))
    assert chosen is not None  # read_tables never returns an empty list
    columns = list(dict.fromkeys(c for t in tables for c in t.columns))
    return LoadedSource(chosen.name, rows, columns, origin, bad.skipped, bad.first)
