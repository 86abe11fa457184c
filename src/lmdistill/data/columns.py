"""Column mapping and unused columns.

A source may say which of its columns play which role: `{prompt: context, response: target}` renames the
dataset's `context` and `target` columns to `prompt` and `response` before detection, so any layout that
holds the same information under other names loads (config `data.sources.NAME.columns`, or
`lmdistill data PATH --columns prompt=context,response=target`). The roles are the column names the formats
read (see formats.py), plus `system` (a system prompt put before the conversation) and `tools` (function
schemas passed to the chat template).

After detection, text columns the chosen format does not read are named, so a user sees e.g. that an
`instruction` column beside `text` was left out, and how to map it.
"""

from __future__ import annotations

from lmdistill.data.readers import RawTable
from lmdistill.errors import DataError

ROLES = ("prompt", "response", "completion", "instruction", "input", "output", "context", "question", "answer",
         "ask", "source", "target", "text", "messages", "conversations", "system", "tools")
ALWAYS_READ = ("system", "tools", "bucket", "category")  # read beside any format
_SAMPLE = 20  # records looked at to tell text columns from ids, numbers and labels


def check_mapping(mapping: dict[str, str]) -> dict[str, str]:
    """The mapping, or a DataError naming the unknown roles."""
    unknown = [role for role in mapping if role not in ROLES]
    if unknown:
        raise DataError(f"column mapping names unknown role(s) {', '.join(unknown)}: map the roles "
                        f"{', '.join(ROLES)} to your column names, e.g. prompt=context,response=target.")
    return mapping


def parse_mapping(spec: str) -> dict[str, str]:
    """'prompt=context,response=target' -> {"prompt": "context", "response": "target"}."""
    mapping = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        role, sep, column = (s.strip() for s in item.partition("="))
        if not sep or not role or not column:
            raise DataError(f"--columns item '{item}' is not ROLE=COLUMN: write e.g. "
                            f"--columns prompt=context,response=target.")
        mapping[role] = column
    return check_mapping(mapping)


def apply_mapping(table: RawTable, mapping: dict[str, str]) -> RawTable:
    """The table with each mapped column renamed to its role (the original name is dropped)."""
    if not mapping:
        return table
    missing = [column for column in mapping.values() if column not in table.columns]
    if missing:
        raise DataError(f"{table.origin}: the column mapping names column(s) {', '.join(missing)}, which the data "
                        f"does not have; its columns are [{', '.join(table.columns)}]. Fix the mapping.")
    renamed = {column: role for role, column in mapping.items()}

    def rename(record):
        if not isinstance(record, dict):
            return record
        out = {k: v for k, v in record.items() if k not in renamed and k not in mapping}
        out.update({role: record.get(column) for role, column in mapping.items()})
        return out

    columns = list(dict.fromkeys(renamed.get(c, c) for c in table.columns if c not in mapping or c in renamed))
    return RawTable(table.origin, columns, [(where, rename(r)) for where, r in table.records])


def unused_text_columns(table: RawTable, read: tuple[str, ...]) -> list[str]:
    """Columns outside `read` (and ALWAYS_READ) that hold prose: strings with a space in the first records."""
    sample = [r for _, r in table.records[:_SAMPLE] if isinstance(r, dict)]
    return [c for c in table.columns if c not in read and c not in ALWAYS_READ
            and any(isinstance(r.get(c), str) and " " in r[c].strip() for r in sample)]
