"""Multi-turn chats train on every assistant turn with exact masks (also when the template rewrites history),
tool calls load and render, long texts become windows."""

from __future__ import annotations

import pytest

from lmdistill.data.formats import load_source
from lmdistill.data.summary import mark_trained, summarize_data
from lmdistill.data.tokenize import IGNORE_INDEX, encode_rows
from lmdistill.errors import DataError

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Tip?"}, {"role": "assistant", "content": "Save cash."}]
# Drops the reasoning of every assistant turn but the conversation's last, as reasoning-model templates do.
DROPS_REASONING = (
    "{%- for m in messages -%}{%- set c = m['content'] -%}"
    "{%- if m['role'] == 'assistant' and not loop.last and '</think>' in c -%}"
    "{%- set c = c.split('</think>')[-1].lstrip() -%}{%- endif -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + c + '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
WITH_TOOLS = (
    "{%- if tools -%}{{- '<|im_start|>system\\n' + tools | map(attribute='function') | map(attribute='name') | "
    "join(',') + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] -}}"
    "{%- for c in m.get('tool_calls', []) -%}{{- '<tool_call>' + c['function']['name'] + '(' + "
    "c['function']['arguments']['city'] + ')</tool_call>' -}}{%- endfor -%}{{- '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def encode(rows, tok, **kw):
    return encode_rows([r | {"row_id": i} for i, r in enumerate(rows)], tok, **kw)


def test_every_assistant_turn_is_trained_with_a_chat_template(tokenizer):
    (ex,) = encode([{"messages": CHAT}], tokenizer).examples
    assert mark_trained(ex["input_ids"], ex["labels"], tokenizer) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Hello.<|im_end|>]]\n<|im_start|>user\nTip?"
        "<|im_end|>\n<|im_start|>assistant\n[[Save cash.<|im_end|><|endoftext|>]]")
    expected = (ids(tokenizer, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
                ids(tokenizer, "Hello.<|im_end|>"),
                ids(tokenizer, "\n<|im_start|>user\nTip?<|im_end|>\n<|im_start|>assistant\n"),
                ids(tokenizer, "Save cash.<|im_end|>") + [tokenizer.eos_token_id])
    assert ex["input_ids"] == [t for part in expected for t in part]
    assert ex["labels"] == [IGNORE_INDEX] * len(expected[0]) + expected[1] + [IGNORE_INDEX] * len(expected[2]) \
        + expected[3]
    assert ex["prompt_length"] == len(expected[0]) + len(expected[1]) + len(expected[2])
    (last,) = encode([{"messages": CHAT}], tokenizer, train_on="last_assistant").examples
    assert last["input_ids"] == ex["input_ids"]
    assert last["labels"] == [IGNORE_INDEX] * last["prompt_length"] + expected[3]


def test_every_assistant_turn_is_trained_with_the_plain_template(plain_tokenizer):
    (ex,) = encode([{"messages": CHAT}], plain_tokenizer).examples
    assert mark_trained(ex["input_ids"], ex["labels"], plain_tokenizer) == (
        "### User:\nHi\n\n### Assistant:\n[[Hello.]]\n\n### User:\nTip?\n\n### Assistant:\n"
        "[[Save cash.<|endoftext|>]]")


def test_template_that_rewrites_history_gives_one_exact_example_per_turn(fresh_tokenizer):
    fresh_tokenizer.chat_template = DROPS_REASONING
    messages = []
    for k in (1, 2, 3):
        messages += [{"role": "user", "content": f"Q{k}"},
                     {"role": "assistant", "content": f"<think>r{k}</think>A{k}"}]
    examples = encode([{"messages": messages}], fresh_tokenizer).examples
    assert [(e["row_id"], e["part"]) for e in examples] == [(0, 0), (1, 1), (2, 2)]
    eos = fresh_tokenizer.eos_token_id
    for k, ex in enumerate(examples, start=1):
        history = "".join(f"<|im_start|>user\nQ{j}<|im_end|>\n<|im_start|>assistant\nA{j}<|im_end|>\n"
                          for j in range(1, k))  # earlier turns as the template shows them: reasoning dropped
        prompt = ids(fresh_tokenizer, history + f"<|im_start|>user\nQ{k}<|im_end|>\n<|im_start|>assistant\n")
        trained = ids(fresh_tokenizer, f"<think>r{k}</think>A{k}<|im_end|>") + [eos]
        assert ex["input_ids"] == prompt + trained
        assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + trained
    last = encode([{"messages": messages}], fresh_tokenizer, train_on="last_assistant").examples
    assert len(last) == 1 and last[0]["input_ids"] == examples[-1]["input_ids"]


def test_openai_tool_calls_render_through_the_template_with_tools(fixtures, fresh_tokenizer):
    src = load_source(fixtures / "tool_calls.jsonl")
    row = src.rows[0]
    assert row["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_rate", "arguments": {"city": "Paris"}}, "id": "call_1"}]}
    assert row["messages"][2] == {"role": "tool", "content": "3.5%", "tool_call_id": "call_1"}
    fresh_tokenizer.chat_template = WITH_TOOLS
    (ex,) = encode_rows([row], fresh_tokenizer).examples
    assert mark_trained(ex["input_ids"], ex["labels"], fresh_tokenizer) == (
        "<|im_start|>system\nget_rate<|im_end|>\n<|im_start|>user\nWhat is the rate in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n[[<tool_call>get_rate(Paris)</tool_call><|im_end|>]]\n<|im_start|>tool\n3.5%"
        "<|im_end|>\n<|im_start|>assistant\n[[The rate is 3.5%.<|im_end|><|endoftext|>]]")


def test_sharegpt_tool_calls_and_the_plain_rendering(fixtures, plain_tokenizer):
    (row,) = load_source(fixtures / "sharegpt_tools.json").rows
    assert [m["role"] for m in row["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert row["messages"][1]["tool_calls"][0]["function"] == {"name": "get_rate", "arguments": {"city": "Paris"}}
    assert row["tools"][0]["name"] == "get_rate"
    (ex,) = encode_rows([row], plain_tokenizer).examples
    tools = ('[{"name": "get_rate", "description": "Interest rate of a city", "parameters": {"type": "object", '
             '"properties": {"city": {"type": "string"}}}}]')
    assert mark_trained(ex["input_ids"], ex["labels"], plain_tokenizer) == (
        f"### Tools:\n{tools}\n\n### User:\nWhat is the rate in Paris?\n\n### Assistant:\n"
        '[[<tool_call>\n{"name": "get_rate", "arguments": {"city": "Paris"}}\n</tool_call>]]\n\n### Tool:\n3.5%\n\n'
        "### Assistant:\n[[The rate is 3.5%.<|endoftext|>]]")


def test_bad_tool_results_and_chats_with_only_empty_assistant_turns(fixtures):
    src = load_source(fixtures / "tool_calls.jsonl")
    assert len(src.rows) == 1 and src.skipped == {"bad_chat": 2, "empty": 1}
    assert ("line 2: turn 1 is a tool result that answers no tool call: the assistant turn before it makes no "
            "(more) calls. Add the call or drop the result [bad_chat]") in src.first_skipped[0]
    assert ("line 3: turn 2 answers tool call id 'call_9', which the assistant turn before it did not make (its "
            "calls: call_1)") in src.first_skipped[1]
    assert "line 4: every assistant turn is empty: there is nothing to train on [empty]" in src.first_skipped[2]


def test_last_assistant_with_an_empty_last_turn_is_a_bad_row(tokenizer):
    messages = CHAT[:3] + [{"role": "assistant", "content": ""}]
    assert len(encode([{"messages": messages}], tokenizer).examples) == 1  # the first turn is still trained on
    with pytest.raises(DataError, match="the last assistant turn is empty, so train_on: last_assistant leaves"):
        encode([{"messages": messages}], tokenizer, train_on="last_assistant", strict=True)
    with pytest.raises(DataError, match="data.train_on 'first' is unknown"):
        encode([{"messages": CHAT}], tokenizer, train_on="first")


@pytest.mark.parametrize("overlap", [0, 3])
def test_long_text_becomes_windows_trained_once(tokenizer, overlap):
    text = " ".join(["The market expects strong growth."] * 10)
    stream = ids(tokenizer, text) + [tokenizer.eos_token_id]
    enc = encode([{"text": text}, {"text": "Risk."}], tokenizer, max_length=16, overlap=overlap)
    windows = [e for e in enc.examples if e["input_ids"] != ids(tokenizer, "Risk.") + [1]]
    assert enc.windows == len(windows) > 2 and enc.split_rows == 1
    assert [e["part"] for e in windows] == list(range(len(windows)))
    assert all(len(e["input_ids"]) <= 16 for e in windows)
    assert sorted(e["row_id"] for e in enc.examples) == [0, 1] + list(range(2, len(windows) + 1))
    assert [t for e in windows for t in e["labels"] if t != IGNORE_INDEX] == stream  # each token trained once
    for before, after in zip(windows, windows[1:]):
        assert after["input_ids"][:overlap] == before["input_ids"][len(before["input_ids"]) - overlap:]
        assert after["labels"][:overlap] == [IGNORE_INDEX] * overlap


def test_summary_counts_windows_and_layouts(text_jsonl, fixtures, tokenizer):
    summary = summarize_data(text_jsonl, tokenizer, max_length=10)
    assert summary["layouts"]["windows"] > 0 and summary["kept"] > summary["rows"]
    tools = summarize_data(fixtures / "tool_calls.jsonl", tokenizer)
    assert tools["layouts"] == {"chat": 1, "multi_turn": 1, "tool_calls": 1}
    with pytest.raises(DataError, match="data.text_overlap 9 must be between 0 and max_length / 2"):
        summarize_data(text_jsonl, tokenizer, max_length=10, overlap=9)
