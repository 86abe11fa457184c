"""The completion layout: a base model continues text verbatim (no template, BOS as the tokenizer adds it), eos only
where the text ended; prompt-only rows; how `auto` chooses."""

import pytest
from transformers import AutoTokenizer

from lmdistill.data.completion import resolve_layout, special_prefix, text_prompt_length
from lmdistill.data.tokenize import IGNORE_INDEX, encode_rows
from lmdistill.errors import DataError

TEXT = "The bank reports higher yields today."


@pytest.fixture
def base_tokenizer(base_tokenizer_dir):
    return AutoTokenizer.from_pretrained(base_tokenizer_dir)


def encode(rows, tok, **kw):
    return encode_rows([r | {"row_id": i} for i, r in enumerate(rows)], tok, max_length=64, **kw).examples


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_text_prompts_and_pairs_continue_verbatim(base_tokenizer):
    tok, eos = base_tokenizer, base_tokenizer.eos_token_id
    text, cut, prompt, pair = encode([{"text": TEXT}, {"text": TEXT, "finished": False}, {"prompt": "The bank"},
                                      {"prompt": "The bank", "response": " reports risk."}], tok, layout="completion")
    assert text["input_ids"] == text["labels"] == ids(tok, TEXT) + [eos]  # GPT-2 adds no BOS of its own
    assert (text["prompt_length"], text["text_tokens"]) == (0, len(ids(tok, TEXT)))
    assert cut["input_ids"] == ids(tok, TEXT)  # a generation cut at max_new_tokens: no eos
    assert prompt["input_ids"] == ids(tok, "The bank") and set(prompt["labels"]) == {IGNORE_INDEX}
    assert prompt["prompt_length"] == len(prompt["input_ids"])
    assert tok.decode(pair["input_ids"]) == "The bank reports risk.<|endoftext|>"  # no template, the space kept
    head = len(ids(tok, "The bank"))
    assert pair["prompt_length"] == head and pair["labels"] == [IGNORE_INDEX] * head + pair["input_ids"][head:]


def test_bos_as_the_tokenizer_adds_it(base_tokenizer):
    from tokenizers.processors import TemplateProcessing

    tok = base_tokenizer
    tok.bos_token = "<|im_start|>"  # a Llama/OPT-like tokenizer that puts its BOS in front of every text
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A",
                                                              special_tokens=[("<|im_start|>", tok.bos_token_id)])
    assert special_prefix(tok) == [tok.bos_token_id]
    (pair,) = encode([{"prompt": "The bank", "response": " reports risk."}], tok, layout="completion")
    assert pair["input_ids"][:1] == [tok.bos_token_id] and pair["prompt_length"] == 1 + len(ids(tok, "The bank"))


def test_auto_layout(base_tokenizer, tokenizer):
    texts, prompts = [{"text": TEXT}], [{"prompt": "The bank"}]
    pairs, generated = [{"prompt": "Q", "response": "A"}], [{"prompt": "Q", "response": "A", "finished": True}]
    assert resolve_layout("auto", texts, base_tokenizer, "s") == "completion"
    assert resolve_layout("auto", prompts, base_tokenizer, "s") == "completion"
    assert resolve_layout("auto", pairs, base_tokenizer, "s") == "chat"  # instruction data keeps the plain template
    assert resolve_layout("auto", prompts, tokenizer, "s") == "chat"  # an instruct model answers in its template
    assert resolve_layout("auto", generated, tokenizer, "s") == "completion"  # already templated by `generate`
    (chat_prompt,) = encode(prompts, tokenizer)
    assert tokenizer.decode(chat_prompt["input_ids"]).endswith("<|im_start|>assistant\n")
    assert set(chat_prompt["labels"]) == {IGNORE_INDEX}
    with pytest.raises(DataError, match="source 's' holds chat conversations, which the completion layout cannot "
                                        "continue verbatim: use layout 'chat'"):
        resolve_layout("completion", [{"messages": []}], tokenizer, "s")


def test_text_prompt_length():
    example = {"prompt_length": 1, "text_tokens": 10}
    assert text_prompt_length(example, 0.5) == 6
    assert text_prompt_length(example, 0.5, tokens=3) == 4
    assert text_prompt_length(example, 0.5, tokens=50) == 10  # at least one token left to continue
    assert text_prompt_length(example, 0.01) == 2  # at least one token of text in the prompt


def test_a_stage_cannot_train_on_prompts_alone(base_tokenizer):
    from types import SimpleNamespace

    from lmdistill.config import StageSettings
    from lmdistill.errors import ConfigError
    from lmdistill.teacher.stage import stage_training_sources

    prompts = encode([{"prompt": "The bank"}, {"prompt": "A trader"}], base_tokenizer)
    texts = encode([{"text": TEXT}], base_tokenizer)
    prep = SimpleNamespace(sources={"prompts": prompts, "general": texts + prompts[:1]})
    distill = StageSettings(name="kd")
    with pytest.raises(ConfigError, match=r"stage 'kd' trains on the rows of source\(s\) \['prompts'\], but they hold "
                                          r"prompts only: let the teacher answer them \(`lmdistill generate CONFIG`"):
        stage_training_sources(None, prep, distill)
    prep.sources = {"general": texts + prompts[:1]}
    assert stage_training_sources(None, prep, distill) == {"general": texts}  # the prompt alone is left out


def test_answers_and_continuations_are_scored_apart():
    from lmdistill.eval.evaluate import ANSWER, CONTINUATION, _generation_scores
    from lmdistill.eval.metrics import rouge_l

    predictions, references = ["a b c", "x y", "the cat sat", "dog"], ["a b c", "x z", "the cat", "a dog ran"]
    scores = _generation_scores(predictions, references, [ANSWER, CONTINUATION, ANSWER, CONTINUATION], None)
    assert scores == {"rouge_l": rouge_l(predictions[::2], references[::2]), "exact_match": 0.5,
                      "rouge_l_continuation": rouge_l(predictions[1::2], references[1::2])}
    assert "exact_match" not in _generation_scores(predictions, references, [CONTINUATION] * 4, None)
