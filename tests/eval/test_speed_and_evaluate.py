"""Size/speed numbers and evaluate_models -> metrics.json."""

from __future__ import annotations

import json
import math

import pytest

from lmdistill.errors import LmdistillError, ModelError
from lmdistill.eval.evaluate import evaluate_models, prompts_and_references, read_metrics, write_metrics
from lmdistill.eval.speed import count_parameters, disk_mb, size_and_speed
from lmdistill.models.tiny import tiny_causal_lm


def test_parameter_count_counts_tied_weights_once():
    untied = tiny_causal_lm(100, num_layers=1, hidden_size=32)
    tied = tiny_causal_lm(100, num_layers=1, hidden_size=32, tie_word_embeddings=True)
    per_layer = sum(p.numel() for p in untied.model.layers.parameters())
    embeddings, norm = 100 * 32, 32
    assert count_parameters(untied) == per_layer + 2 * embeddings + norm
    assert count_parameters(tied) == per_layer + embeddings + norm


def test_disk_size_counts_weight_files_only(student_dir, tmp_path):
    assert disk_mb(student_dir) == pytest.approx((student_dir / "model.safetensors").stat().st_size / 1e6)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no weight files .* in .*: pass the folder written by save_pretrained"):
        disk_mb(tmp_path)


def test_size_and_speed_times_batch_1_and_8(student, student_dir, tokenizer):
    prompts = [tokenizer("What does the bank report?")["input_ids"], tokenizer("Cash")["input_ids"]]
    row = size_and_speed(student, prompts, folder=student_dir, max_new_tokens=4)
    assert row["params"] == count_parameters(student)
    assert row["memory_mb"] == pytest.approx(row["params"] * 4 / 1e6, rel=0.01)  # float32, no big buffers
    assert row["disk_mb"] == pytest.approx(row["memory_mb"], rel=0.05)
    for key in ("tokens_per_s/batch1", "tokens_per_s/batch8"):
        assert math.isfinite(row[key]) and row[key] > 0


def test_evaluate_models_writes_every_metric_per_role(teacher, student, teacher_dir, tokenizer, qa_examples,
                                                      text_examples, tmp_path):
    prompts = ["What does the bank report?", "What does a trader expect?"]
    metrics = evaluate_models({"teacher": teacher, "student_after": student}, tokenizer,
                              {"domain": qa_examples, "general": text_examples}, teacher=teacher,
                              generation_prompts=prompts, references=["Higher yields.", "Strong growth."],
                              model_dirs={"teacher": teacher_dir}, max_new_tokens=4, speed_new_tokens=2)
    teacher_row, student_row = metrics["teacher"], metrics["student_after"]
    assert "top1_agreement/domain" not in teacher_row and "disk_mb" in teacher_row
    assert {"perplexity/domain", "perplexity/general", "top1_agreement/general", "kl_teacher_student/domain", "rouge_l",
            "exact_match", "params", "tokens_per_s/batch1", "tokens_per_s/batch8"} <= set(student_row)
    assert 0.0 <= student_row["top1_agreement/domain"] <= 1.0 and student_row["kl_teacher_student/domain"] > 0
    assert teacher_row["params"] > student_row["params"]
    path = write_metrics(tmp_path, metrics)
    assert read_metrics(tmp_path) == json.loads(path.read_text()) == metrics


def test_long_references_skip_exact_match_and_no_speed_when_asked(student, tokenizer, qa_examples):
    long_reference = "the bank reports higher yields today and expects strong growth this year for investors"
    metrics = evaluate_models({"student": student}, tokenizer, {"domain": qa_examples[:2]},
                              generation_prompts=["What does the bank report?"], references=[long_reference],
                              max_new_tokens=2, measure_speed=False)
    assert "rouge_l" in metrics["student"] and "exact_match" not in metrics["student"]
    assert "tokens_per_s/batch1" not in metrics["student"]


def test_write_metrics_merges_roles_and_rejects_a_corrupt_file(tmp_path):
    write_metrics(tmp_path, {"teacher": {"rouge_l": 0.5}})
    write_metrics(tmp_path, {"student_after": {"rouge_l": 0.4}})
    assert read_metrics(tmp_path) == {"teacher": {"rouge_l": 0.5}, "student_after": {"rouge_l": 0.4}}
    assert list(tmp_path.iterdir()) == [tmp_path / "metrics.json"]  # no temp file left behind
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(LmdistillError, match="metrics.json is not valid JSON .*run `lmdistill eval` again"):
        read_metrics(tmp_path)
    assert read_metrics(tmp_path / "missing") == {}


def test_prompts_and_references_come_from_encoded_examples(tokenizer, qa_pairs, qa_examples, text_examples):
    prompts, references = prompts_and_references(text_examples + qa_examples, tokenizer, limit=3)
    assert [tokenizer.decode(p) for p in prompts] == [q for q, _ in qa_pairs[:3]]  # text examples: skipped
    assert references == [a for _, a in qa_pairs[:3]]  # counted labels, eos dropped
    s2s = [{"input_ids": [5, 6, 1], "labels": tokenizer("Cash flow.")["input_ids"] + [1], "source": "s2s"}]
    assert prompts_and_references(s2s, tokenizer, encoder_decoder=True) == ([[5, 6, 1]], ["Cash flow."])


def test_evaluate_models_handles_encoder_decoder_pairs(t5_teacher_dir, t5_student_dir, tokenizer):
    from transformers import AutoModelForSeq2SeqLM

    teacher = AutoModelForSeq2SeqLM.from_pretrained(t5_teacher_dir)
    student = AutoModelForSeq2SeqLM.from_pretrained(t5_student_dir)
    examples = [{"input_ids": tokenizer(s)["input_ids"] + [1], "labels": tokenizer(t)["input_ids"] + [1],
                 "source": "s2s"} for s, t in [("summarize: the bank reports growth", "growth"),
                                               ("summarize: a trader sells new bonds", "new bonds")]]
    prompts, references = prompts_and_references(examples, tokenizer, encoder_decoder=True)
    metrics = evaluate_models({"teacher": teacher, "student_after": student}, tokenizer, {"s2s": examples},
                              teacher=teacher, generation_prompts=prompts, references=references,
                              max_new_tokens=3, speed_new_tokens=2)
    row = metrics["student_after"]
    assert row["top1_agreement/s2s"] <= 1.0 and row["kl_teacher_student/s2s"] > 0 and row["tokens_per_s/batch8"] > 0
    assert 0.0 <= row["exact_match"] <= 1.0 and math.isfinite(row["perplexity/s2s"])


def test_generation_is_timed_on_eight_prompts_not_on_every_generation_prompt(student, tokenizer, qa_examples,
                                                                              monkeypatch):
    """Timing all of them (150 in the quick demo) cost ~5,000 forward passes per model; 8 give a stable tokens/s."""
    from lmdistill.eval import evaluate

    timed = []
    monkeypatch.setattr(evaluate, "size_and_speed", lambda model, prompts, **kw: timed.append(len(prompts)) or {})
    evaluate_models({"student": student}, tokenizer, {"domain": qa_examples[:2]},
                    generation_prompts=[f"What does bank {i} report?" for i in range(20)], max_new_tokens=1)
    assert timed == [8]
