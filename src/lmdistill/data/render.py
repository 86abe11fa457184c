"""Render normalised rows as (prompt text, response text) for a causal LM.

With a chat template (`tokenizer.chat_template`), the prompt is
`apply_chat_template(history, add_generation_prompt=True)` and the response is what the full conversation
adds after it, up to and including the end-of-turn token (trailing whitespace after it is dropped, since
nothing follows in a training example). Only the last assistant turn is trained on; earlier turns are context.

Without a chat template, the plain template is used (one blank line between turns):

    ### System:
    {system content}

    ### User:
    {user content}

    ### Assistant:
    {response}<eos>

The prompt ends with "### Assistant:\\n" (also used for generation); the response is the assistant content.
"""

from __future__ import annotations

from typing import Any

PLAIN_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
PLAIN_SEPARATOR = "\n\n"


def to_messages(row: dict) -> list[dict[str, str]]:
    """A prompt/response, source/target or chat row as a chat whose last turn is the assistant's."""
    if "messages" in row:
        return row["messages"]
    prompt, response = (row["prompt"], row["response"]) if "prompt" in row else (row["source"], row["target"])
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def plain_history(messages: list[dict[str, str]]) -> str:
    """Turns rendered with the plain template, each followed by a blank line."""
    return "".join(PLAIN_HEADERS[m["role"]] + m["content"] + PLAIN_SEPARATOR for m in messages)


def render_causal(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, str]:
    """(prompt, response) text for a chat ending with the assistant's turn.

    Raises ValueError when the chat template rejects the conversation or does not render the prompt as a
    prefix of the full conversation (then the response cannot be located).
    """
    history, answer = messages[:-1], messages[-1]["content"]
    if not getattr(tokenizer, "chat_template", None):
        return plain_history(history) + PLAIN_HEADERS["assistant"], answer
    try:
        prompt = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # jinja raises TemplateError (or anything the template's raise_exception passes)
        raise ValueError(f"the tokenizer's chat template rejects this conversation: {e}") from None
    if not full.startswith(prompt):
        raise ValueError("the tokenizer's chat template does not render the prompt as a prefix of the full "
                         "conversation, so the response cannot be located")
    return prompt, full[len(prompt):].rstrip()
