"""Chat records as users bring them, normalised to one message form.

A normalised message is {"role", "content"} with role system | user | assistant | tool, plus:
  tool_calls    (assistant) [{"type": "function", "function": {"name": str, "arguments": dict}, "id"?: str}],
                the form transformers chat templates read; OpenAI's JSON-string arguments are parsed into a dict
  tool_call_id  (tool) the id of the call it answers, when the data gives one
  name          (tool) the function's name, when the data gives one

Accepted spellings:
  * content as a string, or a list of parts (OpenAI message format): {"type": "text", "text": ...} (also
    "input_text"/"output_text", and "value" for "text" as some tools write it) or bare strings, joined with a
    newline. A non-text part (image, audio, file) makes the row bad: this toolkit is text-only.
  * OpenAI tool use: assistant messages with `tool_calls`, answered by `tool` messages.
  * ShareGPT tool use (as LLaMA-Factory writes it): a `function_call` turn whose value is the JSON call
    {"name", "arguments"} (or a list of them), answered by an `observation` turn.
  * a `tools` column (a list of function schemas, or that list as a JSON string), passed to the chat template.

Checks: roles are known; every tool result answers a call of the assistant turn before it (by id when both
have ids); the last turn is the assistant's; at least one assistant turn has content or tool calls.
"""

from __future__ import annotations

import json
from typing import Any

from lmdistill.data.badrows import BadRow, string_field

CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}
TEXT_PARTS = ("text", "input_text", "output_text")
NON_TEXT_PARTS = ("image", "image_url", "input_image", "audio", "input_audio", "video", "file", "input_file")


def _json(value: Any, what: str) -> Any:
    """A JSON string parsed (data stored in CSV cells or by tools that serialise nested fields), else value."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise BadRow("wrong_type", f"{what} is a string that is not valid JSON") from None


def content_text(turn: dict, key: str, where: str) -> str:
    """The turn's text: a string, or text parts joined with a newline ("" when absent)."""
    value = turn.get(key)
    if value is None or isinstance(value, str):
        return string_field(turn, key, required=False)
    if not isinstance(value, list):
        raise BadRow("wrong_type", f"{where}: '{key}' is a {type(value).__name__}, not a string or a list of parts")
    texts = []
    for part in value:
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type", "text") if isinstance(part, dict) else None
        if kind in NON_TEXT_PARTS:
            raise BadRow("non_text", f"{where} has a content part of type '{kind}': this toolkit trains on text "
                                     f"only; drop such parts (or rows) from the data")
        if kind not in TEXT_PARTS:
            raise BadRow("wrong_type", f"{where} has a content part of unknown type {kind!r}: use "
                                       f"{{'type': 'text', 'text': ...}} parts")
        field = "text" if "text" in part else "value"
        texts.append(string_field(part, field, required=False))
    return "\n".join(t for t in texts if t)


def _call(raw: Any, where: str) -> dict:
    """One tool call in the transformers form; accepts OpenAI's {"function": {...}} and a bare {"name", ...}."""
    function = raw.get("function", raw) if isinstance(raw, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise BadRow("wrong_type", f"{where}: a tool call must be {{'name': ..., 'arguments': {{...}}}} "
                                   f"(or OpenAI's {{'function': {{...}}}}), got {str(raw)[:80]}")
    arguments = _json(function.get("arguments", {}), f"{where}: the arguments of '{function['name']}'")
    if not isinstance(arguments, dict):
        raise BadRow("wrong_type", f"{where}: the arguments of '{function['name']}' must be an object")
    call = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if raw.get("id") is not None:
        call["id"] = str(raw["id"])
    return call


def _calls(raw: Any, where: str) -> list[dict]:
    raw = _json(raw, f"{where}: the tool call")
    return [_call(c, where) for c in (raw if isinstance(raw, list) else [raw])]


def parse_tools(record: dict) -> list[dict] | None:
    """The row's `tools` column (function schemas for the chat template), or None when it has none."""
    tools = _json(record.get("tools"), "'tools'")
    if tools in (None, "", []):
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRow("wrong_type", "'tools' must be a list of function schemas (objects)")
    return tools


def _check_tool_results(messages: list[dict]) -> None:
    open_calls: list[str | None] = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            open_calls = [c.get("id") for c in m.get("tool_calls", [])]
        elif m["role"] == "tool":
            if not open_calls:
                raise BadRow("bad_chat", f"turn {i} is a tool result that answers no tool call: the assistant turn "
                                         f"before it makes no (more) calls. Add the call or drop the result")
            wanted = m.get("tool_call_id")
            if wanted is not None and wanted not in open_calls and None not in open_calls:
                raise BadRow("bad_chat", f"turn {i} answers tool call id '{wanted}', which the assistant turn before "
                                         f"it did not make (its calls: {', '.join(map(str, open_calls))})")
            open_calls.remove(wanted if wanted in open_calls else open_calls[0])
        else:
            open_calls = []


def has_output(message: dict) -> bool:
    """Whether an assistant message says or calls anything (only such turns are trained on)."""
    return bool(message["content"].strip() or message.get("tool_calls"))


def normalise_turns(record: dict, column: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict]:
    """The record's conversation as normalised messages (see the module docstring), or BadRow."""
    turns = _json(record.get(column), f"'{column}'")
    if not turns:
        raise BadRow("empty", f"'{column}' is empty or missing")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise BadRow("wrong_type", f"'{column}' must be a list of {{'{role_key}', '{text_key}'}} objects")
    messages = []
    for i, turn in enumerate(turns):
        spelled = str(turn.get(role_key))
        role = roles.get(spelled)
        if role is None:
            raise BadRow("bad_chat", f"turn {i} has {role_key} '{turn.get(role_key)}'; use one of {', '.join(roles)}")
        where = f"turn {i}"
        if spelled == "function_call":  # ShareGPT: the call itself is the value
            messages.append({"role": "assistant", "content": "", "tool_calls": _calls(turn.get(text_key), where)})
            continue
        message = {"role": role, "content": content_text(turn, text_key, where)}
        if role == "assistant" and turn.get("tool_calls"):
            message["tool_calls"] = _calls(turn["tool_calls"], where)
        if role == "tool":
            message.update({k: str(turn[k]) for k in ("tool_call_id", "name") if turn.get(k) is not None})
        messages.append(message)
    if messages[-1]["role"] != "assistant":
        raise BadRow("bad_chat", f"the last turn is the {messages[-1]['role']}'s, not the assistant's: there is "
                                 f"no response to train on (end each conversation with an assistant turn)")
    _check_tool_results(messages)
    if not any(has_output(m) for m in messages if m["role"] == "assistant"):
        raise BadRow("empty", "every assistant turn is empty: there is nothing to train on")
    return messages


def chat_row(record: dict, column: str, role_key: str, text_key: str, roles: dict[str, str]) -> dict:
    """A normalised chat row: {"messages": [...]} plus "tools" when the record has some."""
    row: dict = {"messages": normalise_turns(record, column, role_key, text_key, roles)}
    tools = parse_tools(record)
    if tools is not None:
        row["tools"] = tools
    return row

