"""Bad-row bookkeeping shared by loading and tokenisation: count per reason, keep and log the first few,
or stop at the first one in strict mode.

Reasons used across `data/`:
  empty        a required field is missing, blank, or the record has no usable content
  wrong_type   a field is not a string (or a record is not an object / chat is not a list of turns)
  undecodable  bytes that are not UTF-8, or a JSONL line that does not parse
  bad_chat     a chat whose roles are unknown, whose last turn is not the assistant's, or whose tool results
               answer no tool call
  non_text     a content part that is not text (an image, audio, ...): this toolkit trains on text only
  too_long     still longer than max_length after the truncation policy (see tokenize.py)
"""

from __future__ import annotations

import logging
from collections import Counter

from lmdistill.errors import DataError

logger = logging.getLogger(__name__)


class BadRow(Exception):
    """Raised while normalising a record: the record is unusable for `reason` (see above)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def string_field(record: dict, column: str, required: bool = True) -> str:
    """record[column] as a string; BadRow when it is missing or blank (if required), not a string, or not UTF-8."""
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

FIRST_KEPT = 5  # how many bad rows are described in the log and in `first_skipped`


class BadRows:
    """Collects bad rows of one source. In strict mode the first bad row raises a DataError instead."""

    def __init__(self, origin: str, strict: bool) -> None:
        self.origin = origin
        self.strict = strict
        self.skipped: Counter[str] = Counter()
        self.first: list[str] = []

    def add(self, reason: str, where: str, detail: str) -> None:
        """Record one bad row. `where` locates it (e.g. 'line 7'), `detail` says what is wrong with it."""
        message = f"{self.origin}, {where}: {detail} [{reason}]"
        if self.strict:
            raise DataError(f"{message}. Fix or remove this row, or run without --strict to skip bad rows.")
        self.skipped[reason] += 1
        if len(self.first) < FIRST_KEPT:
            self.first.append(message)
            logger.warning("skipping bad row: %s", message)

    def merge(self, other: BadRows) -> None:
        """Fold in the counts and first examples of another collector (e.g. one file of a folder)."""
        self.skipped.update(other.skipped)
        self.first.extend(other.first[: FIRST_KEPT - len(self.first)])

    def log_summary(self, kept: int) -> None:
        if self.skipped:
            counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
            logger.warning("%s: kept %d rows, skipped %d (%s)", self.origin, kept, sum(self.skipped.values()), counts)

    def fail_if_nothing_kept(self, kept: int, what: str = "rows") -> None:
        """Raise when every row was bad: training on nothing must never start."""
        if kept == 0:
            counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items())) or "none read"
            first = f" First: {self.first[0]}." if self.first else ""
            raise DataError(f"{self.origin}: no usable {what} (skipped {counts}).{first} Fix the data or its format.")
