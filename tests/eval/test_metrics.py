"""Metrics on known values and against plain per-example references written here."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from lmdistill.errors import DataError
from lmdistill.eval.metrics import (agreement_and_kl, exact_match, generate_continuations, perplexity, rouge_l)
from lmdistill.models.tiny import tiny_causal_lm


def _reference_nll(model, example) -> tuple[float, int]:
    """Sum of -log p(token t+1 | tokens <= t) over counted labels of one unpadded example, in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([example["input_ids"]])).logits[0].double()
    total, count = 0.0, 0
    for t in range(len(example["input_ids"]) - 1):
        label = example["labels"][t + 1]
        if label != -100:
            total -= torch.log_softmax(logits[t], -1)[label].item()
            count += 1
    return total, count


def test_perplexity_of_uniform_model_is_vocab_size(qa_examples):
    vocab = 1024
    model = tiny_causal_lm(vocab, num_layers=1, hidden_size=32)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0 -> uniform distribution over the vocabulary
    assert perplexity(model, qa_examples, batch_size=4) == pytest.approx(vocab, rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_perplexity_matches_reference_and_ignores_padding(student, qa_examples, text_examples, batch_size):
    examples = qa_examples + text_examples
    student.train()  # metrics must switch dropout off themselves and restore the mode
    nll, count = map(sum, zip(*(_reference_nll(student.eval(), ex) for ex in examples)))
    student.train()
    assert perplexity(student, examples, batch_size) == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert student.training


def test_seq2seq_perplexity_matches_model_loss(t5_student_dir, tokenizer):
    model = AutoModelForSeq2SeqLM.from_pretrained(t5_student_dir).eval()
    pairs = [("translate: the bank", "higher yields"), ("summarize: a trader buys new bonds today", "bonds")]
    examples = [{"input_ids": tokenizer(s)["input_ids"], "labels": tokenizer(t)["input_ids"] + [1],
                 "prompt_length": 0, "source": "s2s"} for s, t in pairs]
    nll, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            n = len(ex["labels"])
            loss = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss
            nll, count = nll + loss.item() * n, count + n
    assert perplexity(model, examples, batch_size=2) == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_agreement_of_a_model_with_itself_is_one(teacher, qa_examples):
    scores = agreement_and_kl(teacher, teacher, qa_examples, batch_size=4)
    assert scores["top1_agreement"] == 1.0
    assert scores["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6)


def test_agreement_and_kl_match_reference(teacher, student, qa_examples, text_examples):
    examples = qa_examples + text_examples
    agree, kl, count = 0, 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            t_logits, s_logits = teacher(ids).logits[0].double(), student(ids).logits[0].double()
            for t in range(len(ex["input_ids"]) - 1):
                if ex["labels"][t + 1] == -100:
                    continue
                p, q = torch.softmax(t_logits[t], -1), torch.softmax(s_logits[t], -1)
                kl += float((p * (p.log() - q.log())).sum())
                agree += int(p.argmax() == q.argmax())
                count += 1
    scores = agreement_and_kl(teacher, student, examples, batch_size=3)
    assert scores["top1_agreement"] == pytest.approx(agree / count)
    assert scores["kl_teacher_student"] == pytest.approx(kl / count, rel=1e-4)
    assert scores["kl_teacher_student"] > 0.0


def test_results_do_not_depend_on_the_float32_chunk_size(teacher, student, qa_examples, monkeypatch):
    from lmdistill.eval import metrics

    whole = (perplexity(student, qa_examples), agreement_and_kl(teacher, student, qa_examples))
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 3 * teacher.config.vocab_size)  # 3 tokens per chunk
    chunked = (perplexity(student, qa_examples), agreement_and_kl(teacher, student, qa_examples))
    assert chunked[0] == pytest.approx(whole[0], rel=1e-6)
    assert chunked[1]["top1_agreement"] == whole[1]["top1_agreement"]
    assert chunked[1]["kl_teacher_student"] == pytest.approx(whole[1]["kl_teacher_student"], rel=1e-6)


def test_agreement_uses_the_shared_vocabulary_when_one_model_has_padding_rows(teacher, qa_examples):
    padded = tiny_causal_lm(teacher.config.vocab_size + 8, num_layers=1, hidden_size=32)
    with torch.no_grad():
        t_logits = teacher(torch.tensor([qa_examples[0]["input_ids"]])).logits[0, :-1].double()
        s_logits = padded(torch.tensor([qa_examples[0]["input_ids"]])).logits[0, :-1, :t_logits.shape[-1]].double()
    counted = torch.tensor(qa_examples[0]["labels"][1:]) != -100
    log_p, log_q = t_logits[counted].log_softmax(-1), s_logits[counted].log_softmax(-1)
    expected = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    assert agreement_and_kl(teacher, padded, qa_examples[:1])["kl_teacher_student"] == pytest.approx(expected, rel=1e-4)


def test_missing_labels_and_fully_masked_sets_are_user_errors(student, qa_examples):
    with pytest.raises(DataError, match="eval example 1 has no 'labels'"):
        perplexity(student, [qa_examples[0], {"input_ids": [5, 6]}])
    masked = [{**qa_examples[0], "labels": [-100] * len(qa_examples[0]["labels"])}]
    with pytest.raises(DataError, match="every label is -100"):
        perplexity(student, masked)


def test_rouge_l_known_values():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    # LCS 3 of 3 predicted and 6 reference words: P = 1, R = 0.5, F1 = 2/3.
    assert rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    assert rouge_l(["Hello, World!", "nothing shared"], ["hello world", "completely different"]) == pytest.approx(0.5)
    # Chinese is scored per character (rouge_score's own tokenizer would drop it): LCS 3 of 4 and 3.
    assert rouge_l(["高血压病人"], ["高血压病人"]) == pytest.approx(1.0)
    assert rouge_l(["高血压药"], ["高血压"]) == pytest.approx(2 * 0.75 * 1.0 / 1.75)
    with pytest.raises(DataError, match="2 predictions but 1 references"):
        rouge_l(["a", "b"], ["a"])


def test_exact_match_normalises_case_whitespace_and_trailing_punctuation():
    predictions = ["Paris.", "  new   york ", "42", "London is big", "北京。"]
    references = ["paris", "New York!", "42.0", "London", "北京"]
    assert exact_match(predictions, references) == pytest.approx(3 / 5)
    assert exact_match(["a"], ["b"]) == 0.0


def _reference_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos: int) -> list[int]:
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == eos:
                break
    return ids[len(prompt_ids):]


def test_generate_continuations_is_greedy_and_excludes_the_prompt(teacher, tokenizer):
    prompts = ["What does the bank report?", "Cash", "What does an analyst measure this year?"]
    outputs = generate_continuations(teacher, tokenizer, prompts, max_new_tokens=6, batch_size=8)
    expected = [tokenizer.decode(_reference_greedy(teacher.eval(), tokenizer(p)["input_ids"], 6, 1),
                                 skip_special_tokens=True) for p in prompts]
    assert outputs == expected
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    assert generate_continuations(teacher, tokenizer, ids, max_new_tokens=6, batch_size=1) == expected


def test_a_text_prompt_whose_chat_template_wrote_the_bos_keeps_one_bos(teacher, tokenizer_dir, monkeypatch):
    """A Llama-3-like tokenizer: it puts its BOS in front of every text, and its chat template writes one too."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.bos_token = "<unk>"
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<unk> $A",
                                                              special_tokens=[("<unk>", tok.bos_token_id)])
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    chat = tok.apply_chat_template([{"role": "user", "content": "What does the bank report?"}], tokenize=False)
    seen = []

    def generate(input_ids, attention_mask, **kwargs):
        seen.extend(row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask))
        return input_ids

    monkeypatch.setattr(teacher, "generate", generate)
    generate_continuations(teacher, tok, [chat, "Cash"], max_new_tokens=2)
    body = tok("What does the bank report?", add_special_tokens=False)["input_ids"]
    assert seen == [[tok.bos_token_id] + body, [tok.bos_token_id] + tok("Cash", add_special_tokens=False)["input_ids"]]
