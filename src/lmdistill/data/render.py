"""Render normalised rows as text segments for a causal LM: (text, trained) pairs whose concatenation is the
training text, with the assistant turns that are trained on marked.

`train_on` says which assistant turns are trained on: `all_assistant` (default: every assistant turn that says
or calls something) or `last_assistant` (only the last; earlier turns are context).

With a chat template (`tokenizer.chat_template`), each trained turn i is located by rendering the prefix
`apply_chat_template(messages[:i], add_generation_prompt=True)` and `apply_chat_template(messages[:i+1])`: the
turn is what the second adds to the first, up to and including the end-of-turn token (whitespace after it is
context). When every prefix is a prefix of the full conversation, the row is one sequence with every trained
turn marked. Templates that rewrite history (e.g. drop the reasoning of earlier turns) break that; the row
then becomes one sequence per trained turn, each rendered as the template shows the conversation at that
turn (prefix by prefix), so every turn is trained on exactly the text the model produces there. The row's
`tools` are passed to the template.

Without a chat template, the plain template is used (one blank line between turns):

    ### Tools:
    {the row's tools as JSON, when it has some}

    ### System:
    {system content}

    ### User:
    {user content}

    ### Assistant:
    {content}
    <tool_call>
    {"name": ..., "arguments": {...}}
    </tool_call>

    ### Tool:
    {tool result}

    ### Assistant:
    {response}<eos>

A generation prompt ends with "### Assistant:\\n"; an assistant turn is trained on from its content to its
last tool call (as in the Hermes / Qwen tool-call convention).
"""

from __future__ import annotations

import json
from typing import Any

from lmdistill.data.chat import has_output

PLAIN_HEADERS = {"tools": "### Tools:\n", "system": "### System:\n", "user": "### User:\n",
                 "assistant": "### Assistant:\n", "tool": "### Tool:\n"}
PLAIN_SEPARATOR = "\n\n"
TRAIN_ON = ("all_assistant", "last_assistant")

Segments = list[tuple[str, bool]]  # (text, trained); their concatenation is one training text


def to_messages(row: dict) -> list[dict]:
    """A prompt/response, source/target or chat row as a chat whose last turn is the assistant's (empty for a
    prompt-only row)."""
    if "messages" in row:
        return row["messages"]
    prompt, response = (row["prompt"], row.get("response", "")) if "prompt" in row else (row["source"], row["target"])
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return system + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def plain_body(message: dict) -> str:
    """A turn's text in the plain template: content, then each tool call in <tool_call> tags."""
    calls = [f"<tool_call>\n{json.dumps(c['function'], ensure_ascii=False)}\n</tool_call>"
             for c in message.get("tool_calls", [])]
    return "\n".join(([message["content"]] if message["content"] else []) + calls)


def plain_history(messages: list[dict], tools: list[dict] | None = None) -> str:
    """Turns rendered with the plain template, each followed by a blank line."""
    head = PLAIN_HEADERS["tools"] + json.dumps(tools, ensure_ascii=False) + PLAIN_SEPARATOR if tools else ""
    return head + "".join(PLAIN_HEADERS[m["role"]] + plain_body(m) + PLAIN_SEPARATOR for m in messages)


def trained_turns(messages: list[dict], train_on: str) -> list[int]:
    """Indices of the assistant turns trained on; ValueError when there are none."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on '{train_on}' is unknown: use one of {', '.join(TRAIN_ON)}")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and has_output(m)]
    if train_on == "last_assistant":
        turns = [i for i in turns if i == len(messages) - 1]
    if not turns:
        raise ValueError("the last assistant turn is empty, so train_on: last_assistant leaves nothing to train on"
                         if train_on == "last_assistant" else "no assistant turn says anything to train on")
    return turns


def _plain(messages: list[dict], turns: list[int], tools: list[dict] | None) -> list[Segments]:
    segments: Segments = []
    context, start = "", 0
    for i in turns:
        context += plain_history(messages[start:i], tools if start == 0 else None) + PLAIN_HEADERS["assistant"]
        segments += [(context, False), (plain_body(messages[i]), True)]
        context, start = PLAIN_SEPARATOR, i + 1
    return [segments]


def _templated(messages: list[dict], turns: list[int], tokenizer: Any, tools: list[dict] | None) -> list[Segments]:
    def render(upto: int, generation: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], tools=tools, add_generation_prompt=generation,
                                             tokenize=False)

    try:
        full = render(len(messages), False)
        spans = [(render(i, True), full if i == len(messages) - 1 else render(i + 1, False)) for i in turns]
    except Exception as e:  # jinja raises TemplateError (or anything the template's raise_exception passes)
        raise ValueError(f"the tokenizer's chat template rejects this conversation: {e}") from None
    if not all(upto.startswith(prompt) for prompt, upto in spans):
        raise ValueError("the tokenizer's chat template does not render the prompt as a prefix of the conversation "
                         "up to the response, so the response cannot be located")
    spans = [(prompt, len(prompt) + len(upto[len(prompt):].rstrip()), upto) for prompt, upto in spans]
    if all(full.startswith(upto) for _, _, upto in spans):
        segments: Segments = []
        position = 0
        for prompt, end, _ in spans:
            segments += [(full[position:len(prompt)], False), (full[len(prompt):end], True)]
            position = end
        return [segments]
    return [[(prompt, False), (upto[len(prompt):end], True)] for prompt, end, upto in spans]


def render_segments(row: dict, tokenizer: Any, train_on: str = "all_assistant") -> list[Segments]:
    """The training texts of a prompt/response, source/target or chat row (see the module docstring): usually
    one, one per trained turn when the chat template rewrites history. ValueError when the row cannot be
    rendered or has nothing to train on."""
    messages, tools = to_messages(row), row.get("tools")
    turns = trained_turns(messages, train_on)
    if getattr(tokenizer, "chat_template", None):
        return _templated(messages, turns, tokenizer, tools)
    return _plain(messages, turns, tools)


def render_prompt(row: dict, tokenizer: Any) -> str:
    """The text a prompt-only row gives the model to answer: the chat up to the assistant's turn, as the chat
    template renders it for generation (or the plain template). ValueError when the template rejects it."""
    messages = to_messages(row)[:-1]
    if not getattr(tokenizer, "chat_template", None):
        return plain_history(messages, row.get("tools")) + PLAIN_HEADERS["assistant"]
    try:
        return tokenizer.apply_chat_template(messages, tools=row.get("tools"), add_generation_prompt=True,
                                             tokenize=False)
    except Exception as e:  # jinja raises TemplateError (or anything the template's raise_exception passes)
        raise ValueError(f"the tokenizer's chat template rejects this conversation: {e}") from None


def render_causal(messages: list[dict], tokenizer: Any, tools: list[dict] | None = None) -> tuple[str, str]:
    """(prompt, response) text for a chat ending with the assistant's turn: the last turn is the response, the
    rest the prompt (what generation continues from)."""
    (segments,) = render_segments({"messages": messages, "tools": tools}, tokenizer, "last_assistant")
    return "".join(text for text, _ in segments[:-1]), segments[-1][0]
