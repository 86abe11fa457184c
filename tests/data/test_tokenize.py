"""B2: prompt and template tokens get label -100, the response (+ end of turn + eos) is trained on; truncation
keeps the response; seq2seq pairs; special-token checks."""

from __future__ import annotations

import logging

import pytest

from lmdistill.data.tokenize import IGNORE_INDEX, encode_rows
from lmdistill.errors import DataError

QUESTION, ANSWER = "What does the bank report?", "The bank reports risk today."
CHATML_PROMPT = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
PLAIN_PROMPT = f"### User:\n{QUESTION}\n\n### Assistant:\n"


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def one(rows, tok, **kw):
    return encode_rows([r | {"row_id": i} for i, r in enumerate(rows)], tok, **kw).examples


def test_exact_mask_with_chat_template(tokenizer):
    (ex,) = one([{"prompt": QUESTION, "response": ANSWER}], tokenizer)
    prompt = ids(tokenizer, CHATML_PROMPT)
    trained = ids(tokenizer, ANSWER + "<|im_end|>") + [tokenizer.eos_token_id]
    assert ex["input_ids"] == prompt + trained
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + trained
    assert ex["prompt_length"] == len(prompt)
    assert (ex["source"], ex["row_id"], ex["bucket"]) == ("general", 0, None)


def test_exact_mask_with_plain_template(plain_tokenizer):
    (ex,) = one([{"prompt": QUESTION, "response": ANSWER, "bucket": "b1"}], plain_tokenizer)
    prompt = ids(plain_tokenizer, PLAIN_PROMPT)
    trained = ids(plain_tokenizer, ANSWER) + [plain_tokenizer.eos_token_id]
    assert ex["input_ids"] == prompt + trained
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + trained
    assert ex["bucket"] == "b1"


def test_bos_is_prepended_and_masked_on_plain_rows(plain_tokenizer):
    plain_tokenizer.bos_token = "<unk>"
    bos = plain_tokenizer.bos_token_id
    qa, text = one([{"prompt": QUESTION, "response": ANSWER}, {"text": ANSWER}], plain_tokenizer)
    assert qa["input_ids"][:1] == [bos] and qa["labels"][0] == IGNORE_INDEX
    (cut,) = one([{"prompt": " ".join([QUESTION] * 10), "response": ANSWER}], plain_tokenizer, max_length=30)
    assert len(cut["input_ids"]) == 30 and cut["input_ids"][0] == bos  # the prompt is cut after the bos
    assert cut["labels"][-len(ids(plain_tokenizer, ANSWER)) - 1:] == ids(plain_tokenizer, ANSWER) + [1]
    assert text["input_ids"] == [bos] + ids(plain_tokenizer, ANSWER) + [plain_tokenizer.eos_token_id]
    assert text["labels"] == [IGNORE_INDEX] + text["input_ids"][1:] and text["prompt_length"] == 1


def test_last_assistant_trains_on_the_last_turn_only(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": ANSWER}]
    (ex,) = one([{"messages": messages}], tokenizer, train_on="last_assistant")
    history = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages[:-1])
    prompt = ids(tokenizer, history + "<|im_start|>assistant\n")
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + ids(tokenizer, ANSWER + "<|im_end|>") + [1]


def test_text_rows_train_on_every_token_and_long_ones_start_with_a_window_without_eos(tokenizer):
    text = " ".join(["The market expects strong growth."] * 10)
    full, cut, *_ = one([{"text": ANSWER}, {"text": text}], tokenizer, max_length=16)
    assert full["input_ids"] == ids(tokenizer, ANSWER) + [tokenizer.eos_token_id]
    assert full["labels"] == full["input_ids"] and full["prompt_length"] == 0
    assert cut["input_ids"] == ids(tokenizer, text)[:16] and cut["labels"] == cut["input_ids"]


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_response(tokenizer):
    long_question = " ".join(["What does the bank report?"] * 12)
    (ex,) = one([{"prompt": long_question, "response": ANSWER}], tokenizer, max_length=40)
    full_prompt = ids(tokenizer, f"<|im_start|>user\n{long_question}<|im_end|>\n<|im_start|>assistant\n")
    trained = ids(tokenizer, ANSWER + "<|im_end|>") + [1]
    kept = 40 - len(trained)
    assert ex["input_ids"] == full_prompt[-kept:] + trained
    assert ex["labels"] == [IGNORE_INDEX] * kept + trained


def test_prompt_keeps_a_quarter_of_max_length_or_the_row_is_too_long(tokenizer):
    question = " ".join(["What does the bank report?"] * 4)
    prompt_len = len(ids(tokenizer, f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"))
    max_length = 40
    floor = max_length // 4
    assert prompt_len > floor

    def answer_of(n_tokens):  # an answer whose trained part (answer + <|im_end|> + eos) has n_tokens tokens
        words = ["Risk."] * 40
        while len(ids(tokenizer, " ".join(words) + "<|im_end|>")) + 1 > n_tokens:
            words.pop()
        return " ".join(words)

    fits, too_long = answer_of(max_length - floor), answer_of(max_length - floor + 3)
    enc = encode_rows([{"prompt": question, "response": fits, "row_id": 0},
                       {"prompt": question, "response": too_long, "row_id": 1}], tokenizer, max_length=max_length)
    assert len(enc.examples) == 1 and enc.skipped == {"too_long": 1}
    ex = enc.examples[0]
    assert len(ex["input_ids"]) <= max_length and ex["prompt_length"] >= floor


def test_seq2seq_examples(tokenizer):
    rows = [{"source": "The bank reports higher yields today.", "target": "Higher yields."},
            {"prompt": QUESTION, "response": ANSWER},
            {"source": " ".join(["A trader sells bonds."] * 20), "target": "Bonds."}]
    a, b, c = one(rows, tokenizer, max_length=12, task_type="seq2seq")
    eos = tokenizer.eos_token_id
    assert a["input_ids"] == ids(tokenizer, rows[0]["source"]) + [eos]
    assert a["labels"] == ids(tokenizer, "Higher yields.") + [eos]
    assert b["input_ids"] == ids(tokenizer, QUESTION) + [eos] and "prompt_length" not in b
    assert c["input_ids"] == ids(tokenizer, rows[2]["source"])[:11] + [eos]
    with pytest.raises(DataError, match="plain text rows, which have no target"):
        one([{"text": "x"}], tokenizer, task_type="seq2seq")



def test_a_seq2seq_prompt_only_row_is_a_prompt_with_nothing_to_train_on(tokenizer, caplog):
    """Not a target of eos alone: the source is kept for the teacher to answer (`generate`), and a stage leaves the
    row out of training, saying so, as it does causal prompt-only rows."""
    from types import SimpleNamespace

    from lmdistill.config import StageSettings
    from lmdistill.teacher.stage import stage_training_sources

    pair, prompt = one([{"prompt": QUESTION, "response": ANSWER}, {"prompt": QUESTION}], tokenizer, task_type="seq2seq")
    assert prompt["input_ids"] == ids(tokenizer, QUESTION) + [tokenizer.eos_token_id]
    assert set(prompt["labels"]) == {IGNORE_INDEX}
    caplog.set_level(logging.INFO)
    prep = SimpleNamespace(sources={"qa": [pair, prompt]})
    assert stage_training_sources(None, prep, StageSettings(name="kd")) == {"qa": [pair]}
    assert "stage kd: source qa: 1 prompt-only rows left out (nothing to train on)" in caplog.text

def test_missing_pad_token_is_set_to_eos_with_a_warning(fresh_tokenizer, caplog):
    fresh_tokenizer.pad_token = None
    with caplog.at_level(logging.WARNING):
        one([{"text": ANSWER}], fresh_tokenizer)
    assert fresh_tokenizer.pad_token_id == fresh_tokenizer.eos_token_id == 1
    assert "has no pad token; using its eos token '<|endoftext|>' (id 1) for padding" in caplog.text


def test_missing_eos_is_an_error(fresh_tokenizer):
    fresh_tokenizer.eos_token = None
    with pytest.raises(DataError, match="has no eos token"):
        one([{"text": ANSWER}], fresh_tokenizer)


def test_chat_template_that_rejects_a_conversation(fresh_tokenizer):
    fresh_tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    rows = [{"prompt": QUESTION, "response": ANSWER, "row_id": 0}, {"text": ANSWER, "row_id": 1}]
    enc = encode_rows(rows, fresh_tokenizer)
    assert enc.skipped == {"bad_chat": 1} and "roles must alternate" in enc.first_skipped[0]


def test_large_source_with_progress_bar(tokenizer):
    rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}.", "row_id": i} for i in range(2500)]
    enc = encode_rows(rows, tokenizer, max_length=64, source_name="big")
    assert len(enc.examples) == 2500 and enc.examples[-1]["row_id"] == 2499


def test_bad_arguments(tokenizer):
    with pytest.raises(DataError, match="unknown task_type 'mlm'"):
        one([{"text": "x"}], tokenizer, task_type="mlm")
